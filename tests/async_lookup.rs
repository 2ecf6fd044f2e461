//! Session lookups on a remote store never hold up the handshake thread: the ClientHello callback
//! starts them and suspends the handshake (`WANT_CLIENT_HELLO_CB`), the application waits on a
//! `PendingLookup` and drives the handshake again. Real OpenSSL handshakes, TLS 1.2, TLS 1.3 and
//! DTLS 1.2, over non-blocking sockets.

mod support;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Wake, Waker};
use std::thread;

use openssl::ssl::{ErrorCode, Ssl, SslSession, SslStream};
use openssl_session_cache::{
    CacheStats, LookupDone, LookupMode, MemoryStore, PendingLookup, SessionCache, SessionId,
    SessionStore, StoreError, StoredSession,
};
use support::{client_ctx, server_ctx, Ctx, Proto};

/// A remote store stand-in: sessions live in a memory store, but every lookup waits in a queue
/// until the test answers it (`release`), from any thread, like a store whose network round
/// trip is in flight. `get` and `take` count their calls: the cache must never make them.
#[derive(Debug, Default)]
struct HeldStore {
    inner: MemoryStoreCell,
    held: Mutex<VecDeque<(SessionId, LookupMode, LookupDone)>>,
    blocking_calls: AtomicUsize,
    /// Answer lookups at once (a tier hit) instead of holding them.
    answer_at_once: std::sync::atomic::AtomicBool,
    fail: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct MemoryStoreCell(MemoryStore);

impl Default for MemoryStoreCell {
    fn default() -> Self {
        Self(MemoryStore::builder().build().unwrap())
    }
}

impl HeldStore {
    fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// Answers every held lookup from the memory store (or with an error).
    fn release(&self) -> usize {
        let held: Vec<_> = self.held.lock().unwrap().drain(..).collect();
        let n = held.len();
        for (id, mode, done) in held {
            done.complete(self.answer(id, mode));
        }
        n
    }

    fn answer(&self, id: SessionId, mode: LookupMode) -> Result<Option<StoredSession>, StoreError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Timeout);
        }
        match mode {
            LookupMode::Get => self.inner.0.get(&id),
            LookupMode::Take => self.inner.0.take(&id),
        }
    }
}

impl SessionStore for HeldStore {
    fn get(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        self.blocking_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.0.get(id)
    }
    fn put(&self, id: SessionId, session: StoredSession) -> Result<(), StoreError> {
        self.inner.0.put(id, session)
    }
    fn take(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        self.blocking_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.0.take(id)
    }
    fn remove(&self, id: &SessionId) -> Result<bool, StoreError> {
        self.inner.0.remove(id)
    }
    fn lookup(&self, id: SessionId, mode: LookupMode, done: LookupDone) {
        if self.answer_at_once.load(Ordering::SeqCst) {
            return done.complete(self.answer(id, mode));
        }
        self.held.lock().unwrap().push_back((id, mode, done));
    }
    fn is_remote(&self) -> bool {
        true
    }
}

/// A waker that counts its wakes.
#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Waits until `fd` is readable; fails the test if nothing arrives within the harness's
/// patience (a poll that timed out is not progress: the client hung or died).
fn wait_readable(fd: i32) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let limit = i32::try_from(support::IO_PATIENCE.as_millis()).unwrap();
    // SAFETY: one valid pollfd for the duration of the call.
    #[allow(unsafe_code)]
    let r = unsafe { libc::poll(&mut p, 1, limit) };
    assert!(r >= 0, "poll failed: {}", io::Error::last_os_error());
    assert!(
        r > 0,
        "the server side waited {:?} for the client's next bytes: the client hung or died",
        support::IO_PATIENCE
    );
}

/// One datagram per read/write on a non-blocking Unix datagram socket.
#[derive(Debug)]
struct Dgram(UnixDatagram);

impl Read for Dgram {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
}

impl Write for Dgram {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the server side of one connection saw.
#[derive(Debug, Default)]
struct Seen {
    suspensions: usize,
    wakes: usize,
    resumed: bool,
}

/// How the server reacts to a suspended handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnSuspend {
    /// Answer the lookup from another thread and wait for the waker.
    Release,
    /// Give up waiting.
    Abandon,
}

