//! The tokio driver against the same real clients as the std driver: `openssl s_client
//! -dtls1_2` full handshakes, `-sess_out`/`-sess_in` and `-reconnect` resumptions, PSK, in both
//! I/O modes; graceful shutdown sends close_notify to every peer; a remote session lookup's
//! completion wakes the task. Every server binds 127.0.0.1:0 on a runtime thread of its own and
//! stops when the test ends; every s_client run is bounded and killed by PID.
#![cfg(feature = "tokio")]

mod support;

use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use openssl_session_cache::dsm::DsmConfig;
use openssl_session_cache::{
    Application, CloseReason, Error, Event, IoMode, LookupDone, LookupMode, MemoryStore,
    ServerConfig, ServerConfigBuilder, SessionCache, SessionId, SessionStore, StoreError,
    StoredSession, TokioHandle, TokioServer, UdpOptions,
};

use support::s_client::{count, s_client_echo, s_client_echo_fast, SClient};
use support::server::{echo, echo_app, read_record, recording, Recorded, ResumingClients};

const PSK_HEX: &str = "00112233445566778899aabbccddeeff";

/// A tokio server on its own current-thread runtime thread.
struct TokioTest {
    addr: SocketAddr,
    handle: TokioHandle,
    cache: SessionCache,
    thread: Option<JoinHandle<Result<(), Error>>>,
}

impl TokioTest {
    fn start(io: IoMode) -> Self {
        Self::start_with(
            io,
            SessionCache::builder().build().unwrap(),
            |b| b,
            || echo_app,
        )
    }

    fn start_with<A, F>(
        io: IoMode,
        cache: SessionCache,
        tweak: impl FnOnce(ServerConfigBuilder) -> ServerConfigBuilder,
        new_app: F,
    ) -> Self
    where
        A: Application + Send + 'static,
        F: FnMut() -> A + Send + 'static,
    {
        let config = tweak(ServerConfig::builder(cache.clone()).dsm(DsmConfig::new(1024)))
            .build()
            .unwrap();
        let mut options = UdpOptions::new("127.0.0.1:0".parse().unwrap());
        options.stats_interval = None;
        options.io = io;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let server = TokioServer::spawn(config, options, new_app)?;
                tx.send((server.local_addr(), server.handle())).unwrap();
                server.wait().await
            })
        });
        let (addr, handle) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the server started");
        Self {
            addr,
            handle,
            cache,
            thread: Some(thread),
        }
    }

    /// Polls `cond` every 10 ms for at most `limit`.
    fn wait_for(&self, limit: Duration, mut cond: impl FnMut(&Self) -> bool) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if cond(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        cond(self)
    }

    /// Shuts the server down and waits (bounded) for its runtime thread.
    fn shutdown(&mut self) -> Result<(), Error> {
        self.handle.shutdown();
        let thread = self.thread.take().expect("running");
        let end = Instant::now() + Duration::from_secs(5);
        while !thread.is_finished() {
            assert!(Instant::now() < end, "the server did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
        thread.join().expect("the runtime thread did not panic")
    }
}

impl Drop for TokioTest {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.shutdown();
        }
    }
}

fn sess_file(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).to_str().unwrap().to_owned()
}

#[test]
fn s_client_gets_its_line_echoed_in_both_io_modes() {
    for io in [IoMode::Batched, IoMode::Single] {
        let server = TokioTest::start(io);
        let out = s_client_echo(server.addr, &[], "hello tokio");
        assert_eq!(count(&out, "New, TLSv1.2"), 1, "{io:?}: {out:?}");
        assert!(server.wait_for(Duration::from_secs(10), |s| s.handle.stats().closed == 1));
        let stats = server.handle.stats();
        assert_eq!(stats.handshakes, 1, "{io:?}");
        assert_eq!(
            (stats.records_received, stats.records_sent),
            (1, 1),
            "{io:?}"
        );
        let io_stats = server.handle.io_stats();
        assert_eq!(io_stats.datagrams_received, stats.datagrams_in, "{io:?}");
        assert_eq!(io_stats.send_calls, io_stats.datagrams_sent, "{io_stats:?}");
        assert!(
            io_stats.datagrams_sent <= stats.datagrams_out,
            "{io_stats:?}"
        );
    }
}

