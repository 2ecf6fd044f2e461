//! The application's side of a server: what it is told ([`Event`]s) and what it may do
//! ([`AppContext`]: send, close).

use std::net::SocketAddr;
use std::task::Waker;
use std::time::Instant;

use super::endpoint::Endpoint;
use super::event::Event;
use super::stats::EndpointStats;
use crate::SendError;

/// Application logic run by a driver ([`UdpServer`](crate::UdpServer)) on each of its endpoints.
///
/// The driver calls [`on_event`](Self::on_event) with every event of the endpoint, in order,
/// right after the datagram or timeout that caused it, and sends what the application queued
/// through the [`AppContext`] before it reads the next datagram. Each worker has its own
/// instance; a peer always stays on one worker.
///
/// Any `FnMut(&mut AppContext<'_>, Event)` is an application:
///
/// ```
/// use openssl_session_cache::{AppContext, Application, Event};
///
/// // Replies to every message in upper case.
/// let upper = |ctx: &mut AppContext<'_>, event: Event| {
///     if let Event::Data { peer, data } = event {
///         let _ = ctx.send(peer, &data.to_ascii_uppercase());
///     }
/// };
/// # fn is_app(_: &impl Application) {}
/// # is_app(&upper);
/// ```
///
/// # Sending from other threads: a channel and the waker
///
/// The application runs inside its worker's loop, on the worker's thread (or task): it must
/// not block, and nothing else can call it. Other threads reach the peers in one of two ways.
///
/// - **One record to one peer:** [`StopHandle::send`](crate::StopHandle::send) (on tokio,
///   `TokioHandle::send`) queues it for the worker that holds the peer and wakes that worker,
///   which sends it. The handle is `Clone + Send`; it knows a peer from its
///   [`Event::Connected`] to its [`Event::Closed`], at its current address.
/// - **Anything that needs the application's state** (a broadcast to its peers, a reply
///   computed elsewhere): give each worker's application the receiving end of a channel; the
///   other thread sends into the channels, *then* wakes the workers through their wakers
///   ([`UdpServer::wakers`](crate::UdpServer::wakers), the ones the endpoints have,
///   [`Endpoint::set_waker`]). Each woken worker runs [`Endpoint::handle_timeout`] and then
///   [`on_wake`](Self::on_wake), where the application drains its channel and sends through its
///   [`AppContext`]. Wakes that arrive before the worker gets to them make one call, so
///   `on_wake` takes everything waiting, not one message per wake. A wake is one `eventfd`
///   write (std) or a `Notify` (tokio); nothing polls.
///
/// [`AppContext::worker`] tells which worker an application runs on.
///
/// ```no_run
/// use std::net::SocketAddr;
/// use std::sync::mpsc;
/// use openssl_session_cache::{
///     AppContext, Application, Event, ServerConfig, SessionCache, UdpOptions, UdpServer,
/// };
///
/// /// Sends every line from its channel to each peer of its worker.
/// struct Broadcast {
///     lines: mpsc::Receiver<String>,
///     peers: Vec<SocketAddr>,
/// }
///
/// impl Application for Broadcast {
///     fn on_event(&mut self, _: &mut AppContext<'_>, event: Event) {
///         match event {
///             Event::Connected { peer, .. } => self.peers.push(peer),
///             Event::Migrated { peer, previous } => {
///                 self.peers.retain(|p| *p != previous);
///                 self.peers.push(peer);
///             }
///             Event::Closed { peer, .. } => self.peers.retain(|p| *p != peer),
///             _ => {}
///         }
///     }
///
///     fn on_wake(&mut self, ctx: &mut AppContext<'_>) {
///         for line in self.lines.try_iter() {
///             for &peer in &self.peers {
///                 let _ = ctx.send(peer, line.as_bytes());
///             }
///         }
///     }
/// }
///
/// let config = ServerConfig::builder(SessionCache::builder().build()?).build()?;
/// let mut options = UdpOptions::new("127.0.0.1:4433".parse()?);
/// options.workers = 2;
/// let mut senders = Vec::new();
/// let server = UdpServer::spawn(config, options, || {
///     let (tx, rx) = mpsc::channel();
///     senders.push(tx);
///     Broadcast { lines: rx, peers: Vec::new() }
/// })?;
/// let wakers = server.wakers().to_vec();
/// std::thread::spawn(move || loop {
///     std::thread::sleep(std::time::Duration::from_secs(2));
///     // The message first, then the wake: a worker woken first could find nothing.
///     for tx in &senders {
///         let _ = tx.send("tick".to_owned());
///     }
///     for w in &wakers {
///         w.wake_by_ref();
///     }
/// });
/// server.wait()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # A worker that panics
///
/// A panic in `on_event` or `on_wake` ends that worker (its peers are gone; sends to them are
/// refused with [`SendError::Stopped`]) and is reported at once:
/// [`StopHandle::wait_failure`](crate::StopHandle::wait_failure) returns it, and
/// [`UdpServer::wait`](crate::UdpServer::wait) returns it after shutting the other workers
/// down (the same on tokio).
///
/// # Renegotiation is refused
///
/// An established peer that starts a new handshake (a ClientHello under its current keys) is
/// answered with a `no_renegotiation` warning alert, as OpenSSL 3 answers a client's
/// renegotiation by default, and nothing else changes: the peer keeps its association and
/// keys, and the application sees no event (counted in
/// [`EndpointStats::renegotiations_refused`](crate::EndpointStats::renegotiations_refused) for
/// lean peers). OpenSSL's own client then gives up with a fatal alert, which closes the peer
/// ([`CloseReason::Failed`](crate::CloseReason::Failed)) and its session. To get new keys, a
/// client closes and resumes. Lean peers always refuse; for the peers that keep their `Ssl`
/// (CBC suites, [`lean_peers(false)`](crate::ServerConfigBuilder::lean_peers)) the refusal is
/// OpenSSL's default, so a [`configure`](crate::ServerConfigBuilder::configure) closure must not
/// set `SSL_OP_ALLOW_CLIENT_RENEGOTIATION`.
pub trait Application {
    /// Handles one event.
    fn on_event(&mut self, ctx: &mut AppContext<'_>, event: Event);

    /// Runs after the driver was woken through the endpoint's waker (see
    /// [`Endpoint::set_waker`]; [`UdpServer::wakers`](crate::UdpServer::wakers) hands it out),
    /// called [`Endpoint::handle_timeout`] and sent what the server's handle queued: the place
    /// to send what other threads prepared, such as the messages in a channel (see the trait's
    /// docs). Does nothing by default.
    fn on_wake(&mut self, ctx: &mut AppContext<'_>) {
        let _ = ctx;
    }
}

impl<F: FnMut(&mut AppContext<'_>, Event)> Application for F {
    fn on_event(&mut self, ctx: &mut AppContext<'_>, event: Event) {
        self(ctx, event);
    }
}

/// What an [`Application`] may do with the endpoint: send, close, look.
#[derive(Debug)]
pub struct AppContext<'a> {
    endpoint: &'a mut Endpoint,
    now: Instant,
    worker: usize,
}

