//! Write-behind: `put` and `remove` queue their write and return; one background writer sends
//! the queue to Redis in pipelined batches.
//!
//! The queue holds at most one pending write per session id, in arrival order of the ids. A
//! newer write of an id replaces the pending one in place, so a `remove` always wins over an
//! earlier queued `put` of the same id (and a later `put` over an earlier `remove`). Writes
//! already sent keep their order: the writer sends one batch, waits for its replies (or its
//! deadline), then sends the next, all on the one connection, and Redis runs a connection's
//! commands in order. In a cluster a batch's writes go out as single commands, each to the
//! master of its key; a batch holds one write per id and the next batch waits for this one, so
//! the writes of one id still reach its master in order.
//!
//! Bounds: `put`s are accepted while the queue holds fewer than `capacity` writes; beyond that a
//! put is dropped and counted (it costs a later full handshake, never a wrong one). Removals may
//! fill a further `capacity` slots, so a burst of puts never crowds out a removal; beyond that a
//! removal is dropped and counted too. A batch that failed because Redis could not be reached
//! (or did not answer by the deadline) is queued again, each write unless a newer write of its
//! id arrived meanwhile, within the same bounds; so the queue carries this host's writes through
//! an outage until it overflows. A batch Redis answered with an error is not retried. In a
//! cluster, the writes for a master whose breaker is open are held back in the queue, a put
//! only while the queue is less than half full: a master that stays down loses its new puts
//! (counted) but never takes the queue from the other masters.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex};
use tokio::sync::Notify;

use super::breaker::SharedBreaker;
use super::client::{Route, RunError};
use super::Shared;
use crate::clock::unix_millis;
use crate::stats::bump;
use crate::store::{SessionId, StoredSession};

/// The most writes one pipelined batch carries.
pub(crate) const BATCH: usize = 256;
/// How long a writer that the breaker refused waits before asking again, at most.
const BREAKER_POLL: Duration = Duration::from_millis(20);

/// One pending write.
#[derive(Debug)]
pub(crate) enum WriteOp {
    /// `SET key value PX ttl` (sealed when sent).
    Put(StoredSession),
    /// `DEL key` plus an invalidation for the other hosts' tiers.
    Remove,
}

/// What became of a write handed to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Enqueued {
    /// Queued behind the others.
    Queued,
    /// Replaced the pending write of the same id.
    Coalesced,
    /// The queue was full: dropped.
    Dropped,
}

/// What the queue holds for an id, for lookups that must see this host's own writes.
#[derive(Debug)]
pub(crate) enum Pending {
    Put(StoredSession),
    Remove,
}

#[derive(Debug, Default)]
struct QueueState {
    ops: HashMap<SessionId, WriteOp>,
    order: VecDeque<SessionId>,
    in_flight: usize,
}

impl QueueState {
    fn insert(&mut self, id: SessionId, op: WriteOp, limit: usize) -> Enqueued {
        match self.ops.entry(id) {
            Entry::Occupied(mut e) => {
                e.insert(op);
                Enqueued::Coalesced
            }
            Entry::Vacant(e) => {
                if self.order.len() >= limit {
                    return Enqueued::Dropped;
                }
                e.insert(op);
                self.order.push_back(id);
                Enqueued::Queued
            }
        }
    }
}

impl Shared {
    /// Queues the removal of `id` (a `DEL` and an invalidation), counted.
    pub(crate) fn queue_remove(&self, id: SessionId) -> Enqueued {
        let r = self.queue.remove(id);
        match r {
            Enqueued::Dropped => bump(&self.counters.removes_dropped),
            Enqueued::Coalesced => {
                bump(&self.counters.removes_queued);
                bump(&self.counters.writes_coalesced);
            }
            Enqueued::Queued => bump(&self.counters.removes_queued),
        }
        r
    }
}

/// The bounded, coalescing queue between the callers and the writer task.
#[derive(Debug)]
pub(crate) struct WriteQueue {
    state: Mutex<QueueState>,
    drained: Condvar,
    wake: Notify,
    capacity: usize,
}

