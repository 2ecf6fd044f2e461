//! Deadlines of many owners in one min-heap, with lazy deletion: [`TimerHeap`].
//!
//! The endpoint keeps two, one for the peers' DTLS retransmission deadlines and one for the
//! deadlines of their parked session lookups. An owner holds the [`Timer`] of its one live entry
//! (or none); moving a deadline pushes a new entry and leaves the old one in the heap, where it
//! is skipped when it comes to the top, and the heap is rebuilt from its live entries when the
//! stale ones outnumber them (bounded size, whatever the owners do).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// Stale entries allowed beyond two per owner before the heap is rebuilt.
pub(crate) const TIMER_HEAP_SPARE: usize = 64;

/// One entry of a [`TimerHeap`], as its owner keeps it: the entry is live while its owner holds
/// an equal `Timer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timer {
    at: Instant,
    /// Tells this entry from every other entry of its heap (several may share `at` and a key).
    generation: u64,
}

impl Timer {
    /// When it is due.
    pub(crate) fn at(self) -> Instant {
        self.at
    }
}

/// Deadlines of owners named by `K` (a peer's address): a min-heap of `(Instant, K, generation)`
/// whose entries are live only while their owner holds the matching [`Timer`]; `is_live` asks
/// the owner.
#[derive(Debug)]
pub(crate) struct TimerHeap<K> {
    heap: BinaryHeap<Reverse<(Instant, K, u64)>>,
    next_generation: u64,
}

impl<K: Ord + Copy> TimerHeap<K> {
    pub(crate) fn new() -> Self {
        Self {
            heap: BinaryHeap::new(),
            next_generation: 0,
        }
    }

    /// Entries in the heap, stale ones included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }

    /// Adds an entry for `key` at `at`; the owner keeps the returned [`Timer`] to make it live
    /// (and drops it, or replaces it, to make it stale).
    pub(crate) fn push(&mut self, key: K, at: Instant) -> Timer {
        let generation = self.next_generation;
        self.next_generation += 1;
        self.heap.push(Reverse((at, key, generation)));
        Timer { at, generation }
    }

    /// Rebuilds the heap from its live entries when it holds more than two per owner (of
    /// `owners`) and [`TIMER_HEAP_SPARE`] besides; call it after [`push`](Self::push), once the
    /// owner holds the new [`Timer`].
    pub(crate) fn compact(&mut self, owners: usize, mut is_live: impl FnMut(&K, Timer) -> bool) {
        if self.heap.len() > 2 * owners + TIMER_HEAP_SPARE {
            self.heap
                .retain(|&Reverse((at, key, generation))| is_live(&key, Timer { at, generation }));
        }
    }

    /// Removes and returns the earliest live entry due at `now`, skipping (and removing) the
    /// stale ones before it; `None` when no live entry is due.
    pub(crate) fn pop_due(
        &mut self,
        now: Instant,
        mut is_live: impl FnMut(&K, Timer) -> bool,
    ) -> Option<(K, Timer)> {
        while let Some(&Reverse((at, key, generation))) = self.heap.peek() {
            if at > now {
                return None;
            }
            self.heap.pop();
            let timer = Timer { at, generation };
            if is_live(&key, timer) {
                return Some((key, timer));
            }
        }
        None
    }

    /// When the earliest live entry is due; the stale entries before it are removed.
    pub(crate) fn next_deadline(
        &mut self,
        mut is_live: impl FnMut(&K, Timer) -> bool,
    ) -> Option<Instant> {
        while let Some(&Reverse((at, key, generation))) = self.heap.peek() {
            if is_live(&key, Timer { at, generation }) {
                return Some(at);
            }
            self.heap.pop();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;

    /// Owners keyed by number, each holding its one live timer.
    fn live(owners: &HashMap<u32, Timer>) -> impl FnMut(&u32, Timer) -> bool + '_ {
        |k, t| owners.get(k) == Some(&t)
    }

    #[test]
    fn due_entries_pop_in_deadline_order_and_later_ones_wait() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut heap = TimerHeap::new();
        let mut owners = HashMap::new();
        for (key, at) in [(1u32, 30), (2, 10), (3, 20), (4, 50)] {
            owners.insert(key, heap.push(key, ms(at)));
        }
        assert_eq!(heap.next_deadline(live(&owners)), Some(ms(10)));
        let mut popped = Vec::new();
        while let Some((key, timer)) = heap.pop_due(ms(30), live(&owners)) {
            assert_eq!(owners.remove(&key), Some(timer));
            popped.push((key, timer.at()));
        }
        assert_eq!(popped, vec![(2, ms(10)), (3, ms(20)), (1, ms(30))]);
        assert_eq!(heap.next_deadline(live(&owners)), Some(ms(50)));
        assert_eq!(heap.pop_due(ms(49), live(&owners)), None);
        assert_eq!(heap.len(), 1);
    }

