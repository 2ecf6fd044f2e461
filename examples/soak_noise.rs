//! The unfriendly part of the soak test's load (`scripts/soak.sh`): garbage datagrams,
//! cookieless ClientHello floods from ever new ports, half-open handshakes (a real client that
//! completes the cookie exchange and vanishes), and idle churn (a full handshake, then silence
//! until the server's idle timeout frees the peer). One thread, rate-limited.
//!
//! ```text
//! cargo run --release --example soak_noise -- --server 127.0.0.1:4433 --duration 60
//! ```

use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use clap::Parser;
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVerifyMode};
use rand::{Rng, SeedableRng};

/// Hostile and sloppy DTLS traffic for a soak test.
#[derive(Debug, Parser)]
struct Args {
    /// The server.
    #[arg(long, default_value = "127.0.0.1:4433")]
    server: SocketAddr,
    /// Seconds to run.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Rounds per second (each round: garbage, a flood burst, one half-open, one idle peer).
    #[arg(long, default_value_t = 20)]
    rate: u32,
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

/// Ports the sloppy clients bind, below Linux's ephemeral range (32768-60999), cycled.
///
/// A client that vanishes mid-handshake leaves the server retransmitting its flight to that
/// port for the handshake timeout. If the kernel handed the port to one of the load's new
/// connections meanwhile, that connection would receive the old flight: OpenSSL's client
/// buffers the early ServerHello (message sequence 1) while it waits for the
/// HelloVerifyRequest, takes it as the answer to its own hello and fails on the server key
/// exchange's signature ("bad signature"; the server then sees the alert). Real clients on
/// other hosts or behind a NAT that holds a mapping longer than that window never meet this;
/// keeping the noise on its own ports keeps the soak's load counting the server's failures only.
struct NoisePorts(u16);

impl NoisePorts {
    const FIRST: u16 = 20_000;
    const END: u16 = 28_000;

    fn bind(&mut self) -> io::Result<UdpSocket> {
        for _ in Self::FIRST..Self::END {
            let port = self.0;
            self.0 = if port + 1 >= Self::END {
                Self::FIRST
            } else {
                port + 1
            };
            match UdpSocket::bind(("127.0.0.1", port)) {
                Ok(s) => return Ok(s),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no free noise port",
        ))
    }
}

/// A client that handshakes until it is established (`full`) or only until the server's
/// flight after the cookie exchange arrived, then is dropped without a word.
fn sloppy_client(
    ctx: &SslContext,
    server: SocketAddr,
    ports: &mut NoisePorts,
    full: bool,
) -> io::Result<bool> {
    let sock = ports.bind()?;
    sock.connect(server)?;
    sock.set_read_timeout(Some(Duration::from_millis(5)))?;
    let mut ssl = Ssl::new(ctx).map_err(io::Error::other)?;
    ssl.set_mtu(1400).map_err(io::Error::other)?;
    ssl.set_connect_state();
    let mut s = SslStream::new(ssl, Udp(sock)).map_err(io::Error::other)?;
    let end = Instant::now() + Duration::from_secs(2);
    let mut reads = 0;
    while Instant::now() < end {
        match s.do_handshake() {
            Ok(()) => return Ok(true),
            Err(e) if e.code() == ErrorCode::WANT_READ => {
                reads += 1;
                // After the HelloVerifyRequest and the server's flight, a half-open client stops.
                if !full && reads >= 3 {
                    return Ok(false);
                }
            }
            Err(_) => return Ok(false),
        }
    }
    Ok(false)
}

/// A cookieless DTLS 1.2 ClientHello record.
fn client_hello(rng: &mut impl Rng) -> Vec<u8> {
    let mut body = vec![0xfe, 0xfd];
    body.extend((0..32).map(|_| rng.random::<u8>()));
    body.extend_from_slice(&[0, 0, 0, 2, 0xc0, 0x2b, 1, 0]);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&[0, 0, 0, 0, 0]);
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut b = SslContext::builder(SslMethod::dtls_client())?;
    b.set_verify(SslVerifyMode::NONE);
    b.set_options(SslOptions::NO_QUERY_MTU);
    let ctx = b.build();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let garbage = UdpSocket::bind("127.0.0.1:0")?;
    let mut ports = NoisePorts(NoisePorts::FIRST);
    let period = Duration::from_secs(1) / args.rate.max(1);
    let end = Instant::now() + Duration::from_secs(args.duration);
    let (mut rounds, mut idle, mut half_open) = (0u64, 0u64, 0u64);
    while Instant::now() < end {
        let t = Instant::now();
        for _ in 0..4 {
            let len = rng.random_range(0..300);
            let junk: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let _ = garbage.send_to(&junk, args.server);
        }
        for _ in 0..8 {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            let _ = s.send_to(&client_hello(&mut rng), args.server);
        }
        sloppy_client(&ctx, args.server, &mut ports, false)?;
        half_open += 1;
        if sloppy_client(&ctx, args.server, &mut ports, true)? {
            idle += 1;
        }
        rounds += 1;
        std::thread::sleep(period.saturating_sub(t.elapsed()));
    }
    println!("rounds={rounds} idle_peers={idle} half_open={half_open}");
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
