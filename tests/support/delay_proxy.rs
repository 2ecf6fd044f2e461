//! A TCP proxy for tests that adds a fixed delay each way, pauses and resumes forwarding, and
//! drops its connections: Redis "far away", "hung" or "restarted" without touching Redis.
//! Include with `#[path = "support/delay_proxy.rs"] mod delay_proxy;` (an example or bench can
//! do the same with a relative path).
//!
//! Event-driven: one thread runs a current-thread tokio runtime that accepts and reads every
//! socket; the bytes read go, stamped with when they are due, into one FIFO delay line that a
//! second thread releases at the due time (a condition-variable wait, precise to tens of
//! microseconds, where tokio's timer would round to whole milliseconds) to the connection's
//! writer task. Every chunk has the same delay, so one FIFO keeps each direction in order.
//! Listens on 127.0.0.1 on a free port; stops on drop, and on its own after [`MAX_LIFETIME`].

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

/// A proxy left running stops itself after this long.
pub(crate) const MAX_LIFETIME: Duration = Duration::from_secs(600);

type Sink = mpsc::UnboundedSender<Vec<u8>>;

struct Chunk {
    due: Instant,
    data: Vec<u8>,
    to: Sink,
}

#[derive(Default)]
struct Line {
    chunks: VecDeque<Chunk>,
    paused: bool,
    stopped: bool,
}

struct Control {
    delay_ns: AtomicU64,
    line: Mutex<Line>,
    changed: Condvar,
    generation: watch::Sender<u64>,
    accepted: AtomicU64,
}

/// A running proxy to one target.
pub(crate) struct DelayProxy {
    addr: SocketAddr,
    ctl: Arc<Control>,
    stop: Option<oneshot::Sender<()>>,
    io: Option<JoinHandle<()>>,
    releaser: Option<JoinHandle<()>>,
}

impl DelayProxy {
    /// A proxy on a free loopback port forwarding to `target`, with no delay.
    ///
    /// # Panics
    /// If the runtime, the listener or the threads cannot be set up.
    pub(crate) fn start(target: SocketAddr) -> Self {
        let ctl = Arc::new(Control {
            delay_ns: AtomicU64::new(0),
            line: Mutex::new(Line::default()),
            changed: Condvar::new(),
            generation: watch::channel(0).0,
            accepted: AtomicU64::new(0),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("proxy runtime");
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let io_ctl = ctl.clone();
        let io = thread::Builder::new()
            .name("delay-proxy-io".into())
            .spawn(move || {
                runtime.block_on(async {
                    let listener = TcpListener::from_std(std_listener).expect("proxy listener");
                    tokio::select! {
                        _ = stopped => {}
                        () = tokio::time::sleep(MAX_LIFETIME) => {}
                        () = accept_loop(listener, target, io_ctl.clone()) => {}
                    }
                });
                drop(runtime); // closes every connection
                io_ctl.line.lock().stopped = true;
                io_ctl.changed.notify_all();
            })
            .expect("proxy io thread");
        let rel_ctl = ctl.clone();
        let releaser = thread::Builder::new()
            .name("delay-proxy-line".into())
            .spawn(move || release_loop(&rel_ctl))
            .expect("proxy delay thread");
        Self {
            addr,
            ctl,
            stop: Some(stop),
            io: Some(io),
            releaser: Some(releaser),
        }
    }

    /// Where clients connect.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://127.0.0.1:PORT` of the proxy.
    pub(crate) fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Delays every chunk by `each_way` in each direction (from the next chunk read on).
    pub(crate) fn set_delay(&self, each_way: Duration) {
        self.ctl
            .delay_ns
            .store(each_way.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Stops forwarding (bytes are still read and held; connections stay open).
    pub(crate) fn pause(&self) {
        self.ctl.line.lock().paused = true;
    }

    /// Forwards again, held bytes first.
    pub(crate) fn resume(&self) {
        self.ctl.line.lock().paused = false;
        self.ctl.changed.notify_all();
    }

    /// Closes every open connection (both sides) and drops the bytes held for them.
    pub(crate) fn drop_connections(&self) {
        self.ctl.generation.send_modify(|g| *g += 1);
        self.ctl.line.lock().chunks.clear();
    }

    /// Connections accepted so far.
    pub(crate) fn connections(&self) -> u64 {
        self.ctl.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(io) = self.io.take() {
            let _ = io.join();
        }
        self.ctl.line.lock().stopped = true;
        self.ctl.changed.notify_all();
        if let Some(r) = self.releaser.take() {
            let _ = r.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, ctl: Arc<Control>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        ctl.accepted.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(connection(client, target, ctl.clone()));
    }
}

async fn connection(client: TcpStream, target: SocketAddr, ctl: Arc<Control>) {
    let mut generation = ctl.generation.subscribe();
    let Ok(upstream) = TcpStream::connect(target).await else {
        return; // dropping `client` closes it: the target is down
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_r, client_w) = client.into_split();
    let (up_r, up_w) = upstream.into_split();
    let (to_up, to_up_rx) = mpsc::unbounded_channel();
    let (to_client, to_client_rx) = mpsc::unbounded_channel();
    let pumps = async {
        tokio::join!(
            read(client_r, to_up, &ctl),
            write(to_up_rx, up_w),
            read(up_r, to_client, &ctl),
            write(to_client_rx, client_w),
        )
    };
    tokio::select! {
        _ = pumps => {}
        _ = generation.changed() => {}
    }
}

async fn read(mut from: OwnedReadHalf, to: Sink, ctl: &Control) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let delay = Duration::from_nanos(ctl.delay_ns.load(Ordering::Relaxed));
                let chunk = Chunk {
                    due: Instant::now() + delay,
                    data: buf[..n].to_vec(),
                    to: to.clone(),
                };
                ctl.line.lock().chunks.push_back(chunk);
                ctl.changed.notify_all();
            }
        }
    }
}

async fn write(mut from: mpsc::UnboundedReceiver<Vec<u8>>, mut to: OwnedWriteHalf) {
    while let Some(data) = from.recv().await {
        if to.write_all(&data).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

/// The delay line: releases each chunk at its due time, in order, unless paused.
fn release_loop(ctl: &Control) {
    let mut line = ctl.line.lock();
    loop {
        if line.stopped {
            return;
        }
        if line.paused {
            ctl.changed.wait(&mut line);
            continue;
        }
        let Some(due) = line.chunks.front().map(|c| c.due) else {
            ctl.changed.wait(&mut line);
            continue;
        };
        if Instant::now() < due {
            ctl.changed.wait_until(&mut line, due);
            continue;
        }
        let chunk = line.chunks.pop_front().expect("front exists");
        drop(line);
        let _ = chunk.to.send(chunk.data); // the connection may be gone
        line = ctl.line.lock();
    }
}
