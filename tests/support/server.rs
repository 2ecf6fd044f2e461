//! An in-process DTLS server on a free loopback port running a test application, and
//! openssl-crate DTLS clients (over a UDP socket, or over a `DatagramPipe`).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVerifyMode};
use openssl_session_cache::dsm::DsmConfig;
use openssl_session_cache::{
    AppContext, Application, DatagramPipe, Event, ServerConfig, ServerConfigBuilder, SessionCache,
    UdpOptions, UdpServer,
};
use parking_lot::Mutex;

/// The echo application: every record goes back to its sender.
pub fn echo_app(ctx: &mut AppContext<'_>, event: Event) {
    if let Event::Data { peer, data } = event {
        let _ = ctx.send(peer, &data);
    }
}

/// Every event an application saw, shared with the test.
pub type Recorded = Arc<Mutex<Vec<Event>>>;

/// Wraps `app`, recording each event before `app` handles it.
pub fn recording<A: Application>(
    log: &Recorded,
    mut app: A,
) -> impl FnMut(&mut AppContext<'_>, Event) {
    let log = Arc::clone(log);
    move |ctx, event| {
        log.lock().push(event.clone());
        app.on_event(ctx, event);
    }
}

/// A server on a free loopback port, and its cache.
pub struct TestServer {
    pub server: UdpServer,
    pub cache: SessionCache,
    pub config: Arc<ServerConfig>,
}

impl TestServer {
    /// One worker running the echo application.
    pub fn start(
        dsm: DsmConfig,
        tweak: impl FnOnce(ServerConfigBuilder) -> ServerConfigBuilder,
    ) -> Self {
        Self::start_with(dsm, tweak, || echo_app)
    }

    /// One worker running the applications `new_app` makes.
    pub fn start_with<A, F>(
        dsm: DsmConfig,
        tweak: impl FnOnce(ServerConfigBuilder) -> ServerConfigBuilder,
        new_app: F,
    ) -> Self
    where
        A: Application + Send + 'static,
        F: FnMut() -> A,
    {
        let cache = SessionCache::builder().max_entries(1000).build().unwrap();
        let config = tweak(ServerConfig::builder(cache.clone()).dsm(dsm))
            .build()
            .unwrap();
        let mut options = UdpOptions::new("127.0.0.1:0".parse().unwrap());
        options.stats_interval = None;
        let server = UdpServer::spawn(Arc::clone(&config), options, new_app).unwrap();
        Self {
            server,
            cache,
            config,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Polls `cond` every 10 ms for at most `limit`.
    pub fn wait_for(&self, limit: Duration, mut cond: impl FnMut(&Self) -> bool) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if cond(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        cond(self)
    }
}

/// One datagram per read (or WouldBlock after the socket's read timeout), one per write.
pub struct UdpIo(pub UdpSocket);

impl Read for UdpIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.recv(buf) {
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(io::ErrorKind::WouldBlock.into()),
            r => r,
        }
    }
}

impl Write for UdpIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn client_ctx() -> SslContext {
    let mut ctx = SslContext::builder(SslMethod::dtls_client()).unwrap();
    ctx.set_verify(SslVerifyMode::NONE);
    ctx.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
    ctx.build()
}

/// A DTLS client connected to `server` over its own UDP socket (blocking, bounded).
pub fn dtls_connect(server: SocketAddr) -> SslStream<UdpIo> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(server).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut ssl = Ssl::new(&client_ctx()).unwrap();
    ssl.set_mtu(1400).unwrap();
    ssl.set_connect_state();
    let mut stream = SslStream::new(ssl, UdpIo(sock)).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match stream.do_handshake() {
            Ok(()) => return stream,
            Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < end => {}
            Err(e) => panic!("dtls client handshake: {e}"),
        }
    }
}

/// Reads one record (bounded); `None` on close_notify.
pub fn read_record<S: Read + Write>(stream: &mut SslStream<S>) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match stream.ssl_read(&mut buf) {
            Ok(n) => return Some(buf[..n].to_vec()),
            Err(e) if e.code() == ErrorCode::ZERO_RETURN => return None,
            Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < end => {}
            Err(e) => panic!("dtls client read: {e}"),
        }
    }
}

/// Sends `data` and waits (bounded) for the answer.
pub fn echo<S: Read + Write>(stream: &mut SslStream<S>, data: &[u8]) -> Vec<u8> {
    stream.ssl_write(data).unwrap();
    read_record(stream).expect("an answer, not close_notify")
}

/// A DTLS client over a [`DatagramPipe`], handshake started (its first ClientHello written).
pub fn memory_client() -> SslStream<DatagramPipe> {
    let mut ssl = Ssl::new(&client_ctx()).unwrap();
    ssl.set_mtu(1400).unwrap();
    ssl.set_connect_state();
    let mut s = SslStream::new(ssl, DatagramPipe::new()).unwrap();
    let e = s.do_handshake().unwrap_err();
    assert_eq!(e.code(), ErrorCode::WANT_READ);
    s
}

/// DTLS clients that keep their sessions in a [`ClientSessionCache`] and resume them (no
/// `unsafe`).
pub struct ResumingClients {
    ctx: SslContext,
    sessions: openssl_session_cache::ClientSessionCache,
}

impl ResumingClients {
    pub fn new() -> Self {
        let sessions = openssl_session_cache::ClientSessionCache::new(64, 1);
        let mut ctx = SslContext::builder(SslMethod::dtls_client()).unwrap();
        ctx.set_verify(SslVerifyMode::NONE);
        ctx.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
        sessions.install(&mut ctx);
        Self {
            ctx: ctx.build(),
            sessions,
        }
    }

    /// Like [`dtls_connect`]: stores the session under `key`, and offers the one stored there.
    pub fn connect(&self, server: SocketAddr, key: &str) -> SslStream<UdpIo> {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect(server).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut ssl = Ssl::new(&self.ctx).unwrap();
        self.sessions.resume(&mut ssl, key).unwrap();
        ssl.set_mtu(1400).unwrap();
        ssl.set_connect_state();
        let mut stream = SslStream::new(ssl, UdpIo(sock)).unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            match stream.do_handshake() {
                Ok(()) => return stream,
                Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < end => {}
                Err(e) => panic!("dtls client handshake: {e}"),
            }
        }
    }
}
