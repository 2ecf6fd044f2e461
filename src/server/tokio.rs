//! The tokio driver (feature `tokio`): the std driver's workers as tokio tasks, each with its
//! own `tokio::net::UdpSocket` (`SO_REUSEPORT` when there are several), [`Endpoint`] and
//! [`Application`], all sharing one [`ServerConfig`].
//!
//! A task waits in `tokio::select!` for its socket, a timer at the endpoint's next deadline
//! ([`Endpoint::poll_timeout`]) and its waker: the endpoint's waker ([`Endpoint::set_waker`])
//! notifies a `tokio::sync::Notify`, so a remote session lookup that completes on another
//! thread, [`TokioHandle::shutdown`] or the application's own wake reach the task at once.
//!
//! The application is the same [`Application`] as on the std driver, called inside the task:
//! it must not block. Async work (a database, another service) runs in a task of its own and
//! hands its results back through a channel; waking one of [`TokioHandle::wakers`] makes the
//! worker call [`Application::on_wake`], where the application sends them (or it sends to the
//! peer through [`TokioHandle::send`], which does both).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use ::tokio::net::UdpSocket;
use ::tokio::sync::Notify;
use ::tokio::task::JoinHandle;

use super::app::Application;
use super::config::ServerConfig;
use super::driver::{worker_ended, worker_outcome, Core, Exits, WorkerStats, FINAL_FLUSH};
use super::endpoint::Endpoint;
use super::io::{bind_workers, IoStats, UdpIo};
use super::router::Router;
use super::stats::EndpointStats;
use super::udp::UdpOptions;
use crate::dsm::DsmStats;
use crate::Error;

/// Wakes one task: marks it woken and notifies it.
#[derive(Debug, Default)]
struct TaskWake {
    notify: Notify,
    woken: AtomicBool,
}

impl Wake for TaskWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.notify.notify_one();
    }
}

/// A running DTLS server on tokio: one task per worker, driving an endpoint over a
/// `tokio::net::UdpSocket` and running the application on its events.
///
/// [`shutdown`](Self::shutdown) sends close_notify to every peer (their sessions stay
/// resumable) and waits for the tasks; dropping the server only asks them to do so.
///
/// ```no_run
/// use openssl_session_cache::{AppContext, Event, ServerConfig, SessionCache, TokioServer, UdpOptions};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let config = ServerConfig::builder(SessionCache::builder().build()?).build()?;
/// let server = TokioServer::spawn(config, UdpOptions::new("127.0.0.1:4433".parse()?), || {
///     |ctx: &mut AppContext<'_>, event: Event| {
///         if let Event::Data { peer, data } = event {
///             let _ = ctx.send(peer, &data); // echo
///         }
///     }
/// })?;
/// // ... until it is time to stop (a signal):
/// server.shutdown().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct TokioServer {
    local_addr: SocketAddr,
    handle: TokioHandle,
    tasks: Vec<JoinHandle<Result<(), Error>>>,
}

/// A [`TokioServer`] from anywhere (another task, a signal handler, another thread): sends to
/// its peers, stops it, tells when a task failed, reads its counters. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TokioHandle {
    stop: Arc<AtomicBool>,
    wakes: Vec<Arc<TaskWake>>,
    wakers: Vec<Waker>,
    stats: WorkerStats,
    router: Arc<Router>,
    exits: Arc<Exits>,
}

impl TokioHandle {
    /// Sends `data` to `peer` as one record, from any task or thread, through the task that
    /// holds the peer: as [`StopHandle::send`](crate::StopHandle::send) does on the std driver.
    pub fn send(&self, peer: SocketAddr, data: &[u8]) -> Result<(), crate::SendError> {
        self.router.send(peer, data)
    }

    /// Records queued by [`send`](Self::send) that the task could not send (the peer closed
    /// meanwhile, or its send queue was full).
    pub fn sends_refused(&self) -> u64 {
        self.router.refused_count()
    }

    /// Waits until a task fails, and returns its failure ([`Error::WorkerPanic`] for a panic, an
    /// [`Error::Io`] for a failed socket); `None` once every task ended without a failure. As
    /// [`StopHandle::wait_failure`](crate::StopHandle::wait_failure), without blocking a thread.
    pub async fn wait_failure(&self) -> Option<Error> {
        std::future::poll_fn(|cx| self.exits.poll_settled(cx)).await;
        self.exits.failure()
    }

