//! One shard's map: entries in a slab (a `Vec`), linked into a recency list by `u32` indices,
//! found through a hash table of indices.
//!
//! Compared with a map of boxed list nodes (the `lru` crate), an entry costs its 64-byte slab
//! node and a 4-byte index bucket instead of an allocated 72-byte node and a 16-byte bucket,
//! and an entry has a stable position: a clock hand can walk the slab between calls, so
//! purging reaches every entry with bounded work per call, whatever its place in the recency
//! order.

use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};

use super::{PackedId, Slot};

/// The end of a list (and of the free list).
const NIL: u32 = u32::MAX;
/// Nodes a shard can hold: every index below [`NIL`].
const MAX_NODES: usize = NIL as usize;
/// The smallest step by which the slab grows.
const MIN_GROWTH: usize = 8;

/// A slab node: an entry, or a vacant node on the free list (its slot is vacant, its `next`
/// links the free list).
struct Node {
    key: PackedId,
    slot: Slot,
    prev: u32,
    next: u32,
}

/// An LRU map over a slab. Not thread-safe: the store locks each shard.
pub(super) struct LruSlab {
    /// Indices into `nodes` of the occupied nodes, hashed by key.
    index: HashTable<u32>,
    /// Randomly seeded per shard: the shard index uses the store's own hash, whose top bits
    /// are the same for every key of a shard.
    hasher: DefaultHashBuilder,
    nodes: Vec<Node>,
    /// Most recently used.
    head: u32,
    /// Least recently used.
    tail: u32,
    /// First vacant node.
    free: u32,
    len: usize,
    /// The next node the purge examines.
    hand: usize,
    /// Nodes the shard is expected to need when the store is full: the slab doubles up to
    /// this, then grows by an eighth, so a full store wastes little of it.
    expected: usize,
}

