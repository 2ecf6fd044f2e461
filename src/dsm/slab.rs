//! Fixed-capacity slot storage with intrusive recency lists.
//!
//! A [`Slab`] holds at most `capacity` entries in a `Vec` that grows lazily up to that bound and
//! reuses freed slots through a free list, so the memory a peer flood can make it hold is fixed by
//! the configuration. Each occupied slot sits on exactly one [`List`] (least recently used at the
//! head, most recently used at the tail), which gives O(1) insert, move, unlink and LRU lookup.

/// Marks the end of a list (no neighbour).
const NIL: usize = usize::MAX;

/// One doubly linked list threaded through the slab's slots.
#[derive(Debug, Clone, Copy)]
pub(crate) struct List {
    head: usize,
    tail: usize,
    len: usize,
}

impl List {
    pub(crate) const fn new() -> Self {
        Self {
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }

    /// The least recently used slot (the head), if any.
    pub(crate) fn front(&self) -> Option<usize> {
        (self.head != NIL).then_some(self.head)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// An occupied slot: the caller's item plus its list links.
#[derive(Debug)]
struct Node<T> {
    item: T,
    prev: usize,
    next: usize,
}

#[derive(Debug)]
enum Entry<T> {
    Occupied(Node<T>),
    Vacant,
}

/// Bounded slot storage; see the module docs.
#[derive(Debug)]
pub(crate) struct Slab<T> {
    entries: Vec<Entry<T>>,
    free: Vec<usize>,
    capacity: usize,
    len: usize,
}

impl<T> Slab<T> {
    pub(crate) const fn new(capacity: usize) -> Self {
        Self {
            entries: Vec::new(),
            free: Vec::new(),
            capacity,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_full(&self) -> bool {
        self.len >= self.capacity
    }

    /// Puts `item` in a free slot and appends it to `list` (as most recently used).
    /// Hands the item back when every slot is taken.
    pub(crate) fn insert(&mut self, list: &mut List, item: T) -> Result<usize, T> {
        let idx = if let Some(idx) = self.free.pop() {
            idx
        } else if self.entries.len() < self.capacity {
            self.entries.push(Entry::Vacant);
            self.entries.len() - 1
        } else {
            return Err(item);
        };
        self.entries[idx] = Entry::Occupied(Node {
            item,
            prev: NIL,
            next: NIL,
        });
        self.len += 1;
        self.link_back(list, idx);
        Ok(idx)
    }

    /// Unlinks slot `idx` from `list` and frees it, returning its item.
    ///
    /// # Panics
    /// If `idx` is not occupied (a broken invariant of the caller).
    pub(crate) fn remove(&mut self, list: &mut List, idx: usize) -> T {
        self.unlink(list, idx);
        let entry = std::mem::replace(&mut self.entries[idx], Entry::Vacant);
        let Entry::Occupied(node) = entry else {
            unreachable!("BUG: dsm slab removed a vacant slot");
        };
        self.free.push(idx);
        self.len -= 1;
        node.item
    }

    /// Moves slot `idx` to the back (most recently used end) of its own `list`.
    pub(crate) fn refresh(&mut self, list: &mut List, idx: usize) {
        self.unlink(list, idx);
        self.link_back(list, idx);
    }

    /// Moves slot `idx` from `from` to the back (most recently used end) of `to`.
    pub(crate) fn move_to_back(&mut self, from: &mut List, to: &mut List, idx: usize) {
        self.unlink(from, idx);
        self.link_back(to, idx);
    }

    pub(crate) fn get(&self, idx: usize) -> &T {
        &self.node(idx).item
    }

    pub(crate) fn get_mut(&mut self, idx: usize) -> &mut T {
        &mut self.node_mut(idx).item
    }

    /// The slot after `idx` on its list (towards the most recently used end).
    pub(crate) fn next(&self, idx: usize) -> Option<usize> {
        let next = self.node(idx).next;
        (next != NIL).then_some(next)
    }

    fn node(&self, idx: usize) -> &Node<T> {
        match &self.entries[idx] {
            Entry::Occupied(node) => node,
            Entry::Vacant => unreachable!("BUG: dsm slab read a vacant slot"),
        }
    }

    fn node_mut(&mut self, idx: usize) -> &mut Node<T> {
        match &mut self.entries[idx] {
            Entry::Occupied(node) => node,
            Entry::Vacant => unreachable!("BUG: dsm slab wrote a vacant slot"),
        }
    }

    fn link_back(&mut self, list: &mut List, idx: usize) {
        let old_tail = list.tail;
        {
            let node = self.node_mut(idx);
            node.prev = old_tail;
            node.next = NIL;
        }
        if old_tail == NIL {
            list.head = idx;
        } else {
            self.node_mut(old_tail).next = idx;
        }
        list.tail = idx;
        list.len += 1;
    }

    fn unlink(&mut self, list: &mut List, idx: usize) {
        let (prev, next) = {
            let node = self.node(idx);
            (node.prev, node.next)
        };
        if prev == NIL {
            list.head = next;
        } else {
            self.node_mut(prev).next = next;
        }
        if next == NIL {
            list.tail = prev;
        } else {
            self.node_mut(next).prev = prev;
        }
        list.len -= 1;
        let node = self.node_mut(idx);
        node.prev = NIL;
        node.next = NIL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(slab: &Slab<u32>, list: &List) -> Vec<u32> {
        let mut out = Vec::new();
        let mut cur = list.front();
        while let Some(idx) = cur {
            out.push(*slab.get(idx));
            cur = slab.next(idx);
        }
        assert_eq!(out.len(), list.len());
        out
    }

    #[test]
    fn insert_is_bounded_and_reuses_freed_slots() {
        let mut slab = Slab::new(2);
        let mut list = List::new();
        let a = slab.insert(&mut list, 1).unwrap();
        let _b = slab.insert(&mut list, 2).unwrap();
        assert!(slab.is_full());
        assert_eq!(slab.insert(&mut list, 3), Err(3));
        assert_eq!(slab.remove(&mut list, a), 1);
        let c = slab.insert(&mut list, 3).unwrap();
        assert_eq!(c, a, "the freed slot is reused");
        assert_eq!(slab.entries.len(), 2, "storage never grows past capacity");
        assert_eq!(items(&slab, &list), vec![2, 3]);
    }

    #[test]
    fn zero_capacity_holds_nothing() {
        let mut slab = Slab::new(0);
        let mut list = List::new();
        assert!(slab.is_full());
        assert_eq!(slab.insert(&mut list, 7), Err(7));
        assert_eq!(list.front(), None);
    }

    #[test]
    fn refresh_and_move_keep_lists_consistent() {
        let mut slab = Slab::new(4);
        let mut hs = List::new();
        let mut est = List::new();
        let idx: Vec<usize> = (0..4).map(|i| slab.insert(&mut hs, i).unwrap()).collect();
        slab.refresh(&mut hs, idx[0]);
        assert_eq!(items(&slab, &hs), vec![1, 2, 3, 0]);
        slab.refresh(&mut hs, idx[0]);
        assert_eq!(
            items(&slab, &hs),
            vec![1, 2, 3, 0],
            "refreshing the tail is a no-op"
        );
        // Move a middle one to the other list, then the head.
        slab.move_to_back(&mut hs, &mut est, idx[2]);
        slab.move_to_back(&mut hs, &mut est, idx[1]);
        assert_eq!(items(&slab, &hs), vec![3, 0]);
        assert_eq!(items(&slab, &est), vec![2, 1]);
        // Remove the tail of one and the head of the other.
        assert_eq!(slab.remove(&mut hs, idx[0]), 0);
        assert_eq!(slab.remove(&mut est, idx[2]), 2);
        assert_eq!(items(&slab, &hs), vec![3]);
        assert_eq!(items(&slab, &est), vec![1]);
        assert_eq!(slab.len(), 2);
        // Emptying a list resets it.
        assert_eq!(slab.remove(&mut hs, idx[3]), 3);
        assert_eq!(hs.front(), None);
        assert_eq!(hs.len(), 0);
    }
}
