//! Memory per established, idle DTLS peer on the server side (issue 10), in one process and with
//! no socket: an [`Endpoint`] and N in-memory DTLS 1.2 clients ([`DatagramPipe`]s). Each client
//! does the cookie exchange and a full handshake (or, with `--resume`, an abbreviated one),
//! sends one 32-byte record that the application answers (`--exchange false`: none), and is then
//! freed: a client that went quiet is still an idle peer to the server, which holds all N.
//!
//! What is counted, per peer (the difference between before the first and after the last
//! handshake, divided by N):
//! * **heap**: every byte the server side asked for and still holds. Rust's allocations go
//!   through a counting global allocator, OpenSSL's through counting `CRYPTO_set_mem_functions`
//!   hooks; an allocation is the server's when it was made while the endpoint (or the
//!   application answering its events) ran, the clients' are counted apart. OpenSSL's bytes are
//!   also given by allocation site (`file:line` of the `OPENSSL_malloc` call, `--sites`).
//! * **malloc**: glibc's in-use bytes (`mallinfo2`: chunk headers and rounding included) and
//!   **RSS** (`/proc/self/statm`). Both are honest only with `IDLE_MEM_PLAIN=1`, which turns the
//!   counting (and its 16-byte header per block) off.
//!
//! The session cache is kept small (`--store-entries`, default 64) so that the sessions it holds
//! stay out of the figure: a session cache's bytes per session are measured apart (BENCHMARKS.md,
//! "Memory per cached server session"). `--trace` prints the backtraces of what the handling of
//! the last peer left allocated, grouped by call site.
//!
//! ```text
//! cargo run --release --example idle_peer_memory -- --peers 2000,20000 --sites
//! IDLE_MEM_PLAIN=1 cargo run --release --example idle_peer_memory -- --peers 2000,20000
//! cargo run --release --example idle_peer_memory -- --peers 2000 --resume
//! IDLE_MEM_PLAIN=1 cargo run --release --example idle_peer_memory -- --echo-rounds 20000
//! ```
#![allow(unsafe_code, missing_docs)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicIsize, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Parser;
use openssl::ssl::{
    ErrorCode, ShutdownState, Ssl, SslContext, SslMethod, SslMode, SslOptions, SslSession,
    SslSessionCacheMode, SslStream, SslVerifyMode,
};
use openssl_session_cache::dsm::DsmConfig;
use openssl_session_cache::{DatagramPipe, Endpoint, Event, ServerConfig, SessionCache};

// ------------------------------------------------------------------ counting allocators

const OTHER: usize = 0;
const SERVER: usize = 1;

static LIVE: [AtomicIsize; 2] = [AtomicIsize::new(0), AtomicIsize::new(0)];
static BLOCKS: [AtomicIsize; 2] = [AtomicIsize::new(0), AtomicIsize::new(0)];
/// 0: undecided, 1: counting, 2: plain (`IDLE_MEM_PLAIN` set: no header, nothing counted).
static MODE: AtomicU8 = AtomicU8::new(0);

thread_local! {
    static PHASE: Cell<usize> = const { Cell::new(OTHER) };
    static IN_TRACE: Cell<bool> = const { Cell::new(false) };
    static TRACING: Cell<bool> = const { Cell::new(false) };
}

fn counting() -> bool {
    match MODE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            // SAFETY: getenv with a NUL-terminated name; it does not allocate.
            let plain = !unsafe { libc::getenv(c"IDLE_MEM_PLAIN".as_ptr()) }.is_null();
            MODE.store(if plain { 2 } else { 1 }, Ordering::Relaxed);
            !plain
        }
    }
}

fn phase() -> usize {
    PHASE.try_with(Cell::get).unwrap_or(OTHER)
}

/// Runs `f` with the allocations it makes counted as the server's.
fn server<T>(f: impl FnOnce() -> T) -> T {
    PHASE.with(|p| p.set(SERVER));
    let r = f();
    PHASE.with(|p| p.set(OTHER));
    r
}

