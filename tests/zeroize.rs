//! Secrets are wiped before their memory goes back to the allocator: session bytes when a
//! stored session is dropped, replaced, removed, taken, evicted or cleared, and key ring keys.
//!
//! This test binary's global allocator looks at every block as it is freed and counts the
//! blocks that still hold a marker pattern.

#![allow(unsafe_code)] // a global allocator that inspects freed blocks

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use openssl_session_cache::{
    KeyRing, MemoryStore, SessionId, SessionStore, SessionStoreAdmin, StoredSession,
};

/// The byte the secrets are made of, and how many of them in a row count as a leak.
const MARK: u8 = 0xA7;
const RUN: usize = 24;

struct Watching;

static ARMED: AtomicBool = AtomicBool::new(false);
static LEAKED: AtomicUsize = AtomicUsize::new(0);
/// One scenario at a time (tests run on several threads).
static SERIAL: Mutex<()> = Mutex::new(());

unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ARMED.load(Ordering::Relaxed) && layout.size() >= RUN {
            // SAFETY: the block is still allocated and `layout.size()` bytes long.
            let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            if block.windows(RUN).any(|w| w.iter().all(|&b| b == MARK)) {
                LEAKED.fetch_add(1, Ordering::Relaxed);
            }
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Watching = Watching;

/// Runs `f` with the watch on and returns how many freed blocks held a secret.
fn leaks(f: impl FnOnce()) -> usize {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    LEAKED.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    f();
    ARMED.store(false, Ordering::SeqCst);
    LEAKED.load(Ordering::SeqCst)
}

fn secret(n: usize) -> Vec<u8> {
    vec![MARK; n]
}

fn later() -> SystemTime {
    SystemTime::now() + Duration::from_secs(600)
}

#[test]
fn the_watch_sees_an_unwiped_secret() {
    // The detector itself: a plain Vec of the marker is reported when freed.
    assert!(leaks(|| drop(std::hint::black_box(secret(64)))) >= 1);
}

#[test]
fn a_dropped_stored_session_is_wiped() {
    assert_eq!(leaks(|| drop(StoredSession::new(secret(200), later()))), 0);
    // Built from a Vec with spare capacity (copied, then the original wiped).
    let n = leaks(|| {
        let mut v = Vec::with_capacity(400);
        v.resize(200, MARK);
        drop(StoredSession::new(v, later()));
    });
    assert_eq!(n, 0);
}

#[test]
fn the_memory_store_wipes_what_leaves_it() {
    let n = leaks(|| {
        let store = MemoryStore::builder()
            .max_entries(4)
            .shards(1)
            .build()
            .unwrap();
        let id = |i: u8| SessionId::new(&[i; 32]).unwrap();
        for i in 0..8 {
            // Entries 0..4 are evicted by the later ones.
            store
                .put(id(i), StoredSession::new(secret(150), later()))
                .unwrap();
        }
        // Replaced, read (a copy handed out and dropped), removed, taken, cleared.
        store
            .put(id(7), StoredSession::new(secret(150), later()))
            .unwrap();
        drop(store.get(&id(6)).unwrap());
        store.remove(&id(5)).unwrap();
        drop(store.take(&id(4)).unwrap());
        store.clear().unwrap();
        drop(store);
    });
    assert_eq!(n, 0, "freed blocks still held session bytes");
}

#[test]
fn key_ring_keys_are_wiped() {
    let n = leaks(|| {
        let ring = KeyRing::new(1, [MARK; 32]).rotate(2, [MARK; 32]).unwrap();
        let text = ring.to_file_string();
        let parsed = KeyRing::parse(&text).unwrap();
        drop((ring, text, parsed));
    });
    assert_eq!(n, 0);
}

#[test]
fn ticket_key_secrets_are_wiped() {
    let n = leaks(|| {
        let ring = KeyRing::new(1, [MARK; 32]).rotate(2, [MARK; 32]).unwrap();
        let keys = openssl_session_cache::TicketKeys::builder(ring.clone())
            .build()
            .unwrap();
        keys.replace_ring(ring.rotate(3, [MARK; 32]).unwrap());
        drop(keys);
    });
    assert_eq!(n, 0);
}
