//! No secret shows in a log line at any level, in a `Debug` output or in an error message.
//!
//! This binary records everything logged (every level, through `tracing` and the `log` crate,
//! from every thread) while servers run: the std driver with a certificate, PSK identities and
//! ticket keys from a key file (full handshakes, ticket resumptions, PSK handshakes, a wrong
//! PSK, garbage, closes), a sans-IO endpoint, snapshots (saved, loaded, refused), the key file
//! read with loose permissions, and with the `redis` feature a Redis store through its life
//! and its Redis's death. Then it looks for every secret involved (key ring keys, the derived
//! ticket keys, PSK keys, the sessions' master keys) in the log, in the `Debug` output of every
//! type holding one and in the errors returned, in every formatting (`support::secrets`), and
//! for the PSK keys in the stored sessions too.
//! (Cookie secrets never leave `src/server/cookie.rs`; its own test does the same for them.)
#![cfg(feature = "server")]

mod support;

#[cfg(feature = "redis")]
#[path = "support/redis_server.rs"]
mod redis_server;

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslSession, SslStream,
    SslVerifyMode,
};
use openssl_session_cache::dsm::DsmConfig;
use openssl_session_cache::{
    DatagramPipe, Endpoint, KeyRing, ManualClock, MemoryStore, ServerConfig, SessionCache,
    SessionId, SessionStore, SessionStoreAdmin, StoredSession, TicketKeys, UdpOptions, UdpServer,
};
use support::secrets::{assert_none_shown, shown_in, Secret};
use support::server::{echo, echo_app, UdpIo};

/// Everything logged since the start.
fn log() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOG.get_or_init(|| Mutex::new(Vec::new()))
}

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        log().lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Records every event of every level from every thread (and the `log` crate's records).
fn record_everything() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .try_init()
            .expect("the only subscriber of this binary");
    });
}

/// Bytes that look random and are easy to tell apart, from a label.
fn key_bytes(label: &str) -> [u8; 32] {
    openssl::sha::sha256(label.as_bytes())
}

const PSK_IDENTITY: &[u8] = b"sensor-17";

