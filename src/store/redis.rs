//! A shared session store for server farms, on Redis (cargo feature `redis`).
//!
//! When clients land on another host, resumption falls to 1/n unless the hosts share their
//! sessions. [`RedisStore`] keeps them in one Redis:
//!
//! - **Keys** are the prefix plus the session id in hex; **values** are sealed with the
//!   [`KeyRing`] ([`envelope`](crate::envelope)): AES-256-GCM, the session id as associated data,
//!   the expiry inside. Redis never sees a master secret, and a value copied under another key
//!   does not open. Without a key ring the builder refuses, unless the plaintext opt-in is called
//!   by name.
//! - **TTL** is set by Redis (`SET key value PX ttl`) from the session's expiry, so Redis
//!   expires what the cache would refuse anyway.
//! - **`take` is `GETDEL`**, atomic across hosts: a single-use TLS 1.3 session resumes once in
//!   the whole farm. `remove` is `DEL`; `len`, `bytes`, `for_each` and `clear` walk the prefix
//!   with `SCAN` (bounded `COUNT` per call).
//! - **Never stall a handshake**: every connection has a connect timeout and read/write
//!   timeouts (milliseconds), a small pool keeps idle connections (one that failed is dropped),
//!   and a circuit breaker skips Redis for a back-off period after consecutive failures, then lets
//!   one request through to probe. A failure is a [`StoreError`]: the cache counts it and goes on
//!   with a full handshake.
//! - **A write-through memory tier** in front answers hot sessions without a round trip. `get`
//!   reads the tier first; `take` always asks Redis (`GETDEL`) and fails over the tier's copy if
//!   Redis says another host took it. A tier copy is not invalidated when another host removes
//!   the session (it lives at most until the session expires); single-use sessions go through
//!   `take`, which never trusts the tier.
//!
//! Use an IP address in the URL: the host name is resolved before the connect timeout applies.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use ::redis::{Client, Connection, IntoConnectionInfo, RedisError, RedisResult};
use parking_lot::Mutex;

use crate::clock::unix_millis;
use crate::error::{Error, StoreError};
use crate::stats::EvictionStats;
use crate::store::envelope::{envelope_key_id, hex_val, KeyRing, OVERHEAD};
use crate::store::{
    MemoryStore, SessionId, SessionStore, SessionStoreAdmin, StoreUsage, StoredSession,
    MAX_SESSION_ID_LEN,
};

/// How many keys one `SCAN` call asks for.
const SCAN_COUNT: usize = 256;
/// Session bytes a tier entry is budgeted for (the tier's byte bound is entries times this).
const TIER_BYTES_PER_ENTRY: usize = 4096;
/// The first byte of a plaintext value (sealed values start with the envelope version, 1).
const PLAINTEXT_VERSION: u8 = 0;

/// Builds a [`RedisStore`]; see [`RedisStore::builder`].
#[must_use]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    connect_timeout: Duration,
    command_timeout: Duration,
    pool_size: usize,
    breaker_failures: u32,
    breaker_backoff: Duration,
    tier: TierConfig,
    key_ring: Option<KeyRing>,
    plaintext: bool,
}

enum TierConfig {
    Entries(usize),
    Store(MemoryStore),
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("url", &redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("pool_size", &self.pool_size)
            .field("breaker_failures", &self.breaker_failures)
            .field("breaker_backoff", &self.breaker_backoff)
            .field("key_ring", &self.key_ring)
            .field("plaintext", &self.plaintext)
            .finish_non_exhaustive()
    }
}

impl RedisStoreBuilder {
    /// The key prefix (default `ossl:sess:`). Hosts that share sessions use the same prefix;
    /// it must not be empty, so `clear` never touches keys outside it.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long to wait for a TCP connection and the connection set-up (default 50 ms).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long to wait for each command's write and reply (default 50 ms).
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// How many idle connections to keep (default 8). Under a burst more may be open at once;
    /// those beyond this number are closed when returned.
    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n;
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

    /// Seal values with `ring` (AES-256-GCM; the last key added seals, all keys open).
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

