//! What an [`Endpoint`](crate::Endpoint) hands out: datagrams to send ([`Transmit`]), events for
//! the application ([`Event`]) with what a handshake settled ([`ConnectionInfo`]), and why a peer
//! was closed ([`CloseReason`]) or a datagram dropped ([`DropReason`]).

use std::net::SocketAddr;
use std::time::Duration;

use openssl::ssl::SslRef;
use openssl::x509::X509;

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub to: SocketAddr,
    /// The whole datagram.
    pub payload: Vec<u8>,
}

/// What the handshake of a peer settled, reported by [`Event::Connected`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ConnectionInfo {
    /// Whether it resumed a cached session (an abbreviated handshake).
    pub resumed: bool,
    /// The negotiated cipher suite, in OpenSSL's naming (`ECDHE-ECDSA-AES128-GCM-SHA256`).
    pub cipher: &'static str,
    /// The client's certificate, when the policy asked for one (mutual DTLS) and the client sent
    /// it; on a resumption, the certificate of the session's original handshake.
    pub peer_certificate: Option<X509>,
    /// The PSK identity the client used, for PSK suites (on a resumption too).
    pub psk_identity: Option<Vec<u8>>,
    /// How long the handshake took: from the ClientHello whose cookie verified to the datagram
    /// that finished it (by the times the driver handed the endpoint); zero for a restored peer.
    pub handshake_time: Duration,
    /// The association was not made now but restored from a saved state (after a restart,
    /// [`Endpoint::restore`](crate::Endpoint::restore)): no handshake took place; the rest
    /// reports the original handshake.
    pub restored: bool,
}

impl ConnectionInfo {
    /// What `ssl`, whose handshake just finished, settled; `handshake_time` as measured by the
    /// endpoint.
    pub(crate) fn from_ssl(ssl: &SslRef, handshake_time: Duration) -> Self {
        Self {
            resumed: ssl.session_reused(),
            cipher: ssl.current_cipher().map_or("", |c| c.name()),
            peer_certificate: ssl.peer_certificate(),
            psk_identity: ssl.psk_identity().map(<[u8]>::to_vec),
            handshake_time,
            restored: false,
        }
    }
}

/// Something that happened, from [`Endpoint::poll_event`](crate::Endpoint::poll_event).
///
/// Every peer that reports [`Connected`](Self::Connected) later reports exactly one
/// [`Closed`](Self::Closed), after its last [`Data`](Self::Data). A peer whose handshake never
/// finished may report `Closed` without `Connected`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A handshake finished: the peer can send and be sent to.
    Connected {
        /// The peer.
        peer: SocketAddr,
        /// What the handshake settled.
        info: ConnectionInfo,
    },
    /// One application record from the peer (authenticated and decrypted).
    Data {
        /// The peer.
        peer: SocketAddr,
        /// The record's plaintext.
        data: Vec<u8>,
    },
    /// A peer's state was freed; sending to it now fails with
    /// [`SendError::UnknownPeer`](crate::SendError::UnknownPeer).
    Closed {
        /// The peer.
        peer: SocketAddr,
        /// Why.
        reason: CloseReason,
    },
    /// A peer with a connection ID (RFC 9146) now talks from another address (a NAT rebinding, a
    /// move between networks): a record from `peer` authenticated and was newer than every one
    /// before. From now on its events carry `peer`, and [`Endpoint::send`](crate::Endpoint::send)
    /// takes `peer`, not `previous`; answers go to `peer`.
    Migrated {
        /// The peer's new address.
        peer: SocketAddr,
        /// The address it had.
        previous: SocketAddr,
    },
    /// A datagram was dropped without creating or touching any peer state.
    Dropped {
        /// Its source.
        from: SocketAddr,
        /// Why.
        reason: DropReason,
    },
}

/// Why a peer's state was freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The peer sent close_notify (answered; the session stays resumable).
    CloseNotify,
    /// The application called [`Endpoint::close`](crate::Endpoint::close) (close_notify sent;
    /// the session stays resumable).
    Local,
    /// The connection failed (handshake failure, too many retransmissions, a fatal alert).
    Failed,
    /// The handshake did not finish within the DSM's handshake timeout.
    HandshakeTimeout,
    /// The peer sent nothing for the DSM's idle period (shut down; the session stays resumable).
    Idle,
    /// The DSM evicted the peer to make room (shut down; the session stays resumable).
    Evicted,
    /// The same address started a new handshake with a valid cookie (RFC 6347 §4.2.8).
    Replaced,
    /// [`Endpoint::close_all`](crate::Endpoint::close_all) (server shutdown).
    Shutdown,
    /// [`Endpoint::suspend_all`](crate::Endpoint::suspend_all): taken out to be carried across a
    /// restart, without a word to the peer (its client keeps the association).
    Suspended,
    /// A shared peer (`shared_peers`) another host took over: this host's conditional write of
    /// its state found another host's version in the store. Freed without a word to the peer
    /// and without touching the store (the other host serves it now).
    LeaseLost,
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// Not a DTLS record, or a malformed one.
    Garbage,
    /// From an unknown peer and not a ClientHello.
    NotClientHello,
    /// A ClientHello fragmented over several records (not supported).
    Fragmented,
    /// Larger than the configured maximum datagram size.
    Oversize,
    /// A ClientHello whose message or record sequence numbers cannot follow a cookie exchange.
    BadSequence,
    /// The DSM had no slot, handshake budget or per-source quota left.
    NoSpace,
    /// For a known peer, but holding no record OpenSSL should see (empty, truncated, or a
    /// protected record too short to be genuine): discarded unread, as RFC 6347 §4.1.2.7 says.
    Invalid,
    /// For a peer whose handshake waits for a session lookup and already has
    /// [`parked_datagrams`](crate::ServerConfigBuilder::parked_datagrams) waiting.
    Parked,
    /// For a peer in its handshake, holding only records over what one handshake may make
    /// OpenSSL buffer (64 KiB of claimed handshake messages, 4 early protected records).
    OverBudget,
    /// A `tls12_cid` record whose connection ID is no peer's.
    UnknownConnectionId,
}