fn client_ctx(tweak: impl FnOnce(&mut SslContextBuilder)) -> SslContext {
    let mut b = SslContext::builder(SslMethod::dtls_client()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    b.set_options(SslOptions::NO_QUERY_MTU);
    tweak(&mut b);
    b.build()
}

/// A PSK client, without tickets (so that its session is stored in the cache).
/// A client offering only `PSK-AES128-CCM8`, rated by its key size (OpenSSL 3.2+ refuses the
/// suite at the default security level otherwise).
fn psk_client(key: [u8; 16]) -> SslContext {
    client_ctx(move |b| {
        openssl_session_cache::rate_ccm8_by_key_size(b);
        b.set_options(SslOptions::NO_TICKET);
        b.set_cipher_list("PSK-AES128-CCM8").unwrap();
        b.set_psk_client_callback(move |_, _, id, out| {
            id[..PSK_IDENTITY.len()].copy_from_slice(PSK_IDENTITY);
            id[PSK_IDENTITY.len()] = 0;
            out[..16].copy_from_slice(&key);
            Ok(16)
        });
    })
}

/// A DTLS handshake with `server` over UDP, offering `session` (bounded: 5 s).
fn dtls(
    server: SocketAddr,
    ctx: &SslContext,
    session: Option<&SslSession>,
) -> Result<SslStream<UdpIo>, String> {
    dtls_within(server, ctx, session, Duration::from_secs(5))
}

/// [`dtls`], given up after `limit`.
fn dtls_within(
    server: SocketAddr,
    ctx: &SslContext,
    session: Option<&SslSession>,
    limit: Duration,
) -> Result<SslStream<UdpIo>, String> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(server).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut ssl = Ssl::new(ctx).unwrap();
    ssl.set_mtu(1400).unwrap();
    ssl.set_connect_state();
    if let Some(s) = session {
        // SAFETY: the client contexts here keep no internal session cache.
        #[allow(unsafe_code)]
        unsafe {
            ssl.set_session(s).unwrap()
        };
    }
    let mut stream = SslStream::new(ssl, UdpIo(sock)).unwrap();
    let end = Instant::now() + limit;
    loop {
        match stream.do_handshake() {
            Ok(()) => return Ok(stream),
            Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < end => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The session's master key, as a secret to look for.
fn master_key(name: &str, session: &SslSession) -> Secret {
    let mut key = [0u8; 48];
    let n = session.master_key(&mut key);
    assert!(n >= 32, "{name}: master key of {n} bytes");
    Secret::new(format!("master key of {name}"), &key[..n])
}

/// The (AES, HMAC) ticket keys `src/tickets.rs` derives for `(id, epoch)` from `secret`.
fn ticket_keys(secret: &[u8; 32], id: u32, epoch: u64) -> [Secret; 2] {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"openssl-session-cache ticket key v1"), secret);
    let mut info = [0u8; 12];
    info[..4].copy_from_slice(&id.to_be_bytes());
    info[4..].copy_from_slice(&epoch.to_be_bytes());
    let mut okm = [0u8; 68];
    hk.expand(&info, &mut okm).unwrap();
    [
        Secret::new(format!("ticket AES key {id}/{epoch}"), &okm[4..36]),
        Secret::new(format!("ticket HMAC key {id}/{epoch}"), &okm[36..68]),
    ]
}

/// What a scenario leaves to check: secrets, and text that must not show them.
#[derive(Default)]
struct Findings {
    secrets: Vec<Secret>,
    /// (what, text): `Debug` outputs and error messages.
    texts: Vec<(String, String)>,
}

impl Findings {
    fn debug(&mut self, what: &str, value: &dyn std::fmt::Debug) {
        self.texts
            .push((format!("{what} {{:?}}"), format!("{value:?}")));
        self.texts
            .push((format!("{what} {{:#?}}"), format!("{value:#?}")));
    }

    fn error(&mut self, what: &str, e: &dyn std::fmt::Display) {
        self.texts.push((what.to_owned(), e.to_string()));
    }
}

/// The std driver: a certificate, PSK identities, ticket keys from a key file, a memory store.
fn dtls_server(f: &mut Findings, ring: &KeyRing, epoch: u64, psk: [u8; 16]) {
    let clock = Arc::new(ManualClock::new(
        UNIX_EPOCH + Duration::from_secs(epoch * 3600),
    ));
    let tickets = TicketKeys::builder(ring.clone())
        .period(Duration::from_secs(3600))
        .accept_for(Duration::from_secs(7200))
        .clock(clock)
        .build()
        .unwrap();
    f.debug("TicketKeysBuilder", &TicketKeys::builder(ring.clone()));
    let store = Arc::new(MemoryStore::builder().build().unwrap());
    let cache_builder = SessionCache::builder()
        .store(store.clone())
        .ticket_keys(tickets.clone());
    f.debug("SessionCacheBuilder", &cache_builder);
    let cache = cache_builder.build().unwrap();
    let pki = support::pki();
    let config_builder = ServerConfig::builder(cache.clone())
        .certificate(pki.server.cert.clone(), pki.server.key.clone())
        .psk(PSK_IDENTITY, &psk)
        .psk_lookup(move |id| (id == b"sensor-18").then(|| psk.to_vec()))
        .cookie_rotation(Duration::from_secs(1))
        .dsm(DsmConfig::new(64).with_idle_tick(Duration::from_secs(1)));
    f.debug("ServerConfigBuilder", &config_builder);
    let config = config_builder.build().unwrap();
    let mut options = UdpOptions::new("127.0.0.1:0".parse().unwrap());
    options.stats_interval = Some(Duration::from_millis(50));
    let server = UdpServer::spawn(Arc::clone(&config), options, || echo_app).unwrap();
    let addr = server.local_addr();

    // Certificate handshakes with tickets, and a resumption from the ticket.
    let tickets_on = client_ctx(|_| {});
    let mut c = dtls(addr, &tickets_on, None).unwrap();
    assert_eq!(echo(&mut c, b"hello"), b"hello");
    let first = c.ssl().session().unwrap().to_owned();
    f.secrets.push(master_key("a certificate session", &first));
    let _ = c.shutdown();
    let mut c = dtls(addr, &tickets_on, Some(&first)).unwrap();
    assert!(c.ssl().session_reused(), "the ticket resumed");
    f.secrets.push(master_key(
        "a resumed session",
        &c.ssl().session().unwrap().to_owned(),
    ));
    let _ = c.shutdown();
    assert!(tickets.stats().resumed >= 1, "{:?}", tickets.stats());

    // PSK: the right key, then a wrong one (a failed handshake, logged).
    let mut c = dtls(addr, &psk_client(psk), None).unwrap();
    assert_eq!(echo(&mut c, b"psk"), b"psk");
    f.secrets.push(master_key(
        "a PSK session",
        &c.ssl().session().unwrap().to_owned(),
    ));
    let _ = c.shutdown();
    let wrong: [u8; 16] = key_bytes("a wrong psk")[..16].try_into().unwrap();
    f.secrets.push(Secret::new("the wrong PSK", &wrong));
    // (It never completes: the wait is only how long its failed exchange goes on.)
    assert!(dtls_within(addr, &psk_client(wrong), None, Duration::from_millis(1500)).is_err());

    // Garbage, and a peer that goes silent (swept as idle); cookies rotate meanwhile.
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..20u8 {
        junk.send_to(&[22, 0xfe, 0xfd, i, 1, 2, 3], addr).unwrap();
    }
    let mut silent = dtls(addr, &tickets_on, None).unwrap();
    assert_eq!(echo(&mut silent, b"then silence"), b"then silence");
    f.secrets.push(master_key(
        "an idle session",
        &silent.ssl().session().unwrap().to_owned(),
    ));
    let end = Instant::now() + Duration::from_secs(10);
    while server.stats().idle_closed == 0 {
        assert!(Instant::now() < end, "the silent peer was not swept");
        std::thread::sleep(Duration::from_millis(10));
    }

    f.debug("TicketKeys", &tickets);
    f.debug("SessionCache", &cache);
    f.debug("ServerConfig", &*config);
    f.debug("MemoryStore", &*store);
    // What the cache stores of a PSK session holds no PSK (a fingerprint of 8 bytes only); it
    // holds master keys, so only the PSKs are looked for there.
    let psks = [Secret::new("the PSK", &psk)];
    let mut stored = 0;
    store
        .for_each(&mut |id, s| {
            f.texts.push(("SessionId".into(), format!("{id:?}")));
            f.texts.push(("StoredSession".into(), format!("{s:?}")));
            assert_none_shown("a stored session's bytes", s.data(), &psks);
            stored += 1;
        })
        .unwrap();
    assert_eq!(
        stored, 1,
        "the PSK session is stored (the others have tickets)"
    );
    server.shutdown().unwrap();
}

/// A sans-IO endpoint with a lean peer, its `Debug` output.
fn endpoint(f: &mut Findings) {
    let config = ServerConfig::builder(SessionCache::builder().build().unwrap())
        .build()
        .unwrap();
    let mut ep = Endpoint::new(config).unwrap();
    let mut ssl = Ssl::new(&client_ctx(|_| {})).unwrap();
    ssl.set_mtu(1400).unwrap();
    ssl.set_connect_state();
    let mut c = SslStream::new(ssl, DatagramPipe::new()).unwrap();
    let from: SocketAddr = ([192, 0, 2, 1], 5684).into();
    let now = Instant::now();
    for _ in 0..10 {
        let _ = c.do_handshake();
        for d in c.get_mut().take_outbound() {
            ep.handle(now, from, &d);
        }
        while let Some(t) = ep.poll_transmit() {
            c.get_mut().push(t.payload);
        }
    }
    assert!(ep.is_connected(from));
    f.secrets.push(master_key(
        "the endpoint's peer",
        &c.ssl().session().unwrap().to_owned(),
    ));
    f.debug("Endpoint", &ep);
    while ep.poll_event().is_some() {}
}

/// Snapshots saved, loaded, and refused (truncated, foreign); the key file read while group
/// readable (a warning).
fn files(f: &mut Findings, ring: &KeyRing) {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("session.keys");
    ring.write_file(&key_file).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    }
    let read = KeyRing::from_file(&key_file).unwrap();
    f.debug("KeyRing", &read);
    let store = MemoryStore::builder().build().unwrap();
    let session = key_bytes("session bytes in a snapshot");
    f.secrets
        .push(Secret::new("stored session bytes", &session));
    for i in 0..4u8 {
        let id = SessionId::new(&[i; 32]).unwrap();
        let s = StoredSession::new(
            session.to_vec(),
            SystemTime::now() + Duration::from_secs(60),
        );
        f.debug("StoredSession", &s);
        store.put(id, s).unwrap();
    }
    let snap = dir.path().join("sessions.snap");
    let now = SystemTime::now();
    openssl_session_cache::snapshot::save_snapshot(&store, &snap, ring, now).unwrap();
    let loaded = MemoryStore::builder().build().unwrap();
    openssl_session_cache::snapshot::load_snapshot(&loaded, &snap, ring, now).unwrap();
    let other = KeyRing::new(99, key_bytes("another ring"));
    let e =
        openssl_session_cache::snapshot::load_snapshot(&loaded, &snap, &other, now).unwrap_err();
    f.error("a foreign snapshot's error", &e);
    let bytes = std::fs::read(&snap).unwrap();
    std::fs::write(&snap, &bytes[..bytes.len() - 10]).unwrap();
    let e = openssl_session_cache::snapshot::load_snapshot(&loaded, &snap, ring, now).unwrap_err();
    f.error("a truncated snapshot's error", &e);
    let id = SessionId::new(&[1; 32]).unwrap();
    let sealed = ring.seal(&id, &session).unwrap();
    let e = ring
        .open(&SessionId::new(&[2; 32]).unwrap(), &sealed)
        .unwrap_err();
    f.error("an envelope moved to another id", &e);
    std::fs::write(&key_file, "1:0011\n").unwrap();
    f.error(
        "a malformed key file's error",
        &KeyRing::from_file(&key_file).unwrap_err(),
    );
}

