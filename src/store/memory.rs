//! The in-memory store: a sharded LRU bounded by entries and bytes together.
//!
//! Each shard is a `parking_lot` mutex over an [`lru::LruCache`], so get, put and remove are O(1)
//! and threads that touch different shards do not contend. Both bounds are global (atomic
//! counters, so no shard can fill up early because ids hash unevenly): a put that would cross
//! them evicts the least recently used entries of its own shard first, then of the others.
//! Small stores (fewer than 1024 entries or 64 KiB) use one shard, so their eviction order is
//! exact LRU; sharded stores are LRU within each shard. Session bytes are zeroized when an entry
//! is evicted, replaced, removed or cleared.

use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::SystemTime;

use lru::{DefaultHasher, LruCache};
use parking_lot::Mutex;

use crate::clock::unix_millis;
use crate::error::{Error, StoreError};
use crate::stats::EvictionStats;
use crate::store::{
    SecretBytes, SessionId, SessionStore, SessionStoreAdmin, StoreUsage, StoredSession,
    MAX_SESSION_ID_LEN,
};

/// Entries per shard below which the store does not shard at all.
const MIN_ENTRIES_PER_SHARD: usize = 1024;
/// Bytes per shard below which the store does not shard at all.
const MIN_BYTES_PER_SHARD: usize = 64 << 10;
/// At most this many shards by default (up to twice as many when that fills tables better).
const DEFAULT_MAX_SHARDS: usize = 16;
const MAX_SHARDS: usize = 64;

/// The buckets a hashbrown table allocates to hold `entries` (it keeps at most 7/8 full).
fn table_buckets(entries: usize) -> usize {
    match entries {
        0..=3 => 4,
        4..=7 => 8,
        _ => (entries.saturating_mul(8) / 7).next_power_of_two(),
    }
}

/// About one shard per 1024 entries and 64 KiB, at most 16; then, among that count up to twice
/// it, the one whose tables waste least memory when the store is full (a million entries in 16
/// shards leave every table half empty; in 18 they are 85% full).
fn default_shards(max_entries: usize, max_bytes: usize) -> usize {
    let base = (max_entries / MIN_ENTRIES_PER_SHARD)
        .min(max_bytes / MIN_BYTES_PER_SHARD)
        .clamp(1, DEFAULT_MAX_SHARDS);
    if base == 1 {
        return 1;
    }
    // Ids hash unevenly: size each table for its share plus four standard deviations, so that no
    // shard outgrows its table when the store fills.
    let per_shard = |n: usize| {
        let mean = max_entries.div_ceil(n);
        mean + 4 * (mean as f64).sqrt() as usize
    };
    (base..=2 * base)
        .min_by_key(|&n| table_buckets(per_shard(n)).saturating_mul(n))
        .unwrap_or(base)
}

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

    /// The number of shards, from 1 to 64. By default about one shard per 1024 entries and
    /// 64 KiB (16 to 32 shards for large stores), choosing the count whose hash tables are best
    /// filled when the store is full.
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
            Some(n) if (1..=MAX_SHARDS).contains(&n) => n,
            Some(n) => {
                return Err(Error::Config(format!(
                    "shard count {n} is not in 1..={MAX_SHARDS}"
                )))
            }
            None => default_shards(self.max_entries, self.max_bytes),
        };
        let shards = (0..shards)
            .map(|_| {
                Mutex::new(Shard {
                    lru: LruCache::unbounded(),
                })
            })
            .collect::<Vec<_>>()
            .into_boxed_slice();
        Ok(MemoryStore {
            shards,
            hasher: DefaultHasher::default(),
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
            len: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
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
/// assert_eq!(store.usage().entries, 2);
/// assert!(store.get(&SessionId::new(&[1])?)?.is_none()); // the least recently used went first
/// assert_eq!(store.evictions().capacity, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    // foldhash, randomly seeded per store: the same fast hash the shards' maps use.
    hasher: DefaultHasher,
    max_entries: usize,
    max_bytes: usize,
    // Totals over all shards; changed only under the lock of the shard that changes.
    len: AtomicUsize,
    bytes: AtomicUsize,
    evicted_capacity: AtomicU64,
    evicted_bytes: AtomicU64,
    purge_cursor: AtomicUsize,
}

#[derive(Debug)]
struct Shard {
    lru: LruCache<PackedId, Slot>,
}

/// A session id zero-padded to 32 bytes: the map key. Its real length lives in the [`Slot`], so
/// a key costs 32 bytes, not 33 (which an 8-aligned LRU node would round up to 40). OpenSSL's
/// ids are always 32 bytes; a shorter id and a 32-byte id that is the same followed by zeros
/// share a key, and storing one replaces the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PackedId([u8; MAX_SESSION_ID_LEN]);

impl PackedId {
    fn of(id: &SessionId) -> Self {
        let mut bytes = [0u8; MAX_SESSION_ID_LEN];
        bytes[..id.as_bytes().len()].copy_from_slice(id.as_bytes());
        Self(bytes)
    }
}

/// A stored value: the session bytes, and the id's length (top 8 bits) with the expiry in
/// milliseconds since the epoch (low 56 bits, good for two million years) in one word.
struct Slot {
    data: SecretBytes,
    meta: u64,
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("len", &self.len())
            .field("expires_at_ms", &self.expires_at_ms())
            .finish_non_exhaustive()
    }
}

