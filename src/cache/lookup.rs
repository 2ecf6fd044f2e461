//! Lookups that do not hold up the handshake thread: the ClientHello callback starts them,
//! suspends the handshake, and the application drives it again once they complete.
//!
//! Stock OpenSSL 3.0 cannot suspend in the get-session callback, but its ClientHello callback
//! (`SSL_CTX_set_client_hello_cb`) may return `SSL_CLIENT_HELLO_RETRY`: the handshake call then
//! fails with `SSL_ERROR_WANT_CLIENT_HELLO_CB` and keeps its state. So, when the store is remote:
//! 1. the ClientHello callback reads the session id the client offers (the legacy session id, or
//!    for TLS 1.3 the first pre-shared-key identity), starts [`SessionStore::lookup`] and, unless
//!    the answer came at once (a tier hit), suspends the handshake;
//! 2. the store completes the lookup from its own thread; the result is parked on the connection
//!    and a [`Waker`] is woken;
//! 3. the application drives the handshake again; the ClientHello callback now lets it go on,
//!    and the get-session callback takes the parked result instead of asking the store.
//!
//! The parked result belongs to one connection (an `Ssl` ex_data slot), so a single-use session
//! taken for one connection is never served to another.
//!
//! [`SessionStore::lookup`]: crate::SessionStore::lookup

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use openssl::ssl::{Ssl, SslRef, SslVersion};
use parking_lot::Mutex;

use crate::error::StoreError;
use crate::ex_data::ex_data_index;
use crate::ffi;
use crate::store::{LookupMode, SessionId, StoredSession};

/// TLS extension numbers read from the ClientHello.
const EXT_PRE_SHARED_KEY: u16 = 41;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
/// The identity length of an OpenSSL stateful TLS 1.3 ticket (the only ones it looks up).
const TLS13_STATEFUL_ID_LEN: usize = 32;

/// Where a lookup stands.
pub(crate) enum Outcome {
    /// The store has not answered yet.
    Pending,
    /// The store answered; the get callback has not taken the answer yet.
    Done(Result<Option<StoredSession>, StoreError>),
    /// The get callback took the answer.
    Taken,
    /// The application gave up waiting: the handshake goes on as a full one.
    Abandoned,
}

/// One connection's lookup, shared by the connection (its ex_data), the store's completion and
/// the application's [`PendingLookup`] handles.
pub(crate) struct LookupState {
    pub(crate) id: SessionId,
    inner: Mutex<StateInner>,
}

struct StateInner {
    outcome: Outcome,
    wakers: Vec<Waker>,
}

impl LookupState {
    pub(crate) fn new(id: SessionId) -> Arc<Self> {
        Arc::new(Self {
            id,
            inner: Mutex::new(StateInner {
                outcome: Outcome::Pending,
                wakers: Vec::new(),
            }),
        })
    }

    /// Records the store's answer and wakes whoever waits (outside the lock). An answer after
    /// the application gave up is dropped.
    pub(crate) fn complete(&self, result: Result<Option<StoredSession>, StoreError>) {
        let wakers = {
            let mut inner = self.inner.lock();
            if !matches!(inner.outcome, Outcome::Pending) {
                return;
            }
            inner.outcome = Outcome::Done(result);
            std::mem::take(&mut inner.wakers)
        };
        for w in wakers {
            w.wake();
        }
    }

    /// Whether the handshake may go on (answered, taken or abandoned).
    pub(crate) fn is_settled(&self) -> bool {
        !matches!(self.inner.lock().outcome, Outcome::Pending)
    }

    /// Takes the answer for the get callback: what the store said, or `None` when the lookup
    /// was abandoned, is still pending or was taken already.
    pub(crate) fn take(&self) -> Option<Result<Option<StoredSession>, StoreError>> {
        let mut inner = self.inner.lock();
        match std::mem::replace(&mut inner.outcome, Outcome::Taken) {
            Outcome::Done(result) => Some(result),
            other => {
                inner.outcome = other;
                None
            }
        }
    }

    fn abandon(&self) -> bool {
        let wakers = {
            let mut inner = self.inner.lock();
            if !matches!(inner.outcome, Outcome::Pending) {
                return false;
            }
            inner.outcome = Outcome::Abandoned;
            std::mem::take(&mut inner.wakers)
        };
        for w in wakers {
            w.wake();
        }
        true
    }

    fn register(&self, waker: &Waker) -> bool {
        let mut inner = self.inner.lock();
        if !matches!(inner.outcome, Outcome::Pending) {
            return false;
        }
        if !inner.wakers.iter().any(|w| w.will_wake(waker)) {
            inner.wakers.push(waker.clone());
        }
        true
    }
}

/// What the cache keeps on a connection (`Ssl` ex_data).
#[derive(Default)]
pub(crate) struct ConnectionSlot {
    /// The lookup started by the ClientHello callback, if any.
    pub(crate) lookup: Option<Arc<LookupState>>,
    /// The get callback handed OpenSSL a session for this connection (to tell a resumption
    /// OpenSSL refused afterwards from one it accepted).
    pub(crate) handed_out: bool,
}

ex_data_index! {
    /// The `Ssl` ex_data index of the cache's [`ConnectionSlot`] (one for the process).
    pub(crate) fn slot_index() -> Index<Ssl, ConnectionSlot>
}

