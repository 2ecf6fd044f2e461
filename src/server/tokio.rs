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
//! worker call [`Application::on_wake`], where the application sends them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

use ::tokio::net::UdpSocket;
use ::tokio::sync::Notify;
use ::tokio::task::JoinHandle;

use super::app::Application;
use super::config::ServerConfig;
use super::driver::{worker_outcome, Core, WorkerStats, FINAL_FLUSH};
use super::endpoint::Endpoint;
use super::io::{bind_workers, IoStats, UdpIo};
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

/// Stops a [`TokioServer`] and reads its counters, from anywhere (another task, a signal
/// handler, another thread).
#[derive(Debug, Clone)]
pub struct TokioHandle {
    stop: Arc<AtomicBool>,
    wakes: Vec<Arc<TaskWake>>,
    wakers: Vec<Waker>,
    stats: WorkerStats,
}

impl TokioHandle {
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
        let mut handle = TokioHandle {
            stop: Arc::clone(&stop),
            wakes: Vec::new(),
            wakers: Vec::new(),
            stats: WorkerStats::default(),
        };
        let mut prepared = Vec::new();
        for (id, socket) in sockets.into_iter().enumerate() {
            let io = UdpIo::new(&socket, options.io, config.mtu as usize)?;
            let socket = UdpSocket::from_std(socket)?;
            let wake = Arc::new(TaskWake::default());
            let waker = Waker::from(Arc::clone(&wake));
            // The worker index fits: bind_workers allows at most 256 with connection ids.
            let mut endpoint = Endpoint::for_worker(Arc::clone(&config), id as u8)?;
            endpoint.set_waker(waker.clone());
            let shared = handle.stats.add();
            handle.wakes.push(Arc::clone(&wake));
            handle.wakers.push(waker);
            let core = Core::new(id, endpoint, new_app(), io, shared, options.stats_interval);
            prepared.push((core, socket, wake));
        }
        let tasks = prepared
            .into_iter()
            .map(|(core, socket, wake)| ::tokio::spawn(run(core, socket, wake, Arc::clone(&stop))))
            .collect();
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
    /// close_notify datagrams and exited. A task that panicked (in the endpoint or in the
    /// application) is reported as [`Error::WorkerPanic`].
    pub async fn wait(mut self) -> Result<(), Error> {
        let mut result = Ok(());
        for (worker, task) in std::mem::take(&mut self.tasks).into_iter().enumerate() {
            // A task that was cancelled rather than panicked has no message.
            let ended = task.await.map_err(|e| e.try_into_panic().ok());
            if let Err(e) = worker_outcome(worker, ended) {
                result = Err(e);
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
