//! The server's handle from other threads, against real DTLS clients over UDP: a send reaches
//! its peer on whichever worker holds it, a send to a peer that is not there (or to a stopped
//! server) is refused, and a worker whose application panics is reported as it happens, while
//! the other workers go on. Every server binds 127.0.0.1:0 and stops when the test ends; every
//! wait is bounded.
#![cfg(feature = "server")]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl::ssl::SslStream;
use openssl_session_cache::{
    AppContext, CloseReason, Error, Event, SendError, ServerConfig, SessionCache, UdpOptions,
    UdpServer,
};
use parking_lot::Mutex;

use support::server::{dtls_connect, echo, read_record, UdpIo};

/// Which worker each connected peer is on, as the application saw it ([`AppContext::worker`]),
/// and the peers that closed.
#[derive(Default)]
struct Seen {
    workers: HashMap<SocketAddr, usize>,
    closed: Vec<(SocketAddr, CloseReason)>,
}

type Shared = Arc<Mutex<Seen>>;

/// Echoes, records what [`Seen`] holds, and panics on "boom".
fn app(seen: &Shared) -> impl FnMut(&mut AppContext<'_>, Event) + Send + 'static {
    let seen = Arc::clone(seen);
    move |ctx, event| match event {
        Event::Connected { peer, .. } => {
            seen.lock().workers.insert(peer, ctx.worker());
        }
        Event::Data { data, .. } if data == b"boom" => {
            panic!("boom on worker {}", ctx.worker())
        }
        Event::Data { peer, data } => {
            let _ = ctx.send(peer, &data);
        }
        Event::Closed { peer, reason } => seen.lock().closed.push((peer, reason)),
        _ => {}
    }
}

fn server(workers: usize, seen: &Shared) -> UdpServer {
    let config = ServerConfig::builder(SessionCache::builder().build().unwrap())
        .build()
        .unwrap();
    let mut options = UdpOptions::new("127.0.0.1:0".parse().unwrap());
    options.workers = workers;
    options.stats_interval = None;
    UdpServer::spawn(config, options, || app(seen)).unwrap()
}

type Client = SslStream<UdpIo>;

fn local(c: &Client) -> SocketAddr {
    c.get_ref().0.local_addr().unwrap()
}

/// Connects clients until there is one on each of `workers` workers (the kernel spreads them
/// by a hash of their address; 64 tries leave no real chance of missing one); returns the one
/// client of each worker, in worker order.
fn one_per_worker(server: SocketAddr, workers: usize, seen: &Shared) -> Vec<Client> {
    let mut found: Vec<Option<Client>> = (0..workers).map(|_| None).collect();
    for _ in 0..64 {
        let mut c = dtls_connect(server);
        // The echo comes after the Connected event, so the worker is recorded by now.
        assert_eq!(echo(&mut c, b"hi"), b"hi");
        let worker = seen.lock().workers[&local(&c)];
        if found[worker].is_none() {
            found[worker] = Some(c);
        }
        if found.iter().all(Option::is_some) {
            return found.into_iter().flatten().collect();
        }
    }
    panic!("64 clients did not cover {workers} workers");
}

#[test]
fn a_send_through_the_handle_reaches_the_peer_on_whichever_worker_holds_it() {
    let seen = Shared::default();
    let server = server(3, &seen);
    let mut clients = one_per_worker(server.local_addr(), 3, &seen);
    let handle = server.handle();
    // From another thread, each peer by its address: the handle finds its worker.
    let peers: Vec<SocketAddr> = clients.iter().map(local).collect();
    let sender = handle.clone();
    std::thread::spawn(move || {
        for (i, peer) in peers.into_iter().enumerate() {
            sender.send(peer, format!("pushed to {i}").as_bytes())?;
        }
        Ok::<(), SendError>(())
    })
    .join()
    .unwrap()
    .unwrap();
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(
            read_record(c),
            Some(format!("pushed to {i}").into_bytes()),
            "the peer on worker {i}"
        );
    }
    assert_eq!(handle.sends_refused(), 0);
    assert!(handle.failure().is_none());
    server.shutdown().unwrap();
}