/// Drives a server handshake on a non-blocking stream to the end, handling suspensions.
fn serve<S: Read + Write>(
    stream: &mut SslStream<S>,
    fd: i32,
    store: &Arc<HeldStore>,
    on_suspend: OnSuspend,
) -> Seen {
    let mut seen = Seen::default();
    loop {
        match stream.do_handshake() {
            Ok(()) => break,
            Err(e) if e.code() == ErrorCode::WANT_READ => wait_readable(fd),
            Err(e) if e.code() == ErrorCode::WANT_CLIENT_HELLO_CB => {
                seen.suspensions += 1;
                let lookup: PendingLookup = SessionCache::pending_lookup(stream.ssl())
                    .expect("a suspended handshake has a pending lookup");
                assert!(!lookup.is_complete());
                let waker = Arc::new(CountingWaker::default());
                lookup.register(&Waker::from(waker.clone()));
                // While the lookup is held, driving again does not get past it.
                assert_eq!(
                    stream.do_handshake().unwrap_err().code(),
                    ErrorCode::WANT_CLIENT_HELLO_CB
                );
                match on_suspend {
                    OnSuspend::Release => {
                        let s = Arc::clone(store);
                        thread::spawn(move || s.release()).join().unwrap();
                    }
                    OnSuspend::Abandon => assert!(lookup.abandon()),
                }
                assert!(lookup.is_complete());
                seen.wakes += waker.0.load(Ordering::SeqCst);
                assert!(SessionCache::pending_lookup(stream.ssl()).is_none());
            }
            Err(e) => panic!("server handshake: {e}"),
        }
    }
    seen.resumed = stream.ssl().session_reused();
    let mut buf = [0u8; 4];
    loop {
        match stream.ssl_read(&mut buf) {
            Ok(_) => break,
            Err(e) if e.code() == ErrorCode::WANT_READ => wait_readable(fd),
            Err(e) => panic!("server read: {e}"),
        }
    }
    stream.ssl_write(&buf).unwrap();
    loop {
        match stream.ssl_read(&mut buf) {
            Err(e) if e.code() == ErrorCode::WANT_READ => wait_readable(fd),
            _ => break,
        }
    }
    let _ = stream.shutdown();
    seen
}

/// One connection: a blocking client on a thread, the non-blocking server here.
fn connect(
    server: &Ctx,
    client: &Ctx,
    store: &Arc<HeldStore>,
    offer: Option<&SslSession>,
    on_suspend: OnSuspend,
) -> (Seen, Option<SslSession>) {
    let client_ctx = client.ctx.clone();
    let offer = offer.cloned();
    let dtls = client.proto == Proto::Dtls12;
    let client_side = move |io: Box<dyn ReadWrite>| {
        let mut ssl = Ssl::new(&client_ctx).unwrap();
        if dtls {
            ssl.set_mtu(1400).unwrap();
        }
        if let Some(s) = &offer {
            // SAFETY: the test client contexts keep no internal session cache.
            #[allow(unsafe_code)]
            unsafe {
                ssl.set_session(s).unwrap()
            };
        }
        let mut c = ssl.connect(io).expect("client handshake");
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).unwrap();
        let session = c.ssl().session().map(|s| s.to_owned());
        let _ = c.shutdown();
        session
    };
    let mut ssl = Ssl::new(&server.ctx).unwrap();
    ssl.set_accept_state();
    if dtls {
        ssl.set_mtu(1400).unwrap();
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let fd = a.as_raw_fd();
        let client =
            thread::spawn(move || client_side(Box::new(support::Bounded::datagram(b, "client"))));
        let mut stream = SslStream::new(ssl, Dgram(a)).unwrap();
        let seen = serve(&mut stream, fd, store, on_suspend);
        (seen, client.join().unwrap())
    } else {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let fd = a.as_raw_fd();
        let client =
            thread::spawn(move || client_side(Box::new(support::Bounded::stream(b, "client"))));
        let mut stream = SslStream::new(ssl, a).unwrap();
        let seen = serve(&mut stream, fd, store, on_suspend);
        (seen, client.join().unwrap())
    }
}

trait ReadWrite: Read + Write + Send + std::fmt::Debug {}
impl<T: Read + Write + Send + std::fmt::Debug> ReadWrite for T {}

