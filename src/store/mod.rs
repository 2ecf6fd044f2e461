//! Where sessions rest: bytes in, bytes out. Nothing here knows an `SslSession`.
//!
//! The [`SessionStore`] trait is modelled on Erlang's `ssl_session_cache_api` (lookup, update,
//! delete, fold, size) and rustls's `StoresServerSessions` (`take` for single use). The cache
//! calls it from inside OpenSSL's callbacks, so implementations must answer in bounded time and
//! report failure as a [`StoreError`] rather than panic or block.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::time::SystemTime;

use zeroize::Zeroize;

use crate::clock::{from_unix_millis, unix_millis};
use crate::error::{Error, StoreError};
use crate::stats::EvictionStats;

pub mod envelope;
pub(crate) mod file;
mod from_url;
mod lookup;
pub(crate) mod memory;
#[cfg(feature = "redis")]
mod redis;
pub mod snapshot;

pub use envelope::KeyRing;
pub use from_url::store_from_url;
pub use lookup::{LookupDone, LookupMode, PutDone};
pub use memory::{MemoryStore, MemoryStoreBuilder};
#[cfg(feature = "redis")]
pub use redis::{RedisStore, RedisStoreBuilder, RedisStoreStats};

/// The longest session id OpenSSL accepts (`SSL_MAX_SSL_SESSION_ID_LENGTH`).
pub const MAX_SESSION_ID_LEN: usize = 32;

/// The first bytes of every id under which the DTLS endpoint keeps an established peer's
/// record state ([`SessionId::for_peer_state`]). The session cache never looks up an id a
/// client offers that starts with them, so a ClientHello cannot read or take a peer's state.
pub(crate) const PEER_STATE_PREFIX: &[u8; 8] = b"\xffOSCpeer";

/// The version of a versioned value ([`SessionStore::put_if`]): its data's first 8 bytes,
/// big-endian; `None` if it is shorter.
pub fn version_of(data: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = data.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// A session id: 1 to 32 bytes, as OpenSSL hands it to the get-session callback.
///
/// Ids arrive from the network (a ClientHello's session_id, a TLS 1.3 PSK identity), so they are
/// untrusted input; the constructor rejects what OpenSSL itself would never produce.
#[derive(Clone, Copy)]
pub struct SessionId {
    len: u8,
    bytes: [u8; MAX_SESSION_ID_LEN],
}

impl SessionId {
    /// An id from its bytes.
    ///
    /// # Errors
    /// [`Error::InvalidSessionId`] if `id` is empty or longer than 32 bytes.
    pub fn new(id: &[u8]) -> Result<Self, Error> {
        if id.is_empty() || id.len() > MAX_SESSION_ID_LEN {
            return Err(Error::InvalidSessionId(id.len()));
        }
        let mut bytes = [0u8; MAX_SESSION_ID_LEN];
        bytes[..id.len()].copy_from_slice(id);
        Ok(Self {
            len: id.len() as u8,
            bytes,
        })
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The id under which a DTLS peer's record state is shared (a farm's crash failover): 32
    /// bytes, [`PEER_STATE_PREFIX`] then the first 24 bytes of the SHA-256 of `kind` and
    /// `key` (the peer's connection ID, or its address for a peer without one).
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn for_peer_state(kind: u8, key: &[u8]) -> Self {
        let mut h = openssl::sha::Sha256::new();
        h.update(b"openssl-session-cache peer state v1");
        h.update(&[kind]);
        h.update(key);
        let digest = h.finish();
        let mut bytes = [0u8; MAX_SESSION_ID_LEN];
        bytes[..8].copy_from_slice(PEER_STATE_PREFIX);
        bytes[8..].copy_from_slice(&digest[..24]);
        Self {
            len: MAX_SESSION_ID_LEN as u8,
            bytes,
        }
    }

    /// Whether the id is in the peer-state namespace ([`for_peer_state`](Self::for_peer_state)).
    pub(crate) fn is_peer_state(&self) -> bool {
        self.as_bytes().starts_with(PEER_STATE_PREFIX)
    }

    /// The id as lowercase hex (used for Redis keys and logs; an id is not a secret).
    pub fn to_hex(&self) -> String {
        use fmt::Write;
        let mut s = String::with_capacity(usize::from(self.len) * 2);
        for b in self.as_bytes() {
            let _ = write!(s, "{b:02x}");
        }
        s
    }
}

impl PartialEq for SessionId {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for SessionId {}

impl Hash for SessionId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.to_hex())
    }
}