    /// Builds the store. It connects lazily: a store built while Redis is down starts working
    /// when Redis comes up.
    ///
    /// # Errors
    /// [`Error::Config`] if the URL does not parse, a timeout is zero, the pool size, failure
    /// count or prefix is empty/zero, or neither a key ring nor the plaintext opt-in was given.
    pub fn build(self) -> Result<RedisStore, Error> {
        let codec = match (self.key_ring, self.plaintext) {
            (Some(ring), false) => Codec::Sealed(ring),
            (None, true) => Codec::Plaintext,
            (Some(_), true) => {
                return Err(Error::Config(
                    "redis store: give either a key ring or the plaintext opt-in, not both".into(),
                ))
            }
            (None, false) => {
                return Err(Error::Config(
                    "redis store needs a key ring (key_ring(), or a key file) to encrypt sessions \
                     at rest; to store them in plaintext call plaintext_i_understand_the_risk()"
                        .into(),
                ))
            }
        };
        if self.connect_timeout.is_zero() || self.command_timeout.is_zero() {
            return Err(Error::Config(
                "redis store: connect and command timeouts must be above zero".into(),
            ));
        }
        if self.pool_size == 0 || self.breaker_failures == 0 {
            return Err(Error::Config(
                "redis store: pool size and breaker failure count must be at least 1".into(),
            ));
        }
        if self.prefix.is_empty() {
            return Err(Error::Config(
                "redis store: the key prefix must not be empty".into(),
            ));
        }
        let bad_url = |e: RedisError| {
            Error::Config(format!(
                "redis store: bad url {}: {e}",
                redact_url(&self.url)
            ))
        };
        // No `CLIENT SETINFO` on connect: one round trip less, and a connection to a hung server
        // then waits for the connect timeout once, not once per set-up reply.
        let info = self.url.as_str().into_connection_info().map_err(bad_url)?;
        let settings = info.redis_settings().clone().set_skip_set_lib_name();
        let client = Client::open(info.set_redis_settings(settings)).map_err(bad_url)?;
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
        Ok(RedisStore {
            url: redact_url(&self.url),
            pattern: format!("{}*", escape_glob(&self.prefix)),
            prefix: self.prefix,
            pool: Pool {
                client,
                idle: Mutex::new(Vec::with_capacity(self.pool_size)),
                max_idle: self.pool_size,
                connect_timeout: self.connect_timeout,
                command_timeout: self.command_timeout,
            },
            breaker: Mutex::new(Breaker::new(self.breaker_failures, self.breaker_backoff)),
            tier,
            codec,
            counters: Counters::default(),
        })
    }
}

/// The store's own counters, from [`RedisStore::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisStoreStats {
    /// Redis operations that failed (connection refused or dropped, timeout, error reply).
    pub redis_errors: u64,
    /// Of those, the ones that timed out.
    pub timeouts: u64,
    /// Operations answered at once with [`StoreError::Unavailable`] because the breaker was open.
    pub breaker_open_skips: u64,
    /// Times the breaker opened.
    pub breaker_opens: u64,
    /// Lookups answered by the memory tier without a round trip.
    pub tier_hits: u64,
    /// Values that did not open (tampered, moved, another key, unknown key id): each a miss.
    pub decrypt_failures: u64,
    /// Whether the breaker is open now.
    pub breaker_open: bool,
}

#[derive(Debug, Default)]
struct Counters {
    redis_errors: AtomicU64,
    timeouts: AtomicU64,
    breaker_open_skips: AtomicU64,
    breaker_opens: AtomicU64,
    tier_hits: AtomicU64,
    decrypt_failures: AtomicU64,
}