fn setup(proto: Proto, single_use: bool) -> (Arc<HeldStore>, SessionCache, Ctx, Ctx) {
    let store = Arc::new(HeldStore::default());
    let cache = SessionCache::builder()
        .store(store.clone())
        .single_use(single_use)
        .build()
        .unwrap();
    let server = server_ctx(proto, &cache, false);
    let client = client_ctx(proto, false);
    (store, cache, server, client)
}

fn lookup_counts(s: &CacheStats) -> (u64, u64, u64, u64) {
    (s.lookups, s.suspended, s.hits, s.misses)
}

/// Full handshake (nothing offered: no lookup), then a resumption that suspends, is released
/// from another thread, wakes the waker once and resumes.
fn suspended_lookup_resumes(proto: Proto) {
    let (store, cache, server, client) = setup(proto, false);
    let (seen, session) = connect(&server, &client, &store, None, OnSuspend::Release);
    assert_eq!((seen.suspensions, seen.resumed), (0, false), "{proto:?}");
    let first = cache.stats();
    // TLS 1.3 clients offer a random legacy session id: it must not be looked up.
    assert_eq!(lookup_counts(&first), (0, 0, 0, 0), "{proto:?}: {first:?}");

    let (seen, _) = connect(
        &server,
        &client,
        &store,
        session.as_ref(),
        OnSuspend::Release,
    );
    assert_eq!(seen.suspensions, 1, "{proto:?}");
    assert_eq!(seen.wakes, 1, "{proto:?}");
    assert!(seen.resumed, "{proto:?} did not resume");
    let s = cache.stats();
    assert_eq!(lookup_counts(&s), (1, 1, 1, 0), "{proto:?}: {s:?}");
    assert_eq!((s.refused, s.abandoned, s.store_errors), (0, 0, 0));
    assert_eq!(
        store.blocking_calls.load(Ordering::SeqCst),
        0,
        "a blocking get/take ran on the handshake thread"
    );
    assert_eq!(store.held(), 0);
}

#[test]
fn tls12_suspended_lookup_resumes() {
    suspended_lookup_resumes(Proto::Tls12);
}

#[test]
fn tls13_suspended_lookup_resumes() {
    suspended_lookup_resumes(Proto::Tls13);
}

#[test]
fn dtls12_suspended_lookup_resumes() {
    suspended_lookup_resumes(Proto::Dtls12);
}

#[test]
fn an_abandoned_lookup_is_a_full_handshake() {
    for proto in [Proto::Tls12, Proto::Dtls12] {
        let (store, cache, server, client) = setup(proto, false);
        let (_, session) = connect(&server, &client, &store, None, OnSuspend::Release);
        let (seen, _) = connect(
            &server,
            &client,
            &store,
            session.as_ref(),
            OnSuspend::Abandon,
        );
        assert_eq!((seen.suspensions, seen.resumed), (1, false), "{proto:?}");
        let s = cache.stats();
        assert_eq!(lookup_counts(&s), (1, 1, 0, 1), "{proto:?}: {s:?}");
        assert_eq!(s.abandoned, 1);
        // The answer arriving late changes nothing.
        assert_eq!(store.release(), 1);
        assert_eq!(cache.stats().hits, 0);
    }
}

#[test]
fn a_failed_lookup_is_a_full_handshake_and_a_store_error() {
    let (store, cache, server, client) = setup(Proto::Tls12, false);
    let (_, session) = connect(&server, &client, &store, None, OnSuspend::Release);
    store.fail.store(true, Ordering::SeqCst);
    let (seen, _) = connect(
        &server,
        &client,
        &store,
        session.as_ref(),
        OnSuspend::Release,
    );
    assert_eq!((seen.suspensions, seen.resumed), (1, false));
    let s = cache.stats();
    assert_eq!(lookup_counts(&s), (1, 1, 0, 1), "{s:?}");
    assert_eq!(s.store_errors, 1);
}