/// A stored session: its serialized bytes (secret: they hold the master key) and its expiry.
///
/// The bytes are zeroized when the value is dropped. `Debug` never prints them.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredSession {
    data: SecretBytes,
    expires_at_ms: u64,
}

impl StoredSession {
    /// A stored session holding `data` until `expires_at`.
    pub fn new(data: Vec<u8>, expires_at: SystemTime) -> Self {
        Self {
            data: SecretBytes::from(data),
            expires_at_ms: unix_millis(expires_at),
        }
    }

    /// The same, with the expiry in milliseconds since the Unix epoch.
    pub fn from_millis(data: Vec<u8>, expires_at_ms: u64) -> Self {
        Self {
            data: SecretBytes::from(data),
            expires_at_ms,
        }
    }

    /// The session's bytes (DER from `i2d_SSL_SESSION`, unless a layer above chose otherwise).
    pub fn data(&self) -> &[u8] {
        &self.data.0
    }

    /// When the session stops being resumable.
    pub fn expires_at(&self) -> SystemTime {
        from_unix_millis(self.expires_at_ms)
    }

    /// [`expires_at`](Self::expires_at) in milliseconds since the Unix epoch.
    pub fn expires_at_millis(&self) -> u64 {
        self.expires_at_ms
    }

    /// True when `now` is at or past the expiry.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        unix_millis(now) >= self.expires_at_ms
    }

    /// The number of bytes of session data.
    pub fn len(&self) -> usize {
        self.data.0.len()
    }

    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.data.0.is_empty()
    }
}

impl fmt::Debug for StoredSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredSession")
            .field("len", &self.len())
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

/// Heap bytes that are zeroized on drop.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct SecretBytes(pub(crate) Box<[u8]>);

