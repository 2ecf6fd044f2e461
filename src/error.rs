//! The crate's error types.

use std::fmt;
use std::io;
use std::path::PathBuf;

use openssl::error::ErrorStack;

/// Errors from building or running the cache, the session manager and the DTLS server.
///
/// Grouped by what a caller does about them: fix a setting ([`InvalidSetting`](Self::InvalidSetting),
/// [`InvalidUrl`](Self::InvalidUrl), [`InvalidKeys`](Self::InvalidKeys),
/// `RefusedSetting`), fix or replace a file ([`ReadFile`](Self::ReadFile),
/// [`RefusedFile`](Self::RefusedFile), [`InvalidFile`](Self::InvalidFile),
/// [`InvalidPem`](Self::InvalidPem), each naming the file), or look at the store, OpenSSL or
/// the system ([`Store`](Self::Store), [`Ssl`](Self::Ssl), [`Io`](Self::Io)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// OpenSSL reported an error.
    #[error("openssl: {0}")]
    Ssl(#[from] ErrorStack),
    /// A session id was empty or longer than 32 bytes.
    #[error("invalid session id length {0} (must be 1..=32)")]
    InvalidSessionId(usize),
    /// A builder setting is out of range or contradicts another one.
    #[error("invalid configuration: {reason}")]
    InvalidSetting {
        /// The builder method (or config field) whose value was refused, e.g. `"mtu"`,
        /// `"max_slots"`, `"workers"`; for two settings that cannot go together, the one
        /// named in the reason first.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A store URL does not parse, or names something this build or this store cannot use.
    #[error("store url {url}: {reason}")]
    InvalidUrl {
        /// The URL, its password replaced by `***`.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A key ring's keys were refused (a malformed key file line, a repeated key id, no key).
    #[error("invalid key ring: {0}")]
    InvalidKeys(String),
    /// A file could not be opened or read (`source().kind()` is `NotFound` when there is
    /// none).
    #[error("cannot read {kind} {}: {source}", path.display())]
    ReadFile {
        /// What the file was to hold.
        kind: FileKind,
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A path was refused before it was read: it is not a regular file (a FIFO, a device, a
    /// directory), a symbolic link where none is followed, or larger than allowed.
    #[error("{kind} {} refused: {reason}", path.display())]
    RefusedFile {
        /// What the file was to hold.
        kind: FileKind,
        /// The path given.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// A file was read but its contents are refused: malformed, truncated, sealed under a key
    /// the key ring does not hold (a foreign snapshot), or without the certificate it should
    /// hold.
    #[error("{kind} {} refused: {reason}", path.display())]
    InvalidFile {
        /// What the file was to hold.
        kind: FileKind,
        /// The path given.
        path: PathBuf,
        /// What is wrong with its contents.
        reason: String,
    },
    /// OpenSSL could not parse a file's PEM certificates.
    #[error("{kind} {}: {source}", path.display())]
    InvalidPem {
        /// What the file was to hold.
        kind: FileKind,
        /// The path given.
        path: PathBuf,
        /// OpenSSL's error.
        #[source]
        source: ErrorStack,
    },
    /// The session store failed.
    #[error("session store: {0}")]
    Store(#[from] StoreError),
    /// An I/O error (sockets, writing files, threads).
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// A TLS setting would break the DTLS server, so the configuration was refused.
    #[cfg(feature = "server")]
    #[error("refused tls setting: {0}")]
    RefusedSetting(#[from] RefusedSetting),
    /// A server worker thread panicked (in the endpoint or in the application it runs).
    #[cfg(feature = "server")]
    #[error("worker {worker} panicked: {message}")]
    WorkerPanic {
        /// Which worker (0-based).
        worker: usize,
        /// The panic message, if it was a string.
        message: String,
    },
}

impl Error {
    /// An [`InvalidSetting`](Self::InvalidSetting).
    pub(crate) fn setting(setting: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidSetting {
            setting,
            reason: reason.into(),
        }
    }
}

/// What a file named in an [`Error`] was to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileKind {
    /// A key ring's key file ([`KeyRing::from_file`](crate::KeyRing::from_file)).
    KeyFile,
    /// Trusted client CA certificates
    /// ([`ServerConfigBuilder::client_ca_file`](crate::ServerConfigBuilder::client_ca_file)).
    #[cfg(feature = "server")]
    ClientCa,
    /// The CA certificates a `rediss://` store trusts.
    RedisCa,
    /// A session snapshot ([`load_snapshot`](crate::snapshot::load_snapshot)).
    Snapshot,
    /// The peers a graceful restart saved ([`take_peers`](crate::take_peers)).
    #[cfg(feature = "server")]
    SavedPeers,
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::KeyFile => "key file",
            #[cfg(feature = "server")]
            Self::ClientCa => "client ca file",
            Self::RedisCa => "redis ca file",
            Self::Snapshot => "snapshot",
            #[cfg(feature = "server")]
            Self::SavedPeers => "saved peers",
        })
    }
}

/// A TLS setting the DTLS server refuses, because it would break what the server owns (the
/// record layer it screens, cookies, the session cache).
///
/// See [`ServerConfigBuilder`](crate::ServerConfigBuilder) for what the server sets itself.
#[cfg(feature = "server")]
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
#[cfg(feature = "server")]
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
#[cfg(feature = "server")]
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
    /// The backend cannot be reached (connection refused or dropped, a TLS failure); the
    /// message says why.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store's circuit breaker is open after repeated failures: the backend was not asked.
    #[error("store unavailable: circuit breaker open, backend skipped")]
    BreakerOpen,
    /// A blocking call was made on the store's own background thread, where it would wait for
    /// itself; use [`SessionStore::lookup`](crate::SessionStore::lookup) there.
    #[error("blocking store call on the store's own background thread")]
    OwnThread,
    /// The store stopped (its background thread is gone), or dropped a lookup before it
    /// completed.
    #[error("store stopped before the operation completed")]
    Stopped,
    /// The backend did not answer in time.
    #[error("store timed out")]
    Timeout,
    /// A stored value is malformed (truncated, another format or version).
    #[error("stored value is corrupt: {0}")]
    Corrupt(String),
    /// A stored value is sealed with a key id the key ring does not hold (a value from another
    /// farm, or a key retired too early).
    #[error("stored value sealed with unknown key id {key_id}")]
    UnknownKey {
        /// The key id the value names.
        key_id: u32,
    },
    /// A stored value failed authentication under the key its id names: tampered, moved to
    /// another session id, or sealed with another key under the same id.
    #[error(
        "stored value failed authentication under key id {key_id} (tampered, moved, or another key)"
    )]
    Unauthentic {
        /// The key id the value names.
        key_id: u32,
    },
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
    /// OpenSSL failed to seal a value (no randomness, cipher unavailable).
    #[error("sealing a stored value: {0}")]
    Seal(#[source] ErrorStack),
    /// The backend answered with an error (e.g. a refused password, an unexpected reply).
    #[error("store backend: {0}")]
    Backend(String),
}
