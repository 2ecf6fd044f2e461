//! The in-memory store: a sharded LRU bounded by entries and bytes together.
//!
//! Each shard is a `parking_lot` mutex over an LRU map ([`slab`]), so get, put and remove are
//! O(1) and threads that touch different shards do not contend. Both bounds are global, so no
//! shard can fill up early because ids hash unevenly, and exact: a put reserves its entry and
//! its bytes in the global counters before it inserts, evicting the least recently used entries
//! of its own shard first, then of the others, until the reservation fits. The counters never
//! pass the bounds, even for a moment, however many threads put at once.
//!
//! Small stores (fewer than 1024 entries or 64 KiB) use one shard, so their eviction order is
//! exact LRU; sharded stores are LRU within each shard. Session bytes are zeroized when an entry
//! is evicted, replaced, removed, purged or cleared.

use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::SystemTime;

use hashbrown::DefaultHashBuilder;
use parking_lot::{Mutex, MutexGuard};

use crate::clock::unix_millis;
use crate::error::{Error, StoreError};
use crate::stats::EvictionStats;
use crate::store::{
    version_of, PutDone, SecretBytes, SessionId, SessionStore, SessionStoreAdmin, StoreUsage,
    StoredSession, MAX_SESSION_ID_LEN,
};

mod slab;

use slab::LruSlab;

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

