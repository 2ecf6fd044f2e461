//! Tier coherence across hosts: Redis pub/sub invalidations.
//!
//! Every removal a store writes to Redis (`remove`, a failed decode's clean-up) goes out with a
//! `PUBLISH` of the session id on a channel derived from the prefix (`{prefix}invalidate`), and
//! so does every `take` that found a session. Each store subscribes to the channel on its own
//! connection and drops each id it hears about from its memory tier; `*` (from the admin
//! `clear`) drops the whole tier.
//!
//! **While the subscription is down the tier serves nothing**: it was lost (the connection
//! failed, or a `PING` sent every `heartbeat` went unanswered for the store's operation
//! deadline), so invalidations may have been missed; lookups go to Redis. When the store
//! subscribes again it clears the tier first. A tier is filled from a Redis read only if no
//! invalidation of that id (and no loss of the subscription) came in while the read was in
//! flight, so a reply that raced an invalidation never brings the session back.
//!
//! The bound: once the `DEL` of a session reaches Redis, another host's tier stops serving it
//! within one pub/sub delivery (one network hop) while that host's subscription is up, and
//! within `heartbeat` + the operation deadline (default 1 s + 50 ms) if the subscription died
//! silently.
//!
//! **In a cluster** the channel is an ordinary (not sharded) pub/sub channel: Redis Cluster
//! forwards every `PUBLISH` over its bus to every node, so a store subscribes on one node of its
//! list and moves to the next when that node fails. A removal's `PUBLISH` goes out only after
//! its `DEL` was answered (the two keys' nodes differ), so no host hears of a removal before the
//! session is gone. Sharded pub/sub (`SSUBSCRIBE`) would keep each message on one shard, but
//! invalidations of any key must reach every host, so a host would need a subscription per
//! shard; at invalidation rates the bus broadcast costs less than that bookkeeping.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::time::{sleep, sleep_until, timeout, Instant};

use super::Shared;
use crate::store::{MemoryStore, SessionId, SessionStore, SessionStoreAdmin, StoredSession};

/// How many recent invalidations are kept to check tier fills against.
const RECENT: usize = 4096;
/// The first wait before subscribing again after a failure (doubling up to the heartbeat).
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(50);
/// The payload that drops every entry.
pub(crate) const ALL: &[u8] = b"*";

/// Whether the tier may serve, and what a fill in flight must be checked against.
#[derive(Debug)]
pub(crate) struct Coherence {
    /// False when the store runs without invalidation (the tier is then trusted until expiry).
    enabled: bool,
    up: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    up: bool,
    /// Bumped whenever the subscription goes up or down and on a full clear.
    epoch: u64,
    /// Invalidations received so far.
    seq: u64,
    /// The last `RECENT` invalidations, `(seq, id)`, oldest first.
    recent: VecDeque<(u64, SessionId)>,
}

/// Where a Redis read started, for [`Coherence::fill`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mark {
    epoch: u64,
    seq: u64,
    up: bool,
}

impl Coherence {
    pub(crate) fn new(enabled: bool) -> Self {
        Self {
            enabled,
            up: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        }
    }

    /// Whether the tier may answer lookups now.
    pub(crate) fn tier_readable(&self) -> bool {
        !self.enabled || self.up.load(Ordering::Acquire)
    }

    /// Whether the subscription is up (always false without invalidation).
    pub(crate) fn subscribed(&self) -> bool {
        self.enabled && self.up.load(Ordering::Acquire)
    }

    /// Marks the start of a Redis read whose result may fill the tier.
    pub(crate) fn mark(&self) -> Mark {
        let st = self.state.lock();
        Mark {
            epoch: st.epoch,
            seq: st.seq,
            up: st.up,
        }
    }

    /// Puts `session` into `tier` unless `id` was invalidated (or the subscription was lost)
    /// since `mark`. Returns whether it did.
    pub(crate) fn fill(
        &self,
        mark: Mark,
        tier: &MemoryStore,
        id: SessionId,
        session: StoredSession,
    ) -> bool {
        let st = self.state.lock();
        let covered = st.seq == mark.seq || st.recent.front().is_some_and(|r| r.0 <= mark.seq + 1);
        let invalidated = st
            .recent
            .iter()
            .rev()
            .take_while(|r| r.0 > mark.seq)
            .any(|r| r.1 == id);
        let coherent = st.epoch == mark.epoch && (!self.enabled || (mark.up && st.up));
        if !(coherent && covered && !invalidated) {
            return false;
        }
        tier.put(id, session).is_ok()
    }

    /// Drops `id` from `tier` and remembers it against fills in flight (for an invalidation
    /// from the channel, and for this host's own removals and takes).
    pub(crate) fn invalidate(&self, tier: &MemoryStore, id: SessionId) {
        let mut st = self.state.lock();
        st.seq += 1;
        let seq = st.seq;
        if st.recent.len() == RECENT {
            st.recent.pop_front();
        }
        st.recent.push_back((seq, id));
        let _ = tier.remove(&id);
    }

    /// Drops the whole tier; fills in flight are refused.
    pub(crate) fn invalidate_all(&self, tier: &MemoryStore) {
        let mut st = self.state.lock();
        st.epoch += 1;
        let _ = tier.clear();
    }

    fn set_up(&self, tier: &MemoryStore) {
        let mut st = self.state.lock();
        let _ = tier.clear();
        st.epoch += 1;
        st.up = true;
        self.up.store(true, Ordering::Release);
    }