const EXPIRY_MASK: u64 = (1 << 56) - 1;

impl Slot {
    fn new(id: &SessionId, session: StoredSession) -> Self {
        let len = id.as_bytes().len() as u64;
        Self {
            meta: (len << 56) | session.expires_at_ms.min(EXPIRY_MASK),
            data: session.data,
        }
    }

    fn id_len(&self) -> usize {
        (self.meta >> 56) as usize
    }

    fn expires_at_ms(&self) -> u64 {
        self.meta & EXPIRY_MASK
    }

    fn len(&self) -> usize {
        self.data.0.len()
    }

    fn id(&self, key: &PackedId) -> SessionId {
        SessionId::new(&key.0[..self.id_len()]).expect("BUG: a stored id length is 1..=32")
    }

    fn to_session(&self) -> StoredSession {
        StoredSession {
            data: self.data.clone(),
            expires_at_ms: self.expires_at_ms(),
        }
    }

    fn into_session(self) -> StoredSession {
        let expires_at_ms = self.expires_at_ms();
        StoredSession {
            data: self.data,
            expires_at_ms,
        }
    }
}

/// Why an entry is evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Capacity,
    Bytes,
}

impl MemoryStore {
    /// A builder with the default limits.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    fn shard_index(&self, key: &PackedId) -> usize {
        // Multiply-shift maps the 64-bit hash onto any shard count without a division.
        ((u128::from(self.hasher.hash_one(key)) * self.shards.len() as u128) >> 64) as usize
    }

    /// The number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// True if `id` is stored, without refreshing its LRU position.
    pub fn contains(&self, id: &SessionId) -> bool {
        let key = PackedId::of(id);
        let shard = self.shards[self.shard_index(&key)].lock();
        shard
            .lru
            .peek(&key)
            .is_some_and(|slot| slot.id_len() == id.as_bytes().len())
    }

    /// Whether adding `extra_entries` entries of `extra_bytes` bytes would cross a bound, and
    /// which one (entries are checked first).
    fn over(&self, extra_entries: usize, extra_bytes: usize) -> Option<Cause> {
        if self.len.load(Ordering::Relaxed) + extra_entries > self.max_entries {
            Some(Cause::Capacity)
        } else if self.bytes.load(Ordering::Relaxed) + extra_bytes > self.max_bytes {
            Some(Cause::Bytes)
        } else {
            None
        }
    }

    /// Evicts the least recently used entry of `shard` (whose lock the caller holds).
    fn evict_from(&self, shard: &mut Shard, cause: Cause) -> bool {
        let Some((_, old)) = shard.lru.pop_lru() else {
            return false;
        };
        self.unaccount(&old);
        let counter = match cause {
            Cause::Capacity => &self.evicted_capacity,
            Cause::Bytes => &self.evicted_bytes,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn unaccount(&self, old: &Slot) {
        self.len.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(old.len(), Ordering::Relaxed);
    }

    fn remove_entry(&self, id: &SessionId) -> Option<StoredSession> {
        let key = PackedId::of(id);
        let mut shard = self.shards[self.shard_index(&key)].lock();
        if shard.lru.peek(&key)?.id_len() != id.as_bytes().len() {
            return None;
        }
        let old = shard.lru.pop(&key)?;
        drop(shard);
        self.unaccount(&old);
        Some(old.into_session())
    }
}

impl SessionStore for MemoryStore {
    fn get(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        let key = PackedId::of(id);
        let mut shard = self.shards[self.shard_index(&key)].lock();
        Ok(shard
            .lru
            .get(&key)
            .filter(|slot| slot.id_len() == id.as_bytes().len())
            .map(Slot::to_session))
    }

    fn put(&self, id: SessionId, session: StoredSession) -> Result<(), StoreError> {
        let len = session.len();
        let key = PackedId::of(&id);
        let home = self.shard_index(&key);
        let slot = Slot::new(&id, session);
        let mut shard = self.shards[home].lock();
        if len > self.max_bytes {
            // It can never fit; storing it would only flush the store.
            if let Some(old) = shard.lru.pop(&key) {
                self.unaccount(&old);
            }
            self.evicted_bytes.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if let Some(existing) = shard.lru.get_mut(&key) {
            // Replace in place (one lookup; the entry becomes the most recently used).
            let old = std::mem::replace(existing, slot);
            self.bytes.fetch_add(len, Ordering::Relaxed);
            self.bytes.fetch_sub(old.len(), Ordering::Relaxed);
            drop(shard);
            drop(old);
        } else {
            // Make room in this shard first (exact LRU when there is one shard)...
            while let Some(cause) = self.over(1, len) {
                if !self.evict_from(&mut shard, cause) {
                    break;
                }
            }
            shard.lru.put(key, slot);
            self.len.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(len, Ordering::Relaxed);
            drop(shard);
        }
        // ...then in the others, one lock at a time, if that was not enough.
        if self.over(0, 0).is_none() {
            return Ok(());
        }
        for k in 1..=self.shards.len() {
            while let Some(cause) = self.over(0, 0) {
                let mut other = self.shards[(home + k) % self.shards.len()].lock();
                if !self.evict_from(&mut other, cause) {
                    break;
                }
            }
        }
        Ok(())
    }

    fn take(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        Ok(self.remove_entry(id))
    }

    fn remove(&self, id: &SessionId) -> Result<bool, StoreError> {
        Ok(self.remove_entry(id).is_some())
    }

    fn usage(&self) -> StoreUsage {
        StoreUsage::new(
            self.len.load(Ordering::Relaxed) as u64,
            self.bytes.load(Ordering::Relaxed) as u64,
        )
    }

    fn evictions(&self) -> EvictionStats {
        EvictionStats::new(
            self.evicted_capacity.load(Ordering::Relaxed),
            self.evicted_bytes.load(Ordering::Relaxed),
        )
    }

    fn admin(&self) -> Option<&dyn SessionStoreAdmin> {
        Some(self)
    }
}

impl SessionStoreAdmin for MemoryStore {
    fn len(&self) -> Result<usize, StoreError> {
        Ok(self.len.load(Ordering::Relaxed))
    }

    fn bytes(&self) -> Result<usize, StoreError> {
        Ok(self.bytes.load(Ordering::Relaxed))
    }

    fn for_each(&self, f: &mut dyn FnMut(&SessionId, &StoredSession)) -> Result<(), StoreError> {
        for shard in self.shards.iter() {
            let shard = shard.lock();
            for (key, slot) in shard.lru.iter() {
                f(&slot.id(key), &slot.to_session());
            }
        }
        Ok(())
    }

    fn clear(&self) -> Result<(), StoreError> {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            while let Some((_, old)) = shard.lru.pop_lru() {
                self.unaccount(&old);
            }
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
            let mut shard = self.shards[(start + k) % self.shards.len()].lock();
            let examine = budget.min(shard.lru.len());
            budget -= examine;
            let expired: Vec<PackedId> = shard
                .lru
                .iter()
                .rev()
                .take(examine)
                .filter(|(_, slot)| slot.expires_at_ms() <= now_ms)
                .map(|(key, _)| *key)
                .collect();
            for id in &expired {
                if let Some(old) = shard.lru.pop(id) {
                    self.unaccount(&old);
                }
            }
            purged += expired.len();
        }
        Ok(purged)
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
        let store = MemoryStore::builder().shards(1).build().unwrap();
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
    fn bounds_are_global_so_uneven_shards_do_not_evict_early() {
        let store = MemoryStore::builder()
            .max_entries(64)
            .max_bytes(1 << 20)
            .shards(16)
            .build()
            .unwrap();
        for i in 0..64 {
            store.put(id(i), sess(10, 100)).unwrap();
        }
        assert_eq!(store.len().unwrap(), 64);
        assert_eq!(store.evictions(), EvictionStats::new(0, 0));
        for i in 64..200 {
            store.put(id(i), sess(10, 100)).unwrap();
            assert_eq!(store.len().unwrap(), 64);
        }
        assert_eq!(store.evictions().capacity, 136);
        let mut seen = 0;
        store.for_each(&mut |_, _| seen += 1).unwrap();
        assert_eq!(seen, 64);
    }

    #[test]
    fn ids_of_different_lengths_are_different_entries() {
        let store = MemoryStore::builder().build().unwrap();
        let short = SessionId::new(&[9, 9]).unwrap();
        let long = SessionId::new(&[9, 9, 1]).unwrap();
        store.put(short, sess(3, 100)).unwrap();
        store.put(long, sess(4, 100)).unwrap();
        assert_eq!(store.get(&short).unwrap().unwrap().len(), 3);
        assert_eq!(store.get(&long).unwrap().unwrap().len(), 4);
        // Same padded key, other length: not the stored entry.
        let padded = SessionId::new(&[9, 9, 0]).unwrap();
        assert!(store.get(&padded).unwrap().is_none());
        assert!(!store.remove(&padded).unwrap());
        assert!(!store.contains(&padded));
        let mut ids = Vec::new();
        store
            .for_each(&mut |id, s| ids.push((*id, s.len())))
            .unwrap();
        ids.sort_by_key(|(_, l)| *l);
        assert_eq!(ids, vec![(short, 3), (long, 4)]);
    }

    #[test]
    fn rejects_zero_limits_and_bad_shard_counts() {
        assert!(MemoryStore::builder().max_entries(0).build().is_err());
        assert!(MemoryStore::builder().shards(0).build().is_err());
        assert!(MemoryStore::builder().shards(65).build().is_err());
        assert_eq!(
            MemoryStore::builder()
                .shards(3)
                .build()
                .unwrap()
                .shard_count(),
            3
        );
    }

    #[test]
    fn default_shard_count_fills_hash_tables_well() {
        assert_eq!(default_shards(1000, 1 << 30), 1);
        assert_eq!(
            default_shards(1 << 20, 100),
            1,
            "a small byte budget is not split"
        );
        let n = default_shards(1_000_000, 1 << 30);
        assert!((16..=32).contains(&n), "{n}");
        let load = 1_000_000.0 / (table_buckets(1_000_000usize.div_ceil(n)) * n) as f64;
        assert!(load > 0.8, "tables only {load:.2} full with {n} shards");
    }
}
