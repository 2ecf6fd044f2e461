//! The echo server example as separate processes: two "hosts" sharing sessions through one
//! `redis-server` (feature `redis`), Redis stopped under a running server, and sessions that
//! survive a clean restart through `--snapshot` (and a truncated or foreign snapshot refused).
//!
//! Every server process listens on 127.0.0.1:0, is stopped by PID (SIGTERM/SIGINT for a clean
//! shutdown, SIGKILL from a drop guard otherwise), and every wait is bounded.
#![cfg(feature = "server")]

mod support;

#[cfg(feature = "redis")]
#[path = "support/redis_server.rs"]
mod redis_server;

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use openssl_session_cache::KeyRing;

use support::s_client::{count, s_client_echo, Lines, SClient};

/// How long a server process may take to print `listening on`.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a server process may take to exit after SIGTERM/SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long building the example may take when the test has to build it.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

/// The `dtls_echo_server` example binary, built (once per test run) by the cargo that runs the
/// tests, into the same target directory and profile, with the features of this test build.
fn echo_server_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // The test binary is <target>/<profile>/deps/farm-HASH; the example lands in
        // <target>/<profile>/examples/. `cargo test` builds examples already; asking cargo again
        // is a no-op then, and builds it (with this build's features) when only this test was
        // selected or an older build without the features is lying there.
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary under <target>/<profile>/deps");
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("profile directory name")
            .to_owned();
        let mut target_dir = profile_dir.parent().expect("target directory");
        let mut cmd = Command::new(env!("CARGO"));
        // Not the variables cargo set for this test process (CARGO_MANIFEST_DIR, CARGO_PKG_*):
        // ring's build script reruns when they differ from the outer cargo's (its
        // rerun-if-env-changed list names them), which rebuilt ring, rustls and redis here and
        // again at the next `cargo test`, about two minutes each time.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_MANIFEST_")
                || [
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                ]
                .contains(&key.as_ref())
            {
                cmd.env_remove(key.as_ref());
            }
        }
        cmd.args(["build", "--quiet", "--example", "dtls_echo_server"])
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
        // A build for an explicit --target (e.g. under a sanitizer) puts a triple directory
        // between the target directory and the profile.
        let triple = target_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("");
        if triple.contains("-unknown-") || triple.contains("-apple-") {
            cmd.args(["--target", triple]);
            target_dir = target_dir.parent().expect("target directory");
        }
        cmd.arg("--target-dir").arg(target_dir);
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        // This build's own features, all of them: a different set (say `redis` alone under
        // `--all-features`) makes cargo rebuild the dependencies whose features differ (ring,
        // rustls, redis) here, and again for the next `cargo test`.
        let features: Vec<&str> = [
            ("redis", cfg!(feature = "redis")),
            ("tokio", cfg!(feature = "tokio")),
            ("metrics", cfg!(feature = "metrics")),
            ("__fuzzing", cfg!(feature = "__fuzzing")),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
        if !features.is_empty() {
            cmd.args(["--features", &features.join(",")]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .spawn()
            .expect("run cargo build --example dtls_echo_server");
        let status = wait_bounded(&mut child, BUILD_TIMEOUT)
            .unwrap_or_else(|| panic!("building the example took over {BUILD_TIMEOUT:?}"));
        assert!(status.success(), "cargo build --example failed: {status}");
        let bin = profile_dir
            .join("examples")
            .join(format!("dtls_echo_server{}", std::env::consts::EXE_SUFFIX));
        assert!(bin.is_file(), "no example binary at {}", bin.display());
        bin
    })
}

/// Waits at most `limit` for `child` to exit; kills it (by PID) and returns `None` on time-out.
fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One echo server process; killed (SIGKILL, by PID) if still running when dropped.
struct EchoServer {
    child: Child,
    addr: SocketAddr,
    /// Everything it prints, stdout and stderr interleaved as read.
    lines: Lines,
}

impl EchoServer {
    /// Starts `dtls_echo_server --listen 127.0.0.1:0 --stats-interval 0 <args>` and waits for
    /// its `listening on ADDR` line.
    fn start(args: &[&str]) -> Self {
        Self::start_on("127.0.0.1:0", args, None)
    }