    fn set_down(&self) {
        let mut st = self.state.lock();
        st.epoch += 1;
        st.up = false;
        self.up.store(false, Ordering::Release);
    }
}

/// The subscriber task: subscribe, listen and ping, and on any failure mark the tier untrusted
/// and subscribe again, on the next node of the list for a cluster (a `PUBLISH` reaches the
/// subscribers of every node of a cluster, so any node will do).
pub(crate) async fn run_subscriber(shared: Arc<Shared>) {
    let Some(tier) = shared.tier.as_ref() else {
        return;
    };
    let mut wait = RESUBSCRIBE_MIN;
    let mut node = 0usize;
    loop {
        let nodes = shared.nodes.len();
        let client = &shared.nodes[node % nodes];
        let subscribed = timeout(shared.op_timeout, async {
            let pubsub = client.get_async_pubsub().await?;
            let (mut sink, stream) = pubsub.split();
            sink.subscribe(&shared.channel).await?;
            Ok::<_, ::redis::RedisError>((sink, stream))
        })
        .await;
        match subscribed {
            Ok(Ok((mut sink, mut stream))) => {
                shared.coherence.set_up(tier);
                wait = RESUBSCRIBE_MIN;
                let mut next_ping = Instant::now() + shared.heartbeat;
                loop {
                    tokio::select! {
                        msg = stream.next() => match msg {
                            Some(msg) => shared.on_invalidation(tier, msg.get_payload_bytes()),
                            None => break,
                        },
                        () = sleep_until(next_ping) => {
                            let pong = timeout(shared.op_timeout, sink.ping::<::redis::Value>()).await;
                            if !matches!(pong, Ok(Ok(_))) {
                                break;
                            }
                            shared.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
                            next_ping = Instant::now() + shared.heartbeat;
                        }
                    }
                }
                shared.coherence.set_down();
                shared
                    .counters
                    .subscription_losses
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(url = %shared.url, "redis session store: invalidation subscription lost; tier off");
            }
            Ok(Err(e)) => {
                tracing::debug!(url = %shared.url, error = %e, "redis session store: subscribe failed");
            }
            Err(_) => {
                tracing::debug!(url = %shared.url, "redis session store: subscribe timed out");
            }
        }
        // The next node at once; after a round of them all, back off.
        node = node.wrapping_add(1);
        if node.is_multiple_of(nodes) {
            sleep(wait).await;
            wait = (wait * 2).min(shared.heartbeat.max(RESUBSCRIBE_MIN));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u8) -> SessionId {
        SessionId::new(&[i]).unwrap()
    }

    fn sess() -> StoredSession {
        StoredSession::from_millis(vec![1], u64::MAX)
    }

    fn tier() -> MemoryStore {
        MemoryStore::builder().max_entries(16).build().unwrap()
    }

    #[test]
    fn the_tier_is_not_read_or_filled_while_the_subscription_is_down() {
        let c = Coherence::new(true);
        let t = tier();
        assert!(!c.tier_readable(), "not before the first subscription");
        let m = c.mark();
        assert!(!c.fill(m, &t, id(1), sess()));
        t.put(id(2), sess()).unwrap();
        c.set_up(&t);
        assert!(c.tier_readable());
        assert_eq!(t.len().unwrap(), 0, "subscribing clears what may be stale");
        assert!(
            !c.fill(m, &t, id(1), sess()),
            "a read started before the subscription came up"
        );
        let m = c.mark();
        c.set_down();
        c.set_up(&t);
        assert!(
            !c.fill(m, &t, id(1), sess()),
            "the subscription was lost meanwhile"
        );
        assert!(c.fill(c.mark(), &t, id(1), sess()));
        assert_eq!(t.len().unwrap(), 1);
    }

    #[test]
    fn an_invalidation_during_a_read_keeps_its_reply_out_of_the_tier() {
        let c = Coherence::new(true);
        let t = tier();
        c.set_up(&t);
        let m = c.mark();
        c.invalidate(&t, id(1));
        c.invalidate(&t, id(3));
        assert!(!c.fill(m, &t, id(1), sess()));
        assert!(c.fill(m, &t, id(2), sess()), "another id is not affected");
        c.invalidate(&t, id(2));
        assert!(t.get(&id(2)).unwrap().is_none());
        c.fill(c.mark(), &t, id(4), sess());
        c.invalidate_all(&t);
        assert_eq!(t.len().unwrap(), 0);
    }

    #[test]
    fn a_read_older_than_the_remembered_invalidations_is_refused() {
        let c = Coherence::new(true);
        let t = tier();
        c.set_up(&t);
        let m = c.mark();
        for _ in 0..=RECENT {
            c.invalidate(&t, id(9));
        }
        assert!(
            !c.fill(m, &t, id(1), sess()),
            "id 1 may have been forgotten"
        );
        let m = c.mark();
        c.invalidate(&t, id(9));
        assert!(c.fill(m, &t, id(1), sess()));
    }

    #[test]
    fn without_invalidation_the_tier_is_trusted_but_local_removals_still_count() {
        let c = Coherence::new(false);
        let t = tier();
        assert!(c.tier_readable());
        assert!(!c.subscribed());
        assert!(c.fill(c.mark(), &t, id(1), sess()));
        let m = c.mark();
        c.invalidate(&t, id(2)); // this host removed id 2 while a read of it was in flight
        assert!(!c.fill(m, &t, id(2), sess()));
    }
}
