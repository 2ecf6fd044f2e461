//! Seeded random operations against the memory store and a naive reference (a `Vec` in
//! recency order), compared after every step; the bounds under eight threads; purging
//! wherever the expired entries sit.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openssl_session_cache::{
    EvictionStats, MemoryStore, SessionId, SessionStore, SessionStoreAdmin, StoreError,
    StoredSession,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The reference: most recently used last.
struct Model {
    entries: Vec<(u8, usize, u64)>,
    max_entries: usize,
    max_bytes: usize,
    evicted: EvictionStats,
}

impl Model {
    fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.1).sum()
    }

    fn pos(&self, k: u8) -> Option<usize> {
        self.entries.iter().position(|e| e.0 == k)
    }

    /// Returns false when the store must refuse the entry (larger than the byte bound): the
    /// entry that was under `k` is gone, nothing is evicted.
    fn put(&mut self, k: u8, len: usize, exp: u64) -> bool {
        if let Some(i) = self.pos(k) {
            self.entries.remove(i);
        }
        if len > self.max_bytes {
            return false;
        }
        while self.entries.len() >= self.max_entries {
            self.entries.remove(0);
            self.evicted = EvictionStats::new(self.evicted.capacity + 1, self.evicted.bytes);
        }
        while self.bytes() + len > self.max_bytes {
            self.entries.remove(0);
            self.evicted = EvictionStats::new(self.evicted.capacity, self.evicted.bytes + 1);
        }
        self.entries.push((k, len, exp));
        true
    }

    fn get(&mut self, k: u8) -> Option<(usize, u64)> {
        let i = self.pos(k)?;
        let e = self.entries.remove(i);
        self.entries.push(e);
        Some((e.1, e.2))
    }

    fn take(&mut self, k: u8) -> Option<(usize, u64)> {
        let i = self.pos(k)?;
        let e = self.entries.remove(i);
        Some((e.1, e.2))
    }

    /// Which entries a purge visits is the store's choice; the model checks that every entry
    /// it deleted had expired, then follows it.
    fn purged(&mut self, store: &MemoryStore, now: u64, ctx: &str) -> usize {
        let before = self.entries.len();
        for e in &self.entries {
            if !store.contains(&id(e.0)) {
                assert!(
                    e.2 <= now,
                    "purged key {} expiring at {} at {now} {ctx}",
                    e.0,
                    e.2
                );
            }
        }
        self.entries.retain(|e| store.contains(&id(e.0)));
        before - self.entries.len()
    }

    fn expired(&self, now: u64) -> usize {
        self.entries.iter().filter(|e| e.2 <= now).count()
    }
}

fn id(k: u8) -> SessionId {
    SessionId::new(&[k, 0xee]).unwrap()
}

fn at(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s)
}