#[test]
fn sess_out_then_sess_in_is_reused_and_a_cache_hit_in_both_io_modes() {
    for io in [IoMode::Batched, IoMode::Single] {
        let server = TokioTest::start(io);
        let dir = tempfile::tempdir().unwrap();
        let sess = sess_file(&dir, "s.pem");
        let first = s_client_echo(server.addr, &["-sess_out", &sess], "one");
        assert_eq!(count(&first, "New,"), 1, "{io:?}: {first:?}");
        let second = s_client_echo(server.addr, &["-sess_in", &sess], "two");
        assert_eq!(count(&second, "Reused,"), 1, "{io:?}: {second:?}");
        assert_eq!(server.cache.stats().hits, 1, "{io:?}");
        assert!(server.wait_for(Duration::from_secs(10), |s| s.handle.stats().resumed == 1));
    }
}

#[test]
fn reconnect_reuses_every_time() {
    let server = TokioTest::start(IoMode::Batched);
    let mut c = SClient::spawn(server.addr, &["-reconnect"]);
    let mut reused = 0;
    let done = c.wait_line(Duration::from_secs(10), |l| {
        if l.starts_with("Reused,") {
            reused += 1;
        }
        reused == 5
    });
    let out = c.finish(Duration::from_secs(5));
    assert!(done, "{out:?}");
    assert_eq!(count(&out, "New,"), 1, "{out:?}");
    assert_eq!(count(&out, "Reused,"), 5, "{out:?}");
    assert_eq!(server.cache.stats().hits, 5);
}

#[test]
fn twenty_sequential_resumptions_all_reuse() {
    let server = TokioTest::start(IoMode::Batched);
    let dir = tempfile::tempdir().unwrap();
    let sess = sess_file(&dir, "s.pem");
    s_client_echo(server.addr, &["-sess_out", &sess], "first");
    for i in 0..20 {
        let out = s_client_echo_fast(server.addr, &["-sess_in", &sess], &format!("line {i}"));
        assert_eq!(count(&out, "Reused,"), 1, "resumption {i}: {out:?}");
    }
    assert_eq!(server.cache.stats().hits, 20);
    assert!(server.wait_for(Duration::from_secs(10), |s| s.handle.stats().resumed == 20));
}

#[test]
fn psk_connection_echoes_and_resumes() {
    let key = hex::decode(PSK_HEX).unwrap();
    let server = TokioTest::start_with(
        IoMode::Batched,
        SessionCache::builder().build().unwrap(),
        move |b| b.psk(b"client1", &key),
        || echo_app,
    );
    let dir = tempfile::tempdir().unwrap();
    let sess = sess_file(&dir, "p.pem");
    let psk = [
        "-psk",
        PSK_HEX,
        "-psk_identity",
        "client1",
        "-cipher",
        "PSK-AES128-CCM8",
    ];
    let first = s_client_echo(
        server.addr,
        &[&psk[..], &["-sess_out", &sess]].concat(),
        "psk",
    );
    assert_eq!(
        count(&first, "New, TLSv1.2, Cipher is PSK-AES128-CCM8"),
        1,
        "{first:?}"
    );
    let again = s_client_echo(
        server.addr,
        &[&psk[..], &["-sess_in", &sess]].concat(),
        "psk2",
    );
    assert_eq!(
        count(&again, "Reused, TLSv1.2, Cipher is PSK-AES128-CCM8"),
        1,
        "{again:?}"
    );
}

