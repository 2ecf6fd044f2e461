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
    /// Any other backend failure.
    #[error("store backend: {0}")]
    Backend(String),
}
