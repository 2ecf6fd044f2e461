//! A throwaway `redis-server` for tests: a free loopback port, no persistence, killed by PID on
//! drop; over TLS with a test CA made here ([`TestPki`], [`RedisServer::start_tls`]); and a
//! three-master Redis Cluster ([`RedisCluster`]). Include with
//! `#[path = "support/redis_server.rs"] mod redis_server;`.

#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer its first PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a cluster may take to form and agree on its slots.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the Redis tests wait for anything to happen before they fail.
pub(crate) const PATIENCE: Duration = Duration::from_secs(10);

/// Waits until the store's write-behind queue is empty (bounded by [`PATIENCE`]).
#[cfg(feature = "redis")]
pub(crate) fn flush(s: &openssl_session_cache::RedisStore) {
    assert!(
        s.flush(PATIENCE),
        "the write queue did not drain: {:?}",
        s.stats()
    );
}

/// Waits until `cond` holds, polling; panics with `what` after [`PATIENCE`].
pub(crate) fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What a lookup completes with.
#[cfg(feature = "redis")]
pub(crate) type LookupResult =
    Result<Option<openssl_session_cache::StoredSession>, openssl_session_cache::StoreError>;

/// How one lookup of [`lookups`] went.
#[cfg(feature = "redis")]
#[derive(Debug)]
pub(crate) struct Looked {
    /// Completed on the calling thread, before the call returned (a local answer: an open
    /// breaker, the tier, a queued write).
    pub(crate) inline: bool,
    /// From the call to the completion (measured, for lower bounds and messages only).
    pub(crate) took: Duration,
    pub(crate) result: LookupResult,
}

/// Starts the lookups of `ids` one after the other without waiting, then waits (bounded) for
/// them all, in order.
///
/// A completion that comes from another thread waits for its call to have returned first, so a
/// call that waited for its own answer (on the network) never returns: that lookup fails the
/// test, naming it, after [`PATIENCE`]. So "the call never waits" is shown without timing it.
#[cfg(feature = "redis")]
pub(crate) fn lookups(
    s: &openssl_session_cache::RedisStore,
    ids: &[openssl_session_cache::SessionId],
) -> Vec<Looked> {
    lookups_in(s, ids, openssl_session_cache::LookupMode::Get)
}

