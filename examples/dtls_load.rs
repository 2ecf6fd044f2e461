//! A lean DTLS load generator: one thread drives `--clients` concurrent DTLS 1.2 client state
//! machines, each over its own UDP socket (mio), doing full or resumed handshakes plus an
//! optional echo, and reports handshakes per second, p50/p99 latency and its own CPU per
//! handshake (so that a server's CPU can be told from the load's on a shared machine).
//!
//! Every connection uses a new UDP socket (a new source port), like a fresh device. In `resumed`
//! mode each client slot's first connection is a full handshake (not counted) whose session is
//! kept in a `ClientSessionCache` and resumed on every later connection. Each connection ends
//! with close_notify so the server keeps the session.
//!
//! ```text
//! cargo run --release --example dtls_echo_server -- --stats-interval 0 &
//! cargo run --release --example dtls_load -- --server 127.0.0.1:4433 --clients 16 --mode resumed
//! ```
//!
//! It also drives `openssl s_server -dtls1_2` (`--reply none`, handshakes only: s_server does
//! not echo over DTLS).

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVerifyMode};
use openssl_session_cache::{ClientSessionCache, DatagramPipe};

/// DTLS 1.2 handshake load generator (one thread, many clients).
#[derive(Debug, Parser)]
struct Args {
    /// The server to load; repeat it (`--server A --server B`) to spread connections over several
    /// servers in turn, so that a session made on one is resumed on the next (a farm).
    #[arg(long, default_value = "127.0.0.1:4433")]
    server: Vec<SocketAddr>,
    /// Let the servers issue session tickets (resumption then uses them); without it the
    /// clients refuse tickets and resume by session id.
    #[arg(long)]
    tickets: bool,
    /// Concurrent clients (connections in flight at any time).
    #[arg(long, alias = "threads", default_value_t = 16)]
    clients: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Full handshakes every time, or resumptions of one session per client.
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
    /// Some bytes back.
    Reversed,
    /// Nothing: handshake only.
    None,
}

const LINE: &[u8] = b"load test line\n";
/// How often connections without news are driven again (OpenSSL then retransmits a flight
/// whose timer expired).
const TICK: Duration = Duration::from_millis(50);

/// Where a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshake,
    AwaitReply,
}

/// One connection in flight.
struct Conn {
    socket: UdpSocket,
    stream: SslStream<DatagramPipe>,
    phase: Phase,
    started: Instant,
    deadline: Instant,
    /// The slot's first connection in resumed mode makes the session; it is not counted.
    warmup: bool,
}

/// How a connection ended.
enum Ended {
    Done { resumed: bool },
    Failed(String),
}

struct Load {
    args: Args,
    ctx: SslContext,
    sessions: ClientSessionCache,
    poll: Poll,
    slots: Vec<Option<Conn>>,
    buf: Vec<u8>,
    latencies_us: Vec<u64>,
    resumed: u64,
    failed: u64,
    /// Which server the next connection goes to (round robin).
    next_server: usize,
}

impl Load {
    fn key(slot: usize) -> String {
        format!("client-{slot}")
    }