/// Each counted block starts with a header: its size, then its owner and OpenSSL site.
const HEADER: usize = 16;

/// # Safety
/// `at` points at HEADER writable bytes.
unsafe fn write_header(at: *mut u8, size: usize, owner: usize, site: usize) {
    // SAFETY: see the contract.
    unsafe {
        at.cast::<usize>().write(size);
        at.cast::<usize>().add(1).write(owner | (site << 8));
    }
}

/// # Safety
/// `at` points at a header written by `write_header`.
unsafe fn read_header(at: *const u8) -> (usize, usize, usize) {
    // SAFETY: see the contract.
    unsafe {
        let size = at.cast::<usize>().read();
        let tag = at.cast::<usize>().add(1).read();
        (size, tag & 0xff, tag >> 8)
    }
}

fn account(owner: usize, size: usize, site: usize, sign: isize) {
    LIVE[owner].fetch_add(sign * size as isize, Ordering::Relaxed);
    BLOCKS[owner].fetch_add(sign, Ordering::Relaxed);
    if site != 0 {
        SITES[site]
            .live
            .fetch_add(sign * size as isize, Ordering::Relaxed);
        SITES[site].blocks.fetch_add(sign, Ordering::Relaxed);
    }
}

struct Counting;

fn header_for(layout: Layout) -> usize {
    HEADER.max(layout.align())
}

fn full_layout(layout: Layout, size: usize) -> Option<Layout> {
    Layout::from_size_align(size + header_for(layout), layout.align().max(16)).ok()
}

