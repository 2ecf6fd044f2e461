//! The std UDP driver: one thread per worker, each with its own `SO_REUSEPORT` socket bound to
//! the same address, its own [`Endpoint`], DSM and [`Application`], all sharing the one
//! [`ServerConfig`] (and so one session cache and one cookie secret).
//!
//! The kernel spreads datagrams over the workers' sockets by a hash of the source and
//! destination address, so a peer always lands on the same worker. Each worker has its own DSM,
//! so the limits in the config apply per worker: with `workers = 2` the server holds up to twice
//! `max_slots` peers.
//!
//! A worker sleeps in `epoll` (through `mio`) on its socket and an `eventfd` waker until a
//! datagram arrives, the endpoint's next deadline passes, or its waker is woken (by
//! [`StopHandle::shutdown`], by work the endpoint finished elsewhere, or by the application from
//! another thread); it never polls on a fixed period.
//!
//! With [`IoMode::Batched`] (the default) a worker reads up to a batch of datagrams per system
//! call (`recvmmsg`, through `quinn-udp`) and sends what the batch produced after it, records to
//! one peer coalesced; [`IoMode::Single`] is one datagram per system call.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};

use super::app::Application;
use super::config::ServerConfig;
use super::driver::{worker_ended, worker_outcome, Carry, Core, Exits, WorkerStats, FINAL_FLUSH};
use super::endpoint::Endpoint;
use super::io::{bind_workers, IoMode, IoStats, UdpIo};
use super::router::Router;
use super::stats::EndpointStats;
use crate::dsm::DsmStats;
use crate::Error;

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);

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
    /// Batched UDP I/O (the default) or one datagram per system call.
    pub io: IoMode,
    /// Records the server's handle ([`StopHandle::send`]) may have waiting for one worker
    /// before it refuses with [`QueueFull`](crate::SendError::QueueFull) (default 16 384).
    pub handle_queue: usize,
}

/// [`UdpOptions::handle_queue`] by default.
const DEFAULT_HANDLE_QUEUE: usize = 16 * 1024;

impl UdpOptions {
    /// One worker on `listen`, stats every 10 s.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            workers: 1,
            stats_interval: Some(Duration::from_secs(10)),
            io: IoMode::Batched,
            handle_queue: DEFAULT_HANDLE_QUEUE,
        }
    }
}

/// Wakes one worker out of its `epoll` wait; the worker then runs
/// [`Endpoint::handle_timeout`] and [`Application::on_wake`].
#[derive(Debug)]
struct WorkerWake {
    waker: mio::Waker,
    woken: AtomicBool,
}

impl Wake for WorkerWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Err(e) = self.waker.wake() {
            tracing::warn!(error = %e, "cannot wake a worker");
        }
    }
}

/// A running DTLS server: worker threads driving endpoints over UDP sockets and running the
/// application on their events.
///
/// [`shutdown`](Self::shutdown) sends close_notify to every peer (their sessions stay
/// resumable) and waits for the workers; dropping the server does the same.
///
/// ```no_run
/// use std::sync::Arc;
/// use openssl_session_cache::{
///     AppContext, Event, ServerConfig, SessionCache, UdpOptions, UdpServer,
/// };
///
/// let config = ServerConfig::builder(SessionCache::builder().build()?).build()?;
/// let options = UdpOptions::new("127.0.0.1:4433".parse()?);
/// let server = UdpServer::spawn(config, options, || {
///     |ctx: &mut AppContext<'_>, event: Event| {
///         if let Event::Data { peer, data } = event {
///             let _ = ctx.send(peer, &data); // echo
///         }
///     }
/// })?;
/// // ... until it is time to stop (a signal):
/// server.shutdown()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct UdpServer {
    local_addr: SocketAddr,
    handle: StopHandle,
    workers: Vec<JoinHandle<Result<(), Error>>>,
}

