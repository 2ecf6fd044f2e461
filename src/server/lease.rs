//! A shared lean peer's sequence-number lease and read mark (`shared_peers`): what decides,
//! for one peer, which write sequence numbers the host may use and when its state goes to the
//! store. Pure logic: the endpoint issues the writes it asks for and reports their completion.
//!
//! * **Write lease.** The host seals records only with sequence numbers below `granted`, the
//!   lease end of a store write that completed (or of the peer's very first write: no earlier
//!   state of these keys exists, so whatever of it reaches the store holds a lease above every
//!   number used). At half a block before the end it asks for an extension of one
//!   [`LEASE_BLOCK`], so normally nothing waits; past the end its records are dropped.
//! * **Read mark.** Every write carries the replay window as it is; records accepted since the
//!   last write ask for one after [`MARK_RECORDS`] records or [`MARK_DELAY`], whichever first.
//! * One write at a time: the next waits for the completion of the one in flight, so the
//!   store's value only moves forward.
//! * **Versions.** Every write is conditional ([`SessionStore::put_if`](crate::SessionStore::put_if)):
//!   it stores a new random version and succeeds only if the store still holds the version
//!   this host last read or wrote ([`Write::expect`]), or the one of its own write that did
//!   not confirm (it may have landed; the next write reuses its version). Only the very first
//!   write of a fresh peer is blind. A write that finds another version has lost the peer.

use std::time::{Duration, Instant};

/// Write sequence numbers one lease write grants beyond what is used.
pub(crate) const LEASE_BLOCK: u64 = 1024;
/// Records accepted that ask for a write of the read mark.
pub(crate) const MARK_RECORDS: u32 = 64;
/// How long an accepted record waits at most before a write of the read mark is asked for
/// (while none is in flight).
pub(crate) const MARK_DELAY: Duration = Duration::from_millis(20);

/// A conditional write to issue ([`Lease::issued`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Write {
    /// The version it stores.
    pub(crate) version: u64,
    /// The versions it may replace; `None`: whatever is there (a fresh peer's first write).
    pub(crate) expect: Option<Vec<u64>>,
}

/// One shared peer's lease and read mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lease {
    /// Write sequence numbers below this may be used.
    granted: u64,
    /// The lease end and version of the write in flight.
    in_flight: Option<(u64, u64)>,
    /// The version this host last read or wrote; `None` before a fresh peer's first write.
    version: Option<u64>,
    /// The version of a write of ours that did not confirm (it may have landed).
    pending: Option<u64>,
    /// Records accepted since the last write was issued.
    unwritten: u32,
    /// When the oldest of them was accepted.
    dirty_since: Option<Instant>,
}

impl Lease {
    /// The lease of a peer whose handshake just finished here, writing next at `next_write`:
    /// its first write (to be issued at once, [`first_write`](Self::first_write)) grants it.
    pub(crate) fn fresh(next_write: u64) -> Self {
        Self {
            granted: next_write.saturating_add(LEASE_BLOCK),
            in_flight: None,
            version: None,
            pending: None,
            unwritten: 0,
            dirty_since: None,
        }
    }

    /// The lease of a peer taken over from the store (or restored) at `lease_end`, the store
    /// holding one of `versions` (the one read; or for a peer restored from a file, those
    /// this host may have left, at most two; none: its first write is blind): nothing may be
    /// written until a write of its own above it completed.
    pub(crate) fn taken_over(lease_end: u64, versions: &[u64]) -> Self {
        Self {
            granted: lease_end,
            in_flight: None,
            version: versions.first().copied(),
            pending: versions.get(1).copied(),
            unwritten: 0,
            dirty_since: None,
        }
    }

    /// The lease end of a fresh peer's first write.
    pub(crate) fn first_write(&self) -> u64 {
        self.granted
    }

    /// Whether sequence number `seq` may be written.
    pub(crate) fn may_write(&self, seq: u64) -> bool {
        seq < self.granted
    }

