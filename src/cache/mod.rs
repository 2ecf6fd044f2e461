//! The server-side session cache: what OpenSSL sees.
//!
//! [`SessionCache::install`] puts three callbacks on an `SslContextBuilder`; they serialize each
//! new session with `i2d_SSL_SESSION` into a [`SessionStore`], look sessions up by id when a
//! client offers one, and delete them when OpenSSL says a session must not be resumed. Every
//! outcome is counted ([`CacheStats`]).
//!
//! A small tier of already-decoded sessions sits beside the store so that resuming a session that
//! holds a peer certificate does not pay `d2i_SSL_SESSION` (hundreds of microseconds in OpenSSL
//! 3.0) every time. The store stays the one source of truth: the decoded tier is only consulted
//! after the store confirmed the entry, so a session evicted, expired or removed from the store
//! never resumes.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lru::LruCache;
use openssl::ex_data::Index;
use openssl::ssl::{
    ClientHelloResponse, Ssl, SslContextBuilder, SslOptions, SslRef, SslSession,
    SslSessionCacheMode, SslSessionRef, SslStream,
};
use parking_lot::{Condvar, Mutex};
use zeroize::Zeroize;

use crate::clock::{Clock, SystemClock};
use crate::error::Error;
use crate::ffi;
use crate::stats::{add, bump, CacheStats, Counters};
use crate::store::{LookupDone, MemoryStore, SessionId, SessionStore, StoredSession};

mod callbacks;
pub(crate) mod client;
pub(crate) mod der;
pub(crate) mod lookup;
pub(crate) mod policy;

use lookup::{ConnectionSlot, LookupState, PendingLookup};
use policy::{Policy, Refusal, SessionInfo};

/// The session id context set by default (`SSL_CTX_set_session_id_context`).
pub const DEFAULT_SESSION_ID_CONTEXT: &[u8] = b"openssl-session-cache";

/// Builds a [`SessionCache`]. Every setting has a default; see each method.
#[derive(Clone)]
#[must_use]
pub struct SessionCacheBuilder {
    max_entries: usize,
    max_bytes: usize,
    /// `max_entries` or `max_bytes` was called: a bound for the default memory store, which a
    /// store of the caller's own would silently ignore.
    memory_bounds: bool,
    max_ttl: Duration,
    max_session_size: usize,
    store: Option<Arc<dyn SessionStore>>,
    clock: Arc<dyn Clock>,
    session_id_context: Vec<u8>,
    tickets: bool,
    single_use: bool,
    honor_remove: bool,
    internal_store: bool,
    decoded_entries: usize,
    purge_interval: Option<Duration>,
    purge_batch: usize,
    policy: Policy,
    ticket_keys: Option<crate::TicketKeys>,
}