    /// [`start`](Self::start) with `RUST_LOG` at `level`.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    fn start_logging(args: &[&str], level: &str) -> Self {
        Self::start_on("127.0.0.1:0", args, Some(level))
    }

    /// [`start`](Self::start) on `listen`, with `RUST_LOG` at `level` (default: `$ECHO_LOG`,
    /// or `info`).
    fn start_on(listen: &str, args: &[&str], level: Option<&str>) -> Self {
        let level = level
            .map(str::to_owned)
            .unwrap_or_else(|| std::env::var("ECHO_LOG").unwrap_or("info".into()));
        let mut child = Command::new(echo_server_bin())
            .args(["--listen", listen, "--stats-interval", "0"])
            .args(args)
            .env("RUST_LOG", level)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dtls_echo_server");
        let stdout: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let stderr: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        let mut server = Self {
            child,
            addr: ([0, 0, 0, 0], 0).into(),
            lines: Lines::read([stdout, stderr]),
        };
        let mut addr = None;
        let found = server.wait_line(START_TIMEOUT, |l| {
            addr = l.strip_prefix("listening on ").and_then(|a| a.parse().ok());
            addr.is_some()
        });
        if !found {
            let status = server.child.try_wait().ok().flatten();
            panic!(
                "dtls_echo_server {args:?} did not print `listening on` within {START_TIMEOUT:?} \
                 (exit status {status:?}); it printed:\n{}",
                server.lines.output.join("\n")
            );
        }
        server.addr = addr.unwrap();
        server
    }

    /// Waits (at most `limit`) for an output line satisfying `pred`, looking at the lines
    /// already read first.
    fn wait_line(&mut self, limit: Duration, mut pred: impl FnMut(&str) -> bool) -> bool {
        self.lines.output.iter().any(|l| pred(l)) || self.lines.wait_line(limit, pred)
    }

    /// Sends `signal` (`-TERM`, `-INT`) to the process, waits (bounded) for a clean exit and
    /// returns everything it printed.
    fn stop(mut self, signal: &str) -> Vec<String> {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
        let exit = wait_bounded(&mut self.child, STOP_TIMEOUT);
        // The readers end at EOF once the process is gone.
        let output = self.lines.drain(Duration::from_secs(1));
        match exit {
            Some(s) if s.success() => output,
            other => panic!(
                "dtls_echo_server did not exit cleanly within {STOP_TIMEOUT:?} after kill \
                 {signal}: {other:?}; it printed:\n{}",
                output.join("\n")
            ),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn has(out: &[String], needle: &str) -> bool {
    out.iter().any(|l| l.contains(needle))
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn key_file(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    KeyRing::generate().unwrap().write_file(&path).unwrap();
    path
}

#[test]
fn snapshot_survives_a_clean_restart_and_a_bad_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "sessions.key");
    let snap = dir.path().join("sessions.snap");
    let sess = dir.path().join("s.pem");
    let flags = ["--snapshot", path_str(&snap), "--store-key", path_str(&key)];

    // First start: no snapshot yet; one full handshake; SIGTERM saves it.
    let server = EchoServer::start(&flags);
    assert!(
        has(&server.lines.output, "no snapshot at"),
        "{:?}",
        server.lines.output
    );
    let out = s_client_echo(server.addr, &["-sess_out", path_str(&sess)], "one");
    assert_eq!(count(&out, "New,"), 1, "{out:?}");
    let printed = server.stop("-TERM");
    assert!(has(&printed, "saved 1 sessions to snapshot"), "{printed:?}");
    assert!(snap.is_file());

    // Restart: the session is loaded and resumes; SIGINT saves it again.
    let server = EchoServer::start(&flags);
    assert!(
        has(&server.lines.output, "loaded 1 sessions from snapshot"),
        "{:?}",
        server.lines.output
    );
    let out = s_client_echo(server.addr, &["-sess_in", path_str(&sess)], "two");
    assert_eq!(count(&out, "Reused,"), 1, "{out:?}");
    let printed = server.stop("-INT");
    assert!(has(&printed, "saved 1 sessions to snapshot"), "{printed:?}");

    // A truncated snapshot: refused with a clear message, moved aside, the server starts empty.
    let bytes = std::fs::read(&snap).unwrap();
    std::fs::write(&snap, &bytes[..bytes.len() / 2]).unwrap();
    let mut server = EchoServer::start(&flags);
    assert!(
        server.wait_line(Duration::from_secs(5), |l| l.contains("refused")
            && l.contains("truncated")
            && l.contains("starting with an empty session cache")),
        "{:?}",
        server.lines.output
    );
    assert!(
        !has(&server.lines.output, "loaded"),
        "{:?}",
        server.lines.output
    );
    let mut refused = snap.as_os_str().to_owned();
    refused.push(".refused");
    assert_eq!(std::fs::read(&refused).unwrap(), &bytes[..bytes.len() / 2]);
    let out = s_client_echo(server.addr, &["-sess_in", path_str(&sess)], "three");
    assert_eq!(count(&out, "Reused,"), 0, "{out:?}");
    assert_eq!(count(&out, "New,"), 1, "{out:?}");
    let printed = server.stop("-TERM");
    assert!(has(&printed, "saved 1 sessions to snapshot"), "{printed:?}");

    // A foreign snapshot (sealed under another key ring): refused as well.
    let other_key = key_file(dir.path(), "other.key");
    let mut server = EchoServer::start(&[
        "--snapshot",
        path_str(&snap),
        "--store-key",
        path_str(&other_key),
    ]);
    assert!(
        server.wait_line(Duration::from_secs(5), |l| l.contains("refused")
            && l.contains("key ring does not hold")),
        "{:?}",
        server.lines.output
    );
    drop(server);
}

/// s_client flags for a PSK-AES128-CCM8 connection as `identity` with `key_hex`.
fn psk_flags<'a>(identity: &'a str, key_hex: &'a str) -> [&'a str; 6] {
    [
        "-psk",
        key_hex,
        "-psk_identity",
        identity,
        "-cipher",
        "PSK-AES128-CCM8",
    ]
}