/// A Redis store through its life: puts, lookups, takes, invalidations to a second host,
/// then Redis killed under it (errors, breaker).
#[cfg(feature = "redis")]
fn redis(f: &mut Findings, ring: &KeyRing) {
    use openssl_session_cache::{LookupDone, LookupMode, RedisStore};
    let mut server = redis_server::RedisServer::start();
    let builder = RedisStore::builder(server.url())
        .key_ring(ring.clone())
        .tier_entries(16)
        .op_timeout(Duration::from_millis(100));
    f.debug("RedisStoreBuilder", &builder);
    let a = builder.build().unwrap();
    let b = RedisStore::builder(server.url())
        .key_ring(ring.clone())
        .tier_entries(16)
        .build()
        .unwrap();
    a.check().unwrap();
    b.check().unwrap();
    let session = key_bytes("session bytes in redis");
    f.secrets
        .push(Secret::new("session bytes in Redis", &session));
    let id = |i: u8| SessionId::new(&[i; 32]).unwrap();
    for i in 0..8 {
        let s = StoredSession::new(
            session.to_vec(),
            SystemTime::now() + Duration::from_secs(60),
        );
        a.put(id(i), s).unwrap();
    }
    redis_server::flush(&a);
    redis_server::wait_until("B subscribed", || b.stats().subscribed);
    assert!(b.get(&id(1)).unwrap().is_some());
    assert!(a.take(&id(1)).unwrap().is_some());
    a.remove(&id(2)).unwrap();
    redis_server::flush(&a);
    let (tx, rx) = std::sync::mpsc::channel();
    b.lookup(
        id(3),
        LookupMode::Take,
        LookupDone::new(move |r| tx.send(r).unwrap()),
    );
    assert!(rx
        .recv_timeout(redis_server::PATIENCE)
        .unwrap()
        .unwrap()
        .is_some());
    f.debug("RedisStore", &a);
    server.kill();
    for i in 4..8 {
        if let Err(e) = a.get(&id(100 + i)) {
            f.error("a Redis store error", &e);
        }
        let _ = a.put(
            id(100 + i),
            StoredSession::new(
                session.to_vec(),
                SystemTime::now() + Duration::from_secs(60),
            ),
        );
    }
    assert!(!a.flush(Duration::from_millis(300)));
    f.debug("RedisStore, Redis gone", &a);
    drop((a, b));
}