/// A [`SessionStore`] in Redis, shared by the hosts of a farm, with a memory tier in front.
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
/// use openssl_session_cache::{KeyRing, RedisStore, SessionStore};
///
/// let store = RedisStore::builder("redis://127.0.0.1:6379")
///     .key_ring(KeyRing::from_file("/etc/myserver/session.keys")?)
///     .command_timeout(Duration::from_millis(20))
///     .build()?;
/// let store: Arc<dyn SessionStore> = Arc::new(store);
/// # Ok::<(), openssl_session_cache::Error>(())
/// ```
pub struct RedisStore {
    url: String,
    prefix: String,
    pattern: String,
    pool: Pool,
    breaker: Mutex<Breaker>,
    tier: Option<MemoryStore>,
    codec: Codec,
    counters: Counters,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .field("codec", &self.codec)
            .field("tier", &self.tier.is_some())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A builder for a store at `url` (`redis://[user:password@]host:port[/db]`).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            prefix: "ossl:sess:".into(),
            connect_timeout: Duration::from_millis(50),
            command_timeout: Duration::from_millis(50),
            pool_size: 8,
            breaker_failures: 3,
            breaker_backoff: Duration::from_secs(1),
            tier: TierConfig::Entries(1024),
            key_ring: None,
            plaintext: false,
        }
    }

    /// The store's counters now.
    pub fn stats(&self) -> RedisStoreStats {
        let c = &self.counters;
        RedisStoreStats {
            redis_errors: c.redis_errors.load(Ordering::Relaxed),
            timeouts: c.timeouts.load(Ordering::Relaxed),
            breaker_open_skips: c.breaker_open_skips.load(Ordering::Relaxed),
            breaker_opens: c.breaker_opens.load(Ordering::Relaxed),
            tier_hits: c.tier_hits.load(Ordering::Relaxed),
            decrypt_failures: c.decrypt_failures.load(Ordering::Relaxed),
            breaker_open: self.breaker.lock().is_open(),
        }
    }

    /// The Redis key that holds `id`.
    pub fn key_for(&self, id: &SessionId) -> String {
        format!("{}{}", self.prefix, id.to_hex())
    }

    /// The memory tier, if there is one.
    pub fn tier(&self) -> Option<&MemoryStore> {
        self.tier.as_ref()
    }

    fn id_from_key(&self, key: &[u8]) -> Option<SessionId> {
        let hex = key.strip_prefix(self.prefix.as_bytes())?;
        if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > MAX_SESSION_ID_LEN * 2 {
            return None;
        }
        let mut bytes = [0u8; MAX_SESSION_ID_LEN];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            bytes[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
        }
        SessionId::new(&bytes[..hex.len() / 2]).ok()
    }

    /// Runs `f` on a pooled connection, through the breaker, counting and mapping failures.
    ///
    /// An idle connection that turns out dead (Redis restarted, the connection was reset: not a
    /// timeout) is dropped with the rest of the idle ones and `f` runs once more on a fresh
    /// connection. Re-running is safe for every command used here: `SET`/`DEL` are idempotent,
    /// and a `GETDEL` whose reply was lost only loses the session (at most once, never twice).
    fn run<T>(
        &self,
        mut f: impl FnMut(&mut Connection) -> RedisResult<T>,
    ) -> Result<T, StoreError> {
        if !self.breaker.lock().admit(Instant::now()) {
            self.counters
                .breaker_open_skips
                .fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Unavailable(
                "redis circuit breaker open: redis skipped".into(),
            ));
        }
        let mut attempt = |conn: RedisResult<Connection>| {
            conn.and_then(|mut conn| {
                let r = f(&mut conn);
                if r.is_ok() {
                    self.pool.put(conn);
                }
                r
            })
        };
        let result = match self.pool.take_idle() {
            Some(idle) => match attempt(Ok(idle)) {
                Err(e) if is_connection_failure(&e) && !e.is_timeout() => {
                    self.pool.clear();
                    attempt(self.pool.connect())
                }
                other => other,
            },
            None => attempt(self.pool.connect()),
        };
        match result {
            Ok(v) => {
                self.breaker.lock().success();
                Ok(v)
            }
            Err(e) => {
                self.counters.redis_errors.fetch_add(1, Ordering::Relaxed);
                if e.is_timeout() {
                    self.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                }
                if is_connection_failure(&e) {
                    if self.breaker.lock().failure(Instant::now()) {
                        self.counters.breaker_opens.fetch_add(1, Ordering::Relaxed);
                        // Idle connections are as dead as the one that failed: the probe after
                        // the back-off must open a fresh one.
                        self.pool.clear();
                        tracing::warn!(url = %self.url, error = %e, "redis session store: circuit breaker open");
                    }
                } else {
                    // Redis answered (with an error): it is up.
                    self.breaker.lock().success();
                }
                tracing::debug!(url = %self.url, error = %e, "redis session store operation failed");
                Err(map_error(&e))
            }
        }
    }

    /// Opens a value read from Redis; a failure is counted and, unless the value names a key
    /// this ring does not hold (another host may be ahead in a key rotation), deleted.
    fn decode_or_drop(&self, id: &SessionId, value: &[u8]) -> Result<StoredSession, StoreError> {
        match self.codec.decode(id, value) {
            Ok(s) => Ok(s),
            Err(e) => {
                self.counters
                    .decrypt_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(id = %id.to_hex(), error = %e, "redis session store: undecryptable value");
                if !self.codec.is_foreign(value) {
                    let key = self.key_for(id);
                    let _ = self.run(|c| ::redis::cmd("DEL").arg(&key).exec(c));
                }
                Err(e)
            }
        }
    }

    /// All keys under the prefix (deduplicated: `SCAN` may return a key twice).
    fn scan_keys(&self, conn: &mut Connection) -> RedisResult<Vec<Vec<u8>>> {
        let mut seen = HashSet::new();
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = ::redis::cmd("SCAN")
                .cursor_arg(cursor)
                .arg("MATCH")
                .arg(&self.pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query(conn)?;
            seen.extend(keys);
            if next == 0 {
                return Ok(seen.into_iter().collect());
            }
            cursor = next;
        }
    }
}