impl fmt::Debug for SessionCacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionCacheBuilder")
            .field("max_entries", &self.max_entries)
            .field("max_bytes", &self.max_bytes)
            .field("max_ttl", &self.max_ttl)
            .field("store", &self.store)
            .field("tickets", &self.tickets)
            .field("single_use", &self.single_use)
            .field("psk_keys", &self.policy.psk_keys.is_some())
            .field("resume_unchecked_psk", &self.policy.unchecked_psk)
            .field("accept_session", &self.policy.accept.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for SessionCacheBuilder {
    fn default() -> Self {
        Self {
            max_entries: 20_480,
            max_bytes: 8 << 20,
            memory_bounds: false,
            max_ttl: Duration::from_secs(7200),
            max_session_size: 8192,
            store: None,
            clock: Arc::new(SystemClock),
            session_id_context: DEFAULT_SESSION_ID_CONTEXT.to_vec(),
            tickets: false,
            single_use: false,
            honor_remove: true,
            internal_store: false,
            decoded_entries: 1024,
            purge_interval: None,
            purge_batch: 4096,
            policy: Policy::default(),
            ticket_keys: None,
        }
    }
}

impl SessionCacheBuilder {
    /// At most this many sessions in the default memory store; beyond it the least recently used
    /// goes (default 20 480). Giving it together with [`store`](Self::store) is an error from
    /// [`build`](Self::build): bound that store through its own builder.
    pub fn max_entries(mut self, n: usize) -> Self {
        self.max_entries = n;
        self.memory_bounds = true;
        self
    }

    /// At most this many bytes of serialized sessions in the default memory store (default
    /// 8 MiB). Giving it together with [`store`](Self::store) is an error from
    /// [`build`](Self::build): bound that store through its own builder.
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self.memory_bounds = true;
        self
    }

    /// No session lives longer than this, whatever its own timeout says (default 2 hours,
    /// OpenSSL's default session timeout). A session expires at its creation time plus the
    /// smaller of its timeout and this.
    pub fn max_ttl(mut self, ttl: Duration) -> Self {
        self.max_ttl = ttl;
        self
    }

    /// Sessions whose DER is larger than this are not stored and are counted in
    /// [`CacheStats::rejected_oversize`] (default 8192 bytes, nginx's limit).
    pub fn max_session_size(mut self, bytes: usize) -> Self {
        self.max_session_size = bytes;
        self
    }

    /// Where sessions are kept (default: a [`MemoryStore`] bounded by `max_entries` and
    /// `max_bytes`, which cannot be combined with this).
    pub fn store(mut self, store: Arc<dyn SessionStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The time source for expiry (default: the system clock). Tests pass a
    /// [`ManualClock`](crate::ManualClock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The session id context set on every context this cache is installed on, at most 32 bytes
    /// (default `b"openssl-session-cache"`). Contexts that share a cache must use the same
    /// value; OpenSSL silently refuses to resume a session made under another context, and a
    /// server that verifies client certificates cannot cache at all without one.
    pub fn session_id_context(mut self, ctx: impl AsRef<[u8]>) -> Self {
        self.session_id_context = ctx.as_ref().to_vec();
        self
    }

    /// Whether to leave session tickets on (default: off, `SSL_OP_NO_TICKET`).
    ///
    /// With tickets on, TLS 1.2 and DTLS clients that support them resume statelessly from the
    /// ticket and never consult this cache, and TLS 1.3 tickets are stateless too (OpenSSL still
    /// calls the new-session callback for them, filling the store with ids nobody looks up).
    /// Turn tickets on only if you manage ticket keys across your servers yourself.
    pub fn tickets(mut self, on: bool) -> Self {
        self.tickets = on;
        self
    }

    /// Session tickets sealed with `keys` (shared by every host that reads the same key file,
    /// rotating by themselves: see [`TicketKeys`](crate::TicketKeys)); implies
    /// [`tickets(true)`](Self::tickets), and [`SessionCache::install`] installs them too.
    ///
    /// Clients that take tickets then resume from them without a store lookup; the store still
    /// serves clients without ticket support (TLS 1.2, DTLS). TLS 1.3 sessions are not stored
    /// (their tickets carry them).
    pub fn ticket_keys(mut self, keys: crate::TicketKeys) -> Self {
        self.ticket_keys = Some(keys);
        self.tickets = true;
        self
    }

    /// Whether a session may be resumed only once (default: off). On, a lookup takes the entry out
    /// of the store atomically ([`SessionStore::take`]), as TLS 1.3 recommends for tickets
    /// (RFC 8446 §8.1). OpenSSL issues a fresh ticket on every TLS 1.3 resumption, so clients keep
    /// resuming; TLS 1.2 and DTLS resumptions issue no new session, so with single use each
    /// session id resumes once.
    ///
    /// Early data: OpenSSL's own anti-replay (on when `max_early_data > 0` unless
    /// `SSL_OP_NO_ANTI_REPLAY`) works by removing the session from its *internal* cache, which
    /// this cache turns off; with early data on and anti-replay on, OpenSSL refuses every TLS 1.3
    /// resumption served from an external cache. Use single use here and set
    /// `SSL_OP_NO_ANTI_REPLAY` (`SslOptions::from_bits_retain(1 << 24)`) instead.
    pub fn single_use(mut self, on: bool) -> Self {
        self.single_use = on;
        self
    }

    /// Whether OpenSSL's remove-session callback deletes the session from the store (default:
    /// on).
    ///
    /// OpenSSL calls it for expired sessions, after fatal alerts, and also when an `Ssl` whose
    /// handshake finished is freed without having sent close_notify (`ssl_clear_bad_session`):
    /// a server that drops an idle connection without a clean shutdown loses that session. Either
    /// call [`SessionCache::keep_resumable`] before dropping such a connection (preferred), or turn
    /// this off to ignore every remove (fatal alerts then no longer invalidate sessions either).
    pub fn honor_remove_callback(mut self, on: bool) -> Self {
        self.honor_remove = on;
        self
    }

    /// Whether OpenSSL also keeps sessions in its internal per-context cache (default: off, cache
    /// mode `SERVER | NO_INTERNAL`). Off, the store is the one source of truth and decoded
    /// sessions can be shared between connections; on, every lookup decodes afresh.
    pub fn internal_store(mut self, on: bool) -> Self {
        self.internal_store = on;
        self
    }

    /// How many decoded sessions to keep beside the store so that resumption skips
    /// `d2i_SSL_SESSION` (default 1024; 0 turns the tier off). Only used when the internal store
    /// is off.
    pub fn decoded_entries(mut self, n: usize) -> Self {
        self.decoded_entries = n;
        self
    }

    /// Runs [`SessionCache::purge_expired`] on a background thread every `interval` (default:
    /// no thread; expiry is then lazy, on lookup). The thread runs while anything uses the cache
    /// (a clone, or a context it is installed on) and is joined when the last one is dropped.
    pub fn purge_interval(mut self, interval: Duration) -> Self {
        self.purge_interval = Some(interval);
        self
    }

    /// The current key of each PSK identity, as the server's PSK callback knows it (`None`:
    /// unknown or revoked). A PSK session is stored with a keyed fingerprint of its key (never
    /// the key), and resumes only while its identity still maps to that key, so a revoked
    /// identity or a changed key cannot resume an old session, from a snapshot or another host
    /// either.
    ///
    /// The DTLS server needs no such call: its [`psk_lookup`][psk_lookup] (and [`psk`][psk]) are
    /// the key source of every connection on its context. Give this for contexts of your own with `set_psk_server_callback`, or to check
    /// against another source than the server's lookup (it then takes precedence). With neither,
    /// a PSK session cannot be checked and does not resume (counted in [`CacheStats::stale`]),
    /// unless [`resume_unchecked_psk_sessions`](Self::resume_unchecked_psk_sessions) says so.
    ///
    #[cfg_attr(
        feature = "server",
        doc = "[psk_lookup]: crate::ServerConfigBuilder::psk_lookup\n[psk]: crate::ServerConfigBuilder::psk"
    )]
    #[cfg_attr(
        not(feature = "server"),
        doc = "[psk_lookup]: crate#crate-features\n[psk]: crate#crate-features"
    )]
    pub fn psk_keys(
        mut self,
        lookup: impl Fn(&[u8]) -> Option<zeroize::Zeroizing<Vec<u8>>> + Send + Sync + 'static,
    ) -> Self {
        self.policy.psk_keys = Some(Arc::new(lookup));
        self
    }

    /// Resumes PSK sessions whose key nothing can check (no [`psk_keys`](Self::psk_keys) and no
    /// server PSK lookup on the connection's context), as OpenSSL alone does. Off by default:
    /// such a session would resume after its identity was revoked, for as long as it lives in
    /// the store. Where a key source exists, sessions are checked against it whatever this says.
    pub fn resume_unchecked_psk_sessions(mut self) -> Self {
        self.policy.unchecked_psk = true;
        self
    }

    /// The application's veto over every stored session about to be resumed: return false to
    /// refuse it (a full handshake follows; counted in [`CacheStats::vetoed`]). It sees the peer
    /// certificate, PSK identity, cipher, protocol and age ([`SessionInfo`]). It runs inside
    /// OpenSSL's get-session callback: keep it quick, never block, never panic (a panic is a
    /// refusal).
    pub fn accept_session(
        mut self,
        accept: impl Fn(&SessionInfo<'_>) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.policy.accept = Some(Arc::new(accept));
        self
    }

    /// How many entries one [`SessionCache::purge_expired`] call examines at most (default 4096).
    pub fn purge_batch(mut self, n: usize) -> Self {
        self.purge_batch = n;
        self
    }

    /// Builds the cache.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] for a session id context longer than 32 bytes, a zero TTL, size
    /// limit, purge batch or purge interval, limits the memory store refuses, and `max_entries` or `max_bytes` given
    /// together with a [`store`](Self::store) (they bound only the default memory store).
    pub fn build(self) -> Result<SessionCache, Error> {
        if self.memory_bounds && self.store.is_some() {
            return Err(Error::setting(
                "max_entries",
                "max_entries and max_bytes bound the default memory store only: \
                 bound the given store through its own builder",
            ));
        }
        if self.session_id_context.len() > 32 {
            return Err(Error::setting(
                "session_id_context",
                format!(
                    "session id context is {} bytes, at most 32 allowed",
                    self.session_id_context.len()
                ),
            ));
        }
        for (setting, zero) in [
            ("max_ttl", self.max_ttl.is_zero()),
            ("max_session_size", self.max_session_size == 0),
            ("purge_batch", self.purge_batch == 0),
        ] {
            if zero {
                return Err(Error::setting(
                    setting,
                    "max_ttl, max_session_size and purge_batch must be non-zero",
                ));
            }
        }
        if self.purge_interval.is_some_and(|d| d.is_zero()) {
            return Err(Error::setting(
                "purge_interval",
                "purge interval must be non-zero",
            ));
        }
        let store = match self.store {
            Some(store) => store,
            None => Arc::new(
                MemoryStore::builder()
                    .max_entries(self.max_entries)
                    .max_bytes(self.max_bytes)
                    .build()?,
            ),
        };
        let decoded = match (
            self.internal_store,
            std::num::NonZeroUsize::new(self.decoded_entries),
        ) {
            (false, Some(n)) => Some(Mutex::new(LruCache::new(n))),
            _ => None,
        };
        let inner = Arc::new(Inner {
            slot_index: lookup::slot_index()?,
            store,
            clock: self.clock,
            counters: Counters::default(),
            max_ttl: self.max_ttl,
            max_session_size: self.max_session_size,
            single_use: self.single_use,
            honor_remove: self.honor_remove,
            decoded,
            purge_batch: self.purge_batch,
            context_fp: der::fingerprint(&self.session_id_context),
            session_id_context: self.session_id_context.clone(),
            policy: self.policy,
            purger: Mutex::new(None),
            tickets: self.tickets,
        });
        if let Some(every) = self.purge_interval {
            *inner.purger.lock() = Some(Purger::start(Arc::downgrade(&inner), every)?);
        }
        Ok(SessionCache {
            shared: Arc::new(Shared {
                inner,
                config: InstallConfig {
                    session_id_context: self.session_id_context,
                    tickets: self.tickets,
                    internal_store: self.internal_store,
                    ticket_keys: self.ticket_keys,
                },
            }),
        })
    }
}

