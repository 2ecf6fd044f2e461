//! What one cookie-verified handshake can make the server hold is bounded: a peer that passed the
//! cookie exchange and then sends fragments claiming huge handshake messages and a stream of
//! early protected records gets no more than the handshake budget buffered, and the memory comes
//! back when the handshake slots are freed, round after round.
//!
//! The bytes live on the heap are counted exactly: Rust's allocations through a counting global
//! allocator, OpenSSL's through counting `CRYPTO_set_mem_functions` hooks installed before
//! OpenSSL allocates anything (this binary holds this one test).
#![cfg(feature = "server")]
#![allow(unsafe_code)] // the counting allocators

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::{c_char, c_int, c_void};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVerifyMode};
use openssl_session_cache::dsm::DsmConfig;
use openssl_session_cache::{DatagramPipe, Endpoint, ServerConfig, SessionCache};

static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
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
static ALLOC: Counting = Counting;

/// A 16-byte header before each OpenSSL block holds its size (and keeps the alignment).
const HEADER: usize = 16;

extern "C" {
    fn CRYPTO_set_mem_functions(
        m: unsafe extern "C" fn(usize, *const c_char, c_int) -> *mut c_void,
        r: unsafe extern "C" fn(*mut c_void, usize, *const c_char, c_int) -> *mut c_void,
        f: unsafe extern "C" fn(*mut c_void, *const c_char, c_int),
    ) -> c_int;
}

unsafe extern "C" fn ossl_malloc(num: usize, _: *const c_char, _: c_int) -> *mut c_void {
    // SAFETY: a plain malloc of the size plus the header.
    let base = unsafe { libc::malloc(num + HEADER) };
    if base.is_null() {
        return base;
    }
    // SAFETY: base points at num + HEADER bytes.
    unsafe { base.cast::<usize>().write(num) };
    LIVE.fetch_add(num as isize, Ordering::Relaxed);
    // SAFETY: within the block.
    unsafe { base.cast::<u8>().add(HEADER).cast() }
}

unsafe extern "C" fn ossl_free(ptr: *mut c_void, _: *const c_char, _: c_int) {
    if ptr.is_null() {
        return;
    }
    // SAFETY: ptr came from ossl_malloc/ossl_realloc: the header is HEADER bytes before it.
    unsafe {
        let base = ptr.cast::<u8>().sub(HEADER);
        LIVE.fetch_sub(base.cast::<usize>().read() as isize, Ordering::Relaxed);
        libc::free(base.cast());
    }
}

unsafe extern "C" fn ossl_realloc(
    ptr: *mut c_void,
    num: usize,
    f: *const c_char,
    l: c_int,
) -> *mut c_void {
    if ptr.is_null() {
        // SAFETY: as ossl_malloc.
        return unsafe { ossl_malloc(num, f, l) };
    }
    if num == 0 {
        // SAFETY: as ossl_free.
        unsafe { ossl_free(ptr, f, l) };
        return std::ptr::null_mut();
    }
    // SAFETY: ptr came from ossl_malloc/ossl_realloc; the header precedes it.
    unsafe {
        let base = ptr.cast::<u8>().sub(HEADER);
        let old = base.cast::<usize>().read();
        let grown = libc::realloc(base.cast(), num + HEADER);
        if grown.is_null() {
            return grown;
        }
        grown.cast::<usize>().write(num);
        LIVE.fetch_add(num as isize - old as isize, Ordering::Relaxed);
        grown.cast::<u8>().add(HEADER).cast()
    }
}

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const SLOTS: u16 = 128;

