//! The DTLS server library against real clients: `openssl s_client -dtls1_2` (full handshakes,
//! `-sess_out`/`-sess_in`, `-reconnect`, PSK, mutual DTLS, a vanished client, an application
//! that answers in upper case, greets and closes) and openssl-crate clients over UDP (a
//! ClientHello flood, a stalled handshake, a full send queue, a wake from another thread). The
//! applications use the public API only. Every server binds 127.0.0.1:0 and stops when the test
//! ends; every s_client run is bounded and killed by PID.
#![cfg(feature = "server")]

mod support;

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openssl::ssl::{ErrorCode, SslVerifyMode};
use openssl::x509::store::X509StoreBuilder;
use openssl_session_cache::dsm::DsmConfig;
use openssl_session_cache::{AppContext, Application, CloseReason, Event, SendError};
use parking_lot::Mutex;

use support::s_client::{count, s_client_echo, s_client_echo_fast, SClient};
use support::server::{
    dtls_connect, echo, echo_app, memory_client, read_record, recording, Recorded, TestServer,
};

const PSK_HEX: &str = "00112233445566778899aabbccddeeff";

fn default_server() -> TestServer {
    TestServer::start(DsmConfig::new(1024), |b| b)
}

fn sess_file(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).to_str().unwrap().to_owned()
}

#[test]
fn s_client_gets_its_line_echoed() {
    let server = default_server();
    let out = s_client_echo(server.addr(), &[], "hello dtls");
    assert_eq!(count(&out, "New, TLSv1.2"), 1, "{out:?}");
    // Worker counters are published every few milliseconds.
    assert!(server.wait_for(Duration::from_secs(10), |s| s.server.stats().closed == 1));
    let stats = server.server.stats();
    assert_eq!(stats.handshakes, 1);
    assert_eq!((stats.records_received, stats.records_sent), (1, 1));
}

#[test]
fn sess_out_then_sess_in_is_reused_and_a_cache_hit() {
    let server = default_server();
    let dir = tempfile::tempdir().unwrap();
    let sess = sess_file(&dir, "s.pem");
    let first = s_client_echo(server.addr(), &["-sess_out", &sess], "one");
    assert_eq!(count(&first, "New,"), 1, "{first:?}");
    let second = s_client_echo(server.addr(), &["-sess_in", &sess], "two");
    assert_eq!(count(&second, "Reused,"), 1, "{second:?}");
    assert_eq!(server.cache.stats().hits, 1);
    assert!(server.wait_for(Duration::from_secs(10), |s| s.server.stats().resumed == 1));
}

#[test]
fn reconnect_reuses_every_time() {
    let server = default_server();
    let mut c = SClient::spawn(server.addr(), &["-reconnect"]);
    // s_client -reconnect: one full handshake, then five reconnections from new source ports.
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
fn fifty_sequential_resumptions_all_reuse() {
    let server = default_server();
    let dir = tempfile::tempdir().unwrap();
    let sess = sess_file(&dir, "s.pem");
    s_client_echo(server.addr(), &["-sess_out", &sess], "first");
    for i in 0..50 {
        let out = s_client_echo_fast(server.addr(), &["-sess_in", &sess], &format!("line {i}"));
        assert_eq!(count(&out, "Reused,"), 1, "resumption {i}: {out:?}");
    }
    assert_eq!(server.cache.stats().hits, 50);
    // Worker counters are published every few milliseconds.
    assert!(server.wait_for(Duration::from_secs(10), |s| s.server.stats().resumed == 50));
}

#[test]
fn vanished_client_session_still_resumes() {
    let dsm = DsmConfig::new(1024).with_idle_tick(Duration::from_millis(100));
    let server = TestServer::start(dsm, |b| b);
    let dir = tempfile::tempdir().unwrap();
    let sess = sess_file(&dir, "s.pem");
    let mut c = SClient::spawn(server.addr(), &["-sess_out", &sess]);
    c.send_line("then vanish");
    assert!(c.wait_line(Duration::from_secs(5), |l| l == "then vanish"));
    // s_client writes -sess_out after the handshake: wait for the whole session, then SIGKILL.
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&sess)
        .is_ok_and(|pem| pem.contains("-----END SSL SESSION PARAMETERS-----"))
    {
        assert!(
            std::time::Instant::now() < end,
            "s_client wrote no session to {sess}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    c.kill();
    // The server's idle sweep shuts the silent peer down (close_notify; session kept).
    assert!(
        server.wait_for(Duration::from_secs(10), |s| s.server.stats().idle_closed
            == 1)
    );
    assert_eq!(server.server.stats().peers, 0);
    let out = s_client_echo(server.addr(), &["-sess_in", &sess], "back");
    assert_eq!(count(&out, "Reused,"), 1, "{out:?}");
}

#[test]
fn psk_connection_echoes_and_resumes() {
    let server = TestServer::start(DsmConfig::new(1024), |b| b.psk(b"client1", &hex(PSK_HEX)));
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
        server.addr(),
        &[&psk[..], &["-sess_out", &sess]].concat(),
        "psk",
    );
    assert_eq!(
        count(&first, "New, TLSv1.2, Cipher is PSK-AES128-CCM8"),
        1,
        "{first:?}"
    );
    let again = s_client_echo(
        server.addr(),
        &[&psk[..], &["-sess_in", &sess]].concat(),
        "psk2",
    );
    assert_eq!(
        count(&again, "Reused, TLSv1.2, Cipher is PSK-AES128-CCM8"),
        1,
        "{again:?}"
    );
}

fn hex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

/// A client that sends its first ClientHello, reads the HelloVerifyRequest, sends the second
/// ClientHello (with the cookie) and then goes silent. Returns the socket to keep the port.
fn stall_after_cookie(server: std::net::SocketAddr) -> Option<UdpSocket> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(server).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut client = memory_client();
    sock.send(&client.get_mut().pop_outbound()?).ok()?;
    let mut buf = [0u8; 2048];
    let n = sock.recv(&mut buf).ok()?;
    client.get_mut().push(buf[..n].to_vec());
    match client.do_handshake() {
        Err(e) if e.code() == ErrorCode::WANT_READ => {}
        _ => return None,
    }
    let second = client.get_mut().take_outbound().pop()?;
    sock.send(&second).ok()?;
    Some(sock)
}