    /// The first task failure so far, without waiting.
    pub fn failure(&self) -> Option<Error> {
        self.exits.failure()
    }

    /// Asks every task to send close_notify to its peers and exit, and wakes them.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for w in &self.wakes {
            w.wake_by_ref();
        }
    }

    /// Each task's waker, the one its endpoint has ([`Endpoint::set_waker`]): waking it makes
    /// that task run [`Endpoint::handle_timeout`] and [`Application::on_wake`] promptly.
    pub fn wakers(&self) -> &[Waker] {
        &self.wakers
    }

    /// The tasks' endpoint counters, summed (published within a few milliseconds of a change).
    pub fn stats(&self) -> EndpointStats {
        self.stats.endpoint()
    }

    /// The tasks' UDP I/O counters, summed: system calls against datagrams.
    pub fn io_stats(&self) -> IoStats {
        self.stats.io()
    }

    /// Each task's DSM counters.
    pub fn dsm_stats(&self) -> Vec<DsmStats> {
        self.stats.dsm()
    }
}

impl TokioServer {
    /// Binds the sockets and spawns the tasks on the current tokio runtime, each running an
    /// application made by `new_app`. `options` is the std driver's: address, workers (tasks),
    /// stats line, [`IoMode`](crate::IoMode).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime with I/O and time enabled (as `tokio::spawn` and
    /// `UdpSocket::from_std` do).
    pub fn spawn<A, F>(
        config: Arc<ServerConfig>,
        options: UdpOptions,
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
        let mut wakes = Vec::new();
        let mut wakers = Vec::new();
        let mut prepared = Vec::new();
        for (id, socket) in sockets.into_iter().enumerate() {
            let io = UdpIo::new(&socket, options.io, config.mtu as usize)?;
            let socket = UdpSocket::from_std(socket)?;
            let wake = Arc::new(TaskWake::default());
            let waker = Waker::from(Arc::clone(&wake));
            // The worker index fits: bind_workers allows at most 256 with connection ids.
            let mut endpoint = Endpoint::for_worker(Arc::clone(&config), id as u8)?;
            endpoint.set_waker(waker.clone());
            wakes.push(Arc::clone(&wake));
            wakers.push(waker);
            prepared.push((endpoint, io, socket, wake));
        }
        let router = Arc::new(Router::new(
            &wakers,
            options.handle_queue,
            Arc::clone(&stop),
        ));
        let mut handle = TokioHandle {
            stop: Arc::clone(&stop),
            wakes,
            wakers,
            stats: WorkerStats::default(),
            router: Arc::clone(&router),
            exits: Arc::new(Exits::default()),
        };
        let mut tasks = Vec::new();
        for (id, (endpoint, io, socket, wake)) in prepared.into_iter().enumerate() {
            let shared = handle.stats.add();
            let core = Core::new(
                id,
                endpoint,
                new_app(),
                io,
                Arc::clone(&router),
                shared,
                options.stats_interval,
            );
            handle.exits.start();
            tasks.push(::tokio::spawn(Reporting {
                task: Box::pin(run(core, socket, wake, Arc::clone(&stop))),
                id,
                router: Arc::clone(&router),
                exits: Arc::clone(&handle.exits),
                ended: false,
            }));
        }
        Ok(Self {
            local_addr,
            handle,
            tasks,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that stops the server and reads its counters from elsewhere.
    pub fn handle(&self) -> TokioHandle {
        self.handle.clone()
    }

    /// Each task's waker ([`TokioHandle::wakers`]).
    pub fn wakers(&self) -> &[Waker] {
        self.handle.wakers()
    }

    /// The tasks' endpoint counters, summed ([`TokioHandle::stats`]).
    pub fn stats(&self) -> EndpointStats {
        self.handle.stats()
    }

    /// The tasks' UDP I/O counters, summed ([`TokioHandle::io_stats`]).
    pub fn io_stats(&self) -> IoStats {
        self.handle.io_stats()
    }

    /// Each task's DSM counters ([`TokioHandle::dsm_stats`]).
    pub fn dsm_stats(&self) -> Vec<DsmStats> {
        self.handle.dsm_stats()
    }

    /// Waits until the server is stopped (by a [`TokioHandle`]) and its tasks have sent their
    /// close_notify datagrams and exited, or until a task fails: then the others are shut down
    /// as by [`shutdown`](Self::shutdown) and the failure is returned
    /// ([`TokioHandle::wait_failure`]): [`Error::WorkerPanic`] for a task that panicked (in the
    /// endpoint or in the application), the error of one whose socket failed.
    pub async fn wait(mut self) -> Result<(), Error> {
        if self.handle.wait_failure().await.is_some() {
            self.handle.shutdown();
        }
        let first = self.handle.exits.first_failed();
        let mut result = Ok(());
        for (worker, task) in std::mem::take(&mut self.tasks).into_iter().enumerate() {
            // A task that was cancelled rather than panicked has no message.
            let ended = task.await.map_err(|e| e.try_into_panic().ok());
            if let Err(e) = worker_outcome(worker, ended) {
                // The failure that came first is the one to report.
                if result.is_ok() || first == Some(worker) {
                    result = Err(e);
                }
            }
        }
        result
    }

    /// Graceful shutdown: every peer gets close_notify (its session stays resumable), then the
    /// tasks exit; waits for them like [`wait`](Self::wait).
    pub async fn shutdown(self) -> Result<(), Error> {
        self.handle.shutdown();
        self.wait().await
    }
}

impl Drop for TokioServer {
    fn drop(&mut self) {
        if !self.tasks.is_empty() {
            self.handle.shutdown();
        }
    }
}

/// A worker task as spawned: catches a panic of the task and reports its end, however it ends
/// (finished, panicked, or dropped by a runtime shutting down), as the std driver's threads do.
struct Reporting<F> {
    task: Pin<Box<F>>,
    id: usize,
    router: Arc<Router>,
    exits: Arc<Exits>,
    ended: bool,
}

impl<F: Future<Output = Result<(), Error>>> Future for Reporting<F> {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let polled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| this.task.as_mut().poll(cx)));
        let ended = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(result)) => Ok(result),
            Err(panic) => Err(Some(panic)),
        };
        this.ended = true;
        Poll::Ready(worker_ended(this.id, ended, &this.router, &this.exits))
    }
}

