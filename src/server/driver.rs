//! What every driver's worker does, whatever it waits with (mio's `epoll`, tokio): read a batch
//! of datagrams into the endpoint, hand the events to the application, run the timers, send,
//! and publish counters. A driver only adds its way of sleeping until the socket, the
//! endpoint's deadline or its waker needs it.

use std::any::Any;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::app::{AppContext, Application};
use super::endpoint::Endpoint;
use super::io::{DatagramSocket, IoMode, IoStats, UdpIo};
use super::router::Router;
use super::stats::EndpointStats;
use crate::dsm::DsmStats;
use crate::Error;

/// How often a busy worker publishes its counters for the driver's `stats`; a worker going
/// idle publishes at most this long after its last change.
const PUBLISH_EVERY: Duration = Duration::from_millis(5);
/// Datagrams read in a row, in [`IoMode::Single`], before timers get a turn.
const SINGLE_BATCH: usize = 64;
/// How long a stopping worker waits for its socket to take the last close_notify datagrams.
pub(crate) const FINAL_FLUSH: Duration = Duration::from_secs(1);

/// What a worker publishes for the driver's `stats`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Published {
    pub(crate) endpoint: EndpointStats,
    pub(crate) dsm: DsmStats,
    pub(crate) io: IoStats,
}

/// Every worker's [`Published`] counters, for the driver's server and handles.
#[derive(Debug, Clone, Default)]
pub(crate) struct WorkerStats(Vec<Arc<Mutex<Published>>>);

impl WorkerStats {
    /// The counters of one more worker, for its [`Core`].
    pub(crate) fn add(&mut self) -> Arc<Mutex<Published>> {
        let shared = Arc::new(Mutex::new(Published::default()));
        self.0.push(Arc::clone(&shared));
        shared
    }

    /// The workers' endpoint counters, summed.
    pub(crate) fn endpoint(&self) -> EndpointStats {
        let mut total = EndpointStats::default();
        for p in &self.0 {
            total.merge(&p.lock().endpoint);
        }
        total
    }

    /// The workers' UDP I/O counters, summed.
    pub(crate) fn io(&self) -> IoStats {
        let mut total = IoStats::default();
        for p in &self.0 {
            total.merge(&p.lock().io);
        }
        total
    }

    /// Each worker's DSM counters.
    pub(crate) fn dsm(&self) -> Vec<DsmStats> {
        self.0.iter().map(|p| p.lock().dsm).collect()
    }
}

/// Associations a server carries across a restart: whether its workers are to suspend their
/// peers instead of shutting them down, the peers they suspended, and the saved peers waiting to
/// be restored by the worker their first datagram reaches.
#[derive(Debug, Default)]
pub(crate) struct Carry {
    pub(crate) suspend: std::sync::atomic::AtomicBool,
    pub(crate) suspended: parking_lot::Mutex<Vec<crate::SuspendedPeer>>,
    pub(crate) restorable: Arc<super::endpoint::continuity::Restorable>,
}

/// What the end of worker `worker` makes of the server's result: its own result, or for a worker
/// that panicked ([`Err`], with the panic's payload if there is one) [`Error::WorkerPanic`] with
/// the panic's message.
pub(crate) fn worker_outcome(
    worker: usize,
    ended: Result<Result<(), Error>, Option<Box<dyn Any + Send>>>,
) -> Result<(), Error> {
    match ended {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .and_then(|p| {
                    p.downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                })
                .unwrap_or_default();
            Err(Error::WorkerPanic { worker, message })
        }
    }
}

/// What a worker's thread or task does as it ends, however it ends (`ended` as for
/// [`worker_outcome`]): sends to its peers fail from now on, and a failure is reported at once to
/// whoever waits ([`Exits`]). Returns the worker's result.
pub(crate) fn worker_ended(
    worker: usize,
    ended: Result<Result<(), Error>, Option<Box<dyn Any + Send>>>,
    router: &Router,
    exits: &Exits,
) -> Result<(), Error> {
    let result = worker_outcome(worker, ended);
    router.ended(worker);
    exits.ended(worker, &result);
    result
}

/// A worker that ended with an error or a panic, as [`Exits`] keeps it for every handle.
#[derive(Debug, Clone)]
struct Failure {
    worker: usize,
    /// `None` for a panic; else the kind of the I/O error (`Other` for any other error).
    kind: Option<io::ErrorKind>,
    message: String,
}

impl Failure {
    fn error(&self) -> Error {
        match self.kind {
            None => Error::WorkerPanic {
                worker: self.worker,
                message: self.message.clone(),
            },
            Some(kind) => Error::Io(io::Error::new(
                kind,
                format!("worker {}: {}", self.worker, self.message),
            )),
        }
    }
}

#[derive(Debug, Default)]
struct ExitState {
    running: usize,
    failure: Option<Failure>,
}

