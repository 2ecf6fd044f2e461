//! Shared test helpers: a throwaway PKI and in-process TLS/DTLS handshakes over socket pairs
//! (here), the DTLS server and its clients ([`server`]), the `openssl s_client` CLI
//! ([`s_client`]), and tests run alone in a child process ([`child`]). `redis_server.rs` beside
//! it starts a throwaway `redis-server`.
//!
//! Every socket pair here is bounded: a side that waits [`IO_PATIENCE`] for its peer's next
//! bytes fails the test, saying so, instead of hanging it.
#![allow(dead_code, unsafe_code, unreachable_pub)]

pub mod child;
pub mod s_client;
pub mod secrets;
#[cfg(feature = "server")]
pub mod server;

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslSession, SslStream,
    SslVerifyMode, SslVersion,
};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509NameBuilder, X509};
use openssl_session_cache::SessionCache;

/// A key and a self-signed certificate.
pub struct Identity {
    pub cert: X509,
    pub key: PKey<Private>,
}

pub struct Pki {
    pub server: Identity,
    pub client: Identity,
}

pub fn self_signed(cn: &str) -> Identity {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(&name).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    Identity {
        cert: b.build(),
        key,
    }
}

pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| Pki {
        server: self_signed("server.test"),
        client: self_signed("client.test"),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tls12,
    Tls13,
    Dtls12,
}

impl Proto {
    fn method(self) -> SslMethod {
        match self {
            Self::Dtls12 => SslMethod::dtls(),
            _ => SslMethod::tls(),
        }
    }

    fn pin(self, b: &mut SslContextBuilder) {
        let v = match self {
            Self::Tls12 => SslVersion::TLS1_2,
            Self::Tls13 => SslVersion::TLS1_3,
            Self::Dtls12 => SslVersion::DTLS1_2,
        };
        b.set_min_proto_version(Some(v)).unwrap();
        b.set_max_proto_version(Some(v)).unwrap();
        if self == Self::Dtls12 {
            b.set_options(SslOptions::NO_QUERY_MTU);
        }
    }
}

/// A server context builder with the server identity; `mtls` requires a client certificate.
pub fn server_builder(proto: Proto, mtls: bool) -> SslContextBuilder {
    let pki = pki();
    let mut b = SslContext::builder(proto.method()).unwrap();
    proto.pin(&mut b);
    b.set_certificate(&pki.server.cert).unwrap();
    b.set_private_key(&pki.server.key).unwrap();
    if mtls {
        let mut store = X509StoreBuilder::new().unwrap();
        store.add_cert(pki.client.cert.clone()).unwrap();
        b.set_verify_cert_store(store.build()).unwrap();
        b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    }
    b
}

/// A context and the protocol it is pinned to.
pub struct Ctx {
    pub ctx: SslContext,
    pub proto: Proto,
}

/// A server context with `cache` installed.
pub fn server_ctx(proto: Proto, cache: &SessionCache, mtls: bool) -> Ctx {
    let mut b = server_builder(proto, mtls);
    cache.install(&mut b).unwrap();
    Ctx {
        ctx: b.build(),
        proto,
    }
}

/// A client context: trusts nothing (no verification of the server); presents the client
/// identity when `mtls`.
pub fn client_ctx(proto: Proto, mtls: bool) -> Ctx {
    let mut b = SslContext::builder(proto.method()).unwrap();
    proto.pin(&mut b);
    b.set_verify(SslVerifyMode::NONE);
    if mtls {
        let pki = pki();
        b.set_certificate(&pki.client.cert).unwrap();
        b.set_private_key(&pki.client.key).unwrap();
    }
    Ctx {
        ctx: b.build(),
        proto,
    }
}

/// How the server ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerClose {
    /// Waits for close_notify and answers it.
    Clean,
    /// Drops the connection right after the echo, without shutdown.
    Drop,
    /// Drops it after `SessionCache::keep_resumable`.
    KeepResumable,
}

/// What a connection did.
pub struct Outcome {
    pub client_reused: bool,
    pub server_reused: bool,
    pub server_saw_client_cert: bool,
    /// The client's session after the exchange (for TLS 1.3, the newest ticket).
    pub session: Option<SslSession>,
}

/// How long one side of an in-process connection waits for the other's next bytes (or for room
/// to write) before the test fails. Far beyond any handshake on a loaded machine; only a hung or
/// dead peer reaches it.
pub const IO_PATIENCE: Duration = Duration::from_secs(30);

/// A blocking socket whose reads and writes give up after [`IO_PATIENCE`]: the test fails with
/// a message naming the side, instead of hanging. (OpenSSL sees the panic as a failed read; the
/// openssl crate carries it out of the `Ssl` call that made the read.)
#[derive(Debug)]
pub struct Bounded<S> {
    io: S,
    side: &'static str,
}

impl<S: Read> Read for Bounded<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.io.read(buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "{}: nothing arrived from the other side in time (it hung or died)",
                    self.side
                )
            }
            r => r,
        }
    }
}

impl<S: Write> Write for Bounded<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.io.write(buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "{}: the other side took nothing in time (it hung or died)",
                    self.side
                )
            }
            r => r,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.io.flush()
    }
}

impl Bounded<UnixStream> {
    /// `s`, its reads and writes bounded by [`IO_PATIENCE`]; `side` names it in the failure.
    pub fn stream(s: UnixStream, side: &'static str) -> Self {
        Self::stream_within(s, side, IO_PATIENCE)
    }

    /// [`stream`](Self::stream), bounded by `patience` (the harness's own test).
    pub fn stream_within(s: UnixStream, side: &'static str, patience: Duration) -> Self {
        s.set_read_timeout(Some(patience)).unwrap();
        s.set_write_timeout(Some(patience)).unwrap();
        Self { io: s, side }
    }
}

