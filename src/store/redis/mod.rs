//! A shared session store for server farms, on Redis (cargo feature `redis`): one server, over
//! TLS or not, or a Redis Cluster.
//!
//! See [`RedisStore`] for what it does and the bounds it keeps; one file per concept below
//! (`cluster.rs`: the slot map and per-master breakers).

mod admin;
mod breaker;
mod client;
mod cluster;
mod codec;
mod invalidation;
mod runtime;
mod write_behind;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use ::redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisError,
    TlsCertificates,
};

use self::breaker::SharedBreaker;
use self::client::{Route, RunError};
use self::cluster::{hash_tag, Topology};
use self::codec::Codec;
use self::invalidation::Coherence;
use self::runtime::{Background, Link};
use self::write_behind::{Enqueued, Pending, WriteQueue};
use crate::clock::unix_millis;
use crate::error::{Error, FileKind, StoreError};
use crate::stats::{bump, EvictionStats};
use crate::store::envelope::{hex_val, KeyRing};
use crate::store::{
    LookupDone, LookupMode, MemoryStore, PutDone, SessionId, SessionStore, SessionStoreAdmin,
    StoreUsage, StoredSession, MAX_SESSION_ID_LEN,
};

/// Session bytes a tier entry is budgeted for (the tier's byte bound is entries times this).
const TIER_BYTES_PER_ENTRY: usize = 4096;
/// How long a blocking `get`/`take` waits beyond the deadline for the background thread.
const BLOCKING_GRACE: Duration = Duration::from_millis(50);
/// Requests the multiplexed connection buffers before callers wait for room.
const PIPELINE_BUFFER: usize = 1024;
/// The shortest wait for a `CLUSTER SLOTS` refresh or a [`RedisStore::check`].
const TOPOLOGY_MIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Where the store finds Redis.
#[derive(Clone)]
enum Target {
    /// One URL: a server, or `redis+cluster://`/`rediss+cluster://` with several nodes.
    Url(String),
    /// The node URLs of a cluster.
    Cluster(Vec<String>),
}

/// Builds a [`RedisStore`]; see [`RedisStore::builder`] and [`RedisStore::cluster_builder`].
#[must_use]
pub struct RedisStoreBuilder {
    target: Target,
    ca_file: Option<PathBuf>,
    prefix: String,
    op_timeout: Duration,
    write_queue: usize,
    breaker_failures: u32,
    breaker_backoff: Duration,
    tier: TierConfig,
    invalidation: bool,
    heartbeat: Duration,
    admin_timeout: Duration,
    key_ring: Option<KeyRing>,
    plaintext: bool,
}

enum TierConfig {
    Entries(usize),
    Store(MemoryStore),
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = match &self.target {
            Target::Url(url) => redact_url(url),
            Target::Cluster(nodes) => redact_nodes(nodes),
        };
        f.debug_struct("RedisStoreBuilder")
            .field("target", &target)
            .field("ca_file", &self.ca_file)
            .field("prefix", &self.prefix)
            .field("op_timeout", &self.op_timeout)
            .field("write_queue", &self.write_queue)
            .field("breaker_failures", &self.breaker_failures)
            .field("breaker_backoff", &self.breaker_backoff)
            .field("invalidation", &self.invalidation)
            .field("heartbeat", &self.heartbeat)
            .field("admin_timeout", &self.admin_timeout)
            .field("key_ring", &self.key_ring)
            .field("plaintext", &self.plaintext)
            .finish_non_exhaustive()
    }
}

impl RedisStoreBuilder {
    /// The key prefix (default `ossl:sess:`). Hosts that share sessions use the same prefix;
    /// it must not be empty, so `clear` never touches keys outside it. The invalidation channel
    /// is the prefix followed by `invalidate`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The deadline of one operation, counted from the call: connecting (if needed), the
    /// command and decoding the reply together (default 50 ms). A lookup that has not completed
    /// by then completes with [`StoreError::Timeout`]; a write batch that has not been answered
    /// by then counts as failed.
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// How many writes may wait for the background writer (default 4096). A `put` beyond that
    /// is dropped and counted; removals may use as many slots again beyond it.
    pub fn write_queue(mut self, capacity: usize) -> Self {
        self.write_queue = capacity;
        self
    }

    /// Open the circuit after `failures` consecutive connection failures or timeouts, and skip
    /// Redis for `backoff` before letting one request probe it (default 3 failures, 1 s).
    pub fn breaker(mut self, failures: u32, backoff: Duration) -> Self {
        self.breaker_failures = failures;
        self.breaker_backoff = backoff;
        self
    }

    /// Uses `tier` as the in-memory tier in front of Redis.
    pub fn tier(mut self, tier: MemoryStore) -> Self {
        self.tier = TierConfig::Store(tier);
        self
    }

    /// An in-memory tier of at most `entries` sessions (default 1024; 0 for no tier).
    pub fn tier_entries(mut self, entries: usize) -> Self {
        self.tier = TierConfig::Entries(entries);
        self
    }

    /// Keep the tier coherent with the other hosts through Redis pub/sub (default on). Off, a
    /// tier copy lives until the session expires even after another host removed or took it
    /// (fine for a single host; single-use sessions go through `take`, which never trusts the
    /// tier), and the tier keeps serving while Redis is unreachable.
    pub fn invalidation(mut self, on: bool) -> Self {
        self.invalidation = on;
        self
    }