#[test]
fn a_psk_session_resumes_across_a_restart_only_while_its_identity_keeps_its_key() {
    const KEY1: &str = "00112233445566778899aabbccddeeff";
    const KEY2: &str = "ffeeddccbbaa99887766554433221100";
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "sessions.key");
    let snap = dir.path().join("sessions.snap");
    let sess = dir.path().join("psk.pem");
    let client1 = format!("client1:{KEY1}");
    let client2 = format!("client2:{KEY2}");
    let store = ["--snapshot", path_str(&snap), "--store-key", path_str(&key)];
    let with = |psks: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = store.iter().map(|s| s.to_string()).collect();
        for p in psks {
            args.extend(["--psk".to_string(), p.to_string()]);
        }
        args
    };
    let start = |args: &[String]| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        EchoServer::start(&refs)
    };

    // client1's session is made and saved.
    let server = start(&with(&[&client1, &client2]));
    let out = s_client_echo(
        server.addr,
        &[
            &psk_flags("client1", KEY1)[..],
            &["-sess_out", path_str(&sess)],
        ]
        .concat(),
        "made",
    );
    assert_eq!(count(&out, "New,"), 1, "{out:?}");
    assert!(has(&server.stop("-TERM"), "saved 1 sessions to snapshot"));

    // Restarted with client1 still known under the same key: it resumes (both identities
    // given by repeating --psk).
    let server = start(&with(&[&client2, &client1]));
    let resumed = s_client_echo(
        server.addr,
        &[
            &psk_flags("client1", KEY1)[..],
            &["-sess_in", path_str(&sess)],
        ]
        .concat(),
        "again",
    );
    assert_eq!(count(&resumed, "Reused,"), 1, "{resumed:?}");
    assert!(has(&server.stop("-TERM"), "saved 1 sessions to snapshot"));

    // Restarted with client1 revoked: its full handshake is refused, and so is its resumption.
    let server = start(&with(&[&client2]));
    let mut c = SClient::spawn(
        server.addr,
        &[
            &psk_flags("client1", KEY1)[..],
            &["-sess_in", path_str(&sess)],
        ]
        .concat(),
    );
    c.send_line("revoked");
    let echoed = c.wait_line(Duration::from_secs(3), |l| l == "revoked");
    let out = c.finish(Duration::from_secs(5));
    assert!(!echoed, "a revoked identity was served: {out:?}");
    assert_eq!(
        count(&out, "Reused,"),
        0,
        "a revoked identity resumed: {out:?}"
    );
    // client2 is served as before.
    let out = s_client_echo(server.addr, &psk_flags("client2", KEY2), "other");
    assert_eq!(count(&out, "New,"), 1, "{out:?}");
    let printed = server.stop("-TERM");
    assert!(
        has(&printed, "session cache: hits 0 misses 1 stale 1"),
        "the refused session is counted as stale: {printed:?}"
    );
}

#[test]
fn an_open_association_goes_on_across_a_graceful_restart_with_no_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "sessions.key");
    let snap = dir.path().join("sessions.snap");
    // A certificate of its own: saved associations are bound to the server's identity.
    let (cert, cert_key) = openssl_session_cache::self_signed_certificate().unwrap();
    let (cert_file, cert_key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.to_pem().unwrap()).unwrap();
    std::fs::write(&cert_key_file, cert_key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    let flags = [
        "--snapshot",
        path_str(&snap),
        "--store-key",
        path_str(&key),
        "--cert",
        path_str(&cert_file),
        "--key",
        path_str(&cert_key_file),
    ];
    let server = EchoServer::start(&flags);
    let listen = server.addr.to_string();
    // An s_client that keeps its association open across the restart.
    let mut client = SClient::spawn(server.addr, &[]);
    client.send_line("before the restart");
    assert!(
        client.wait_line(Duration::from_secs(5), |l| l == "before the restart"),
        "{:?}",
        client.lines.output
    );
    let printed = server.stop("-TERM");
    assert!(has(&printed, "saved 1 peers to"), "{printed:?}");
    let peers_file = dir.path().join("sessions.snap.peers");
    assert!(peers_file.is_file());

    let mut server = EchoServer::start_on(&listen, &flags, None);
    assert!(
        server.wait_line(Duration::from_secs(5), |l| l
            .starts_with("restoring 1 peers from")),
        "{:?}",
        server.lines.output
    );
    assert!(!peers_file.exists(), "the saved peers are read once");
    for line in ["after the restart", "and again"] {
        client.send_line(line);
        if !client.wait_line(Duration::from_secs(5), |l| l == line) {
            let printed = server.stop("-TERM");
            panic!(
                "no echo of {line:?} after the restart: {:?}; the server printed {printed:?}",
                client.lines.output
            );
        }
    }
    let out = client.finish(Duration::from_secs(5));
    assert_eq!(count(&out, "New,"), 1, "one handshake only: {out:?}");
    assert_eq!(count(&out, "Reused,"), 0, "{out:?}");
    let printed = server.stop("-TERM");
    assert!(
        has(&printed, "endpoint: handshakes 0 resumed 0 restored 1"),
        "the second server made no handshake: {printed:?}"
    );
    // The client said goodbye (close_notify) before the stop: nothing left to carry.
    assert!(has(&printed, "saved 0 peers to"), "{printed:?}");
}

