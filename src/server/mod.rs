//! A DTLS 1.2 server library on the session cache and the DSM.
//!
//! [`Endpoint`] is sans-IO, shaped like quinn-proto's: datagrams and the current time go in;
//! datagrams to send ([`Transmit`]), [`Event`]s for the application and the next deadline come
//! out, and the application answers with [`Endpoint::send`] and [`Endpoint::close`].
//! [`UdpServer`] is the std UDP driver that runs endpoints and an [`Application`] on worker
//! threads; `TokioServer` (feature `tokio`) runs the same application on tokio tasks; any other
//! loop (a test) can drive an endpoint the same way. Both drivers batch their UDP I/O
//! ([`IoMode`]) and, with the feature `metrics`, publish their counters through the `metrics`
//! facade.
//! [`DatagramPipe`] is the in-memory datagram stream every peer's `Ssl` runs over, public so that
//! tests can drive DTLS clients the same way.
//!
//! How a datagram from a new peer is handled:
//! 1. A ClientHello without a valid cookie gets a HelloVerifyRequest with an HMAC cookie of the
//!    peer's address, built without creating any state (no `Ssl`, no DSM slot).
//! 2. A ClientHello with a valid cookie asks the DSM for a handshake slot; refused, it is dropped
//!    and counted. Admitted, it gets its own `Ssl` (MTU set, `NO_QUERY_MTU`) over a
//!    [`DatagramPipe`], and OpenSSL verifies the cookie again before it looks up a session.
//! 3. The handshake finishes (a resumption hits the session cache): [`Event::Connected`]; the
//!    peer becomes established in the DSM and each application record is an [`Event::Data`],
//!    touching the peer.
//! 4. close_notify, [`Endpoint::close`], the DSM's idle sweep or an eviction close the peer with
//!    close_notify, so its session stays resumable ([`Event::Closed`]); a stalled handshake is
//!    freed by the handshake timeout.

mod app;
pub(crate) mod cid;
mod config;
pub(crate) mod continuity;
pub(crate) mod cookie;
mod driver;
mod endpoint;
mod event;
mod io;
mod lean;
mod lease;
#[cfg(feature = "metrics")]
mod metrics;
mod peer;
mod pipe;
pub(crate) mod record;
mod router;
mod stats;
#[cfg(test)]
mod testing;
mod timers;
#[cfg(feature = "tokio")]
mod tokio;
mod udp;

#[cfg(feature = "tokio")]
pub use self::tokio::{TokioHandle, TokioServer};
pub use app::{deliver_events, AppContext, Application};
pub use cid::MAX_CONNECTION_ID_HOST;
pub use config::{
    certificate_fingerprint, rate_ccm8_by_key_size, self_signed_certificate, ServerConfig,
    ServerConfigBuilder, DEFAULT_CIPHERS, DEFAULT_COOKIE_ROTATION, DEFAULT_LOOKUP_TIMEOUT,
    DEFAULT_MAX_DATAGRAM, DEFAULT_MTU, DEFAULT_PARKED_DATAGRAMS, DEFAULT_SEND_QUEUE,
    MAX_RECORD_PLAINTEXT, PSK_CIPHERS,
};
pub use continuity::{save_peers, take_peers, SuspendedPeer};
pub use endpoint::Endpoint;
pub use event::{CloseReason, ConnectionInfo, DropReason, Event, Transmit};
pub use io::{IoMode, IoStats};
#[cfg(feature = "metrics")]
pub use metrics::{HANDSHAKE_DURATION_BUCKETS, HANDSHAKE_DURATION_METRIC};
pub use pipe::DatagramPipe;
pub use stats::EndpointStats;
pub use udp::{StopHandle, UdpOptions, UdpServer};