fn run(seed: u64, max_entries: usize, max_bytes: usize, ops: usize) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let store = MemoryStore::builder()
        .max_entries(max_entries)
        .max_bytes(max_bytes)
        .shards(1)
        .build()
        .unwrap();
    let mut model = Model {
        entries: Vec::new(),
        max_entries,
        max_bytes,
        evicted: EvictionStats::default(),
    };
    for step in 0..ops {
        let k = rng.random_range(0..24u8);
        let ctx = format!("seed {seed} step {step}");
        match rng.random_range(0..11) {
            0..=3 => {
                // One put in ten is larger than the byte bound.
                let len = if rng.random_range(0..10) == 0 {
                    max_bytes + rng.random_range(1..=8)
                } else {
                    rng.random_range(1..=max_bytes.min(max_bytes / 2 + 8))
                };
                let exp = rng.random_range(1..100u64);
                let put = store.put(id(k), StoredSession::new(vec![k; len], at(exp)));
                if model.put(k, len, exp) {
                    put.unwrap_or_else(|e| panic!("put {ctx}: {e}"));
                } else {
                    match put {
                        Err(StoreError::TooLarge { len: l, max }) => {
                            assert_eq!((l, max), (len, max_bytes), "too large {ctx}")
                        }
                        other => panic!("an oversize put gave {other:?} {ctx}"),
                    }
                }
            }
            4..=6 => {
                let got = store.get(&id(k)).unwrap();
                let want = model.get(k);
                assert_eq!(
                    got.as_ref().map(|s| (s.len(), s.expires_at())),
                    want.map(|(l, e)| (l, at(e))),
                    "get {ctx}"
                );
                if let Some(s) = got {
                    assert!(
                        s.data().iter().all(|&b| b == k),
                        "bytes of another entry {ctx}"
                    );
                }
            }
            7 => {
                let got = store
                    .take(&id(k))
                    .unwrap()
                    .map(|s| (s.len(), s.expires_at()));
                assert_eq!(got, model.take(k).map(|(l, e)| (l, at(e))), "take {ctx}");
            }
            8 => {
                assert_eq!(
                    store.remove(&id(k)).unwrap(),
                    model.take(k).is_some(),
                    "remove {ctx}"
                );
            }
            9 => {
                let now = rng.random_range(0..100u64);
                let budget = rng.random_range(0..10usize);
                let n = store.purge_expired(at(now), budget).unwrap();
                assert!(n <= budget, "purged {n} with a budget of {budget} {ctx}");
                assert_eq!(n, model.purged(&store, now, &ctx), "purge {ctx}");
            }
            _ => {
                // With no limit on the work, every expired entry goes, wherever it sits.
                let now = rng.random_range(0..100u64);
                let want = model.expired(now);
                let n = store.purge_expired(at(now), usize::MAX).unwrap();
                assert_eq!(n, want, "full purge {ctx}");
                assert_eq!(model.purged(&store, now, &ctx), want, "full purge {ctx}");
            }
        }
        assert_eq!(store.len().unwrap(), model.entries.len(), "len {ctx}");
        assert_eq!(store.bytes().unwrap(), model.bytes(), "bytes {ctx}");
        assert_eq!(store.evictions(), model.evicted, "evictions {ctx}");
        assert!(store.len().unwrap() <= max_entries && store.bytes().unwrap() <= max_bytes);
    }
}

#[test]
fn memory_store_matches_the_reference_model() {
    for seed in 0..40 {
        run(
            seed,
            1 + (seed as usize % 8),
            64 + (seed as usize * 37) % 400,
            2_000,
        );
    }
}

#[test]
fn single_entry_and_single_byte_limits() {
    run(1000, 1, 10_000, 500);
    run(1001, 100, 1, 500);
}

#[test]
fn sharded_store_keeps_both_bounds_under_random_load() {
    let mut rng = SmallRng::seed_from_u64(7);
    let store = MemoryStore::builder()
        .max_entries(4096)
        .max_bytes(256 << 10)
        .build()
        .unwrap();
    assert!(store.shard_count() > 1);
    for i in 0..50_000u32 {
        let key = SessionId::new(&i.to_le_bytes()).unwrap();
        let len = rng.random_range(50..400);
        store
            .put(key, StoredSession::new(vec![1; len], at(1_000)))
            .unwrap();
        assert!(
            store.get(&key).unwrap().is_some(),
            "a fresh entry must be readable"
        );
        if i % 997 == 0 {
            assert!(store.len().unwrap() <= 4096);
            assert!(store.bytes().unwrap() <= 256 << 10);
        }
    }
    let e = store.evictions();
    assert_eq!(e.capacity + e.bytes + store.len().unwrap() as u64, 50_000);
}

