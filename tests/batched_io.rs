//! Batched against one-datagram UDP I/O, on the std driver and (feature `tokio`) the tokio
//! driver: datagrams that queued while the worker was busy are read with one system call in
//! `IoMode::Batched` and one each in `IoMode::Single`, and both modes serve handshakes and
//! records alike. Servers bind 127.0.0.1:0 and stop when the test ends.
//!
//! Nothing here waits for a duration to pass: the worker is held inside the application until
//! the kernel shows every datagram of the burst queued on the server's socket
//! (`/proc/net/udp`), and counters are read once the worker has published the datagrams they
//! cover.
#![cfg(feature = "server")]

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use openssl_session_cache::dsm::DsmConfig;
use openssl_session_cache::{
    AppContext, Application, EndpointStats, Event, IoMode, IoStats, ServerConfig, SessionCache,
    UdpOptions, UdpServer,
};

use support::server::{dtls_connect, echo, read_record};

/// How long any wait here may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(10);

/// Echoes every record; on "block" it first says so and holds the worker until released, so
/// that datagrams queue in the socket meanwhile.
#[derive(Clone)]
struct HoldingEcho {
    blocked: mpsc::Sender<()>,
    release: Arc<Mutex<mpsc::Receiver<()>>>,
}

impl Application for HoldingEcho {
    fn on_event(&mut self, ctx: &mut AppContext<'_>, event: Event) {
        if let Event::Data { peer, data } = event {
            if data == b"block" {
                let _ = self.blocked.send(());
                let _ = self
                    .release
                    .lock()
                    .unwrap()
                    .recv_timeout(PATIENCE + PATIENCE);
            }
            let _ = ctx.send(peer, &data);
        }
    }
}

/// The application, the signal that it holds the worker, and the release.
fn holding_echo() -> (HoldingEcho, mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (blocked, blocked_rx) = mpsc::channel();
    let (release_tx, release) = mpsc::channel();
    let app = HoldingEcho {
        blocked,
        release: Arc::new(Mutex::new(release)),
    };
    (app, blocked_rx, release_tx)
}

fn options(io: IoMode) -> UdpOptions {
    let mut options = UdpOptions::new("127.0.0.1:0".parse().unwrap());
    options.stats_interval = None;
    options.io = io;
    options
}

fn config() -> std::sync::Arc<ServerConfig> {
    ServerConfig::builder(SessionCache::builder().build().unwrap())
        .dsm(DsmConfig::new(64))
        .build()
        .unwrap()
}

/// Waits (polling, at most [`PATIENCE`]) until `cond`; fails naming `what`.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The bytes queued for reading on the IPv4 UDP socket bound to 127.0.0.1:`port`, as the
/// kernel counts them (`/proc/net/udp`'s rx_queue: the buffers' true sizes).
fn rx_queue(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/udp").expect("/proc/net/udp");
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .find_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.get(1) == Some(&local.as_str())).then(|| {
                let (_, rx) = fields[4].split_once(':').unwrap();
                u64::from_str_radix(rx, 16).unwrap()
            })
        })
        .unwrap_or_else(|| panic!("no UDP socket on 127.0.0.1:{port} in /proc/net/udp"))
}

/// Holds the server's worker in the application, queues 20 garbage datagrams on its socket
/// meanwhile, releases it, and returns the receive system calls the worker made from before
/// the hold until it dropped them all.
fn recv_calls_for_a_burst(
    addr: SocketAddr,
    blocked: &mpsc::Receiver<()>,
    release: &mpsc::Sender<()>,
    io_stats: impl Fn() -> IoStats,
    stats: impl Fn() -> EndpointStats,
) -> u64 {
    let mut c = dtls_connect(addr);
    assert_eq!(echo(&mut c, b"warm"), b"warm");
    wait_until("the worker published the warm-up record", || {
        stats().records_received == 1
    });
    let before = io_stats();
    c.ssl_write(b"block").unwrap();
    blocked
        .recv_timeout(PATIENCE)
        .expect("the worker reached the application");
    // One datagram first, to learn what one costs in the socket's queue, then the rest.
    let flood = UdpSocket::bind("127.0.0.1:0").unwrap();
    flood.send_to(&[0xff, 0, 1, 2, 3], addr).unwrap();
    let mut one = 0;
    wait_until("the first datagram is queued", || {
        one = rx_queue(addr.port());
        one > 0
    });
    for i in 1..20u8 {
        flood.send_to(&[0xff, i, 1, 2, 3], addr).unwrap();
    }
    wait_until("all 20 datagrams are queued", || {
        rx_queue(addr.port()) == 20 * one
    });
    release.send(()).unwrap();
    assert_eq!(read_record(&mut c).as_deref(), Some(&b"block"[..]));
    wait_until("the worker published the burst", || {
        let s = stats();
        s.dropped_garbage == 20 && s.records_received == 2
    });
    let after = io_stats();
    assert_eq!(after.datagrams_received - before.datagrams_received, 21);
    after.recv_calls - before.recv_calls
}

#[test]
fn std_driver_reads_a_burst_with_one_call_when_batched_and_one_each_when_not() {
    for io in [IoMode::Batched, IoMode::Single] {
        let (app, blocked, release) = holding_echo();
        let server = UdpServer::spawn(config(), options(io), move || app.clone()).unwrap();
        let calls = recv_calls_for_a_burst(
            server.local_addr(),
            &blocked,
            &release,
            || server.io_stats(),
            || server.stats(),
        );
        match io {
            // The "block" record, the burst, and at most a call or two that found nothing.
            IoMode::Batched => assert!(calls <= 4, "{io:?}: {calls} receive calls"),
            _ => assert!(calls >= 21, "{io:?}: {calls} receive calls"),
        }
        server.shutdown().unwrap();
    }
}

#[cfg(feature = "tokio")]
#[test]
fn tokio_driver_reads_a_burst_with_one_call_when_batched_and_one_each_when_not() {
    use openssl_session_cache::TokioServer;

    for io in [IoMode::Batched, IoMode::Single] {
        let (app, blocked, release) = holding_echo();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let runtime = std::thread::spawn(move || {
            rt.block_on(async move {
                let server = TokioServer::spawn(config(), options(io), move || app.clone())?;
                tx.send((server.local_addr(), server.handle())).unwrap();
                server.wait().await
            })
        });
        let (addr, handle) = rx.recv_timeout(PATIENCE).unwrap();
        let calls = recv_calls_for_a_burst(
            addr,
            &blocked,
            &release,
            || handle.io_stats(),
            || handle.stats(),
        );
        match io {
            IoMode::Batched => assert!(calls <= 4, "{io:?}: {calls} receive calls"),
            _ => assert!(calls >= 21, "{io:?}: {calls} receive calls"),
        }
        handle.shutdown();
        runtime.join().unwrap().unwrap();
    }
}
