//! The DTLS server library against real, independent DTLS 1.2 clients, each echoing a line
//! through a peer that went lean (its records protected and opened by the endpoint, its `Ssl`
//! freed): `openssl s_client` (AES-GCM, ChaCha20-Poly1305, PSK with AES-CCM8), GnuTLS's
//! `gnutls-cli --udp`, Mbed TLS's `dtls_client` and `ssl_client2`, tinydtls's `dtls-client`
//! (PSK-AES128-CCM8) and wolfSSL's example client; resumption of a session whose peer was lean,
//! with every client that resumes (not tinydtls, not `dtls_client`: neither offers a session);
//! and the server's final flight lost on the way (a UDP relay drops it), so that the client
//! retransmits to a peer already lean, which sends the flight it kept (not tinydtls, whose
//! example client never retransmits).
//!
//! The server runs in-process on 127.0.0.1:0 with one worker and an echo application that
//! notes the endpoint's counters at each event, so a test can tell that the line it sent arrived
//! while its peer was lean (`EndpointStats::lean`, which only the lean path raises). Each client
//! is a child process, bounded in time and killed by PID when its test ends.
//!
//! The clients other than `openssl` come from `scripts/interop_peers.sh` (which `.ci/run` runs
//! first): Debian's `gnutls-bin`, and wolfSSL, Mbed TLS and tinydtls built from the sources their
//! `-sys` crates ship, under `target/interop/` (or `$INTEROP_DIR`). A missing client fails its
//! test with a message saying how to get it; nothing is skipped.

mod support;

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl_session_cache::{
    AppContext, CloseReason, DsmConfig, EndpointStats, Event, ServerConfigBuilder,
};
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
        data: Vec<u8>,
        stats: EndpointStats,
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
                            data: data.clone(),
                            stats,
                        });
                        let _ = ctx.send(peer, &data);
                    }
                    Event::Closed { reason, .. } => log.lock().push(Seen::Closed(reason)),
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
            Seen::Data { data, stats } if String::from_utf8_lossy(data).contains(line) => {
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
            Seen::Closed(_) => None,
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