/// An external session cache for OpenSSL servers (TLS and DTLS).
///
/// Cheap to clone; clones share one store and one set of counters. Install it on every
/// `SslContextBuilder` that should share sessions.
///
/// ```
/// use std::time::Duration;
/// use openssl::ssl::{SslContext, SslMethod};
/// use openssl_session_cache::SessionCache;
///
/// let cache = SessionCache::builder()
///     .max_entries(20_480)
///     .max_bytes(8 << 20)
///     .max_ttl(Duration::from_secs(7200))
///     .build()?;
/// let mut ctx = SslContext::builder(SslMethod::dtls())?;
/// cache.install(&mut ctx)?;
/// // ... set the certificate, build the context, accept connections; later:
/// let stats = cache.stats();
/// assert_eq!(stats.hits + stats.misses, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct SessionCache {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Arc<Inner>,
    config: InstallConfig,
}

struct InstallConfig {
    session_id_context: Vec<u8>,
    tickets: bool,
    internal_store: bool,
    ticket_keys: Option<crate::TicketKeys>,
}

impl fmt::Debug for SessionCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionCache")
            .field("store", &self.shared.inner.store)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl SessionCache {
    /// A builder with the defaults.
    pub fn builder() -> SessionCacheBuilder {
        SessionCacheBuilder::default()
    }

    /// Installs the cache on a context: the new, get and remove session callbacks
    /// (`SSL_CTX_sess_set_new_cb`, `SSL_CTX_sess_set_get_cb`, `SSL_CTX_sess_set_remove_cb`), the
    /// cache mode `SERVER | NO_INTERNAL` (or `SERVER` with the internal store on),
    /// `SSL_OP_NO_TICKET` unless tickets are on, and the session id context.
    ///
    /// With a remote store ([`SessionStore::is_remote`]) it also installs a ClientHello callback
    /// (`SSL_CTX_set_client_hello_cb`) that looks the offered session up without blocking and
    /// suspends the handshake meanwhile: see [`pending_lookup`](Self::pending_lookup). A
    /// context has one ClientHello callback; if yours needs it for something else, call
    /// [`client_hello`](Self::client_hello) from it (after `install`, which would replace it).
    ///
    /// # Errors
    /// An OpenSSL error from setting the session id context.
    pub fn install(&self, ctx: &mut SslContextBuilder) -> Result<(), Error> {
        let config = &self.shared.config;
        let mut mode = SslSessionCacheMode::SERVER;
        if !config.internal_store {
            mode |= SslSessionCacheMode::NO_INTERNAL;
        }
        ctx.set_session_cache_mode(mode);
        if !config.tickets {
            ctx.set_options(SslOptions::NO_TICKET);
        }
        ctx.set_session_id_context(&config.session_id_context)?;
        callbacks::install(ctx, self.shared.inner.clone());
        if let Some(keys) = &config.ticket_keys {
            keys.install(ctx)?;
        }
        Ok(())
    }

    /// A snapshot of the counters, with the store's size as its own counters know it
    /// ([`SessionStore::usage`]): never a round trip, so it is cheap enough for a stats line or a
    /// metrics scrape. A remote store reports its local tier; ask its
    /// [`admin`](SessionStore::admin) side for the size of the whole keyspace.
    pub fn stats(&self) -> CacheStats {
        let inner = &self.shared.inner;
        let usage = inner.store.usage();
        let decoded = inner.decoded.as_ref().map_or(0, |t| t.lock().len() as u64);
        inner
            .counters
            .snapshot(inner.store.evictions(), usage.entries, usage.bytes, decoded)
    }

    /// Stores `session` as if OpenSSL had just handed it to the new-session callback (to warm a
    /// cache, or to move sessions between caches). Counted like the callback's inserts. A PSK
    /// session inserted this way carries the fingerprint of its key only if the cache has
    /// [`psk_keys`](SessionCacheBuilder::psk_keys); without it, it can resume only with
    /// [`resume_unchecked_psk_sessions`](SessionCacheBuilder::resume_unchecked_psk_sessions).
    pub fn insert(&self, session: &SslSessionRef) {
        self.shared.inner.store_session(None, session);
    }

    /// The time by the cache's clock ([`SessionCacheBuilder::clock`]).
    #[cfg(feature = "server")]
    pub(crate) fn wall_clock(&self) -> SystemTime {
        self.shared.inner.clock.now()
    }

    /// The longest a session lives ([`SessionCacheBuilder::max_ttl`]).
    #[cfg(feature = "server")]
    pub(crate) fn max_ttl(&self) -> Duration {
        self.shared.inner.max_ttl
    }

    /// Removes the session `id` as OpenSSL's remove callback would (the endpoint's record layer
    /// received a fatal alert on an association it runs without OpenSSL).
    #[cfg(feature = "server")]
    pub(crate) fn remove_session_id(&self, id: &SessionId) {
        self.shared.inner.remove_id(id);
    }

    /// The lookup a suspended handshake on `ssl` waits for.
    ///
    /// With a remote store, a handshake call (`SslStream::do_handshake`, `accept`, a read or
    /// write during the handshake) that fails with `ErrorCode::WANT_CLIENT_HELLO_CB` is waiting
    /// for the session the client offered; this returns that wait (`None` once it completed, or
    /// when nothing was looked up). Wait for it, then drive the handshake again:
    ///
    /// ```no_run
    /// # async fn example(stream: &mut openssl::ssl::SslStream<std::net::TcpStream>) -> Result<(), openssl::ssl::Error> {
    /// use openssl::ssl::ErrorCode;
    /// use openssl_session_cache::SessionCache;
    ///
    /// loop {
    ///     match stream.do_handshake() {
    ///         Ok(()) => break,
    ///         Err(e) if e.code() == ErrorCode::WANT_CLIENT_HELLO_CB => {
    ///             if let Some(lookup) = SessionCache::pending_lookup(stream.ssl()) {
    ///                 lookup.await; // or lookup.register(&waker) in a std event loop
    ///             }
    ///         }
    ///         Err(e) if e.code() == ErrorCode::WANT_READ => { /* wait for the socket */ }
    ///         Err(e) => return Err(e),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn pending_lookup(ssl: &SslRef) -> Option<PendingLookup> {
        let index = lookup::slot_index().ok()?;
        let state = ssl.ex_data(index)?.lookup.as_ref()?;
        (!state.is_settled()).then(|| PendingLookup::new(Arc::clone(state)))
    }

    /// What the cache's ClientHello callback does, for a context whose ClientHello callback is
    /// the application's own: call it from there and return its answer unless yours decided
    /// otherwise. It starts a lookup of the offered session on a remote store and returns
    /// `RETRY` until the lookup completed; with a local store it returns `SUCCESS` at once.
    pub fn client_hello(&self, ssl: &mut SslRef) -> ClientHelloResponse {
        self.shared.inner.on_client_hello(ssl)
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.shared.inner.store
    }

    /// Deletes expired entries, examining at most `purge_batch` of them, and returns how many it
    /// deleted (counted in [`CacheStats::expired`]). Call it periodically, or let
    /// [`SessionCacheBuilder::purge_interval`] run it on a thread.
    pub fn purge_expired(&self) -> usize {
        self.shared.inner.purge_expired()
    }

    /// Keeps the session of `ssl` resumable when `ssl` is dropped without a clean shutdown.
    ///
    /// OpenSSL removes the session of a connection freed before it sent close_notify
    /// (`SSL_free` → `ssl_clear_bad_session` → the remove callback). Servers that drop idle or
    /// vanished peers call this first; it marks the connection as having sent close_notify
    /// (`SSL_set_shutdown(SSL_SENT_SHUTDOWN)`) without sending anything.
    pub fn keep_resumable<S: std::io::Read + std::io::Write>(stream: &mut SslStream<S>) {
        ffi::keep_resumable(stream);
    }
}