#[test]
fn stalled_handshake_frees_its_slot_after_the_timeout() {
    let dsm = DsmConfig::new(1024).with_handshake_timeout(Duration::from_millis(300));
    let server = TestServer::start(dsm, |b| b);
    let _sock = stall_after_cookie(server.addr()).expect("client got through the cookie exchange");
    // Held in the handshake (the peak: the slot may be freed before a look at the gauge).
    assert!(server.wait_for(Duration::from_secs(10), |s| s
        .server
        .stats()
        .max_handshaking
        == 1));
    assert!(
        server.wait_for(Duration::from_secs(10), |s| s
            .server
            .stats()
            .handshake_timeouts
            == 1),
        "{:?}",
        server.server.stats()
    );
    let stats = server.server.stats();
    assert_eq!((stats.peers, stats.handshaking), (0, 0));
    assert_eq!(server.server.dsm_stats()[0].handshakes, 0);
}

#[test]
fn flood_stays_within_budgets_and_established_peer_keeps_echoing() {
    const MAX_HANDSHAKES: usize = 8;
    let dsm = DsmConfig::new(32)
        .with_max_handshakes(MAX_HANDSHAKES)
        .with_handshake_timeout(Duration::from_secs(30));
    let server = TestServer::start(dsm, |b| b);
    let addr = server.addr();

    let mut established = dtls_connect(addr);
    assert_eq!(echo(&mut established, b"before"), b"before");

    // A real first ClientHello to replay from many ports.
    let hello = memory_client().get_mut().pop_outbound().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let stop = Arc::clone(&stop);
        let hello = hello.clone();
        std::thread::spawn(move || {
            let mut sent = 0usize;
            let sockets: Vec<UdpSocket> = (0..200)
                .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
                .collect();
            'outer: for round in 0..10 {
                for s in &sockets {
                    let _ = s.send_to(&hello, addr);
                    sent += 1;
                }
                // Some ports complete the cookie exchange and stall, eating handshake budget.
                for _ in 0..10 {
                    if stop.load(Ordering::Relaxed) {
                        break 'outer;
                    }
                    let _ = stall_after_cookie(addr);
                }
                let _ = round;
            }
            sent
        })
    };
    let mut echoes = 0;
    while !flooder.is_finished() {
        let msg = format!("during {echoes}");
        assert_eq!(echo(&mut established, msg.as_bytes()), msg.as_bytes());
        echoes += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let sent = flooder.join().unwrap();
    assert!(sent >= 2000);
    assert!(echoes > 0);
    assert_eq!(echo(&mut established, b"after"), b"after");

    assert!(server.wait_for(
        Duration::from_secs(10),
        |s| s.server.stats().hello_verify_requests as usize >= sent
    ));
    let stats = server.server.stats();
    assert!(stats.hello_verify_requests as usize >= 2000, "{stats:?}");
    assert!(
        stats.max_handshaking as usize <= MAX_HANDSHAKES,
        "{stats:?}"
    );
    assert!(stats.dropped_no_space > 0, "budget was hit: {stats:?}");
    let dsm_stats = server.server.dsm_stats()[0];
    assert!(dsm_stats.handshakes <= MAX_HANDSHAKES);
    assert_eq!(dsm_stats.established, 1);
}

