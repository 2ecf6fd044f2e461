//! An external session cache and a DTLS peer session manager for OpenSSL-based servers.
#![deny(unsafe_code)]

mod clock;
mod dsm;
mod error;
mod stats;
mod store;

pub use clock::{Clock, ManualClock, SystemClock};
pub use dsm::{
    Authenticated, Dsm, DsmConfig, DsmStats, FreeReason, PeerKey, PeerState, SocketPeer,
    StoreOutcome, Sweeper, DEFAULT_MAX_SLOTS,
};
pub use error::{Error, StoreError};
pub use stats::{CacheStats, EvictionStats};
pub use store::{MemoryStore, MemoryStoreBuilder, NullStore, SessionId, SessionStore, StoredSession, MAX_SESSION_ID_LEN};
