//! Helpers for the DTLS server tests: an in-process server, the `openssl s_client` CLI with
//! bounded runs, and an openssl-crate DTLS client over a UDP socket.
#![allow(dead_code, unreachable_pub)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVerifyMode};
use openssl_session_cache::{
    DsmConfig, ServerConfig, ServerConfigBuilder, SessionCache, UdpOptions, UdpServer,
};

/// The `openssl` binary; the tests fail (they do not skip) without it.
pub fn openssl_cli() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("openssl"))
            .find(|p| p.is_file())
    });
    found.expect(
        "the `openssl` command-line tool is required for these tests: \
         install it (apt-get install openssl) or let .ci/run install it",
    )
}

/// A server on a free loopback port, and its cache.
pub struct TestServer {
    pub server: UdpServer,
    pub cache: SessionCache,
    pub config: Arc<ServerConfig>,
}

impl TestServer {
    pub fn start(
        dsm: DsmConfig,
        tweak: impl FnOnce(ServerConfigBuilder) -> ServerConfigBuilder,
    ) -> Self {
        let cache = SessionCache::builder().max_entries(1000).build().unwrap();
        let config = tweak(ServerConfig::builder(cache.clone()).dsm(dsm))
            .build()
            .unwrap();
        let mut options = UdpOptions::new("127.0.0.1:0".parse().unwrap());
        options.stats_interval = None;
        let server = UdpServer::spawn(Arc::clone(&config), options).unwrap();
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

/// The lines a child process prints, read on background threads.
pub struct Lines {
    rx: mpsc::Receiver<String>,
    /// Every line read so far.
    pub output: Vec<String>,
}

impl Lines {
    /// Reads `pipes` (stdout, stderr, ...) line by line, interleaved as they arrive.
    pub fn read<R: Read + Send + 'static>(pipes: impl IntoIterator<Item = R>) -> Self {
        let (tx, rx) = mpsc::channel();
        for pipe in pipes {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self {
            rx,
            output: Vec::new(),
        }
    }

    /// Waits (at most `limit`) for a new line satisfying `pred`.
    pub fn wait_line(&mut self, limit: Duration, mut pred: impl FnMut(&str) -> bool) -> bool {
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    let hit = pred(&line);
                    self.output.push(line);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// Reads what is left until no line arrives for `quiet`; returns all output.
    pub fn drain(&mut self, quiet: Duration) -> Vec<String> {
        while let Ok(line) = self.rx.recv_timeout(quiet) {
            self.output.push(line);
        }
        std::mem::take(&mut self.output)
    }
}

/// A running `openssl s_client`, killed by PID when dropped.
pub struct SClient {
    child: Child,
    pub lines: Lines,
}

impl SClient {
    /// `openssl s_client -dtls1_2 -connect addr <extra>` with piped stdin/stdout.
    pub fn spawn(addr: SocketAddr, extra: &[&str]) -> Self {
        let mut child = Command::new(openssl_cli())
            .args(["s_client", "-dtls1_2", "-connect", &addr.to_string()])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn openssl s_client");
        let lines = Lines::read(child.stdout.take());
        Self { child, lines }
    }

    /// Waits (at most `limit`) for a line satisfying `pred`.
    pub fn wait_line(&mut self, limit: Duration, pred: impl FnMut(&str) -> bool) -> bool {
        self.lines.wait_line(limit, pred)
    }

    pub fn send_line(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes stdin (s_client then sends close_notify) and waits at most `limit` for the exit;
    /// returns all output.
    pub fn finish(mut self, limit: Duration) -> Vec<String> {
        drop(self.child.stdin.take());
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.lines.drain(Duration::from_millis(100))
    }

    /// Kills s_client (SIGKILL, by PID): it vanishes without close_notify.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs one s_client connection that echoes `line`, bounded in time; returns its output.
pub fn s_client_echo(addr: SocketAddr, extra: &[&str], line: &str) -> Vec<String> {
    let mut c = SClient::spawn(addr, extra);
    c.send_line(line);
    let echoed = c.wait_line(Duration::from_secs(5), |l| l == line);
    let out = c.finish(Duration::from_secs(5));
    assert!(
        echoed,
        "no echo of {line:?}; s_client printed:\n{}",
        out.join("\n")
    );
    out
}

/// Like [`s_client_echo`], but kills s_client by PID once the echo arrived instead of waiting
/// for its close_notify exchange (s_client spends about 0.5 s on that); the server's peer is
/// left to its idle sweep.
pub fn s_client_echo_fast(addr: SocketAddr, extra: &[&str], line: &str) -> Vec<String> {
    let mut c = SClient::spawn(addr, extra);
    c.send_line(line);
    let echoed = c.wait_line(Duration::from_secs(5), |l| l == line);
    let out = std::mem::take(&mut c.lines.output);
    c.kill();
    assert!(
        echoed,
        "no echo of {line:?}; s_client printed:\n{}",
        out.join("\n")
    );
    out
}

pub fn count(out: &[String], prefix: &str) -> usize {
    out.iter().filter(|l| l.starts_with(prefix)).count()
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

/// Sends `data` and waits (bounded) for the echo.
pub fn echo(stream: &mut SslStream<UdpIo>, data: &[u8]) -> Vec<u8> {
    stream.ssl_write(data).unwrap();
    let mut buf = [0u8; 2048];
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match stream.ssl_read(&mut buf) {
            Ok(n) => return buf[..n].to_vec(),
            Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < end => {}
            Err(e) => panic!("dtls client read: {e}"),
        }
    }
}

/// An in-memory datagram stream: written datagrams are recorded, pushed ones are read.
#[derive(Default)]
pub struct CaptureIo {
    pub out: Vec<Vec<u8>>,
    pub inbound: std::collections::VecDeque<Vec<u8>>,
}

impl Read for CaptureIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inbound.pop_front() {
            Some(d) => {
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                Ok(n)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for CaptureIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.push(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A DTLS client over a [`CaptureIo`], handshake started (its first ClientHello in `out`).
pub fn memory_client() -> SslStream<CaptureIo> {
    let mut ssl = Ssl::new(&client_ctx()).unwrap();
    ssl.set_mtu(1400).unwrap();
    ssl.set_connect_state();
    let mut s = SslStream::new(ssl, CaptureIo::default()).unwrap();
    let e = s.do_handshake().unwrap_err();
    assert_eq!(e.code(), ErrorCode::WANT_READ);
    s
}
