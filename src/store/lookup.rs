//! Lookups that complete later: how a store answers without blocking the caller.

use std::fmt;

use crate::error::StoreError;
use crate::store::StoredSession;

/// How a [`lookup`](crate::SessionStore::lookup) reads the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LookupMode {
    /// Leave the entry in the store ([`get`](crate::SessionStore::get)).
    Get,
    /// Delete it in the same atomic step ([`take`](crate::SessionStore::take)): single use.
    Take,
}

type Callback = Box<dyn FnOnce(Result<Option<StoredSession>, StoreError>) + Send>;

/// The other end of a lookup: whoever runs it calls [`complete`](Self::complete) once, from any
/// thread. Dropped without completing (a store that lost the request, a worker that died), it
/// completes with [`StoreError::Stopped`], so a waiting handshake is never left hanging.
pub struct LookupDone {
    callback: Option<Callback>,
}

impl LookupDone {
    /// A completion that hands the result to `f`. `f` runs on the completing thread: it must be
    /// quick and must not block.
    pub fn new(f: impl FnOnce(Result<Option<StoredSession>, StoreError>) + Send + 'static) -> Self {
        Self {
            callback: Some(Box::new(f)),
        }
    }

    /// Delivers the result.
    pub fn complete(mut self, result: Result<Option<StoredSession>, StoreError>) {
        if let Some(f) = self.callback.take() {
            f(result);
        }
    }
}

impl Drop for LookupDone {
    fn drop(&mut self) {
        if let Some(f) = self.callback.take() {
            f(Err(StoreError::Stopped));
        }
    }
}

impl fmt::Debug for LookupDone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LookupDone")
            .field("completed", &self.callback.is_none())
            .finish_non_exhaustive()
    }
}

type PutCallback = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// The other end of a [`put_confirmed`](crate::SessionStore::put_confirmed): completed once,
/// from any thread, with `Ok` only when the write reached the store (a later `get` on any host
/// sees it). Dropped without completing, it completes with [`StoreError::Unavailable`]: a
/// write whose fate is unknown is never reported as done.
pub struct PutDone {
    callback: Option<PutCallback>,
}

impl PutDone {
    /// A completion that hands the result to `f`, which runs on the completing thread: it must
    /// be quick and must not block.
    pub fn new(f: impl FnOnce(Result<(), StoreError>) + Send + 'static) -> Self {
        Self {
            callback: Some(Box::new(f)),
        }
    }

    /// Delivers the result.
    pub fn complete(mut self, result: Result<(), StoreError>) {
        if let Some(f) = self.callback.take() {
            f(result);
        }
    }
}

impl Drop for PutDone {
    fn drop(&mut self) {
        if let Some(f) = self.callback.take() {
            f(Err(StoreError::Unavailable(
                "write dropped before it completed".into(),
            )));
        }
    }
}

impl fmt::Debug for PutDone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PutDone")
            .field("completed", &self.callback.is_none())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    #[test]
    fn completes_once_with_the_result() {
        let (tx, rx) = mpsc::channel();
        let done = LookupDone::new(move |r| tx.send(r.map(|s| s.is_some())).unwrap());
        done.complete(Ok(None));
        assert!(!rx.try_recv().unwrap().unwrap());
        assert!(rx.try_recv().is_err(), "completed twice");
    }

    #[test]
    fn a_put_dropped_uncompleted_is_never_reported_done() {
        let (tx, rx) = mpsc::channel();
        drop(PutDone::new(move |r| tx.send(r).unwrap()));
        assert!(matches!(
            rx.try_recv().unwrap(),
            Err(StoreError::Unavailable(_))
        ));
        let (tx, rx) = mpsc::channel();
        PutDone::new(move |r| tx.send(r).unwrap()).complete(Ok(()));
        assert!(rx.try_recv().unwrap().is_ok());
        assert!(rx.try_recv().is_err(), "completed twice");
    }

    #[test]
    fn dropped_uncompleted_it_reports_stopped() {
        let (tx, rx) = mpsc::channel();
        drop(LookupDone::new(move |r| tx.send(r).unwrap()));
        assert!(matches!(rx.try_recv().unwrap(), Err(StoreError::Stopped)));
    }
}
