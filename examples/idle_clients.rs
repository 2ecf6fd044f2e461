//! Holds many idle DTLS 1.2 connections to a server running in another process, so that the
//! server's memory per established, idle peer can be read from the outside (its RSS before and
//! after, divided by the peers), then checks that every one of them still echoes.
//!
//! Each connection has its own UDP socket (a source port of its own), does a full handshake
//! (`--resume`: the first one full, every other one resuming its session), sends one line, reads
//! the echo, and then stays open and silent. With `--pid`, the server's `VmRSS` is read from
//! `/proc/PID/status` before the first connection and after the last, and the figure printed.
//! The clients are the openssl crate's own `SslStream`s: nothing of this crate runs in them.
//!
//! ```text
//! cargo run --release --example dtls_echo_server -- --max-peers 20000 --per-ip 20000 \
//!     --max-handshakes 64 --idle-timeout 3600 --stats-interval 0 &
//! cargo run --release --example idle_clients -- --server 127.0.0.1:4433 --peers 19000 --pid $!
//! ```
//!
//! A process may hold about 20 000 sockets here (`ulimit -n`); for more peers run several
//! clients, each from its own loopback address (`--bind 127.0.0.2`, `--bind 127.0.0.3`, ...):
//! one address has fewer than 65 536 ports.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use clap::Parser;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslSession, SslStream, SslVerifyMode,
};

/// Idle DTLS connections held against a server in another process.
#[derive(Debug, Parser)]
struct Args {
    /// The server.
    #[arg(long, default_value = "127.0.0.1:4433")]
    server: SocketAddr,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 2000)]
    peers: usize,
    /// The local address the clients' sockets bind (a loopback address).
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Resume one session for every connection after the first (abbreviated handshakes).
    #[arg(long)]
    resume: bool,
    /// The server's process id: its RSS is read before and after.
    #[arg(long)]
    pid: Option<u32>,
    /// Seconds to wait, holding the connections, before checking that they still echo (for a
    /// reading of memory from outside meanwhile).
    #[arg(long, default_value_t = 0)]
    hold: u64,
    /// Check this many of the connections at the end (default: all).
    #[arg(long)]
    check: Option<usize>,
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

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn connect(
    args: &Args,
    ctx: &SslContext,
    session: Option<&SslSession>,
) -> Result<SslStream<UdpIo>, String> {
    let sock = UdpSocket::bind((args.bind, 0)).map_err(|e| format!("bind: {e}"))?;
    sock.connect(args.server).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let mut ssl = Ssl::new(ctx).map_err(|e| e.to_string())?;
    ssl.set_mtu(1400).map_err(|e| e.to_string())?;
    ssl.set_connect_state();
    if let Some(s) = session {
        // SAFETY: the client context keeps no internal session cache, and the session came
        // from a connection of that same context.
        #[allow(unsafe_code)]
        unsafe {
            ssl.set_session(s).map_err(|e| e.to_string())?;
        }
    }
    let mut stream = SslStream::new(ssl, UdpIo(sock)).map_err(|e| e.to_string())?;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match stream.do_handshake() {
            Ok(()) => return Ok(stream),
            Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < end => {}
            Err(e) => return Err(format!("handshake: {e}")),
        }
    }
}

fn echo(stream: &mut SslStream<UdpIo>, line: &[u8]) -> Result<(), String> {
    stream.ssl_write(line).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 256];
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match stream.ssl_read(&mut buf) {
            Ok(n) if &buf[..n] == line => return Ok(()),
            Ok(_) => return Err("another answer".into()),
            Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < end => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut ctx = SslContext::builder(SslMethod::dtls_client())?;
    ctx.set_verify(SslVerifyMode::NONE);
    ctx.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
    let ctx = ctx.build();
    let before = args.pid.and_then(rss_kib);
    let started = Instant::now();
    let mut held = Vec::with_capacity(args.peers);
    let mut session: Option<SslSession> = None;
    for i in 0..args.peers {
        let mut stream =
            connect(&args, &ctx, session.as_ref()).map_err(|e| format!("connection {i}: {e}"))?;
        echo(&mut stream, format!("hello {i}").as_bytes())
            .map_err(|e| format!("connection {i}: {e}"))?;
        if args.resume && session.is_none() {
            session = stream.ssl().session().map(|s| s.to_owned());
        }
        held.push(stream);
        if (i + 1) % 5000 == 0 {
            eprintln!("{} connections in {:.1?}", i + 1, started.elapsed());
        }
    }
    let resumed = held.iter().filter(|s| s.ssl().session_reused()).count();
    println!(
        "held {} connections ({resumed} resumed) in {:.1?}",
        held.len(),
        started.elapsed()
    );
    // Let the server settle (its last datagrams answered) before reading its memory.
    std::thread::sleep(Duration::from_millis(500));
    if let (Some(pid), Some(before)) = (args.pid, before) {
        if let Some(after) = rss_kib(pid) {
            let per_peer = (after.saturating_sub(before) as f64) * 1024.0 / args.peers as f64;
            println!(
                "server rss {before} KiB -> {after} KiB: {per_peer:.0} B per idle peer ({:.2} KiB)",
                per_peer / 1024.0
            );
        }
    }
    if args.hold > 0 {
        std::thread::sleep(Duration::from_secs(args.hold));
    }
    let check = args.check.unwrap_or(held.len()).min(held.len());
    let step = (held.len() / check.max(1)).max(1);
    let mut ok = 0;
    for (i, stream) in held.iter_mut().enumerate().step_by(step).take(check) {
        echo(stream, format!("still here {i}").as_bytes())
            .map_err(|e| format!("connection {i} no longer echoes: {e}"))?;
        ok += 1;
    }
    println!("{ok} of {check} checked connections still echo");
    Ok(())
}
