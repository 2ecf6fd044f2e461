//! The crate's error types.

use std::io;

use openssl::error::ErrorStack;

/// Errors from building or running the cache, the session manager and the DTLS server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// OpenSSL reported an error.
    #[error("openssl: {0}")]
    Ssl(#[from] ErrorStack),
    /// A session id was empty or longer than 32 bytes.
    #[error("invalid session id length {0} (must be 1..=32)")]
    InvalidSessionId(usize),
    /// A configuration value is out of range; the message says which.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The session store failed.
    #[error("session store: {0}")]
    Store(#[from] StoreError),
    /// An I/O error (sockets, files).
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// A TLS setting would break the DTLS server, so the configuration was refused.
    #[error("refused tls setting: {0}")]
    RefusedSetting(#[from] RefusedSetting),
    /// Sending to a peer failed.
    #[error("send: {0}")]
    Send(#[from] SendError),
    /// A server worker thread panicked (in the endpoint or in the application it runs).
    #[error("worker {worker} panicked: {message}")]
    WorkerPanic {
        /// Which worker (0-based).
        worker: usize,
        /// The panic message, if it was a string.
        message: String,
    },
}

/// A TLS setting the DTLS server refuses, because it would break what the server owns (the
/// record layer it screens, cookies, the session cache).
///
/// See [`ServerConfigBuilder`](crate::ServerConfigBuilder) for what the server sets itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RefusedSetting {
    /// The context was not made with a DTLS method (`SslMethod::dtls()` or `dtls_server()`).
    #[error("the context is not dtls (make it with SslMethod::dtls_server())")]
    NotDtls,
    /// The context's highest protocol version is not DTLS 1.2 (the server speaks DTLS 1.2 only).
    #[error("maximum protocol version {0} (the server speaks dtls 1.2 only)")]
    MaxVersion(String),
    /// The cipher list given to [`ciphers`](crate::ServerConfigBuilder::ciphers) enables no
    /// cipher suite.
    #[error("cipher list {0:?} enables no cipher suite")]
    NoCiphers(String),
}

/// Why [`Endpoint::restore`](crate::Endpoint::restore) refused a saved peer (nothing changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// Its session's lifetime is over.
    #[error("the saved peer's session expired")]
    Expired,
    /// It was made by a server with another certificate, for a PSK identity whose key is not
    /// the one it had (or that is unknown now), or with connection IDs this server does not use.
    #[error("the saved peer belongs to another server identity")]
    Foreign,
    /// Its address or connection ID belongs to a peer already.
    #[error("the saved peer's address or connection id is in use")]
    Occupied,
    /// The DSM has no slot for it.
    #[error("no slot for the saved peer")]
    NoSpace,
}

/// Why [`Endpoint::send`](crate::Endpoint::send) refused to send.
///
/// Nothing was sent and nothing changed for any peer, except with [`Failed`](Self::Failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No peer has this address: it never connected, or it was closed (an
    /// [`Event::Closed`](crate::Event::Closed) said so).
    #[error("unknown peer")]
    UnknownPeer,
    /// The peer's handshake has not finished yet (wait for
    /// [`Event::Connected`](crate::Event::Connected)).
    #[error("handshake not finished")]
    NotConnected,
    /// The peer already has as many datagrams waiting for
    /// [`poll_transmit`](crate::Endpoint::poll_transmit) as
    /// [`send_queue`](crate::ServerConfigBuilder::send_queue) allows; try again after the driver
    /// sent them.
    #[error("send queue full")]
    QueueFull,
    /// More than one DTLS record holds ([`MAX_RECORD_PLAINTEXT`](crate::MAX_RECORD_PLAINTEXT)).
    #[error("message larger than one record")]
    TooLarge,
    /// OpenSSL failed to write the record; the peer was closed
    /// ([`CloseReason::Failed`](crate::CloseReason::Failed)).
    #[error("the connection failed")]
    Failed,
    /// The server is stopped, or the worker holding the peer has ended (a send through a
    /// server's handle, [`StopHandle::send`](crate::StopHandle::send)).
    #[error("server stopped")]
    Stopped,
}

/// Errors from a [`SessionStore`](crate::SessionStore).
///
/// The session callbacks never pass these to OpenSSL: a failed lookup is a cache miss (a full
/// handshake) and a failed insert is a session that will not resume. They are counted in
/// [`CacheStats::store_errors`](crate::CacheStats::store_errors).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend cannot be reached (connection refused, circuit breaker open).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend did not answer in time.
    #[error("store timed out")]
    Timeout,
    /// A stored value could not be read back (bad envelope, failed authentication, truncated).
    #[error("stored value is corrupt: {0}")]
    Corrupt(String),
    /// A write-behind store's queue was full: the write was dropped (and counted).
    #[error("store write queue full: write dropped")]
    QueueFull,
    /// The session is larger than the store's byte bound, so it can never be stored: it was
    /// refused and nothing was evicted for it.
    #[error("session of {len} bytes is larger than the store's {max}-byte bound")]
    TooLarge {
        /// The session's size in bytes.
        len: usize,
        /// The store's byte bound.
        max: usize,
    },
    /// A conditional write or removal ([`SessionStore::put_if`](crate::SessionStore::put_if))
    /// found another version stored (or none): nothing was changed.
    #[error("stored version changed: nothing written")]
    Conflict,
    /// Any other backend failure.
    #[error("store backend: {0}")]
    Backend(String),
}
