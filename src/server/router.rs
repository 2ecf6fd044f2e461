//! Sends from any thread to a peer on whichever worker holds it: the table of which worker
//! holds which peer, and one inbox per worker that its waker drains.
//!
//! A peer never changes worker (the kernel's hash of its address, or for a peer with a
//! connection ID the worker index the ID carries), but with a connection ID it may change
//! address ([`Event::Migrated`]). Each worker keeps the table up to date from its own events
//! before its application sees them: an entry at [`Event::Connected`], moved at
//! [`Event::Migrated`], removed at [`Event::Closed`]. So a send through the handle finds the
//! peer as the application knows it, and the table holds one entry per established peer.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Waker;

use parking_lot::{Mutex, RwLock};

use super::config::MAX_RECORD_PLAINTEXT;
use super::event::Event;
use crate::SendError;

/// Records a handle sent that wait for their worker.
type Queue = VecDeque<(SocketAddr, Vec<u8>)>;

/// One worker's inbox.
#[derive(Debug)]
struct Inbox {
    queue: Mutex<Queue>,
    waker: Waker,
    /// Cleared when the worker ended (stopped, failed, panicked): nothing drains the queue.
    running: AtomicBool,
}

/// Which worker holds which established peer, and the workers' inboxes.
#[derive(Debug)]
pub(crate) struct Router {
    routes: RwLock<HashMap<SocketAddr, usize>>,
    inboxes: Vec<Inbox>,
    /// Records one inbox holds at most.
    capacity: usize,
    /// The server's stop flag.
    stop: Arc<AtomicBool>,
    /// Routed records the worker could not send (the peer closed meanwhile, its queue was full).
    refused: AtomicU64,
}

impl Router {
    /// A router for workers woken by `wakers` (in worker order), `capacity` records per inbox.
    pub(crate) fn new(wakers: &[Waker], capacity: usize, stop: Arc<AtomicBool>) -> Self {
        let inboxes = wakers
            .iter()
            .map(|w| Inbox {
                queue: Mutex::new(VecDeque::new()),
                waker: w.clone(),
                running: AtomicBool::new(true),
            })
            .collect();
        Self {
            routes: RwLock::new(HashMap::new()),
            inboxes,
            capacity,
            stop,
            refused: AtomicU64::new(0),
        }
    }

    /// Queues `data` for `peer` on its worker and wakes that worker.
    pub(crate) fn send(&self, peer: SocketAddr, data: &[u8]) -> Result<(), SendError> {
        if self.stop.load(Ordering::Acquire) {
            return Err(SendError::Stopped);
        }
        if data.len() > MAX_RECORD_PLAINTEXT {
            return Err(SendError::TooLarge);
        }
        let worker = *self
            .routes
            .read()
            .get(&peer)
            .ok_or(SendError::UnknownPeer)?;
        let inbox = &self.inboxes[worker];
        if !inbox.running.load(Ordering::Acquire) {
            return Err(SendError::Stopped);
        }
        let was_empty = {
            let mut queue = inbox.queue.lock();
            if queue.len() >= self.capacity {
                return Err(SendError::QueueFull);
            }
            queue.push_back((peer, data.to_vec()));
            queue.len() == 1
        };
        // The worker takes the whole queue when woken: a queue that was not empty has a wake
        // on its way already.
        if was_empty {
            inbox.waker.wake_by_ref();
        }
        Ok(())
    }

    /// What `worker`'s `event` changes in the table (before the application sees it).
    pub(crate) fn update(&self, worker: usize, event: &Event) {
        match event {
            Event::Connected { peer, .. } => {
                self.routes.write().insert(*peer, worker);
            }
            Event::Migrated { peer, previous } => {
                let mut routes = self.routes.write();
                if routes.get(previous) == Some(&worker) {
                    routes.remove(previous);
                }
                routes.insert(*peer, worker);
            }
            Event::Closed { peer, .. } => {
                let mut routes = self.routes.write();
                // Another worker's peer may have taken the address since (a NAT rebinding).
                if routes.get(peer) == Some(&worker) {
                    routes.remove(peer);
                }
            }
            _ => {}
        }
    }

    /// The records waiting for `worker`.
    pub(crate) fn take(&self, worker: usize) -> Queue {
        std::mem::take(&mut *self.inboxes[worker].queue.lock())
    }