impl LruSlab {
    /// An empty map expected to hold up to about `expected` entries.
    pub(super) fn new(expected: usize) -> Self {
        Self {
            index: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            nodes: Vec::new(),
            head: NIL,
            tail: NIL,
            free: NIL,
            len: 0,
            hand: 0,
            expected: expected.min(MAX_NODES),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// True when no node is vacant and the slab cannot grow (about 4 billion entries).
    pub(super) fn is_full(&self) -> bool {
        self.free == NIL && self.nodes.len() >= MAX_NODES
    }

    fn find(&self, key: &PackedId) -> Option<u32> {
        let nodes = &self.nodes;
        self.index
            .find(self.hasher.hash_one(key), |&i| {
                nodes[i as usize].key == *key
            })
            .copied()
    }

    /// The entry under `key`, without touching its recency.
    pub(super) fn peek(&self, key: &PackedId) -> Option<&Slot> {
        self.find(key).map(|i| &self.nodes[i as usize].slot)
    }

    /// The entry under `key` if `accept` takes it; it becomes the most recently used.
    pub(super) fn get_if(
        &mut self,
        key: &PackedId,
        accept: impl FnOnce(&Slot) -> bool,
    ) -> Option<&Slot> {
        let i = self.find(key)?;
        if !accept(&self.nodes[i as usize].slot) {
            return None;
        }
        self.unlink(i);
        self.push_front(i);
        Some(&self.nodes[i as usize].slot)
    }

    /// Stores `slot` under `key` as the most recently used entry; returns what it replaced.
    ///
    /// The caller checks [`is_full`](Self::is_full) first.
    pub(super) fn insert(&mut self, key: PackedId, slot: Slot) -> Option<Slot> {
        if let Some(i) = self.find(&key) {
            let old = std::mem::replace(&mut self.nodes[i as usize].slot, slot);
            self.unlink(i);
            self.push_front(i);
            return Some(old);
        }
        let i = self.alloc(key, slot);
        let Self {
            index,
            hasher,
            nodes,
            ..
        } = self;
        index.insert_unique(hasher.hash_one(key), i, |&j| {
            hasher.hash_one(nodes[j as usize].key)
        });
        self.push_front(i);
        self.len += 1;
        None
    }

    /// Removes the entry under `key`, if `accept` takes it.
    pub(super) fn remove_if(
        &mut self,
        key: &PackedId,
        accept: impl FnOnce(&Slot) -> bool,
    ) -> Option<Slot> {
        let i = self.find(key)?;
        if !accept(&self.nodes[i as usize].slot) {
            return None;
        }
        Some(self.remove_at(i))
    }

    /// Removes the least recently used entry.
    pub(super) fn pop_lru(&mut self) -> Option<Slot> {
        (self.tail != NIL).then(|| self.remove_at(self.tail))
    }

    /// The entries from the least to the most recently used.
    pub(super) fn iter_lru(&self) -> impl Iterator<Item = (&PackedId, &Slot)> + '_ {
        let mut i = self.tail;
        std::iter::from_fn(move || {
            let node = self.nodes.get(i as usize)?;
            i = node.prev;
            Some((&node.key, &node.slot))
        })
    }

    /// Examines up to `budget` nodes from where the previous sweep stopped, wrapping around the
    /// slab, and removes the entries `expired` picks. Returns how many nodes it examined (at
    /// most the slab's length: one sweep never examines a node twice) and the removed slots.
    ///
    /// Successive sweeps examine every node in turn, so an entry is reached within
    /// `nodes / budget + 1` sweeps wherever it is in the recency order.
    pub(super) fn sweep(
        &mut self,
        budget: usize,
        mut expired: impl FnMut(&Slot) -> bool,
    ) -> (usize, Vec<Slot>) {
        let steps = budget.min(self.nodes.len());
        let mut removed = Vec::new();
        for _ in 0..steps {
            if self.hand >= self.nodes.len() {
                self.hand = 0;
            }
            let i = self.hand;
            self.hand += 1;
            let slot = &self.nodes[i].slot;
            if !slot.is_vacant() && expired(slot) {
                removed.push(self.remove_at(i as u32));
            }
        }
        (steps, removed)
    }

    /// Removes every entry; returns how many there were and their bytes.
    pub(super) fn clear(&mut self) -> (usize, usize) {
        let cleared = (
            self.len,
            self.nodes.iter().map(|n| n.slot.len()).sum::<usize>(),
        );
        self.index.clear();
        self.nodes.clear();
        self.head = NIL;
        self.tail = NIL;
        self.free = NIL;
        self.len = 0;
        self.hand = 0;
        cleared
    }

    /// A node for a new entry: a vacant one, or a new one at the end of the slab.
    fn alloc(&mut self, key: PackedId, slot: Slot) -> u32 {
        if self.free != NIL {
            let i = self.free;
            let node = &mut self.nodes[i as usize];
            self.free = node.next;
            node.key = key;
            node.slot = slot;
            return i;
        }
        if self.nodes.len() == self.nodes.capacity() {
            let cap = self.nodes.capacity();
            let step = if cap < self.expected {
                cap.max(MIN_GROWTH).min(self.expected - cap)
            } else {
                (cap / 8).max(MIN_GROWTH)
            };
            self.nodes.reserve_exact(step.min(MAX_NODES - cap));
        }
        let i = self.nodes.len();
        debug_assert!(i < MAX_NODES, "the caller checks is_full");
        self.nodes.push(Node {
            key,
            slot,
            prev: NIL,
            next: NIL,
        });
        i as u32
    }

    /// Unlinks and frees node `i`, which holds an entry, and returns its slot.
    fn remove_at(&mut self, i: u32) -> Slot {
        let key = self.nodes[i as usize].key;
        if let Ok(entry) = self
            .index
            .find_entry(self.hasher.hash_one(key), |&j| j == i)
        {
            entry.remove();
        }
        self.unlink(i);
        let node = &mut self.nodes[i as usize];
        let slot = std::mem::replace(&mut node.slot, Slot::vacant());
        node.next = self.free;
        self.free = i;
        self.len -= 1;
        slot
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let n = &self.nodes[i as usize];
            (n.prev, n.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
        let n = &mut self.nodes[i as usize];
        n.prev = NIL;
        n.next = NIL;
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let n = &mut self.nodes[i as usize];
            n.prev = NIL;
            n.next = old;
        }
        match old {
            NIL => self.tail = i,
            h => self.nodes[h as usize].prev = i,
        }
        self.head = i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SessionId, StoredSession};

    fn key(i: u8) -> PackedId {
        PackedId::of(&SessionId::new(&[i]).unwrap())
    }

    fn slot(i: u8, expires_ms: u64) -> Slot {
        Slot::new(
            &SessionId::new(&[i]).unwrap(),
            StoredSession::from_millis(vec![i; usize::from(i) + 1], expires_ms),
        )
    }

    fn order(m: &LruSlab) -> Vec<u8> {
        m.iter_lru().map(|(k, _)| k.0[0]).collect()
    }

    #[test]
    fn grows_to_the_expected_size_exactly_then_by_an_eighth() {
        let mut m = LruSlab::new(100);
        for i in 0..100u8 {
            assert!(m.insert(key(i), slot(i, 100)).is_none());
        }
        assert_eq!(m.nodes.capacity(), 100, "no slack up to the expected size");
        m.insert(key(200), slot(200, 100));
        assert_eq!(m.nodes.capacity(), 112);
    }

    #[test]
    fn keeps_recency_order_through_gets_replacements_and_removals() {
        let mut m = LruSlab::new(4);
        for i in 1..=5 {
            assert!(m.insert(key(i), slot(i, 100)).is_none());
        }
        assert_eq!(order(&m), [1, 2, 3, 4, 5]);
        assert!(m.get_if(&key(2), |_| true).is_some());
        assert!(
            m.get_if(&key(3), |_| false).is_none(),
            "refused: not promoted"
        );
        assert_eq!(order(&m), [1, 3, 4, 5, 2]);
        assert_eq!(m.insert(key(4), slot(4, 7)).unwrap().expires_at_ms(), 100);
        assert_eq!(order(&m), [1, 3, 5, 2, 4]);
        assert_eq!(m.peek(&key(4)).unwrap().expires_at_ms(), 7);
        assert_eq!(m.pop_lru().unwrap().len(), 2);
        assert!(m.remove_if(&key(5), |_| true).is_some());
        assert!(m.remove_if(&key(2), |_| false).is_none());
        assert_eq!(order(&m), [3, 2, 4]);
        assert_eq!(m.len(), 3);
        // Freed nodes are reused before the slab grows.
        let nodes = m.nodes.len();
        m.insert(key(9), slot(9, 1));
        m.insert(key(8), slot(8, 1));
        assert_eq!(m.nodes.len(), nodes);
        assert_eq!(order(&m), [3, 2, 4, 9, 8]);
        assert!(m.peek(&key(1)).is_none() && m.peek(&key(5)).is_none());
        assert_eq!(m.clear(), (5, 4 + 3 + 5 + 10 + 9));
        assert_eq!(order(&m), Vec::<u8>::new());
        assert!(m.pop_lru().is_none());
    }

    #[test]
    fn the_sweep_reaches_every_node_over_successive_calls() {
        let mut m = LruSlab::new(0);
        for i in 0..20 {
            m.insert(key(i), slot(i, if i == 19 { 5 } else { 50 }));
        }
        // The expired entry is the most recently used: a walk from the LRU end would need all
        // 20 steps to reach it; the hand gets there across calls of 3.
        let mut examined = 0;
        let mut removed = Vec::new();
        for _ in 0..7 {
            let (n, r) = m.sweep(3, |s| s.expires_at_ms() <= 10);
            assert!(n <= 3);
            examined += n;
            removed.extend(r);
        }
        assert_eq!(examined, 20 + 1);
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].len(), 20);
        assert!(m.peek(&key(19)).is_none());
        // One sweep never examines a node twice.
        assert_eq!(m.sweep(usize::MAX, |_| true).0, 20);
        assert_eq!(m.len(), 0);
    }

    #[test]
    fn the_slab_grows_to_the_expected_size_exactly() {
        let mut m = LruSlab::new(100);
        for i in 0..100 {
            m.insert(key(i), slot(i, 1));
        }
        assert_eq!(m.nodes.capacity(), 100);
        m.insert(key(100), slot(100, 1));
        assert_eq!(m.nodes.capacity(), 100 + 12);
    }
}
