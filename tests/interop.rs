//! The DTLS server library against real, independent DTLS 1.2 clients, each echoing a line
//! through a peer that went lean (its records protected and opened by the endpoint, its `Ssl`
//! freed): `openssl s_client` (AES-GCM, ChaCha20-Poly1305, PSK with AES-CCM8), GnuTLS's
//! `gnutls-cli --udp`, Mbed TLS's `dtls_client` and `ssl_client2`, tinydtls's `dtls-client`
//! (PSK-AES128-CCM8) and wolfSSL's example client; resumption of a session whose peer was lean,
//! with every client that resumes (not tinydtls, not `dtls_client`: neither offers a session);
//! and the server's final flight lost on the way (a UDP relay drops it), so that the client
//! retransmits to a peer already lean, which sends the flight it kept (not tinydtls, whose
//! example client never retransmits). And DTLS 1.2 connection IDs (RFC 9146) against wolfSSL
//! built with them: its example client, and `tests/interop/wolfssl_cid_client.c`, which changes
//! its source port under an established association, so that the server must follow it.
//!
//! The server runs in-process on 127.0.0.1:0 with one worker and an echo application that
//! notes the endpoint's counters at each event, so a test can tell that the line it sent arrived
//! while its peer was lean (`EndpointStats::lean`, which only the lean path raises). Each client
//! is a child process, bounded in time and killed by PID when its test ends.
//!
//! The clients other than `openssl` come from `scripts/interop_peers.sh` (which `.ci/run` runs
//! first): Debian's `gnutls-bin`, and wolfSSL (twice: plain, and with `--enable-dtlscid`), Mbed
//! TLS and tinydtls built from the sources their `-sys` crates ship, under `target/interop/` (or
//! `$INTEROP_DIR`). A missing client fails its test with a message saying how to get it; nothing
//! is skipped.
#![cfg(feature = "server")]

mod support;

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl_session_cache::dsm::DsmConfig;
use openssl_session_cache::{AppContext, CloseReason, EndpointStats, Event, ServerConfigBuilder};
use parking_lot::Mutex;

use support::s_client::{count, openssl_cli, Lines};
use support::server::TestServer;

/// How long a client may take to print what a test waits for.
const WAIT: Duration = Duration::from_secs(10);
/// How long a client may take to exit once its part is done.
const EXIT: Duration = Duration::from_secs(5);

/// The PSK of the s_client and gnutls-cli tests.
const PSK_IDENTITY: &str = "interop";
const PSK_HEX: &str = "00112233445566778899aabbccddeeff";
/// tinydtls's example client's identity and key (`tests/dtls-client.c`, `PSK_DEFAULT_*`).
const TINYDTLS_IDENTITY: &[u8] = b"Client_identity";
const TINYDTLS_KEY: &[u8] = b"secretPSK";
/// wolfSSL's example client's PSK for (D)TLS 1.2 (`wolfssl/test.h`, `my_psk_client_cb`).
const WOLFSSL_IDENTITY: &[u8] = b"Client_identity";
const WOLFSSL_KEY: &[u8] = &[0x1a, 0x2b, 0x3c, 0x4d];

// ---------------------------------------------------------------------------------------------
// The server and what it saw.

/// An event of the echo application, with the endpoint's counters at that moment.
#[derive(Debug, Clone)]
enum Seen {
    Connected {
        cipher: &'static str,
        resumed: bool,
        stats: EndpointStats,
    },
    Data {
        /// Where the record came from (a peer with a connection ID may move).
        from: SocketAddr,
        data: Vec<u8>,
        stats: EndpointStats,
    },
    /// A peer with a connection ID moved.
    Migrated {
        peer: SocketAddr,
        previous: SocketAddr,
    },
    Closed(CloseReason),
}

/// The in-process echo server and the log of its application.
struct Server {
    inner: TestServer,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Where the clients are sent instead of the server, if set.
    relay: Option<LossyRelay>,
}

impl Server {
    /// One worker, the echo application, the policy `tweak` gives (lean peers are on by
    /// default).
    fn start(tweak: impl FnOnce(ServerConfigBuilder) -> ServerConfigBuilder) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let inner = TestServer::start_with(DsmConfig::new(64), tweak, move || {
            let log = Arc::clone(&log);
            move |ctx: &mut AppContext<'_>, event: Event| {
                let stats = ctx.stats();
                // Noted before the echo is sent, so a test that has the echo finds it noted.
                match event {
                    Event::Connected { info, .. } => log.lock().push(Seen::Connected {
                        cipher: info.cipher,
                        resumed: info.resumed,
                        stats,
                    }),
                    Event::Data { peer, data } => {
                        log.lock().push(Seen::Data {
                            from: peer,
                            data: data.clone(),
                            stats,
                        });
                        let _ = ctx.send(peer, &data);
                    }
                    Event::Closed { reason, .. } => log.lock().push(Seen::Closed(reason)),
                    Event::Migrated { peer, previous } => {
                        log.lock().push(Seen::Migrated { peer, previous })
                    }
                    _ => {}
                }
            }
        });
        Self {
            inner,
            seen,
            relay: None,
        }
    }

    /// The server with its default certificate (a generated ECDSA P-256 one).
    fn certificate() -> Self {
        Self::start(|b| b)
    }

    /// A PSK-only server knowing `identity` with `key`.
    fn psk(identity: &[u8], key: &[u8]) -> Self {
        let (identity, key) = (identity.to_vec(), key.to_vec());
        Self::start(move |b| b.psk(&identity, &key))
    }

    /// Puts a [`LossyRelay`] between the clients and the server: the clients connect to it.
    fn losing_the_final_flight(mut self) -> Self {
        self.relay = Some(LossyRelay::start(self.inner.addr()));
        self
    }

    /// Where the clients connect: the server, or its relay.
    fn addr(&self) -> SocketAddr {
        self.relay.as_ref().map_or(self.inner.addr(), |r| r.addr)
    }

    fn port(&self) -> String {
        self.addr().port().to_string()
    }

    /// Why each peer was closed, in order.
    fn closes(&self) -> Vec<CloseReason> {
        self.seen()
            .iter()
            .filter_map(|s| match s {
                Seen::Closed(reason) => Some(*reason),
                _ => None,
            })
            .collect()
    }

    /// Waits (bounded) until the server holds no peer, and asserts that there were
    /// `connections` and that each ended by the client's close_notify (which a lean peer opens
    /// and answers with its own, sealed), none failed, and no record of theirs was refused.
    fn assert_all_closed_by_close_notify(&self, connections: usize) {
        // The published counters lag (a worker publishes a few milliseconds after a change), and
        // "no peer" also held before the first handshake: wait for the closes themselves.
        let n = connections as u64;
        let stats = self.stats_when("every peer closed", |s| {
            s.handshakes == n && s.closed == n && s.peers == 0 && s.lean == 0
        });
        assert_eq!(
            self.closes(),
            vec![CloseReason::CloseNotify; connections],
            "{:#?}",
            self.seen()
        );
        assert_eq!(
            (stats.failed, stats.records_unopened, stats.records_replayed),
            (0, 0, 0),
            "{stats:?}"
        );
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }

    /// The endpoint's published counters once `cond` holds of them (bounded); fails with them
    /// otherwise.
    fn stats_when(&self, what: &str, cond: impl Fn(&EndpointStats) -> bool) -> EndpointStats {
        let ok = self
            .inner
            .wait_for(Duration::from_secs(3), |s| cond(&s.server.stats()));
        let stats = self.inner.server.stats();
        assert!(ok, "the server's counters never showed {what}: {stats:?}");
        stats
    }

    /// Asserts that the `nth` (from 0) connection used `cipher`, resumed or not as `resumed`
    /// says, and that its peer was lean when the handshake finished and when a record holding
    /// `line` arrived, i.e. the line was opened (and its echo sealed) by the endpoint's record
    /// layer, not by OpenSSL.
    fn assert_lean_echo(&self, nth: usize, cipher: &str, resumed: bool, line: &str) {
        let seen = self.seen();
        let connections: Vec<_> = seen
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Seen::Connected { .. }))
            .map(|(i, _)| i)
            .collect();
        let Some(&start) = connections.get(nth) else {
            panic!("no connection {nth} in what the application saw: {seen:#?}")
        };
        let end = connections.get(nth + 1).copied().unwrap_or(seen.len());
        let Seen::Connected {
            cipher: got,
            resumed: was_resumed,
            stats,
        } = &seen[start]
        else {
            unreachable!()
        };
        assert_eq!(*got, cipher, "connection {nth}: {seen:#?}");
        assert_eq!(*was_resumed, resumed, "connection {nth} resumed: {seen:#?}");
        assert_eq!(
            stats.lean, 1,
            "connection {nth}: its peer did not go lean at the end of its handshake: {stats:?}"
        );
        let data = seen[start..end].iter().find_map(|s| match s {
            Seen::Data { data, stats, .. } if String::from_utf8_lossy(data).contains(line) => {
                Some(stats)
            }
            _ => None,
        });
        let Some(stats) = data else {
            panic!(
                "connection {nth}: no record holding {line:?} reached the application: {seen:#?}"
            )
        };
        assert_eq!(
            stats.lean, 1,
            "connection {nth}: {line:?} arrived while its peer was not lean: {stats:?}"
        );
        assert_eq!(
            (stats.records_unopened, stats.records_replayed),
            (0, 0),
            "connection {nth}: records of the client's that the lean record layer refused"
        );
    }
}