/// Greets each peer, answers in upper case, and closes the peer that says "bye".
fn upper_app(ctx: &mut AppContext<'_>, event: Event) {
    match event {
        Event::Connected { peer, .. } => ctx.send(peer, b"welcome\n").unwrap(),
        Event::Data { peer, data } if data == b"bye\n" => assert!(ctx.close(peer)),
        Event::Data { peer, data } => ctx.send(peer, &data.to_ascii_uppercase()).unwrap(),
        _ => {}
    }
}

fn closes(log: &Recorded) -> Vec<CloseReason> {
    log.lock()
        .iter()
        .filter_map(|e| match e {
            Event::Closed { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect()
}

#[test]
fn an_application_answers_greets_and_closes_through_the_public_api() {
    let log = Recorded::default();
    let server = TestServer::start_with(DsmConfig::new(64), |b| b, || recording(&log, upper_app));
    let mut c = SClient::spawn(server.addr(), &[]);
    assert!(
        c.wait_line(Duration::from_secs(5), |l| l == "welcome"),
        "no server-initiated greeting: {:?}",
        c.lines.output
    );
    c.send_line("hello dtls");
    assert!(c.wait_line(Duration::from_secs(5), |l| l == "HELLO DTLS"));
    c.send_line("bye");
    // The application's close sends close_notify: s_client ends by itself, stdin still open.
    assert!(
        c.wait_exit(Duration::from_secs(5)),
        "s_client still running"
    );
    let out = c.finish(Duration::from_secs(1));
    assert!(!out.iter().any(|l| l == "BYE"), "{out:?}");
    assert!(
        server.wait_for(Duration::from_secs(10), |s| s.server.stats().closed_locally
            == 1)
    );
    assert_eq!(closes(&log), vec![CloseReason::Local]);
    let stats = server.server.stats();
    assert_eq!((stats.records_received, stats.records_sent), (2, 2));
    assert_eq!(stats.peers, 0);
}

/// PEM files of the test PKI's client identity.
fn client_identity_files(dir: &tempfile::TempDir) -> (String, String) {
    let pki = support::pki();
    let cert = sess_file(dir, "client.pem");
    let key = sess_file(dir, "client.key");
    std::fs::write(&cert, pki.client.cert.to_pem().unwrap()).unwrap();
    std::fs::write(&key, pki.client.key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    (cert, key)
}

fn peer_certificates(log: &Recorded) -> Vec<(bool, Option<openssl::x509::X509>)> {
    log.lock()
        .iter()
        .filter_map(|e| match e {
            Event::Connected { info, .. } => Some((info.resumed, info.peer_certificate.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn mutual_dtls_requires_a_client_certificate_and_reports_it_on_resumption() {
    let log = Recorded::default();
    let server = TestServer::start_with(
        DsmConfig::new(64),
        |b| {
            b.configure(|ctx| {
                let mut roots = X509StoreBuilder::new()?;
                roots.add_cert(support::pki().client.cert.clone())?;
                ctx.set_verify_cert_store(roots.build())?;
                ctx.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
                Ok(())
            })
        },
        || recording(&log, echo_app),
    );
    // Without a certificate: refused.
    let mut c = SClient::spawn(server.addr(), &[]);
    c.send_line("no cert");
    assert!(c.wait_exit(Duration::from_secs(5)), "s_client kept running");
    let out = c.finish(Duration::from_secs(1));
    // s_client prints its side of the session before it reads the server's answer (an alert),
    // so only the echo tells: there is none.
    assert!(!out.iter().any(|l| l == "no cert"), "{out:?}");
    assert!(server.wait_for(Duration::from_secs(10), |s| s.server.stats().failed == 1));
    assert!(peer_certificates(&log).is_empty());
    assert_eq!(closes(&log), vec![CloseReason::Failed]);

    // With one: a full handshake, then a resumption, both report the certificate.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = client_identity_files(&dir);
    let sess = sess_file(&dir, "s.pem");
    let id = ["-cert", cert.as_str(), "-key", key.as_str()];
    let first = s_client_echo(
        server.addr(),
        &[&id[..], &["-sess_out", &sess]].concat(),
        "one",
    );
    assert_eq!(count(&first, "New, TLSv1.2"), 1, "{first:?}");
    let again = s_client_echo(
        server.addr(),
        &[&id[..], &["-sess_in", &sess]].concat(),
        "two",
    );
    assert_eq!(count(&again, "Reused, TLSv1.2"), 1, "{again:?}");
    let seen = peer_certificates(&log);
    let expected = &support::pki().client.cert;
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0], (false, Some(expected.clone())));
    assert_eq!(seen[1], (true, Some(expected.clone())));
}

#[test]
fn a_full_send_queue_refuses_the_rest_and_disturbs_nothing() {
    const QUEUE: usize = 8;
    let results: Arc<Mutex<Vec<Result<(), SendError>>>> = Arc::default();
    let app = {
        let results = Arc::clone(&results);
        move || {
            let results = Arc::clone(&results);
            move |ctx: &mut AppContext<'_>, event: Event| match event {
                // A burst larger than the queue before the driver gets to send anything.
                Event::Data { peer, data } if data == b"burst" => {
                    let mut r = results.lock();
                    for i in 0..QUEUE + 5 {
                        r.push(ctx.send(peer, format!("{i}").as_bytes()));
                    }
                }
                Event::Data { peer, data } => {
                    let _ = ctx.send(peer, &data);
                }
                Event::Closed { peer, .. } => {
                    results.lock().push(ctx.send(peer, b"too late"));
                }
                _ => {}
            }
        }
    };
    let server = TestServer::start_with(DsmConfig::new(64), |b| b.send_queue(QUEUE), app);
    let mut client = dtls_connect(server.addr());
    client.ssl_write(b"burst").unwrap();
    for i in 0..QUEUE {
        assert_eq!(read_record(&mut client), Some(format!("{i}").into_bytes()));
    }
    {
        let r = results.lock();
        assert_eq!(r.len(), QUEUE + 5);
        assert!(r[..QUEUE].iter().all(Result::is_ok), "{r:?}");
        assert!(
            r[QUEUE..].iter().all(|x| *x == Err(SendError::QueueFull)),
            "{r:?}"
        );
    }
    // The peer still works: the next message is answered, and nothing refused arrives.
    assert_eq!(echo(&mut client, b"after"), b"after");
    assert!(server.wait_for(Duration::from_secs(10), |s| s
        .server
        .stats()
        .send_queue_full
        == 5));
    // After the peer closed, a send is refused as unknown.
    client.shutdown().unwrap();
    assert!(
        server.wait_for(Duration::from_secs(10), |_| results.lock().len()
            == QUEUE + 6)
    );
    assert_eq!(results.lock().last(), Some(&Err(SendError::UnknownPeer)));
    assert_eq!(server.server.stats().failed, 0);
}

/// Sends what other threads queue to every connected peer when the worker is woken, and counts
/// its wakes.
struct Broadcast {
    queue: Arc<Mutex<Vec<Vec<u8>>>>,
    peers: Vec<std::net::SocketAddr>,
    wakes: Arc<std::sync::atomic::AtomicUsize>,
}

impl Application for Broadcast {
    fn on_event(&mut self, ctx: &mut AppContext<'_>, event: Event) {
        match event {
            Event::Connected { peer, .. } => self.peers.push(peer),
            Event::Closed { peer, .. } => self.peers.retain(|p| *p != peer),
            Event::Data { peer, data } => {
                let _ = ctx.send(peer, &data);
            }
            _ => {}
        }
    }

    fn on_wake(&mut self, ctx: &mut AppContext<'_>) {
        self.wakes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        for message in self.queue.lock().drain(..) {
            for &peer in &self.peers {
                let _ = ctx.send(peer, &message);
            }
        }
    }
}

#[test]
fn a_wake_from_another_thread_runs_handle_timeout_and_the_application() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let queue: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let wakes = Arc::new(AtomicUsize::new(0));
    // No timer is due for an hour: only a wake makes the worker run the application's on_wake.
    let dsm = DsmConfig::new(64).with_idle_tick(Duration::from_secs(3600));
    let server = TestServer::start_with(
        dsm,
        |b| b.cookie_rotation(Duration::from_secs(3600)),
        || Broadcast {
            queue: Arc::clone(&queue),
            peers: Vec::new(),
            wakes: Arc::clone(&wakes),
        },
    );
    let mut client = dtls_connect(server.addr());
    assert_eq!(echo(&mut client, b"hi"), b"hi");
    let settled = |s: &TestServer| s.server.stats().timeouts_handled;
    let before = settled(&server);
    assert_eq!(
        wakes.load(Ordering::SeqCst),
        0,
        "on_wake ran without a wake"
    );

    queue.lock().push(b"news".to_vec());
    let waker = server.server.wakers()[0].clone();
    std::thread::spawn(move || waker.wake()).join().unwrap();
    assert!(
        server.wait_for(Duration::from_secs(5), |s| settled(s) > before
            && wakes.load(Ordering::SeqCst) == 1),
        "the wake did not reach handle_timeout and the application: {} wakes",
        wakes.load(Ordering::SeqCst)
    );
    assert_eq!(read_record(&mut client), Some(b"news".to_vec()));
    assert_eq!(wakes.load(Ordering::SeqCst), 1);
}