    /// How often the invalidation subscription is checked with a `PING` (default 1 s). A
    /// subscription that died silently is noticed within this plus the operation deadline, and
    /// the tier serves nothing until it is back.
    pub fn invalidation_heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every;
        self
    }

    /// The timeout of each admin call's connection set-up and each of its commands (default
    /// 10 s): `len`, `bytes`, `for_each` and `clear` walk the whole prefix with `SCAN`.
    pub fn admin_timeout(mut self, timeout: Duration) -> Self {
        self.admin_timeout = timeout;
        self
    }

    /// Trust the CA certificates in the PEM file at `path` (instead of the system's roots) to
    /// verify the server's certificate on a `rediss://` connection: its chain must lead to one
    /// of them and it must name the host of the URL (an IP address in the URL must be among the
    /// certificate's IP addresses). The file is read and checked by [`build`](Self::build).
    /// Verification cannot be turned off (a URL ending in `#insecure` is refused).
    pub fn ca_file(mut self, path: impl AsRef<Path>) -> Self {
        self.ca_file = Some(path.as_ref().to_owned());
        self
    }

    /// Seal values with `ring` (AES-256-GCM; the last key added seals, all keys open). Replace
    /// it at runtime with [`RedisStore::replace_key_ring`].
    pub fn key_ring(mut self, ring: KeyRing) -> Self {
        self.key_ring = Some(ring);
        self
    }

    /// Stores session bytes — master secrets — in Redis unencrypted. Anyone who can read Redis
    /// (or its dumps, or the network path to it) can then decrypt recorded traffic of every
    /// session stored. Use a [`key_ring`](Self::key_ring) instead.
    pub fn plaintext_i_understand_the_risk(mut self) -> Self {
        self.plaintext = true;
        self
    }

    /// Builds the store and starts its background thread. It connects lazily: a store built
    /// while Redis is down starts working when Redis comes up. Call [`RedisStore::check`] to
    /// learn at start-up whether Redis can be reached (a wrong CA, password or address).
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] if a URL does not parse, ends in `#insecure`, or (in a cluster)
    /// names a Unix socket or mixes `redis://` and `rediss://`; [`Error::InvalidSetting`] if a
    /// CA file was given for a plain `redis://` URL, a timeout is zero, the write queue, failure
    /// count or prefix is empty/zero, a cluster's prefix holds a hash tag (`{…}`, which would
    /// put every session in one slot), or neither a key ring nor the plaintext opt-in was given;
    /// [`Error::ReadFile`] / [`Error::InvalidFile`] if the CA file cannot be read or holds no
    /// PEM certificate; [`Error::Io`] if the background thread cannot be started.
    pub fn build(self) -> Result<RedisStore, Error> {
        let codec =
            match (self.key_ring, self.plaintext) {
                (Some(ring), false) => Codec::sealed(ring),
                (None, true) => Codec::Plaintext,
                (Some(_), true) => {
                    return Err(Error::setting(
                        "key_ring",
                        "redis store: give either a key ring or the plaintext opt-in, not both",
                    ))
                }
                (None, false) => return Err(Error::setting(
                    "key_ring",
                    "redis store needs a key ring (key_ring(), or a key file) to encrypt sessions \
                     at rest; to store them in plaintext call plaintext_i_understand_the_risk()",
                )),
            };
        for (setting, zero) in [
            ("op_timeout", self.op_timeout.is_zero()),
            ("heartbeat", self.heartbeat.is_zero()),
            ("admin_timeout", self.admin_timeout.is_zero()),
        ] {
            if zero {
                return Err(Error::setting(
                    setting,
                    "redis store: the operation, heartbeat and admin timeouts must be above zero",
                ));
            }
        }
        for (setting, zero) in [
            ("write_queue", self.write_queue == 0),
            ("breaker", self.breaker_failures == 0),
        ] {
            if zero {
                return Err(Error::setting(
                    setting,
                    "redis store: write queue and breaker failure count must be at least 1",
                ));
            }
        }
        if self.prefix.is_empty() {
            return Err(Error::setting(
                "prefix",
                "redis store: the key prefix must not be empty",
            ));
        }
        let (is_cluster, urls) = match self.target {
            Target::Url(url) => match cluster_url_nodes(&url)? {
                Some(nodes) => (true, nodes),
                None => (false, vec![url]),
            },
            Target::Cluster(nodes) => (true, nodes),
        };
        if urls.is_empty() {
            return Err(Error::setting(
                "cluster",
                "redis store: a cluster needs at least one node url",
            ));
        }
        if is_cluster && hash_tag(self.prefix.as_bytes()).is_some() {
            return Err(Error::setting(
                "prefix",
                format!(
                    "redis store: the prefix {:?} holds a hash tag ({{...}}): in a cluster every \
                     session would hash to one slot",
                    self.prefix
                ),
            ));
        }
        let shown = if is_cluster {
            redact_nodes(&urls)
        } else {
            redact_url(&urls[0])
        };
        let infos = urls
            .iter()
            .map(|url| connection_info(url))
            .collect::<Result<Vec<_>, _>>()?;
        let tls = infos.iter().filter(|i| is_tls(i)).count();
        if tls != 0 && tls != infos.len() {
            return Err(Error::InvalidUrl {
                url: shown,
                reason: "redis store: use rediss:// for every node or for none".into(),
            });
        }
        if is_cluster
            && infos
                .iter()
                .any(|i| matches!(i.addr(), ConnectionAddr::Unix(_)))
        {
            return Err(Error::InvalidUrl {
                url: shown,
                reason: "redis store: a cluster is reached over TCP, not a unix socket".into(),
            });
        }
        let certs = match &self.ca_file {
            None => None,
            Some(_) if tls == 0 => {
                return Err(Error::setting(
                    "ca_file",
                    format!("redis store: a CA file was given but {shown} is not a rediss:// url"),
                ))
            }
            Some(path) => Some(read_ca_file(path)?),
        };
        let client_for = |info: ConnectionInfo| {
            match &certs {
                Some(certs) => Client::build_with_tls(info, certs.clone()),
                None => Client::open(info),
            }
            .map_err(|e| Error::InvalidUrl {
                url: shown.clone(),
                reason: format!("redis store: {e}"),
            })
        };
        let nodes = infos
            .iter()
            .cloned()
            .map(client_for)
            .collect::<Result<Vec<_>, _>>()?;
        let template = infos[0].clone();
        // The outer deadline bounds every request; the connection's own response timeout
        // would only add a timer per request.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.op_timeout))
            .set_response_timeout(None)
            .set_pipeline_buffer_size(PIPELINE_BUFFER);
        let topology = is_cluster.then(|| {
            let seeds = nodes
                .iter()
                .map(|c| Arc::new(Link::new(c.clone(), config.clone())))
                .collect();
            Topology::new(self.breaker_failures, self.breaker_backoff, seeds)
        });
        let tier = match self.tier {
            TierConfig::Entries(0) => None,
            TierConfig::Entries(n) => Some(
                MemoryStore::builder()
                    .max_entries(n)
                    .max_bytes(n.saturating_mul(TIER_BYTES_PER_ENTRY))
                    .build()?,
            ),
            TierConfig::Store(store) => Some(store),
        };
        let subscribe = self.invalidation && tier.is_some();
        let shared = Arc::new(Shared {
            url: shown,
            pattern: format!("{}*", escape_glob(&self.prefix)),
            channel: format!("{}invalidate", self.prefix),
            prefix: self.prefix,
            op_timeout: self.op_timeout,
            heartbeat: self.heartbeat,
            admin_timeout: self.admin_timeout,
            link: Link::new(nodes[0].clone(), config.clone()),
            config,
            nodes,
            template,
            certs,
            breaker: SharedBreaker::new(self.breaker_failures, self.breaker_backoff),
            topology,
            queue: WriteQueue::new(self.write_queue),
            coherence: Coherence::new(self.invalidation),
            tier,
            codec,
            counters: Counters::default(),
        });
        let background = Background::start("redis-session-store")?;
        background.spawn(write_behind::run_writer(shared.clone()));
        if subscribe {
            background.spawn(invalidation::run_subscriber(shared.clone()));
        }
        if is_cluster {
            background.spawn(run_topology(shared.clone()));
        }
        Ok(RedisStore { shared, background })
    }
}

/// The parsed form of `url`, with no `CLIENT SETINFO` on connect (a connection set-up without a
/// round trip) and no Nagle (pipelined requests go out as they come, not behind the previous
/// one's ACK).
fn connection_info(url: &str) -> Result<ConnectionInfo, Error> {
    let bad_url = |e: RedisError| Error::InvalidUrl {
        url: redact_url(url),
        reason: format!("redis store: bad url: {e}"),
    };
    let info = url.into_connection_info().map_err(bad_url)?;
    if matches!(info.addr(), ConnectionAddr::TcpTls { insecure: true, .. }) {
        return Err(Error::InvalidUrl {
            url: redact_url(url),
            reason: "redis store: certificate verification cannot be turned off (#insecure); \
                     give the CA with ca_file()"
                .into(),
        });
    }
    let settings = info.redis_settings().clone().set_skip_set_lib_name();
    let tcp = info.tcp_settings().clone().set_nodelay(true);
    Ok(info.set_redis_settings(settings).set_tcp_settings(tcp))
}

fn is_tls(info: &ConnectionInfo) -> bool {
    matches!(info.addr(), ConnectionAddr::TcpTls { .. })
}

