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
pub trait Application {
    /// Handles one event.
    fn on_event(&mut self, ctx: &mut AppContext<'_>, event: Event);

    /// Runs after the driver was woken through the endpoint's waker (see
    /// [`Endpoint::set_waker`]; [`UdpServer::wakers`](crate::UdpServer::wakers) hands it out) and
    /// called [`Endpoint::handle_timeout`]: the place to send what other threads prepared, such
    /// as a message from a channel. Does nothing by default.
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
}

impl<'a> AppContext<'a> {
    /// A context on `endpoint` at `now` (for drivers of one's own).
    pub fn new(endpoint: &'a mut Endpoint, now: Instant) -> Self {
        Self { endpoint, now }
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