/// How a server's workers ended, told as it happens: the first one that failed (panicked, or
/// its socket failed), and whether they all ended.
#[derive(Debug, Default)]
pub(crate) struct Exits {
    state: Mutex<ExitState>,
    changed: Condvar,
    /// Async waiters (the tokio driver's `wait`).
    wakers: Mutex<Vec<std::task::Waker>>,
}

impl Exits {
    /// One more worker is about to start.
    pub(crate) fn start(&self) {
        self.state.lock().running += 1;
    }

    /// Worker `worker` ended with `result` (for a worker that never started, `Ok`).
    pub(crate) fn ended(&self, worker: usize, result: &Result<(), Error>) {
        let mut state = self.state.lock();
        state.running = state.running.saturating_sub(1);
        if let (Err(e), None) = (result, &state.failure) {
            let (kind, message) = match e {
                Error::WorkerPanic { message, .. } => (None, message.clone()),
                Error::Io(io) => (Some(io.kind()), io.to_string()),
                other => (Some(io::ErrorKind::Other), other.to_string()),
            };
            state.failure = Some(Failure {
                worker,
                kind,
                message,
            });
        }
        drop(state);
        self.changed.notify_all();
        for w in self.wakers.lock().drain(..) {
            w.wake();
        }
    }

    /// The first failure so far, as an error.
    pub(crate) fn failure(&self) -> Option<Error> {
        self.state.lock().failure.as_ref().map(Failure::error)
    }

    /// The worker that failed first, if one did.
    pub(crate) fn first_failed(&self) -> Option<usize> {
        self.state.lock().failure.as_ref().map(|f| f.worker)
    }

    /// Whether a worker failed or none is running.
    fn settled(state: &ExitState) -> bool {
        state.failure.is_some() || state.running == 0
    }

    /// Blocks until a worker failed (its error) or every worker ended without failing (`None`).
    pub(crate) fn wait_failure(&self) -> Option<Error> {
        let mut state = self.state.lock();
        while !Self::settled(&state) {
            self.changed.wait(&mut state);
        }
        state.failure.as_ref().map(Failure::error)
    }

    /// [`wait_failure`](Self::wait_failure) for async code: ready when a worker failed or every
    /// worker ended.
    #[cfg(feature = "tokio")]
    pub(crate) fn poll_settled(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        // Registered before the check, so an end between the two still wakes this waiter.
        self.wakers.lock().push(cx.waker().clone());
        if Self::settled(&self.state.lock()) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }
}

/// One worker's endpoint, application, socket state and counters.
pub(crate) struct Core<A> {
    pub(crate) id: usize,
    pub(crate) endpoint: Endpoint,
    pub(crate) app: A,
    io: UdpIo,
    router: Arc<Router>,
    shared: Arc<Mutex<Published>>,
    stats_interval: Option<Duration>,
    dirty: bool,
    next_publish: Instant,
    next_stats: Option<Instant>,
    #[cfg(feature = "metrics")]
    metrics: super::metrics::Publisher,
}

impl<A: Application> Core<A> {
    pub(crate) fn new(
        id: usize,
        endpoint: Endpoint,
        app: A,
        io: UdpIo,
        router: Arc<Router>,
        shared: Arc<Mutex<Published>>,
        stats_interval: Option<Duration>,
    ) -> Self {
        let now = Instant::now();
        Self {
            id,
            #[cfg(feature = "metrics")]
            metrics: super::metrics::Publisher::new(id, now),
            endpoint,
            app,
            io,
            router,
            shared,
            stats_interval,
            dirty: true,
            next_publish: now,
            next_stats: stats_interval.map(|i| now + i),
        }
    }

    /// Hands every queued event to the application (and to the metrics).
    fn deliver(&mut self, now: Instant) {
        while let Some(event) = self.endpoint.poll_event() {
            #[cfg(feature = "metrics")]
            self.metrics.on_event(&event);
            self.router.update(self.id, &event);
            self.app.on_event(
                &mut AppContext::new(&mut self.endpoint, now).with_worker(self.id),
                event,
            );
        }
    }

    /// Reads from the socket, hands the datagrams to the endpoint and sends what they produced.
    /// Returns whether the socket may hold more (`Ok(false)`: it said it is empty).
    pub(crate) fn receive<S: DatagramSocket>(&mut self, socket: &S) -> io::Result<bool> {
        self.dirty = true;
        match self.io.mode() {
            IoMode::Single => {
                for _ in 0..SINGLE_BATCH {
                    let now = Instant::now();
                    let endpoint = &mut self.endpoint;
                    match self
                        .io
                        .recv(socket, |from, d| endpoint.handle(now, from, d))
                    {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.send(socket);
                            return Ok(false);
                        }
                        Err(e) => return Err(e),
                    }
                    self.deliver(now);
                    if !self.send(socket) {
                        return Ok(true);
                    }
                }
                Ok(true)
            }
            _ => {
                let now = Instant::now();
                let endpoint = &mut self.endpoint;
                let app = &mut self.app;
                let (router, id) = (&self.router, self.id);
                #[cfg(feature = "metrics")]
                let metrics = &mut self.metrics;
                let got = self.io.recv(socket, |from, d| {
                    endpoint.handle(now, from, d);
                    // Events in order, each right after the datagram that caused it.
                    while let Some(event) = endpoint.poll_event() {
                        #[cfg(feature = "metrics")]
                        metrics.on_event(&event);
                        router.update(id, &event);
                        app.on_event(&mut AppContext::new(endpoint, now).with_worker(id), event);
                    }
                });
                let more = match got {
                    Ok(n) => {
                        // A short batch emptied the socket (each later datagram is a new
                        // readiness edge).
                        n >= quinn_udp::BATCH_SIZE
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                    Err(e) => return Err(e),
                };
                self.send(socket);
                Ok(more)
            }
        }
    }

