//! Bytes of heap per cached server session, DER included, at 100k and 1M sessions, measured with
//! a counting allocator. Sessions are real DTLS 1.2 server sessions (ECDSA P-256, made by one
//! handshake, then given distinct ids) stored through `SessionCache::insert`, the new-session
//! callback's path. Baseline in the same run: a plain `lru::LruCache<Vec<u8>, Vec<u8>>` holding
//! the same sessions' full DER under their ids.
//! Run: `cargo bench --bench memory`.
#![allow(missing_docs)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

use lru::LruCache;
use openssl::ssl::SslSession;
use openssl_session_cache::{MemoryStore, SessionCache, SessionStoreAdmin};

#[path = "support/dtls.rs"]
mod dtls;

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

fn id(i: u64) -> [u8; 32] {
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    id[8..16].copy_from_slice(&i.to_le_bytes());
    id
}

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// A real server session's DER, and where its 32-byte id sits in it.
fn template() -> (Vec<u8>, usize) {
    let pki = dtls::Pki {
        server: dtls::identity("server"),
        client: dtls::identity("client"),
    };
    let cache = SessionCache::builder().build().unwrap();
    let server = dtls::server_ctx(&pki, false, Some(&cache));
    let client = dtls::client_ctx(&pki, false);
    let (_, _, _, session) = dtls::handshake(&server, &client, None);
    let der = session.to_der().unwrap();
    let at = der
        .windows(32)
        .position(|w| w == session.id())
        .expect("the id is in the DER");
    (der, at)
}

fn main() {
    // Criterion-style flags (--bench) are ignored: this is a measurement, not a timing loop.
    let (der, at) = template();
    let session = |i: u64| {
        let mut d = der.clone();
        d[at..at + 32].copy_from_slice(&id(i));
        SslSession::from_der(&d).unwrap()
    };
    println!("session DER: {} bytes", der.len());
    println!("| sessions | this crate: bytes/session | LruCache<Vec,Vec>: bytes/session | ratio |");
    println!("|---:|---:|---:|---:|");
    for n in [100_000u64, 1_000_000] {
        let store = Arc::new(
            MemoryStore::builder()
                .max_entries(n as usize)
                .max_bytes(usize::MAX / 2)
                .build()
                .unwrap(),
        );
        let cache = SessionCache::builder()
            .store(store.clone())
            .build()
            .unwrap();
        let mut ours = 0isize;
        for i in 0..n {
            let s = session(i);
            let before = live();
            cache.insert(&s);
            ours += live() - before;
        }
        assert_eq!(store.len().unwrap(), n as usize);
        assert_eq!(cache.stats().inserts, n);
        drop(cache);
        drop(store);

        let mut base: LruCache<Vec<u8>, Vec<u8>> = LruCache::unbounded();
        let mut theirs = 0isize;
        for i in 0..n {
            let s = session(i);
            let before = live();
            base.put(id(i).to_vec(), s.to_der().unwrap());
            theirs += live() - before;
        }
        drop(base);
        let (ours, theirs) = (ours as f64 / n as f64, theirs as f64 / n as f64);
        println!("| {n} | {ours:.0} | {theirs:.0} | {:.2} |", ours / theirs);
    }
}