    #[test]
    fn stale_entries_are_skipped_and_removed() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut heap = TimerHeap::new();
        let mut owners = HashMap::new();
        // Owner 1 moves its deadline later, owner 2 earlier at the same instant twice, owner 3
        // goes away.
        owners.insert(1u32, heap.push(1, ms(10)));
        owners.insert(1, heap.push(1, ms(40)));
        heap.push(2, ms(20));
        owners.insert(2, heap.push(2, ms(20)));
        owners.insert(3, heap.push(3, ms(5)));
        owners.remove(&3);
        assert_eq!(heap.next_deadline(live(&owners)), Some(ms(20)));
        assert_eq!(heap.len(), 2, "the stale entries before it went");
        assert_eq!(
            heap.pop_due(ms(100), live(&owners))
                .map(|(k, t)| (k, t.at())),
            Some((2, ms(20)))
        );
        owners.remove(&2);
        assert_eq!(
            heap.pop_due(ms(100), live(&owners))
                .map(|(k, t)| (k, t.at())),
            Some((1, ms(40)))
        );
        owners.remove(&1);
        assert_eq!(heap.pop_due(ms(100), live(&owners)), None);
        assert_eq!(heap.next_deadline(live(&owners)), None);
        assert_eq!(heap.len(), 0);
    }

    #[test]
    fn compaction_keeps_exactly_the_live_entries() {
        let t0 = Instant::now();
        let mut heap = TimerHeap::new();
        let mut owners = HashMap::new();
        for round in 0..40u64 {
            for key in 0..3u32 {
                let at = t0 + Duration::from_millis(1000 - round * 10 + u64::from(key));
                owners.insert(key, heap.push(key, at));
            }
        }
        assert_eq!(heap.len(), 120);
        heap.compact(owners.len(), live(&owners));
        assert_eq!(heap.len(), 3);
        let mut left = Vec::new();
        while let Some((key, timer)) = heap.pop_due(t0 + Duration::from_secs(2), live(&owners)) {
            assert_eq!(owners[&key], timer);
            left.push(key);
        }
        assert_eq!(left, vec![0, 1, 2]);
    }

    #[test]
    fn compaction_waits_for_more_than_two_entries_per_owner_and_the_spare() {
        let t0 = Instant::now();
        let mut heap = TimerHeap::new();
        let mut owners = HashMap::new();
        for i in 0..(2 + TIMER_HEAP_SPARE) as u64 {
            owners.insert(7u32, heap.push(7, t0 + Duration::from_millis(i)));
        }
        heap.compact(owners.len(), live(&owners));
        assert_eq!(heap.len(), 2 + TIMER_HEAP_SPARE, "at the bound: kept");
        owners.insert(7, heap.push(7, t0));
        heap.compact(owners.len(), live(&owners));
        assert_eq!(heap.len(), 1, "over it: rebuilt");
        // The bound grows by two per owner: with three owners it is 70 entries.
        let mut heap = TimerHeap::new();
        let mut owners = HashMap::new();
        for i in 0..(2 * 3 + TIMER_HEAP_SPARE) as u64 {
            let key = (i % 3) as u32;
            owners.insert(key, heap.push(key, t0 + Duration::from_millis(i)));
        }
        heap.compact(owners.len(), live(&owners));
        assert_eq!(
            heap.len(),
            2 * 3 + TIMER_HEAP_SPARE,
            "three owners at the bound: kept"
        );
        owners.insert(0, heap.push(0, t0));
        heap.compact(owners.len(), live(&owners));
        assert_eq!(heap.len(), 3, "one over it: rebuilt to the live entries");
    }

    #[test]
    fn many_reschedules_leave_the_heap_bounded() {
        let t0 = Instant::now();
        let mut heap = TimerHeap::new();
        let mut owners = HashMap::new();
        for i in 0..10_000u64 {
            let key = (i % 5) as u32;
            // Every deadline a little earlier than the last, as with a clock standing still.
            owners.insert(key, heap.push(key, t0 + Duration::from_secs(10_000 - i)));
            heap.compact(owners.len(), live(&owners));
            assert!(heap.len() <= 2 * owners.len() + TIMER_HEAP_SPARE + 1);
        }
        let mut due = 0;
        while heap
            .pop_due(t0 + Duration::from_secs(20_000), live(&owners))
            .is_some()
        {
            due += 1;
        }
        assert_eq!(due, 5, "one live entry per owner");
    }
}