/// A [`UdpServer`] from anywhere (a Ctrl-C handler, another thread, a test): sends to its
/// peers, stops it, tells when a worker failed, reads its counters. Cheap to clone.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use openssl_session_cache::{AppContext, Event, ServerConfig, SessionCache, UdpOptions, UdpServer};
/// # let config = ServerConfig::builder(SessionCache::builder().build()?).build()?;
/// # let options = UdpOptions::new("127.0.0.1:4433".parse()?);
/// # let server = UdpServer::spawn(config, options, || |_: &mut AppContext<'_>, _: Event| {})?;
/// let handle = server.handle();
/// // A thread that sends a peer something whenever it likes:
/// # let peer = "127.0.0.1:50000".parse()?;
/// let pusher = handle.clone();
/// std::thread::spawn(move || pusher.send(peer, b"news"));
/// // A thread that reports a worker failure (a panic in the application) as it happens:
/// std::thread::spawn(move || {
///     if let Some(e) = handle.wait_failure() {
///         eprintln!("{e}");
///         handle.shutdown();
///     }
/// });
/// server.wait()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct StopHandle {
    stop: Arc<AtomicBool>,
    wakers: Vec<Waker>,
    stats: WorkerStats,
    carry: Arc<Carry>,
    router: Arc<Router>,
    exits: Arc<Exits>,
}

impl StopHandle {
    /// Sends `data` to `peer` as one record, from any thread: queued for the worker that holds
    /// the peer, which is woken and sends it before its [`Application::on_wake`].
    ///
    /// A peer is known from its [`Event::Connected`](crate::Event::Connected) to its
    /// [`Event::Closed`](crate::Event::Closed), under its current address (after an
    /// [`Event::Migrated`](crate::Event::Migrated), the new one): each worker updates the
    /// server's table of peers before its application sees the event, so what the application
    /// was told can be sent to at once. Refused, nothing is queued:
    /// [`UnknownPeer`](crate::SendError::UnknownPeer) (not connected, closed),
    /// [`TooLarge`](crate::SendError::TooLarge), [`QueueFull`](crate::SendError::QueueFull)
    /// ([`UdpOptions::handle_queue`] records wait for the worker already),
    /// [`Stopped`](crate::SendError::Stopped) (the server is stopping, or the peer's worker
    /// ended).
    /// A record the worker cannot send when it gets to it (the peer closed meanwhile, its send
    /// queue is full) is dropped and counted in [`sends_refused`](Self::sends_refused).
    pub fn send(&self, peer: SocketAddr, data: &[u8]) -> Result<(), crate::SendError> {
        self.router.send(peer, data)
    }

    /// Records queued by [`send`](Self::send) that the worker could not send (the peer closed
    /// meanwhile, or its send queue was full).
    pub fn sends_refused(&self) -> u64 {
        self.router.refused_count()
    }

    /// Blocks until a worker fails, and returns its failure: [`Error::WorkerPanic`] for a worker
    /// whose endpoint or application panicked (with the panic's message), an [`Error::Io`] for
    /// one whose socket failed. The other workers go on; the server's
    /// [`wait`](UdpServer::wait) returns the same failure. Returns `None` once every worker
    /// ended without a failure (the server was stopped).
    pub fn wait_failure(&self) -> Option<Error> {
        self.exits.wait_failure()
    }

    /// The first worker failure so far ([`wait_failure`](Self::wait_failure)), without waiting.
    pub fn failure(&self) -> Option<Error> {
        self.exits.failure()
    }

    /// Asks the workers to send close_notify to their peers and exit, and wakes them.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for w in &self.wakers {
            w.wake_by_ref();
        }
    }

    /// Asks the workers to exit keeping their established lean peers' associations: no
    /// close_notify; [`UdpServer::suspend`] returns the peers' states, to be saved and restored
    /// after a restart. Peers that cannot be carried get close_notify as with
    /// [`shutdown`](Self::shutdown).
    pub fn suspend(&self) {
        self.carry.suspend.store(true, Ordering::SeqCst);
        self.shutdown();
    }

    /// Each worker's waker, the one its endpoint has ([`Endpoint::set_waker`]): waking it makes
    /// that worker run [`Endpoint::handle_timeout`] and [`Application::on_wake`] promptly, from
    /// any thread.
    pub fn wakers(&self) -> &[Waker] {
        &self.wakers
    }

    /// The workers' endpoint counters, summed (published within a few milliseconds of a change).
    pub fn stats(&self) -> EndpointStats {
        self.stats.endpoint()
    }

    /// The workers' UDP I/O counters, summed: system calls against datagrams.
    pub fn io_stats(&self) -> IoStats {
        self.stats.io()
    }

    /// Each worker's DSM counters.
    pub fn dsm_stats(&self) -> Vec<DsmStats> {
        self.stats.dsm()
    }
}

