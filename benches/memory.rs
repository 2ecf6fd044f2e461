//! Bytes of heap per cached server session, DER included, at 100k and 1M sessions, measured with
//! a counting allocator: `MemoryStore` against a plain `lru::LruCache<Vec<u8>, Vec<u8>>` filled
//! with the same sessions in the same run.
//! Run: `cargo bench --bench memory`.
#![allow(missing_docs)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, SystemTime};

use lru::LruCache;
use openssl_session_cache::{MemoryStore, SessionId, SessionStore, StoredSession};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The size of a DTLS 1.2 server session's DER with an ECDSA P-256 server certificate.
const DER_LEN: usize = 127;

fn id(i: u64) -> [u8; 32] {
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    id[8..16].copy_from_slice(&i.to_le_bytes());
    id
}

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn main() {
    // Criterion passes flags such as --bench; there is nothing to parse.
    let expires = SystemTime::now() + Duration::from_secs(3600);
    println!("| sessions | MemoryStore bytes/session | LruCache<Vec,Vec> bytes/session | ratio |");
    println!("|---:|---:|---:|---:|");
    for n in [100_000u64, 1_000_000] {
        let before = live();
        let store = MemoryStore::builder()
            .max_entries(n as usize)
            .max_bytes(usize::MAX / 2)
            .build()
            .unwrap();
        for i in 0..n {
            store
                .put(
                    SessionId::new(&id(i)).unwrap(),
                    StoredSession::new(vec![7; DER_LEN], expires),
                )
                .unwrap();
        }
        assert_eq!(store.len().unwrap(), n as usize);
        let ours = (live() - before) as f64 / n as f64;
        drop(store);

        let before = live();
        let mut base: LruCache<Vec<u8>, Vec<u8>> = LruCache::unbounded();
        for i in 0..n {
            base.put(id(i).to_vec(), vec![7; DER_LEN]);
        }
        let theirs = (live() - before) as f64 / n as f64;
        drop(base);
        println!("| {n} | {ours:.0} | {theirs:.0} | {:.2} |", ours / theirs);
    }
}