    /// Runs what is due at `now` (the endpoint's timers; after a wake, completed work, the
    /// records sent through the server's handle and [`Application::on_wake`]).
    pub(crate) fn timers(&mut self, now: Instant, woken: bool) {
        if woken || self.endpoint.poll_timeout().is_some_and(|t| t <= now) {
            self.endpoint.handle_timeout(now);
            self.deliver(now);
            if woken {
                for (peer, data) in self.router.take(self.id) {
                    if self.endpoint.send(peer, &data).is_err() {
                        self.router.refused();
                    }
                }
                self.deliver(now);
                self.app
                    .on_wake(&mut AppContext::new(&mut self.endpoint, now).with_worker(self.id));
                self.deliver(now);
            }
            self.dirty = true;
        }
    }

    /// Sends what the endpoint produced: all of it, or until the socket would block (`false`;
    /// the rest waits, and what still waits in the endpoint counts against its peers' send
    /// queues).
    pub(crate) fn send<S: DatagramSocket>(&mut self, socket: &S) -> bool {
        loop {
            if !self.io.flush(socket) {
                return false;
            }
            let mut any = false;
            while let Some(t) = self.endpoint.poll_transmit() {
                any = true;
                self.io.queue(t);
            }
            if !any {
                return true;
            }
        }
    }

    /// Publishes counters and logs the stats line when due; returns when it is due next.
    pub(crate) fn housekeeping(&mut self, now: Instant) -> Option<Instant> {
        if self.dirty && now >= self.next_publish {
            self.publish();
            self.dirty = false;
            self.next_publish = now + PUBLISH_EVERY;
        }
        if let (Some(at), Some(interval)) = (self.next_stats, self.stats_interval) {
            if now >= at {
                self.next_stats = Some(now + interval);
                log_stats(self.id, &self.endpoint, &self.io_stats());
            }
        }
        #[cfg(feature = "metrics")]
        let metrics_due = Some(
            self.metrics
                .publish_if_due(now, &self.endpoint, self.io_stats()),
        );
        #[cfg(not(feature = "metrics"))]
        let metrics_due = None;
        [
            self.endpoint.poll_timeout(),
            self.dirty.then_some(self.next_publish),
            self.next_stats,
            metrics_due,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Shuts every peer down (close_notify), hands the application the events; send afterwards.
    pub(crate) fn close_all(&mut self) {
        self.endpoint.close_all();
        self.deliver(Instant::now());
    }

    /// What a stopping worker does with its peers: shuts them down, or, when the server is
    /// suspended ([`Carry::suspend`]), takes its lean peers out for `carry` (the others shut
    /// down); hands the application the events. Send afterwards.
    pub(crate) fn finish(&mut self, carry: &Carry) {
        if carry.suspend.load(std::sync::atomic::Ordering::Acquire) {
            let peers = self.endpoint.suspend_all();
            self.deliver(Instant::now());
            carry.suspended.lock().extend(peers);
        } else {
            self.close_all();
        }
    }

    fn io_stats(&self) -> IoStats {
        self.io.stats()
    }

    /// Publishes the counters now.
    pub(crate) fn publish(&mut self) {
        let io = self.io_stats();
        let mut p = self.shared.lock();
        p.endpoint = self.endpoint.stats();
        p.dsm = self.endpoint.dsm_stats();
        p.io = io;
    }

    /// Publishes everything, the metrics included (at shutdown).
    pub(crate) fn publish_all(&mut self) {
        self.publish();
        #[cfg(feature = "metrics")]
        self.metrics.publish(&self.endpoint, self.io_stats());
    }
}

fn log_stats(id: usize, endpoint: &Endpoint, io: &IoStats) {
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
        records_in = s.records_received,
        records_out = s.records_sent,
        cache_hits = c.hits,
        cache_misses = c.misses,
        cache_entries = c.entries,
        recv_calls = io.recv_calls,
        datagrams_in = io.datagrams_received,
        send_calls = io.send_calls,
        datagrams_out = io.datagrams_sent,
        "stats"
    );
}