impl From<Vec<u8>> for SecretBytes {
    fn from(mut v: Vec<u8>) -> Self {
        if v.len() == v.capacity() {
            return Self(v.into_boxed_slice());
        }
        // Shrinking would reallocate and leave the old buffer unzeroized: copy, then wipe.
        let boxed: Box<[u8]> = v.as_slice().into();
        v.zeroize();
        Self(boxed)
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Pluggable storage for serialized sessions: the data path only.
///
/// Modelled on rustls's `StoresServerSessions`: get, put, take, remove, and a lookup that never
/// blocks. What walks the whole keyspace (size, iteration, clearing, purging) lives in
/// [`SessionStoreAdmin`], which a store offers through [`admin`](Self::admin); nothing on a
/// handshake path calls it, so a remote store is never forced to implement `SCAN` there.
///
/// All methods take `&self` and may be called concurrently from OpenSSL's callbacks on any
/// thread.
///
/// Which operations may be lossy: `put` may drop the entry (or evict others) to stay within
/// bounds, or queue it and lose it on overflow; `get` may miss. Which must be reliable: **`take`
/// must reliably delete** what it returns, atomically (across hosts, for a shared store), so a
/// single-use session is never handed out twice; `remove` must delete if present (a store that
/// writes behind must never let an earlier queued `put` of the same id win over it).
///
/// **Local and remote stores.** A store in this process ([`MemoryStore`], [`NullStore`]) answers
/// every call at once: the cache calls it straight from OpenSSL's callbacks. A store that may
/// wait on the network says so with [`is_remote`](Self::is_remote); the cache then never calls
/// its `get` or `take` from a callback, only [`lookup`](Self::lookup), from OpenSSL's ClientHello
/// callback, which can suspend the handshake until the lookup completes. Its `put` and `remove`
/// must not wait either: queue them (write-behind) and return.
///
/// Implementations: [`MemoryStore`] (the default), [`NullStore`], and with the `redis` feature a
/// shared store for server farms.
pub trait SessionStore: fmt::Debug + Send + Sync {
    /// Looks up `id`. Expired entries may be returned; the caller checks expiry. May block on a
    /// remote store (the cache does not call it then; see [`lookup`](Self::lookup)).
    fn get(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError>;

    /// Stores `session` under `id`, replacing what was there. Never blocks: a remote store
    /// queues the write.
    fn put(&self, id: SessionId, session: StoredSession) -> Result<(), StoreError>;

    /// Looks up and deletes `id` in one atomic step. May block on a remote store.
    fn take(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError>;

    /// Deletes `id`; returns whether it was present (a store that writes behind returns `true`
    /// once the removal is queued). Never blocks.
    fn remove(&self, id: &SessionId) -> Result<bool, StoreError>;

    /// Starts a lookup of `id` that never blocks the calling thread, and completes `done` exactly
    /// once: at once, on this thread, when the answer is local; later, from any thread, when it
    /// has to travel. A remote store completes every lookup within its own deadline (an error
    /// then), so a suspended handshake always resumes.
    ///
    /// The default answers at once with [`get`](Self::get) or [`take`](Self::take): right for
    /// stores in this process.
    fn lookup(&self, id: SessionId, mode: LookupMode, done: LookupDone) {
        let found = match mode {
            LookupMode::Get => self.get(&id),
            LookupMode::Take => self.take(&id),
        };
        done.complete(found);
    }

    /// Stores `session` under `id` and completes `done` once the write **reached the store**
    /// (`Ok`), or with the error; never blocks. The DTLS endpoint's sequence-number leases
    /// rely on it: a lease is used only after the write that grants it completed with `Ok`.
    /// The write goes past any write-behind queue and local tier.
    ///
    /// The default stores with [`put`](Self::put) and completes at once for a store in this
    /// process; a remote store ([`is_remote`](Self::is_remote)) that does not override it
    /// completes with [`StoreError::Unavailable`], since its `put` only queues.
    fn put_confirmed(&self, id: SessionId, session: StoredSession, done: PutDone) {
        if self.is_remote() {
            return done.complete(Err(StoreError::Unavailable(
                "this store cannot confirm writes".into(),
            )));
        }
        done.complete(self.put(id, session));
    }

    /// Stores `session` under `id` only if the value stored there is a version in `expect`
    /// (with `None`, whatever is there, like [`put_confirmed`](Self::put_confirmed)); completes
    /// `done` like `put_confirmed`, or with [`StoreError::Conflict`] when the stored value is of
    /// another version or absent (nothing written). Never blocks.
    ///
    /// A **versioned value** is one whose data begins with its version: 8 bytes, big-endian
    /// ([`version_of`]). The compare and the write are one atomic step for every caller of the
    /// store (every host, for a shared store), which keeps the version readable for it: the
    /// Redis store writes it in the clear ahead of the sealed value. The DTLS endpoint's shared
    /// peers rely on it (a host whose write finds another's version has lost the peer).
    ///
    /// The default completes with [`StoreError::Unavailable`]: a store cannot compare and set
    /// atomically unless it says how.
    fn put_if(&self, id: SessionId, session: StoredSession, expect: Option<&[u64]>, done: PutDone) {
        let _ = (id, session, expect);
        done.complete(Err(StoreError::Unavailable(
            "this store cannot compare and set".into(),
        )));
    }

    /// Deletes `id` only if the value stored there is a version in `expect` (see
    /// [`put_if`](Self::put_if)), in one atomic step; returns whether it deleted (a remote
    /// store returns `true` once the removal is sent). Never blocks.
    ///
    /// The default refuses with [`StoreError::Unavailable`].
    fn remove_if(&self, id: &SessionId, expect: &[u64]) -> Result<bool, StoreError> {
        let _ = (id, expect);
        Err(StoreError::Unavailable(
            "this store cannot compare and delete".into(),
        ))
    }

    /// Whether `get` and `take` may wait on the network (default: no). The session cache then
    /// looks sessions up only through [`lookup`](Self::lookup), from OpenSSL's ClientHello
    /// callback.
    fn is_remote(&self) -> bool {
        false
    }

    /// What the store holds, from its counters alone (never a round trip): a remote store
    /// reports what it holds in this process (its local tier), or zeros.
    fn usage(&self) -> StoreUsage {
        StoreUsage::default()
    }

    /// How many entries the store evicted to stay within its bounds, by cause.
    fn evictions(&self) -> EvictionStats {
        EvictionStats::default()
    }

    /// The store's administrative side, if it has one (size, iteration, clearing, purging:
    /// snapshots and the purge thread need it).
    fn admin(&self) -> Option<&dyn SessionStoreAdmin> {
        None
    }
}

/// The size of a store as its counters know it ([`SessionStore::usage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreUsage {
    /// Entries held.
    pub entries: u64,
    /// Bytes of session data held.
    pub bytes: u64,
}

impl StoreUsage {
    /// A usage of `entries` entries holding `bytes` bytes.
    pub fn new(entries: u64, bytes: u64) -> Self {
        Self { entries, bytes }
    }
}

/// The administrative side of a store: operations over the whole keyspace, for explicit admin
/// calls (snapshots, tools, the purge thread), never for a handshake path. On a remote store each
/// may walk the whole keyspace (`SCAN`).
pub trait SessionStoreAdmin: SessionStore {
    /// Number of entries.
    fn len(&self) -> Result<usize, StoreError>;

    /// True when the store holds no entries.
    fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// Bytes of session data held (the sum of [`StoredSession::len`]).
    fn bytes(&self) -> Result<usize, StoreError>;

    /// Calls `f` for every entry (Erlang's `foldl`). The order is unspecified unless the store
    /// documents one. Implementations may hold locks while calling `f`, so `f` must not call
    /// back into the store.
    fn for_each(&self, f: &mut dyn FnMut(&SessionId, &StoredSession)) -> Result<(), StoreError>;

    /// Deletes every entry.
    fn clear(&self) -> Result<(), StoreError>;

    /// Deletes up to `max` entries that expired at or before `now`, and returns how many it
    /// deleted. Bounded work per call: call again to continue.
    fn purge_expired(&self, now: SystemTime, max: usize) -> Result<usize, StoreError>;

    /// Replaces the key ring that seals the store's values at rest (after the key file changed):
    /// values sealed under keys still in `ring` keep opening, new values are sealed with its
    /// active key. Returns `Ok(false)` for a store that seals nothing (the default).
    ///
    /// # Errors
    /// The store's own refusal (for example a store built to write plaintext).
    fn replace_key_ring(&self, ring: KeyRing) -> Result<bool, Error> {
        let _ = ring;
        Ok(false)
    }
}

/// A store that stores nothing: every lookup misses. Sessions never resume through it.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullStore;

impl SessionStore for NullStore {
    fn get(&self, _id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        Ok(None)
    }

    fn put(&self, _id: SessionId, _session: StoredSession) -> Result<(), StoreError> {
        Ok(())
    }

    fn take(&self, _id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        Ok(None)
    }

    fn remove(&self, _id: &SessionId) -> Result<bool, StoreError> {
        Ok(false)
    }

    fn admin(&self) -> Option<&dyn SessionStoreAdmin> {
        Some(self)
    }
}

impl SessionStoreAdmin for NullStore {
    fn len(&self) -> Result<usize, StoreError> {
        Ok(0)
    }

    fn bytes(&self) -> Result<usize, StoreError> {
        Ok(0)
    }

    fn for_each(&self, _f: &mut dyn FnMut(&SessionId, &StoredSession)) -> Result<(), StoreError> {
        Ok(())
    }

    fn clear(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn purge_expired(&self, _now: SystemTime, _max: usize) -> Result<usize, StoreError> {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn session_id_rejects_empty_and_oversized() {
        assert!(matches!(
            SessionId::new(&[]),
            Err(Error::InvalidSessionId(0))
        ));
        assert!(matches!(
            SessionId::new(&[7; 33]),
            Err(Error::InvalidSessionId(33))
        ));
        let id = SessionId::new(&[0xab; 32]).unwrap();
        assert_eq!(id.as_bytes(), &[0xab; 32]);
        assert_eq!(id.to_hex().len(), 64);
    }

    #[test]
    fn peer_state_ids_are_their_own_namespace() {
        let a = SessionId::for_peer_state(1, &[1, 2, 3]);
        assert!(a.is_peer_state());
        assert_eq!(a.as_bytes().len(), MAX_SESSION_ID_LEN);
        assert_ne!(a, SessionId::for_peer_state(2, &[1, 2, 3]));
        assert_ne!(a, SessionId::for_peer_state(1, &[1, 2, 4]));
        assert_eq!(a, SessionId::for_peer_state(1, &[1, 2, 3]));
        assert!(!SessionId::new(&[0xff; 32]).unwrap().is_peer_state());
    }

    #[test]
    fn session_ids_compare_by_used_bytes_only() {
        let a = SessionId::new(&[1, 2]).unwrap();
        let b = SessionId::new(&[1, 2, 0]).unwrap();
        assert_ne!(a, b);
        assert_eq!(a, SessionId::new(&[1, 2]).unwrap());
    }

    #[test]
    fn stored_session_debug_hides_the_secret() {
        let s = StoredSession::new(vec![0x42; 16], UNIX_EPOCH + Duration::from_secs(10));
        let dbg = format!("{s:?}");
        assert!(dbg.contains("len: 16"), "{dbg}");
        assert!(!dbg.contains("66"), "{dbg}");
        assert!(s.is_expired(UNIX_EPOCH + Duration::from_secs(10)));
        assert!(!s.is_expired(UNIX_EPOCH + Duration::from_secs(9)));
    }

    #[test]
    fn null_store_stores_nothing() {
        let id = SessionId::new(b"id").unwrap();
        let store = NullStore;
        store
            .put(id, StoredSession::new(vec![1], SystemTime::now()))
            .unwrap();
        assert!(store.get(&id).unwrap().is_none());
        assert_eq!(store.admin().unwrap().len().unwrap(), 0);
    }
}