fn client_ctx() -> SslContext {
    let mut b = SslContext::builder(SslMethod::dtls_client()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    b.set_options(SslOptions::NO_QUERY_MTU);
    b.build()
}

/// A DTLS record of `content_type` in `epoch` with record sequence `seq`.
fn record(content_type: u8, epoch: u16, seq: u64, body: &[u8]) -> Vec<u8> {
    let mut r = vec![content_type, 0xfe, 0xfd];
    r.extend_from_slice(&epoch.to_be_bytes());
    r.extend_from_slice(&seq.to_be_bytes()[2..]);
    r.extend_from_slice(&(body.len() as u16).to_be_bytes());
    r.extend_from_slice(body);
    r
}

/// One fragment of handshake message `msg_seq` claiming `length` bytes.
fn fragment(msg_seq: u16, length: u32) -> Vec<u8> {
    let mut hs = vec![11]; // Certificate
    hs.extend_from_slice(&length.to_be_bytes()[1..]);
    hs.extend_from_slice(&msg_seq.to_be_bytes());
    hs.extend_from_slice(&[0, 0, 0]);
    hs.extend_from_slice(&100u32.to_be_bytes()[1..]);
    hs.extend(std::iter::repeat_n(0xab, 100));
    hs
}

/// A real client from `port` completes the cookie exchange (so the server makes a handshake
/// slot and an `Ssl`), then the attacker sends, from its address, 11 fragments claiming 100 KB
/// messages and 110 early protected records.
fn hostile_handshake(ep: &mut Endpoint, ctx: &SslContext, port: u16, now: Instant, hostile: bool) {
    let from: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut ssl = Ssl::new(ctx).unwrap();
    ssl.set_mtu(1400).unwrap();
    ssl.set_connect_state();
    let mut client = SslStream::new(ssl, DatagramPipe::new()).unwrap();
    for _ in 0..2 {
        match client.do_handshake() {
            Err(e) if e.code() == ErrorCode::WANT_READ => {}
            other => panic!("{other:?}"),
        }
        for d in client.get_mut().take_outbound() {
            ep.handle(now, from, &d);
        }
        while let Some(t) = ep.poll_transmit() {
            client.get_mut().push(t.payload);
        }
    }
    if !hostile {
        while ep.poll_transmit().is_some() {}
        return;
    }
    for i in 0..11u16 {
        ep.handle(
            now,
            from,
            &record(22, 0, 100 + u64::from(i), &fragment(2 + i, 100_000)),
        );
    }
    for i in 0..110u64 {
        ep.handle(now, from, &record(23, 1, i, &[0x5a; 64]));
    }
    while ep.poll_transmit().is_some() {}
}

fn endpoint() -> Endpoint {
    let cache = SessionCache::builder().build().unwrap();
    let dsm = DsmConfig::new(4 * usize::from(SLOTS))
        .with_max_handshakes(usize::from(SLOTS))
        .with_handshake_timeout(Duration::from_secs(10));
    Endpoint::new(ServerConfig::builder(cache).dsm(dsm).build().unwrap()).unwrap()
}

/// Runs one round of `SLOTS` half-open handshakes (hostile or not) starting at `start`, then
/// lets them time out; returns the heap bytes per slot while they were held.
fn round(ep: &mut Endpoint, ctx: &SslContext, start: Instant, hostile: bool) -> isize {
    let before = live();
    for port in 0..SLOTS {
        hostile_handshake(ep, ctx, 10_000 + port, start, hostile);
    }
    assert_eq!(ep.peer_count(), usize::from(SLOTS));
    let per_slot = (live() - before) / SLOTS as isize;
    ep.handle_timeout(start + Duration::from_secs(11));
    assert_eq!(ep.peer_count(), 0);
    while ep.poll_event().is_some() {}
    while ep.poll_transmit().is_some() {}
    per_slot
}

#[test]
fn a_hostile_handshake_is_held_to_its_budget_and_its_memory_comes_back() {
    // SAFETY: the hooks are valid for the whole process; OpenSSL has not allocated yet in this
    // binary (no other test; nothing before this line touches OpenSSL).
    let hooked = unsafe { CRYPTO_set_mem_functions(ossl_malloc, ossl_realloc, ossl_free) };
    assert_eq!(
        hooked, 1,
        "OpenSSL allocated before the hooks could be installed"
    );
    let ctx = client_ctx();
    let mut ep = endpoint();
    let t0 = Instant::now();
    let at = |n: u64| t0 + Duration::from_secs(20 * n);
    // Warm-up rounds: one-time allocations (tables, OpenSSL's lazy state, map capacity).
    round(&mut ep, &ctx, at(0), true);
    round(&mut ep, &ctx, at(1), false);
    let baseline = live();
    let mut figures = Vec::new();
    for n in 0..4u64 {
        let plain = round(&mut ep, &ctx, at(2 + 2 * n), false);
        let hostile = round(&mut ep, &ctx, at(3 + 2 * n), true);
        let extra = hostile - plain;
        figures.push((plain, hostile));
        // What the hostile records made OpenSSL buffer, beyond an honest half-open handshake.
        assert!(
            extra <= 64 * 1024 + 4096,
            "round {n}: a hostile handshake held {extra} bytes more than an honest one"
        );
        // Round after round, the memory comes back.
        let drift = live() - baseline;
        assert!(
            drift.abs() < 64 * 1024,
            "round {n}: {drift} bytes not given back"
        );
    }
    assert!(ep.stats().dropped_over_budget > 0);
    eprintln!(
        "per slot (honest, hostile): {figures:?}; live drift {}",
        live() - baseline
    );
}
