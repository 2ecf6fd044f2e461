//! An external session cache and a DTLS peer session manager for OpenSSL-based servers.
#![deny(unsafe_code)]

mod clock;
mod error;
mod ffi;
mod stats;
mod store;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Error, StoreError};
pub use stats::{CacheStats, EvictionStats};
pub use store::{
    MemoryStore, MemoryStoreBuilder, NullStore, SessionId, SessionStore, StoredSession,
    MAX_SESSION_ID_LEN,
};

mod server;
/// TEMPORARY until the DSM and the session cache land on main.
pub use server::shim::{DsmConfig, SessionCache};
pub use server::{
    certificate_fingerprint, self_signed_certificate, CloseReason, DropReason, Endpoint,
    EndpointStats, Event, ServerConfig, ServerConfigBuilder, StopHandle, Transmit, UdpOptions,
    UdpServer, DEFAULT_COOKIE_ROTATION, DEFAULT_MAX_DATAGRAM, DEFAULT_MTU, PSK_CIPHERS,
};