    /// Starts a new connection in `slot`.
    fn start(&mut self, slot: usize, warmup: bool) -> Result<(), String> {
        let now = Instant::now();
        let mut socket =
            UdpSocket::bind("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
        let server = self.args.server[self.next_server % self.args.server.len()];
        self.next_server += 1;
        socket.connect(server).map_err(|e| e.to_string())?;
        self.poll
            .registry()
            .register(&mut socket, Token(slot), Interest::READABLE)
            .map_err(|e| e.to_string())?;
        let mut ssl = Ssl::new(&self.ctx).map_err(|e| e.to_string())?;
        ssl.set_mtu(1400).map_err(|e| e.to_string())?;
        ssl.set_connect_state();
        if self.args.mode == Mode::Resumed {
            self.sessions
                .resume(&mut ssl, &Self::key(slot))
                .map_err(|e| e.to_string())?;
        }
        let stream = SslStream::new(ssl, DatagramPipe::new()).map_err(|e| e.to_string())?;
        self.slots[slot] = Some(Conn {
            socket,
            stream,
            phase: Phase::Handshake,
            started: now,
            deadline: now + Duration::from_secs_f64(self.args.timeout),
            warmup,
        });
        self.drive(slot);
        Ok(())
    }

    /// Reads what the socket holds into the connection's pipe.
    fn read(&mut self, slot: usize) {
        let Some(c) = self.slots[slot].as_mut() else {
            return;
        };
        loop {
            match c.socket.recv(&mut self.buf) {
                Ok(n) => c.stream.get_mut().push(self.buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
    }

    /// Runs the connection's state machine on what it has; ends it when done or failed.
    fn drive(&mut self, slot: usize) {
        let Some(c) = self.slots[slot].as_mut() else {
            return;
        };
        let ended = step(c, self.args.reply);
        for d in c.stream.get_mut().take_outbound() {
            let _ = c.socket.send(&d);
        }
        let ended = match ended {
            None if Instant::now() > c.deadline => Some(Ended::Failed("timed out".into())),
            e => e,
        };
        if let Some(ended) = ended {
            self.end(slot, ended);
        }
    }

    fn end(&mut self, slot: usize, ended: Ended) {
        let Some(mut c) = self.slots[slot].take() else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.socket);
        match ended {
            Ended::Done { resumed } => {
                // close_notify, so that both sides keep the session.
                let _ = c.stream.shutdown();
                for d in c.stream.get_mut().take_outbound() {
                    let _ = c.socket.send(&d);
                }
                if !c.warmup {
                    self.latencies_us
                        .push(c.started.elapsed().as_micros() as u64);
                    self.resumed += u64::from(resumed);
                }
            }
            Ended::Failed(e) => {
                self.failed += 1;
                if self.failed <= 3 {
                    let port = c.socket.local_addr().map(|a| a.port()).unwrap_or(0);
                    eprintln!("client {slot} (port {port}): {e}");
                }
            }
        }
    }
}

/// Advances one connection; `Some` when it ended.
fn step(c: &mut Conn, reply: Reply) -> Option<Ended> {
    if c.phase == Phase::Handshake {
        match c.stream.do_handshake() {
            Ok(()) => {}
            Err(e) if e.code() == ErrorCode::WANT_READ => return None,
            Err(e) => return Some(Ended::Failed(format!("handshake: {e}"))),
        }
        if reply == Reply::None {
            return Some(Ended::Done {
                resumed: c.stream.ssl().session_reused(),
            });
        }
        if let Err(e) = c.stream.ssl_write(LINE) {
            return Some(Ended::Failed(format!("write: {e}")));
        }
        c.phase = Phase::AwaitReply;
    }
    let mut buf = [0u8; 2048];
    match c.stream.ssl_read(&mut buf) {
        Ok(n) if reply == Reply::Echo && &buf[..n] != LINE => {
            Some(Ended::Failed("echo mismatch".into()))
        }
        Ok(_) => Some(Ended::Done {
            resumed: c.stream.ssl().session_reused(),
        }),
        Err(e) if e.code() == ErrorCode::WANT_READ => None,
        Err(e) => Some(Ended::Failed(format!("read: {e}"))),
    }
}

/// This process's CPU time so far (user + system), from `/proc/self/stat` (Linux; zero
/// elsewhere). `/proc` counts in USER_HZ, 100 per second.
fn own_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the parenthesized command name: state is field 3, utime 14, stime 15.
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

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    let mut ctx = SslContext::builder(SslMethod::dtls_client())?;
    ctx.set_verify(SslVerifyMode::NONE);
    ctx.set_options(SslOptions::NO_QUERY_MTU);
    if !args.tickets {
        ctx.set_options(SslOptions::NO_TICKET);
    }
    let sessions = ClientSessionCache::new(args.clients, 1);
    sessions.install(&mut ctx);
    let clients = args.clients;
    let mut load = Load {
        ctx: ctx.build(),
        sessions,
        poll: Poll::new()?,
        slots: (0..clients).map(|_| None).collect(),
        buf: vec![0; 65536],
        next_server: 0,
        latencies_us: Vec::new(),
        resumed: 0,
        failed: 0,
        args,
    };
    let warmup = load.args.mode == Mode::Resumed;
    for slot in 0..clients {
        load.start(slot, warmup)?;
    }
    let mut events = Events::with_capacity(1024);
    // In resumed mode the clock starts once every slot holds a session.
    let mut measuring = !warmup;
    let mut start = Instant::now();
    let mut cpu_start = own_cpu();
    let mut end = start + Duration::from_secs_f64(load.args.duration);
    let mut next_tick = Instant::now() + TICK;
    loop {
        let now = Instant::now();
        if !measuring && load.slots.iter().flatten().all(|c| !c.warmup) {
            measuring = true;
            start = now;
            cpu_start = own_cpu();
            end = start + Duration::from_secs_f64(load.args.duration);
        }
        if measuring && now >= end {
            break;
        }
        load.poll
            .poll(&mut events, Some(next_tick.saturating_duration_since(now)))?;
        for event in events.iter() {
            let slot = event.token().0;
            load.read(slot);
            load.drive(slot);
        }
        if Instant::now() >= next_tick {
            next_tick = Instant::now() + TICK;
            for slot in 0..clients {
                load.drive(slot);
            }
        }
        for slot in 0..clients {
            if load.slots[slot].is_none() {
                if let Err(e) = load.start(slot, false) {
                    eprintln!("client {slot}: cannot start: {e}");
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = own_cpu().saturating_sub(cpu_start);
    let mut latencies = std::mem::take(&mut load.latencies_us);
    latencies.sort_unstable();
    let ok = latencies.len();
    println!(
        "mode={:?} clients={} handshakes={} resumed={} failed={} elapsed={:.2}s \
         rate={:.0}/s p50={:.2}ms p99={:.2}ms client_cpu_us_per_hs={:.1}",
        load.args.mode,
        clients,
        ok,
        load.resumed,
        load.failed,
        elapsed,
        ok as f64 / elapsed,
        percentile(&latencies, 0.50) as f64 / 1000.0,
        percentile(&latencies, 0.99) as f64 / 1000.0,
        cpu.as_secs_f64() * 1e6 / ok.max(1) as f64,
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
