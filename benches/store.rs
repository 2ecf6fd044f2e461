//! Store get/put throughput: `MemoryStore` against a plain `Mutex<lru::LruCache<Vec<u8>, Vec<u8>>>`
//! measured in the same run, on one thread and on two.
//! Run: `cargo bench --bench store`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lru::LruCache;
use openssl_session_cache::{MemoryStore, SessionId, SessionStore, StoredSession};

const ENTRIES: usize = 10_000;
const DER_LEN: usize = 127;

fn ids() -> Vec<SessionId> {
    (0..ENTRIES as u64)
        .map(|i| {
            let mut id = [0u8; 32];
            // Spread like OpenSSL's random ids.
            id[..8].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
            id[8..16].copy_from_slice(&i.to_le_bytes());
            SessionId::new(&id).unwrap()
        })
        .collect()
}

fn memory_store() -> MemoryStore {
    MemoryStore::builder()
        .max_entries(ENTRIES * 2)
        .max_bytes(ENTRIES * 2 * DER_LEN)
        .build()
        .unwrap()
}

fn baseline() -> Mutex<LruCache<Vec<u8>, Vec<u8>>> {
    Mutex::new(LruCache::new(NonZeroUsize::new(ENTRIES * 2).unwrap()))
}

fn expiry() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

/// Runs `per_thread` operations on each of `threads` threads; returns the wall time.
fn parallel(threads: usize, per_thread: u64, op: impl Fn(usize, u64) + Sync) -> Duration {
    let start = Instant::now();
    thread::scope(|s| {
        for t in 0..threads {
            let op = &op;
            s.spawn(move || {
                for i in 0..per_thread {
                    op(t, i);
                }
            });
        }
    });
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let ids = ids();
    let store = memory_store();
    let base = baseline();
    for id in &ids {
        store
            .put(*id, StoredSession::new(vec![7; DER_LEN], expiry()))
            .unwrap();
        base.lock()
            .unwrap()
            .put(id.as_bytes().to_vec(), vec![7; DER_LEN]);
    }
    for threads in [1usize, 2] {
        let mut group = c.benchmark_group(format!("store_get_hit/{threads}_threads"));
        group.throughput(Throughput::Elements(1));
        group.bench_function("mutex_lru_baseline", |b| {
            b.iter_custom(|iters| {
                let per = iters.div_ceil(threads as u64);
                let wall = parallel(threads, per, |t, i| {
                    let id = &ids[((i as usize).wrapping_mul(7919) + t * 5003) % ENTRIES];
                    let v = base.lock().unwrap().get(id.as_bytes()).cloned();
                    black_box(v);
                });
                // Report time per operation across all threads.
                wall / threads as u32
            })
        });
        group.bench_function("memory_store", |b| {
            b.iter_custom(|iters| {
                let per = iters.div_ceil(threads as u64);
                let wall = parallel(threads, per, |t, i| {
                    let id = &ids[((i as usize).wrapping_mul(7919) + t * 5003) % ENTRIES];
                    black_box(store.get(id).unwrap());
                });
                wall / threads as u32
            })
        });
        group.finish();

        let mut group = c.benchmark_group(format!("store_put/{threads}_threads"));
        group.throughput(Throughput::Elements(1));
        group.bench_function("mutex_lru_baseline", |b| {
            b.iter_custom(|iters| {
                let per = iters.div_ceil(threads as u64);
                let wall = parallel(threads, per, |t, i| {
                    let id = &ids[((i as usize).wrapping_mul(7919) + t * 5003) % ENTRIES];
                    base.lock()
                        .unwrap()
                        .put(id.as_bytes().to_vec(), vec![7; DER_LEN]);
                });
                wall / threads as u32
            })
        });
        group.bench_function("memory_store", |b| {
            let exp = expiry();
            b.iter_custom(|iters| {
                let per = iters.div_ceil(threads as u64);
                let wall = parallel(threads, per, |t, i| {
                    let id = ids[((i as usize).wrapping_mul(7919) + t * 5003) % ENTRIES];
                    store
                        .put(id, StoredSession::new(vec![7; DER_LEN], exp))
                        .unwrap();
                });
                wall / threads as u32
            })
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
