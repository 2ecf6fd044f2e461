//! An external session cache and a DTLS peer session manager for OpenSSL-based servers.
#![deny(unsafe_code)]

mod cache;
mod clock;
mod error;
mod ffi;
mod stats;
mod store;

pub use cache::client::ClientSessionCache;
pub use cache::{SessionCache, SessionCacheBuilder, DEFAULT_SESSION_ID_CONTEXT};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Error, StoreError};
pub use stats::{CacheStats, EvictionStats};
pub use store::{
    MemoryStore, MemoryStoreBuilder, NullStore, SessionId, SessionStore, StoredSession,
    MAX_SESSION_ID_LEN,
};
