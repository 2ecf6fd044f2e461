//! Measures an established DTLS peer's echo round trip: one connection, then one small record
//! every `--interval-ms`, timed until its echo comes back. Prints p50/p99/max. Used by
//! `scripts/farm_bench.sh` to show that a hung session store does not hold up established
//! peers.
//!
//! ```text
//! cargo run --release --example echo_probe -- --server 127.0.0.1:4433 --count 500
//! ```

use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use clap::Parser;
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVerifyMode};

/// Echo round trips of one established DTLS peer.
#[derive(Debug, Parser)]
struct Args {
    /// The echo server.
    #[arg(long, default_value = "127.0.0.1:4433")]
    server: SocketAddr,
    /// Echoes to time.
    #[arg(long, default_value_t = 500)]
    count: usize,
    /// Milliseconds between echoes.
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
}

struct Udp(UdpSocket);

impl Read for Udp {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
}

impl Write for Udp {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.connect(args.server)?;
    sock.set_read_timeout(Some(Duration::from_millis(5)))?;
    let mut ctx = SslContext::builder(SslMethod::dtls_client())?;
    ctx.set_verify(SslVerifyMode::NONE);
    ctx.set_options(SslOptions::NO_QUERY_MTU);
    let mut ssl = Ssl::new(&ctx.build())?;
    ssl.set_mtu(1400)?;
    ssl.set_connect_state();
    let mut stream = SslStream::new(ssl, Udp(sock))?;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match stream.do_handshake() {
            Ok(()) => break,
            Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < end => {}
            Err(e) => return Err(format!("handshake: {e}").into()),
        }
    }
    let mut rtts = Vec::with_capacity(args.count);
    let mut lost = 0;
    let mut buf = [0u8; 64];
    for i in 0..args.count {
        let msg = format!("probe {i}");
        let t = Instant::now();
        stream.ssl_write(msg.as_bytes())?;
        let deadline = t + Duration::from_secs(2);
        loop {
            match stream.ssl_read(&mut buf) {
                Ok(n) if &buf[..n] == msg.as_bytes() => {
                    rtts.push(t.elapsed());
                    break;
                }
                Ok(_) => {}
                Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < deadline => {}
                Err(e) if e.code() == ErrorCode::WANT_READ => {
                    lost += 1;
                    break;
                }
                Err(e) => return Err(format!("read: {e}").into()),
            }
        }
        std::thread::sleep(Duration::from_millis(args.interval_ms));
    }
    let _ = stream.shutdown();
    rtts.sort();
    let pick = |q: f64| rtts[((rtts.len() as f64 - 1.0) * q) as usize];
    println!(
        "echoes={} lost={lost} p50_us={} p99_us={} max_us={}",
        rtts.len(),
        pick(0.5).as_micros(),
        pick(0.99).as_micros(),
        rtts.last().map_or(0, |d| d.as_micros())
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