impl WriteQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(QueueState::default()),
            drained: Condvar::new(),
            wake: Notify::new(),
            capacity,
        }
    }

    /// Queues `SET` of `session` under `id`.
    pub(crate) fn put(&self, id: SessionId, session: StoredSession) -> Enqueued {
        let r = self
            .state
            .lock()
            .insert(id, WriteOp::Put(session), self.capacity);
        self.wake_writer(r);
        r
    }

    /// Queues `DEL` of `id`, replacing a pending put of it.
    pub(crate) fn remove(&self, id: SessionId) -> Enqueued {
        let r = self
            .state
            .lock()
            .insert(id, WriteOp::Remove, self.capacity.saturating_mul(2));
        self.wake_writer(r);
        r
    }

    fn wake_writer(&self, r: Enqueued) {
        if r == Enqueued::Queued {
            self.wake.notify_one();
        }
    }

    /// The pending write of `id`, if any.
    pub(crate) fn pending(&self, id: &SessionId) -> Option<Pending> {
        match self.state.lock().ops.get(id)? {
            WriteOp::Put(s) => Some(Pending::Put(s.clone())),
            WriteOp::Remove => Some(Pending::Remove),
        }
    }

    /// A take answered by the queue: a pending put of `id` becomes a pending removal and its
    /// session is returned (`Some(Some(_))`); a pending removal answers `Some(None)`; `None` when
    /// nothing is pending (ask Redis).
    pub(crate) fn take_pending(&self, id: &SessionId) -> Option<Option<StoredSession>> {
        let mut st = self.state.lock();
        let op = st.ops.get_mut(id)?;
        match std::mem::replace(op, WriteOp::Remove) {
            WriteOp::Put(s) => Some(Some(s)),
            WriteOp::Remove => Some(None),
        }
    }

    /// Takes up to `max` writes off the front; they count as in flight until
    /// [`finish`](Self::finish).
    pub(crate) fn pop_batch(&self, max: usize) -> Vec<(SessionId, WriteOp)> {
        let mut st = self.state.lock();
        let n = st.order.len().min(max);
        let mut batch = Vec::with_capacity(n);
        for _ in 0..n {
            let Some(id) = st.order.pop_front() else {
                break;
            };
            if let Some(op) = st.ops.remove(&id) {
                batch.push((id, op));
            }
        }
        st.in_flight += batch.len();
        batch
    }

    /// Ends a batch of `sent` writes, queueing `retry` again (each unless a newer write of its id
    /// is pending, and within the bounds) and `held` (writes not sent because their master's
    /// breaker was open) within tighter bounds: a held put only while the queue is less than
    /// half full, so writes for a master that is down never take more than half the queue from
    /// the others. Returns how many puts and removals did not fit.
    pub(crate) fn finish(&self, sent: usize, retry: Writes, held: Writes) -> (u64, u64) {
        let mut dropped = (0, 0);
        {
            let mut st = self.state.lock();
            st.in_flight = st.in_flight.saturating_sub(sent);
            let tagged = retry
                .into_iter()
                .map(|w| (w, false))
                .chain(held.into_iter().map(|w| (w, true)));
            for ((id, op), is_held) in tagged {
                if st.ops.contains_key(&id) {
                    continue;
                }
                let (limit, count) = match op {
                    WriteOp::Put(_) if is_held => (self.capacity / 2, &mut dropped.0),
                    WriteOp::Put(_) => (self.capacity, &mut dropped.0),
                    WriteOp::Remove => (self.capacity.saturating_mul(2), &mut dropped.1),
                };
                if st.insert(id, op, limit) == Enqueued::Dropped {
                    *count += 1;
                }
            }
            if st.order.is_empty() && st.in_flight == 0 {
                self.drained.notify_all();
            }
        }
        dropped
    }

    /// Drops every pending write (`clear` of the whole store); writes in flight go on.
    pub(crate) fn clear(&self) {
        let mut st = self.state.lock();
        st.ops.clear();
        st.order.clear();
        if st.in_flight == 0 {
            self.drained.notify_all();
        }
    }

    /// Writes queued, not yet sent.
    pub(crate) fn len(&self) -> usize {
        self.state.lock().order.len()
    }

    /// Waits until nothing is queued or in flight, at most `timeout`; true if drained.
    pub(crate) fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock();
        while !(st.order.is_empty() && st.in_flight == 0) {
            if self.drained.wait_until(&mut st, deadline).timed_out() {
                return st.order.is_empty() && st.in_flight == 0;
            }
        }
        true
    }

    /// Waits for work without taking it (the writer first waits for the breaker).
    async fn has_work(&self) {
        loop {
            let notified = self.wake.notified();
            if !self.state.lock().order.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// The writer task: waits for writes, then sends them to the single server or the cluster.
pub(crate) async fn run_writer(shared: Arc<Shared>) {
    loop {
        shared.queue.has_work().await;
        if shared.topology.is_some() {
            cluster_round(&shared).await;
        } else {
            single_round(&shared).await;
        }
    }
}

/// One server: waits for the breaker to admit the writer, then sends one pipelined batch.
async fn single_round(shared: &Arc<Shared>) {
    let permit = loop {
        if let Some(p) = shared.breaker.admit(Instant::now()) {
            break p;
        }
        tokio::time::sleep(breaker_wait(shared.breaker.retry_at())).await;
    };
    let batch = shared.queue.pop_batch(BATCH);
    if batch.is_empty() {
        return; // cleared meanwhile; the dropped permit gives a probe slot back
    }
    let sent = batch.len();
    let deadline = Instant::now() + shared.op_timeout;
    let mut pipe = ::redis::pipe();
    let now_ms = unix_millis(SystemTime::now());
    let mut puts = 0u64;
    let mut removes = 0u64;
    let mut expired = 0u64;
    for (id, op) in &batch {
        let key = shared.key_for(id);
        match op {
            WriteOp::Put(s) => {
                let ttl_ms = s.expires_at_millis().saturating_sub(now_ms);
                if ttl_ms == 0 {
                    pipe.cmd("DEL").arg(&key).ignore();
                    expired += 1;
                    continue;
                }
                match shared.codec.encode(id, s) {
                    Ok(value) => {
                        pipe.cmd("SET")
                            .arg(&key)
                            .arg(value)
                            .arg("PX")
                            .arg(ttl_ms)
                            .ignore();
                        puts += 1;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "redis session store: sealing failed; put dropped");
                        shared.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            WriteOp::Remove => {
                pipe.cmd("DEL").arg(&key).ignore();
                pipe.cmd("PUBLISH")
                    .arg(&shared.channel)
                    .arg(id.to_hex())
                    .ignore();
                removes += 1;
            }
        }
    }
    if puts + removes + expired == 0 {
        // Nothing to send (every put failed to seal): no round trip, no report.
        drop(permit);
        shared.queue.finish(sent, Vec::new(), Vec::new());
        return;
    }
    let outcome = shared
        .run(deadline, Route::Any, |mut conn| {
            let pipe = pipe.clone();
            async move { pipe.exec_async(&mut conn).await }
        })
        .await;
    let c = &shared.counters;
    let retry = match &outcome {
        Ok(()) => {
            c.writes_done
                .fetch_add(puts + removes + expired, Ordering::Relaxed);
            c.invalidations_sent.fetch_add(removes, Ordering::Relaxed);
            Vec::new()
        }
        Err(e) => {
            c.write_errors.fetch_add(sent as u64, Ordering::Relaxed);
            if e.is_unreachable() {
                c.write_retries.fetch_add(sent as u64, Ordering::Relaxed);
                batch
            } else {
                Vec::new()
            }
        }
    };
    if let Err(e) = shared.settle(permit, outcome) {
        tracing::debug!(error = %e, writes = sent, "redis session store: write batch failed");
    }
    shared.count_lost(shared.queue.finish(sent, retry, Vec::new()));
}

/// How long a writer that a breaker refused waits before asking again.
fn breaker_wait(retry_at: Option<Instant>) -> Duration {
    let now = Instant::now();
    retry_at
        .map_or(BREAKER_POLL, |t| t.saturating_duration_since(now))
        .clamp(Duration::from_millis(1), BREAKER_POLL)
}

/// Writes with their ids.
type Writes = Vec<(SessionId, WriteOp)>;

/// What one write of a cluster batch did.
#[derive(Clone, Copy)]
enum Sent {
    Put,
    Remove,
    /// A put whose session expired before it was sent: a `DEL`.
    Expired,
    /// A put that could not be sealed: dropped, counted.
    Unsealed,
}

/// A cluster: a batch's writes grouped by the master that holds each key; a group whose
/// master's breaker is open is held back (see [`WriteQueue::finish`]), every other write is sent
/// at once as a command of its own (a cluster pipeline may not span slots), all within one
/// deadline. Each group reports to its master's breaker. A removal's invalidation is published
/// once its `DEL` is done, so no host hears of it before Redis forgot the session.
async fn cluster_round(shared: &Arc<Shared>) {
    let batch = shared.queue.pop_batch(BATCH);
    if batch.is_empty() {
        return;
    }
    let sent = batch.len();
    let now = Instant::now();
    let mut groups: Vec<(Arc<SharedBreaker>, Writes)> = Vec::new();
    for (id, op) in batch {
        let breaker = shared.breaker_for(shared.key_for(&id).as_bytes());
        match groups.iter_mut().find(|g| Arc::ptr_eq(&g.0, &breaker)) {
            Some(g) => g.1.push((id, op)),
            None => groups.push((breaker, vec![(id, op)])),
        }
    }
    let mut held = Vec::new();
    let mut admitted = Vec::new();
    let mut retry_at = None::<Instant>;
    for (breaker, writes) in groups {
        match breaker.admit(now) {
            Some(permit) => admitted.push((permit, writes)),
            None => {
                if let Some(t) = breaker.retry_at() {
                    retry_at = Some(retry_at.map_or(t, |r| r.min(t)));
                }
                held.extend(writes);
            }
        }
    }
    let deadline = now + shared.op_timeout;
    let now_ms = unix_millis(SystemTime::now());
    let rounds = admitted.into_iter().map(|(permit, writes)| async move {
        let outcomes = futures_util::future::join_all(
            writes
                .iter()
                .map(|(id, op)| send_one(shared, id, op, deadline, now_ms)),
        )
        .await;
        (permit, writes, outcomes)
    });
    let c = &shared.counters;
    let mut retry = Vec::new();
    for (permit, writes, outcomes) in futures_util::future::join_all(rounds).await {
        let mut unreachable = None;
        let mut answered_error = None;
        for ((id, op), outcome) in writes.into_iter().zip(outcomes) {
            match outcome {
                Ok(Sent::Put | Sent::Expired) => bump(&c.writes_done),
                Ok(Sent::Remove) => {
                    bump(&c.writes_done);
                    bump(&c.invalidations_sent);
                }
                Ok(Sent::Unsealed) => bump(&c.write_errors),
                Err(e) => {
                    bump(&c.write_errors);
                    if e.is_unreachable() {
                        bump(&c.write_retries);
                        retry.push((id, op));
                        unreachable.get_or_insert(e);
                    } else {
                        answered_error.get_or_insert(e);
                    }
                }
            }
        }
        // One report per master: unreachable if any of its writes could not reach it.
        let outcome = match unreachable.or(answered_error) {
            Some(e) => Err(e),
            None => Ok(()),
        };
        if let Err(e) = shared.settle(permit, outcome) {
            tracing::debug!(error = %e, "redis session store: cluster writes failed");
        }
    }
    let nothing_sent = held.len() == sent;
    shared.count_lost(shared.queue.finish(sent, retry, held));
    if nothing_sent {
        // Every write waits for a master that is down: do not spin on them.
        tokio::time::sleep(breaker_wait(retry_at)).await;
    }
}

/// Sends one write of a cluster batch.
async fn send_one(
    shared: &Shared,
    id: &SessionId,
    op: &WriteOp,
    deadline: Instant,
    now_ms: u64,
) -> Result<Sent, RunError> {
    let key = shared.key_for(id);
    match op {
        WriteOp::Put(s) => {
            let ttl_ms = s.expires_at_millis().saturating_sub(now_ms);
            if ttl_ms == 0 {
                let del = ::redis::cmd("DEL").arg(&key).clone();
                return shared
                    .run(deadline, Route::Key(key.as_bytes()), |mut conn| {
                        let del = del.clone();
                        async move { del.exec_async(&mut conn).await }
                    })
                    .await
                    .map(|()| Sent::Expired);
            }
            let value = match shared.codec.encode(id, s) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "redis session store: sealing failed; put dropped");
                    return Ok(Sent::Unsealed);
                }
            };
            let set = ::redis::cmd("SET")
                .arg(&key)
                .arg(value)
                .arg("PX")
                .arg(ttl_ms)
                .clone();
            shared
                .run(deadline, Route::Key(key.as_bytes()), |mut conn| {
                    let set = set.clone();
                    async move { set.exec_async(&mut conn).await }
                })
                .await
                .map(|()| Sent::Put)
        }
        WriteOp::Remove => {
            let del = ::redis::cmd("DEL").arg(&key).clone();
            let publish = ::redis::cmd("PUBLISH")
                .arg(&shared.channel)
                .arg(id.to_hex())
                .clone();
            shared
                .run(deadline, Route::Key(key.as_bytes()), |mut conn| {
                    let del = del.clone();
                    async move { del.exec_async(&mut conn).await }
                })
                .await?;
            // Any master: the cluster bus carries it to the subscribers of every node.
            shared
                .run(deadline, Route::Any, |mut conn| {
                    let publish = publish.clone();
                    async move { publish.exec_async(&mut conn).await }
                })
                .await
                .map(|()| Sent::Remove)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u8) -> SessionId {
        SessionId::new(&[i]).unwrap()
    }

    fn sess(tag: u8) -> StoredSession {
        StoredSession::from_millis(vec![tag], u64::MAX)
    }

    fn pending_put(q: &WriteQueue, i: u8) -> Option<u8> {
        match q.pending(&id(i)) {
            Some(Pending::Put(s)) => Some(s.data()[0]),
            _ => None,
        }
    }

    #[test]
    fn a_remove_replaces_an_earlier_queued_put_and_a_later_put_replaces_a_remove() {
        let q = WriteQueue::new(8);
        assert_eq!(q.put(id(1), sess(1)), Enqueued::Queued);
        assert_eq!(q.put(id(2), sess(2)), Enqueued::Queued);
        assert_eq!(q.remove(id(1)), Enqueued::Coalesced);
        assert!(matches!(q.pending(&id(1)), Some(Pending::Remove)));
        assert_eq!(q.len(), 2, "one pending write per id");
        let batch = q.pop_batch(10);
        let ids: Vec<_> = batch.iter().map(|(i, _)| *i).collect();
        assert_eq!(ids, [id(1), id(2)], "the id keeps its place in the order");
        assert!(matches!(batch[0].1, WriteOp::Remove));
        assert_eq!(q.finish(2, Vec::new(), Vec::new()), (0, 0));
        assert_eq!(q.remove(id(3)), Enqueued::Queued);
        assert_eq!(q.put(id(3), sess(3)), Enqueued::Coalesced);
        assert_eq!(pending_put(&q, 3), Some(3));
    }

    #[test]
    fn puts_overflow_at_capacity_and_removes_have_room_beyond_it() {
        let q = WriteQueue::new(2);
        assert_eq!(q.put(id(1), sess(1)), Enqueued::Queued);
        assert_eq!(q.put(id(2), sess(2)), Enqueued::Queued);
        assert_eq!(q.put(id(3), sess(3)), Enqueued::Dropped);
        assert!(
            q.pending(&id(3)).is_none(),
            "a dropped put is simply absent"
        );
        assert_eq!(
            q.put(id(2), sess(9)),
            Enqueued::Coalesced,
            "replacing needs no room"
        );
        assert_eq!(q.remove(id(4)), Enqueued::Queued);
        assert_eq!(q.remove(id(5)), Enqueued::Queued);
        assert_eq!(q.remove(id(6)), Enqueued::Dropped);
        assert_eq!(q.len(), 4);
    }

    #[test]
    fn zero_capacity_drops_every_write() {
        let q = WriteQueue::new(0);
        assert_eq!(q.put(id(1), sess(1)), Enqueued::Dropped);
        assert_eq!(q.remove(id(1)), Enqueued::Dropped);
        assert!(q.wait_drained(Duration::ZERO));
    }

    #[test]
    fn take_pending_turns_a_queued_put_into_a_removal() {
        let q = WriteQueue::new(4);
        q.put(id(1), sess(7));
        assert_eq!(q.take_pending(&id(1)).unwrap().unwrap().data(), [7]);
        assert!(matches!(q.take_pending(&id(1)), Some(None)), "taken once");
        assert!(q.take_pending(&id(2)).is_none());
        assert!(matches!(q.pop_batch(4)[0].1, WriteOp::Remove));
    }

    #[test]
    fn a_retried_removal_never_overrides_a_newer_write() {
        let q = WriteQueue::new(4);
        q.remove(id(1));
        q.remove(id(2));
        let batch = q.pop_batch(4);
        assert!(!q.wait_drained(Duration::ZERO), "in flight is not drained");
        q.put(id(1), sess(1)); // arrives while the removal is in flight
        assert_eq!(q.finish(2, batch, Vec::new()), (0, 0));
        assert_eq!(pending_put(&q, 1), Some(1), "the newer put stays");
        assert!(matches!(q.pending(&id(2)), Some(Pending::Remove)));
        q.pop_batch(4);
        q.finish(2, Vec::new(), Vec::new());
        assert!(q.wait_drained(Duration::ZERO));
    }

    #[test]
    fn queue_matches_a_naive_model() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(8);
        let q = WriteQueue::new(5);
        // The model: a list of (id, Some(tag) for a put / None for a remove) in order.
        let mut model: Vec<(u8, Option<u8>)> = Vec::new();
        for step in 0..5_000 {
            let i = rng.random_range(0..12u8);
            match rng.random_range(0..4) {
                0 | 1 => {
                    let tag = rng.random::<u8>();
                    let r = q.put(id(i), sess(tag));
                    if let Some(e) = model.iter_mut().find(|e| e.0 == i) {
                        assert_eq!(r, Enqueued::Coalesced, "step {step}");
                        e.1 = Some(tag);
                    } else if model.len() < 5 {
                        assert_eq!(r, Enqueued::Queued, "step {step}");
                        model.push((i, Some(tag)));
                    } else {
                        assert_eq!(r, Enqueued::Dropped, "step {step}");
                    }
                }
                2 => {
                    let r = q.remove(id(i));
                    if let Some(e) = model.iter_mut().find(|e| e.0 == i) {
                        assert_eq!(r, Enqueued::Coalesced, "step {step}");
                        e.1 = None;
                    } else if model.len() < 10 {
                        assert_eq!(r, Enqueued::Queued, "step {step}");
                        model.push((i, None));
                    } else {
                        assert_eq!(r, Enqueued::Dropped, "step {step}");
                    }
                }
                _ => {
                    let n = rng.random_range(0..4);
                    let got: Vec<(u8, Option<u8>)> = q
                        .pop_batch(n)
                        .into_iter()
                        .map(|(id, op)| {
                            let tag = match op {
                                WriteOp::Put(s) => Some(s.data()[0]),
                                WriteOp::Remove => None,
                            };
                            (id.as_bytes()[0], tag)
                        })
                        .collect();
                    let want: Vec<_> = model.drain(..n.min(model.len())).collect();
                    assert_eq!(got, want, "step {step}");
                    q.finish(got.len(), Vec::new(), Vec::new());
                }
            }
            assert_eq!(q.len(), model.len(), "step {step}");
        }
    }
}