/// Reads a CA file for [`RedisStoreBuilder::ca_file`], refusing one without a certificate.
fn read_ca_file(path: &Path) -> Result<TlsCertificates, Error> {
    let pem = std::fs::read(path).map_err(|source| Error::ReadFile {
        kind: FileKind::RedisCa,
        path: path.to_path_buf(),
        source,
    })?;
    match openssl::x509::X509::stack_from_pem(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        }),
        _ => Err(Error::InvalidFile {
            kind: FileKind::RedisCa,
            path: path.to_path_buf(),
            reason: "holds no PEM certificate".into(),
        }),
    }
}

/// The node URLs of `redis+cluster://[user:password@]host:port,host:port[/db][?query]` (or
/// `rediss+cluster://`), each `redis://[user:password@]host:port[/db][?query]`; `None` for any
/// other scheme.
fn cluster_url_nodes(url: &str) -> Result<Option<Vec<String>>, Error> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", rest)
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        ("rediss", rest)
    } else {
        return Ok(None);
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    let nodes: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("{scheme}://{userinfo}{h}{tail}"))
        .collect();
    if nodes.is_empty() {
        return Err(Error::InvalidUrl {
            url: redact_url(url),
            reason: format!(
                "redis store: names no node (expected {scheme}+cluster://host:port,host:port)"
            ),
        });
    }
    Ok(Some(nodes))
}

/// Reads the cluster's slot map every heartbeat, for the per-master breakers.
async fn run_topology(shared: Arc<Shared>) {
    loop {
        if let Err(e) = shared.refresh_topology().await {
            tracing::debug!(url = %shared.url, error = %e, "redis session store: CLUSTER SLOTS failed");
        }
        tokio::time::sleep(shared.heartbeat).await;
    }
}

/// The store's own counters, from [`RedisStore::stats`]: read from memory, never from Redis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisStoreStats {
    /// Redis operations that failed (connection refused or dropped, deadline passed, error
    /// reply), lookups and write batches alike.
    pub redis_errors: u64,
    /// Of those, the ones that ran out of time.
    pub timeouts: u64,
    /// Lookups answered at once with [`StoreError::BreakerOpen`].
    pub breaker_open_skips: u64,
    /// Times the breaker opened.
    pub breaker_opens: u64,
    /// Lookups answered by the memory tier without a round trip.
    pub tier_hits: u64,
    /// Lookups answered by a write of this host still queued (read-your-writes).
    pub queue_hits: u64,
    /// Lookups sent to Redis.
    pub remote_lookups: u64,
    /// Values that did not open (tampered, moved, another key, unknown key id): each a miss.
    pub decrypt_failures: u64,
    /// Puts queued for the writer (coalesced ones included).
    pub puts_queued: u64,
    /// Removals queued for the writer (coalesced ones included).
    pub removes_queued: u64,
    /// Writes that replaced a pending write of the same id.
    pub writes_coalesced: u64,
    /// Puts dropped because the write queue was full.
    pub puts_dropped: u64,
    /// Removals dropped because the write queue was full.
    pub removes_dropped: u64,
    /// Writes Redis acknowledged.
    pub writes_done: u64,
    /// Writes in batches that failed.
    pub write_errors: u64,
    /// Of those, the ones queued again because Redis could not be reached (a batch Redis
    /// answered with an error is not retried).
    pub write_retries: u64,
    /// Writes queued now.
    pub write_queue_len: u64,
    /// Invalidations published (removals and takes that found a session).
    pub invalidations_sent: u64,
    /// Invalidations received from the channel (this host's own included).
    pub invalidations_received: u64,
    /// Times the invalidation subscription was lost.
    pub subscription_losses: u64,
    /// Heartbeat `PING`s the subscription answered.
    pub heartbeats: u64,
    /// Connections opened for lookups and writes.
    pub connects: u64,
    /// Admin calls (`len`, `bytes`, `for_each`, `clear`) that failed.
    pub admin_errors: u64,
    /// Masters of the cluster in the store's slot map (0 for a single server).
    pub cluster_nodes: u64,
    /// Circuit breakers open now: 0 or 1 for a single server; in a cluster, one per master that
    /// is down (and one more while the slot map is not known yet).
    pub breakers_open: u64,
    /// Times the cluster's slot map was read (`CLUSTER SLOTS`, every heartbeat).
    pub topology_refreshes: u64,
    /// Whether a breaker is open now (in a cluster: any master's).
    pub breaker_open: bool,
    /// Whether the invalidation subscription is up now (false without a tier or invalidation).
    pub subscribed: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    redis_errors: AtomicU64,
    timeouts: AtomicU64,
    breaker_open_skips: AtomicU64,
    breaker_opens: AtomicU64,
    tier_hits: AtomicU64,
    queue_hits: AtomicU64,
    remote_lookups: AtomicU64,
    decrypt_failures: AtomicU64,
    puts_queued: AtomicU64,
    removes_queued: AtomicU64,
    writes_coalesced: AtomicU64,
    pub(crate) puts_dropped: AtomicU64,
    pub(crate) removes_dropped: AtomicU64,
    pub(crate) writes_done: AtomicU64,
    pub(crate) write_errors: AtomicU64,
    pub(crate) write_retries: AtomicU64,
    pub(crate) invalidations_sent: AtomicU64,
    invalidations_received: AtomicU64,
    pub(crate) subscription_losses: AtomicU64,
    pub(crate) heartbeats: AtomicU64,
    pub(crate) admin_errors: AtomicU64,
}

impl Shared {
    /// The breaker that guards `key`: the server's, or that of the cluster master holding it.
    pub(crate) fn breaker_for(&self, key: &[u8]) -> Arc<SharedBreaker> {
        match &self.topology {
            Some(t) => t.breaker_for(key),
            None => Arc::clone(&self.breaker),
        }
    }

    /// A client for the cluster node at `host:port`, with the first node's TLS and credentials.
    pub(crate) fn node_client(&self, host: &str, port: u16) -> Result<Client, RedisError> {
        let addr = match self.template.addr() {
            ConnectionAddr::TcpTls { .. } => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: false,
                tls_params: None,
            },
            _ => ConnectionAddr::Tcp(host.to_owned(), port),
        };
        let info = self.template.clone().set_addr(addr);
        match &self.certs {
            Some(certs) => Client::build_with_tls(info, certs.clone()),
            None => Client::open(info),
        }
    }

    /// A connection (not opened yet) to the cluster master at `host:port`.
    pub(crate) fn node_link(&self, host: &str, port: u16) -> Option<Link> {
        match self.node_client(host, port) {
            Ok(client) => Some(Link::new(client, self.config.clone())),
            Err(e) => {
                tracing::warn!(host, port, error = %e, "redis session store: cannot reach a cluster master");
                None
            }
        }
    }

    /// Counts the writes a [`WriteQueue::finish`] could not queue again.
    pub(crate) fn count_lost(&self, (puts, removes): (u64, u64)) {
        let c = &self.counters;
        c.puts_dropped.fetch_add(puts, Ordering::Relaxed);
        c.removes_dropped.fetch_add(removes, Ordering::Relaxed);
    }
}

