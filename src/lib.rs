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
pub use store::envelope;
pub use store::snapshot;
pub use store::{
    load_snapshot, save_snapshot, store_from_url, KeyRing, MemoryStore, MemoryStoreBuilder,
    NullStore, SessionId, SessionStore, StoredSession, MAX_SESSION_ID_LEN,
};
#[cfg(feature = "redis")]
pub use store::{RedisStore, RedisStoreBuilder, RedisStoreStats};