#[test]
fn snapshot_flag_needs_a_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("sessions.snap");
    let out = Command::new(echo_server_bin())
        .args(["--listen", "127.0.0.1:0", "--snapshot", path_str(&snap)])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--snapshot needs --store-key"), "{err}");
    assert!(!snap.exists());
}

/// Sends `signal` to a running server without stopping it.
fn signal(server: &EchoServer, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &server.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

#[test]
fn tickets_resume_across_hosts_and_survive_a_key_reload() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "farm.key");
    let flags = ["--tickets", "--store-key", path_str(&key)];
    // Two hosts, each with its own memory store: only a ticket can carry a session across.
    let mut a = EchoServer::start(&flags);
    let mut b = EchoServer::start(&flags);
    let s1 = dir.path().join("s1.pem");
    let out = s_client_echo(a.addr, &["-sess_out", path_str(&s1)], "on a");
    assert_eq!(count(&out, "New,"), 1, "{out:?}");
    let out = s_client_echo(b.addr, &["-sess_in", path_str(&s1)], "on b");
    assert_eq!(
        count(&out, "Reused,"),
        1,
        "a ticket from A did not resume on B: {out:?}"
    );

    // A new key appended, SIGHUP to both: old tickets still resume, new ones use the new key.
    let old = KeyRing::from_file(&key).unwrap();
    let (new_id, secret) = (old.active_key_id().wrapping_add(1), [0x42u8; 32]);
    let next = dir.path().join("farm.key.next");
    old.rotate(new_id, secret)
        .unwrap()
        .write_file(&next)
        .unwrap();
    std::fs::rename(&next, &key).unwrap();
    for host in [&mut a, &mut b] {
        signal(host, "-HUP");
        assert!(
            host.wait_line(Duration::from_secs(5), |l| l.contains("reloaded key file")
                && l.contains("2 keys")),
            "{:?}",
            host.lines.output
        );
    }
    let out = s_client_echo(b.addr, &["-sess_in", path_str(&s1)], "old ticket");
    assert_eq!(count(&out, "Reused,"), 1, "{out:?}");
    let s2 = dir.path().join("s2.pem");
    let out = s_client_echo(a.addr, &["-sess_out", path_str(&s2)], "new ticket");
    assert_eq!(count(&out, "New,"), 1, "{out:?}");
    // A host that knows only the new key opens the new ticket and not the old one.
    let only_new = dir.path().join("new.key");
    KeyRing::new(new_id, secret).write_file(&only_new).unwrap();
    let c = EchoServer::start(&["--tickets", "--store-key", path_str(&only_new)]);
    let out = s_client_echo(c.addr, &["-sess_in", path_str(&s2)], "new on c");
    assert_eq!(
        count(&out, "Reused,"),
        1,
        "the new ticket is not sealed with the new key: {out:?}"
    );
    let out = s_client_echo(c.addr, &["-sess_in", path_str(&s1)], "old on c");
    assert_eq!(count(&out, "New,"), 1, "{out:?}");

    // A broken key file on SIGHUP changes nothing.
    std::fs::write(&key, "1:not hex\n").unwrap();
    signal(&a, "-HUP");
    assert!(
        a.wait_line(Duration::from_secs(5), |l| l.contains("refused on reload")),
        "{:?}",
        a.lines.output
    );
    let out = s_client_echo(a.addr, &["-sess_in", path_str(&s2)], "after a bad reload");
    assert_eq!(count(&out, "Reused,"), 1, "{out:?}");
    for host in [a, b, c] {
        host.stop("-TERM");
    }
}

#[cfg(not(feature = "redis"))]
#[test]
fn redis_store_without_the_feature_says_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "k");
    let out = Command::new(echo_server_bin())
        .args(["--listen", "127.0.0.1:0", "--store", "redis://127.0.0.1:1"])
        .args(["--store-key", path_str(&key)])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--features redis"), "{err}");
}

#[cfg(feature = "redis")]
mod redis_farm {
    use openssl_session_cache::envelope::envelope_key_id;

    use super::*;
    use redis_server::RedisServer;

