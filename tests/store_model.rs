//! Seeded random operations against the memory store and a naive reference (a `Vec` in
//! recency order), compared after every step.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openssl_session_cache::{
    EvictionStats, MemoryStore, SessionId, SessionStore, SessionStoreAdmin, StoredSession,
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

    fn put(&mut self, k: u8, len: usize, exp: u64) {
        if let Some(i) = self.pos(k) {
            self.entries.remove(i);
        }
        if len > self.max_bytes {
            self.evicted = EvictionStats::new(self.evicted.capacity, self.evicted.bytes + 1);
            return;
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

    fn purge(&mut self, now: u64, budget: usize) -> usize {
        let examined: Vec<u8> = self.entries.iter().take(budget).map(|e| e.0).collect();
        let before = self.entries.len();
        self.entries
            .retain(|e| !(examined.contains(&e.0) && e.2 * 1000 <= now * 1000));
        before - self.entries.len()
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
        match rng.random_range(0..10) {
            0..=3 => {
                let len = rng.random_range(1..=max_bytes / 2 + 8);
                let exp = rng.random_range(1..100u64);
                store
                    .put(id(k), StoredSession::new(vec![k; len], at(exp)))
                    .unwrap();
                model.put(k, len, exp);
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
            _ => {
                let now = rng.random_range(0..100u64);
                let budget = rng.random_range(0..10usize);
                assert_eq!(
                    store.purge_expired(at(now), budget).unwrap(),
                    model.purge(now, budget),
                    "purge {ctx}"
                );
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
