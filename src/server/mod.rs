//! A DTLS 1.2 echo server on the session cache and the DSM.
//!
//! [`Endpoint`] is sans-IO, shaped like quinn-proto's: datagrams and the current time go in;
//! datagrams to send ([`Transmit`]), [`Event`]s and the next deadline come out. [`UdpServer`] is
//! the std UDP loop that drives endpoints on worker threads; any other loop (tokio, a test) can
//! drive an endpoint the same way.
//!
//! How a datagram from a new peer is handled:
//! 1. A ClientHello without a valid cookie gets a HelloVerifyRequest with an HMAC cookie of the
//!    peer's address, built without creating any state (no `Ssl`, no DSM slot).
//! 2. A ClientHello with a valid cookie asks the DSM for a handshake slot; refused, it is dropped
//!    and counted. Admitted, it gets its own `Ssl` (MTU set, `NO_QUERY_MTU`) over an in-memory
//!    datagram pipe, and OpenSSL verifies the cookie again before it looks up a session.
//! 3. The handshake finishes (a resumption hits the session cache); the peer becomes established
//!    in the DSM and each application record is echoed back, touching the peer.
//! 4. close_notify, the DSM's idle sweep or an eviction close the peer with close_notify, so its
//!    session stays resumable; a stalled handshake is freed by the handshake timeout.

mod config;
mod cookie;
mod endpoint;
mod peer;
mod record;
mod udp;

pub use config::{
    certificate_fingerprint, self_signed_certificate, ServerConfig, ServerConfigBuilder,
    DEFAULT_COOKIE_ROTATION, DEFAULT_MAX_DATAGRAM, DEFAULT_MTU, PSK_CIPHERS,
};
pub use endpoint::{CloseReason, DropReason, Endpoint, EndpointStats, Event, Transmit};
pub use udp::{StopHandle, UdpOptions, UdpServer};
