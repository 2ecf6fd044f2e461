//! The in-memory store: a sharded LRU bounded by entries and bytes together.
//!
//! Each shard is a `parking_lot` mutex over an [`lru::LruCache`], so get, put and remove are O(1)
//! and threads that touch different shards do not contend. Both bounds are split evenly over the
//! shards and hold globally; least-recently-used order is kept per shard. Small stores (fewer
//! than 1024 entries) use one shard, so their eviction order is exact LRU. Session bytes are
//! zeroized when an entry is evicted, replaced, removed or cleared.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::SystemTime;

use lru::LruCache;
use parking_lot::Mutex;

use crate::clock::unix_millis;
use crate::error::{Error, StoreError};
use crate::stats::EvictionStats;
use crate::store::{SessionId, SessionStore, StoredSession};

/// Entries per shard below which the store does not shard at all.
const MIN_ENTRIES_PER_SHARD: usize = 1024;
/// Bytes per shard below which the store does not shard at all.
const MIN_BYTES_PER_SHARD: usize = 64 << 10;
const MAX_SHARDS: usize = 16;

/// Builds a [`MemoryStore`].
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryStoreBuilder {
    max_entries: usize,
    max_bytes: usize,
    shards: Option<usize>,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        Self {
            max_entries: 20_480,
            max_bytes: 8 << 20,
            shards: None,
        }
    }
}

impl MemoryStoreBuilder {
    /// At most this many entries (default 20 480, OpenSSL's internal cache size).
    pub fn max_entries(mut self, n: usize) -> Self {
        self.max_entries = n;
        self
    }

    /// At most this many bytes of session data (default 8 MiB).
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }

    /// The number of shards, a power of two from 1 to 16. By default, one shard per 1024
    /// entries and 64 KiB, at most 16.
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = Some(n);
        self
    }

    /// Builds the store.
    ///
    /// # Errors
    /// [`Error::Config`] if a limit is 0 or the shard count is not a power of two in 1..=16.
    pub fn build(self) -> Result<MemoryStore, Error> {
        if self.max_entries == 0 || self.max_bytes == 0 {
            return Err(Error::Config(
                "memory store limits must be at least 1".into(),
            ));
        }
        let shards = match self.shards {
            Some(n) if n.is_power_of_two() && n <= MAX_SHARDS => n,
            Some(n) => {
                return Err(Error::Config(format!(
                    "shard count {n} is not a power of two in 1..=16"
                )))
            }
            None => (self.max_entries / MIN_ENTRIES_PER_SHARD)
                .min(self.max_bytes / MIN_BYTES_PER_SHARD)
                .clamp(1, MAX_SHARDS)
                .next_power_of_two()
                .min(MAX_SHARDS),
        };
        let per_entries = self.max_entries.div_ceil(shards);
        let per_bytes = self.max_bytes.div_ceil(shards);
        let shards = (0..shards)
            .map(|_| {
                Mutex::new(Shard {
                    lru: LruCache::unbounded(),
                    bytes: 0,
                    max_entries: per_entries,
                    max_bytes: per_bytes,
                })
            })
            .collect::<Vec<_>>()
            .into_boxed_slice();
        Ok(MemoryStore {
            mask: shards.len() - 1,
            shards,
            hasher: RandomState::new(),
            evicted_capacity: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            purge_cursor: AtomicUsize::new(0),
        })
    }
}

/// The default store: in memory, sharded, LRU, bounded by entries and bytes.
///
/// ```
/// use openssl_session_cache::{MemoryStore, SessionId, SessionStore, StoredSession};
/// use std::time::{Duration, SystemTime};
///
/// let store = MemoryStore::builder().max_entries(2).build()?;
/// let expires = SystemTime::now() + Duration::from_secs(60);
/// for i in 1..=3u8 {
///     store.put(SessionId::new(&[i])?, StoredSession::new(vec![i; 100], expires))?;
/// }
/// assert_eq!(store.len()?, 2);
/// assert!(store.get(&SessionId::new(&[1])?)?.is_none()); // the least recently used went first
/// assert_eq!(store.evictions().capacity, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    mask: usize,
    hasher: RandomState,
    evicted_capacity: AtomicU64,
    evicted_bytes: AtomicU64,
    purge_cursor: AtomicUsize,
}