/// The state the callbacks share.
pub(crate) struct Inner {
    slot_index: Index<Ssl, ConnectionSlot>,
    store: Arc<dyn SessionStore>,
    clock: Arc<dyn Clock>,
    counters: Counters,
    max_ttl: Duration,
    max_session_size: usize,
    single_use: bool,
    honor_remove: bool,
    decoded: Option<Mutex<LruCache<SessionId, Decoded>>>,
    purge_batch: usize,
    session_id_context: Vec<u8>,
    context_fp: der::ContextFingerprint,
    policy: Policy,
    /// Held for its Drop: stops and joins the purge thread when the last user of the cache (a
    /// clone or a context it is installed on) is gone.
    purger: Mutex<Option<Purger>>,
    /// Tickets are on: TLS 1.3 sessions travel in stateless tickets and are not stored.
    tickets: bool,
}

/// What decoding stored bytes gave.
enum Decode {
    Session(ffi::FreshSession),
    OtherContext,
    Failed,
}

/// A session kept decoded; the store decides whether it is still valid.
struct Decoded {
    session: SslSession,
}

impl Inner {
    /// The new-session callback. OpenSSL calls it after every full handshake: if the get
    /// callback had handed this connection a session, OpenSSL refused it (a version, cipher or
    /// context mismatch), so that hit is counted as a miss after all.
    pub(crate) fn on_new_session(&self, ssl: &mut SslRef, session: &SslSessionRef) {
        if !ssl.session_reused() {
            if let Some(slot) = ssl.ex_data_mut(self.slot_index) {
                if std::mem::take(&mut slot.handed_out) {
                    self.counters
                        .hits
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    bump(&self.counters.misses);
                    bump(&self.counters.refused);
                }
            }
        }
        self.store_session(Some(ssl), session);
    }