impl UdpServer {
    /// Binds the sockets and starts the workers, each running an application made by `new_app`.
    pub fn spawn<A, F>(
        config: Arc<ServerConfig>,
        options: UdpOptions,
        new_app: F,
    ) -> Result<Self, Error>
    where
        A: Application + Send + 'static,
        F: FnMut() -> A,
    {
        Self::spawn_restoring(config, options, Vec::new(), new_app)
    }

    /// [`spawn`](Self::spawn), with saved associations (from [`take_peers`](crate::take_peers)
    /// after a restart) waiting before the first datagram is read: each is restored by the
    /// worker its client's next datagram reaches (see [`restore`](Self::restore)).
    pub fn spawn_restoring<A, F>(
        config: Arc<ServerConfig>,
        options: UdpOptions,
        peers: Vec<crate::SuspendedPeer>,
        mut new_app: F,
    ) -> Result<Self, Error>
    where
        A: Application + Send + 'static,
        F: FnMut() -> A,
    {
        let (sockets, local_addr) = bind_workers(
            options.listen,
            options.workers,
            config.connection_id.as_ref(),
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let carry = Arc::new(Carry::default());
        carry.restorable.add(peers);
        let stats = WorkerStats::default();
        let mut wakers = Vec::new();
        let mut prepared = Vec::new();
        let exits = Arc::new(Exits::default());
        for (index, socket) in sockets.into_iter().enumerate() {
            let mut socket = mio::net::UdpSocket::from_std(socket);
            let poll = Poll::new()?;
            // Writability is asked for only while a send waits (see `Worker::run`): every datagram
            // sent frees buffer space, and each such edge would end an `epoll_wait` for nothing.
            poll.registry()
                .register(&mut socket, SOCKET, Interest::READABLE)?;
            let wake = Arc::new(WorkerWake {
                waker: mio::Waker::new(poll.registry(), WAKER)?,
                woken: AtomicBool::new(false),
            });
            let waker = Waker::from(Arc::clone(&wake));
            // The worker index fits: bind_workers allows at most 256 with connection ids.
            let mut endpoint = Endpoint::for_worker(Arc::clone(&config), index as u8)?;
            endpoint.set_waker(waker.clone());
            endpoint.set_restorable(Arc::clone(&carry.restorable));
            wakers.push(waker);
            let io = UdpIo::new(&socket, options.io, config.mtu as usize)?;
            prepared.push((socket, poll, wake, endpoint, io));
        }
        let router = Arc::new(Router::new(
            &wakers,
            options.handle_queue,
            Arc::clone(&stop),
        ));
        let handle = StopHandle {
            stop: Arc::clone(&stop),
            wakers,
            stats,
            carry: Arc::clone(&carry),
            router: Arc::clone(&router),
            exits: Arc::clone(&exits),
        };
        let mut server = Self {
            local_addr,
            handle,
            workers: Vec::new(),
        };
        for (id, (socket, poll, wake, endpoint, io)) in prepared.into_iter().enumerate() {
            let shared = server.handle.stats.add();
            let core = Core::new(
                id,
                endpoint,
                new_app(),
                io,
                Arc::clone(&router),
                shared,
                options.stats_interval,
            );
            let worker = Worker {
                socket,
                poll,
                wake,
                core,
                stop: Arc::clone(&stop),
                carry: Arc::clone(&carry),
            };
            let (router, exits) = (Arc::clone(&router), Arc::clone(&exits));
            exits.start();
            let spawned = std::thread::Builder::new()
                .name(format!("dtls-worker-{id}"))
                .spawn(move || {
                    // Caught here, a panic is reported as it happens, not only at `wait`.
                    let ended =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run()))
                            .map_err(Some);
                    worker_ended(id, ended, &router, &exits)
                });
            match spawned {
                Ok(h) => server.workers.push(h),
                Err(e) => {
                    server.handle.exits.ended(id, &Ok(()));
                    // Dropped, the server stops the workers already running.
                    return Err(e.into());
                }
            }
        }
        Ok(server)
    }

    /// Hands the server saved associations (from [`take_peers`](crate::take_peers) after a
    /// restart): each is restored by the worker its client's next datagram reaches (by its
    /// address, or by its connection ID from any address), which reports
    /// [`Event::Connected`](crate::Event::Connected) for it with
    /// [`ConnectionInfo::restored`](crate::ConnectionInfo::restored); see
    /// [`Endpoint::restore`] for what is refused.
    pub fn restore(&self, peers: Vec<crate::SuspendedPeer>) {
        self.handle.carry.restorable.add(peers);
    }

    /// Saved associations handed to [`restore`](Self::restore) that no datagram claimed yet.
    pub fn restorable(&self) -> usize {
        self.handle.carry.restorable.len()
    }

    /// Graceful restart: the workers exit keeping their established lean peers'
    /// associations (no close_notify; peers that cannot be carried get one), and their states
    /// come back, to be saved ([`save_peers`](crate::save_peers)) and handed to the next
    /// server ([`restore`](Self::restore)).
    pub fn suspend(self) -> Result<Vec<crate::SuspendedPeer>, Error> {
        self.handle.suspend();
        self.wait_peers()
    }

    /// Waits like [`wait`](Self::wait), and returns the peers the workers suspended (none unless
    /// the server was stopped by [`StopHandle::suspend`]).
    pub fn wait_peers(mut self) -> Result<Vec<crate::SuspendedPeer>, Error> {
        self.join()?;
        Ok(std::mem::take(&mut *self.handle.carry.suspended.lock()))
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that stops the server and reads its counters from elsewhere.
    pub fn handle(&self) -> StopHandle {
        self.handle.clone()
    }

    /// Each worker's waker ([`StopHandle::wakers`]).
    pub fn wakers(&self) -> &[Waker] {
        self.handle.wakers()
    }

    /// The workers' endpoint counters, summed ([`StopHandle::stats`]).
    pub fn stats(&self) -> EndpointStats {
        self.handle.stats()
    }

    /// The workers' UDP I/O counters, summed ([`StopHandle::io_stats`]).
    pub fn io_stats(&self) -> IoStats {
        self.handle.io_stats()
    }

    /// Each worker's DSM counters ([`StopHandle::dsm_stats`]).
    pub fn dsm_stats(&self) -> Vec<DsmStats> {
        self.handle.dsm_stats()
    }

    /// Waits until the server is stopped (by a [`StopHandle`]) and the workers have sent their
    /// close_notify datagrams and exited, or until a worker fails: then the others are shut
    /// down as by [`shutdown`](Self::shutdown) and the failure is returned
    /// ([`StopHandle::wait_failure`]): [`Error::WorkerPanic`] for a worker that panicked (in the
    /// endpoint or in the application), the error of one whose socket failed.
    pub fn wait(mut self) -> Result<(), Error> {
        self.join()
    }

    /// Graceful shutdown: every peer gets close_notify (its session stays resumable), then the
    /// workers exit; waits for them like [`wait`](Self::wait).
    pub fn shutdown(mut self) -> Result<(), Error> {
        self.handle.shutdown();
        self.join()
    }

    fn join(&mut self) -> Result<(), Error> {
        if self.workers.is_empty() {
            return Ok(());
        }
        if self.handle.exits.wait_failure().is_some() {
            self.handle.shutdown();
        }
        let first = self.handle.exits.first_failed();
        let mut result = Ok(());
        for (worker, w) in self.workers.drain(..).enumerate() {
            let ended = w.join().map_err(Some);
            if let Err(e) = worker_outcome(worker, ended) {
                // The failure that came first is the one to report.
                if result.is_ok() || first == Some(worker) {
                    result = Err(e);
                }
            }
        }
        result
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.handle.shutdown();
        let _ = self.join();
    }
}