    /// The same certificate and key for every host of the farm, as PEM files in `dir`.
    fn farm_identity(dir: &Path) -> (PathBuf, PathBuf) {
        let (cert, key) = openssl_session_cache::self_signed_certificate().unwrap();
        let cert_path = dir.join("farm.crt");
        let key_path = dir.join("farm.pem");
        std::fs::write(&cert_path, cert.to_pem().unwrap()).unwrap();
        std::fs::write(&key_path, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        (cert_path, key_path)
    }

    /// Two hosts of a farm on `redis`, sharing one key file and one certificate.
    fn two_hosts(dir: &Path, redis: &RedisServer) -> (EchoServer, EchoServer, KeyRing) {
        let key = key_file(dir, "farm.key");
        let (cert, pkey) = farm_identity(dir);
        let url = redis.url();
        let flags = [
            "--store",
            url.as_str(),
            "--store-key",
            path_str(&key),
            "--cert",
            path_str(&cert),
            "--key",
            path_str(&pkey),
        ];
        let ring = KeyRing::from_file(&key).unwrap();
        // Everything they log, at every level: the tests look for secrets in it.
        (
            EchoServer::start_logging(&flags, "trace"),
            EchoServer::start_logging(&flags, "trace"),
            ring,
        )
    }

    /// Fails if the ring's keys or the session's master key show in `printed`.
    fn assert_no_secret_printed(printed: &[String], ring: &KeyRing, session: &Path) {
        use support::secrets::{assert_none_shown, Secret};
        let mut secrets: Vec<Secret> = ring
            .to_file_string()
            .lines()
            .map(|l| {
                let (id, key) = l.split_once(':').unwrap();
                Secret::new(format!("key {id}"), &hex::decode(key).unwrap())
            })
            .collect();
        let pem = std::fs::read_to_string(session).unwrap();
        let body: String = pem
            .lines()
            .skip_while(|l| !l.starts_with("-----BEGIN SSL SESSION PARAMETERS"))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect();
        let der = openssl::base64::decode_block(&body).unwrap();
        let session = openssl::ssl::SslSession::from_der(&der).unwrap();
        let mut master = [0u8; 48];
        let n = session.master_key(&mut master);
        secrets.push(Secret::new("the session's master key", &master[..n]));
        let text = printed.join("\n");
        assert!(text.contains("TRACE") || text.contains("DEBUG"), "{text}");
        assert_none_shown("the echo server's output", text.as_bytes(), &secrets);
    }

    #[test]
    fn sighup_rotates_the_store_keys_and_old_sessions_keep_resuming() {
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let (mut a, mut b, old) = two_hosts(dir.path(), &redis);
        let key = dir.path().join("farm.key");
        let s1 = dir.path().join("s1.pem");
        let out = s_client_echo(a.addr, &["-sess_out", path_str(&s1)], "before");
        assert_eq!(count(&out, "New,"), 1, "{out:?}");
        // Append a key, SIGHUP both hosts.
        let new_id = old.active_key_id().wrapping_add(1);
        let next = dir.path().join("farm.key.next");
        old.clone()
            .rotate(new_id, [0x5c; 32])
            .unwrap()
            .write_file(&next)
            .unwrap();
        std::fs::rename(&next, &key).unwrap();
        for host in [&mut a, &mut b] {
            super::signal(host, "-HUP");
            assert!(
                host.wait_line(Duration::from_secs(5), |l| l.contains("reloaded key file")),
                "{:?}",
                host.lines.output
            );
        }
        // The session sealed under the old key still resumes on the other host.
        let out = s_client_echo(b.addr, &["-sess_in", path_str(&s1)], "old key");
        assert_eq!(count(&out, "Reused,"), 1, "{out:?}");
        // A new session is sealed under the new key.
        let mut raw = redis.raw();
        let before: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut raw).unwrap();
        let s2 = dir.path().join("s2.pem");
        let out = s_client_echo(a.addr, &["-sess_out", path_str(&s2)], "after");
        assert_eq!(count(&out, "New,"), 1, "{out:?}");
        let end = Instant::now() + Duration::from_secs(5);
        let fresh = loop {
            let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut raw).unwrap();
            if let Some(k) = keys.into_iter().find(|k| !before.contains(k)) {
                break k;
            }
            assert!(Instant::now() < end, "the new session never reached Redis");
            std::thread::sleep(Duration::from_millis(20));
        };
        let value: Vec<u8> = redis::cmd("GET").arg(&fresh).query(&mut raw).unwrap();
        assert_eq!(envelope_key_id(&value), Some(new_id));
        a.stop("-TERM");
        b.stop("-TERM");
    }

    #[test]
    fn a_session_made_on_one_host_resumes_on_the_other() {
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let (a, b, ring) = two_hosts(dir.path(), &redis);
        let sess = dir.path().join("s.pem");

        let out = s_client_echo(a.addr, &["-sess_out", path_str(&sess)], "on a");
        assert_eq!(count(&out, "New,"), 1, "{out:?}");
        let out = s_client_echo(b.addr, &["-sess_in", path_str(&sess)], "on b");
        assert_eq!(count(&out, "Reused,"), 1, "{out:?}");
        // And back: B's resumption left the session in Redis for A (and A's tier) too.
        let out = s_client_echo(a.addr, &["-sess_in", path_str(&sess)], "on a again");
        assert_eq!(count(&out, "Reused,"), 1, "{out:?}");

        // The one value in Redis is sealed under the farm's key, not a plaintext DER session.
        let mut raw = redis.raw();
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut raw).unwrap();
        assert_eq!(keys.len(), 1, "one session in Redis");
        let value: Vec<u8> = redis::cmd("GET").arg(&keys[0]).query(&mut raw).unwrap();
        assert_eq!(
            envelope_key_id(&value),
            Some(ring.active_key_id()),
            "{value:02x?}"
        );

        let printed = a.stop("-TERM");
        assert!(has(&printed, "stopped"), "{printed:?}");
        assert_no_secret_printed(&printed, &ring, &sess);
        assert_no_secret_printed(&b.stop("-TERM"), &ring, &sess);
    }

    #[test]
    fn handshakes_complete_in_full_while_redis_is_down() {
        let mut redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let (a, b, _) = two_hosts(dir.path(), &redis);
        let sess = dir.path().join("s.pem");
        let out = s_client_echo(a.addr, &["-sess_out", path_str(&sess)], "before");
        assert_eq!(count(&out, "New,"), 1, "{out:?}");

        redis.kill();
        assert!(!redis.ping());

        // B never saw the session and cannot reach Redis: its lookup fails (a counted miss)
        // and the handshake goes on in full (s_client_echo's wait is bounded).
        let out = s_client_echo(b.addr, &["-sess_in", path_str(&sess)], "redis down");
        assert_eq!(count(&out, "New,"), 1, "{out:?}");
        assert_eq!(count(&out, "Reused,"), 0, "{out:?}");
        // A fresh client on A: its new session cannot be written to Redis; still served.
        let out = s_client_echo(a.addr, &[], "fresh on a");
        assert_eq!(count(&out, "New,"), 1, "{out:?}");

        // Both servers still shut down cleanly; B counted the one lookup a miss.
        a.stop("-TERM");
        let printed = b.stop("-TERM");
        assert!(
            has(&printed, "session cache: hits 0 misses 1 "),
            "{printed:?}"
        );
    }

    /// A DTLS client over a real UDP socket that notes every protected record it receives:
    /// `(epoch, sequence number)` and the SHA-256 of the record's bytes. A number seen again
    /// with other bytes is a (key, nonce) pair used twice; with the same bytes a retransmission.
    mod recording_client {
        use std::collections::HashMap;
        use std::io::{self, Read, Write};
        use std::net::{SocketAddr, UdpSocket};
        use std::sync::Arc;
        use std::time::Duration;

        use parking_lot::Mutex;

        /// What the client saw.
        #[derive(Debug, Default)]
        pub(super) struct Log {
            pub(super) records: HashMap<(u16, u64), [u8; 32]>,
            pub(super) retransmitted: u64,
            pub(super) reused: Vec<(u16, u64)>,
            /// The last application-data datagrams sent: (record number, when, bytes).
            pub(super) sent: std::collections::VecDeque<(u64, std::time::Instant, Vec<u8>)>,
            /// Application-data datagrams sent so far.
            pub(super) app_sent: u64,
        }

        /// How many of the last datagrams sent are kept to be replayed.
        pub(super) const KEPT: usize = 128;

        pub(super) struct Udp {
            pub(super) sock: UdpSocket,
            pub(super) log: Arc<Mutex<Log>>,
        }

        impl Udp {
            pub(super) fn connect(server: SocketAddr, log: Arc<Mutex<Log>>) -> Self {
                let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
                sock.connect(server).unwrap();
                sock.set_read_timeout(Some(Duration::from_millis(2)))
                    .unwrap();
                Self { sock, log }
            }

            fn note(&self, mut rest: &[u8]) {
                let mut log = self.log.lock();
                while rest.len() >= 13 {
                    let epoch = u16::from_be_bytes([rest[3], rest[4]]);
                    let mut seq = [0u8; 8];
                    seq[2..].copy_from_slice(&rest[5..11]);
                    let len = 13 + usize::from(u16::from_be_bytes([rest[11], rest[12]]));
                    let record = &rest[..len.min(rest.len())];
                    rest = &rest[record.len()..];
                    if epoch == 0 {
                        continue;
                    }
                    let key = (epoch, u64::from_be_bytes(seq));
                    let digest = openssl::sha::sha256(record);
                    match log.records.get(&key) {
                        None => {
                            log.records.insert(key, digest);
                        }
                        Some(d) if *d == digest => log.retransmitted += 1,
                        Some(_) => log.reused.push(key),
                    }
                }
            }
        }

        /// Errors of a socket whose server is gone or silent: as lost datagrams.
        fn lost(e: &io::Error) -> bool {
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::ConnectionRefused
            )
        }

        impl Read for Udp {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                match self.sock.recv(buf) {
                    Ok(n) => {
                        self.note(&buf[..n]);
                        Ok(n)
                    }
                    Err(e) if lost(&e) => Err(io::ErrorKind::WouldBlock.into()),
                    Err(e) => Err(e),
                }
            }
        }

        impl Write for Udp {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if buf.first() == Some(&23) {
                    let mut log = self.log.lock();
                    let n = log.app_sent;
                    log.app_sent += 1;
                    if log.sent.len() == KEPT {
                        log.sent.pop_front();
                    }
                    log.sent
                        .push_back((n, std::time::Instant::now(), buf.to_vec()));
                }
                match self.sock.send(buf) {
                    Err(e) if lost(&e) => Ok(buf.len()),
                    other => other,
                }
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
    }

    /// Issue 19's failover test: a client streams records to the farm's address while the host
    /// serving it is SIGKILLed at random points (22 times) and another host is started on the
    /// same address each time, which takes the association over from Redis with no handshake.
    /// The client records every (epoch, sequence number) it receives: none comes twice with
    /// other bytes. After every other death the client's last 128 records sent before it are
    /// replayed to the new host first, oldest first (an on-path attacker's best order): only
    /// those the dead host accepted after its last stored read mark are accepted again, which
    /// the test measures (records, and how long before the death the oldest was sent); every
    /// other echo comes once. The other deaths measure how soon the stream goes on.
    #[test]
    fn a_stream_goes_on_across_hosts_killed_at_random_with_no_nonce_used_twice() {
        use std::collections::{HashMap, HashSet};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;

        use openssl::ssl::{
            ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVerifyMode,
        };
        use parking_lot::Mutex;
        use rand::{Rng, SeedableRng};

        use recording_client::{Log, Udp};

        const KILLS: usize = 22;
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path(), "farm.key");
        let (cert, pkey) = farm_identity(dir.path());
        let url = redis.url();
        let flags = [
            "--store",
            url.as_str(),
            "--store-key",
            path_str(&key),
            "--cert",
            path_str(&cert),
            "--key",
            path_str(&pkey),
            "--share-peers",
        ];
        let mut host = EchoServer::start(&flags);
        let listen = host.addr.to_string();
        let server = host.addr;

        let log = Arc::new(Mutex::new(Log::default()));
        let echoes: Arc<Mutex<Vec<(u64, std::time::Instant)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let (sock_tx, sock_rx) = std::sync::mpsc::channel();
        let client = {
            let (log, echoes, stop) = (Arc::clone(&log), Arc::clone(&echoes), Arc::clone(&stop));
            let pause = Arc::clone(&pause);
            std::thread::spawn(move || {
                let mut ctx = SslContext::builder(SslMethod::dtls_client()).unwrap();
                ctx.set_verify(SslVerifyMode::NONE);
                ctx.set_options(SslOptions::NO_QUERY_MTU);
                let ctx = ctx.build();
                let mut ssl = Ssl::new(&ctx).unwrap();
                ssl.set_mtu(1400).unwrap();
                let udp = Udp::connect(server, log);
                sock_tx.send(udp.sock.try_clone().unwrap()).unwrap();
                let mut s = SslStream::new(ssl, udp).unwrap();
                let start = std::time::Instant::now();
                loop {
                    match s.connect() {
                        Ok(()) => break,
                        Err(e) if e.code() == ErrorCode::WANT_READ => {
                            assert!(start.elapsed() < redis_server::PATIENCE, "no handshake");
                        }
                        Err(e) => panic!("handshake: {e}"),
                    }
                }
                let mut buf = [0u8; 2048];
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Eight records every 2 ms at most (a dead server's refusals return at
                    // once), enough for the hosts' leases to be extended.
                    let began = std::time::Instant::now();
                    let paused = pause.load(Ordering::Relaxed);
                    for _ in 0..if paused { 0 } else { 8 } {
                        s.ssl_write(format!("record {i}").as_bytes()).unwrap();
                        i += 1;
                    }
                    loop {
                        match s.ssl_read(&mut buf) {
                            Ok(n) => {
                                let text = std::str::from_utf8(&buf[..n]).unwrap();
                                let j = text.strip_prefix("record ").unwrap().parse().unwrap();
                                echoes.lock().push((j, std::time::Instant::now()));
                            }
                            Err(e) if e.code() == ErrorCode::WANT_READ => break,
                            Err(e) => panic!("read: {e}"),
                        }
                    }
                    std::thread::sleep(Duration::from_millis(2).saturating_sub(began.elapsed()));
                }
                i
            })
        };
        let replayer = sock_rx.recv().unwrap();
        let echoed = || echoes.lock().len();
        // Per kill: how many records the dead host had accepted were accepted again when
        // replayed to the new host, and how long before the death the oldest was sent.
        let mut replay_window: Vec<(usize, Duration)> = Vec::new();
        let mut replayed: HashSet<u64> = HashSet::new();
        redis_server::wait_until("the first echoes", || echoed() >= 10);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(0x19);
        let (mut death_to_echo, mut start_to_echo) = (Vec::new(), Vec::new());
        for kill in 0..KILLS {
            std::thread::sleep(Duration::from_millis(rng.random_range(20..1500)));
            let died = Instant::now();
            let _ = host.child.kill();
            let _ = host.child.wait();
            drop(host);
            // Every other death, the records sent before it are replayed to the next host (the
            // replay bound); the others measure how soon the stream goes on.
            let replay = kill % 2 == 1;
            pause.store(replay, Ordering::Relaxed);
            // What the client sent before the death, to replay to the next host first, oldest
            // first (an on-path attacker's best order), each after the last had time to be
            // looked up.
            let kept: Vec<(u64, Instant, Vec<u8>)> = log
                .lock()
                .sent
                .iter()
                .filter(|e| e.1 < died)
                .cloned()
                .collect();
            host = EchoServer::start_on(&listen, &flags, None);
            let listening = Instant::now();
            let replay_from = echoes.lock().len();
            for (_, _, d) in kept.iter().filter(|_| replay) {
                replayer.send(d).unwrap();
                std::thread::sleep(Duration::from_millis(3));
            }
            if replay {
                std::thread::sleep(Duration::from_millis(50));
            }
            // Echoed twice by now, the second time in this replay (an echo of the dead host
            // still in the client's socket buffer at the death counts once, as it should).
            let again: HashSet<u64> = {
                let all = echoes.lock();
                let mut n: HashMap<u64, usize> = HashMap::new();
                for e in all.iter() {
                    *n.entry(e.0).or_default() += 1;
                }
                all[replay_from..]
                    .iter()
                    .map(|e| e.0)
                    .filter(|j| n[j] > 1)
                    .collect()
            };
            if replay {
                replayed.extend(kept.iter().map(|e| e.0));
            }
            let oldest = kept
                .iter()
                .filter(|e| again.contains(&e.0))
                .map(|e| e.1)
                .min()
                .map_or(Duration::ZERO, |t| died - t);
            if replay {
                replay_window.push((again.len(), oldest));
            }
            let before = echoed();
            pause.store(false, Ordering::Relaxed);
            redis_server::wait_until(&format!("an echo from host {}", kill + 2), || {
                echoed() > before + 1
            });
            let next = echoes.lock()[before..]
                .iter()
                .map(|e| e.1)
                .find(|t| *t > listening)
                .unwrap_or_else(Instant::now);
            if !replay {
                death_to_echo.push(next - died);
                start_to_echo.push(next.saturating_duration_since(listening));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        let sent = client.join().unwrap();
        let printed = host.stop("-TERM");
        let log = log.lock();
        assert!(
            log.reused.is_empty(),
            "sequence numbers used twice: {:?}",
            log.reused
        );
        let mut times: HashMap<u64, usize> = HashMap::new();
        for (j, _) in echoes.lock().iter() {
            assert!(*j < sent);
            *times.entry(*j).or_default() += 1;
        }
        // A record is delivered twice only when replayed, within the write-behind bound: at
        // most 64 records or 20 ms (plus one store write) before the death.
        assert!(times.values().all(|n| *n <= 2), "an echo came three times");
        for (j, n) in &times {
            assert!(
                *n == 1 || replayed.contains(j),
                "record {j} came twice unreplayed"
            );
        }
        for (records, before_death) in &replay_window {
            assert!(*records <= 64 + 16, "{records} records accepted twice");
            assert!(
                *before_death < Duration::from_millis(500),
                "{before_death:?}"
            );
        }
        let max_window = replay_window.iter().max_by_key(|w| w.0).unwrap();
        let max_time = replay_window.iter().map(|w| w.1).max().unwrap();
        assert!(
            has(&printed, "endpoint: handshakes 0 resumed 0 restored 1"),
            "the last host took the peer over with no handshake: {printed:?}"
        );
        assert!(
            has(&printed, "endpoint: takeovers 1 refused "),
            "{printed:?}"
        );
        death_to_echo.sort();
        start_to_echo.sort();
        eprintln!(
            "{KILLS} kills; {sent} records sent, {} echoed, {} records seen ({} retransmitted); \
             death to next echo: median {:?}, max {:?}; new host listening to next echo: \
             median {:?}, max {:?}; replayed after a death and accepted again: at most {} \
             records, sent at most {:?} before the death; the last host: {}",
            times.len(),
            log.records.len(),
            log.retransmitted,
            death_to_echo[death_to_echo.len() / 2],
            death_to_echo[death_to_echo.len() - 1],
            start_to_echo[start_to_echo.len() / 2],
            start_to_echo[start_to_echo.len() - 1],
            max_window.0,
            max_time,
            printed
                .iter()
                .find(|l| l.contains("endpoint: takeovers"))
                .unwrap(),
        );
    }
}