    /// The ClientHello callback: with a remote store, start looking up the offered session and
    /// suspend the handshake until the answer is parked on the connection.
    pub(crate) fn on_client_hello(&self, ssl: &mut SslRef) -> ClientHelloResponse {
        if !self.store.is_remote() {
            return ClientHelloResponse::SUCCESS;
        }
        if let Some(state) = ssl
            .ex_data(self.slot_index)
            .and_then(|slot| slot.lookup.as_ref())
        {
            // Driven again: go on once the answer is in (or the application gave up).
            return if state.is_settled() {
                ClientHelloResponse::SUCCESS
            } else {
                ClientHelloResponse::RETRY
            };
        }
        let Some(id) = lookup::offered_id(ssl) else {
            return ClientHelloResponse::SUCCESS;
        };
        let state = LookupState::new(id);
        match ssl.ex_data_mut(self.slot_index) {
            Some(slot) => slot.lookup = Some(Arc::clone(&state)),
            None => ssl.set_ex_data(
                self.slot_index,
                ConnectionSlot {
                    lookup: Some(Arc::clone(&state)),
                    handed_out: false,
                },
            ),
        }
        bump(&self.counters.lookups);
        let completion = Arc::clone(&state);
        self.store.lookup(
            id,
            lookup::mode(self.single_use),
            LookupDone::new(move |result| completion.complete(result)),
        );
        if state.is_settled() {
            ClientHelloResponse::SUCCESS
        } else {
            bump(&self.counters.suspended);
            ClientHelloResponse::RETRY
        }
    }