#[derive(Debug)]
struct Shard {
    lru: LruCache<SessionId, StoredSession>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

/// Why [`Shard::put`] evicted entries.
#[derive(Debug, Default, PartialEq, Eq)]
struct Evicted {
    capacity: u64,
    bytes: u64,
}

impl Shard {
    fn put(&mut self, id: SessionId, session: StoredSession) -> Evicted {
        let mut evicted = Evicted::default();
        let len = session.len();
        if let Some(old) = self.lru.pop(&id) {
            self.bytes -= old.len();
        }
        if len > self.max_bytes {
            // It can never fit; storing it would only flush the shard.
            evicted.bytes += 1;
            return evicted;
        }
        while self.lru.len() >= self.max_entries {
            self.evict_lru();
            evicted.capacity += 1;
        }
        while self.bytes + len > self.max_bytes {
            self.evict_lru();
            evicted.bytes += 1;
        }
        self.bytes += len;
        self.lru.put(id, session);
        evicted
    }

    fn evict_lru(&mut self) {
        let (_, old) = self
            .lru
            .pop_lru()
            .expect("BUG: shard over its limits but empty");
        self.bytes -= old.len();
    }

    fn remove(&mut self, id: &SessionId) -> Option<StoredSession> {
        let old = self.lru.pop(id)?;
        self.bytes -= old.len();
        Some(old)
    }
}

impl MemoryStore {
    /// A builder with the default limits.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    fn shard(&self, id: &SessionId) -> &Mutex<Shard> {
        let i = (self.hasher.hash_one(id) as usize) & self.mask;
        &self.shards[i]
    }

    /// The number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// True if `id` is stored, without refreshing its LRU position.
    pub fn contains(&self, id: &SessionId) -> bool {
        self.shard(id).lock().lru.contains(id)
    }
}

impl SessionStore for MemoryStore {
    fn get(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        Ok(self.shard(id).lock().lru.get(id).cloned())
    }

    fn put(&self, id: SessionId, session: StoredSession) -> Result<(), StoreError> {
        let evicted = self.shard(&id).lock().put(id, session);
        if evicted.capacity > 0 {
            self.evicted_capacity
                .fetch_add(evicted.capacity, Ordering::Relaxed);
        }
        if evicted.bytes > 0 {
            self.evicted_bytes
                .fetch_add(evicted.bytes, Ordering::Relaxed);
        }
        Ok(())
    }

    fn take(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        Ok(self.shard(id).lock().remove(id))
    }

    fn remove(&self, id: &SessionId) -> Result<bool, StoreError> {
        Ok(self.shard(id).lock().remove(id).is_some())
    }

    fn len(&self) -> Result<usize, StoreError> {
        Ok(self.shards.iter().map(|s| s.lock().lru.len()).sum())
    }

    fn bytes(&self) -> Result<usize, StoreError> {
        Ok(self.shards.iter().map(|s| s.lock().bytes).sum())
    }

    fn for_each(&self, f: &mut dyn FnMut(&SessionId, &StoredSession)) -> Result<(), StoreError> {
        for shard in self.shards.iter() {
            let shard = shard.lock();
            for (id, session) in shard.lru.iter() {
                f(id, session);
            }
        }
        Ok(())
    }