impl SessionStore for RedisStore {
    fn get(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        if let Some(tier) = &self.tier {
            if let Some(s) = tier.get(id)? {
                self.counters.tier_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(s));
            }
        }
        let key = self.key_for(id);
        let value: Option<Vec<u8>> = self.run(|c| ::redis::cmd("GET").arg(&key).query(c))?;
        let Some(value) = value else {
            return Ok(None);
        };
        let session = self.decode_or_drop(id, &value)?;
        if let Some(tier) = &self.tier {
            tier.put(*id, session.clone())?;
        }
        Ok(Some(session))
    }

    /// Writes the tier, then Redis with `PX` set to the session's remaining lifetime; a session
    /// already expired is deleted instead. If Redis fails the tier keeps the session, so it
    /// still resumes on this host.
    fn put(&self, id: SessionId, session: StoredSession) -> Result<(), StoreError> {
        let key = self.key_for(&id);
        let ttl_ms = session
            .expires_at_millis()
            .saturating_sub(unix_millis(SystemTime::now()));
        if ttl_ms == 0 {
            if let Some(tier) = &self.tier {
                tier.remove(&id)?;
            }
            return self.run(|c| ::redis::cmd("DEL").arg(&key).exec(c));
        }
        let value = self.codec.encode(&id, &session)?;
        if let Some(tier) = &self.tier {
            tier.put(id, session)?;
        }
        self.run(|c| {
            ::redis::cmd("SET")
                .arg(&key)
                .arg(&value)
                .arg("PX")
                .arg(ttl_ms)
                .exec(c)
        })
    }

    /// `GETDEL` in Redis, always: the tier's copy is dropped too but never returned on its own,
    /// so a session taken on another host (or with Redis unreachable) is not handed out here.
    fn take(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        if let Some(tier) = &self.tier {
            tier.remove(id)?;
        }
        let key = self.key_for(id);
        let value: Option<Vec<u8>> = self.run(|c| ::redis::cmd("GETDEL").arg(&key).query(c))?;
        match value {
            None => Ok(None),
            Some(value) => match self.codec.decode(id, &value) {
                Ok(s) => Ok(Some(s)),
                Err(e) => {
                    self.counters
                        .decrypt_failures
                        .fetch_add(1, Ordering::Relaxed);
                    Err(e)
                }
            },
        }
    }

    fn remove(&self, id: &SessionId) -> Result<bool, StoreError> {
        let in_tier = match &self.tier {
            Some(tier) => tier.remove(id)?,
            None => false,
        };
        let key = self.key_for(id);
        let deleted: u64 = self.run(|c| ::redis::cmd("DEL").arg(&key).query(c))?;
        Ok(deleted > 0 || in_tier)
    }

    /// What the memory tier holds (Redis itself is only counted by the explicit admin calls).
    fn usage(&self) -> StoreUsage {
        self.tier.as_ref().map(|t| t.usage()).unwrap_or_default()
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

/// Explicit admin calls, each a walk of the prefix with `SCAN` (O(keys in Redis)); nothing on a
/// handshake path or in [`CacheStats`](crate::CacheStats) calls them.
impl SessionStoreAdmin for RedisStore {
    fn len(&self) -> Result<usize, StoreError> {
        self.run(|c| self.scan_keys(c).map(|k| k.len()))
    }

    /// The session bytes in Redis, from each value's length less the envelope.
    fn bytes(&self) -> Result<usize, StoreError> {
        let overhead = self.codec.overhead();
        self.run(|c| {
            let keys = self.scan_keys(c)?;
            let mut total = 0usize;
            for chunk in keys.chunks(SCAN_COUNT) {
                let mut pipe = ::redis::pipe();
                for k in chunk {
                    pipe.cmd("STRLEN").arg(k);
                }
                let lens: Vec<usize> = pipe.query(c)?;
                total += lens
                    .iter()
                    .map(|l| l.saturating_sub(overhead))
                    .sum::<usize>();
            }
            Ok(total)
        })
    }

    /// Values that do not open are skipped (and counted in `decrypt_failures`).
    fn for_each(&self, f: &mut dyn FnMut(&SessionId, &StoredSession)) -> Result<(), StoreError> {
        let entries: Vec<(Vec<u8>, Option<Vec<u8>>)> = self.run(|c| {
            let keys = self.scan_keys(c)?;
            let mut out = Vec::with_capacity(keys.len());
            for chunk in keys.chunks(SCAN_COUNT) {
                let values: Vec<Option<Vec<u8>>> = ::redis::cmd("MGET").arg(chunk).query(c)?;
                out.extend(chunk.iter().cloned().zip(values));
            }
            Ok(out)
        })?;
        for (key, value) in entries {
            let (Some(id), Some(value)) = (self.id_from_key(&key), value) else {
                continue;
            };
            match self.codec.decode(&id, &value) {
                Ok(s) => f(&id, &s),
                Err(_) => {
                    self.counters
                        .decrypt_failures
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    fn clear(&self) -> Result<(), StoreError> {
        if let Some(tier) = &self.tier {
            tier.clear()?;
        }
        self.run(|c| {
            let keys = self.scan_keys(c)?;
            for chunk in keys.chunks(SCAN_COUNT) {
                ::redis::cmd("UNLINK").arg(chunk).exec(c)?;
            }
            Ok(())
        })
    }

    /// Redis expires its keys itself (`PX`); this purges the memory tier.
    fn purge_expired(&self, now: SystemTime, max: usize) -> Result<usize, StoreError> {
        match &self.tier {
            Some(tier) => tier.purge_expired(now, max),
            None => Ok(0),
        }
    }
}

/// How values are written: sealed with a key ring, or (opted into by name) in plaintext.
enum Codec {
    Sealed(KeyRing),
    Plaintext,
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sealed(ring) => f.debug_tuple("Sealed").field(ring).finish(),
            Self::Plaintext => f.write_str("Plaintext"),
        }
    }
}

impl Codec {
    fn encode(&self, id: &SessionId, session: &StoredSession) -> Result<Vec<u8>, StoreError> {
        match self {
            Self::Sealed(ring) => ring.seal_session(id, session),
            Self::Plaintext => {
                let mut v = Vec::with_capacity(9 + session.len());
                v.push(PLAINTEXT_VERSION);
                v.extend_from_slice(&session.expires_at_millis().to_be_bytes());
                v.extend_from_slice(session.data());
                Ok(v)
            }
        }
    }

    fn decode(&self, id: &SessionId, value: &[u8]) -> Result<StoredSession, StoreError> {
        match self {
            Self::Sealed(ring) => ring.open_session(id, value),
            Self::Plaintext => match value {
                [PLAINTEXT_VERSION, rest @ ..] => crate::store::envelope::decode_session(rest),
                _ => Err(StoreError::Corrupt(
                    "value is not a plaintext session (sealed by another host?)".into(),
                )),
            },
        }
    }

    /// True if the value is sealed under a key id this ring does not hold.
    fn is_foreign(&self, value: &[u8]) -> bool {
        match self {
            Self::Sealed(ring) => {
                envelope_key_id(value).is_some_and(|k| !ring.key_ids().contains(&k))
            }
            Self::Plaintext => false,
        }
    }

    fn overhead(&self) -> usize {
        match self {
            Self::Sealed(_) => OVERHEAD + 8,
            Self::Plaintext => 9,
        }
    }
}

/// Idle connections, each with its timeouts set.
struct Pool {
    client: Client,
    idle: Mutex<Vec<Connection>>,
    max_idle: usize,
    connect_timeout: Duration,
    command_timeout: Duration,
}

impl Pool {
    fn take_idle(&self) -> Option<Connection> {
        self.idle.lock().pop()
    }

    fn connect(&self) -> RedisResult<Connection> {
        let conn = self
            .client
            .get_connection_with_timeout(self.connect_timeout)?;
        conn.set_read_timeout(Some(self.command_timeout))?;
        conn.set_write_timeout(Some(self.command_timeout))?;
        Ok(conn)
    }

    fn put(&self, conn: Connection) {
        let mut idle = self.idle.lock();
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }

    fn clear(&self) {
        let drained: Vec<Connection> = std::mem::take(&mut *self.idle.lock());
        drop(drained);
    }
}

/// A circuit breaker: closed until `threshold` consecutive failures, then open for `backoff`,
/// then half-open (one probe request; success closes it, failure opens it again).
///
/// Time comes in as arguments, so the state machine is tested without sleeping.
#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    backoff: Duration,
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, backoff: Duration) -> Self {
        Self {
            threshold,
            backoff,
            failures: 0,
            open_until: None,
            probing: false,
        }
    }

    /// Whether a request may go to the backend now. After the back-off, the first caller is
    /// let through as the probe and the others keep being skipped until it reports.
    pub(crate) fn admit(&mut self, now: Instant) -> bool {
        match self.open_until {
            None => true,
            Some(until) if now < until => false,
            Some(_) if self.probing => false,
            Some(_) => {
                self.probing = true;
                true
            }
        }
    }

    pub(crate) fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.probing = false;
    }

    /// Records a failure; returns true if the breaker opened because of it.
    pub(crate) fn failure(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        if self.probing {
            self.probing = false;
            self.open_until = Some(now + self.backoff);
            return true;
        }
        if self.open_until.is_none() && self.failures >= self.threshold {
            self.open_until = Some(now + self.backoff);
            return true;
        }
        false
    }

    pub(crate) fn is_open(&self) -> bool {
        self.open_until.is_some()
    }
}