#[test]
fn no_secret_shows_in_logs_debug_output_or_errors() {
    record_everything();
    let (k1, k2) = (key_bytes("ring key 1"), key_bytes("ring key 2"));
    let ring = KeyRing::new(11, k1).rotate(12, k2).unwrap();
    let psk: [u8; 16] = key_bytes("the psk")[..16].try_into().unwrap();
    let epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 3600;
    let mut f = Findings::default();
    f.secrets.push(Secret::new("ring key 11", &k1));
    f.secrets.push(Secret::new("ring key 12", &k2));
    f.secrets.push(Secret::new("the PSK", &psk));
    f.secrets.extend(ticket_keys(&k2, 12, epoch));

    dtls_server(&mut f, &ring, epoch, psk);
    endpoint(&mut f);
    files(&mut f, &ring);
    #[cfg(feature = "redis")]
    redis(&mut f, &ring);

    let logged = log().lock().unwrap().clone();
    // The recording works, and covered every level that was used.
    let text = String::from_utf8_lossy(&logged);
    for level in ["TRACE", "DEBUG", "INFO", "WARN"] {
        assert!(text.contains(level), "nothing logged at {level}:\n{text}");
    }
    assert_none_shown("the log", &logged, &f.secrets);
    for (what, shown) in &f.texts {
        assert_none_shown(what, shown.as_bytes(), &f.secrets);
    }
    // The search itself finds what it looks for, in every form.
    let probe = &f.secrets[0];
    for form in [
        hex::encode(&probe.bytes[3..13]),
        hex::encode_upper(&probe.bytes[..8]),
        format!("{:?}", &probe.bytes[..]),
        format!("{:02x?}", &probe.bytes[20..]),
    ] {
        let shown = shown_in(format!("x {form} y").as_bytes(), &f.secrets);
        assert_eq!(shown, std::slice::from_ref(&probe.name), "{form}");
    }
}