/// What the callers and the background tasks share.
pub(crate) struct Shared {
    url: String,
    prefix: String,
    pattern: String,
    channel: String,
    op_timeout: Duration,
    heartbeat: Duration,
    admin_timeout: Duration,
    /// The server's connection (unused in a cluster: each master has its own).
    link: Link,
    config: AsyncConnectionConfig,
    /// The server, or the cluster nodes the store was given (for pub/sub and admin calls).
    nodes: Vec<Client>,
    /// The first node's settings (TLS, credentials), for connections to other cluster nodes.
    template: ConnectionInfo,
    certs: Option<TlsCertificates>,
    /// The breaker of a single server.
    breaker: Arc<SharedBreaker>,
    /// A cluster's slot map and per-master breakers.
    topology: Option<Topology>,
    queue: WriteQueue,
    coherence: Coherence,
    tier: Option<MemoryStore>,
    codec: Codec,
    counters: Counters,
}

/// A [`SessionStore`] in Redis, shared by the hosts of a farm, with a memory tier in front.
///
/// When clients land on another host, resumption falls to 1/n unless the hosts share their
/// sessions. [`RedisStore`] keeps them in one Redis, and never holds up the thread that calls it
/// on the network:
///
/// - **Keys** are the prefix plus the session id in hex; **values** are sealed with the
///   [`KeyRing`] ([`envelope`](crate::envelope)): AES-256-GCM, the session id as associated data,
///   the expiry inside. Redis never sees a master secret, and a value copied under another key
///   does not open. Without a key ring the builder refuses, unless the plaintext opt-in is called
///   by name. **TTL** is set by Redis (`SET key value PX ttl`) from the session's expiry.
/// - **Lookups never block** ([`SessionStore::lookup`]; [`is_remote`](SessionStore::is_remote)
///   is true). A hit in the memory tier, or a write of this host still queued, completes at once
///   on the calling thread; otherwise `GET` (or `GETDEL` for [`LookupMode::Take`]) and the
///   opening of the envelope run on the store's background thread, which completes the
///   [`LookupDone`] there. All lookups share one multiplexed connection, so concurrent lookups
///   are pipelined: one round trip each, however many are in flight.
/// - **One deadline per operation**, [`op_timeout`](RedisStoreBuilder::op_timeout) (default
///   50 ms), covers connecting (when there is no connection), the command and decoding the reply
///   together, counted from the call. Every lookup completes within it plus the background
///   thread's latency: the 1 ms granularity of its timer and the few microseconds it spends on
///   each lookup due at the same moment (5000 lookups timing out together against a hung Redis
///   completed 52 ms after their call at the median, 57.6 ms at most, on a loaded 2-core
///   machine). A lookup that runs out of time completes with [`StoreError::Timeout`], counted;
///   one the store drops (the store itself dropped) completes with
///   [`StoreError::Stopped`]. The blocking [`get`](SessionStore::get) and
///   [`take`](SessionStore::take), kept for admin use and tests, wait for such a lookup, so they
///   too return within the deadline (plus a 50 ms grace for scheduling).
/// - **Writes are write-behind**: [`put`](SessionStore::put) and [`remove`](SessionStore::remove)
///   queue the write and return in microseconds; a background writer sends the queue in pipelined
///   batches, one batch at a time on the one connection, so writes already sent keep their order.
///   The queue holds one pending write per id and a newer write replaces the pending one, so a
///   `remove` always wins over an earlier queued `put` of the same id. Puts are accepted while
///   fewer than [`write_queue`](RedisStoreBuilder::write_queue) writes wait; beyond that a put is
///   dropped and counted (a lost put costs a later full handshake, never a wrong one), while
///   removals may use as many slots again. A batch that failed because Redis was unreachable is
///   queued again (newer writes of the same ids win), so the queue carries writes through an
///   outage until it overflows. Lookups on this host see its own queued writes.
/// - **`take` is `GETDEL`**, atomic across hosts: a single-use TLS 1.3 session resumes once in
///   the whole farm. A take never trusts the memory tier.
/// - **A circuit breaker** skips Redis for a back-off period after consecutive failures
///   (connection refused or dropped, deadline passed), then lets one request through to probe.
///   Lookups refused by it complete at once with [`StoreError::BreakerOpen`]; the writer waits.
///   A probe that is cancelled or panics before reporting gives its slot back.
/// - **Reconnects** happen on the background thread: a connection that failed is dropped and the
///   next operation opens a fresh one (one retry within the same deadline when an idle
///   connection turns out dead), never blocking a caller.
/// - **A memory tier** in front answers hot sessions without a round trip, and stays coherent
///   across hosts through Redis pub/sub invalidations: a session removed or taken on host A stops
///   being served from host B's tier within one pub/sub delivery after A's `DEL` reaches Redis;
///   while B's subscription is down (detected by the connection failing, or by a `PING` every
///   [`invalidation_heartbeat`](RedisStoreBuilder::invalidation_heartbeat), default 1 s, going
///   unanswered for `op_timeout`) B's tier serves nothing, and B clears it when it subscribes
///   again. So the worst case is heartbeat + `op_timeout` after the `DEL` reached Redis.
/// - **Stats are counters**: [`RedisStore::stats`], `Debug` and [`usage`](SessionStore::usage)
///   never touch Redis. The `SCAN`-based size, iteration and clearing are explicit admin calls
///   ([`SessionStoreAdmin`]) on a connection of their own, with their own timeout, and do not
///   feed the circuit breaker.
///
/// - **TLS**: with a `rediss://` URL the connections (lookups, writes, the subscription and the
///   admin calls) speak TLS through rustls, and the server's certificate is always verified:
///   against the system's roots, or the CA given to
///   [`ca_file`](RedisStoreBuilder::ca_file); `#insecure` is refused. A server whose
///   certificate does not verify is never sent a byte of session data: every operation fails
///   as a counted [`StoreError::Unavailable`] naming the cause, and [`check`](Self::check) reports
///   it at start-up.
/// - **Redis Cluster** ([`cluster_builder`](Self::cluster_builder), or a `redis+cluster://` URL):
///   keys hash over the 16384 slots (a hash tag in the prefix is refused); the store reads the
///   slot map with `CLUSTER SLOTS` and sends each key's command on the connection of the master
///   that holds it, each master with its own circuit breaker, so a master that is down costs
///   only its own keys (counted misses, each within the deadline, then at once while its
///   breaker is open) and never stalls the others. Invalidations use ordinary pub/sub, which the
///   cluster forwards to every node.
/// - **Keys reload at runtime**: [`replace_key_ring`](Self::replace_key_ring).
///
/// Use an IP address in the URL: the host name is resolved before the deadline applies.
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
/// use openssl_session_cache::{KeyRing, RedisStore, SessionStore};
///
/// let store = RedisStore::builder("redis://127.0.0.1:6379")
///     .key_ring(KeyRing::from_file("/etc/myserver/session.keys")?)
///     .op_timeout(Duration::from_millis(20))
///     .build()?;
/// let store: Arc<dyn SessionStore> = Arc::new(store);
/// # Ok::<(), openssl_session_cache::Error>(())
/// ```
///
/// Dropping the store gives queued writes up to the operation deadline to reach Redis, then
/// stops its background thread; lookups still in flight complete with
/// [`StoreError::Stopped`].
pub struct RedisStore {
    shared: Arc<Shared>,
    background: Background,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.shared;
        f.debug_struct("RedisStore")
            .field("url", &s.url)
            .field("prefix", &s.prefix)
            .field("codec", &s.codec)
            .field("tier", &s.tier.is_some())
            .field("op_timeout", &s.op_timeout)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A builder for a store at `url`:
    ///
    /// - `redis://[user:password@]host:port[/db]`: one server;
    /// - `rediss://…`: one server over TLS, its certificate verified (against the system's roots,
    ///   or the CA of [`ca_file`](RedisStoreBuilder::ca_file));
    /// - `redis+cluster://[user:password@]host:port,host:port,…` (or `rediss+cluster://`): a Redis
    ///   Cluster reached through the listed nodes, as [`cluster_builder`](Self::cluster_builder).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        Self::builder_for(Target::Url(url.into()))
    }

    /// A builder for a store in a Redis Cluster reached through `nodes`, each
    /// `redis://[user:password@]host:port` (or all `rediss://`). List every master, or at least
    /// several nodes: the store learns the rest from the cluster, but subscribes to
    /// invalidations and starts admin walks on the listed ones.
    ///
    /// In a cluster, each master has its own circuit breaker: a master that is down makes the
    /// lookups of its keys misses (each within the operation deadline, then at once while its
    /// breaker is open) and holds its writes back, while the keys of the other masters are
    /// served as before. Run the cluster with `cluster-require-full-coverage no`, or every
    /// master refuses every command while one is down.
    pub fn cluster_builder<I, S>(nodes: I) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::builder_for(Target::Cluster(nodes.into_iter().map(Into::into).collect()))
    }

    fn builder_for(target: Target) -> RedisStoreBuilder {
        RedisStoreBuilder {
            target,
            ca_file: None,
            prefix: "ossl:sess:".into(),
            op_timeout: Duration::from_millis(50),
            write_queue: 4096,
            breaker_failures: 3,
            breaker_backoff: Duration::from_secs(1),
            tier: TierConfig::Entries(1024),
            invalidation: true,
            heartbeat: Duration::from_secs(1),
            admin_timeout: Duration::from_secs(10),
            key_ring: None,
            plaintext: false,
        }
    }

    /// The store's counters now (memory only, never a round trip).
    pub fn stats(&self) -> RedisStoreStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RedisStoreStats {
            redis_errors: get(&c.redis_errors),
            timeouts: get(&c.timeouts),
            breaker_open_skips: get(&c.breaker_open_skips),
            breaker_opens: get(&c.breaker_opens),
            tier_hits: get(&c.tier_hits),
            queue_hits: get(&c.queue_hits),
            remote_lookups: get(&c.remote_lookups),
            decrypt_failures: get(&c.decrypt_failures),
            puts_queued: get(&c.puts_queued),
            removes_queued: get(&c.removes_queued),
            writes_coalesced: get(&c.writes_coalesced),
            puts_dropped: get(&c.puts_dropped),
            removes_dropped: get(&c.removes_dropped),
            writes_done: get(&c.writes_done),
            write_errors: get(&c.write_errors),
            write_retries: get(&c.write_retries),
            write_queue_len: self.shared.queue.len() as u64,
            invalidations_sent: get(&c.invalidations_sent),
            invalidations_received: get(&c.invalidations_received),
            subscription_losses: get(&c.subscription_losses),
            heartbeats: get(&c.heartbeats),
            connects: match &self.shared.topology {
                Some(t) => t.connects(),
                None => self.shared.link.connects(),
            },
            admin_errors: get(&c.admin_errors),
            cluster_nodes: self.shared.topology.as_ref().map_or(0, |t| t.len() as u64),
            breakers_open: match &self.shared.topology {
                Some(t) => t.open() as u64,
                None => u64::from(self.shared.breaker.is_open()),
            },
            topology_refreshes: self.shared.topology.as_ref().map_or(0, |t| t.refreshes()),
            breaker_open: match &self.shared.topology {
                Some(t) => t.open() > 0,
                None => self.shared.breaker.is_open(),
            },
            subscribed: self.shared.coherence.subscribed(),
        }
    }

    /// The Redis key that holds `id`.
    pub fn key_for(&self, id: &SessionId) -> String {
        self.shared.key_for(id)
    }

    /// The pub/sub channel that carries invalidations (the prefix followed by `invalidate`).
    pub fn invalidation_channel(&self) -> &str {
        &self.shared.channel
    }

    /// The deadline of one operation ([`RedisStoreBuilder::op_timeout`]).
    pub fn op_timeout(&self) -> Duration {
        self.shared.op_timeout
    }

    /// The memory tier, if there is one.
    pub fn tier(&self) -> Option<&MemoryStore> {
        self.shared.tier.as_ref()
    }

    /// Waits until every queued write has been sent and answered (or failed), at most
    /// `timeout`; returns whether the queue drained. For shutdown and tests: the data path never
    /// waits for the writer. Returns false at once when called on the store's own background
    /// thread (from a [`LookupDone`] callback), which must never wait for itself.
    pub fn flush(&self, timeout: Duration) -> bool {
        !self.background.is_current() && self.shared.queue.wait_drained(timeout)
    }

    /// Connects (if not connected yet) and sends a `PING` through the store's shared connection,
    /// waiting at most the admin timeout; for a cluster it also reads the slot map. Call it at
    /// start-up to refuse a wrong CA, certificate, password or address before serving: the store
    /// itself connects lazily and reports such failures only as counted lookup errors
    /// ([`StoreError::Unavailable`] naming the cause). A failure is counted in `admin_errors`
    /// and does not feed the circuit breaker.
    ///
    /// # Errors
    /// [`Error::Store`] with [`StoreError::Unavailable`] (cannot connect: the message says why,
    /// e.g. the certificate is not signed by the CA), [`StoreError::Timeout`] or
    /// [`StoreError::Backend`] (an error reply, e.g. a refused password); also when called on
    /// the store's own background thread.
    pub fn check(&self) -> Result<(), Error> {
        if self.background.is_current() {
            return Err(StoreError::OwnThread.into());
        }
        let s = Arc::clone(&self.shared);
        let wait = s.admin_timeout.max(TOPOLOGY_MIN_TIMEOUT);
        let (tx, rx) = mpsc::sync_channel(1);
        self.background.spawn(async move {
            let deadline = Instant::now() + wait;
            let pinged = s
                .run(deadline, Route::Any, |mut conn| async move {
                    ::redis::cmd("PING")
                        .query_async::<::redis::Value>(&mut conn)
                        .await
                })
                .await;
            let r = match pinged {
                Ok(_) => s.refresh_topology().await,
                Err(RunError::Timeout) => Err(StoreError::Timeout),
                Err(RunError::Connect(e)) => Err(StoreError::Unavailable(format!(
                    "redis: cannot connect to {}: {e}",
                    s.url
                ))),
                Err(RunError::Redis(e)) => Err(map_error(&e)),
            };
            let _ = tx.send(r);
        });
        let r = match rx.recv_timeout(wait + BLOCKING_GRACE) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(StoreError::Timeout),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(StoreError::Stopped),
        };
        r.map_err(|e| {
            bump(&self.shared.counters.admin_errors);
            tracing::warn!(url = %self.shared.url, error = %e, "redis session store: check failed");
            Error::Store(e)
        })
    }

    /// Replaces the key ring at runtime (after the key file changed): values sealed under keys
    /// still in `ring` keep opening, values under keys no longer in it become misses (counted in
    /// `decrypt_failures` and left in Redis for hosts that still hold the key), and from now on
    /// values are sealed with `ring`'s active key, writes already queued included (they are
    /// sealed when sent). Sessions already in the memory tier are not affected. The old ring's
    /// keys are wiped once no operation in flight uses them.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] if the store was built with
    /// [`plaintext_i_understand_the_risk`](RedisStoreBuilder::plaintext_i_understand_the_risk)
    /// (it has no ring to replace).
    pub fn replace_key_ring(&self, ring: KeyRing) -> Result<(), Error> {
        if self.shared.codec.replace_ring(ring) {
            Ok(())
        } else {
            Err(Error::setting(
                "key_ring",
                "redis store: a plaintext store has no key ring to replace",
            ))
        }
    }

    /// What this host can answer without a round trip: the tier (while it is coherent) or a
    /// queued write of its own.
    fn local(
        &self,
        id: &SessionId,
        mode: LookupMode,
    ) -> Option<Result<Option<StoredSession>, StoreError>> {
        let s = &self.shared;
        if id.is_peer_state() {
            // A DTLS peer's shared state is read from Redis only: another host may have
            // extended its lease since this host last held it.
            return None;
        }
        match mode {
            LookupMode::Get => {
                if let Some(tier) = &s.tier {
                    if s.coherence.tier_readable() {
                        if let Ok(Some(found)) = tier.get(id) {
                            bump(&s.counters.tier_hits);
                            return Some(Ok(Some(found)));
                        }
                    }
                }
                let pending = s.queue.pending(id)?;
                bump(&s.counters.queue_hits);
                Some(Ok(match pending {
                    Pending::Put(found) => Some(found),
                    Pending::Remove => None,
                }))
            }
            LookupMode::Take => {
                s.drop_from_tier(*id);
                // A put still queued here has never reached Redis, so no other host can take
                // it: taking it from the queue (which turns it into a removal) is atomic.
                let taken = s.queue.take_pending(id)?;
                bump(&s.counters.queue_hits);
                Some(Ok(taken))
            }
        }
    }

    /// Starts the Redis side of a lookup on the background thread, or refuses it at once while
    /// the breaker is open.
    fn start_remote(&self, id: SessionId, mode: LookupMode, done: LookupDone) {
        let s = &self.shared;
        let key = s.key_for(&id);
        let Some(permit) = s.breaker_for(key.as_bytes()).admit(Instant::now()) else {
            bump(&s.counters.breaker_open_skips);
            done.complete(Err(StoreError::BreakerOpen));
            return;
        };
        bump(&s.counters.remote_lookups);
        let deadline = Instant::now() + s.op_timeout;
        self.background.spawn(Shared::remote_lookup(
            Arc::clone(s),
            id,
            key,
            mode,
            permit,
            deadline,
            done,
        ));
    }

    /// A lookup, waited for on this thread (bounded by the deadline plus a grace).
    fn blocking(
        &self,
        id: &SessionId,
        mode: LookupMode,
    ) -> Result<Option<StoredSession>, StoreError> {
        if let Some(r) = self.local(id, mode) {
            return r;
        }
        if self.background.is_current() {
            return Err(StoreError::OwnThread);
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.start_remote(
            *id,
            mode,
            LookupDone::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        match rx.recv_timeout(self.shared.op_timeout + BLOCKING_GRACE) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(StoreError::Timeout),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(StoreError::Stopped),
        }
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.flush(self.shared.op_timeout);
    }
}

