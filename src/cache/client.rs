//! The client-side session cache: sessions per peer key, offered back on the next connection.

use std::collections::VecDeque;
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use lru::LruCache;
use openssl::ssl::{Ssl, SslContextBuilder, SslRef, SslSession, SslSessionCacheMode, SslVersion};
use parking_lot::Mutex;

use crate::cache::session_expiry;
use crate::clock::{unix_millis, Clock, SystemClock};
use crate::error::Error;
use crate::ex_data::ex_data_index;
use crate::ffi;

/// The per-connection key, kept in the `Ssl`'s ex_data so the new-session callback knows where a
/// session belongs.
#[derive(Debug, Clone)]
struct PeerKeyTag(Arc<str>);

ex_data_index! {
    /// The `Ssl` ex_data slot holding the key a client connection's session belongs to.
    fn key_index() -> Index<Ssl, PeerKeyTag>
}

/// Sessions a client keeps per server, keyed by the caller's key (`host:port`, a server name).
///
/// Install it on the client `SslContextBuilder` (cache mode `CLIENT`), then call
/// [`resume`](Self::resume) on each new `Ssl` before the handshake. It keeps at most
/// `per_key` sessions per key (newest first) and at most `max_keys` keys, least recently used
/// first out. TLS 1.3 sessions are handed out once (RFC 8446 recommends single-use tickets);
/// TLS 1.2 and DTLS sessions are reused until they expire.
///
/// ```no_run
/// use openssl::ssl::{Ssl, SslContext, SslMethod};
/// use openssl_session_cache::ClientSessionCache;
///
/// let sessions = ClientSessionCache::new(256, 4);
/// let mut ctx = SslContext::builder(SslMethod::dtls_client())?;
/// sessions.install(&mut ctx);
/// let ctx = ctx.build();
/// let mut ssl = Ssl::new(&ctx)?;
/// let offered = sessions.resume(&mut ssl, "coap.example:5684")?;
/// // ... ssl.connect(stream) ...
/// # let _ = offered;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct ClientSessionCache {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    keys: Mutex<LruCache<Arc<str>, VecDeque<ClientEntry>>>,
    per_key: usize,
    max_ttl: Duration,
    clock: Arc<dyn Clock>,
}

struct ClientEntry {
    session: SslSession,
    expires_at_ms: u64,
    single_use: bool,
}

impl fmt::Debug for ClientSessionCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSessionCache")
            .field("keys", &self.inner.keys.lock().len())
            .field("per_key", &self.inner.per_key)
            .finish_non_exhaustive()
    }
}

impl ClientSessionCache {
    /// A cache for up to `max_keys` servers with up to `per_key` sessions each (both at least 1).
    pub fn new(max_keys: usize, per_key: usize) -> Self {
        Self::with_clock(max_keys, per_key, Arc::new(SystemClock))
    }

    /// The same, with an injected clock for expiry.
    pub fn with_clock(max_keys: usize, per_key: usize, clock: Arc<dyn Clock>) -> Self {
        let max_keys = NonZeroUsize::new(max_keys).unwrap_or(NonZeroUsize::MIN);
        Self {
            inner: Arc::new(ClientInner {
                keys: Mutex::new(LruCache::new(max_keys)),
                per_key: per_key.max(1),
                max_ttl: Duration::from_secs(7 * 24 * 3600),
                clock,
            }),
        }
    }

    /// Installs the new-session callback on a client context and sets the cache mode to
    /// `CLIENT | NO_INTERNAL` (`SSL_CTX_set_session_cache_mode`), so this cache is the only place
    /// client sessions live.
    pub fn install(&self, ctx: &mut SslContextBuilder) {
        ctx.set_session_cache_mode(SslSessionCacheMode::CLIENT | SslSessionCacheMode::NO_INTERNAL);
        let inner = self.inner.clone();
        ctx.set_new_session_callback(move |ssl, session| {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                inner.on_new_session(ssl, session)
            }));
            if r.is_err() {
                tracing::error!("BUG: panic in the client new-session callback");
            }
        });
    }

    /// Tags `ssl` with `key` (so sessions it receives are stored under it) and offers the newest
    /// unexpired session stored under `key`, if any. Returns whether a session was offered.
    ///
    /// # Errors
    /// An OpenSSL error from allocating the ex_data index or setting the session.
    pub fn resume(&self, ssl: &mut SslRef, key: &str) -> Result<bool, Error> {
        let key: Arc<str> = Arc::from(key);
        ssl.set_ex_data(key_index()?, PeerKeyTag(key.clone()));
        let Some(session) = self.inner.pick(&key) else {
            return Ok(false);
        };
        ffi::set_client_session(ssl, &session)?;
        Ok(true)
    }

    /// The number of sessions stored under `key`.
    pub fn sessions_for(&self, key: &str) -> usize {
        self.inner.keys.lock().peek(key).map_or(0, VecDeque::len)
    }

    /// The number of sessions stored in all.
    pub fn len(&self) -> usize {
        self.inner.keys.lock().iter().map(|(_, v)| v.len()).sum()
    }

    /// True when no session is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ClientInner {
    fn on_new_session(&self, ssl: &mut SslRef, session: SslSession) {
        let Ok(index) = key_index() else { return };
        let Some(PeerKeyTag(key)) = ssl.ex_data(index).cloned() else {
            return; // not a connection `resume` tagged
        };
        let expires_at_ms = unix_millis(session_expiry(&session, self.clock.now(), self.max_ttl));
        let single_use = session.protocol_version() == SslVersion::TLS1_3;
        let entry = ClientEntry {
            session,
            expires_at_ms,
            single_use,
        };
        let dropped = {
            let mut keys = self.keys.lock();
            let list = keys.get_or_insert_mut(key, VecDeque::new);
            list.push_front(entry);
            let extra = list.len().saturating_sub(self.per_key);
            list.split_off(list.len() - extra)
        };
        drop(dropped); // SSL_SESSION_free outside the lock
    }

    fn pick(&self, key: &str) -> Option<SslSession> {
        let now = unix_millis(self.clock.now());
        let mut expired = Vec::new();
        let mut keys = self.keys.lock();
        let list = keys.get_mut(key)?;
        while let Some(entry) = list.front() {
            if entry.expires_at_ms > now {
                break;
            }
            expired.extend(list.pop_front());
        }
        let picked = match list.front() {
            Some(entry) if entry.single_use => list.pop_front().map(|e| e.session),
            Some(entry) => Some(entry.session.clone()),
            None => None,
        };
        drop(keys);
        drop(expired);
        picked
    }
}