    /// The write to issue now, if one is due, with `next_write` the next sequence number the
    /// peer would use: the lease end it would store.
    pub(crate) fn due(&self, next_write: u64, now: Instant) -> Option<u64> {
        if self.in_flight.is_some() {
            return None;
        }
        if next_write.saturating_add(LEASE_BLOCK / 2) >= self.granted {
            return Some(self.granted.max(next_write).saturating_add(LEASE_BLOCK));
        }
        let mark_due = self.unwritten >= MARK_RECORDS
            || self.dirty_since.is_some_and(|t| now >= t + MARK_DELAY);
        mark_due.then_some(self.granted)
    }

    /// A write storing `lease_end` (and the window as it is) is issued; `fresh` is a random
    /// version it stores unless an earlier write's must be reused. Returns the version to
    /// store and what it expects.
    pub(crate) fn issued(&mut self, lease_end: u64, fresh: u64) -> Write {
        let version = self.pending.unwrap_or(fresh);
        let expect: Vec<u64> = self.version.into_iter().chain(self.pending).collect();
        self.in_flight = Some((lease_end, version));
        self.unwritten = 0;
        self.dirty_since = None;
        Write {
            version,
            expect: (self.version.is_some() || self.pending.is_some()).then_some(expect),
        }
    }

    /// The write in flight completed (`ok`: it reached the store); `now` for a write to ask for
    /// again if it failed.
    pub(crate) fn completed(&mut self, ok: bool, now: Instant) {
        let Some((lease_end, version)) = self.in_flight.take() else {
            return;
        };
        if ok {
            self.granted = self.granted.max(lease_end);
            self.version = Some(version);
            self.pending = None;
        } else {
            self.pending = Some(version);
            // The read mark it carried is not stored: ask again.
            self.unwritten = self.unwritten.max(1);
            self.dirty_since.get_or_insert(now);
        }
    }

    /// `records` were accepted at `now`; returns when a write of the read mark falls due if
    /// that deadline is new (the endpoint wakes then).
    pub(crate) fn accepted(&mut self, records: u32, now: Instant) -> Option<Instant> {
        if records == 0 {
            return None;
        }
        self.unwritten = self.unwritten.saturating_add(records);
        if self.dirty_since.is_some() {
            return None;
        }
        self.dirty_since = Some(now);
        Some(now + MARK_DELAY)
    }

    /// Whether a write is in flight.
    pub(crate) fn writing(&self) -> bool {
        self.in_flight.is_some()
    }

    /// The versions the store may hold if the peer is still this host's (for a conditional
    /// removal); empty before any write.
    pub(crate) fn ours(&self) -> Vec<u64> {
        let in_flight = self.in_flight.map(|(_, v)| v);
        let mut ours: Vec<u64> = self.version.into_iter().chain(self.pending).collect();
        // An in-flight write reuses the pending version when there is one.
        if let Some(v) = in_flight.filter(|v| !ours.contains(v)) {
            ours.push(v);
        }
        ours
    }