#[test]
fn shutdown_sends_close_notify_to_every_peer_and_keeps_their_sessions() {
    let log = Recorded::default();
    let app_log = Arc::clone(&log);
    let mut server = TokioTest::start_with(
        IoMode::Batched,
        SessionCache::builder().build().unwrap(),
        |b| b,
        move || recording(&app_log, echo_app),
    );
    let resuming = ResumingClients::new();
    let mut clients: Vec<_> = (0..3)
        .map(|i| resuming.connect(server.addr, &i.to_string()))
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let msg = format!("client {i}");
        assert_eq!(echo(c, msg.as_bytes()), msg.as_bytes());
    }
    server.shutdown().expect("a clean shutdown");
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(read_record(c), None, "client {i} got no close_notify");
        let _ = c.shutdown();
    }
    let closed: Vec<_> = log
        .lock()
        .iter()
        .filter_map(|e| match e {
            Event::Closed { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect();
    assert_eq!(closed, vec![CloseReason::Shutdown; 3]);
    assert_eq!(server.handle.stats().peers, 0);
    // The sessions stay resumable: a new server on the same cache resumes each.
    let cache = server.cache.clone();
    assert_eq!(cache.stats().removed, 0);
    let again = TokioTest::start_with(IoMode::Batched, cache.clone(), |b| b, || echo_app);
    for i in 0..3 {
        let mut c = resuming.connect(again.addr, &i.to_string());
        assert!(c.ssl().session_reused(), "client {i}");
        assert_eq!(echo(&mut c, b"again"), b"again");
    }
    assert_eq!(cache.stats().hits, 3);
}

/// A lookup's answer, and where it goes.
type Held = (Result<Option<StoredSession>, StoreError>, LookupDone);

/// A remote store stand-in: sessions in memory; each lookup is held until the test answers it.
#[derive(Debug)]
struct HeldStore {
    mem: MemoryStore,
    held: parking_lot::Mutex<Vec<Held>>,
}

impl HeldStore {
    fn held(&self) -> usize {
        self.held.lock().len()
    }

    /// Answers every held lookup, on this thread.
    fn release(&self) {
        let held = std::mem::take(&mut *self.held.lock());
        for (found, done) in held {
            done.complete(found);
        }
    }
}

impl SessionStore for HeldStore {
    fn get(&self, _: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        panic!("a remote store is never asked synchronously")
    }
    fn put(&self, id: SessionId, s: StoredSession) -> Result<(), StoreError> {
        self.mem.put(id, s)
    }
    fn take(&self, _: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        panic!("a remote store is never asked synchronously")
    }
    fn remove(&self, id: &SessionId) -> Result<bool, StoreError> {
        self.mem.remove(id)
    }
    fn lookup(&self, id: SessionId, mode: LookupMode, done: LookupDone) {
        let found = match mode {
            LookupMode::Get => self.mem.get(&id),
            LookupMode::Take => self.mem.take(&id),
        };
        self.held.lock().push((found, done));
    }
    fn is_remote(&self) -> bool {
        true
    }
}

/// A client's UDP socket that counts the datagrams it sends.
struct CountingIo {
    sock: std::net::UdpSocket,
    sent: Arc<std::sync::atomic::AtomicU64>,
}

impl std::io::Read for CountingIo {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.sock.recv(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                Err(std::io::ErrorKind::WouldBlock.into())
            }
            r => r,
        }
    }
}

