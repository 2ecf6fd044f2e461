//! Batched against one-datagram UDP I/O, on the std driver and (feature `tokio`) the tokio
//! driver: datagrams that queued while the worker was busy are read with one system call in
//! `IoMode::Batched` and one each in `IoMode::Single`, and both modes serve handshakes and
//! records alike. Servers bind 127.0.0.1:0 and stop when the test ends.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use openssl_session_cache::{
    AppContext, DsmConfig, Event, IoMode, IoStats, ServerConfig, SessionCache, UdpOptions,
    UdpServer,
};

use support::server::{dtls_connect, echo, read_record};

/// Echoes every record; on "block" it first holds the worker for 300 ms, so that datagrams
/// queue in the socket meanwhile.
fn blocking_echo(ctx: &mut AppContext<'_>, event: Event) {
    if let Event::Data { peer, data } = event {
        if data == b"block" {
            std::thread::sleep(Duration::from_millis(300));
        }
        let _ = ctx.send(peer, &data);
    }
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

fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// Blocks the server's worker, sends it 20 garbage datagrams meanwhile, and returns the
/// receive system calls the worker made from just before the block until it dropped them all.
fn recv_calls_for_a_burst(
    addr: SocketAddr,
    io_stats: impl Fn() -> IoStats,
    garbage_dropped: impl Fn() -> u64,
) -> u64 {
    let mut c = dtls_connect(addr);
    assert_eq!(echo(&mut c, b"warm"), b"warm");
    std::thread::sleep(Duration::from_millis(50));
    let before = io_stats();
    c.ssl_write(b"block").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let flood = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..20u8 {
        flood.send_to(&[0xff, i, 1, 2, 3], addr).unwrap();
    }
    assert_eq!(read_record(&mut c).as_deref(), Some(&b"block"[..]));
    assert!(wait_for(Duration::from_secs(2), || garbage_dropped() == 20));
    std::thread::sleep(Duration::from_millis(50));
    let after = io_stats();
    assert_eq!(after.datagrams_received - before.datagrams_received, 21);
    after.recv_calls - before.recv_calls
}

#[test]
fn std_driver_reads_a_burst_with_one_call_when_batched_and_one_each_when_not() {
    for io in [IoMode::Batched, IoMode::Single] {
        let server = UdpServer::spawn(config(), options(io), || blocking_echo).unwrap();
        let calls = recv_calls_for_a_burst(
            server.local_addr(),
            || server.io_stats(),
            || server.stats().dropped_garbage,
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
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let runtime = std::thread::spawn(move || {
            rt.block_on(async move {
                let server = TokioServer::spawn(config(), options(io), || blocking_echo)?;
                tx.send((server.local_addr(), server.handle())).unwrap();
                server.wait().await
            })
        });
        let (addr, handle) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let calls = recv_calls_for_a_burst(
            addr,
            || handle.io_stats(),
            || handle.stats().dropped_garbage,
        );
        match io {
            IoMode::Batched => assert!(calls <= 4, "{io:?}: {calls} receive calls"),
            _ => assert!(calls >= 21, "{io:?}: {calls} receive calls"),
        }
        handle.shutdown();
        runtime.join().unwrap().unwrap();
    }
}