// SAFETY: in counting mode (decided once, before the first block) every block is the system
// allocator's with `header_for(layout)` bytes before what the caller gets, the last HEADER of
// them holding the header; in plain mode every call is forwarded unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !counting() {
            // SAFETY: forwarded unchanged.
            return unsafe { System.alloc(layout) };
        }
        let Some(full) = full_layout(layout, layout.size()) else {
            return std::ptr::null_mut();
        };
        // SAFETY: a non-zero size.
        let base = unsafe { System.alloc(full) };
        if base.is_null() {
            return base;
        }
        let h = header_for(layout);
        let owner = phase();
        // SAFETY: the header lies within the block, just before the caller's part.
        let user = unsafe {
            write_header(base.add(h - HEADER), layout.size(), owner, 0);
            base.add(h)
        };
        account(owner, layout.size(), 0, 1);
        trace_alloc(user as usize, layout.size(), owner, 0);
        user
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !counting() {
            // SAFETY: forwarded unchanged.
            return unsafe { System.dealloc(ptr, layout) };
        }
        let h = header_for(layout);
        // SAFETY: ptr came from alloc/realloc with this layout, so the header precedes it.
        unsafe {
            let (size, owner, site) = read_header(ptr.sub(HEADER));
            account(owner, size, site, -1);
            trace_free(ptr as usize);
            let full = full_layout(layout, layout.size()).unwrap_unchecked();
            System.dealloc(ptr.sub(h), full);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !counting() {
            // SAFETY: forwarded unchanged.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        let h = header_for(layout);
        // SAFETY: as dealloc; System.realloc keeps the header bytes, which are rewritten.
        unsafe {
            let (size, owner, site) = read_header(ptr.sub(HEADER));
            let full = full_layout(layout, layout.size()).unwrap_unchecked();
            let base = System.realloc(ptr.sub(h), full, new_size + h);
            if base.is_null() {
                return base;
            }
            account(owner, size, site, -1);
            trace_free(ptr as usize);
            // The block now belongs to whoever grew it.
            let owner = phase();
            write_header(base.add(h - HEADER), new_size, owner, 0);
            account(owner, new_size, 0, 1);
            let user = base.add(h);
            trace_alloc(user as usize, new_size, owner, 0);
            user
        }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// OpenSSL's blocks, by allocation site (`file:line` handed to CRYPTO_malloc).

struct Site {
    file: AtomicUsize,
    line: AtomicUsize,
    live: AtomicIsize,
    blocks: AtomicIsize,
}

const NSITES: usize = 4096;
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SITE: Site = Site {
    file: AtomicUsize::new(0),
    line: AtomicUsize::new(0),
    live: AtomicIsize::new(0),
    blocks: AtomicIsize::new(0),
};
static SITES: [Site; NSITES] = [EMPTY_SITE; NSITES];
/// Serialises the claiming of site slots (the session cache's purge thread allocates too).
static SITE_LOCK: Mutex<()> = Mutex::new(());

/// The slot of `file:line` (slot 0: none, or the table is full).
fn site(file: *const c_char, line: c_int) -> usize {
    let (f, l) = (file as usize, line as usize);
    let start = (f.wrapping_mul(31) ^ l.wrapping_mul(0x9e37_79b9)) % (NSITES - 1) + 1;
    let mut i = start;
    for _ in 0..NSITES {
        let s = &SITES[i];
        let cur = s.file.load(Ordering::Acquire);
        if cur == f && s.line.load(Ordering::Relaxed) == l {
            return i;
        }
        if cur == 0 {
            let _g = SITE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            if s.file.load(Ordering::Acquire) == 0 {
                s.line.store(l, Ordering::Relaxed);
                s.file.store(f, Ordering::Release);
                return i;
            }
            continue;
        }
        i = i % (NSITES - 1) + 1;
    }
    0
}

fn site_name(i: usize) -> String {
    let f = SITES[i].file.load(Ordering::Relaxed);
    if f == 0 {
        return "?".into();
    }
    // SAFETY: OpenSSL passes OPENSSL_FILE, a static NUL-terminated string.
    let name = unsafe { CStr::from_ptr(f as *const c_char) }.to_string_lossy();
    let name = name.trim_start_matches("../").trim_start_matches("./");
    format!("{name}:{}", SITES[i].line.load(Ordering::Relaxed))
}

extern "C" {
    fn CRYPTO_set_mem_functions(
        m: unsafe extern "C" fn(usize, *const c_char, c_int) -> *mut c_void,
        r: unsafe extern "C" fn(*mut c_void, usize, *const c_char, c_int) -> *mut c_void,
        f: unsafe extern "C" fn(*mut c_void, *const c_char, c_int),
    ) -> c_int;
}

unsafe extern "C" fn ossl_malloc(num: usize, file: *const c_char, line: c_int) -> *mut c_void {
    // SAFETY: a plain malloc of the size plus the header.
    let base = unsafe { libc::malloc(num + HEADER) }.cast::<u8>();
    if base.is_null() {
        return base.cast();
    }
    let owner = phase();
    let s = if owner == SERVER { site(file, line) } else { 0 };
    // SAFETY: base points at num + HEADER bytes.
    let user = unsafe {
        write_header(base, num, owner, s);
        base.add(HEADER)
    };
    account(owner, num, s, 1);
    trace_alloc(user as usize, num, owner, s);
    user.cast()
}

unsafe extern "C" fn ossl_free(ptr: *mut c_void, _: *const c_char, _: c_int) {
    if ptr.is_null() {
        return;
    }
    // SAFETY: ptr came from ossl_malloc/ossl_realloc: the header is HEADER bytes before it.
    unsafe {
        let base = ptr.cast::<u8>().sub(HEADER);
        let (size, owner, s) = read_header(base);
        account(owner, size, s, -1);
        trace_free(ptr as usize);
        libc::free(base.cast());
    }
}

unsafe extern "C" fn ossl_realloc(
    ptr: *mut c_void,
    num: usize,
    file: *const c_char,
    line: c_int,
) -> *mut c_void {
    if ptr.is_null() {
        // SAFETY: as ossl_malloc.
        return unsafe { ossl_malloc(num, file, line) };
    }
    if num == 0 {
        // SAFETY: as ossl_free.
        unsafe { ossl_free(ptr, file, line) };
        return std::ptr::null_mut();
    }
    // SAFETY: ptr came from ossl_malloc/ossl_realloc; the header precedes it.
    unsafe {
        let base = ptr.cast::<u8>().sub(HEADER);
        let (size, owner, s) = read_header(base);
        let grown = libc::realloc(base.cast(), num + HEADER).cast::<u8>();
        if grown.is_null() {
            return grown.cast();
        }
        account(owner, size, s, -1);
        trace_free(ptr as usize);
        let owner = phase();
        let s = if owner == SERVER { site(file, line) } else { 0 };
        write_header(grown, num, owner, s);
        account(owner, num, s, 1);
        let user = grown.add(HEADER);
        trace_alloc(user as usize, num, owner, s);
        user.cast()
    }
}

// Backtraces of the server's allocations while TRACING is set.

struct Traced {
    size: usize,
    site: usize,
    bt: std::backtrace::Backtrace,
}

static TRACED: Mutex<Option<HashMap<usize, Traced>>> = Mutex::new(None);

fn trace_alloc(ptr: usize, size: usize, owner: usize, site: usize) {
    if owner != SERVER || !TRACING.try_with(Cell::get).unwrap_or(false) {
        return;
    }
    if IN_TRACE.try_with(|h| h.replace(true)).unwrap_or(true) {
        return;
    }
    // What this allocates is counted as OTHER.
    PHASE.with(|p| p.set(OTHER));
    let bt = std::backtrace::Backtrace::force_capture();
    TRACED
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(ptr, Traced { size, site, bt });
    PHASE.with(|p| p.set(SERVER));
    IN_TRACE.with(|h| h.set(false));
}

fn trace_free(ptr: usize) {
    if IN_TRACE.try_with(|h| h.replace(true)).unwrap_or(true) {
        return;
    }
    let removed = TRACED
        .try_lock()
        .ok()
        .and_then(|mut t| t.as_mut().and_then(|m| m.remove(&ptr)));
    let phase = phase();
    PHASE.with(|p| p.set(OTHER));
    drop(removed);
    PHASE.with(|p| p.set(phase));
    IN_TRACE.with(|h| h.set(false));
}

fn live(owner: usize) -> isize {
    LIVE[owner].load(Ordering::Relaxed)
}

fn blocks(owner: usize) -> isize {
    BLOCKS[owner].load(Ordering::Relaxed)
}

fn site_snapshot() -> Vec<(isize, isize)> {
    SITES
        .iter()
        .map(|s| {
            (
                s.live.load(Ordering::Relaxed),
                s.blocks.load(Ordering::Relaxed),
            )
        })
        .collect()
}

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize
}

fn malloc_in_use() -> usize {
    // SAFETY: mallinfo2 has no preconditions.
    let m = unsafe { libc::mallinfo2() };
    m.uordblks + m.hblkhd
}

// ------------------------------------------------------------------ the measurement

/// Memory per established idle DTLS peer, in process.
#[derive(Debug, Parser)]
struct Args {
    /// Numbers of idle peers, each measured in a fresh endpoint.
    #[arg(long, value_delimiter = ',', default_value = "2000")]
    peers: Vec<usize>,
    /// Resume one session on every peer (abbreviated handshakes) instead of full handshakes.
    #[arg(long)]
    resume: bool,
    /// One 32-byte record each way after the handshake (a device's first report).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    exchange: bool,
    /// Session store and decoded-session entries (small, so the cache's share stays out of
    /// the per-peer figure).
    #[arg(long, default_value_t = 64)]
    store_entries: usize,
    /// Set `SSL_MODE_RELEASE_BUFFERS` on the server's context.
    #[arg(long)]
    release_buffers_mode: bool,
    /// Print OpenSSL's live bytes per peer by allocation site (last N only).
    #[arg(long)]
    sites: bool,
    /// Print the backtraces of what the handling of the last peer left allocated.
    #[arg(long)]
    trace: bool,
    /// After the last measurement, time this many 32-byte round trips (a record in, the
    /// application's answer out) on one more peer, the server side only; best of 5.
    #[arg(long, default_value_t = 0)]
    echo_rounds: usize,
}

struct Client {
    stream: SslStream<DatagramPipe>,
    established: bool,
    got: usize,
}

impl Client {
    fn new(ctx: &SslContext, session: Option<&SslSession>) -> Self {
        let mut ssl = Ssl::new(ctx).unwrap();
        ssl.set_mtu(1400).unwrap();
        ssl.set_connect_state();
        if let Some(s) = session {
            // SAFETY: the session came from a connection of this same client context.
            unsafe { ssl.set_session(s).unwrap() };
        }
        Self {
            stream: SslStream::new(ssl, DatagramPipe::new()).unwrap(),
            established: false,
            got: 0,
        }
    }

    fn drive(&mut self) -> Vec<Vec<u8>> {
        if !self.established {
            match self.stream.do_handshake() {
                Ok(()) => self.established = true,
                Err(e) if e.code() == ErrorCode::WANT_READ => {}
                Err(e) => panic!("client handshake: {e}"),
            }
        }
        if self.established {
            let mut buf = [0u8; 2048];
            loop {
                match self.stream.ssl_read(&mut buf) {
                    Ok(n) => self.got += n,
                    Err(e) if e.code() == ErrorCode::WANT_READ => break,
                    Err(e) => panic!("client read: {e}"),
                }
            }
        }
        self.stream.get_mut().take_outbound()
    }
}

/// Moves datagrams between `client` and the endpoint until neither sends; the application
/// answers each record with the same bytes.
fn pump(ep: &mut Endpoint, client: &mut Client, from: SocketAddr, now: Instant) {
    let mut out = client.drive();
    for _ in 0..30 {
        let inbound = server(|| {
            for d in out.drain(..) {
                ep.handle(now, from, &d);
            }
            while let Some(e) = ep.poll_event() {
                match e {
                    Event::Data { peer, data } => ep.send(peer, &data).unwrap(),
                    Event::Closed { peer, reason } => panic!("{peer} closed: {reason:?}"),
                    _ => {}
                }
            }
            std::iter::from_fn(|| ep.poll_transmit()).collect::<Vec<_>>()
        });
        let any = !inbound.is_empty();
        for t in inbound {
            assert_eq!(t.to, from);
            client.stream.get_mut().push(t.payload);
        }
        out = client.drive();
        if !any && out.is_empty() {
            return;
        }
    }
    panic!("{from} did not settle");
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 5684))
}