/// One worker's state, owned by its thread.
struct Worker<A> {
    socket: mio::net::UdpSocket,
    poll: Poll,
    wake: Arc<WorkerWake>,
    core: Core<A>,
    stop: Arc<AtomicBool>,
    carry: Arc<Carry>,
}

impl<A: Application> Worker<A> {
    fn run(mut self) -> Result<(), Error> {
        let mut events = Events::with_capacity(16);
        // The socket may hold datagrams already; edge-triggered readiness only reports changes.
        let mut readable = true;
        let mut flushed = true;
        let mut want_writable = false;
        while !self.stop.load(Ordering::Acquire) {
            if !flushed {
                flushed = self.core.send(&self.socket);
            }
            if readable && flushed {
                readable = self.core.receive(&self.socket)?;
            }
            let now = Instant::now();
            let woken = self.wake.woken.swap(false, Ordering::AcqRel);
            self.core.timers(now, woken);
            flushed = self.core.send(&self.socket);
            if flushed == want_writable {
                want_writable = !flushed;
                let interest = if want_writable {
                    Interest::READABLE | Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                self.poll
                    .registry()
                    .reregister(&mut self.socket, SOCKET, interest)?;
            }
            let next = self.core.housekeeping(now);
            let wait = if readable && flushed {
                Some(Duration::ZERO)
            } else {
                // What is due now was run above; a deadline it left in the past waits 1 ms
                // rather than spinning.
                next.map(|t| {
                    t.saturating_duration_since(now)
                        .max(Duration::from_millis(1))
                })
            };
            match self.poll.poll(&mut events, wait) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
            for event in events.iter() {
                if event.token() == SOCKET && event.is_readable() {
                    readable = true;
                }
            }
        }
        self.core.finish(&self.carry);
        self.final_flush(&mut events);
        self.core.publish_all();
        tracing::debug!(worker = self.core.id, "worker stopped");
        Ok(())
    }

    /// Sends the close_notify datagrams of a shutdown, waiting a little for a full socket.
    fn final_flush(&mut self, events: &mut Events) {
        let end = Instant::now() + FINAL_FLUSH;
        let _ = self.poll.registry().reregister(
            &mut self.socket,
            SOCKET,
            Interest::READABLE | Interest::WRITABLE,
        );
        while !self.core.send(&self.socket) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::debug!(
                    worker = self.core.id,
                    "socket full at shutdown; datagrams lost"
                );
                return;
            }
            let _ = self.poll.poll(events, Some(left));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::dsm::DsmConfig;
    use crate::server::testing::CidClient;
    use crate::{AppContext, Event, SessionCache};

    /// A client with a connection ID over real UDP: each `hop` sends from a new socket (a new
    /// source port), as a device behind a NAT that rebinds.
    struct Hopping {
        client: CidClient,
        socket: UdpSocket,
        server: SocketAddr,
    }

    impl Hopping {
        fn socket(server: SocketAddr) -> UdpSocket {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.connect(server).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            s
        }

        fn send(&mut self, datagrams: Vec<Vec<u8>>) {
            for d in datagrams {
                self.socket.send(&d).unwrap();
            }
        }

        /// Moves datagrams until the handshake finished (bounded: 5 s).
        fn handshake(&mut self) {
            let end = Instant::now() + Duration::from_secs(5);
            let mut buf = [0u8; 2048];
            while !self.client.client.established {
                assert!(Instant::now() < end, "no handshake within 5 s");
                let out = self.client.drive();
                self.send(out);
                if let Ok(n) = self.socket.recv(&mut buf) {
                    self.client.inbound(buf[..n].to_vec());
                }
            }
            let out = self.client.drive();
            self.send(out);
        }

        /// Sends `line` from a new source port and waits (bounded: 5 s) for its echo there.
        fn hop_and_echo(&mut self, line: &[u8]) -> bool {
            self.socket = Self::socket(self.server);
            let out = self.client.send(line);
            self.send(out);
            let end = Instant::now() + Duration::from_secs(5);
            let mut buf = [0u8; 2048];
            while Instant::now() < end {
                if let Ok(n) = self.socket.recv(&mut buf) {
                    self.client.inbound(buf[..n].to_vec());
                    self.client.drive();
                    if self.client.client.received.last().map(Vec::as_slice) == Some(line) {
                        return true;
                    }
                }
            }
            false
        }
    }

    impl Hopping {
        /// Waits (bounded: 5 s) for a record equal to `line` at the current socket.
        fn receives(&mut self, line: &[u8]) -> bool {
            let end = Instant::now() + Duration::from_secs(5);
            let mut buf = [0u8; 2048];
            while Instant::now() < end {
                if let Ok(n) = self.socket.recv(&mut buf) {
                    self.client.inbound(buf[..n].to_vec());
                    self.client.drive();
                    if self.client.client.received.last().map(Vec::as_slice) == Some(line) {
                        return true;
                    }
                }
            }
            false
        }
    }

    #[test]
    fn the_handle_sends_to_a_migrated_peer_at_its_new_address_only() {
        let config = ServerConfig::builder(SessionCache::builder().build().unwrap())
            .dsm(DsmConfig::new(64))
            .build()
            .unwrap();
        let mut options = UdpOptions::new("127.0.0.1:0".parse().unwrap());
        options.workers = 2;
        options.stats_interval = None;
        let server = UdpServer::spawn(config, options, || {
            |ctx: &mut AppContext<'_>, event: Event| {
                if let Event::Data { peer, data } = event {
                    let _ = ctx.send(peer, &data);
                }
            }
        })
        .unwrap();
        let addr = server.local_addr();
        let handle = server.handle();
        let mut c = Hopping {
            client: CidClient::new(40_100, &[7; 4], None),
            socket: Hopping::socket(addr),
            server: addr,
        };
        c.handshake();
        for hop in 0..4 {
            let before = c.socket.local_addr().unwrap();
            // The echo at the new port comes after the worker saw the migration.
            assert!(c.hop_and_echo(format!("hop {hop}").as_bytes()));
            let now = c.socket.local_addr().unwrap();
            assert_eq!(
                handle.send(before, b"old"),
                Err(crate::SendError::UnknownPeer)
            );
            let line = format!("pushed after hop {hop}");
            handle.send(now, line.as_bytes()).unwrap();
            assert!(c.receives(line.as_bytes()), "{line} did not arrive");
        }
        assert_eq!(handle.sends_refused(), 0);
        server.shutdown().unwrap();
    }