/// Errors that say Redis cannot be reached (as opposed to an error reply).
fn is_connection_failure(e: &RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
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

/// The URL without its password, for logs and `Debug`.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s + 3 => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_threshold_and_skips_until_backoff() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, Duration::from_millis(500));
        assert!(b.admit(t0));
        assert!(!b.failure(t0));
        assert!(!b.failure(t0));
        assert!(!b.is_open());
        assert!(b.failure(t0), "the third consecutive failure opens it");
        assert!(b.is_open());
        assert!(!b.admit(t0 + Duration::from_millis(499)));
        // Half-open: one probe, the others still skipped.
        let t1 = t0 + Duration::from_millis(500);
        assert!(b.admit(t1));
        assert!(!b.admit(t1));
        // The probe fails: open again for a full back-off.
        assert!(b.failure(t1));
        assert!(!b.admit(t1 + Duration::from_millis(499)));
        let t2 = t1 + Duration::from_millis(500);
        assert!(b.admit(t2));
        b.success();
        assert!(!b.is_open());
        assert!(b.admit(t2) && b.admit(t2));
    }

    #[test]
    fn breaker_success_resets_the_count() {
        let t = Instant::now();
        let mut b = Breaker::new(2, Duration::from_secs(1));
        assert!(!b.failure(t));
        b.success();
        assert!(!b.failure(t));
        assert!(!b.is_open());
        assert!(b.failure(t));
        // Late failures of requests admitted before it opened do not extend it.
        assert!(!b.failure(t + Duration::from_millis(900)));
        assert!(b.admit(t + Duration::from_secs(1)));
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
        assert!(RedisStore::builder("redis://127.0.0.1:1")
            .plaintext_i_understand_the_risk()
            .build()
            .is_ok());
        let ring = KeyRing::generate().unwrap();
        assert!(RedisStore::builder("redis://127.0.0.1:1")
            .key_ring(ring.clone())
            .plaintext_i_understand_the_risk()
            .build()
            .is_err());
        for b in [
            RedisStore::builder("not a url").key_ring(ring.clone()),
            RedisStore::builder("redis://127.0.0.1:1")
                .key_ring(ring.clone())
                .prefix(""),
            RedisStore::builder("redis://127.0.0.1:1")
                .key_ring(ring.clone())
                .command_timeout(Duration::ZERO),
            RedisStore::builder("redis://127.0.0.1:1")
                .key_ring(ring.clone())
                .breaker(0, Duration::from_secs(1)),
            RedisStore::builder("redis://127.0.0.1:1")
                .key_ring(ring.clone())
                .pool_size(0),
        ] {
            assert!(matches!(b.build(), Err(Error::Config(_))));
        }
    }

    #[test]
    fn keys_map_to_ids_and_back() {
        let store = RedisStore::builder("redis://127.0.0.1:1")
            .prefix("p[1]:")
            .plaintext_i_understand_the_risk()
            .build()
            .unwrap();
        assert_eq!(store.pattern, "p\\[1\\]:*");
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
    }

    #[test]
    fn plaintext_codec_round_trips_and_refuses_sealed_values() {
        let id = SessionId::new(b"i").unwrap();
        let s = StoredSession::from_millis(vec![1, 2, 3], 99);
        let plain = Codec::Plaintext;
        let v = plain.encode(&id, &s).unwrap();
        assert_eq!(plain.decode(&id, &v).unwrap(), s);
        let ring = KeyRing::generate().unwrap();
        let sealed = Codec::Sealed(ring.clone());
        let sv = sealed.encode(&id, &s).unwrap();
        assert!(plain.decode(&id, &sv).is_err());
        assert!(
            sealed.decode(&id, &v).is_err(),
            "an encrypted store refuses plaintext values"
        );
        assert!(!sealed.is_foreign(&sv));
        let other = Codec::Sealed(KeyRing::new(ring.active_key_id().wrapping_add(1), [0; 32]));
        assert!(other.is_foreign(&sv));
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://u:secret@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(redact_url("redis://10.0.0.1:6379"), "redis://10.0.0.1:6379");
        let store = RedisStore::builder("redis://:hunter2@127.0.0.1:1")
            .plaintext_i_understand_the_risk()
            .build()
            .unwrap();
        assert!(!format!("{store:?}").contains("hunter2"));
    }

    #[test]
    fn unreachable_redis_fails_fast_and_opens_the_breaker() {
        // Port 1 on loopback: connection refused at once.
        let store = RedisStore::builder("redis://127.0.0.1:1")
            .plaintext_i_understand_the_risk()
            .breaker(2, Duration::from_secs(60))
            .tier_entries(0)
            .build()
            .unwrap();
        let id = SessionId::new(b"x").unwrap();
        assert!(matches!(store.get(&id), Err(StoreError::Unavailable(_))));
        assert!(store.take(&id).is_err());
        let st = store.stats();
        assert_eq!((st.redis_errors, st.breaker_opens), (2, 1));
        assert!(st.breaker_open);
        assert!(matches!(store.remove(&id), Err(StoreError::Unavailable(_))));
        assert_eq!(store.stats().breaker_open_skips, 1);
        assert_eq!(store.stats().redis_errors, 2);
    }
}