    /// Serializes (outside any lock) and stores a new session, made on `ssl` (`None`: inserted
    /// by hand).
    pub(crate) fn store_session(&self, ssl: Option<&SslRef>, session: &SslSessionRef) {
        let Ok(id) = SessionId::new(session.id()) else {
            return; // empty id: nothing a client could offer back
        };
        if self.tickets && session.protocol_version() == openssl::ssl::SslVersion::TLS1_3 {
            return; // a stateless ticket carries it; its id is never looked up
        }
        let now = self.clock.now();
        let expires_at = session_expiry(session, now, self.max_ttl);
        if expires_at <= now {
            return;
        }
        let mut der = match session.to_der() {
            Ok(der) => der,
            Err(e) => {
                tracing::warn!(error = %e, "i2d_SSL_SESSION failed; session not cached");
                bump(&self.counters.store_errors);
                return;
            }
        };
        if der.len() > self.max_session_size {
            tracing::debug!(len = der.len(), "session too large to cache");
            der.zeroize();
            bump(&self.counters.rejected_oversize);
            return;
        }
        let psk_fp = der::psk_identity(&der).and_then(|identity| {
            let fp = self.policy.fingerprint_for(ssl, identity);
            if fp.is_none() {
                tracing::debug!("no key known for the psk identity; its session cannot resume");
            }
            fp
        });
        let mut stored = match der::compact(
            &der,
            id.as_bytes(),
            &self.session_id_context,
            &self.context_fp,
        ) {
            Some(small) => {
                der.zeroize();
                small
            }
            None => der,
        };
        if let Some(fp) = psk_fp {
            stored = der::with_psk_fingerprint(&fp, stored);
        }
        match self.store.put(id, StoredSession::new(stored, expires_at)) {
            Ok(()) => bump(&self.counters.inserts),
            Err(crate::StoreError::TooLarge { len, max }) => {
                tracing::debug!(len, max, "session larger than the store holds");
                bump(&self.counters.rejected_oversize);
            }
            Err(e) => {
                tracing::debug!(error = %e, "session store put failed");
                bump(&self.counters.store_errors);
            }
        }
    }

    /// The get-session callback.
    pub(crate) fn on_get_session(&self, ssl: &mut SslRef, id: &[u8]) -> Option<ffi::FreshSession> {
        let found = self.lookup(ssl, id);
        match found {
            Some(_) => {
                bump(&self.counters.hits);
                match ssl.ex_data_mut(self.slot_index) {
                    Some(slot) => slot.handed_out = true,
                    None => ssl.set_ex_data(
                        self.slot_index,
                        ConnectionSlot {
                            lookup: None,
                            handed_out: true,
                        },
                    ),
                }
            }
            None => bump(&self.counters.misses),
        }
        found
    }

    /// A lookup that panicked (a bug in a store or a veto): a miss and a store error.
    pub(crate) fn count_failed_lookup(&self) {
        bump(&self.counters.misses);
        bump(&self.counters.store_errors);
    }

    /// The answer parked on `ssl` by the ClientHello callback's lookup of `id`, if any.
    fn parked_answer(
        &self,
        ssl: &SslRef,
        id: &SessionId,
    ) -> Option<Result<Option<StoredSession>, crate::StoreError>> {
        let state = ssl.ex_data(self.slot_index)?.lookup.as_ref()?;
        if state.id != *id {
            return None;
        }
        let answer = state.take();
        if answer.is_none() {
            bump(&self.counters.abandoned);
        }
        answer
    }

    fn lookup(&self, ssl: &SslRef, id: &[u8]) -> Option<ffi::FreshSession> {
        // A client never reads or takes a DTLS peer's shared record state.
        let id = SessionId::new(id).ok().filter(|id| !id.is_peer_state())?;
        let now = self.clock.now();
        let fetched = match self.parked_answer(ssl, &id) {
            Some(answer) => answer,
            // A remote store is never asked from here: that would hold up this thread.
            None if self.store.is_remote() => return None,
            None if self.single_use => self.store.take(&id),
            None => self.store.get(&id),
        };
        let stored = match fetched {
            Ok(Some(stored)) => stored,
            Ok(None) => {
                self.forget_decoded(&id);
                return None;
            }
            Err(e) => {
                tracing::debug!(error = %e, "session store lookup failed; full handshake");
                bump(&self.counters.store_errors);
                // Its client gets a new session from the full handshake and seldom offers this
                // one again: a kept copy would only wait for the tier's bound to push it out.
                self.forget_decoded(&id);
                return None;
            }
        };
        if stored.is_expired(now) {
            bump(&self.counters.expired);
            self.discard(&id);
            return None;
        }
        let (psk_fp, body) = der::split_policy(stored.data());
        let (session, decoded_now) = match self.decoded_session(&id) {
            Some(kept) => (kept, false),
            None => match self.decode(&id, body) {
                Decode::Session(s) => (s, true),
                Decode::OtherContext => {
                    // Made by a cache with another session id context sharing the store:
                    // OpenSSL would refuse it after decoding; leave it to its owner.
                    if self.single_use {
                        let _ = self.store.put(id, stored);
                    }
                    return None;
                }
                Decode::Failed => {
                    tracing::debug!(id = %id.to_hex(), "stored session does not decode; removed");
                    bump(&self.counters.decode_errors);
                    self.discard(&id);
                    return None;
                }
            },
        };
        let age = now
            .duration_since(unix_secs(session.time()))
            .unwrap_or(Duration::ZERO);
        let verdict = catch_unwind(AssertUnwindSafe(|| {
            self.policy.check(
                ssl,
                &id,
                &session,
                age,
                self.max_ttl,
                der::psk_identity(body),
                psk_fp,
            )
        }))
        .unwrap_or_else(|_| {
            tracing::error!("panic in the session policy check (accept_session?); refused");
            Err(Refusal::Vetoed)
        });
        if let Err(refusal) = verdict {
            tracing::debug!(id = %id.to_hex(), ?refusal, "stored session refused by policy");
            let counter = match refusal {
                Refusal::Expired => &self.counters.expired,
                Refusal::Stale => &self.counters.stale,
                Refusal::Vetoed => &self.counters.vetoed,
            };
            bump(counter);
            if refusal != Refusal::Vetoed {
                self.discard(&id);
            } else {
                self.forget_decoded(&id);
            }
            return None;
        }
        if !decoded_now {
            bump(&self.counters.decoded_hits);
            return Some(session);
        }
        if self.single_use || self.decoded.is_none() {
            return Some(session);
        }
        // The tier keeps a copy; OpenSSL gets the object just decoded.
        if let Some(copy) = ffi::dup_session(&session) {
            self.remember_decoded(id, copy.into_inner());
        }
        Some(session)
    }

