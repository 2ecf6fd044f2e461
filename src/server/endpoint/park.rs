//! Parked lookups: a handshake whose session a remote store is still looking up waits (its
//! datagrams kept, up to a bound) while the endpoint serves everyone else. The lookup's
//! completion wakes the driver through a [`ParkWake`]; past the lookup timeout the handshake goes
//! on without it (a full handshake).
//!
//! What belongs to one parked peer ([`Parked`]) lives in the peer, in its handshake state; what
//! the endpoint keeps for all of them is a [`ParkedLookups`]: the lookup deadlines and the list
//! of peers whose lookup completed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::Instant;

use parking_lot::Mutex;

use super::Endpoint;
use crate::server::peer::Peer;
use crate::server::timers::{Timer, TimerHeap};
use crate::{PendingLookup, SessionCache};

/// Parked peers whose lookup completed, by address and peer id, filled by their wakers from any
/// thread.
type Ready = Arc<Mutex<Vec<(SocketAddr, u64)>>>;

/// A peer's handshake waiting for its session lookup.
#[derive(Debug)]
pub(crate) struct Parked {
    lookup: PendingLookup,
    /// Its entry in [`ParkedLookups`]'s heap, at the lookup's deadline.
    timer: Timer,
}

/// The waker a parked peer's lookup wakes: records the peer as ready and wakes the driver.
struct ParkWake {
    addr: SocketAddr,
    id: u64,
    ready: Ready,
    driver: Option<Waker>,
}

impl Wake for ParkWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.lock().push((self.addr, self.id));
        if let Some(driver) = &self.driver {
            driver.wake_by_ref();
        }
    }
}

/// What the endpoint keeps for all its parked peers.
#[derive(Debug)]
pub(super) struct ParkedLookups {
    /// The lookup deadlines (an entry is live while its peer's [`Parked`] holds it).
    timers: TimerHeap<SocketAddr>,
    /// Parked peers whose lookup completed (visible to the endpoint's tests, which empty it to
    /// stand for an answer that arrives while the endpoint is at work).
    pub(super) ready: Ready,
    /// Peers parked now.
    count: usize,
}

impl ParkedLookups {
    pub(super) fn new() -> Self {
        Self {
            timers: TimerHeap::new(),
            ready: Ready::default(),
            count: 0,
        }
    }

    /// Peers parked now.
    pub(super) fn count(&self) -> usize {
        self.count
    }

    /// Whether a completed lookup waits for [`Endpoint::handle_timeout`].
    pub(super) fn any_ready(&self) -> bool {
        !self.ready.lock().is_empty()
    }

    /// When the earliest lookup deadline passes.
    pub(super) fn next_deadline(
        &mut self,
        peers: &std::collections::HashMap<SocketAddr, Peer>,
    ) -> Option<Instant> {
        self.timers
            .next_deadline(|addr, t| Self::is_live(peers, addr, t))
    }

    /// Forgets the lookup of a peer that goes away (or finished its handshake): abandoned, so
    /// that an answer arriving later is dropped.
    pub(super) fn forget(&mut self, parked: Parked) {
        parked.lookup.abandon();
        self.count -= 1;
    }

    /// Whether `timer` is the live lookup deadline of the peer at `addr`.
    fn is_live(
        peers: &std::collections::HashMap<SocketAddr, Peer>,
        addr: &SocketAddr,
        timer: Timer,
    ) -> bool {
        peers
            .get(addr)
            .and_then(Peer::parked)
            .is_some_and(|p| p.timer == timer)
    }
}

impl Endpoint {
    /// Parks the peer at `addr`, whose handshake waits for a session lookup: its datagrams wait,
    /// the lookup's completion wakes the driver, and past the lookup timeout it goes on without.
    pub(super) fn park(&mut self, now: Instant, addr: SocketAddr) {
        let Some(peer) = self.peers.get_mut(&addr) else {
            return;
        };
        let id = peer.id;
        let Some(lookup) = peer.ssl().and_then(SessionCache::pending_lookup) else {
            // Completed between the handshake call and here: go on at once.
            self.parked.ready.lock().push((addr, id));
            return;
        };
        let Some(handshake) = peer.handshake.as_mut() else {
            return;
        };
        let deadline = now + self.config.lookup_timeout;
        lookup.register(&Waker::from(Arc::new(ParkWake {
            addr,
            id,
            ready: Arc::clone(&self.parked.ready),
            driver: self.waker.clone(),
        })));
        self.stats.lookups_parked += 1;
        let timer = self.parked.timers.push(addr, deadline);
        if handshake.parked.replace(Parked { lookup, timer }).is_none() {
            self.parked.count += 1;
        }
        self.stats.parked = self.parked.count as u64;
        let peers = &self.peers;
        self.parked.timers.compact(self.parked.count, |addr, t| {
            ParkedLookups::is_live(peers, addr, t)
        });
    }

    /// Drives the peer at `addr` (of id `id`) again, its lookup completed or abandoned (or
    /// completed while it was being parked).
    fn unpark(&mut self, now: Instant, addr: SocketAddr, id: u64) {
        let Some(peer) = self.peers.get_mut(&addr) else {
            return;
        };
        if peer.id != id {
            return;
        }
        if let Some(handshake) = peer.handshake.as_mut() {
            if handshake.parked.take().is_some() {
                self.parked.count -= 1;
                self.stats.parked = self.parked.count as u64;
            }
        }
        self.drive_peer(now, addr);
    }

    /// Goes on with parked peers whose lookup completed, and gives up on those past their
    /// lookup timeout.
    pub(super) fn resume_parked(&mut self, now: Instant) {
        let ready = std::mem::take(&mut *self.parked.ready.lock());
        for (addr, id) in ready {
            let parked = self
                .peers
                .get(&addr)
                .filter(|p| p.id == id)
                .and_then(Peer::parked);
            if parked.is_some() {
                self.stats.lookups_completed += 1;
            }
            self.unpark(now, addr, id);
        }
        loop {
            let peers = &self.peers;
            let due = self
                .parked
                .timers
                .pop_due(now, |addr, t| ParkedLookups::is_live(peers, addr, t));
            let Some((addr, _)) = due else {
                break;
            };
            let peer = &self.peers[&addr];
            let id = peer.id;
            if peer.parked().is_some_and(|p| p.lookup.abandon()) {
                self.stats.lookups_timed_out += 1;
            } else {
                self.stats.lookups_completed += 1;
            }
            self.unpark(now, addr, id);
        }
    }
}