/// Eight threads put at once; every thread checks both bounds after each of its puts. Entries
/// of 50 to 150 bytes, so that the byte bound binds as often as the entry bound. The second
/// store is smaller than its shard count: most puts find their own shard empty and evict from
/// the others.
#[test]
fn bounds_are_exact_under_eight_threads() {
    for (max_entries, shards, puts) in [(256, 16, 20_000u32), (3, 8, 5_000)] {
        let max_bytes = max_entries * 100;
        let store = Arc::new(
            MemoryStore::builder()
                .max_entries(max_entries)
                .max_bytes(max_bytes)
                .shards(shards)
                .build()
                .unwrap(),
        );
        let threads: Vec<_> = (0..8u32)
            .map(|t| {
                let store = store.clone();
                thread::spawn(move || {
                    let mut rng = SmallRng::seed_from_u64(u64::from(t));
                    for i in 0..puts {
                        let mut key = [0u8; 8];
                        key[..4].copy_from_slice(&t.to_be_bytes());
                        key[4..].copy_from_slice(&i.to_be_bytes());
                        let len = rng.random_range(50..=150);
                        store
                            .put(
                                SessionId::new(&key).unwrap(),
                                StoredSession::new(vec![1; len], at(1_000)),
                            )
                            .unwrap();
                        let (n, b) = (store.len().unwrap(), store.bytes().unwrap());
                        assert!(
                            n <= max_entries && b <= max_bytes,
                            "thread {t} put {i}: {n} entries, {b} bytes (bounds {max_entries}, {max_bytes})"
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // At rest the counters are what the store holds.
        let (mut n, mut b) = (0, 0);
        store
            .for_each(&mut |_, s| {
                n += 1;
                b += s.len();
            })
            .unwrap();
        assert_eq!((store.len().unwrap(), store.bytes().unwrap()), (n, b));
        assert!(n <= max_entries && b <= max_bytes);
        let e = store.evictions();
        assert_eq!(e.capacity + e.bytes + n as u64, 8 * u64::from(puts));
        assert!(e.capacity > 0 && e.bytes > 0, "{e:?}");
    }
}

/// The expired entries are the most recently used: a purge that starts from the cold end of
/// each shard every time, with a budget smaller than a shard, never reaches them.
#[test]
fn purge_reaches_expired_entries_anywhere_in_the_recency_order() {
    for shards in [1, 4] {
        let store = MemoryStore::builder().shards(shards).build().unwrap();
        for k in 0..100u8 {
            let exp = if k % 10 == 0 { 10 } else { 1_000 };
            store
                .put(id(k), StoredSession::new(vec![k; 10], at(exp)))
                .unwrap();
        }
        for k in (0..100u8).step_by(10) {
            assert!(store.get(&id(k)).unwrap().is_some());
        }
        let mut purged = 0;
        for _ in 0..40 {
            let n = store.purge_expired(at(50), 8).unwrap();
            assert!(n <= 8);
            purged += n;
        }
        assert_eq!(purged, 10, "{shards} shards");
        assert_eq!(store.len().unwrap(), 90);
        for k in 0..100u8 {
            assert_eq!(
                store.contains(&id(k)),
                k % 10 != 0,
                "{shards} shards, key {k}"
            );
        }
    }
}

/// A session larger than the byte bound is refused with an error (the cache must not count it
/// as stored), evicts nothing, and removes what was under its id.
#[test]
fn an_oversize_put_is_refused_with_an_error() {
    let store = MemoryStore::builder().max_bytes(100).build().unwrap();
    store
        .put(id(1), StoredSession::new(vec![1; 60], at(50)))
        .unwrap();
    store
        .put(id(2), StoredSession::new(vec![2; 30], at(50)))
        .unwrap();
    let err = store
        .put(id(2), StoredSession::new(vec![2; 101], at(50)))
        .unwrap_err();
    assert!(
        matches!(err, StoreError::TooLarge { len: 101, max: 100 }),
        "{err:?}"
    );
    assert!(store.contains(&id(1)), "nothing evicted for it");
    assert!(
        !store.contains(&id(2)),
        "the entry it was to replace is gone"
    );
    assert_eq!((store.len().unwrap(), store.bytes().unwrap()), (1, 60));
    assert_eq!(store.evictions(), EvictionStats::default());
    // Exactly the bound fits.
    store
        .put(id(3), StoredSession::new(vec![3; 100], at(50)))
        .unwrap();
    assert_eq!(store.evictions(), EvictionStats::new(0, 1));
}
