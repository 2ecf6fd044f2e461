//! The optional background thread that drives [`Dsm::sweep`].

use std::fmt;
use std::io;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use super::{Dsm, PeerKey};

/// Shortest wait between two sweeps, so a deadline that is already due cannot make the thread spin.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// A background thread that calls [`Dsm::sweep`]`(Instant::now())` at least once per `tick`, and
/// earlier when [`Dsm::next_deadline`] says a handshake times out sooner.
///
/// Dropping the `Sweeper` wakes the thread (it waits on a condition variable, never in a long
/// sleep) and joins it, so it stops promptly. Pass a `tick` no longer than the manager's
/// [`DsmConfig::idle_tick`](super::DsmConfig::idle_tick), or idle passes run late.
///
/// The close hook runs on this thread; a hook that panics ends the thread (later sweeps then only
/// happen if the owner calls [`Dsm::sweep`] itself).
pub struct Sweeper {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

struct Shared {
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Sweeper {
    /// Starts the thread (named `dsm-sweeper`).
    ///
    /// # Errors
    /// `InvalidInput` if `tick` is zero; otherwise whatever spawning a thread returns.
    pub fn start<K, V>(dsm: Arc<Dsm<K, V>>, tick: Duration) -> io::Result<Self>
    where
        K: PeerKey,
        V: Clone + Send + 'static,
    {
        if tick.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "sweeper tick must be longer than zero",
            ));
        }
        let shared = Arc::new(Shared {
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let thread_shared = Arc::clone(&shared);
        let handle = thread::Builder::new()
            .name("dsm-sweeper".into())
            .spawn(move || run(&thread_shared, &dsm, tick))?;
        Ok(Self {
            shared,
            handle: Some(handle),
        })
    }

    /// Stops and joins the thread (the same as dropping it).
    pub fn stop(self) {}
}

fn run<K, V>(shared: &Shared, dsm: &Dsm<K, V>, tick: Duration)
where
    K: PeerKey,
    V: Clone + Send + 'static,
{
    let mut stopped = shared.stop.lock();
    while !*stopped {
        let wait = wait_time(dsm.next_deadline(), Instant::now(), tick);
        let _ = shared.wake.wait_for(&mut stopped, wait);
        if *stopped {
            break;
        }
        MutexGuard::unlocked(&mut stopped, || {
            dsm.sweep(Instant::now());
        });
    }
}

/// How long to wait before the next sweep: until the deadline, at most `tick`, at least
/// [`MIN_WAIT`].
fn wait_time(deadline: Option<Instant>, now: Instant, tick: Duration) -> Duration {
    let until = deadline.map_or(tick, |d| d.saturating_duration_since(now));
    until.clamp(MIN_WAIT, tick.max(MIN_WAIT))
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        *self.shared.stop.lock() = true;
        self.shared.wake.notify_all();
        if let Some(handle) = self.handle.take() {
            // A panicking close hook already ended the thread; nothing more to report here.
            let _ = handle.join();
        }
    }
}

impl fmt::Debug for Sweeper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sweeper")
            .field("running", &self.handle.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_time_is_bounded_by_tick_and_deadline() {
        let now = Instant::now();
        let tick = Duration::from_millis(100);
        assert_eq!(wait_time(None, now, tick), tick);
        let soon = now + Duration::from_millis(30);
        assert_eq!(wait_time(Some(soon), now, tick), Duration::from_millis(30));
        let late = now + Duration::from_secs(30);
        assert_eq!(wait_time(Some(late), now, tick), tick);
        // A deadline already passed does not spin the thread.
        assert_eq!(
            wait_time(Some(now), now + Duration::from_secs(1), tick),
            MIN_WAIT
        );
    }
}
