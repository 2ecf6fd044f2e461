//! The std UDP loop that drives [`Endpoint`]s: one thread per worker, each with its own
//! `SO_REUSEPORT` socket bound to the same address, its own endpoint and DSM, all sharing the one
//! [`ServerConfig`] (and so one session cache and one cookie secret).
//!
//! The kernel spreads datagrams over the workers' sockets by a hash of the source and
//! destination address, so a peer always lands on the same worker. Each worker has its own DSM,
//! so the limits in the config apply per worker: with `workers = 2` the server holds up to twice
//! `max_slots` peers.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use socket2::{Domain, Protocol, Socket, Type};

use super::config::ServerConfig;
use super::endpoint::{Endpoint, EndpointStats};
use crate::{DsmStats, Error};

/// The longest a worker sleeps before checking whether it should stop.
const STOP_POLL: Duration = Duration::from_millis(50);
/// How often a busy worker publishes its counters for [`UdpServer::stats`] (an idle one
/// publishes every time its receive times out).
const PUBLISH_EVERY: Duration = Duration::from_millis(5);
/// Receive buffer: larger than any UDP datagram, so oversized ones are seen whole and dropped.
const RECV_BUF: usize = 65536;

/// How to run a [`UdpServer`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct UdpOptions {
    /// Address to bind (port 0 picks a free port, shared by all workers).
    pub listen: SocketAddr,
    /// Worker threads, each with its own socket and endpoint (at least 1).
    pub workers: usize,
    /// How often each worker logs a stats line (`tracing` at info level); `None` for never.
    pub stats_interval: Option<Duration>,
}

