//! Echoed records per second over established connections, for the server's CPU per echoed
//! record (`scripts/record_bench.sh`): `--clients` closed-loop clients, one thread (mio), each
//! with its own UDP socket, each sending a `--size`-byte record, waiting for its echo, sending
//! the next. `--plain` sends bare UDP datagrams (to `examples/udp_echo.rs`, the floor); without
//! it each client first does a DTLS 1.2 handshake with the server and then sends DTLS records.
//! Prints the echoes counted over `--duration` seconds (after every client is connected) and the
//! load's own CPU per echo, so that it can be told from the server's on a shared machine.
//!
//! ```text
//! cargo run --release --example record_load -- --server 127.0.0.1:4433 --clients 16
//! ```

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVerifyMode};
use openssl_session_cache::DatagramPipe;

/// Echo load over established connections.
#[derive(Debug, Parser)]
struct Args {
    /// The server.
    #[arg(long, default_value = "127.0.0.1:4433")]
    server: SocketAddr,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Bytes per record.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Seconds to measure.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Bare UDP datagrams instead of DTLS records.
    #[arg(long)]
    plain: bool,
}

struct Client {
    socket: UdpSocket,
    /// The DTLS connection (none with --plain).
    stream: Option<SslStream<DatagramPipe>>,
    connected: bool,
    /// When the record in flight was sent (resent after a second without its echo).
    sent_at: Option<Instant>,
}

/// This process's CPU time (user + system) from `/proc/self/stat`, in USER_HZ ticks (10 ms).
fn own_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

impl Client {
    fn flush(&mut self) {
        if let Some(s) = self.stream.as_mut() {
            for d in s.get_mut().take_outbound() {
                let _ = self.socket.send(&d);
            }
        }
    }

    fn send_record(&mut self, record: &[u8]) {
        match self.stream.as_mut() {
            Some(s) => {
                let _ = s.ssl_write(record);
                self.flush();
            }
            None => {
                let _ = self.socket.send(record);
            }
        }
        self.sent_at = Some(Instant::now());
    }

    /// Reads what arrived; returns the echoes it held.
    fn receive(&mut self, buf: &mut [u8]) -> usize {
        let mut echoes = 0;
        loop {
            match self.socket.recv(buf) {
                Ok(n) => match self.stream.as_mut() {
                    Some(s) => s.get_mut().push(buf[..n].to_vec()),
                    None => echoes += 1,
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
        if let Some(s) = self.stream.as_mut() {
            if !self.connected {
                match s.do_handshake() {
                    Ok(()) => self.connected = true,
                    Err(e) if e.code() == ErrorCode::WANT_READ => {}
                    Err(e) => eprintln!("handshake: {e}"),
                }
            }
            if self.connected {
                let mut rec = [0u8; 2048];
                loop {
                    match s.ssl_read(&mut rec) {
                        Ok(_) => echoes += 1,
                        Err(e) if e.code() == ErrorCode::WANT_READ => break,
                        Err(_) => break,
                    }
                }
            }
            self.flush();
        }
        echoes
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut ctx = SslContext::builder(SslMethod::dtls_client())?;
    ctx.set_verify(SslVerifyMode::NONE);
    ctx.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
    let ctx = ctx.build();
    let poll = Poll::new()?;
    let mut clients = Vec::new();
    for i in 0..args.clients {
        let mut socket = UdpSocket::bind("127.0.0.1:0".parse()?)?;
        socket.connect(args.server)?;
        poll.registry()
            .register(&mut socket, Token(i), Interest::READABLE)?;
        let stream = if args.plain {
            None
        } else {
            let mut ssl = Ssl::new(&ctx)?;
            ssl.set_mtu(1400)?;
            ssl.set_connect_state();
            let mut s = SslStream::new(ssl, DatagramPipe::new())?;
            let _ = s.do_handshake();
            Some(s)
        };
        let mut c = Client {
            socket,
            connected: args.plain,
            stream,
            sent_at: None,
        };
        c.flush();
        clients.push(c);
    }
    let record = vec![0x5au8; args.size];
    let mut poll = poll;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 65536];
    // Connect every client first (handshakes retransmitted on a 50 ms tick).
    let connect_by = Instant::now() + Duration::from_secs(30);
    while !clients.iter().all(|c| c.connected) {
        if Instant::now() > connect_by {
            return Err("not every client connected within 30 s".into());
        }
        poll.poll(&mut events, Some(Duration::from_millis(50)))?;
        for event in events.iter() {
            clients[event.token().0].receive(&mut buf);
        }
        for c in clients.iter_mut().filter(|c| !c.connected) {
            c.receive(&mut buf);
        }
    }
    for c in &mut clients {
        c.send_record(&record);
    }
    let start = Instant::now();
    let cpu_start = own_cpu();
    let end = start + Duration::from_secs_f64(args.duration);
    let mut echoes: u64 = 0;
    let mut resent: u64 = 0;
    while Instant::now() < end {
        poll.poll(&mut events, Some(Duration::from_millis(100)))?;
        for event in events.iter() {
            let c = &mut clients[event.token().0];
            let got = c.receive(&mut buf);
            if got > 0 {
                echoes += got as u64;
                c.send_record(&record);
            }
        }
        // A lost datagram (full socket buffer) would stall its client: send again after 1 s.
        for c in &mut clients {
            if c.sent_at
                .is_some_and(|t| t.elapsed() > Duration::from_secs(1))
            {
                resent += 1;
                c.send_record(&record);
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = own_cpu().saturating_sub(cpu_start);
    println!(
        "echoes={echoes} elapsed={elapsed:.2}s rate={:.0}/s resent={resent} load_cpu_us_per_echo={:.2}",
        echoes as f64 / elapsed,
        cpu.as_secs_f64() * 1e6 / echoes.max(1) as f64
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