#[test]
fn an_unknown_session_is_a_full_handshake_after_one_suspension() {
    let (store, cache, server, client) = setup(Proto::Dtls12, false);
    let (_, session) = connect(&server, &client, &store, None, OnSuspend::Release);
    let other_store = Arc::new(HeldStore::default());
    let other = SessionCache::builder()
        .store(other_store.clone())
        .build()
        .unwrap();
    let fresh_server = server_ctx(Proto::Dtls12, &other, false);
    let (seen, _) = connect(
        &fresh_server,
        &client,
        &other_store,
        session.as_ref(),
        OnSuspend::Release,
    );
    assert_eq!((seen.suspensions, seen.resumed), (1, false));
    assert_eq!(lookup_counts(&other.stats()), (1, 1, 0, 1));
    assert_eq!(cache.stats().lookups, 0);
}

#[test]
fn an_answer_at_once_does_not_suspend() {
    let (store, cache, server, client) = setup(Proto::Tls12, false);
    let (_, session) = connect(&server, &client, &store, None, OnSuspend::Release);
    store.answer_at_once.store(true, Ordering::SeqCst);
    let (seen, _) = connect(
        &server,
        &client,
        &store,
        session.as_ref(),
        OnSuspend::Release,
    );
    assert_eq!((seen.suspensions, seen.resumed), (0, true));
    assert_eq!(lookup_counts(&cache.stats()), (1, 0, 1, 0));
}

#[test]
fn single_use_takes_the_session_through_the_lookup() {
    let (store, cache, server, client) = setup(Proto::Tls12, true);
    let (_, session) = connect(&server, &client, &store, None, OnSuspend::Release);
    let (seen, _) = connect(
        &server,
        &client,
        &store,
        session.as_ref(),
        OnSuspend::Release,
    );
    assert!(seen.resumed);
    // Taken: a second offer of the same session finds nothing.
    let (seen, _) = connect(
        &server,
        &client,
        &store,
        session.as_ref(),
        OnSuspend::Release,
    );
    assert_eq!((seen.suspensions, seen.resumed), (1, false));
    let s = cache.stats();
    assert_eq!(lookup_counts(&s), (2, 2, 1, 1), "{s:?}");
    assert_eq!(store.blocking_calls.load(Ordering::SeqCst), 0);
}

#[test]
fn lookups_complete_from_any_thread_while_the_handshake_thread_serves_others() {
    // Two connections suspended at once on one thread; both released from another thread.
    let (store, cache, server, client) = setup(Proto::Tls12, false);
    let (_, session) = connect(&server, &client, &store, None, OnSuspend::Release);
    let session = session.unwrap();
    let mut streams = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let b = support::Bounded::stream(b, "client");
        let client_ctx = client.ctx.clone();
        let offer = session.clone();
        clients.push(thread::spawn(move || {
            let mut ssl = Ssl::new(&client_ctx).unwrap();
            #[allow(unsafe_code)]
            // SAFETY: the test client context keeps no internal session cache.
            unsafe {
                ssl.set_session(&offer).unwrap()
            };
            let mut c = ssl.connect(b).unwrap();
            let reused = c.ssl().session_reused();
            let _ = c.shutdown();
            reused
        }));
        let fd = a.as_raw_fd();
        let mut ssl = Ssl::new(&server.ctx).unwrap();
        ssl.set_accept_state();
        let mut stream = SslStream::new(ssl, a).unwrap();
        loop {
            match stream.do_handshake() {
                Err(e) if e.code() == ErrorCode::WANT_READ => wait_readable(fd),
                Err(e) if e.code() == ErrorCode::WANT_CLIENT_HELLO_CB => break,
                other => panic!("expected a suspension, got {other:?}"),
            }
        }
        streams.push((stream, fd));
    }
    assert_eq!(store.held(), 2);
    let releaser = {
        let s = Arc::clone(&store);
        thread::spawn(move || s.release())
    };
    assert_eq!(releaser.join().unwrap(), 2);
    for (mut stream, fd) in streams {
        loop {
            match stream.do_handshake() {
                Ok(()) => break,
                Err(e) if e.code() == ErrorCode::WANT_READ => wait_readable(fd),
                Err(e) => panic!("{e}"),
            }
        }
        assert!(stream.ssl().session_reused());
        let _ = stream.shutdown();
    }
    for c in clients {
        assert!(c.join().unwrap());
    }
    assert_eq!(lookup_counts(&cache.stats()), (2, 2, 2, 0));
}