impl std::io::Write for CountingIo {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.sock.send(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The echo application, counting the driver's wakes ([`Application::on_wake`] runs only after
/// the endpoint's waker woke the task).
struct CountingWakes(Arc<std::sync::atomic::AtomicU64>);

impl Application for CountingWakes {
    fn on_event(&mut self, ctx: &mut openssl_session_cache::AppContext<'_>, event: Event) {
        echo_app(ctx, event);
    }
    fn on_wake(&mut self, _: &mut openssl_session_cache::AppContext<'_>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Without the wake, a parked handshake would go on only at the client's next datagram, at the
/// task's next periodic turn (metrics) or at the lookup timeout (a minute here). So: the client
/// is driven until its ClientHello parks the handshake, and then not at all (an OpenSSL client
/// retransmits only when it is driven); once the server has counted every datagram the client
/// sent, the lookup is answered from another thread. The task must then be woken (counted by
/// the application's `on_wake`, which nothing else runs here), and the server's next flight
/// arrive, resuming the session, with no datagram of the client's after the answer.
#[test]
fn a_remote_lookups_completion_wakes_the_task() {
    use openssl::ssl::{ErrorCode, Ssl, SslStream};
    use std::sync::atomic::{AtomicU64, Ordering};

    let store = Arc::new(HeldStore {
        mem: MemoryStore::builder().build().unwrap(),
        held: parking_lot::Mutex::new(Vec::new()),
    });
    let cache = SessionCache::builder()
        .store(store.clone())
        .build()
        .unwrap();
    let wakes = Arc::new(AtomicU64::new(0));
    let server = TokioTest::start_with(
        IoMode::Batched,
        cache.clone(),
        |b| b.lookup_timeout(Duration::from_secs(60)),
        {
            let wakes = Arc::clone(&wakes);
            move || CountingWakes(Arc::clone(&wakes))
        },
    );
    let mut first = support::server::dtls_connect(server.addr);
    assert_eq!(echo(&mut first, b"first"), b"first");
    let session = first.ssl().session().unwrap().to_owned();
    let _ = first.shutdown();
    assert!(server.wait_for(Duration::from_secs(5), |s| s.handle.stats().closed == 1));
    let quiet = server.handle.stats().datagrams_in;

    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(server.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let mut ssl = Ssl::new(&support::server::client_ctx()).unwrap();
    ssl.set_mtu(1400).unwrap();
    ssl.set_connect_state();
    // SAFETY: the test client context keeps no internal session cache.
    #[allow(unsafe_code)]
    unsafe {
        ssl.set_session(&session).unwrap()
    };
    let mut c = SslStream::new(
        ssl,
        CountingIo {
            sock,
            sent: Arc::clone(&sent),
        },
    )
    .unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while store.held() == 0 {
        match c.do_handshake() {
            Err(e) if e.code() == ErrorCode::WANT_READ => {}
            other => panic!("the resumption did not wait for its lookup: {other:?}"),
        }
        assert!(Instant::now() < end, "no lookup was started");
    }
    // The client is not driven from here on: it sends nothing more.
    let sent_before = sent.load(Ordering::SeqCst);
    assert!(
        server.wait_for(Duration::from_secs(10), |s| {
            let st = s.handle.stats();
            st.parked == 1 && st.datagrams_in == quiet + sent_before
        }),
        "the server did not count the client's {sent_before} datagrams: {:?}",
        server.handle.stats()
    );
    assert_eq!(wakes.load(Ordering::SeqCst), 0, "nothing woke the task yet");
    std::thread::spawn({
        let store = Arc::clone(&store);
        move || store.release()
    })
    .join()
    .unwrap();
    // The server's flight arrives with no datagram of the client's after the answer.
    let sock = &c.get_ref().sock;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut peek = [0u8; 1];
    sock.peek(&mut peek)
        .expect("the server went on after the lookup completed, woken, not by a datagram");
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    assert_eq!(sent.load(Ordering::SeqCst), sent_before);
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match c.do_handshake() {
            Ok(()) => break,
            Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < end => {}
            Err(e) => panic!("dtls client handshake: {e}"),
        }
    }
    assert!(c.ssl().session_reused(), "the session did not resume");
    assert_eq!(
        wakes.load(Ordering::SeqCst),
        1,
        "the lookup's completion woke the task once"
    );
    assert_eq!(echo(&mut c, b"second"), b"second");
    assert!(server.wait_for(Duration::from_secs(5), |s| s.handle.stats().resumed == 1));
    let stats = server.handle.stats();
    assert_eq!(
        (
            stats.lookups_parked,
            stats.lookups_completed,
            stats.lookups_timed_out
        ),
        (1, 1, 0),
        "{stats:?}"
    );
    assert_eq!(cache.stats().hits, 1);
}