    #[test]
    fn four_workers_steer_every_cid_datagram_to_the_worker_that_holds_the_peer() {
        let config = ServerConfig::builder(SessionCache::builder().build().unwrap())
            .dsm(DsmConfig::new(64))
            .build()
            .unwrap();
        let mut options = UdpOptions::new("127.0.0.1:0".parse().unwrap());
        options.workers = 4;
        options.stats_interval = None;
        let server = UdpServer::spawn(config, options, || {
            |ctx: &mut AppContext<'_>, event: Event| {
                if let Event::Data { peer, data } = event {
                    let _ = ctx.send(peer, &data);
                }
            }
        })
        .unwrap();
        let addr = server.local_addr();
        let mut clients = Vec::new();
        for i in 0..4u8 {
            let mut c = Hopping {
                client: CidClient::new(40_000 + u16::from(i), &[i; 4], None),
                socket: Hopping::socket(addr),
                server: addr,
            };
            c.handshake();
            clients.push(c);
        }
        // Each client moves eight times; a datagram the kernel's hash sent to another worker
        // would be dropped there (an unknown connection id) and its echo would not come.
        for hop in 0..8 {
            for (i, c) in clients.iter_mut().enumerate() {
                let line = format!("client {i} hop {hop}");
                assert!(
                    c.hop_and_echo(line.as_bytes()),
                    "{line}: no echo at the new port"
                );
            }
        }
        // The workers publish their counters now and then: wait (bounded) for the last ones.
        let end = Instant::now() + Duration::from_secs(5);
        while server.stats().migrations < 4 * 8 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let stats = server.stats();
        assert_eq!(stats.migrations, 4 * 8, "{stats:?}");
        assert_eq!(stats.dropped_unknown_cid, 0);
        assert_eq!(stats.handshakes, 4);
        server.shutdown().unwrap();
    }
}