impl Bounded<Dgram> {
    /// `s`, its reads and writes bounded by [`IO_PATIENCE`]; `side` names it in the failure.
    pub fn datagram(s: UnixDatagram, side: &'static str) -> Self {
        s.set_read_timeout(Some(IO_PATIENCE)).unwrap();
        s.set_write_timeout(Some(IO_PATIENCE)).unwrap();
        Self { io: Dgram(s), side }
    }
}

/// A Unix stream socket pair, `(server side, client side)`, each bounded by [`IO_PATIENCE`].
pub fn stream_pair() -> (Bounded<UnixStream>, Bounded<UnixStream>) {
    let (a, b) = UnixStream::pair().unwrap();
    (
        Bounded::stream(a, "server side"),
        Bounded::stream(b, "client side"),
    )
}

/// One datagram per read and write over a Unix datagram socket.
#[derive(Debug)]
pub struct Dgram(pub UnixDatagram);

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

/// A Unix datagram socket pair, `(server side, client side)`, each bounded by [`IO_PATIENCE`].
pub fn datagram_pair() -> (Bounded<Dgram>, Bounded<Dgram>) {
    let (a, b) = UnixDatagram::pair().unwrap();
    (
        Bounded::datagram(a, "server side"),
        Bounded::datagram(b, "client side"),
    )
}

#[derive(Debug)]
enum Pipe {
    Stream(Bounded<UnixStream>),
    Dgram(Bounded<Dgram>),
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Stream(s) => s.read(buf),
            Self::Dgram(d) => d.read(buf),
        }
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Stream(s) => s.write(buf),
            Self::Dgram(d) => d.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn pipes(dtls: bool) -> (Pipe, Pipe) {
    if dtls {
        let (a, b) = datagram_pair();
        (Pipe::Dgram(a), Pipe::Dgram(b))
    } else {
        let (a, b) = stream_pair();
        (Pipe::Stream(a), Pipe::Stream(b))
    }
}

/// Wakes a parked thread.
struct Unpark(thread::Thread);

impl std::task::Wake for Unpark {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.unpark();
    }
}

/// `ssl.accept(io)` on a blocking stream that also waits out suspended session lookups (a
/// remote store: the handshake fails with `WANT_CLIENT_HELLO_CB` until the lookup completes).
pub fn accept_waiting_for_lookups<S: Read + Write + std::fmt::Debug>(
    ssl: Ssl,
    io: S,
) -> SslStream<S> {
    let mut attempt = ssl.accept(io);
    loop {
        match attempt {
            Ok(s) => return s,
            Err(openssl::ssl::HandshakeError::Failure(mid))
            | Err(openssl::ssl::HandshakeError::WouldBlock(mid))
                if mid.error().code() == ErrorCode::WANT_CLIENT_HELLO_CB =>
            {
                if let Some(lookup) = SessionCache::pending_lookup(mid.ssl()) {
                    let waker =
                        std::task::Waker::from(std::sync::Arc::new(Unpark(thread::current())));
                    lookup.register(&waker);
                    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
                    while !lookup.is_complete() {
                        assert!(std::time::Instant::now() < end, "a lookup never completed");
                        thread::park_timeout(std::time::Duration::from_millis(100));
                    }
                }
                attempt = mid.handshake();
            }
            Err(e) => panic!("server handshake: {e:?}"),
        }
    }
}

/// Runs one connection: handshake (offering `session`), one echo, close as `close` says.
pub fn connect(
    server: &Ctx,
    client: &Ctx,
    session: Option<&SslSession>,
    close: ServerClose,
) -> Outcome {
    let dtls = client.proto == Proto::Dtls12;
    let (server, client) = (&server.ctx, &client.ctx);
    let (spipe, cpipe) = pipes(dtls);
    thread::scope(|scope| {
        let server_side = scope.spawn(move || {
            let mut ssl = Ssl::new(server).unwrap();
            if dtls {
                ssl.set_mtu(1400).unwrap();
            }
            let mut s: SslStream<Pipe> = accept_waiting_for_lookups(ssl, spipe);
            let reused = s.ssl().session_reused();
            let saw_cert = s.ssl().peer_certificate().is_some();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).expect("server read");
            s.write_all(&buf[..n]).expect("server write");
            match close {
                ServerClose::Clean => {
                    match s.ssl_read(&mut buf) {
                        Err(e) if e.code() == ErrorCode::ZERO_RETURN => {}
                        Ok(0) => {}
                        other => panic!("expected close_notify, got {other:?}"),
                    }
                    let _ = s.shutdown();
                }
                ServerClose::Drop => drop(s),
                ServerClose::KeepResumable => {
                    SessionCache::keep_resumable(&mut s);
                    drop(s);
                }
            }
            (reused, saw_cert)
        });
        let mut ssl = Ssl::new(client).unwrap();
        if dtls {
            ssl.set_mtu(1400).unwrap();
        }
        if let Some(sess) = session {
            // SAFETY: the client contexts in these tests keep no internal session cache that the
            // session could be linked into.
            unsafe { ssl.set_session(sess).unwrap() };
        }
        let mut c = ssl.connect(cpipe).expect("client handshake");
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        let client_reused = c.ssl().session_reused();
        let session = c.ssl().session().map(|s| s.to_owned());
        // Always send close_notify: a client that frees its SSL without it marks its own copy of
        // the session not resumable (ssl_clear_bad_session), and would not offer it again.
        let _ = c.shutdown();
        let (server_reused, server_saw_client_cert) = server_side.join().unwrap();
        drop(c);
        Outcome {
            client_reused,
            server_reused,
            server_saw_client_cert,
            session,
        }
    })
}