impl<F> Drop for Reporting<F> {
    fn drop(&mut self) {
        if !self.ended {
            self.router.ended(self.id);
            self.exits.ended(self.id, &Ok(()));
        }
    }
}

/// One worker task: the loop of the std driver's thread, waiting in `select!` instead of
/// `epoll`.
async fn run<A: Application>(
    mut core: Core<A>,
    socket: UdpSocket,
    wake: Arc<TaskWake>,
    stop: Arc<AtomicBool>,
) -> Result<(), Error> {
    let mut readable = true;
    let mut flushed = true;
    while !stop.load(Ordering::Acquire) {
        if !flushed {
            flushed = core.send(&socket);
        }
        if readable && flushed {
            readable = core.receive(&socket)?;
        }
        let now = Instant::now();
        let woken = wake.woken.swap(false, Ordering::AcqRel);
        core.timers(now, woken);
        flushed = core.send(&socket);
        let next = core.housekeeping(now);
        if readable && flushed {
            // More may be waiting: read on after letting other tasks run.
            ::tokio::task::yield_now().await;
            continue;
        }
        // What is due now was run above; a deadline it left in the past waits 1 ms rather
        // than spinning.
        let sleep = async {
            match next {
                Some(t) => {
                    let t = t.max(now + Duration::from_millis(1));
                    ::tokio::time::sleep_until(t.into()).await;
                }
                None => std::future::pending().await,
            }
        };
        ::tokio::select! {
            r = socket.readable(), if !readable => {
                r?;
                readable = true;
            }
            r = socket.writable(), if !flushed => r?,
            () = wake.notify.notified() => {}
            () = sleep => {}
        }
    }
    core.close_all();
    let end = Instant::now() + FINAL_FLUSH;
    while !core.send(&socket) {
        let writable = ::tokio::time::timeout_at(end.into(), socket.writable()).await;
        if !matches!(writable, Ok(Ok(()))) {
            tracing::debug!(worker = core.id, "socket full at shutdown; datagrams lost");
            break;
        }
    }
    core.publish_all();
    tracing::debug!(worker = core.id, "task stopped");
    Ok(())
}