/// [`lookups`] in `mode`.
#[cfg(feature = "redis")]
pub(crate) fn lookups_in(
    s: &openssl_session_cache::RedisStore,
    ids: &[openssl_session_cache::SessionId],
    mode: openssl_session_cache::LookupMode,
) -> Vec<Looked> {
    use openssl_session_cache::{LookupDone, SessionStore};
    use std::sync::mpsc;
    let (tx, rx) = mpsc::channel();
    let caller = std::thread::current().id();
    for (n, id) in ids.iter().enumerate() {
        let tx = tx.clone();
        let (returned_tx, returned_rx) = mpsc::channel::<()>();
        let started = Instant::now();
        s.lookup(
            *id,
            mode,
            LookupDone::new(move |r| {
                let took = started.elapsed();
                let inline = std::thread::current().id() == caller;
                let call_returned = inline || returned_rx.recv_timeout(PATIENCE).is_ok();
                let _ = tx.send((n, inline, call_returned, took, r));
            }),
        );
        let _ = returned_tx.send(());
    }
    let mut out: Vec<Option<Looked>> = (0..ids.len()).map(|_| None).collect();
    for _ in 0..ids.len() {
        let (n, inline, call_returned, took, result) = rx
            .recv_timeout(PATIENCE + PATIENCE)
            .expect("every lookup completes");
        assert!(
            call_returned,
            "lookup {n}: the call waited for its own answer ({result:?})"
        );
        out[n] = Some(Looked {
            inline,
            took,
            result,
        });
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// A `redis-server` child process on 127.0.0.1.
#[derive(Debug)]
pub(crate) struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    paused: bool,
    /// Serve TLS only (on `port`; the plain port is off).
    tls: bool,
    /// Arguments beyond the common ones (TLS files, cluster mode).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    ///
    /// # Panics
    /// If `redis-server` is not on PATH (with a message saying how to install it), or the
    /// server does not answer within 10 s.
    pub(crate) fn start() -> Self {
        let port = free_port();
        Self::start_on(port)
    }

    /// Starts a server on `port` (e.g. the port of a server this test stopped).
    pub(crate) fn start_on(port: u16) -> Self {
        Self::start_with(port, false, Vec::new())
    }

    /// Starts a server that speaks TLS only, on a free port, with the server certificate and
    /// key `cert` (as [`TestPki::write_server`] wrote them); clients are not asked for a
    /// certificate (`--tls-auth-clients no`).
    pub(crate) fn start_tls(cert: &ServerCert) -> Self {
        let tls = vec![
            "--tls-cert-file".into(),
            cert.cert.display().to_string(),
            "--tls-key-file".into(),
            cert.key.display().to_string(),
            "--tls-ca-cert-file".into(),
            cert.ca.display().to_string(),
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        Self::start_with(free_port(), true, tls)
    }

    fn start_with(port: u16, tls: bool, extra: Vec<String>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        let mut server = Self {
            child: None,
            port,
            dir,
            paused: false,
            tls,
            extra,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let (plain_port, tls_port) = if self.tls {
            ("0".to_string(), Some(self.port.to_string()))
        } else {
            (self.port.to_string(), None)
        };
        let mut command = Command::new("redis-server");
        if let Some(tls_port) = &tls_port {
            command.args(["--tls-port", tls_port]);
        }
        let child = command
            .args(&self.extra)
            .args([
                "--port",
                &plain_port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::NotFound => panic!(
                "redis-server is not on PATH; the `redis` feature's tests need it: \
                 install it with `apt-get install redis-server` (or `brew install redis`)"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.ready() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "redis-server on port {} exited at start: {status}",
                    self.port
                );
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within {START_TIMEOUT:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The port.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://` for a TLS server.
    pub(crate) fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The process id (the server runs while this is `Some`).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A raw connection for poking at keys behind the store's back (plain servers only).
    pub(crate) fn raw(&self) -> redis::Connection {
        assert!(!self.tls, "raw() speaks plain TCP");
        let c = redis::Client::open(self.url()).unwrap();
        let conn = c
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        conn
    }

    /// Whether the server is up: it answers PING (plain), or accepts connections (TLS).
    fn ready(&self) -> bool {
        if self.tls {
            let addr = ([127, 0, 0, 1], self.port).into();
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        } else {
            self.ping()
        }
    }

    /// Whether the server answers PING now (plain servers only).
    pub(crate) fn ping(&self) -> bool {
        let addr = ([127, 0, 0, 1], self.port).into();
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// Kills the server by its PID (SIGKILL) and waits for it; the port is free again afterwards.
    pub(crate) fn kill(&mut self) {
        if self.paused {
            self.resume();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port after [`kill`](Self::kill).
    pub(crate) fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Stops the process (SIGSTOP): connections stay open but nothing answers.
    pub(crate) fn pause(&mut self) {
        self.signal("-STOP");
        self.paused = true;
    }

    /// Resumes a paused process (SIGCONT).
    pub(crate) fn resume(&mut self) {
        self.signal("-CONT");
        self.paused = false;
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("server running").id();
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {pid} failed");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// A three-master Redis Cluster on loopback: `redis-server --cluster-enabled yes` on three free
/// ports, joined by `redis-cli --cluster create … --cluster-replicas 0`, with
/// `cluster-require-full-coverage no` (so the masters that are up keep serving their slots
/// while one is down). Each server is killed by PID on drop.
pub(crate) struct RedisCluster {
    pub(crate) masters: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three masters, creates the cluster and waits until every node reports
    /// `cluster_state:ok` (at most 30 s).
    ///
    /// # Panics
    /// If a server does not start, `redis-cli` is missing or fails, or the cluster does not form.
    pub(crate) fn start() -> Self {
        let masters: Vec<RedisServer> = (0..3)
            .map(|_| {
                let port = free_port();
                let args = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &format!("nodes-{port}.conf"),
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-require-full-coverage",
                    "no",
                ];
                RedisServer::start_with(port, false, args.iter().map(|a| a.to_string()).collect())
            })
            .collect();
        let addrs: Vec<String> = masters
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.port()))
            .collect();
        let out = Command::new("timeout")
            .arg(CLUSTER_TIMEOUT.as_secs().to_string())
            .args(["redis-cli", "--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create (apt-get install redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self { masters };
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        while !cluster.masters.iter().all(|m| {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut m.raw())
                .unwrap_or_default();
            info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
        }) {
            assert!(
                Instant::now() < deadline,
                "the cluster did not form in time"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`.
    pub(crate) fn url(&self) -> String {
        let nodes: Vec<String> = self
            .masters
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.port()))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// The node URLs, `redis://127.0.0.1:P` each.
    pub(crate) fn node_urls(&self) -> Vec<String> {
        self.masters.iter().map(RedisServer::url).collect()
    }
}

/// A test PKI: a CA, a second CA that signed nothing the servers use, and server certificates,
/// all EC P-256, written as PEM files into a temporary directory.
pub(crate) struct TestPki {
    dir: tempfile::TempDir,
    ca_key: openssl::pkey::PKey<openssl::pkey::Private>,
    ca_cert: openssl::x509::X509,
    /// The CA's certificate, PEM.
    pub(crate) ca: PathBuf,
    /// Another CA's certificate, PEM: a wrong CA for the servers here.
    pub(crate) other_ca: PathBuf,
}

/// A server certificate's files.
pub(crate) struct ServerCert {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) ca: PathBuf,
}

impl TestPki {
    /// Makes the two CAs.
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir for the test PKI");
        let (ca_key, ca_cert) = make_ca("session store test CA");
        let (_, other) = make_ca("some other CA");
        let ca = write_pem(dir.path(), "ca.pem", &ca_cert.to_pem().unwrap());
        let other_ca = write_pem(dir.path(), "other-ca.pem", &other.to_pem().unwrap());
        Self {
            dir,
            ca_key,
            ca_cert,
            ca,
            other_ca,
        }
    }

    /// A server certificate for the IP address `ip`, signed by the CA, written as `name.pem`
    /// and `name.key`.
    pub(crate) fn write_server(&self, name: &str, ip: IpAddr) -> ServerCert {
        use openssl::x509::extension::{
            BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
        };
        let key = ec_key();
        let mut b = openssl::x509::X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&serial()).unwrap();
        b.set_subject_name(&name_of("redis test server")).unwrap();
        b.set_issuer_name(self.ca_cert.subject_name()).unwrap();
        b.set_pubkey(&key).unwrap();
        validity(&mut b);
        b.append_extension(BasicConstraints::new().build().unwrap())
            .unwrap();
        b.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_agreement()
                .build()
                .unwrap(),
        )
        .unwrap();
        b.append_extension(ExtendedKeyUsage::new().server_auth().build().unwrap())
            .unwrap();
        let san = SubjectAlternativeName::new()
            .ip(&ip.to_string())
            .build(&b.x509v3_context(Some(&self.ca_cert), None))
            .unwrap();
        b.append_extension(san).unwrap();
        b.sign(&self.ca_key, openssl::hash::MessageDigest::sha256())
            .unwrap();
        let cert = b.build();
        ServerCert {
            cert: write_pem(
                self.dir.path(),
                &format!("{name}.pem"),
                &cert.to_pem().unwrap(),
            ),
            key: write_pem(
                self.dir.path(),
                &format!("{name}.key"),
                &key.private_key_to_pem_pkcs8().unwrap(),
            ),
            ca: self.ca.clone(),
        }
    }
}

fn ec_key() -> openssl::pkey::PKey<openssl::pkey::Private> {
    let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
    openssl::pkey::PKey::from_ec_key(openssl::ec::EcKey::generate(&group).unwrap()).unwrap()
}

fn serial() -> openssl::asn1::Asn1Integer {
    let mut n = openssl::bn::BigNum::new().unwrap();
    n.rand(64, openssl::bn::MsbOption::MAYBE_ZERO, false)
        .unwrap();
    n.to_asn1_integer().unwrap()
}

fn name_of(cn: &str) -> openssl::x509::X509Name {
    let mut name = openssl::x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(openssl::nid::Nid::COMMONNAME, cn)
        .unwrap();
    name.build()
}

fn validity(b: &mut openssl::x509::X509Builder) {
    b.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&openssl::asn1::Asn1Time::days_from_now(2).unwrap())
        .unwrap();
}

fn make_ca(
    cn: &str,
) -> (
    openssl::pkey::PKey<openssl::pkey::Private>,
    openssl::x509::X509,
) {
    use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectKeyIdentifier};
    let key = ec_key();
    let name = name_of(cn);
    let mut b = openssl::x509::X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(&serial()).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(&name).unwrap();
    b.set_pubkey(&key).unwrap();
    validity(&mut b);
    b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
        .unwrap();
    b.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()
            .unwrap(),
    )
    .unwrap();
    let ski = SubjectKeyIdentifier::new()
        .build(&b.x509v3_context(None, None))
        .unwrap();
    b.append_extension(ski).unwrap();
    b.sign(&key, openssl::hash::MessageDigest::sha256())
        .unwrap();
    (key, b.build())
}

fn write_pem(dir: &Path, name: &str, pem: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).expect("write a PEM file");
    path
}
