//! Cache counters: atomics updated from the session callbacks, and the snapshot users read.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a [`SessionCache`](crate::SessionCache)'s counters, from
/// [`SessionCache::stats`](crate::SessionCache::stats).
///
/// Counters only grow; `entries` and `bytes` are the store's occupancy when the snapshot was
/// taken, `decoded_entries` the decoded tier's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Lookups that handed OpenSSL a session it resumed. A session OpenSSL refused after the
    /// lookup (another protocol version, a cipher the client no longer offers) is counted in
    /// `refused` and `misses` instead, as soon as the new-session callback shows the full
    /// handshake that followed.
    pub hits: u64,
    /// Lookups that ended in a full handshake: nothing stored, expired, undecodable, a failed
    /// or abandoned lookup, or a session OpenSSL refused.
    pub misses: u64,
    /// Sessions handed to OpenSSL that it then refused (also counted in `misses`).
    pub refused: u64,
    /// Lookups started without blocking on a remote store (from the ClientHello callback).
    pub lookups: u64,
    /// Of those, the ones that suspended the handshake until the store answered (the rest were
    /// answered at once, from a local tier).
    pub suspended: u64,
    /// Suspended lookups the application gave up on (a full handshake followed).
    pub abandoned: u64,
    /// Stored sessions refused because today's policy no longer allows them: a cipher suite
    /// the server no longer offers, a PSK identity revoked or with another key, a PSK session
    /// whose key nothing can check (each removed, and a miss). Sessions older than today's lifetime count in `expired` instead.
    pub stale: u64,
    /// Hits served from the tier of decoded sessions (no `d2i_SSL_SESSION`).
    pub decoded_hits: u64,
    /// Stored sessions the application refused (`accept_session`; each a miss, kept in the
    /// store).
    pub vetoed: u64,
    /// Sessions handed to the store by the new-session callback or
    /// [`SessionCache::insert`](crate::SessionCache::insert) (a store that writes behind may still
    /// lose one; see its own counters).
    pub inserts: u64,
    /// Entries found expired on lookup (by their stored expiry, or older than today's
    /// `max_ttl`), or purged by a sweep.
    pub expired: u64,
    /// Entries the store evicted because it held `max_entries`.
    pub evicted_capacity: u64,
    /// Entries the store evicted because it held `max_bytes`.
    pub evicted_bytes: u64,
    /// Entries deleted because OpenSSL called the remove callback (a fatal alert sent or
    /// received, a connection freed before close_notify, an expired session) and the store held
    /// them. Single-use takes are not counted here: each is a hit.
    pub removed: u64,
    /// Stored bytes that OpenSSL could not decode (each removed, and a miss).
    pub decode_errors: u64,
    /// Sessions not stored because their DER was larger than `max_session_size`.
    pub rejected_oversize: u64,
    /// Store operations that failed (each lookup failure is also a miss).
    pub store_errors: u64,
    /// Entries in the store now (0 if the store could not say).
    pub entries: u64,
    /// Bytes of session data in the store now (0 if the store could not say).
    pub bytes: u64,
    /// Sessions in the decoded tier now (at most
    /// [`decoded_entries`](crate::SessionCacheBuilder::decoded_entries), about 1 KiB each). An
    /// entry goes when a lookup of its session does not resume from the store (gone, expired,
    /// refused by today's policy, or the store failed) or when the tier's LRU bound pushes it out.
    pub decoded_entries: u64,
}

/// Eviction counts kept by a store, merged into [`CacheStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EvictionStats {
    /// Evicted because the entry limit was reached.
    pub capacity: u64,
    /// Evicted because the byte limit was reached.
    pub bytes: u64,
}

impl EvictionStats {
    /// Eviction counts with the given values.
    pub fn new(capacity: u64, bytes: u64) -> Self {
        Self { capacity, bytes }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) lookups: AtomicU64,
    pub(crate) suspended: AtomicU64,
    pub(crate) abandoned: AtomicU64,
    pub(crate) stale: AtomicU64,
    pub(crate) vetoed: AtomicU64,
    pub(crate) decoded_hits: AtomicU64,
    pub(crate) inserts: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) removed: AtomicU64,
    pub(crate) decode_errors: AtomicU64,
    pub(crate) rejected_oversize: AtomicU64,
    pub(crate) store_errors: AtomicU64,
}

/// Counts one more of `counter` (a relaxed add: counters order nothing).
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Counts `n` more of `counter`.
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(
        &self,
        evictions: EvictionStats,
        entries: u64,
        bytes: u64,
        decoded_entries: u64,
    ) -> CacheStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CacheStats {
            hits: r(&self.hits),
            misses: r(&self.misses),
            refused: r(&self.refused),
            lookups: r(&self.lookups),
            suspended: r(&self.suspended),
            abandoned: r(&self.abandoned),
            stale: r(&self.stale),
            vetoed: r(&self.vetoed),
            decoded_hits: r(&self.decoded_hits),
            inserts: r(&self.inserts),
            expired: r(&self.expired),
            evicted_capacity: evictions.capacity,
            evicted_bytes: evictions.bytes,
            removed: r(&self.removed),
            decode_errors: r(&self.decode_errors),
            rejected_oversize: r(&self.rejected_oversize),
            store_errors: r(&self.store_errors),
            entries,
            bytes,
            decoded_entries,
        }
    }
}