    /// Decodes stored session bytes (compact or plain DER).
    fn decode(&self, id: &SessionId, body: &[u8]) -> Decode {
        let decoded = match der::expand(
            body,
            id.as_bytes(),
            &self.session_id_context,
            &self.context_fp,
        ) {
            der::Expanded::Der(mut full) => {
                let session = SslSession::from_der(&full);
                full.zeroize();
                session
            }
            der::Expanded::AsIs => SslSession::from_der(body),
            der::Expanded::OtherContext => return Decode::OtherContext,
        };
        match decoded {
            // Bytes that decode to a session of another id (plain DER filed under the wrong key)
            // are refused here on every OpenSSL: 4.0 refuses such a session itself after the get
            // callback (`ssl_get_prev_session` in ssl/ssl_sess.c compares the ClientHello's
            // session id with the session's: a miss), while 3.0 and 3.6 would resume it and
            // answer with the stored id, which the client does not take for a resumption (the
            // handshake fails).
            Ok(session) if session.id() == id.as_bytes() => {
                Decode::Session(ffi::fresh_session(session))
            }
            Ok(_) | Err(_) => Decode::Failed,
        }
    }

    /// Drops `id` from the decoded tier and, unless the lookup already took it, the store.
    fn discard(&self, id: &SessionId) {
        self.forget_decoded(id);
        if !self.single_use {
            if let Err(e) = self.store.remove(id) {
                tracing::debug!(error = %e, "removing a session failed");
                bump(&self.counters.store_errors);
            }
        }
    }

    /// A decoded session for `id`, if the tier holds one OpenSSL would still resume: a copy
    /// (`SSL_SESSION_dup`), never the tier's own object, so no two contexts ever share one
    /// `SSL_SESSION` whatever their cache mode.
    fn decoded_session(&self, id: &SessionId) -> Option<ffi::FreshSession> {
        let tier = self.decoded.as_ref()?;
        let mut tier = tier.lock();
        let usable = tier
            .get(id)
            .map(|d| ffi::session_is_resumable(&d.session))?;
        if !usable {
            let stale = tier.pop(id);
            drop(tier);
            drop(stale);
            return None;
        }
        if self.single_use {
            let taken = tier.pop(id);
            drop(tier);
            return taken.and_then(|d| ffi::dup_session(&d.session));
        }
        let kept = tier.get(id).map(|d| d.session.clone());
        drop(tier);
        kept.and_then(|s| ffi::dup_session(&s))
    }

    fn remember_decoded(&self, id: SessionId, session: SslSession) {
        if let Some(tier) = &self.decoded {
            let evicted = tier.lock().push(id, Decoded { session });
            drop(evicted); // SSL_SESSION_free outside the lock
        }
    }

    fn forget_decoded(&self, id: &SessionId) {
        if let Some(tier) = &self.decoded {
            let gone = tier.lock().pop(id);
            drop(gone);
        }
    }

    /// The remove-session callback. May run with OpenSSL's context lock held: it must not call
    /// back into OpenSSL for that context.
    pub(crate) fn on_remove_session(&self, session: &SslSessionRef) {
        if let Ok(id) = SessionId::new(session.id()) {
            self.remove_id(&id);
        }
    }

    /// What OpenSSL asks for when it removes a session (a fatal alert, an expired hit), by id:
    /// the session goes from the store and the decoded tier (unless the remove callback is
    /// ignored, [`SessionCacheBuilder::honor_remove_callback`]).
    pub(crate) fn remove_id(&self, id: &SessionId) {
        if !self.honor_remove {
            return;
        }
        let id = *id;
        self.forget_decoded(&id);
        match self.store.remove(&id) {
            Ok(true) => bump(&self.counters.removed),
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(error = %e, "session store remove failed");
                bump(&self.counters.store_errors);
            }
        }
    }

    fn purge_expired(&self) -> usize {
        let now = self.clock.now();
        let Some(admin) = self.store.admin() else {
            return 0;
        };
        match admin.purge_expired(now, self.purge_batch) {
            Ok(n) => {
                add(&self.counters.expired, n as u64);
                n
            }
            Err(e) => {
                tracing::debug!(error = %e, "session store purge failed");
                bump(&self.counters.store_errors);
                0
            }
        }
    }
}

