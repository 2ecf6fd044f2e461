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

use openssl_session_cache::{
    Application, CloseReason, DsmConfig, Error, Event, IoMode, LookupDone, LookupMode, MemoryStore,
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
        assert!(server.wait_for(Duration::from_secs(2), |s| s.handle.stats().closed == 1));
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
        assert!(server.wait_for(Duration::from_secs(2), |s| s.handle.stats().resumed == 1));
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
    assert!(server.wait_for(Duration::from_secs(2), |s| s.handle.stats().resumed == 20));
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

/// A remote store stand-in: sessions in memory; each lookup answered from another thread
/// after `delay`.
#[derive(Debug)]
struct SlowStore {
    mem: MemoryStore,
    delay: Duration,
}

impl SessionStore for SlowStore {
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
        let delay = self.delay;
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            done.complete(found);
        });
    }
    fn is_remote(&self) -> bool {
        true
    }
}

#[test]
fn a_remote_lookups_completion_wakes_the_task() {
    let store = Arc::new(SlowStore {
        mem: MemoryStore::builder().build().unwrap(),
        delay: Duration::from_millis(50),
    });
    let cache = SessionCache::builder().store(store).build().unwrap();
    let log = Recorded::default();
    let app_log = Arc::clone(&log);
    // Without the wake, the parked handshake would go on only at the next datagram (the
    // client's retransmission, 1 s later) or the lookup timeout (10 s).
    let server = TokioTest::start_with(
        IoMode::Batched,
        cache.clone(),
        |b| b.lookup_timeout(Duration::from_secs(10)),
        move || recording(&app_log, echo_app),
    );
    let dir = tempfile::tempdir().unwrap();
    let sess = sess_file(&dir, "s.pem");
    s_client_echo(server.addr, &["-sess_out", &sess], "first");
    let out = s_client_echo(server.addr, &["-sess_in", &sess], "second");
    assert_eq!(count(&out, "Reused,"), 1, "{out:?}");
    assert!(server.wait_for(Duration::from_secs(2), |s| s.handle.stats().resumed == 1));
    let stats = server.handle.stats();
    // The first handshake offered no session: only the resumption looked one up.
    assert_eq!(
        (stats.lookups_parked, stats.lookups_completed),
        (1, 1),
        "{stats:?}"
    );
    assert_eq!(stats.lookups_timed_out, 0);
    let resumed: Vec<Duration> = log
        .lock()
        .iter()
        .filter_map(|e| match e {
            Event::Connected { info, .. } if info.resumed => Some(info.handshake_time),
            _ => None,
        })
        .collect();
    assert_eq!(resumed.len(), 1);
    assert!(
        resumed[0] >= Duration::from_millis(50) && resumed[0] < Duration::from_millis(700),
        "the resumption took {:?}",
        resumed[0]
    );
}