    fn clear(&self) -> Result<(), StoreError> {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            shard.lru.clear();
            shard.bytes = 0;
        }
        Ok(())
    }

    /// Examines at most `max` entries, starting at the least recently used end of one shard
    /// after another (a cursor rotates over the shards between calls), and deletes the expired
    /// ones among them.
    fn purge_expired(&self, now: SystemTime, max: usize) -> Result<usize, StoreError> {
        let now_ms = unix_millis(now);
        let mut budget = max;
        let mut purged = 0;
        let start = self.purge_cursor.fetch_add(1, Ordering::Relaxed);
        for k in 0..self.shards.len() {
            if budget == 0 {
                break;
            }
            let mut shard = self.shards[(start + k) & self.mask].lock();
            let examine = budget.min(shard.lru.len());
            budget -= examine;
            let expired: Vec<SessionId> = shard
                .lru
                .iter()
                .rev()
                .take(examine)
                .filter(|(_, s)| s.expires_at_millis() <= now_ms)
                .map(|(id, _)| *id)
                .collect();
            for id in &expired {
                shard.remove(id);
            }
            purged += expired.len();
        }
        Ok(purged)
    }

    fn evictions(&self) -> EvictionStats {
        EvictionStats::new(
            self.evicted_capacity.load(Ordering::Relaxed),
            self.evicted_bytes.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn id(i: u32) -> SessionId {
        SessionId::new(&i.to_be_bytes()).unwrap()
    }

    fn sess(len: usize, expires_s: u64) -> StoredSession {
        StoredSession::new(vec![0x5a; len], UNIX_EPOCH + Duration::from_secs(expires_s))
    }

    #[test]
    fn evicts_least_recently_used_by_entries() {
        let store = MemoryStore::builder().max_entries(3).build().unwrap();
        for i in 0..3 {
            store.put(id(i), sess(10, 100)).unwrap();
        }
        assert!(store.get(&id(0)).unwrap().is_some()); // 0 is now the most recent
        store.put(id(3), sess(10, 100)).unwrap();
        assert!(store.get(&id(1)).unwrap().is_none());
        assert!(store.get(&id(0)).unwrap().is_some());
        assert_eq!(store.evictions(), EvictionStats::new(1, 0));
        assert_eq!(store.len().unwrap(), 3);
    }

    #[test]
    fn evicts_by_bytes_and_counts_the_cause() {
        let store = MemoryStore::builder()
            .max_entries(100)
            .max_bytes(250)
            .build()
            .unwrap();
        store.put(id(0), sess(100, 100)).unwrap();
        store.put(id(1), sess(100, 100)).unwrap();
        store.put(id(2), sess(100, 100)).unwrap();
        assert_eq!(store.bytes().unwrap(), 200);
        assert!(!store.contains(&id(0)));
        assert_eq!(store.evictions(), EvictionStats::new(0, 1));
    }

    #[test]
    fn an_entry_larger_than_the_byte_bound_is_not_stored_and_evicts_nothing() {
        let store = MemoryStore::builder().max_bytes(50).build().unwrap();
        store.put(id(0), sess(40, 100)).unwrap();
        store.put(id(1), sess(60, 100)).unwrap();
        assert!(store.contains(&id(0)));
        assert!(!store.contains(&id(1)));
        assert_eq!(store.bytes().unwrap(), 40);
    }

    #[test]
    fn replacing_an_entry_adjusts_bytes() {
        let store = MemoryStore::builder().build().unwrap();
        store.put(id(0), sess(100, 100)).unwrap();
        store.put(id(0), sess(30, 100)).unwrap();
        assert_eq!(store.bytes().unwrap(), 30);
        assert_eq!(store.len().unwrap(), 1);
    }

    #[test]
    fn take_deletes_what_it_returns() {
        let store = MemoryStore::builder().build().unwrap();
        store.put(id(0), sess(10, 100)).unwrap();
        assert!(store.take(&id(0)).unwrap().is_some());
        assert!(store.take(&id(0)).unwrap().is_none());
        assert_eq!(store.bytes().unwrap(), 0);
    }

    #[test]
    fn purge_removes_only_expired_entries_with_bounded_work() {
        let store = MemoryStore::builder().build().unwrap();
        for i in 0..10 {
            store
                .put(id(i), sess(10, if i % 2 == 0 { 50 } else { 500 }))
                .unwrap();
        }
        let now = UNIX_EPOCH + Duration::from_secs(100);
        assert_eq!(store.purge_expired(now, 4).unwrap(), 2);
        assert_eq!(store.purge_expired(now, 100).unwrap(), 3);
        assert_eq!(store.len().unwrap(), 5);
        store
            .for_each(&mut |_, s| assert!(!s.is_expired(now)))
            .unwrap();
    }

    #[test]
    fn rejects_zero_limits_and_bad_shard_counts() {
        assert!(MemoryStore::builder().max_entries(0).build().is_err());
        assert!(MemoryStore::builder().shards(3).build().is_err());
        assert_eq!(
            MemoryStore::builder()
                .max_entries(1 << 20)
                .max_bytes(1 << 30)
                .build()
                .unwrap()
                .shard_count(),
            16
        );
    }
}
