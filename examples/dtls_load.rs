//! A DTLS load generator: N client threads doing full or resumed DTLS 1.2 handshakes plus one
//! echo each, reporting handshakes per second and p50/p99 latency.
//!
//! Every connection uses a new UDP socket (a new source port), like a fresh device. In `resumed`
//! mode each thread first makes one full handshake, keeps the session in a
//! `ClientSessionCache`, and resumes it on every later connection. Each connection ends with
//! close_notify so the server keeps the session.
//!
//! ```text
//! cargo run --release --example dtls_echo_server -- --stats-interval 0 &
//! cargo run --release --example dtls_load -- --server 127.0.0.1:4433 --threads 4 --mode resumed
//! ```
//!
//! It also drives `openssl s_server -dtls1_2 -rev` (`--reply reversed`) or any server that does
//! not answer (`--reply none`, handshakes only).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVerifyMode};
use openssl_session_cache::ClientSessionCache;

/// DTLS 1.2 handshake load generator.
#[derive(Debug, Parser)]
struct Args {
    /// The server to load.
    #[arg(long, default_value = "127.0.0.1:4433")]
    server: SocketAddr,
    /// Concurrent client threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Full handshakes every time, or resumptions of one session per thread.
    #[arg(long, value_enum, default_value_t = Mode::Full)]
    mode: Mode,
    /// What the server answers to the line each connection sends.
    #[arg(long, value_enum, default_value_t = Reply::Echo)]
    reply: Reply,
    /// Seconds a connection may take before it counts as failed.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Full,
    Resumed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Reply {
    /// The same bytes back (this crate's echo server).
    Echo,
    /// Some bytes back (`s_server -rev` answers the reversed line).
    Reversed,
    /// Nothing: handshake only.
    None,
}

/// One datagram per read (WouldBlock after the socket's read timeout), one per write.
struct UdpIo(UdpSocket);

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

#[derive(Debug, Default)]
struct ThreadResult {
    latencies_us: Vec<u64>,
    resumed: u64,
    failed: u64,
}

/// One connection: handshake, one line and its answer, close_notify. Returns whether resumed.
fn connect_once(
    ctx: &SslContext,
    sessions: &ClientSessionCache,
    args: &Args,
    key: &str,
) -> Result<bool, String> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
    let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    sock.connect(args.server).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let mut ssl = Ssl::new(ctx).map_err(|e| e.to_string())?;
    ssl.set_mtu(1400).map_err(|e| e.to_string())?;
    ssl.set_connect_state();
    if args.mode == Mode::Resumed {
        sessions.resume(&mut ssl, key).map_err(|e| e.to_string())?;
    }
    let mut stream = SslStream::new(ssl, UdpIo(sock)).map_err(|e| e.to_string())?;
    loop {
        match stream.do_handshake() {
            Ok(()) => break,
            Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < deadline => {}
            Err(e) => return Err(format!("handshake: {e}")),
        }
    }
    let resumed = stream.ssl().session_reused();
    if args.reply != Reply::None {
        let line = b"load test line\n";
        stream.ssl_write(line).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 2048];
        loop {
            match stream.ssl_read(&mut buf) {
                Ok(n) if args.reply == Reply::Echo && &buf[..n] != line => {
                    return Err("echo mismatch".into())
                }
                Ok(_) => break,
                Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < deadline => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
    let _ = stream.shutdown();
    Ok(resumed)
}

fn run_thread(id: usize, args: &Args, stop: &AtomicBool) -> ThreadResult {
    let mut ctx = SslContext::builder(SslMethod::dtls_client()).expect("client context");
    ctx.set_verify(SslVerifyMode::NONE);
    ctx.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
    let sessions = ClientSessionCache::new(4, 1);
    sessions.install(&mut ctx);
    let ctx = ctx.build();
    let key = format!("thread-{id}");
    let mut result = ThreadResult::default();
    if args.mode == Mode::Resumed {
        // The one full handshake that makes the session; not measured.
        if let Err(e) = connect_once(&ctx, &sessions, args, &key) {
            eprintln!("thread {id}: first handshake failed: {e}");
        }
    }
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        match connect_once(&ctx, &sessions, args, &key) {
            Ok(resumed) => {
                result.latencies_us.push(start.elapsed().as_micros() as u64);
                result.resumed += u64::from(resumed);
            }
            Err(e) => {
                result.failed += 1;
                if result.failed <= 3 {
                    eprintln!("thread {id}: {e}");
                }
            }
        }
    }
    result
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Arc::new(Args::parse());
    if args.threads == 0 {
        return Err("--threads must be at least 1".into());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handles: Vec<_> = (0..args.threads)
        .map(|id| {
            let args = Arc::clone(&args);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || run_thread(id, &args, &stop))
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(args.duration));
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let (mut resumed, mut failed) = (0, 0);
    for h in handles {
        let r = h.join().map_err(|_| "a client thread panicked")?;
        latencies.extend(r.latencies_us);
        resumed += r.resumed;
        failed += r.failed;
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let ok = latencies.len();
    println!(
        "mode={:?} threads={} handshakes={} resumed={} failed={} elapsed={:.2}s \
         rate={:.0}/s p50={:.2}ms p99={:.2}ms",
        args.mode,
        args.threads,
        ok,
        resumed,
        failed,
        elapsed,
        ok as f64 / elapsed,
        percentile(&latencies, 0.50) as f64 / 1000.0,
        percentile(&latencies, 0.99) as f64 / 1000.0,
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