/// A UDP relay on 127.0.0.1 between one client and the server that drops the first datagram
/// from the server holding a ChangeCipherSpec record, and forwards everything else. In a full
/// handshake that datagram is the server's final flight (ChangeCipherSpec, Finished), sent as
/// OpenSSL finishes, so the peer is lean when the client, still waiting, retransmits its own
/// final flight: the endpoint must answer it with the flight it kept.
struct LossyRelay {
    addr: SocketAddr,
    dropped: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Whether a datagram holds a DTLS record of type ChangeCipherSpec (20).
fn holds_change_cipher_spec(mut datagram: &[u8]) -> bool {
    while datagram.len() >= 13 {
        if datagram[0] == 20 {
            return true;
        }
        let len = usize::from(u16::from_be_bytes([datagram[11], datagram[12]]));
        datagram = datagram.get(13 + len..).unwrap_or_default();
    }
    false
}

impl LossyRelay {
    fn start(server: SocketAddr) -> Self {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(server).unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        }
        let addr = front.local_addr().unwrap();
        let (front_in, back_out) = (front.try_clone().unwrap(), back.try_clone().unwrap());
        let client = Arc::new(Mutex::new(None));
        let dropped = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let to_server = {
            let (client, stop) = (Arc::clone(&client), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = front_in.recv_from(&mut buf) {
                        *client.lock() = Some(from);
                        let _ = back_out.send(&buf[..n]);
                    }
                }
            })
        };
        let to_client = {
            let (dropped, stop) = (Arc::clone(&dropped), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = back.recv(&mut buf) else { continue };
                    if dropped.load(Ordering::Relaxed) == 0 && holds_change_cipher_spec(&buf[..n]) {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if let Some(to) = *client.lock() {
                        let _ = front.send_to(&buf[..n], to);
                    }
                }
            })
        };
        Self {
            addr,
            dropped,
            stop,
            threads: vec![to_server, to_client],
        }
    }

    fn dropped(&self) -> usize {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for LossyRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Server {
    /// Asserts that the relay dropped the server's final flight and that the lean peer sent it
    /// again when the client retransmitted.
    fn assert_final_flight_resent(&self) {
        let relay = self.relay.as_ref().expect("a relay");
        assert_eq!(relay.dropped(), 1, "the relay dropped no final flight");
        let stats = self.stats_when("the final flight sent again", |s| {
            s.final_flights_resent >= 1
        });
        assert_eq!(stats.handshakes, 1, "{stats:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The clients.

/// Where `scripts/interop_peers.sh` puts what it builds.
fn interop_dir() -> PathBuf {
    std::env::var_os("INTEROP_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/interop"))
}

/// `target/interop/<rel>`, which must be there.
fn built_peer(rel: &str) -> PathBuf {
    let path = interop_dir().join(rel);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/interop_peers.sh (.ci/run does) to build the interop peers",
        path.display()
    );
    path
}

/// A program on the PATH, which must be there.
fn on_path(name: &str, how: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("`{name}` is not installed: {how}"))
}

fn gnutls_cli() -> PathBuf {
    on_path(
        "gnutls-cli",
        "apt-get install gnutls-bin (scripts/interop_peers.sh does, and .ci/run runs it)",
    )
}

/// A client process: stdin piped, stdout and stderr read line by line, killed by PID when
/// dropped.
struct Client {
    name: String,
    child: Child,
    lines: Lines,
}

impl Client {
    fn spawn(cmd: &mut Command) -> Self {
        let name = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let lines = Lines::read([
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err),
        ]);
        Self { name, child, lines }
    }

    /// Writes `text` with one `write`.
    fn send(&mut self, text: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin still open");
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Waits (at most `limit`) for a line satisfying `pred`; fails with the client's output.
    fn expect_line(&mut self, what: &str, limit: Duration, pred: impl FnMut(&str) -> bool) {
        if !self.lines.wait_line(limit, pred) {
            let out = self.lines.drain(Duration::from_millis(200));
            panic!(
                "{}: no {what} within {limit:?}; it printed:\n{}",
                self.name,
                out.join("\n")
            );
        }
    }

    /// Whether a line so far satisfies `pred`.
    fn printed(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.lines.output.iter().any(|l| pred(l))
    }

    /// Closes stdin, waits at most `limit` for the exit, kills it by PID if it did not, and
    /// returns all output.
    fn finish(mut self, limit: Duration) -> Vec<String> {
        drop(self.child.stdin.take());
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.lines.drain(Duration::from_millis(100))
    }

    /// Waits at most `limit` for the client to exit by itself; its output, and whether it did
    /// (it is killed by PID if not).
    fn wait_exit(self, limit: Duration) -> (Vec<String>, bool) {
        let mut this = self;
        let end = Instant::now() + limit;
        let mut exited = false;
        while Instant::now() < end {
            if let Ok(Some(_)) = this.child.try_wait() {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = this.child.kill();
        let _ = this.child.wait();
        (this.lines.drain(Duration::from_millis(100)), exited)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn joined(out: &[String]) -> String {
    out.join("\n")
}

// ---------------------------------------------------------------------------------------------
// openssl s_client

fn s_client(server: &Server, extra: &[&str]) -> Client {
    let mut cmd = Command::new(openssl_cli());
    cmd.args([
        "s_client",
        "-dtls1_2",
        "-connect",
        &server.addr().to_string(),
    ])
    .args(extra);
    Client::spawn(&mut cmd)
}

/// One s_client connection with `extra` that echoes `line`; returns its output.
fn s_client_echo(server: &Server, extra: &[&str], line: &str) -> Vec<String> {
    let mut c = s_client(server, extra);
    c.expect_line("end of the handshake", WAIT, |l| {
        l.starts_with("New,") || l.starts_with("Reused,")
    });
    c.send(&format!("{line}\n"));
    c.expect_line("echo", WAIT, |l| l == line);
    // Lean while connected: the gauge is published every few milliseconds.
    server.stats_when("a lean peer", |s| s.lean == 1);
    c.finish(EXIT)
}

fn s_client_lean_echo(cipher: &str) {
    let server = Server::certificate();
    let out = s_client_echo(&server, &["-cipher", cipher], "hello over a lean peer");
    assert_eq!(
        count(&out, &format!("New, TLSv1.2, Cipher is {cipher}")),
        1,
        "{}",
        joined(&out)
    );
    server.assert_lean_echo(0, cipher, false, "hello over a lean peer");
    server.assert_all_closed_by_close_notify(1);
}

#[test]
fn s_client_aes128_gcm_echoes_through_a_lean_peer() {
    s_client_lean_echo("ECDHE-ECDSA-AES128-GCM-SHA256");
}

#[test]
fn s_client_chacha20_poly1305_echoes_through_a_lean_peer() {
    s_client_lean_echo("ECDHE-ECDSA-CHACHA20-POLY1305");
}

fn s_client_psk(extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "-psk",
        PSK_HEX,
        "-psk_identity",
        PSK_IDENTITY,
        "-cipher",
        "PSK-AES128-CCM8",
    ];
    args.extend_from_slice(extra);
    args.into_iter().map(String::from).collect()
}

fn psk_key() -> Vec<u8> {
    hex::decode(PSK_HEX).unwrap()
}

#[test]
fn s_client_psk_aes128_ccm8_echoes_through_a_lean_peer() {
    let server = Server::psk(PSK_IDENTITY.as_bytes(), &psk_key());
    let args = s_client_psk(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = s_client_echo(&server, &args, "psk over a lean peer");
    assert_eq!(
        count(&out, "New, TLSv1.2, Cipher is PSK-AES128-CCM8"),
        1,
        "{}",
        joined(&out)
    );
    server.assert_lean_echo(0, "PSK-AES128-CCM8", false, "psk over a lean peer");
    server.assert_all_closed_by_close_notify(1);
}

fn sess_file(dir: &tempfile::TempDir) -> String {
    dir.path().join("session.pem").to_str().unwrap().to_owned()
}

#[test]
fn s_client_resumes_a_gcm_session_whose_peer_was_lean_and_the_resumed_peer_goes_lean() {
    let server = Server::certificate();
    let dir = tempfile::tempdir().unwrap();
    let sess = sess_file(&dir);
    let cipher = "ECDHE-ECDSA-AES128-GCM-SHA256";
    let first = s_client_echo(&server, &["-cipher", cipher, "-sess_out", &sess], "first");
    assert_eq!(count(&first, "New, TLSv1.2"), 1, "{}", joined(&first));
    server.assert_lean_echo(0, cipher, false, "first");
    server.stats_when("the first peer closed", |s| s.closed == 1 && s.lean == 0);
    let again = s_client_echo(&server, &["-cipher", cipher, "-sess_in", &sess], "again");
    assert_eq!(
        count(&again, &format!("Reused, TLSv1.2, Cipher is {cipher}")),
        1,
        "{}",
        joined(&again)
    );
    server.assert_lean_echo(1, cipher, true, "again");
    let stats = server.stats_when("a resumption", |s| s.resumed == 1);
    assert_eq!(stats.handshakes, 2, "{stats:?}");
    assert_eq!(server.inner.cache.stats().hits, 1);
    server.assert_all_closed_by_close_notify(2);
}

#[test]
fn s_client_resumes_a_psk_ccm8_session_whose_peer_was_lean() {
    let server = Server::psk(PSK_IDENTITY.as_bytes(), &psk_key());
    let dir = tempfile::tempdir().unwrap();
    let sess = sess_file(&dir);
    let args = s_client_psk(&["-sess_out", &sess]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    s_client_echo(&server, &args, "first");
    server.assert_lean_echo(0, "PSK-AES128-CCM8", false, "first");
    let args = s_client_psk(&["-sess_in", &sess]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let again = s_client_echo(&server, &args, "again");
    assert_eq!(
        count(&again, "Reused, TLSv1.2, Cipher is PSK-AES128-CCM8"),
        1,
        "{}",
        joined(&again)
    );
    server.assert_lean_echo(1, "PSK-AES128-CCM8", true, "again");
    server.stats_when("a resumption", |s| s.resumed == 1);
    server.assert_all_closed_by_close_notify(2);
}

#[test]
fn s_client_reconnect_resumes_five_times_after_lean_peers() {
    let server = Server::certificate();
    let mut c = s_client(&server, &["-reconnect"]);
    let mut reused = 0;
    c.expect_line("five reuses", WAIT, |l| {
        reused += usize::from(l.starts_with("Reused,"));
        reused == 5
    });
    let out = c.finish(EXIT);
    assert_eq!(count(&out, "New,"), 1, "{}", joined(&out));
    let stats = server.stats_when("five resumptions", |s| s.resumed == 5);
    assert_eq!(stats.handshakes, 6, "{stats:?}");
    // Every one of the six peers went lean at the end of its handshake.
    let lean_at_connect = server
        .seen()
        .iter()
        .filter(|s| matches!(s, Seen::Connected { stats, .. } if stats.lean == 1))
        .count();
    assert_eq!(lean_at_connect, 6, "{:#?}", server.seen());
    server.assert_all_closed_by_close_notify(6);
}

/// The probe the other tests rely on tells the two paths apart: with lean peers off the same
/// exchange works, and the application sees no lean peer at the handshake's end nor at the line.
#[test]
fn with_lean_peers_off_s_client_echoes_and_no_peer_is_seen_lean() {
    let server = Server::start(|b| b.lean_peers(false));
    let cipher = "ECDHE-ECDSA-AES128-GCM-SHA256";
    let mut c = s_client(&server, &["-cipher", cipher]);
    c.expect_line("end of the handshake", WAIT, |l| l.starts_with("New,"));
    c.send("not lean\n");
    c.expect_line("echo", WAIT, |l| l == "not lean");
    c.finish(EXIT);
    let seen = server.seen();
    let lean: Vec<u64> = seen
        .iter()
        .filter_map(|s| match s {
            Seen::Connected { stats, .. } | Seen::Data { stats, .. } => Some(stats.lean),
            Seen::Closed(_) | Seen::Migrated { .. } => None,
        })
        .collect();
    assert_eq!(lean, vec![0, 0], "{seen:#?}");
    server.assert_all_closed_by_close_notify(1);
}

// ---------------------------------------------------------------------------------------------
// GnuTLS

/// DTLS 1.2 only, one AEAD suite.
fn gnutls_priority(kx: &str, cipher: &str) -> String {
    format!("NORMAL:-VERS-ALL:+VERS-DTLS1.2:-KX-ALL:+{kx}:-CIPHER-ALL:+{cipher}")
}

fn gnutls(server: &Server, priority: &str, extra: &[&str]) -> Client {
    let mut cmd = Command::new(gnutls_cli());
    cmd.args(["--udp", "--insecure", "--port", &server.port()])
        .arg(format!("--priority={priority}"))
        .args(extra)
        .arg("127.0.0.1");
    Client::spawn(&mut cmd)
}

/// One gnutls-cli connection that echoes `line` (after `ready`); returns its output.
fn gnutls_echo(
    server: &Server,
    priority: &str,
    extra: &[&str],
    ready: &str,
    line: &str,
) -> Vec<String> {
    let mut c = gnutls(server, priority, extra);
    c.expect_line(ready, WAIT, |l| l.contains(ready));
    c.send(&format!("{line}\n"));
    c.expect_line("echo", WAIT, |l| l == line);
    server.stats_when("a lean peer", |s| s.lean == 1);
    c.finish(EXIT)
}

#[test]
fn gnutls_cli_aes128_gcm_echoes_through_a_lean_peer() {
    let server = Server::certificate();
    let prio = gnutls_priority("ECDHE-ECDSA", "AES-128-GCM");
    let out = gnutls_echo(
        &server,
        &prio,
        &[],
        "Handshake was completed",
        "gnutls line",
    );
    assert!(
        out.iter()
            .any(|l| l.contains("(DTLS1.2-X.509)") && l.contains("(AES-128-GCM)")),
        "{}",
        joined(&out)
    );
    server.assert_lean_echo(0, "ECDHE-ECDSA-AES128-GCM-SHA256", false, "gnutls line");
    server.assert_all_closed_by_close_notify(1);
}

#[test]
fn gnutls_cli_chacha20_poly1305_echoes_through_a_lean_peer() {
    let server = Server::certificate();
    let prio = gnutls_priority("ECDHE-ECDSA", "CHACHA20-POLY1305");
    gnutls_echo(
        &server,
        &prio,
        &[],
        "Handshake was completed",
        "gnutls chacha",
    );
    server.assert_lean_echo(0, "ECDHE-ECDSA-CHACHA20-POLY1305", false, "gnutls chacha");
    server.assert_all_closed_by_close_notify(1);
}

#[test]
fn gnutls_cli_psk_aes128_ccm8_echoes_through_a_lean_peer() {
    let server = Server::psk(PSK_IDENTITY.as_bytes(), &psk_key());
    let prio = gnutls_priority("PSK", "AES-128-CCM-8");
    gnutls_echo(
        &server,
        &prio,
        &["--pskusername", PSK_IDENTITY, "--pskkey", PSK_HEX],
        "Handshake was completed",
        "gnutls psk",
    );
    server.assert_lean_echo(0, "PSK-AES128-CCM8", false, "gnutls psk");
    server.assert_all_closed_by_close_notify(1);
}

#[test]
fn gnutls_cli_resumes_a_session_whose_peer_was_lean() {
    let server = Server::certificate();
    let prio = gnutls_priority("ECDHE-ECDSA", "AES-128-GCM");
    // --resume: a full handshake, a close, a resuming handshake, then the interactive part.
    let out = gnutls_echo(
        &server,
        &prio,
        &["--resume"],
        "Resume Handshake was completed",
        "resumed line",
    );
    assert!(
        out.iter().any(|l| l.contains("This is a resumed session")),
        "{}",
        joined(&out)
    );
    let cipher = "ECDHE-ECDSA-AES128-GCM-SHA256";
    // The first connection sends nothing; it went lean at the end of its handshake.
    let seen = server.seen();
    assert!(
        matches!(seen.first(), Some(Seen::Connected { resumed: false, stats, .. }) if stats.lean == 1),
        "{seen:#?}"
    );
    server.assert_lean_echo(1, cipher, true, "resumed line");
    server.stats_when("a resumption", |s| s.resumed == 1 && s.handshakes == 2);
    server.assert_all_closed_by_close_notify(2);
}

// ---------------------------------------------------------------------------------------------
// Mbed TLS

#[test]
fn mbedtls_dtls_client_echoes_through_a_lean_peer() {
    let server = Server::certificate();
    let mut cmd = Command::new(built_peer("mbedtls/dtls_client"));
    cmd.env("DTLS_PORT", server.port());
    // dtls_client: handshake, "Echo this", one read, close_notify, exit.
    let (out, exited) = Client::spawn(&mut cmd).wait_exit(WAIT);
    assert!(exited, "dtls_client did not exit:\n{}", joined(&out));
    assert!(
        out.iter().any(|l| l.contains("9 bytes read")),
        "no echo: {}",
        joined(&out)
    );
    // Mbed TLS 2.28's default preference, which the server follows, puts ChaCha20-Poly1305
    // first.
    server.assert_lean_echo(0, "ECDHE-ECDSA-CHACHA20-POLY1305", false, "Echo this");
    server.assert_all_closed_by_close_notify(1);
}

fn ssl_client2(server: &Server, extra: &[&str]) -> (Vec<String>, bool) {
    let mut cmd = Command::new(built_peer("mbedtls/ssl_client2"));
    cmd.args([
        "server_addr=127.0.0.1".to_owned(),
        format!("server_port={}", server.port()),
        "dtls=1".into(),
        "force_version=dtls12".into(),
        "auth_mode=none".into(),
        "tickets=0".into(),
    ])
    .args(extra);
    Client::spawn(&mut cmd).wait_exit(WAIT)
}

#[test]
fn mbedtls_ssl_client2_resumes_a_session_whose_peer_was_lean() {
    let server = Server::certificate();
    let cipher = "TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256";
    let (out, exited) = ssl_client2(
        &server,
        &[
            &format!("force_ciphersuite={cipher}"),
            "reconnect=1",
            "debug_level=3",
        ],
    );
    assert!(exited, "ssl_client2 did not exit:\n{}", joined(&out));
    assert!(
        out.iter().any(|l| l.contains("a session has been resumed")),
        "the second handshake did not resume: {}",
        joined(&out)
    );
    let cipher = "ECDHE-ECDSA-AES128-GCM-SHA256";
    server.assert_lean_echo(0, cipher, false, "GET / HTTP/1.0");
    server.assert_lean_echo(1, cipher, true, "GET / HTTP/1.0");
    server.stats_when("a resumption", |s| s.resumed == 1 && s.handshakes == 2);
    server.assert_all_closed_by_close_notify(2);
}

#[test]
fn mbedtls_ssl_client2_psk_aes128_ccm8_echoes_through_a_lean_peer() {
    let server = Server::psk(PSK_IDENTITY.as_bytes(), &psk_key());
    let (out, exited) = ssl_client2(
        &server,
        &[
            "force_ciphersuite=TLS-PSK-WITH-AES-128-CCM-8",
            &format!("psk={PSK_HEX}"),
            &format!("psk_identity={PSK_IDENTITY}"),
        ],
    );
    assert!(exited, "ssl_client2 did not exit:\n{}", joined(&out));
    assert!(
        out.iter().any(|l| l.contains("bytes read")),
        "no echo: {}",
        joined(&out)
    );
    server.assert_lean_echo(0, "PSK-AES128-CCM8", false, "GET / HTTP/1.0");
    server.assert_all_closed_by_close_notify(1);
}

// ---------------------------------------------------------------------------------------------
// tinydtls

/// One tinydtls dtls-client connection (PSK-AES128-CCM8) that echoes `line` and closes.
fn tinydtls_echo(server: &Server, line: &str) {
    let mut cmd = Command::new(built_peer("tinydtls/dtls-client"));
    cmd.args([
        "-c",
        "TLS_PSK_WITH_AES_128_CCM_8",
        "127.0.0.1",
        &server.port(),
    ]);
    let mut c = Client::spawn(&mut cmd);
    // tinydtls's client drops a line typed before its handshake finished: type it once the
    // server's peer is lean, again every half second until the echo is there.
    server.stats_when("a lean peer", |s| s.lean == 1);
    let deadline = Instant::now() + WAIT;
    loop {
        c.send(&format!("{line}\n"));
        if c.lines.wait_line(Duration::from_millis(500), |l| l == line) || c.printed(|l| l == line)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no echo from tinydtls: {}",
            joined(&c.lines.output)
        );
    }
    // client:close sends close_notify, client:exit ends the program.
    c.send("client:close\n");
    server.stats_when("the peer closed", |s| s.closed == 1);
    c.send("client:exit\n");
    let (out, exited) = c.wait_exit(EXIT);
    assert!(exited, "tinydtls did not exit: {}", joined(&out));
}

#[test]
fn tinydtls_psk_aes128_ccm8_echoes_through_a_lean_peer() {
    let server = Server::psk(TINYDTLS_IDENTITY, TINYDTLS_KEY);
    tinydtls_echo(&server, "tinydtls line");
    server.assert_lean_echo(0, "PSK-AES128-CCM8", false, "tinydtls line");
    server.assert_all_closed_by_close_notify(1);
}

// ---------------------------------------------------------------------------------------------
// wolfSSL

/// wolfSSL's example client, run from a directory holding `certs/dh2048.pem` (it looks for its
/// "root" so), with `args`.
fn wolfssl_client(server: &Server, args: &[&str]) -> (Vec<String>, bool) {
    let mut cmd = Command::new(built_peer("wolfssl/client"));
    cmd.current_dir(interop_dir().join("wolfssl/root"))
        .args(["-u", "-v", "3", "-h", "127.0.0.1", "-p", &server.port()])
        .args(args);
    Client::spawn(&mut cmd).wait_exit(WAIT)
}

#[test]
fn wolfssl_client_aes128_gcm_echoes_through_a_lean_peer() {
    let server = Server::certificate();
    // -d: no verification of the server; -x: no client certificate.
    let (out, exited) = wolfssl_client(
        &server,
        &["-d", "-x", "-l", "ECDHE-ECDSA-AES128-GCM-SHA256"],
    );
    assert!(exited, "the client did not exit:\n{}", joined(&out));
    assert!(
        out.iter().any(|l| l == "hello wolfssl!"),
        "no echo: {}",
        joined(&out)
    );
    server.assert_lean_echo(0, "ECDHE-ECDSA-AES128-GCM-SHA256", false, "hello wolfssl!");
    server.assert_all_closed_by_close_notify(1);
}

#[test]
fn wolfssl_client_psk_aes128_ccm8_echoes_through_a_lean_peer() {
    let server = Server::psk(WOLFSSL_IDENTITY, WOLFSSL_KEY);
    let (out, exited) = wolfssl_client(&server, &["-s", "-l", "PSK-AES128-CCM-8"]);
    assert!(exited, "the client did not exit:\n{}", joined(&out));
    assert!(
        out.iter().any(|l| l == "hello wolfssl!"),
        "no echo: {}",
        joined(&out)
    );
    server.assert_lean_echo(0, "PSK-AES128-CCM8", false, "hello wolfssl!");
    server.assert_all_closed_by_close_notify(1);
}

#[test]
fn wolfssl_client_resumes_a_session_whose_peer_was_lean() {
    let server = Server::certificate();
    let (out, exited) = wolfssl_client(
        &server,
        &["-d", "-x", "-l", "ECDHE-ECDSA-AES128-GCM-SHA256", "-r"],
    );
    assert!(exited, "the client did not exit:\n{}", joined(&out));
    assert!(
        out.iter().any(|l| l == "reused session id"),
        "the second handshake did not resume: {}",
        joined(&out)
    );
    let cipher = "ECDHE-ECDSA-AES128-GCM-SHA256";
    server.assert_lean_echo(0, cipher, false, "hello wolfssl!");
    server.assert_lean_echo(1, cipher, true, "resuming wolfssl!");
    server.stats_when("a resumption", |s| s.resumed == 1 && s.handshakes == 2);
    server.assert_all_closed_by_close_notify(2);
}

// ---------------------------------------------------------------------------------------------
// The server's final flight lost: each client retransmits its own to a peer already lean.
// Not tinydtls: its example client never drives the library's retransmission timer
// (tests/dtls-client.c does not call dtls_check_retransmit), so it never retransmits anything,
// against any server; seen here with lean peers on and off alike.

#[test]
fn s_client_gets_the_final_flight_again_from_a_lean_peer_after_losing_it() {
    let server = Server::certificate().losing_the_final_flight();
    let cipher = "ECDHE-ECDSA-AES128-GCM-SHA256";
    s_client_echo(&server, &["-cipher", cipher], "after a lost flight");
    server.assert_final_flight_resent();
    server.assert_lean_echo(0, cipher, false, "after a lost flight");
    server.assert_all_closed_by_close_notify(1);
}

#[test]
fn gnutls_cli_gets_the_final_flight_again_from_a_lean_peer_after_losing_it() {
    let server = Server::certificate().losing_the_final_flight();
    let prio = gnutls_priority("ECDHE-ECDSA", "CHACHA20-POLY1305");
    gnutls_echo(
        &server,
        &prio,
        &[],
        "Handshake was completed",
        "after a lost flight",
    );
    server.assert_final_flight_resent();
    server.assert_lean_echo(
        0,
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        false,
        "after a lost flight",
    );
    server.assert_all_closed_by_close_notify(1);
}

#[test]
fn mbedtls_dtls_client_gets_the_final_flight_again_from_a_lean_peer_after_losing_it() {
    let server = Server::certificate().losing_the_final_flight();
    let mut cmd = Command::new(built_peer("mbedtls/dtls_client"));
    cmd.env("DTLS_PORT", server.port());
    let (out, exited) = Client::spawn(&mut cmd).wait_exit(WAIT);
    assert!(exited, "dtls_client did not exit:\n{}", joined(&out));
    assert!(
        out.iter().any(|l| l.contains("9 bytes read")),
        "no echo: {}",
        joined(&out)
    );
    server.assert_final_flight_resent();
    server.assert_lean_echo(0, "ECDHE-ECDSA-CHACHA20-POLY1305", false, "Echo this");
    server.assert_all_closed_by_close_notify(1);
}

#[test]
fn mbedtls_ssl_client2_psk_ccm8_gets_the_final_flight_again_from_a_lean_peer_after_losing_it() {
    let server = Server::psk(PSK_IDENTITY.as_bytes(), &psk_key()).losing_the_final_flight();
    let (out, exited) = ssl_client2(
        &server,
        &[
            "force_ciphersuite=TLS-PSK-WITH-AES-128-CCM-8",
            &format!("psk={PSK_HEX}"),
            &format!("psk_identity={PSK_IDENTITY}"),
        ],
    );
    assert!(exited, "ssl_client2 did not exit:\n{}", joined(&out));
    assert!(
        out.iter().any(|l| l.contains("bytes read")),
        "no echo: {}",
        joined(&out)
    );
    server.assert_final_flight_resent();
    server.assert_lean_echo(0, "PSK-AES128-CCM8", false, "GET / HTTP/1.0");
    server.assert_all_closed_by_close_notify(1);
}

#[test]
fn wolfssl_client_gets_the_final_flight_again_from_a_lean_peer_after_losing_it() {
    let server = Server::certificate().losing_the_final_flight();
    let cipher = "ECDHE-ECDSA-AES128-GCM-SHA256";
    let (out, exited) = wolfssl_client(&server, &["-d", "-x", "-l", cipher]);
    assert!(exited, "the client did not exit:\n{}", joined(&out));
    assert!(
        out.iter().any(|l| l == "hello wolfssl!"),
        "no echo: {}",
        joined(&out)
    );
    server.assert_final_flight_resent();
    server.assert_lean_echo(0, cipher, false, "hello wolfssl!");
    server.assert_all_closed_by_close_notify(1);
}

// ---------------------------------------------------------------------------------------------
// Connection IDs (RFC 9146) with wolfSSL, an independent implementation: wolfSSL built with
// --enable-dtlscid (target/interop/wolfssl-cid/), its example client (`--cid`), and
// tests/interop/wolfssl_cid_client.c, which closes its UDP socket every few lines and carries the
// association on over a new one (`wolfSSL_set_fd`), so the server sees its records come from a
// new source port and must answer there: the only place an echo can arrive, the old socket being
// closed.

/// The length of the server's connection IDs with no host id: worker, 6 random bytes.
const SERVER_CID_LEN: usize = 7;

/// What `cid_client` printed, parsed.
struct CidRun {
    out: Vec<String>,
}

/// The `key=value` fields of a line after its first word (`text=` takes the rest).
fn fields(line: &str) -> std::collections::HashMap<String, String> {
    let mut map = std::collections::HashMap::new();
    let mut rest = line.split_once(' ').map_or("", |(_, r)| r);
    while !rest.is_empty() {
        let (field, tail) = if rest.starts_with("text=") {
            (rest, "")
        } else {
            rest.split_once(' ').unwrap_or((rest, ""))
        };
        if let Some((k, v)) = field.split_once('=') {
            map.insert(k.to_owned(), v.to_owned());
        }
        rest = tail;
    }
    map
}

impl CidRun {
    fn lines<'a>(&'a self, word: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        self.out
            .iter()
            .filter(move |l| l.split(' ').next() == Some(word))
    }

    /// The `connected` lines' fields, in order.
    fn connected(&self) -> Vec<std::collections::HashMap<String, String>> {
        self.lines("connected").map(|l| fields(l)).collect()
    }

    /// The summary's counters.
    fn summary(&self, key: &str) -> u64 {
        let line = self
            .lines("summary")
            .next()
            .unwrap_or_else(|| panic!("no summary: {}", joined(&self.out)));
        fields(line)
            .get(key)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {key} in {line}")) as u64
    }

    /// Each move of association `assoc`: (old port, new port).
    fn moves(&self, assoc: u32) -> Vec<(u16, u16)> {
        self.lines("moved")
            .map(|l| fields(l))
            .filter(|f| f["a"] == assoc.to_string())
            .map(|f| (f["from"].parse().unwrap(), f["to"].parse().unwrap()))
            .collect()
    }

    /// Asserts that association `assoc`'s echoes each came back to the port the client was on
    /// when it sent the line: its first port, then each move's new one, in order; returns the
    /// ports by line text.
    fn assert_echoes_followed_the_moves(&self, assoc: u32) -> Vec<(String, u16)> {
        let mut port = None;
        let mut by_text = Vec::new();
        for l in &self.out {
            let f = fields(l);
            if f.get("a").map(String::as_str) != Some(&assoc.to_string()) {
                continue;
            }
            match l.split(' ').next() {
                Some("connected") => port = Some(f["port"].parse::<u16>().unwrap()),
                Some("moved") => {
                    assert_eq!(
                        Some(f["from"].parse().unwrap()),
                        port,
                        "{}",
                        joined(&self.out)
                    );
                    port = Some(f["to"].parse().unwrap());
                }
                Some("echo") => {
                    let at: u16 = f["port"].parse().unwrap();
                    assert_eq!(Some(at), port, "an echo on an old port: {l}");
                    by_text.push((f["text"].clone(), at));
                }
                _ => {}
            }
        }
        by_text
    }
}

/// Runs `cid_client` against `addr` with `args`; it must exit by itself and print its summary
/// (its exit status is 1 when a line was lost, which one test wants).
fn cid_client(addr: SocketAddr, args: &[&str]) -> CidRun {
    let mut cmd = Command::new(built_peer("wolfssl-cid/cid_client"));
    cmd.args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(args);
    let mut c = Client::spawn(&mut cmd);
    let end = Instant::now() + WAIT;
    let status = loop {
        if let Ok(Some(status)) = c.child.try_wait() {
            break Some(status);
        }
        if Instant::now() >= end {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = c.lines.drain(Duration::from_millis(100));
    let Some(status) = status else {
        panic!("cid_client did not exit:\n{}", joined(&out))
    };
    let run = CidRun { out };
    run.lines("summary").next().unwrap_or_else(|| {
        panic!(
            "cid_client exited ({status}) without a summary:\n{}",
            joined(&run.out)
        )
    });
    run
}

impl Server {
    /// Every move the server reported, in order: (previous, new).
    fn migrations(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.seen()
            .iter()
            .filter_map(|s| match s {
                Seen::Migrated { peer, previous } => Some((*previous, *peer)),
                _ => None,
            })
            .collect()
    }

    /// The address each record holding `text` came from (exactly one each).
    fn data_from(&self, text: &str) -> SocketAddr {
        let from: Vec<SocketAddr> = self
            .seen()
            .iter()
            .filter_map(|s| match s {
                Seen::Data { from, data, .. } if data == text.as_bytes() => Some(*from),
                _ => None,
            })
            .collect();
        assert_eq!(from.len(), 1, "records holding {text:?}: {from:?}");
        from[0]
    }

    /// Asserts the counters of a run in which the server followed `moves` moves and refused
    /// nothing: no record that did not open, no replay, no datagram with an unknown connection
    /// ID or for a known peer discarded, no move refused.
    fn assert_followed(&self, moves: u64) {
        let stats = self.stats_when("every move", |s| s.migrations == moves);
        assert_eq!(
            (
                stats.records_unopened,
                stats.records_replayed,
                stats.dropped_unknown_cid,
                stats.dropped_invalid,
                stats.dropped_not_client_hello,
                stats.migrations_refused_old,
            ),
            (0, 0, 0, 0, 0, 0),
            "{stats:?}"
        );
        assert_eq!(self.migrations().len() as u64, moves, "{:#?}", self.seen());
    }
}

/// Asserts that `run`'s `connected` line `nth` negotiated a connection ID: the server's is of
/// the server's layout (worker 0 first), the client's own is `own` (hex).
fn assert_cid_negotiated(run: &CidRun, nth: usize, own: &str, resumed: bool) {
    let connected = run.connected();
    let c = connected
        .get(nth)
        .unwrap_or_else(|| panic!("no connection {nth}: {}", joined(&run.out)));
    assert_eq!(
        c["cid"],
        "1",
        "no connection ID negotiated: {}",
        joined(&run.out)
    );
    let tx = hex::decode(&c["tx"]).unwrap();
    assert_eq!(tx.len(), SERVER_CID_LEN, "{}", joined(&run.out));
    assert_eq!(tx[0], 0, "the worker byte");
    assert_eq!(c["rx"], own, "{}", joined(&run.out));
    assert_eq!(c["resumed"], if resumed { "1" } else { "0" });
}

/// The server's view of association `assoc` of `run`: each line came from the port the client
/// printed for its echo, and the server's moves are the client's moves, in order.
fn assert_server_followed(server: &Server, run: &CidRun, assoc: u32) {
    let by_text = run.assert_echoes_followed_the_moves(assoc);
    for (text, port) in &by_text {
        assert_eq!(
            server.data_from(text),
            SocketAddr::from(([127, 0, 0, 1], *port)),
            "{text:?} came from elsewhere than the port its echo reached"
        );
    }
    let client_moves = run.moves(assoc);
    let server_moves: Vec<(u16, u16)> = server
        .migrations()
        .iter()
        .filter(|(previous, _)| {
            client_moves
                .iter()
                .any(|(from, _)| previous.port() == *from)
        })
        .map(|(previous, peer)| (previous.port(), peer.port()))
        .collect();
    assert_eq!(server_moves, client_moves, "{:#?}", server.seen());
}

#[test]
fn wolfssl_cid_client_changes_its_source_port_and_every_echo_comes_back_to_the_new_address() {
    let server = Server::certificate();
    let cipher = "ECDHE-ECDSA-AES128-GCM-SHA256";
    // 12 lines, a new socket before lines 4, 7 and 10.
    let run = cid_client(
        server.addr(),
        &["-c", "0a0b0c0d", "-n", "12", "-k", "3", "-l", cipher],
    );
    assert_eq!(
        (
            run.summary("echoed"),
            run.summary("lost"),
            run.summary("moves")
        ),
        (12, 0, 3),
        "{}",
        joined(&run.out)
    );
    assert_eq!(run.summary("survived"), 3);
    assert_cid_negotiated(&run, 0, "0a0b0c0d", false);
    assert_server_followed(&server, &run, 0);
    server.assert_lean_echo(0, cipher, false, "cid a0 r0 l1");
    server.assert_lean_echo(0, cipher, false, "cid a0 r0 l12");
    server.assert_followed(3);
    server.assert_all_closed_by_close_notify(1);
}

#[test]
fn wolfssl_cid_client_asking_for_no_cid_in_the_servers_records_moves_too() {
    let server = Server::certificate();
    let cipher = "ECDHE-ECDSA-CHACHA20-POLY1305";
    // -i: a zero-length connection ID for the records the server sends (RFC 9146 §3): they go
    // in the plain format, the client's carry the server's.
    let run = cid_client(server.addr(), &["-i", "-n", "8", "-k", "2", "-l", cipher]);
    assert_eq!(
        (
            run.summary("echoed"),
            run.summary("lost"),
            run.summary("moves")
        ),
        (8, 0, 3),
        "{}",
        joined(&run.out)
    );
    assert_cid_negotiated(&run, 0, "", false);
    assert_server_followed(&server, &run, 0);
    server.assert_lean_echo(0, cipher, false, "cid a0 r0 l8");
    server.assert_followed(3);
    server.assert_all_closed_by_close_notify(1);
}

#[test]
fn wolfssl_cid_client_resumes_a_cid_session_and_moves_again() {
    let server = Server::psk(WOLFSSL_IDENTITY, WOLFSSL_KEY);
    let psk = format!(
        "{}:{}",
        String::from_utf8_lossy(WOLFSSL_IDENTITY),
        hex::encode(WOLFSSL_KEY)
    );
    // Two connections (-r: the second resumes the first's session), 6 lines and 2 moves each.
    let run = cid_client(
        server.addr(),
        &[
            "-c",
            "abcd",
            "-n",
            "6",
            "-k",
            "2",
            "-r",
            "-l",
            "PSK-AES128-CCM-8",
            "-s",
            &psk,
        ],
    );
    assert_eq!(
        (
            run.summary("echoed"),
            run.summary("lost"),
            run.summary("moves")
        ),
        (12, 0, 4),
        "{}",
        joined(&run.out)
    );
    assert_cid_negotiated(&run, 0, "abcd", false);
    assert_cid_negotiated(&run, 1, "abcd", true);
    let (first, second) = (&run.connected()[0], &run.connected()[1]);
    assert_ne!(
        first["tx"], second["tx"],
        "a fresh connection ID for the resumption"
    );
    assert_server_followed(&server, &run, 0);
    server.assert_lean_echo(0, "PSK-AES128-CCM8", false, "cid a0 r0 l6");
    server.assert_lean_echo(1, "PSK-AES128-CCM8", true, "cid a0 r1 l6");
    server.stats_when("a resumption", |s| s.resumed == 1 && s.handshakes == 2);
    server.assert_followed(4);
    server.assert_all_closed_by_close_notify(2);
}

#[test]
fn four_wolfssl_cid_associations_at_once_each_moving_every_four_lines() {
    let server = Server::certificate();
    let run = cid_client(
        server.addr(),
        &["-m", "4", "-c", "c1d2", "-n", "40", "-k", "4", "-q"],
    );
    // Nine moves each (before lines 5, 9, ... 37).
    assert_eq!(
        (
            run.summary("echoed"),
            run.summary("lost"),
            run.summary("moves"),
            run.summary("survived")
        ),
        (160, 0, 36, 36),
        "{}",
        joined(&run.out)
    );
    for nth in 0..4 {
        assert_cid_negotiated(&run, nth, "c1d2", false);
    }
    let mut server_moves: Vec<(u16, u16)> = server
        .migrations()
        .iter()
        .map(|(p, n)| (p.port(), n.port()))
        .collect();
    let mut client_moves: Vec<(u16, u16)> = (0..4).flat_map(|a| run.moves(a)).collect();
    server_moves.sort_unstable();
    client_moves.sort_unstable();
    assert_eq!(server_moves, client_moves);
    server.assert_followed(36);
    server.assert_all_closed_by_close_notify(4);
}

/// The baseline: the same client without a connection ID. A new source port is a new, unknown
/// peer, whose records are dropped (not ClientHellos), so no echo comes back after the move.
#[test]
fn without_a_cid_the_wolfssl_client_loses_its_association_when_its_port_changes() {
    let server = Server::certificate();
    let run = cid_client(
        server.addr(),
        &["-n", "3", "-k", "2", "-t", "200", "-R", "1"],
    );
    let connected = run.connected();
    assert_eq!(connected[0]["cid"], "0", "{}", joined(&run.out));
    // Line 2 echoed; line 3, after the move, sent twice and lost.
    assert_eq!(
        (
            run.summary("echoed"),
            run.summary("lost"),
            run.summary("moves")
        ),
        (2, 1, 1),
        "{}",
        joined(&run.out)
    );
    let stats = server.stats_when("the records from the new port dropped", |s| {
        s.dropped_not_client_hello >= 2
    });
    assert_eq!(
        (stats.migrations, stats.lean, stats.handshakes),
        (0, 1, 1),
        "{stats:?}"
    );
    assert!(server.migrations().is_empty());
}

// The records on the wire, seen by a relay between the client and the server that gives each of
// the client's source addresses its own upstream socket (a NAT): a move of the client is a move
// for the server too.

/// One datagram through the [`NatRelay`].
#[derive(Debug, Clone)]
struct Captured {
    to_server: bool,
    /// The upstream socket it went through (the address the server saw).
    upstream: SocketAddr,
    datagram: Vec<u8>,
}

struct NatRelay {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Captured>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NatRelay {
    fn start(server: SocketAddr) -> Self {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        front.set_nonblocking(true).unwrap();
        let addr = front.local_addr().unwrap();
        let log: Arc<Mutex<Vec<Captured>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut ups: Vec<(SocketAddr, UdpSocket)> = Vec::new();
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let mut busy = false;
                    while let Ok((n, from)) = front.recv_from(&mut buf) {
                        busy = true;
                        let i = match ups.iter().position(|(c, _)| *c == from) {
                            Some(i) => i,
                            None => {
                                let up = UdpSocket::bind("127.0.0.1:0").unwrap();
                                up.connect(server).unwrap();
                                up.set_nonblocking(true).unwrap();
                                ups.push((from, up));
                                ups.len() - 1
                            }
                        };
                        let up = &ups[i].1;
                        log.lock().push(Captured {
                            to_server: true,
                            upstream: up.local_addr().unwrap(),
                            datagram: buf[..n].to_vec(),
                        });
                        let _ = up.send(&buf[..n]);
                    }
                    for (client, up) in &ups {
                        while let Ok(n) = up.recv(&mut buf) {
                            busy = true;
                            log.lock().push(Captured {
                                to_server: false,
                                upstream: up.local_addr().unwrap(),
                                datagram: buf[..n].to_vec(),
                            });
                            let _ = front.send_to(&buf[..n], client);
                        }
                    }
                    if !busy {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            })
        };
        Self {
            addr,
            log,
            stop,
            thread: Some(thread),
        }
    }

    fn captured(&self) -> Vec<Captured> {
        self.log.lock().clone()
    }
}

impl Drop for NatRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One record's header as it is on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WireRecord {
    content_type: u8,
    epoch: u16,
    seq: u64,
    cid: Vec<u8>,
    /// The fragment's length, as the header says.
    len: usize,
}

/// The records of `datagram`, a `tls12_cid` record's connection ID being `cid_len` bytes
/// (RFC 9146 §4: type, version, epoch, sequence number, CID, length). Fails on a datagram that
/// does not split into whole records.
fn wire_records(mut datagram: &[u8], cid_len: usize) -> Vec<WireRecord> {
    let mut out = Vec::new();
    while !datagram.is_empty() {
        assert!(datagram.len() >= 13, "a truncated record: {datagram:02x?}");
        // DTLS 1.2, or 1.0 (a ClientHello's record version, RFC 6347 §4.2.1).
        assert!(
            matches!(datagram[1..3], [0xfe, 0xfd | 0xff]),
            "{datagram:02x?}"
        );
        let content_type = datagram[0];
        let cid = if content_type == 25 { cid_len } else { 0 };
        let at = 11 + cid;
        let len = usize::from(u16::from_be_bytes([datagram[at], datagram[at + 1]]));
        let epoch = u16::from_be_bytes([datagram[3], datagram[4]]);
        let mut seq = [0u8; 8];
        seq[2..].copy_from_slice(&datagram[5..11]);
        out.push(WireRecord {
            content_type,
            epoch,
            seq: u64::from_be_bytes(seq),
            cid: datagram[11..11 + cid].to_vec(),
            len,
        });
        datagram = datagram
            .get(at + 2 + len..)
            .unwrap_or_else(|| panic!("a record longer than its datagram"));
    }
    out
}

/// Asserts RFC 9146's framing of the protected records in `captured`: every record of epoch 1
/// or later from the client is a `tls12_cid` record carrying one connection ID of the server's
/// layout, which is returned; every one from the server is a `tls12_cid` record carrying
/// `client_cid`, or, if that is empty, a record of RFC 6347's format (no `tls12_cid` at all).
/// Epoch-0 records are plain both ways. Returns the server's connection ID and the number of
/// protected records each way.
fn assert_rfc9146_framing(captured: &[Captured], client_cid: &[u8]) -> (Vec<u8>, usize, usize) {
    let mut server_cid: Option<Vec<u8>> = None;
    let (mut up, mut down) = (0, 0);
    for c in captured {
        let cid_len = if c.to_server {
            SERVER_CID_LEN
        } else {
            client_cid.len()
        };
        for r in wire_records(&c.datagram, cid_len) {
            if r.epoch == 0 {
                assert!(
                    matches!(r.content_type, 20..=22),
                    "an epoch-0 record of type {}: {r:?}",
                    r.content_type
                );
                continue;
            }
            if c.to_server {
                up += 1;
                assert_eq!(
                    r.content_type, 25,
                    "a protected client record not tls12_cid"
                );
                match &server_cid {
                    None => {
                        assert_eq!(r.cid[0], 0, "the worker byte of the server's cid");
                        server_cid = Some(r.cid.clone());
                    }
                    Some(cid) => assert_eq!(&r.cid, cid, "one connection ID throughout"),
                }
            } else {
                down += 1;
                if client_cid.is_empty() {
                    assert!(
                        matches!(r.content_type, 21..=23),
                        "with an empty cid the server's records are plain: {r:?}"
                    );
                } else {
                    assert_eq!(
                        r.content_type, 25,
                        "a protected server record not tls12_cid"
                    );
                    assert_eq!(r.cid, client_cid, "the client's connection ID");
                }
            }
        }
    }
    (server_cid.expect("no protected client record"), up, down)
}

#[test]
fn wolfssl_cid_records_on_the_wire_are_rfc9146_tls12_cid_records_and_moves_go_through_a_nat() {
    for own in ["5eed", ""] {
        let server = Server::certificate();
        let relay = NatRelay::start(server.addr());
        let mut args = vec!["-n", "6", "-k", "2"];
        if own.is_empty() {
            args.push("-i");
        } else {
            args.extend(["-c", own]);
        }
        let run = cid_client(relay.addr, &args);
        assert_eq!(
            (
                run.summary("echoed"),
                run.summary("lost"),
                run.summary("moves")
            ),
            (6, 0, 2),
            "{}",
            joined(&run.out)
        );
        assert_cid_negotiated(&run, 0, own, false);
        server.assert_followed(2);
        server.assert_all_closed_by_close_notify(1);
        let captured = relay.captured();
        let own_bytes = hex::decode(own).unwrap();
        let (server_cid, up, down) = assert_rfc9146_framing(&captured, &own_bytes);
        assert_eq!(hex::encode(&server_cid), run.connected()[0]["tx"]);
        // Finished, six lines and close_notify each way.
        assert_eq!((up, down), (8, 8), "cid {own:?}");
        // The server's moves are the NAT's upstream sockets, in the order the client used them.
        let mut upstreams: Vec<SocketAddr> = Vec::new();
        for c in captured.iter().filter(|c| c.to_server) {
            if !upstreams.contains(&c.upstream) {
                upstreams.push(c.upstream);
            }
        }
        assert_eq!(upstreams.len(), 3, "three client sockets, three upstreams");
        let moves: Vec<_> = upstreams.windows(2).map(|w| (w[0], w[1])).collect();
        assert_eq!(server.migrations(), moves);
        // Every datagram the server sent after a move went to the newest address.
        for c in captured.iter().filter(|c| !c.to_server) {
            let last_up = captured
                .iter()
                .take_while(|d| !std::ptr::eq(*d, c))
                .filter(|d| d.to_server)
                .last()
                .map(|d| d.upstream);
            assert_eq!(Some(c.upstream), last_up, "a datagram to an old address");
        }
    }
}

/// wolfSSL's own example client with `--cid` over DTLS 1.2 (`-v 3`): it negotiates a connection
/// ID with the server and echoes its line in `tls12_cid` records (it never changes its socket).
#[test]
fn wolfssl_example_client_negotiates_a_cid_over_dtls_1_2() {
    let server = Server::certificate();
    let relay = NatRelay::start(server.addr());
    let cipher = "ECDHE-ECDSA-AES128-GCM-SHA256";
    let mut cmd = Command::new(built_peer("wolfssl-cid/client"));
    cmd.current_dir(interop_dir().join("wolfssl-cid/root"))
        .args(["-u", "-v", "3", "-h", "127.0.0.1", "-p"])
        .arg(relay.addr.port().to_string())
        // `--cid` takes its (optional) value from the next argument: the ASCII of "abc".
        .args(["-d", "-x", "-l", cipher, "--cid", "abc"]);
    let (out, exited) = Client::spawn(&mut cmd).wait_exit(WAIT);
    assert!(exited, "the client did not exit:\n{}", joined(&out));
    for line in ["CID extension was negotiated", "hello wolfssl!"] {
        assert!(
            out.iter().any(|l| l == line),
            "no {line:?}: {}",
            joined(&out)
        );
    }
    server.assert_lean_echo(0, cipher, false, "hello wolfssl!");
    server.assert_all_closed_by_close_notify(1);
    let (server_cid, up, down) = assert_rfc9146_framing(&relay.captured(), b"abc");
    assert_eq!(server_cid.len(), SERVER_CID_LEN);
    // Finished, the line, close_notify each way.
    assert_eq!((up, down), (3, 3));
}

/// The server's final flight (ChangeCipherSpec, and Finished as a `tls12_cid` record) lost on
/// the way: wolfSSL retransmits its own final flight, Finished in a `tls12_cid` record, to a
/// peer already lean, which answers with the flight it kept, framed for the client's CID.
#[test]
fn wolfssl_cid_client_gets_the_final_flight_again_from_a_lean_peer_after_losing_it() {
    for own in ["f1", ""] {
        let server = Server::certificate().losing_the_final_flight();
        let mut args = vec!["-n", "2"];
        if own.is_empty() {
            args.push("-i");
        } else {
            args.extend(["-c", own]);
        }
        let run = cid_client(server.addr(), &args);
        assert_eq!(
            (run.summary("echoed"), run.summary("lost")),
            (2, 0),
            "{}",
            joined(&run.out)
        );
        assert_cid_negotiated(&run, 0, own, false);
        server.assert_final_flight_resent();
        server.assert_lean_echo(0, "ECDHE-ECDSA-AES256-GCM-SHA384", false, "cid a0 r0 l2");
        server.assert_all_closed_by_close_notify(1);
    }
}

/// A server with connection IDs off does not answer the extension; wolfSSL then goes on without
/// one (RFC 9146 §3: a CID is in use only if the server's ServerHello carries the extension),
/// its records in the plain format, and the echo works.
#[test]
fn wolfssl_cid_client_against_a_server_with_connection_ids_off_goes_on_without() {
    let server = Server::start(|b| b.connection_id(false));
    let cipher = "ECDHE-ECDSA-AES128-GCM-SHA256";
    let relay = NatRelay::start(server.addr());
    let run = cid_client(relay.addr, &["-c", "0a0b", "-n", "3", "-l", cipher]);
    assert_eq!(run.connected()[0]["cid"], "0", "{}", joined(&run.out));
    assert_eq!((run.summary("echoed"), run.summary("lost")), (3, 0));
    server.assert_lean_echo(0, cipher, false, "cid a0 r0 l3");
    server.assert_all_closed_by_close_notify(1);
    for c in relay.captured() {
        for r in wire_records(&c.datagram, 0) {
            assert_ne!(r.content_type, 25, "a tls12_cid record: {r:?}");
        }
    }
}
