//! The circuit breaker in front of Redis, and the permit through which each admitted operation
//! reports how it went.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A circuit breaker: closed until `threshold` consecutive failures, then open for `backoff`,
/// then half-open (one probe request; success closes it, failure opens it again).
///
/// Time comes in as arguments, so the state machine is tested without sleeping.
#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    backoff: Duration,
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// What [`Breaker::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// The breaker is closed: go ahead.
    Closed,
    /// The back-off is over and this request is the one probe.
    Probe,
    /// Skip the backend.
    Refused,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, backoff: Duration) -> Self {
        Self {
            threshold,
            backoff,
            failures: 0,
            open_until: None,
            probing: false,
        }
    }

    /// Whether a request may go to the backend now. After the back-off, the first caller is
    /// let through as the probe and the others keep being refused until it reports.
    pub(crate) fn admit(&mut self, now: Instant) -> Admission {
        match self.open_until {
            None => Admission::Closed,
            Some(until) if now < until => Admission::Refused,
            Some(_) if self.probing => Admission::Refused,
            Some(_) => {
                self.probing = true;
                Admission::Probe
            }
        }
    }

    pub(crate) fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.probing = false;
    }

    /// Records a failure; returns true if the breaker opened because of it.
    pub(crate) fn failure(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        if self.probing {
            self.probing = false;
            self.open_until = Some(now + self.backoff);
            return true;
        }
        if self.open_until.is_none() && self.failures >= self.threshold {
            self.open_until = Some(now + self.backoff);
            return true;
        }
        false
    }

    /// The probe went away without reporting (its task was dropped, or panicked): the next
    /// caller may probe instead, so the breaker never stays open for good.
    pub(crate) fn abandon_probe(&mut self) {
        self.probing = false;
    }

    pub(crate) fn is_open(&self) -> bool {
        self.open_until.is_some()
    }

    /// When a refused caller should ask again: the end of the back-off, or `None` while closed.
    pub(crate) fn retry_at(&self) -> Option<Instant> {
        self.open_until
    }
}

/// A [`Breaker`] shared by the store's callers and its background tasks.
#[derive(Debug)]
pub(crate) struct SharedBreaker {
    state: Mutex<Breaker>,
}

impl SharedBreaker {
    pub(crate) fn new(threshold: u32, backoff: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(Breaker::new(threshold, backoff)),
        })
    }

    /// A permit to use the backend, or `None` while the breaker is open. The permit reports
    /// once: [`Permit::success`], [`Permit::failure`], or, dropped without either (a cancelled
    /// or panicking operation), it gives the probe slot back.
    pub(crate) fn admit(self: &Arc<Self>, now: Instant) -> Option<Permit> {
        let probe = match self.state.lock().admit(now) {
            Admission::Closed => false,
            Admission::Probe => true,
            Admission::Refused => return None,
        };
        Some(Permit {
            breaker: Arc::clone(self),
            probe,
            reported: false,
        })
    }

    pub(crate) fn is_open(&self) -> bool {
        self.state.lock().is_open()
    }

    pub(crate) fn retry_at(&self) -> Option<Instant> {
        self.state.lock().retry_at()
    }
}

/// One admitted operation's right to report to the breaker.
#[derive(Debug)]
pub(crate) struct Permit {
    breaker: Arc<SharedBreaker>,
    probe: bool,
    reported: bool,
}

impl Permit {
    /// The breaker this permit reports to.
    pub(crate) fn breaker(&self) -> &Arc<SharedBreaker> {
        &self.breaker
    }

    /// The backend answered (a value, or an error reply: it is up).
    pub(crate) fn success(mut self) {
        self.reported = true;
        self.breaker.state.lock().success();
    }

    /// The backend could not be reached or did not answer in time; returns true if the breaker
    /// opened because of it.
    pub(crate) fn failure(mut self, now: Instant) -> bool {
        self.reported = true;
        self.breaker.state.lock().failure(now)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.reported && self.probe {
            self.breaker.state.lock().abandon_probe();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::panic::{catch_unwind, AssertUnwindSafe};

    use super::*;

    #[test]
    fn breaker_opens_after_threshold_and_skips_until_backoff() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, Duration::from_millis(500));
        assert_eq!(b.admit(t0), Admission::Closed);
        assert!(!b.failure(t0));
        assert!(!b.failure(t0));
        assert!(!b.is_open());
        assert!(b.failure(t0), "the third consecutive failure opens it");
        assert!(b.is_open());
        assert_eq!(b.admit(t0 + Duration::from_millis(499)), Admission::Refused);
        // Half-open: one probe, the others still refused.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.admit(t1), Admission::Probe);
        assert_eq!(b.admit(t1), Admission::Refused);
        // The probe fails: open again for a full back-off.
        assert!(b.failure(t1));
        assert_eq!(b.admit(t1 + Duration::from_millis(499)), Admission::Refused);
        let t2 = t1 + Duration::from_millis(500);
        assert_eq!(b.admit(t2), Admission::Probe);
        b.success();
        assert!(!b.is_open());
        assert_eq!(b.admit(t2), Admission::Closed);
        assert_eq!(b.admit(t2), Admission::Closed);
    }

    #[test]
    fn breaker_success_resets_the_count() {
        let t = Instant::now();
        let mut b = Breaker::new(2, Duration::from_secs(1));
        assert!(!b.failure(t));
        b.success();
        assert!(!b.failure(t));
        assert!(!b.is_open());
        assert!(b.failure(t));
        // Late failures of requests admitted before it opened do not extend it.
        assert!(!b.failure(t + Duration::from_millis(900)));
        assert_eq!(b.retry_at(), Some(t + Duration::from_secs(1)));
        assert_eq!(b.admit(t + Duration::from_secs(1)), Admission::Probe);
    }

    fn opened(backoff: Duration, t0: Instant) -> Arc<SharedBreaker> {
        let b = SharedBreaker::new(1, backoff);
        assert!(b.admit(t0).unwrap().failure(t0));
        assert!(b.admit(t0).is_none());
        b
    }

    #[test]
    fn a_probe_that_panics_before_reporting_gives_the_probe_slot_back() {
        let t0 = Instant::now();
        let backoff = Duration::from_millis(100);
        let b = opened(backoff, t0);
        let t1 = t0 + backoff;
        let probe = b
            .admit(t1)
            .expect("the first caller after the back-off probes");
        assert!(b.admit(t1).is_none(), "one probe at a time");
        let r = catch_unwind(AssertUnwindSafe(move || {
            let _held = probe;
            panic!("operation panicked between admit and report");
        }));
        assert!(r.is_err());
        // Without the guard the breaker would refuse forever (probing, never reported).
        let again = b.admit(t1).expect("a new probe is admitted");
        again.success();
        assert!(!b.is_open());
        assert!(b.admit(t1).is_some());
    }

    #[test]
    fn a_dropped_permit_of_a_closed_breaker_changes_nothing() {
        let t = Instant::now();
        let b = SharedBreaker::new(2, Duration::from_secs(1));
        assert!(!b.admit(t).unwrap().failure(t));
        drop(b.admit(t).unwrap());
        // The dropped permit neither counted as a failure nor reset the count.
        assert!(
            b.admit(t).unwrap().failure(t),
            "the second failure opens it"
        );
        assert!(b.is_open());
    }
}