/// The expiry of `session` stored at `now`: `now` plus the smaller of its timeout and `max_ttl`,
/// and never later than OpenSSL's own view of it (its creation time plus its timeout).
///
/// Counting from `now` (the cache's clock) rather than from the session's own timestamp keeps
/// expiry consistent with an injected clock; the cap keeps the store from holding a session
/// OpenSSL would refuse anyway.
pub(crate) fn session_expiry(
    session: &SslSessionRef,
    now: SystemTime,
    max_ttl: Duration,
) -> SystemTime {
    expiry(now, session.time(), session.timeout(), max_ttl)
}

/// [`session_expiry`] on plain numbers: OpenSSL's `time` and `timeout` (seconds, any value a
/// session can carry) and the cap. Saturates instead of overflowing: a timeout of years, or a
/// `max_ttl` of `Duration::MAX`, gives a far expiry, never a panic.
fn expiry(now: SystemTime, created_secs: i64, timeout_secs: i64, max_ttl: Duration) -> SystemTime {
    let timeout = Duration::from_secs(u64::try_from(timeout_secs).unwrap_or(0));
    let by_cache = add_saturating(now, timeout.min(max_ttl));
    let by_openssl = add_saturating(unix_secs(created_secs), timeout);
    by_cache.min(by_openssl)
}

/// The time `secs` seconds after the Unix epoch (0 for negative values).
fn unix_secs(secs: i64) -> SystemTime {
    add_saturating(
        UNIX_EPOCH,
        Duration::from_secs(u64::try_from(secs).unwrap_or(0)),
    )
}

/// `t + d`, or the latest time this cache deals in when that would overflow (year ~36800).
fn add_saturating(t: SystemTime, d: Duration) -> SystemTime {
    const LATEST: Duration = Duration::from_secs(1 << 40);
    t.checked_add(d)
        .map_or(UNIX_EPOCH + LATEST, |later| later.min(UNIX_EPOCH + LATEST))
}

/// The background purge thread; stopped and joined on drop.
struct Purger {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Purger {
    /// Starts the thread. It holds the cache weakly, so it lives as long as anything uses the
    /// cache (a clone of it, or a context it is installed on) and ends with the last user.
    fn start(inner: std::sync::Weak<Inner>, every: Duration) -> Result<Self, Error> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let signal = stop.clone();
        let handle = thread::Builder::new()
            .name("session-cache-purge".into())
            .spawn(move || {
                let (lock, cvar) = &*signal;
                let mut stopped = lock.lock();
                while !*stopped {
                    if cvar.wait_for(&mut stopped, every).timed_out() {
                        drop(stopped);
                        let Some(inner) = inner.upgrade() else {
                            return;
                        };
                        let n = inner.purge_expired();
                        if n > 0 {
                            tracing::debug!(purged = n, "expired sessions purged");
                        }
                        // If this was the last user, the cache is dropped here, on this thread,
                        // and Purger::drop must not join it.
                        drop(inner);
                        stopped = lock.lock();
                    }
                }
            })?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for Purger {
    fn drop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(handle) = self.handle.take() {
            if handle.thread().id() != thread::current().id() {
                let _ = handle.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_bounds_with_a_store_of_ones_own_are_refused() {
        let store = || -> Arc<dyn SessionStore> { Arc::new(crate::NullStore) };
        for b in [
            SessionCache::builder().max_entries(10).store(store()),
            SessionCache::builder().store(store()).max_bytes(1 << 20),
        ] {
            assert!(matches!(
                b.build(),
                Err(Error::InvalidSetting {
                    setting: "max_entries",
                    ..
                })
            ));
        }
        assert!(SessionCache::builder().store(store()).build().is_ok());
        assert!(SessionCache::builder().max_entries(10).build().is_ok());
    }

    #[test]
    fn expiry_saturates_instead_of_overflowing() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let created = 1_800_000_000 - 10;
        // The usual case: the smaller of the timeout and the cap, from now, and never later
        // than OpenSSL's own view.
        assert_eq!(
            expiry(now, created, 7200, Duration::from_secs(60)),
            now + Duration::from_secs(60)
        );
        assert_eq!(
            expiry(now, created, 100, Duration::from_secs(7200)),
            now + Duration::from_secs(90)
        );
        // Extremes a session or a configuration can carry: no panic, a far (or past) expiry.
        for (t, timeout, cap) in [
            (created, i64::MAX, Duration::MAX),
            (i64::MAX, i64::MAX, Duration::MAX),
            (i64::MIN, i64::MAX, Duration::from_secs(5)),
            (created, -1, Duration::MAX),
            (created, 0, Duration::ZERO),
        ] {
            let e = expiry(now, t, timeout, cap);
            assert!(e <= UNIX_EPOCH + Duration::from_secs(1 << 40));
        }
        assert!(expiry(now, created, i64::MAX, Duration::MAX) > now + Duration::from_secs(1 << 30));
        assert!(expiry(now, created, -1, Duration::MAX) <= now);
    }
}