/// A session lookup a suspended handshake waits for, from [`SessionCache::pending_lookup`].
///
/// Wait for it in whatever way the application waits: as a [`Future`] (`.await` it in tokio),
/// or by [`register`](Self::register)ing a [`Waker`] (a std event loop supplies one that
/// interrupts its poll). Once it is [complete](Self::is_complete), drive the handshake again;
/// it resumes or, when the session was not found, goes on as a full handshake. To stop waiting
/// (a deadline of the application's own), call [`abandon`](Self::abandon) and drive the
/// handshake: it goes on as a full handshake.
///
/// [`SessionCache::pending_lookup`]: crate::SessionCache::pending_lookup
#[derive(Clone)]
pub struct PendingLookup {
    state: Arc<LookupState>,
}

impl PendingLookup {
    pub(crate) fn new(state: Arc<LookupState>) -> Self {
        Self { state }
    }

    /// Whether the handshake can be driven again.
    pub fn is_complete(&self) -> bool {
        self.state.is_settled()
    }

    /// Wakes `waker` when the lookup completes (at once if it has). Registering the same waker
    /// twice wakes it once.
    pub fn register(&self, waker: &Waker) {
        if !self.state.register(waker) {
            waker.wake_by_ref();
        }
    }

    /// Gives up waiting: the handshake goes on as a full one when driven next, and an answer
    /// arriving later is dropped. Returns false if the lookup had completed already.
    pub fn abandon(&self) -> bool {
        self.state.abandon()
    }

    /// The session id being looked up.
    pub fn session_id(&self) -> SessionId {
        self.state.id
    }
}

impl Future for PendingLookup {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.state.register(cx.waker()) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

impl fmt::Debug for PendingLookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingLookup")
            .field("id", &self.state.id)
            .field("complete", &self.is_complete())
            .finish()
    }
}

/// The session id the ClientHello on `ssl` asks OpenSSL to look up, and how: the first 32-byte
/// pre-shared-key identity when the connection will be TLS 1.3 (the legacy session id is then
/// random), the legacy session id otherwise (TLS 1.2, DTLS). Only meaningful inside the
/// ClientHello callback.
pub(crate) fn offered_id(ssl: &SslRef) -> Option<SessionId> {
    let dtls = ssl
        .client_hello_legacy_version()
        .is_some_and(|v| v == SslVersion::DTLS1 || v == SslVersion::DTLS1_2);
    if !dtls && will_be_tls13(ssl) {
        let ext = ffi::client_hello_ext(ssl, EXT_PRE_SHARED_KEY)?;
        return first_psk_identity(ext)
            .filter(|id| id.len() == TLS13_STATEFUL_ID_LEN)
            .and_then(|id| SessionId::new(id).ok())
            .filter(|id| !id.is_peer_state());
    }
    let id = ssl.client_hello_session_id()?;
    // A client never reads or takes a DTLS peer's shared record state.
    SessionId::new(id).ok().filter(|id| !id.is_peer_state())
}

/// Whether the client offers TLS 1.3 and this server may negotiate it.
fn will_be_tls13(ssl: &SslRef) -> bool {
    let offered = ffi::client_hello_ext(ssl, EXT_SUPPORTED_VERSIONS).is_some_and(|ext| {
        let Some((&len, list)) = ext.split_first() else {
            return false;
        };
        list.get(..usize::from(len))
            .is_some_and(|l| l.chunks_exact(2).any(|v| v == [0x03, 0x04]))
    });
    offered && ffi::max_proto_version(ssl).is_none_or(|v| v >= 0x0304)
}

/// The first identity of a `pre_shared_key` extension body (RFC 8446 §4.2.11).
fn first_psk_identity(ext: &[u8]) -> Option<&[u8]> {
    let list_len = usize::from(u16::from_be_bytes([*ext.first()?, *ext.get(1)?]));
    let list = ext.get(2..2 + list_len)?;
    let id_len = usize::from(u16::from_be_bytes([*list.first()?, *list.get(1)?]));
    list.get(2..2 + id_len)
}

/// What the store's lookup should do, given the cache's single-use setting.
pub(crate) fn mode(single_use: bool) -> LookupMode {
    if single_use {
        LookupMode::Take
    } else {
        LookupMode::Get
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn id() -> SessionId {
        SessionId::new(&[7; 32]).unwrap()
    }

    #[test]
    fn a_completed_lookup_wakes_each_waker_once_and_is_taken_once() {
        let state = LookupState::new(id());
        let pending = PendingLookup::new(state.clone());
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        pending.register(&waker);
        pending.register(&waker);
        assert!(!pending.is_complete());
        assert!(state.take().is_none(), "nothing to take while pending");
        state.complete(Ok(None));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(pending.is_complete());
        assert!(matches!(state.take(), Some(Ok(None))));
        assert!(state.take().is_none(), "taken twice");
        // Registering after completion wakes at once.
        pending.register(&waker);
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn an_abandoned_lookup_ignores_a_late_answer() {
        let state = LookupState::new(id());
        let pending = PendingLookup::new(state.clone());
        let count = Arc::new(Count(AtomicUsize::new(0)));
        pending.register(&Waker::from(count.clone()));
        assert!(pending.abandon());
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        state.complete(Ok(None));
        assert!(state.take().is_none());
        assert!(!pending.abandon(), "abandoned twice");
    }

    #[test]
    fn psk_identity_parsing_is_bounded() {
        // identities: len 6 = [id len 2]["ab"][age 4]; binders follow.
        let ext = [0, 8, 0, 2, b'a', b'b', 0, 0, 0, 1, 0, 33];
        assert_eq!(first_psk_identity(&ext), Some(&b"ab"[..]));
        for n in 0..ext.len() - 2 {
            let _ = first_psk_identity(&ext[..n]);
        }
        assert_eq!(first_psk_identity(&[0, 10, 0, 20, 1]), None);
        assert_eq!(first_psk_identity(&[]), None);
    }
}
