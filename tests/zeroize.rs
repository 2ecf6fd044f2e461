//! Secrets are wiped before their memory goes back to the allocator: session bytes when a
//! stored session is dropped, replaced, removed, taken, evicted or cleared (in the memory
//! store, the Redis store's tier and write-behind queue, through the envelope and snapshot
//! loads), key ring keys, and the ticket keys derived per epoch.
//!
//! This test binary's global allocator looks at every block as it is freed and counts the
//! blocks that still hold a marker pattern, or either half of a key the test registered
//! (a freed small block loses its first bytes to the allocator's bookkeeping, and a partial
//! copy is a leak as well).

#![allow(unsafe_code)] // a global allocator that inspects freed blocks

mod support;

#[cfg(feature = "redis")]
#[path = "support/redis_server.rs"]
mod redis_server;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openssl_session_cache::{
    KeyRing, ManualClock, MemoryStore, SessionCache, SessionId, SessionStore, SessionStoreAdmin,
    StoredSession, TicketKeys,
};

/// The byte the secrets are made of, and how many of them in a row count as a leak.
const MARK: u8 = 0xA7;
const RUN: usize = 24;

/// Keys (32 bytes each) the watch looks for besides the marker, stored masked (XOR with
/// [`mask`]) so the registry itself never holds them.
const MAX_KEYS: usize = 8;
static KEYS: [AtomicU8; 32 * MAX_KEYS] = [const { AtomicU8::new(0) }; 32 * MAX_KEYS];
static KEY_COUNT: AtomicUsize = AtomicUsize::new(0);

fn mask(i: usize) -> u8 {
    (i as u8).wrapping_mul(37).wrapping_add(0x5b)
}

struct Watching;

static ARMED: AtomicBool = AtomicBool::new(false);
static LEAKED: AtomicUsize = AtomicUsize::new(0);
/// One scenario at a time (tests run on several threads).
static SERIAL: Mutex<()> = Mutex::new(());

/// Whether `block` holds either 16-byte half of registered key `k`.
fn holds_key(block: &[u8], k: usize) -> bool {
    let key = |i: usize| KEYS[32 * k + i].load(Ordering::Relaxed) ^ mask(i);
    [0usize, 16].into_iter().any(|off| {
        block
            .windows(16)
            .any(|w| w.iter().enumerate().all(|(j, &b)| b == key(off + j)))
    })
}

unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ARMED.load(Ordering::Relaxed) && layout.size() >= 16 {
            // SAFETY: the block is still allocated and `layout.size()` bytes long.
            let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            let marked =
                block.len() >= RUN && block.windows(RUN).any(|w| w.iter().all(|&b| b == MARK));
            let keyed = (0..KEY_COUNT.load(Ordering::Relaxed)).any(|k| holds_key(block, k));
            if marked || keyed {
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
    leaks_of(&[], f)
}

/// [`leaks`], also watching for `keys` (given masked).
fn leaks_of(keys: &[[u8; 32]], f: impl FnOnce()) -> usize {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    assert!(keys.len() <= MAX_KEYS);
    for (k, key) in keys.iter().enumerate() {
        for (i, &b) in key.iter().enumerate() {
            KEYS[32 * k + i].store(b, Ordering::SeqCst);
        }
    }
    KEY_COUNT.store(keys.len(), Ordering::SeqCst);
    LEAKED.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    f();
    ARMED.store(false, Ordering::SeqCst);
    KEY_COUNT.store(0, Ordering::SeqCst);
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
    // The key file's text (the keys in hex) is watched as well.
    let hex: [u8; 32] = std::array::from_fn(|i| b"a7"[i % 2] ^ mask(i));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.keys");
    let n = leaks_of(&[hex], || {
        let ring = KeyRing::new(1, [MARK; 32]).rotate(2, [MARK; 32]).unwrap();
        let text = ring.to_file_string();
        let parsed = KeyRing::parse(&text).unwrap();
        ring.write_file(&path).unwrap();
        let read = KeyRing::from_file(&path).unwrap();
        drop((ring, text, parsed, read));
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

#[test]
fn the_watch_sees_an_unwiped_copy_of_half_a_registered_key() {
    let key: [u8; 32] = std::array::from_fn(|i| (i as u8) ^ 0x99);
    let masked: [u8; 32] = std::array::from_fn(|i| key[i] ^ mask(i));
    let n = leaks_of(&[masked], || {
        drop(std::hint::black_box(key[16..].to_vec()));
    });
    assert_eq!(n, 1);
}

/// The (AES, HMAC) ticket keys `src/tickets.rs` derives for `(id, epoch)` from `secret`
/// (HKDF-SHA256, its label), masked.
fn ticket_keys(secret: &[u8; 32], id: u32, epoch: u64) -> [[u8; 32]; 2] {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"openssl-session-cache ticket key v1"), secret);
    let mut info = [0u8; 12];
    info[..4].copy_from_slice(&id.to_be_bytes());
    info[4..].copy_from_slice(&epoch.to_be_bytes());
    let mut okm = zeroize::Zeroizing::new([0u8; 68]);
    hk.expand(&info, &mut okm[..]).unwrap();
    [4, 36].map(|at| std::array::from_fn(|i| okm[at + i] ^ mask(i)))
}

/// Tickets sealed in epoch E and, past E's window, in E + 3 (erasing E's keys), the ring then
/// replaced (erasing E + 3's), everything dropped: no freed block held a derived key.
#[test]
fn derived_ticket_keys_are_wiped_when_erased_and_dropped() {
    use support::{client_ctx, connect, server_builder, Ctx, Proto, ServerClose};
    let secret = [0x3c; 32];
    let hour = Duration::from_secs(3600);
    let epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 3600;
    let [a, b] = ticket_keys(&secret, 7, epoch);
    let [c, d] = ticket_keys(&secret, 7, epoch + 3);
    let client = client_ctx(Proto::Tls12, false);
    let mut seen = None;
    let n = leaks_of(&[a, b, c, d], || {
        let clock = Arc::new(ManualClock::new(
            UNIX_EPOCH + Duration::from_secs(epoch * 3600),
        ));
        let keys = TicketKeys::builder(KeyRing::new(7, secret))
            .period(hour)
            .accept_for(2 * hour)
            .clock(clock.clone())
            .build()
            .unwrap();
        let cache = SessionCache::builder()
            .ticket_keys(keys.clone())
            .build()
            .unwrap();
        let mut builder = server_builder(Proto::Tls12, false);
        cache.install(&mut builder).unwrap();
        let server = Ctx {
            ctx: builder.build(),
            proto: Proto::Tls12,
        };
        let first = connect(&server, &client, None, ServerClose::Clean);
        // The ticket resumes (its key derived once and kept).
        assert!(
            connect(&server, &client, first.session.as_ref(), ServerClose::Clean).server_reused
        );
        clock.set(UNIX_EPOCH + Duration::from_secs((epoch + 3) * 3600));
        connect(&server, &client, None, ServerClose::Clean);
        keys.replace_ring(KeyRing::new(8, [0x4d; 32]));
        connect(&server, &client, None, ServerClose::Clean);
        seen = Some(keys.stats());
        drop((server, cache, keys));
    });
    let s = seen.unwrap();
    assert_eq!((s.issued, s.resumed, s.erased), (3, 1, 2), "{s:?}");
    assert_eq!(n, 0, "freed blocks still held derived ticket keys");
}

#[test]
fn session_bytes_through_the_envelope_and_snapshots_are_wiped() {
    let ring = KeyRing::new(1, [0x11; 32]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions.snap");
    let id = |i: u8| SessionId::new(&[i; 32]).unwrap();
    let n = leaks(|| {
        // Sealed and opened directly, whole and as raw plaintext.
        let sealed = ring
            .seal_session(&id(1), &StoredSession::new(secret(300), later()))
            .unwrap();
        drop(ring.open_session(&id(1), &sealed).unwrap());
        let plain = zeroize::Zeroizing::new(secret(300)); // the test's own copy, wiped
        let raw = ring.seal(&id(2), &plain).unwrap();
        drop(plain);
        drop(ring.open(&id(2), &raw).unwrap());
        // A snapshot saved and loaded, with sessions that expire before the load.
        let store = MemoryStore::builder().build().unwrap();
        let now = SystemTime::now();
        for i in 0..10 {
            let expires = now + Duration::from_secs(if i % 2 == 0 { 60 } else { 600 });
            store
                .put(id(i), StoredSession::new(secret(200), expires))
                .unwrap();
        }
        let saved = openssl_session_cache::snapshot::save_snapshot(&store, &path, &ring, now);
        assert_eq!(saved.unwrap(), 10);
        drop(store);
        let loaded = MemoryStore::builder().build().unwrap();
        let at = now + Duration::from_secs(120);
        let n = openssl_session_cache::snapshot::load_snapshot(&loaded, &path, &ring, at);
        assert_eq!(n.unwrap(), 5);
        // Loaded again over the same ids: every loaded session replaces one.
        openssl_session_cache::snapshot::load_snapshot(&loaded, &path, &ring, at).unwrap();
        loaded.clear().unwrap();
    });
    assert_eq!(n, 0, "freed blocks still held session bytes");
}

/// The Redis store (sealed, the default): its tier, its write-behind queue (a pending put
/// replaced by a later one of the same id while the writer waits on a hung Redis, writes
/// done), lookups answered from Redis through the envelope, takes, removals, everything
/// dropped.
#[cfg(feature = "redis")]
#[test]
fn the_redis_store_wipes_what_leaves_its_tier_and_its_queue() {
    use openssl_session_cache::{LookupDone, LookupMode, RedisStore};
    let mut server = redis_server::RedisServer::start();
    let id = |i: u8| SessionId::new(&[i; 32]).unwrap();
    let mut coalesced = 0;
    let n = leaks(|| {
        let s = RedisStore::builder(server.url())
            .key_ring(KeyRing::new(1, [0x22; 32]))
            .tier(
                MemoryStore::builder()
                    .max_entries(4)
                    .shards(1)
                    .build()
                    .unwrap(),
            )
            .op_timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        for i in 0..8 {
            s.put(id(i), StoredSession::new(secret(150), later()))
                .unwrap();
        }
        redis_server::flush(&s);
        // Redis hung: the writer holds one batch in flight, and a put of the same id as a
        // pending one replaces it in the queue.
        server.pause();
        s.put(id(20), StoredSession::new(secret(150), later()))
            .unwrap();
        redis_server::wait_until("the writer took the batch", || {
            s.stats().write_queue_len == 0
        });
        for _ in 0..2 {
            s.put(id(21), StoredSession::new(secret(150), later()))
                .unwrap();
        }
        coalesced = s.stats().writes_coalesced;
        server.resume();
        redis_server::flush(&s);
        // Ids 0..4 left the tier: these come from Redis, through the envelope.
        drop(s.get(&id(0)).unwrap().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        s.lookup(
            id(1),
            LookupMode::Get,
            LookupDone::new(move |r| tx.send(r).unwrap()),
        );
        drop(
            rx.recv_timeout(redis_server::PATIENCE)
                .unwrap()
                .unwrap()
                .unwrap(),
        );
        drop(s.take(&id(2)).unwrap().unwrap());
        // From the tier, taken and removed.
        drop(s.get(&id(21)).unwrap().unwrap());
        drop(s.take(&id(7)).unwrap().unwrap());
        s.remove(&id(5)).unwrap();
        redis_server::flush(&s);
        s.clear().unwrap();
        drop(s);
    });
    assert_eq!(coalesced, 1, "a pending put was replaced in the queue");
    assert_eq!(n, 0, "freed blocks still held session bytes");
}
