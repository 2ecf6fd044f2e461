//! The store's background: one thread running a single-threaded tokio runtime, and the one
//! multiplexed Redis connection every lookup and write shares (one per master in a cluster).
//!
//! Why this client: the `redis` crate's multiplexed connection pipelines every request sent on
//! it, so thousands of concurrent lookups share one socket and one round trip each, with no pool
//! to size and no thread per request. A current-thread runtime on one thread is enough: the work
//! per request is a few microseconds (encode, decode, an AES-GCM open); the waiting is Redis's.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle, ThreadId};

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, RedisResult};
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The runtime thread. Dropping it stops the runtime: tasks still running are dropped (a
/// lookup's [`LookupDone`](crate::LookupDone) then completes with `Unavailable`).
#[derive(Debug)]
pub(crate) struct Background {
    handle: Handle,
    thread_id: ThreadId,
    thread: Option<JoinHandle<()>>,
    stop: Option<oneshot::Sender<()>>,
}

impl Background {
    /// Starts the thread named `name`.
    pub(crate) fn start(name: &str) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = thread::Builder::new().name(name.into()).spawn(move || {
            runtime.block_on(async {
                let _ = stopped.await;
            });
            drop(runtime);
        })?;
        Ok(Self {
            handle,
            thread_id: thread.thread().id(),
            thread: Some(thread),
            stop: Some(stop),
        })
    }

    /// Runs `task` on the runtime.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        // If the runtime is already gone the task is dropped at once, which is what a stopped
        // store should do with it.
        drop(self.handle.spawn(task));
    }

    /// Whether the calling thread is the runtime's own (it must never wait on the runtime).
    pub(crate) fn is_current(&self) -> bool {
        thread::current().id() == self.thread_id
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // Dropped from a callback on the runtime thread itself: it ends on its own once
            // this callback returns; joining would wait for ourselves.
            if !self.is_current() {
                let _ = thread.join();
            }
        }
    }
}

/// The shared connection to one server (or to one cluster master), opened on first use and
/// again after it failed.
pub(crate) struct Link {
    client: Client,
    config: AsyncConnectionConfig,
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    connecting: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    connects: AtomicU64,
}

impl Link {
    pub(crate) fn new(client: Client, config: AsyncConnectionConfig) -> Self {
        Self {
            client,
            config,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            connects: AtomicU64::new(0),
        }
    }

    /// The connection and its generation, connecting if there is none. Concurrent callers wait
    /// for the same connection attempt; each is bounded by its own deadline outside.
    pub(crate) async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(c) = self.current.lock().clone() {
            return Ok(c);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.current.lock().clone() {
            return Ok(c);
        }
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.connects.fetch_add(1, Ordering::Relaxed);
        *self.current.lock() = Some((generation, conn.clone()));
        Ok((generation, conn))
    }

    /// Forgets connection `generation` (it failed); the next caller opens a fresh one.
    pub(crate) fn reset(&self, generation: u64) {
        let mut cur = self.current.lock();
        if cur.as_ref().is_some_and(|c| c.0 == generation) {
            *cur = None;
        }
    }

    /// Forgets whatever connection is open (the breaker opened: the probe gets a fresh one).
    pub(crate) fn reset_any(&self) {
        *self.current.lock() = None;
    }

    /// Connections opened so far.
    pub(crate) fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }
}