impl SessionStore for RedisStore {
    /// The tier, this host's queued writes, then `GET` in Redis; waits for the answer, at most
    /// the operation deadline (plus a 50 ms grace). For admin use and tests: the cache uses
    /// [`lookup`](Self::lookup).
    fn get(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        self.blocking(id, LookupMode::Get)
    }

    /// Writes the tier, then queues `SET key value PX ttl` (the session's remaining lifetime)
    /// and returns; a session already expired queues a `DEL` instead.
    ///
    /// # Errors
    /// [`StoreError::QueueFull`] if the write queue is full (the put is dropped and counted; the
    /// tier still holds the session).
    fn put(&self, id: SessionId, session: StoredSession) -> Result<(), StoreError> {
        let s = &self.shared;
        let ttl_ms = session
            .expires_at_millis()
            .saturating_sub(unix_millis(SystemTime::now()));
        if ttl_ms == 0 {
            s.drop_from_tier(id);
            return match s.queue_remove(id) {
                Enqueued::Dropped => Err(StoreError::QueueFull),
                _ => Ok(()),
            };
        }
        if let Some(tier) = &s.tier {
            // A session larger than the tier holds still goes to Redis.
            match tier.put(id, session.clone()) {
                Ok(()) | Err(StoreError::TooLarge { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        match s.queue.put(id, session) {
            Enqueued::Queued => {
                bump(&s.counters.puts_queued);
                Ok(())
            }
            Enqueued::Coalesced => {
                bump(&s.counters.puts_queued);
                bump(&s.counters.writes_coalesced);
                Ok(())
            }
            Enqueued::Dropped => {
                bump(&s.counters.puts_dropped);
                Err(StoreError::QueueFull)
            }
        }
    }

    /// `GETDEL` in Redis (or a put of this host still queued), waited for like
    /// [`get`](Self::get). The tier's copy is dropped but never returned on its own, so a
    /// session taken on another host (or with Redis unreachable) is not handed out here.
    fn take(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        self.blocking(id, LookupMode::Take)
    }

    /// Drops the tier's copy and queues `DEL` plus an invalidation for the other hosts' tiers;
    /// returns `true` once queued.
    ///
    /// # Errors
    /// [`StoreError::QueueFull`] if even the removals' share of the queue is full (counted).
    fn remove(&self, id: &SessionId) -> Result<bool, StoreError> {
        let s = &self.shared;
        s.drop_from_tier(*id);
        match s.queue_remove(*id) {
            Enqueued::Dropped => Err(StoreError::QueueFull),
            _ => Ok(true),
        }
    }

    /// Never blocks: a tier hit or a queued write of this host completes `done` at once, as does
    /// an open breaker (with [`StoreError::BreakerOpen`]); otherwise `done` completes on the
    /// store's background thread within the operation deadline.
    fn lookup(&self, id: SessionId, mode: LookupMode, done: LookupDone) {
        match self.local(&id, mode) {
            Some(r) => done.complete(r),
            None => self.start_remote(id, mode, done),
        }
    }

    /// `SET key value PX ttl` sent at once on the background thread (past the write-behind
    /// queue and the tier); `done` completes with `Ok` once Redis acknowledged it, or with the
    /// error within the operation deadline (at once while the breaker is open).
    fn put_confirmed(&self, id: SessionId, session: StoredSession, done: PutDone) {
        let s = &self.shared;
        let key = s.key_for(&id);
        let Some(permit) = s.breaker_for(key.as_bytes()).admit(Instant::now()) else {
            bump(&s.counters.breaker_open_skips);
            return done.complete(Err(StoreError::Unavailable(
                "redis circuit breaker open: redis skipped".into(),
            )));
        };
        let deadline = Instant::now() + s.op_timeout;
        self.background.spawn(Shared::remote_put(
            Arc::clone(s),
            id,
            session,
            permit,
            deadline,
            done,
        ));
    }

    /// Like [`put_confirmed`](Self::put_confirmed), with `expect` compared by a Lua script
    /// (`EVAL`) against the value's version, which a peer state keeps in the clear ahead of its
    /// sealed bytes: compare and `SET` are one atomic step in Redis, on the node of the key.
    fn put_if(&self, id: SessionId, session: StoredSession, expect: Option<&[u64]>, done: PutDone) {
        let Some(expect) = expect else {
            return self.put_confirmed(id, session, done);
        };
        let s = &self.shared;
        let key = s.key_for(&id);
        let Some(permit) = s.breaker_for(key.as_bytes()).admit(Instant::now()) else {
            bump(&s.counters.breaker_open_skips);
            return done.complete(Err(StoreError::Unavailable(
                "redis circuit breaker open: redis skipped".into(),
            )));
        };
        let deadline = Instant::now() + s.op_timeout;
        self.background.spawn(Shared::remote_put_if(
            Arc::clone(s),
            id,
            session,
            expect.to_vec(),
            permit,
            deadline,
            done,
        ));
    }

    /// Sends the comparing script on the background thread and returns `true` (the outcome
    /// is logged only); [`StoreError::Unavailable`] while the breaker is open.
    fn remove_if(&self, id: &SessionId, expect: &[u64]) -> Result<bool, StoreError> {
        let s = &self.shared;
        let key = s.key_for(id);
        let Some(permit) = s.breaker_for(key.as_bytes()).admit(Instant::now()) else {
            bump(&s.counters.breaker_open_skips);
            return Err(StoreError::Unavailable(
                "redis circuit breaker open: redis skipped".into(),
            ));
        };
        let deadline = Instant::now() + s.op_timeout;
        self.background.spawn(Shared::remote_remove_if(
            Arc::clone(s),
            *id,
            expect.to_vec(),
            permit,
            deadline,
        ));
        Ok(true)
    }

    fn is_remote(&self) -> bool {
        true
    }

    /// What the memory tier holds (Redis itself is only counted by the explicit admin calls).
    fn usage(&self) -> StoreUsage {
        self.shared
            .tier
            .as_ref()
            .map(|t| t.usage())
            .unwrap_or_default()
    }

    fn evictions(&self) -> EvictionStats {
        // The tier evicting an entry loses nothing (Redis still holds it), and Redis's own
        // evictions are not visible from here.
        EvictionStats::default()
    }

    fn admin(&self) -> Option<&dyn SessionStoreAdmin> {
        Some(self)
    }
}

/// Errors that say Redis cannot be reached (as opposed to an error reply). In a cluster these
/// include a redirection the cluster client did not follow (`MOVED`/`ASK` to a master that is
/// down), `TRYAGAIN`, `CLUSTERDOWN` and no connection to the slot's master.
fn is_connection_failure(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
        || e.kind() == ::redis::ErrorKind::ClusterConnectionNotFound
}

fn map_error(e: &RedisError) -> StoreError {
    if e.is_timeout() {
        StoreError::Timeout
    } else if is_connection_failure(e) {
        StoreError::Unavailable(format!("redis: {e}"))
    } else {
        StoreError::Backend(format!("redis: {e}"))
    }
}

/// The session id whose lowercase or uppercase hex is `hex`.
fn id_from_hex(hex: &[u8]) -> Option<SessionId> {
    if hex.is_empty() || !hex.len().is_multiple_of(2) || hex.len() > MAX_SESSION_ID_LEN * 2 {
        return None;
    }
    let mut bytes = [0u8; MAX_SESSION_ID_LEN];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        bytes[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
    }
    SessionId::new(&bytes[..hex.len() / 2]).ok()
}

/// Escapes the glob characters of a `SCAN MATCH` pattern.
fn escape_glob(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 4);
    for ch in prefix.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// Node URLs without their passwords, for logs and `Debug`.
fn redact_nodes(nodes: &[String]) -> String {
    nodes
        .iter()
        .map(|n| redact_url(n))
        .collect::<Vec<_>>()
        .join(",")
}

/// The URL without its password, for logs and `Debug`.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s + 3 => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn plain(url: &str) -> RedisStoreBuilder {
        RedisStore::builder(url).plaintext_i_understand_the_risk()
    }

    #[test]
    fn builder_refuses_without_key_ring_or_opt_in() {
        let err = RedisStore::builder("redis://127.0.0.1:1")
            .build()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key ring") && err.contains("plaintext_i_understand_the_risk"),
            "{err}"
        );
        assert!(plain("redis://127.0.0.1:1").build().is_ok());
        let ring = KeyRing::generate().unwrap();
        assert!(plain("redis://127.0.0.1:1")
            .key_ring(ring.clone())
            .build()
            .is_err());
        let sealed = || RedisStore::builder("redis://127.0.0.1:1").key_ring(ring.clone());
        for b in [
            RedisStore::builder("not a url").key_ring(ring.clone()),
            sealed().prefix(""),
            sealed().op_timeout(Duration::ZERO),
            sealed().invalidation_heartbeat(Duration::ZERO),
            sealed().admin_timeout(Duration::ZERO),
            sealed().breaker(0, Duration::from_secs(1)),
            sealed().write_queue(0),
        ] {
            assert!(matches!(
                b.build(),
                Err(Error::InvalidSetting { .. } | Error::InvalidUrl { .. })
            ));
        }
    }

    #[test]
    fn cluster_urls_expand_to_node_urls() {
        assert_eq!(cluster_url_nodes("redis://127.0.0.1:1").unwrap(), None);
        assert_eq!(
            cluster_url_nodes("redis+cluster://u:pw@10.0.0.1:7000,10.0.0.2:7001/0?protocol=2")
                .unwrap()
                .unwrap(),
            [
                "redis://u:pw@10.0.0.1:7000/0?protocol=2",
                "redis://u:pw@10.0.0.2:7001/0?protocol=2"
            ]
        );
        assert_eq!(
            cluster_url_nodes("rediss+cluster://10.0.0.1:7000")
                .unwrap()
                .unwrap(),
            ["rediss://10.0.0.1:7000"]
        );
        assert!(cluster_url_nodes("redis+cluster://").is_err());
        let store = plain("redis+cluster://:hunter2@127.0.0.1:1,127.0.0.1:2")
            .build()
            .unwrap();
        let dbg = format!("{store:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("127.0.0.1:2"), "{dbg}");
        assert_eq!(store.stats().cluster_nodes, 0, "not connected yet");
    }

    #[test]
    fn builder_refuses_unsafe_tls_and_cluster_settings() {
        let ring = KeyRing::generate().unwrap();
        let sealed = |url: &str| RedisStore::builder(url).key_ring(ring.clone());
        let refused = |b: RedisStoreBuilder| match b.build() {
            Err(
                e @ (Error::InvalidSetting { .. }
                | Error::InvalidUrl { .. }
                | Error::ReadFile { .. }
                | Error::InvalidFile { .. }),
            ) => e.to_string(),
            other => panic!("not refused: {other:?}"),
        };
        let msg = refused(sealed("rediss://127.0.0.1:1/#insecure"));
        assert!(msg.contains("cannot be turned off"), "{msg}");
        let msg = refused(sealed("redis://127.0.0.1:1").ca_file("/nonexistent"));
        assert!(msg.contains("not a rediss:// url"), "{msg}");
        let msg = refused(sealed("rediss://127.0.0.1:1").ca_file("/nonexistent/ca.pem"));
        assert!(msg.contains("cannot read redis ca file"), "{msg}");
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let msg = refused(sealed("rediss://127.0.0.1:1").ca_file(&junk));
        assert!(msg.contains("holds no PEM certificate"), "{msg}");
        let msg = refused(sealed("redis+cluster://127.0.0.1:1").prefix("s:{x}:"));
        assert!(msg.contains("hash tag"), "{msg}");
        assert!(
            sealed("redis://127.0.0.1:1")
                .prefix("s:{x}:")
                .build()
                .is_ok(),
            "a hash tag is harmless on one server"
        );
        let msg = refused(
            RedisStore::cluster_builder(["redis://127.0.0.1:1", "rediss://127.0.0.1:2"])
                .key_ring(ring.clone()),
        );
        assert!(msg.contains("every node or for none"), "{msg}");
        let msg = refused(
            RedisStore::cluster_builder(["redis+unix:///tmp/r.sock"]).key_ring(ring.clone()),
        );
        assert!(msg.contains("unix socket"), "{msg}");
        let none: [&str; 0] = [];
        assert!(matches!(
            RedisStore::cluster_builder(none)
                .key_ring(ring.clone())
                .build(),
            Err(Error::InvalidSetting {
                setting: "cluster",
                ..
            })
        ));
        let store = RedisStore::cluster_builder(["redis://127.0.0.1:1", "redis://127.0.0.1:2"])
            .key_ring(ring.clone())
            .build()
            .unwrap();
        assert!(store.is_remote());
    }

    #[test]
    fn a_plaintext_store_has_no_ring_to_replace() {
        let store = plain("redis://127.0.0.1:1").build().unwrap();
        assert!(matches!(
            store.replace_key_ring(KeyRing::generate().unwrap()),
            Err(Error::InvalidSetting {
                setting: "key_ring",
                ..
            })
        ));
        let sealed = RedisStore::builder("redis://127.0.0.1:1")
            .key_ring(KeyRing::new(1, [1; 32]))
            .build()
            .unwrap();
        sealed.replace_key_ring(KeyRing::new(2, [2; 32])).unwrap();
        assert!(format!("{sealed:?}").contains("2"), "the ring's ids show");
    }

    #[test]
    fn check_reports_an_unreachable_server() {
        let store = plain("redis://127.0.0.1:1").build().unwrap();
        let err = store.check().unwrap_err().to_string();
        assert!(
            err.contains("cannot connect to redis://127.0.0.1:1"),
            "{err}"
        );
        let st = store.stats();
        assert_eq!(st.admin_errors, 1);
        assert!(!st.breaker_open, "a check does not feed the breaker");
    }

    #[test]
    fn keys_map_to_ids_and_back() {
        let store = plain("redis://127.0.0.1:1")
            .prefix("p[1]:")
            .build()
            .unwrap();
        assert_eq!(store.shared.pattern, "p\\[1\\]:*");
        assert_eq!(store.invalidation_channel(), "p[1]:invalidate");
        let id = SessionId::new(&[0, 0xab, 0xff]).unwrap();
        let key = store.key_for(&id);
        assert_eq!(key, "p[1]:00abff");
        assert_eq!(store.id_from_key(key.as_bytes()), Some(id));
        for bad in [
            "p[1]:",
            "p[1]:abc",
            "p[1]:zz",
            "other:00",
            &format!("p[1]:{}", "00".repeat(33)),
        ] {
            assert_eq!(store.id_from_key(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(id_from_hex(b"00ABff"), Some(id));
        assert_eq!(id_from_hex(b"*"), None);
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://u:secret@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(redact_url("redis://10.0.0.1:6379"), "redis://10.0.0.1:6379");
        let store = plain("redis://:hunter2@127.0.0.1:1").build().unwrap();
        assert!(!format!("{store:?}").contains("hunter2"));
    }

    #[test]
    fn debug_shows_counters_and_no_session_bytes() {
        let store = plain("redis://127.0.0.1:1").build().unwrap();
        let id = SessionId::new(b"x").unwrap();
        let secret = vec![0x42; 64];
        store
            .put(id, StoredSession::from_millis(secret, u64::MAX))
            .unwrap();
        let dbg = format!("{store:?}");
        assert!(dbg.contains("puts_queued: 1"), "{dbg}");
        assert!(!dbg.contains("66, 66"), "{dbg}");
    }

    #[test]
    fn unreachable_redis_fails_fast_and_opens_the_breaker() {
        // Port 1 on loopback: connection refused at once.
        let store = plain("redis://127.0.0.1:1")
            .breaker(2, Duration::from_secs(60))
            .tier_entries(0)
            .build()
            .unwrap();
        assert!(store.is_remote());
        let id = SessionId::new(b"x").unwrap();
        assert!(matches!(store.get(&id), Err(StoreError::Unavailable(_))));
        assert!(store.take(&id).is_err());
        let st = store.stats();
        assert_eq!((st.redis_errors, st.breaker_opens), (2, 1));
        assert!(st.breaker_open);
        // An open breaker answers a lookup at once, on the calling thread.
        let (tx, rx) = mpsc::channel();
        store.lookup(
            id,
            LookupMode::Get,
            LookupDone::new(move |r| tx.send(r).unwrap()),
        );
        assert!(matches!(rx.try_recv(), Ok(Err(StoreError::BreakerOpen))));
        assert_eq!(store.stats().breaker_open_skips, 1);
        assert_eq!(store.stats().redis_errors, 2);
        // Writes are only queued: they neither fail nor wait.
        assert!(store.remove(&id).unwrap());
        assert_eq!(store.stats().write_queue_len, 1);
    }

    #[test]
    fn a_confirmed_put_that_does_not_reach_redis_is_never_reported_done() {
        let store = plain("redis://127.0.0.1:1")
            .breaker(1, Duration::from_secs(60))
            .tier_entries(16)
            .build()
            .unwrap();
        let id = SessionId::for_peer_state(1, b"cid");
        let session = StoredSession::new(vec![1; 8], SystemTime::now() + Duration::from_secs(60));
        let (tx, rx) = mpsc::channel();
        let done = |tx: mpsc::Sender<_>| PutDone::new(move |r| tx.send(r).unwrap());
        store.put_confirmed(id, session.clone(), done(tx.clone()));
        let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            matches!(first, Err(StoreError::Unavailable(_))),
            "{first:?}"
        );
        // The breaker opened: the next is refused at once, on this thread.
        store.put_confirmed(id, session, done(tx));
        assert!(matches!(rx.try_recv(), Ok(Err(StoreError::Unavailable(_)))));
        // Past the queue and the tier: neither holds it.
        assert_eq!(store.stats().write_queue_len, 0);
        assert!(store.tier().unwrap().get(&id).unwrap().is_none());
    }

    #[test]
    fn queued_writes_answer_this_hosts_lookups() {
        let store = plain("redis://127.0.0.1:1")
            .breaker(1, Duration::from_secs(60))
            .tier_entries(0)
            .build()
            .unwrap();
        // Open the breaker first, so the writer holds the queue instead of failing it.
        assert!(store.get(&SessionId::new(b"other").unwrap()).is_err());
        assert!(store.stats().breaker_open);
        let id = SessionId::new(b"q").unwrap();
        store
            .put(id, StoredSession::from_millis(vec![5], u64::MAX))
            .unwrap();
        assert_eq!(store.get(&id).unwrap().unwrap().data(), [5]);
        assert_eq!(store.take(&id).unwrap().unwrap().data(), [5]);
        assert!(store.take(&id).unwrap().is_none(), "taken once");
        assert!(store.get(&id).unwrap().is_none(), "the removal is queued");
        assert_eq!(store.stats().queue_hits, 4);
        assert_eq!(
            store.stats().remote_lookups,
            1,
            "only the one that opened the breaker"
        );
    }
}