impl UdpOptions {
    /// One worker on `listen`, stats every 10 s.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            workers: 1,
            stats_interval: Some(Duration::from_secs(10)),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Published {
    endpoint: EndpointStats,
    dsm: DsmStats,
}

/// A running DTLS echo server: worker threads driving endpoints over UDP sockets.
///
/// Dropping it stops the workers (established peers get close_notify) and joins them.
#[derive(Debug)]
pub struct UdpServer {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<Result<(), Error>>>,
    published: Vec<Arc<Mutex<Published>>>,
}

/// Stops a [`UdpServer`] from another thread (a Ctrl-C handler, a test).
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    /// Asks the workers to shut their peers down and exit.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn bind(addr: SocketAddr, reuse_port: bool) -> Result<UdpSocket, Error> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    // A bigger receive buffer rides out bursts (floods, many handshakes); best effort.
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

impl UdpServer {
    /// Binds the sockets and starts the workers.
    pub fn spawn(config: Arc<ServerConfig>, options: UdpOptions) -> Result<Self, Error> {
        if options.workers == 0 {
            return Err(Error::Config("workers must be at least 1".into()));
        }
        let reuse = options.workers > 1;
        let first = bind(options.listen, reuse)?;
        let local_addr = first.local_addr()?;
        let mut sockets = vec![first];
        for _ in 1..options.workers {
            sockets.push(bind(local_addr, reuse)?);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        let mut published = Vec::new();
        for (id, socket) in sockets.into_iter().enumerate() {
            let endpoint = Endpoint::new(Arc::clone(&config))?;
            let shared = Arc::new(Mutex::new(Published::default()));
            published.push(Arc::clone(&shared));
            let stop = Arc::clone(&stop);
            let interval = options.stats_interval;
            let handle = std::thread::Builder::new()
                .name(format!("dtls-worker-{id}"))
                .spawn(move || run_worker(id, socket, endpoint, &stop, &shared, interval))?;
            workers.push(handle);
        }
        Ok(Self {
            local_addr,
            stop,
            workers,
            published,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that stops the server from elsewhere.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(Arc::clone(&self.stop))
    }

    /// The workers' endpoint counters, summed (updated after every datagram or timeout).
    pub fn stats(&self) -> EndpointStats {
        let mut total = EndpointStats::default();
        for p in &self.published {
            total.merge(&p.lock().endpoint);
        }
        total
    }

    /// Each worker's DSM counters.
    pub fn dsm_stats(&self) -> Vec<DsmStats> {
        self.published.iter().map(|p| p.lock().dsm).collect()
    }

    /// Waits until the server is stopped (by a [`StopHandle`]) and the workers exit.
    pub fn wait(mut self) -> Result<(), Error> {
        self.join()
    }

    /// Stops the workers and waits for them.
    pub fn stop(mut self) -> Result<(), Error> {
        self.stop.store(true, Ordering::SeqCst);
        self.join()
    }

    fn join(&mut self) -> Result<(), Error> {
        let mut result = Ok(());
        for w in self.workers.drain(..) {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(Error::Config("a worker thread panicked".into())),
            }
        }
        result
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.join();
    }
}

fn send_all(socket: &UdpSocket, endpoint: &mut Endpoint) {
    while let Some(t) = endpoint.poll_transmit() {
        if let Err(e) = socket.send_to(&t.payload, t.to) {
            tracing::debug!(to = %t.to, error = %e, "send failed");
        }
    }
    while endpoint.poll_event().is_some() {}
}

fn run_worker(
    id: usize,
    socket: UdpSocket,
    mut endpoint: Endpoint,
    stop: &AtomicBool,
    shared: &Mutex<Published>,
    stats_interval: Option<Duration>,
) -> Result<(), Error> {
    let mut buf = vec![0u8; RECV_BUF];
    let mut next_stats = stats_interval.map(|i| Instant::now() + i);
    let mut current_timeout = None;
    let mut next_publish = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wait = quantize(
            endpoint
                .poll_timeout()
                .map_or(STOP_POLL, |t| t.saturating_duration_since(now)),
        );
        // Under load the wait stays at the same step, so this setsockopt is rare.
        if current_timeout != Some(wait) {
            socket.set_read_timeout(Some(wait))?;
            current_timeout = Some(wait);
        }
        let idle = match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                endpoint.handle(Instant::now(), from, &buf[..n]);
                false
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "recv failed");
                false
            }
        };
        let now = Instant::now();
        if endpoint.poll_timeout().is_some_and(|t| t <= now) {
            endpoint.handle_timeout(now);
        }
        send_all(&socket, &mut endpoint);
        if idle || now >= next_publish {
            next_publish = now + PUBLISH_EVERY;
            let mut p = shared.lock();
            p.endpoint = endpoint.stats();
            p.dsm = endpoint.dsm_stats();
        }
        if let (Some(at), Some(interval)) = (next_stats, stats_interval) {
            if now >= at {
                next_stats = Some(now + interval);
                log_stats(id, &endpoint);
            }
        }
    }
    endpoint.close_all();
    send_all(&socket, &mut endpoint);
    let mut p = shared.lock();
    p.endpoint = endpoint.stats();
    p.dsm = endpoint.dsm_stats();
    tracing::debug!(worker = id, "worker stopped");
    Ok(())
}

/// Rounds a wait down to one of a few steps (1, 5, 20, 50 ms), so the socket's read timeout
/// rarely changes; waking a little early only costs an extra loop.
fn quantize(wait: Duration) -> Duration {
    [50, 20, 5, 1]
        .into_iter()
        .map(Duration::from_millis)
        .find(|step| wait >= *step)
        .unwrap_or(Duration::from_millis(1))
}

fn log_stats(id: usize, endpoint: &Endpoint) {
    let s = endpoint.stats();
    let c = endpoint.config().session_cache().stats();
    tracing::info!(
        worker = id,
        peers = s.peers,
        handshaking = s.handshaking,
        handshakes = s.handshakes,
        resumed = s.resumed,
        hvr = s.hello_verify_requests,
        dropped = s.dropped(),
        failed = s.failed,
        echoed = s.echoed_records,
        cache_hits = c.hits,
        cache_misses = c.misses,
        cache_entries = c.entries,
        "stats"
    );
}