fn client_ctx() -> SslContext {
    let mut b = SslContext::builder(SslMethod::dtls_client()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    b.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    b.build()
}

struct Figures {
    heap: f64,
    openssl: f64,
    blocks: f64,
    malloc: f64,
    rss: f64,
    secs: f64,
}

fn measure(args: &Args, n: usize, last: bool) -> Figures {
    let cctx = client_ctx();
    let mut ep = server(|| {
        let cache = SessionCache::builder()
            .max_entries(args.store_entries)
            .decoded_entries(args.store_entries)
            .build()
            .unwrap();
        let release = args.release_buffers_mode;
        let config = ServerConfig::builder(cache)
            .dsm(DsmConfig::new(n + 16))
            .configure(move |ctx| {
                if release {
                    ctx.set_mode(SslMode::RELEASE_BUFFERS);
                }
                Ok(())
            })
            .build()
            .unwrap();
        Endpoint::new(config).unwrap()
    });
    let mut now = Instant::now();
    // Warm-up on a peer that is then closed: OpenSSL's lazily built state, the session to
    // resume, the endpoint's scratch buffers.
    let session = {
        let from = SocketAddr::from(([192, 0, 2, 1], 1));
        let mut c = Client::new(&cctx, None);
        pump(&mut ep, &mut c, from, now);
        assert!(c.established);
        let s = c.stream.ssl().session().map(|s| s.to_owned());
        c.stream.set_shutdown(ShutdownState::SENT);
        server(|| {
            ep.close(from);
            while ep.poll_event().is_some() {}
            while ep.poll_transmit().is_some() {}
        });
        s
    };
    let session = session.filter(|_| args.resume);

    let (heap0, blocks0, sites0) = (live(SERVER), blocks(SERVER), site_snapshot());
    let (malloc0, rss0) = (malloc_in_use(), rss_bytes());
    let started = Instant::now();
    for i in 0..n {
        now += Duration::from_micros(1);
        let from = addr(i);
        let mut c = Client::new(&cctx, session.as_ref());
        let tracing = args.trace && last && i == n - 1;
        TRACING.with(|t| t.set(tracing));
        pump(&mut ep, &mut c, from, now);
        assert!(c.established, "peer {i} did not connect");
        if args.resume {
            assert!(c.stream.ssl().session_reused(), "peer {i} did not resume");
        }
        if args.exchange {
            c.stream.ssl_write(&[0x42; 32]).unwrap();
            pump(&mut ep, &mut c, from, now);
            assert_eq!(c.got, 32, "peer {i}: no answer");
        }
        TRACING.with(|t| t.set(false));
        // The client vanishes (its session stays resumable); the server keeps its peer.
        c.stream.set_shutdown(ShutdownState::SENT);
        drop(c);
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(ep.peer_count(), n);
    let (heap1, blocks1, sites1) = (live(SERVER), blocks(SERVER), site_snapshot());
    let (malloc1, rss1) = (malloc_in_use(), rss_bytes());
    let per = |a: isize, b: isize| (b - a) as f64 / n as f64;
    let openssl: f64 = (1..NSITES).map(|i| per(sites0[i].0, sites1[i].0)).sum();
    let f = Figures {
        heap: per(heap0, heap1),
        openssl,
        blocks: per(blocks0, blocks1),
        malloc: (malloc1 as f64 - malloc0 as f64) / n as f64,
        rss: (rss1 as f64 - rss0 as f64) / n as f64,
        secs,
    };
    if args.sites && last && counting() {
        let mut rows: Vec<(f64, f64, String)> = (1..NSITES)
            .filter_map(|i| {
                let bytes = per(sites0[i].0, sites1[i].0);
                let b = per(sites0[i].1, sites1[i].1);
                (bytes.abs() >= 1.0).then(|| (bytes, b, site_name(i)))
            })
            .collect();
        rows.sort_by(|a, b| b.0.total_cmp(&a.0));
        println!("\nOpenSSL's live bytes per idle peer by allocation site (n = {n}):");
        println!("| site | bytes/peer | blocks/peer |\n|---|---:|---:|");
        for (bytes, b, name) in rows {
            println!("| {name} | {bytes:.1} | {b:.2} |");
        }
        println!(
            "| **OpenSSL** | {openssl:.1} | |\n| **Rust** | {:.1} | |",
            f.heap - openssl
        );
    }
    if args.trace && last && counting() {
        print_traces();
    }
    if args.echo_rounds > 0 && last {
        echo_rounds(&mut ep, &cctx, args.echo_rounds, now);
    }
    drop(ep);
    f
}

/// Times `rounds` round trips of one peer among the idle ones: the server's side (handle, the
/// application's answer, poll_transmit) only; best of 5 runs.
fn echo_rounds(ep: &mut Endpoint, cctx: &SslContext, rounds: usize, now: Instant) {
    let from = SocketAddr::from(([192, 0, 2, 2], 2));
    let mut c = Client::new(cctx, None);
    pump(ep, &mut c, from, now);
    assert!(c.established);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let mut spent = Duration::ZERO;
        for _ in 0..rounds {
            c.stream.ssl_write(&[0x42; 32]).unwrap();
            let out = c.stream.get_mut().take_outbound();
            let t = Instant::now();
            let back = server(|| {
                for d in out {
                    ep.handle(now, from, &d);
                }
                while let Some(e) = ep.poll_event() {
                    if let Event::Data { peer, data } = e {
                        ep.send(peer, &data).unwrap();
                    }
                }
                std::iter::from_fn(|| ep.poll_transmit()).collect::<Vec<_>>()
            });
            spent += t.elapsed();
            for b in back {
                c.stream.get_mut().push(b.payload);
            }
            c.drive();
        }
        best = best.min(spent.as_secs_f64() / rounds as f64);
    }
    println!(
        "round trip, server side: {:.2} us (best of 5 x {rounds})",
        best * 1e6
    );
}

fn print_traces() {
    let traced = TRACED.lock().unwrap().take().unwrap_or_default();
    let mut groups: HashMap<String, (usize, usize)> = HashMap::new();
    for t in traced.values() {
        let text = format!("{}", t.bt);
        let frames: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("at "))
            .map(|l| l.split_once(": ").map_or(l, |(_, f)| f).trim())
            .filter(|f| {
                !f.contains("idle_peer_memory::")
                    && !f.starts_with("std::backtrace")
                    && !f.starts_with("alloc::")
                    && !f.starts_with("__rust")
                    && !f.starts_with("core::")
                    && !f.starts_with("hashbrown::")
                    && !f.contains("CRYPTO_")
                    && !f.contains("<unknown>")
            })
            .take(4)
            .collect();
        let key = format!(
            "{} | {}",
            if t.site != 0 {
                site_name(t.site)
            } else {
                "rust".into()
            },
            frames.join(" < ")
        );
        let e = groups.entry(key).or_default();
        e.0 += t.size;
        e.1 += 1;
    }
    let mut rows: Vec<_> = groups.into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1 .0));
    println!("\nWhat the handling of the last peer left allocated, by call site:");
    println!("| bytes | blocks | site | callers |\n|---:|---:|---|---|");
    let mut total = 0;
    for (k, (bytes, count)) in rows {
        total += bytes;
        let (site, callers) = k.split_once(" | ").unwrap();
        println!("| {bytes} | {count} | {site} | {callers} |");
    }
    println!("| {total} | | total | |");
}