#[test]
fn a_send_to_an_unknown_or_closed_peer_or_through_a_stopped_server_is_refused() {
    let seen = Shared::default();
    let server = server(1, &seen);
    let handle = server.handle();
    let stranger: SocketAddr = "127.0.0.1:9".parse().unwrap();
    assert_eq!(handle.send(stranger, b"x"), Err(SendError::UnknownPeer));

    let mut c = dtls_connect(server.local_addr());
    assert_eq!(echo(&mut c, b"hi"), b"hi");
    let peer = local(&c);
    let big = vec![0u8; openssl_session_cache::MAX_RECORD_PLAINTEXT + 1];
    assert_eq!(handle.send(peer, &big), Err(SendError::TooLarge));
    handle.send(peer, b"still here").unwrap();
    assert_eq!(read_record(&mut c), Some(b"still here".to_vec()));

    // Closed: the application hears of it after the handle stopped knowing the peer.
    c.shutdown().unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while seen.lock().closed.is_empty() {
        assert!(
            Instant::now() < end,
            "the peer's close_notify was not reported"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        seen.lock().closed,
        vec![(peer, CloseReason::CloseNotify)],
        "closed by its close_notify"
    );
    assert_eq!(handle.send(peer, b"late"), Err(SendError::UnknownPeer));

    server.shutdown().unwrap();
    assert_eq!(handle.send(peer, b"x"), Err(SendError::Stopped));
    assert!(
        handle.wait_failure().is_none(),
        "a stopped server has no failure"
    );
}

#[test]
fn records_the_worker_cannot_send_when_it_gets_to_them_are_counted_as_refused() {
    // The application holds its worker inside one event until the test has queued three
    // records, so the worker takes all three at once; the peer's send queue holds one.
    let (held, is_held) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    let mut parts = Some((held, released));
    let config = ServerConfig::builder(SessionCache::builder().build().unwrap())
        .send_queue(1)
        .build()
        .unwrap();
    let mut options = UdpOptions::new("127.0.0.1:0".parse().unwrap());
    options.stats_interval = None;
    let server = UdpServer::spawn(config, options, move || {
        let (held, released) = parts.take().expect("one worker");
        move |_: &mut AppContext<'_>, event: Event| {
            if let Event::Data { .. } = event {
                held.send(()).unwrap();
                let _ = released.recv_timeout(Duration::from_secs(10));
            }
        }
    })
    .unwrap();
    let handle = server.handle();
    let mut c = dtls_connect(server.local_addr());
    let peer = local(&c);
    c.ssl_write(b"hold").unwrap();
    is_held
        .recv_timeout(Duration::from_secs(10))
        .expect("the worker did not get the record");
    for line in [&b"one"[..], b"two", b"three"] {
        handle.send(peer, line).unwrap();
    }
    release.send(()).unwrap();
    assert_eq!(read_record(&mut c), Some(b"one".to_vec()));
    assert_eq!(handle.sends_refused(), 2, "two over the peer's send queue");
    server.shutdown().unwrap();
}

/// Runs `f` on a thread of its own and waits at most `limit` for its result.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("no result within {limit:?}"))
}

#[test]
fn a_worker_whose_application_panics_is_reported_at_once_and_the_others_go_on() {
    let seen = Shared::default();
    let server = server(2, &seen);
    let mut clients = one_per_worker(server.local_addr(), 2, &seen);
    let handle = server.handle();
    let waiting = {
        let handle = handle.clone();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(handle.wait_failure());
        });
        rx
    };

    // Worker 1's application panics; nobody calls shutdown.
    clients[1].ssl_write(b"boom").unwrap();
    let failure = waiting
        .recv_timeout(Duration::from_secs(10))
        .expect("the panic was not reported within 10 s");
    match failure {
        Some(Error::WorkerPanic { worker, message }) => {
            assert_eq!(worker, 1);
            assert_eq!(message, "boom on worker 1");
        }
        other => panic!("expected worker 1's panic, got {other:?}"),
    }
    assert!(matches!(
        handle.failure(),
        Some(Error::WorkerPanic { worker: 1, .. })
    ));
    // Its peers cannot be sent to; worker 0 goes on.
    assert_eq!(
        handle.send(local(&clients[1]), b"x"),
        Err(SendError::Stopped)
    );
    assert_eq!(echo(&mut clients[0], b"still up"), b"still up");
    handle.send(local(&clients[0]), b"pushed").unwrap();
    assert_eq!(read_record(&mut clients[0]), Some(b"pushed".to_vec()));

    // `wait` returns the failure instead of waiting for a shutdown nobody asks for, and shuts
    // worker 0 down on its way (close_notify to its peer).
    let waited = within(Duration::from_secs(10), move || server.wait());
    assert!(
        matches!(waited, Err(Error::WorkerPanic { worker: 1, .. })),
        "{waited:?}"
    );
    assert_eq!(read_record(&mut clients[0]), None, "close_notify");
}

#[cfg(feature = "tokio")]
#[test]
fn the_tokio_driver_routes_sends_and_reports_a_panicking_task_at_once() {
    use openssl_session_cache::TokioServer;

    let seen = Shared::default();
    let config = ServerConfig::builder(SessionCache::builder().build().unwrap())
        .build()
        .unwrap();
    let mut options = UdpOptions::new("127.0.0.1:0".parse().unwrap());
    options.workers = 2;
    options.stats_interval = None;
    let (tx, rx) = mpsc::channel();
    let new_app = {
        let seen = Arc::clone(&seen);
        move || app(&seen)
    };
    let runtime = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let server = TokioServer::spawn(config, options, new_app)?;
            tx.send((server.local_addr(), server.handle())).unwrap();
            server.wait().await
        })
    });
    let (addr, handle) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let mut clients = one_per_worker(addr, 2, &seen);
    for (i, c) in clients.iter_mut().enumerate() {
        handle.send(local(c), format!("to {i}").as_bytes()).unwrap();
        assert_eq!(read_record(c), Some(format!("to {i}").into_bytes()));
    }
    clients[0].ssl_write(b"boom").unwrap();
    // The runtime thread's `wait` returns the panic without a shutdown.
    let waited = within(Duration::from_secs(10), move || runtime.join().unwrap());
    assert!(
        matches!(waited, Err(Error::WorkerPanic { worker: 0, ref message }) if message == "boom on worker 0"),
        "{waited:?}"
    );
    assert_eq!(read_record(&mut clients[1]), None, "worker 1 was shut down");
    assert_eq!(
        handle.send(local(&clients[1]), b"x"),
        Err(SendError::Stopped)
    );
}