    /// Write sequence numbers below this may be used.
    #[cfg(test)]
    pub(crate) fn granted(&self) -> u64 {
        self.granted
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn a_taken_over_lease_writes_nothing_until_its_own_write_completed() {
        let now = Instant::now();
        let mut l = Lease::taken_over(2048, &[7]);
        assert!(!l.may_write(2048));
        assert_eq!(l.due(2048, now), Some(2048 + LEASE_BLOCK));
        l.issued(3072, 1);
        assert_eq!(l.due(2048, now), None, "one write at a time");
        assert!(!l.may_write(2048), "not before it completed");
        l.completed(false, now);
        assert!(!l.may_write(2048), "a failed write grants nothing");
        assert_eq!(l.due(2048, now), Some(3072));
        l.issued(3072, 1);
        l.completed(true, now);
        assert!(l.may_write(3071) && !l.may_write(3072));
    }

    /// Every write expects what this host last read or wrote; a write that did not confirm
    /// may have landed, so the next reuses its version and accepts it too.
    #[test]
    fn writes_expect_the_version_last_read_or_written() {
        let now = Instant::now();
        let mut l = Lease::taken_over(2048, &[7]);
        let w = l.issued(3072, 100);
        assert_eq!((w.version, w.expect), (100, Some(vec![7])));
        l.completed(false, now);
        let w = l.issued(3072, 200);
        assert_eq!((w.version, w.expect), (100, Some(vec![7, 100])));
        assert_eq!(l.ours(), vec![7, 100]);
        l.completed(true, now);
        let w = l.issued(4096, 300);
        assert_eq!((w.version, w.expect), (300, Some(vec![100])));
        // A fresh peer's first write is blind; a retry of it is not.
        let mut l = Lease::fresh(1);
        let first = l.first_write();
        assert_eq!(l.issued(first, 5).expect, None);
        l.completed(false, now);
        assert_eq!(
            l.issued(first, 6),
            Write {
                version: 5,
                expect: Some(vec![5])
            }
        );
    }

    #[test]
    fn a_lease_is_extended_at_half_a_block_before_its_end() {
        let now = Instant::now();
        let mut l = Lease::fresh(3);
        assert_eq!(l.first_write(), 3 + LEASE_BLOCK);
        l.issued(l.first_write(), 1);
        l.completed(true, now);
        let half = 3 + LEASE_BLOCK / 2;
        assert_eq!(l.due(half - 1, now), None);
        assert_eq!(l.due(half, now), Some(3 + 2 * LEASE_BLOCK));
    }

    #[test]
    fn the_read_mark_is_written_after_some_records_or_some_time() {
        let now = Instant::now();
        let mut l = Lease::fresh(1);
        assert_eq!(l.accepted(1, now), Some(now + MARK_DELAY));
        assert_eq!(l.accepted(1, now), None, "one deadline per dirty spell");
        assert_eq!(l.due(1, now), None);
        assert_eq!(l.due(1, now + MARK_DELAY), Some(l.granted()));
        l.issued(l.granted(), 1);
        assert_eq!(l.accepted(u32::from(u8::MAX), now), Some(now + MARK_DELAY));
        assert_eq!(l.due(1, now), None, "in flight");
        l.completed(true, now);
        assert!(MARK_RECORDS <= u32::from(u8::MAX));
        assert_eq!(l.due(1, now), Some(l.granted()), "enough records");
        l.issued(l.granted(), 1);
        l.completed(false, now);
        assert_eq!(
            l.due(1, now + MARK_DELAY),
            Some(l.granted()),
            "failed: again"
        );
    }

    /// A model run: a host that writes records as fast as it likes against a store whose
    /// writes complete or fail at random and in their own time; whatever the store holds last
    /// is never below a sequence number used.
    #[test]
    fn the_stored_lease_end_is_always_above_every_number_used() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(19);
        let now = Instant::now();
        for _ in 0..200 {
            let mut l = Lease::fresh(1);
            let mut stored: Option<u64> = None;
            let mut next = 1u64;
            let first = l.first_write();
            l.issued(first, 1);
            let mut pending = Some(first);
            for _ in 0..5000 {
                match rng.random_range(0..10) {
                    0 if pending.is_some() => {
                        let ok = rng.random_bool(0.8);
                        if ok {
                            stored = pending;
                        }
                        pending = None;
                        l.completed(ok, now);
                    }
                    _ => {
                        if l.may_write(next) {
                            next += 1;
                        }
                        if let Some(end) = l.due(next, now) {
                            l.issued(end, 1);
                            pending = Some(end);
                        }
                    }
                }
                // Used numbers are below `next`; a crash now leaves `stored` or, if it lands
                // still, `pending` (the first write's value only ever grows from there).
                if let Some(s) = stored {
                    assert!(s >= next, "stored {s} below used {next}");
                }
                if stored.is_none() {
                    assert!(first >= next || pending.is_some_and(|p| p >= next));
                }
            }
            assert!(next > LEASE_BLOCK, "the lease went on being extended");
        }
    }
}