    /// Counts a routed record the worker could not send.
    pub(crate) fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Routed records the workers could not send.
    pub(crate) fn refused_count(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// `worker` ended: sends to its peers fail from now on, and what waited is dropped.
    pub(crate) fn ended(&self, worker: usize) {
        let inbox = &self.inboxes[worker];
        inbox.running.store(false, Ordering::Release);
        inbox.queue.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use std::task::Wake;

    use super::*;
    use crate::CloseReason;

    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn router(workers: usize, capacity: usize) -> (Router, Vec<Arc<Count>>, Arc<AtomicBool>) {
        let counts: Vec<_> = (0..workers).map(|_| Arc::new(Count::default())).collect();
        let wakers: Vec<Waker> = counts.iter().map(|c| Waker::from(Arc::clone(c))).collect();
        let stop = Arc::new(AtomicBool::new(false));
        (
            Router::new(&wakers, capacity, Arc::clone(&stop)),
            counts,
            stop,
        )
    }

    fn connected(peer: SocketAddr) -> Event {
        Event::Connected {
            peer,
            info: crate::ConnectionInfo {
                resumed: false,
                cipher: "",
                peer_certificate: None,
                psk_identity: None,
                handshake_time: std::time::Duration::ZERO,
                restored: false,
            },
        }
    }

    #[test]
    fn a_send_goes_to_the_worker_that_reported_the_peer_and_wakes_it_once_per_batch() {
        let (r, counts, _) = router(2, 8);
        assert_eq!(r.send(addr(1), b"x"), Err(SendError::UnknownPeer));
        r.update(1, &connected(addr(1)));
        r.send(addr(1), b"a").unwrap();
        r.send(addr(1), b"b").unwrap();
        assert_eq!(
            counts[1].0.load(Ordering::SeqCst),
            1,
            "one wake for a batch"
        );
        assert_eq!(counts[0].0.load(Ordering::SeqCst), 0);
        assert!(r.take(0).is_empty());
        let got: Vec<_> = r.take(1).into_iter().collect();
        assert_eq!(
            got,
            vec![(addr(1), b"a".to_vec()), (addr(1), b"b".to_vec())]
        );
        r.send(addr(1), b"c").unwrap();
        assert_eq!(
            counts[1].0.load(Ordering::SeqCst),
            2,
            "an emptied inbox wakes again"
        );
    }

    #[test]
    fn migration_moves_the_route_and_a_close_removes_only_its_own_workers_entry() {
        let (r, _, _) = router(2, 8);
        r.update(0, &connected(addr(1)));
        r.update(
            0,
            &Event::Migrated {
                peer: addr(2),
                previous: addr(1),
            },
        );
        assert_eq!(r.send(addr(1), b"x"), Err(SendError::UnknownPeer));
        r.send(addr(2), b"x").unwrap();
        // Worker 1's peer took the address worker 0's stale peer had; worker 0 then closes it.
        r.update(1, &connected(addr(2)));
        let closed = |peer| Event::Closed {
            peer,
            reason: CloseReason::Idle,
        };
        r.update(0, &closed(addr(2)));
        r.send(addr(2), b"y").unwrap();
        assert_eq!(r.take(1).len(), 1, "still routed to worker 1");
        r.update(1, &closed(addr(2)));
        assert_eq!(r.send(addr(2), b"z"), Err(SendError::UnknownPeer));
    }

    #[test]
    fn a_full_inbox_a_large_record_an_ended_worker_and_a_stopped_server_refuse() {
        let (r, _, stop) = router(2, 2);
        r.update(0, &connected(addr(1)));
        r.update(1, &connected(addr(2)));
        r.send(addr(1), b"1").unwrap();
        r.send(addr(1), b"2").unwrap();
        assert_eq!(r.send(addr(1), b"3"), Err(SendError::QueueFull));
        let big = vec![0; MAX_RECORD_PLAINTEXT + 1];
        assert_eq!(r.send(addr(2), &big), Err(SendError::TooLarge));
        r.ended(0);
        assert_eq!(r.send(addr(1), b"4"), Err(SendError::Stopped));
        assert!(r.take(0).is_empty(), "what waited was dropped");
        r.send(addr(2), b"5").unwrap();
        stop.store(true, Ordering::Release);
        assert_eq!(r.send(addr(2), b"6"), Err(SendError::Stopped));
    }
}