fn main() {
    if counting() {
        // SAFETY: called before OpenSSL allocated anything (nothing in this process used it
        // yet); the three hooks keep malloc/realloc/free semantics.
        let ok = unsafe { CRYPTO_set_mem_functions(ossl_malloc, ossl_realloc, ossl_free) };
        assert_eq!(ok, 1, "CRYPTO_set_mem_functions refused");
    }
    let args = Args::parse();
    println!(
        "handshakes: {}; exchange: {}; store entries: {}; RELEASE_BUFFERS mode: {}; counting: {}",
        if args.resume { "resumed" } else { "full" },
        args.exchange,
        args.store_entries,
        args.release_buffers_mode,
        counting()
    );
    let mut rows = Vec::new();
    for (k, &n) in args.peers.iter().enumerate() {
        let f = measure(&args, n, k + 1 == args.peers.len());
        rows.push(if counting() {
            format!(
                "| {n} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} |",
                f.heap,
                f.openssl,
                f.heap - f.openssl,
                f.blocks,
                f.secs
            )
        } else {
            format!("| {n} | {:.0} | {:.0} | {:.1} |", f.malloc, f.rss, f.secs)
        });
    }
    if counting() {
        println!("\n| peers | heap B/peer | OpenSSL | Rust | blocks/peer | s |");
        println!("|---:|---:|---:|---:|---:|---:|");
    } else {
        println!("\n| peers | malloc in use B/peer | RSS B/peer | s |");
        println!("|---:|---:|---:|---:|");
    }
    for r in rows {
        println!("{r}");
    }
}