/// The most entries one of `shards` shards is expected to hold when the store holds
/// `max_entries`: its share plus four standard deviations (ids hash unevenly).
fn expected_per_shard(max_entries: usize, shards: usize) -> usize {
    let mean = max_entries.div_ceil(shards);
    mean.saturating_add(4 * (mean as f64).sqrt() as usize)
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
    // Size each table for its share plus four standard deviations, so that no shard outgrows
    // its table when the store fills.
    (base..=2 * base)
        .min_by_key(|&n| table_buckets(expected_per_shard(max_entries, n)).saturating_mul(n))
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

    /// At most this many bytes of session data (default 8 MiB). A session larger than this is
    /// refused ([`StoreError::TooLarge`]).
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
    /// [`Error::InvalidSetting`] if a limit is 0 or the shard count is not in 1..=64.
    pub fn build(self) -> Result<MemoryStore, Error> {
        for (setting, zero) in [
            ("max_entries", self.max_entries == 0),
            ("max_bytes", self.max_bytes == 0),
        ] {
            if zero {
                return Err(Error::setting(
                    setting,
                    "memory store limits must be at least 1",
                ));
            }
        }
        let shards = match self.shards {
            Some(n) if (1..=MAX_SHARDS).contains(&n) => n,
            Some(n) => {
                return Err(Error::setting(
                    "shards",
                    format!("shard count {n} is not in 1..={MAX_SHARDS}"),
                ))
            }
            None => default_shards(self.max_entries, self.max_bytes),
        };
        let expected = expected_per_shard(self.max_entries, shards);
        let shards = (0..shards)
            .map(|_| {
                Mutex::new(Shard {
                    lru: LruSlab::new(expected),
                })
            })
            .collect::<Vec<_>>()
            .into_boxed_slice();
        Ok(MemoryStore {
            shards,
            hasher: DefaultHashBuilder::default(),
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
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    // foldhash, randomly seeded per store.
    hasher: DefaultHashBuilder,
    max_entries: usize,
    max_bytes: usize,
    // Totals over all shards, including reservations of puts about to insert: raised only by
    // `try_reserve` (never past a bound), lowered after an entry leaves its shard.
    len: AtomicUsize,
    bytes: AtomicUsize,
    evicted_capacity: AtomicU64,
    evicted_bytes: AtomicU64,
    purge_cursor: AtomicUsize,
}

struct Shard {
    lru: LruSlab,
}

/// A session id zero-padded to 32 bytes: the map key. Its real length lives in the [`Slot`], so
/// a key costs 32 bytes, not 33 (which an 8-aligned node would round up to 40). OpenSSL's ids
/// are always 32 bytes; a shorter id and a 32-byte id that is the same followed by zeros share
/// a key, and storing one replaces the other.
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
/// milliseconds since the epoch (low 56 bits, good for two million years) in one word. A vacant
/// slot (a free node of the slab) has an id length of 0.
struct Slot {
    data: SecretBytes,
    meta: u64,
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

    /// A slot holding nothing (no allocation).
    fn vacant() -> Self {
        Self {
            data: SecretBytes(Box::default()),
            meta: 0,
        }
    }

    fn is_vacant(&self) -> bool {
        self.id_len() == 0
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

/// Limits, totals and the shard count; never the sessions, nor their ids.
impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.len.load(Ordering::Relaxed))
            .field("bytes", &self.bytes.load(Ordering::Relaxed))
            .field("max_entries", &self.max_entries)
            .field("max_bytes", &self.max_bytes)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
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

    /// Reserves one entry of `len` bytes in the global counters, if both bounds allow it;
    /// otherwise says which bound is in the way (entries are checked first).
    fn try_reserve(&self, len: usize) -> Result<(), Cause> {
        self.len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max_entries).then_some(n + 1)
            })
            .map_err(|_| Cause::Capacity)?;
        let bytes = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                b.checked_add(len).filter(|&t| t <= self.max_bytes)
            });
        if bytes.is_err() {
            self.len.fetch_sub(1, Ordering::Relaxed);
            return Err(Cause::Bytes);
        }
        Ok(())
    }

    /// Evicts the least recently used entry of `shard` (whose lock the caller holds).
    fn evict_from(&self, shard: &mut Shard, cause: Cause) -> bool {
        let Some(old) = shard.lru.pop_lru() else {
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

    /// Inserts an entry whose reservation the caller holds, into `shard` (locked).
    fn insert_reserved(&self, shard: &mut Shard, key: PackedId, slot: Slot) {
        while shard.lru.is_full() {
            // Four billion entries in one shard: make room there, whatever the global bounds.
            self.evict_from(shard, Cause::Capacity);
        }
        if let Some(old) = shard.lru.insert(key, slot) {
            // Another put of the same key got in while this one made room elsewhere.
            self.unaccount(&old);
        }
    }

    fn unaccount(&self, old: &Slot) {
        self.len.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(old.len(), Ordering::Relaxed);
    }

    fn remove_entry(&self, id: &SessionId) -> Option<StoredSession> {
        let key = PackedId::of(id);
        let id_len = id.as_bytes().len();
        let mut shard = self.shards[self.shard_index(&key)].lock();
        let old = shard.lru.remove_if(&key, |slot| slot.id_len() == id_len)?;
        drop(shard);
        self.unaccount(&old);
        Some(old.into_session())
    }

    /// Inserts `slot` into the home shard whose lock is `shard`: a replaced entry leaves
    /// first, so that the new one is checked against the bounds as a whole (and only the least
    /// recently used others are evicted).
    fn put_locked(&self, mut shard: MutexGuard<'_, Shard>, home: usize, key: PackedId, slot: Slot) {
        let len = slot.len();
        if let Some(old) = shard.lru.remove_if(&key, |_| true) {
            self.unaccount(&old);
        }
        // Make room in this shard first (exact LRU when there is one shard)...
        loop {
            match self.try_reserve(len) {
                Ok(()) => {
                    self.insert_reserved(&mut shard, key, slot);
                    return;
                }
                Err(cause) => {
                    if !self.evict_from(&mut shard, cause) {
                        break;
                    }
                }
            }
        }
        // ...then in the others, never holding two locks at once.
        drop(shard);
        self.put_slow(home, key, slot);
    }

    /// Makes room for `len` bytes by evicting from the other shards, one lock at a time (the
    /// home shard is empty), then inserts into the home shard.
    fn put_slow(&self, home: usize, key: PackedId, slot: Slot) {
        let len = slot.len();
        let n = self.shards.len();
        let mut k = 1;
        let mut evicted_this_round = false;
        loop {
            match self.try_reserve(len) {
                Ok(()) => {
                    let mut shard = self.shards[home].lock();
                    self.insert_reserved(&mut shard, key, slot);
                    return;
                }
                Err(cause) => {
                    let mut other = self.shards[(home + k) % n].lock();
                    evicted_this_round |= self.evict_from(&mut other, cause);
                }
            }
            if k % n == 0 {
                if !evicted_this_round {
                    // Every shard is empty: the bounds are held by puts of other threads
                    // between their reservation and their insert. Let them finish.
                    std::thread::yield_now();
                }
                evicted_this_round = false;
            }
            k += 1;
        }
    }
}

impl SessionStore for MemoryStore {
    fn get(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        let key = PackedId::of(id);
        let id_len = id.as_bytes().len();
        let mut shard = self.shards[self.shard_index(&key)].lock();
        Ok(shard
            .lru
            .get_if(&key, |slot| slot.id_len() == id_len)
            .map(Slot::to_session))
    }

    /// Stores `session`, evicting least recently used entries until both bounds hold.
    ///
    /// # Errors
    /// [`StoreError::TooLarge`] if the session alone is larger than the byte bound: it is not
    /// stored (it would only flush the store) and nothing is evicted, but an entry already
    /// under `id` is removed, since the caller meant to replace it.
    fn put(&self, id: SessionId, session: StoredSession) -> Result<(), StoreError> {
        let len = session.len();
        let key = PackedId::of(&id);
        let home = self.shard_index(&key);
        if len > self.max_bytes {
            let old = self.shards[home].lock().lru.remove_if(&key, |_| true);
            if let Some(old) = old {
                self.unaccount(&old);
            }
            return Err(StoreError::TooLarge {
                len,
                max: self.max_bytes,
            });
        }
        let slot = Slot::new(&id, session);
        let shard = self.shards[home].lock();
        self.put_locked(shard, home, key, slot);
        Ok(())
    }

    /// Stores only over a value of a version in `expect`, under the shard's lock.
    fn put_if(&self, id: SessionId, session: StoredSession, expect: Option<&[u64]>, done: PutDone) {
        let Some(expect) = expect else {
            return done.complete(self.put(id, session));
        };
        let len = session.len();
        if len > self.max_bytes {
            return done.complete(Err(StoreError::TooLarge {
                len,
                max: self.max_bytes,
            }));
        }
        let key = PackedId::of(&id);
        let id_len = id.as_bytes().len();
        let home = self.shard_index(&key);
        let mut shard = self.shards[home].lock();
        let held = shard
            .lru
            .get_if(&key, |slot| slot.id_len() == id_len)
            .and_then(|slot| version_of(&slot.data.0));
        if !held.is_some_and(|v| expect.contains(&v)) {
            drop(shard);
            return done.complete(Err(StoreError::Conflict));
        }
        self.put_locked(shard, home, key, Slot::new(&id, session));
        done.complete(Ok(()));
    }

    fn remove_if(&self, id: &SessionId, expect: &[u64]) -> Result<bool, StoreError> {
        let key = PackedId::of(id);
        let id_len = id.as_bytes().len();
        let mut shard = self.shards[self.shard_index(&key)].lock();
        let old = shard.lru.remove_if(&key, |slot| {
            slot.id_len() == id_len && version_of(&slot.data.0).is_some_and(|v| expect.contains(&v))
        });
        drop(shard);
        match old {
            Some(old) => {
                self.unaccount(&old);
                Ok(true)
            }
            None => Ok(false),
        }
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

    /// Calls `f` for every entry, **from the least to the most recently used**, so that putting
    /// the entries into a store in this order rebuilds the same recency order (a snapshot
    /// reloads with its hottest sessions last to be evicted).
    ///
    /// The order is exact with one shard. With several, each shard's order is kept and the
    /// shards are interleaved in proportion (an entry `i` places from the cold end of a shard
    /// of `n` comes at the fraction `(i + ½) / n` of the walk), which, with ids spread evenly
    /// over the shards, approximates the global order.
    ///
    /// All shards are locked for the walk (in index order), so it sees one moment of the store
    /// and blocks every other call until it ends: keep `f` short.
    fn for_each(&self, f: &mut dyn FnMut(&SessionId, &StoredSession)) -> Result<(), StoreError> {
        let guards: Vec<MutexGuard<'_, Shard>> = self.shards.iter().map(|s| s.lock()).collect();
        let mut walks: Vec<_> = guards
            .iter()
            .map(|g| (0usize, g.lru.len(), g.lru.iter_lru()))
            .collect();
        loop {
            // The shard whose next entry sits earliest in its own order, as a fraction.
            let next = walks
                .iter()
                .enumerate()
                .filter(|(_, (i, n, _))| i < n)
                .min_by(|(_, (ia, na, _)), (_, (ib, nb, _))| {
                    let a = (2 * *ia as u128 + 1) * *nb as u128;
                    let b = (2 * *ib as u128 + 1) * *na as u128;
                    a.cmp(&b)
                })
                .map(|(s, _)| s);
            let Some(s) = next else {
                break;
            };
            let (i, _, walk) = &mut walks[s];
            *i += 1;
            if let Some((key, slot)) = walk.next() {
                f(&slot.id(key), &slot.to_session());
            }
        }
        Ok(())
    }

    fn clear(&self) -> Result<(), StoreError> {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let (entries, bytes) = shard.lru.clear();
            self.len.fetch_sub(entries, Ordering::Relaxed);
            self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Examines at most `max` entries and deletes the expired ones among them. Each shard has a
    /// clock hand that walks all its entries, whatever their recency, and resumes where the
    /// previous call stopped; a cursor rotates the starting shard between calls. So every
    /// expired entry is deleted within about `len / max + 1` calls.
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
            let (examined, removed) = shard
                .lru
                .sweep(budget, |slot| slot.expires_at_ms() <= now_ms);
            budget -= examined;
            for old in &removed {
                self.unaccount(old);
            }
            purged += removed.len();
        }
        Ok(purged)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn id(i: u32) -> SessionId {
        SessionId::new(&i.to_be_bytes()).unwrap()
    }

    fn sess(len: usize, expires_s: u64) -> StoredSession {
        StoredSession::new(vec![0x5a; len], UNIX_EPOCH + Duration::from_secs(expires_s))
    }

    #[test]
    fn shard_sizing_fills_the_tables() {
        assert_eq!(
            [0, 3, 4, 7, 8, 100].map(table_buckets),
            [4, 4, 8, 8, 16, 128]
        );
        assert_eq!(expected_per_shard(1024, 1), 1024 + 4 * 32);
        assert_eq!(expected_per_shard(1_000_000, 18), 55_556 + 4 * 235);
        assert_eq!(default_shards(1023, usize::MAX), 1, "too small to shard");
        assert_eq!(
            default_shards(1_000_000, usize::MAX),
            18,
            "the example above"
        );
        // The best count may lie well past the base of 16.
        assert_eq!(default_shards(100_000, usize::MAX), 30);
    }

    #[test]
    fn one_purge_call_walks_every_shard_and_admin_is_offered() {
        let store = MemoryStore::builder().shards(4).build().unwrap();
        assert_eq!(store.shard_count(), 4);
        for i in 0..200 {
            store.put(id(i), sess(10, 100)).unwrap();
        }
        let dyn_store: &dyn SessionStore = &store;
        let admin = dyn_store
            .admin()
            .expect("the memory store has an admin side");
        assert_eq!(admin.len().unwrap(), 200);
        // Every call starts at another shard and goes on through the others.
        for _ in 0..3 {
            assert_eq!(admin.purge_expired(UNIX_EPOCH, 1000).unwrap(), 0);
        }
        let later = UNIX_EPOCH + Duration::from_secs(101);
        assert_eq!(admin.purge_expired(later, 1000).unwrap(), 200);
        assert_eq!(admin.len().unwrap(), 0);
    }

    #[test]
    fn debug_shows_totals_and_limits_never_ids() {
        let store = MemoryStore::builder().max_entries(8).build().unwrap();
        store
            .put(SessionId::new(&[0xab; 32]).unwrap(), sess(10, 100))
            .unwrap();
        let shown = format!("{store:?}");
        assert!(
            shown.contains("entries: 1, bytes: 10, max_entries: 8"),
            "{shown}"
        );
        assert!(!shown.contains("171"), "no id bytes: {shown}");
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
    fn an_entry_larger_than_the_byte_bound_is_refused_and_evicts_nothing() {
        let store = MemoryStore::builder().max_bytes(50).build().unwrap();
        store.put(id(0), sess(40, 100)).unwrap();
        assert!(matches!(
            store.put(id(1), sess(60, 100)),
            Err(StoreError::TooLarge { len: 60, max: 50 })
        ));
        assert!(store.contains(&id(0)));
        assert!(!store.contains(&id(1)));
        assert_eq!(store.bytes().unwrap(), 40);
        assert_eq!(store.evictions(), EvictionStats::default());
    }

    #[test]
    fn replacing_an_entry_adjusts_bytes() {
        let store = MemoryStore::builder().build().unwrap();
        store.put(id(0), sess(100, 100)).unwrap();
        store.put(id(0), sess(30, 100)).unwrap();
        assert_eq!(store.bytes().unwrap(), 30);
        assert_eq!(store.len().unwrap(), 1);
    }

    fn versioned(v: u64) -> StoredSession {
        let mut data = v.to_be_bytes().to_vec();
        data.extend_from_slice(&[7; 24]);
        StoredSession::from_millis(data, u64::MAX)
    }

    fn put_if(m: &MemoryStore, v: u64, expect: Option<&[u64]>) -> Result<(), StoreError> {
        let got = Arc::new(parking_lot::Mutex::new(None));
        let put = Arc::clone(&got);
        m.put_if(
            id(1),
            versioned(v),
            expect,
            PutDone::new(move |r| *put.lock() = Some(r)),
        );
        let r = got.lock().take();
        r.expect("completed at once")
    }

    #[test]
    fn conditional_writes_and_removals_compare_the_version() {
        let m = MemoryStore::builder().build().unwrap();
        assert!(matches!(
            put_if(&m, 1, Some(&[1])),
            Err(StoreError::Conflict)
        ));
        put_if(&m, 1, None).unwrap();
        assert!(matches!(
            put_if(&m, 2, Some(&[3])),
            Err(StoreError::Conflict)
        ));
        assert_eq!(version_of(m.get(&id(1)).unwrap().unwrap().data()), Some(1));
        put_if(&m, 2, Some(&[3, 1])).unwrap();
        assert!(!m.remove_if(&id(1), &[1]).unwrap(), "another version stays");
        assert!(m.contains(&id(1)));
        assert!(m.remove_if(&id(1), &[2]).unwrap());
        assert_eq!(m.usage(), StoreUsage::new(0, 0));
        // Threads racing on one version: exactly one lands.
        put_if(&m, 10, None).unwrap();
        let won: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8u64)
                .map(|i| {
                    let m = &m;
                    s.spawn(move || put_if(m, 100 + i, Some(&[10])).is_ok())
                })
                .collect();
            hs.into_iter().map(|h| usize::from(h.join().unwrap())).sum()
        });
        assert_eq!(won, 1);
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
        // The hand walks the slab in insertion order here: 4 examined, 2 of them expired.
        assert_eq!(store.purge_expired(now, 4).unwrap(), 2);
        assert_eq!(store.purge_expired(now, 0).unwrap(), 0);
        assert_eq!(store.purge_expired(now, 100).unwrap(), 3);
        assert_eq!(store.len().unwrap(), 5);
        store
            .for_each(&mut |_, s| assert!(!s.is_expired(now)))
            .unwrap();
    }

    #[test]
    fn for_each_walks_from_the_least_to_the_most_recently_used() {
        let store = MemoryStore::builder().shards(1).build().unwrap();
        for i in 0..5 {
            store.put(id(i), sess(10, 100)).unwrap();
        }
        store.get(&id(1)).unwrap();
        store.put(id(3), sess(11, 100)).unwrap();
        let mut order = Vec::new();
        store.for_each(&mut |i, _| order.push(*i)).unwrap();
        assert_eq!(order, [0, 2, 4, 1, 3].map(id));
    }

    #[test]
    fn for_each_interleaves_shards_in_proportion() {
        // Shard 0 holds 4 entries, shard 1 holds 2: ranks 1/8, 3/8, 5/8, 7/8 and 1/4, 3/4.
        let store = MemoryStore::builder().shards(2).build().unwrap();
        let mut by_shard = [Vec::new(), Vec::new()];
        let mut i = 0;
        while by_shard[0].len() < 4 || by_shard[1].len() < 2 {
            let s = store.shard_index(&PackedId::of(&id(i)));
            if by_shard[s].len() < [4, 2][s] {
                store.put(id(i), sess(10, 100)).unwrap();
                by_shard[s].push(id(i));
            }
            i += 1;
        }
        let mut order = Vec::new();
        store.for_each(&mut |i, _| order.push(*i)).unwrap();
        let [a, b] = by_shard;
        assert_eq!(order, [a[0], b[0], a[1], a[2], b[1], a[3]]);
    }

    #[test]
    fn clear_empties_every_shard_and_the_counters() {
        let store = MemoryStore::builder().shards(4).build().unwrap();
        for i in 0..50 {
            store.put(id(i), sess(10, 100)).unwrap();
        }
        store.clear().unwrap();
        assert_eq!((store.len().unwrap(), store.bytes().unwrap()), (0, 0));
        assert!(store.get(&id(3)).unwrap().is_none());
        store.put(id(3), sess(10, 100)).unwrap();
        assert_eq!(store.len().unwrap(), 1);
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