impl<'a> AppContext<'a> {
    /// A context on `endpoint` at `now`, on worker 0 (for drivers of one's own; see
    /// [`with_worker`](Self::with_worker)).
    pub fn new(endpoint: &'a mut Endpoint, now: Instant) -> Self {
        Self {
            endpoint,
            now,
            worker: 0,
        }
    }

    /// The same context, on worker `worker` (what [`worker`](Self::worker) reports).
    #[must_use]
    pub fn with_worker(mut self, worker: usize) -> Self {
        self.worker = worker;
        self
    }

    /// The index of the worker running the application (0-based, in the order of the driver's
    /// [`wakers`](crate::StopHandle::wakers)): each worker has its own application, endpoint and
    /// peers, and a peer stays on one worker.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// [`Endpoint::send`]: one record to `peer`, or the reason it was refused.
    pub fn send(&mut self, peer: SocketAddr, data: &[u8]) -> Result<(), SendError> {
        self.endpoint.send(peer, data)
    }

    /// [`Endpoint::close`]: close_notify to `peer` and free it; whether it was there.
    pub fn close(&mut self, peer: SocketAddr) -> bool {
        self.endpoint.close(peer)
    }

    /// [`Endpoint::is_connected`].
    pub fn is_connected(&self, peer: SocketAddr) -> bool {
        self.endpoint.is_connected(peer)
    }

    /// The time the driver handed the endpoint with this batch of events.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The endpoint's counters.
    pub fn stats(&self) -> EndpointStats {
        self.endpoint.stats()
    }

    /// The endpoint's waker ([`Endpoint::set_waker`]), to wake the driver from another thread.
    pub fn waker(&self) -> Option<&Waker> {
        self.endpoint.waker()
    }
}

/// Hands every queued event of `endpoint` to `app`, including events that `app`'s own calls
/// cause (a close); returns how many. Drivers call it after [`Endpoint::handle`] and
/// [`Endpoint::handle_timeout`], before they send.
pub fn deliver_events<A: Application + ?Sized>(
    endpoint: &mut Endpoint,
    app: &mut A,
    now: Instant,
) -> usize {
    let mut n = 0;
    while let Some(event) = endpoint.poll_event() {
        n += 1;
        app.on_event(&mut AppContext::new(endpoint, now), event);
    }
    n
}
