//! An external session cache and a DTLS peer session manager for OpenSSL-based servers.
//!
//! OpenSSL leaves two things to a DTLS (or TLS) server: where its sessions live, and how many
//! peers it holds state for. This crate gives it both:
//!
//! - [`SessionCache`] installs OpenSSL's new/get/remove session callbacks on an
//!   `SslContextBuilder` and keeps serialized sessions in a [`SessionStore`]: bounded by entries
//!   and bytes with LRU eviction, honouring each session's timeout, zeroizing secrets, and counting
//!   every hit, miss, expiry, eviction and reject ([`CacheStats`]). Contexts that share a cache
//!   share sessions. Every lookup applies today's policy (lifetime, cipher list, PSK keys, the
//!   application's veto: [`SessionInfo`]), and OpenSSL always gets a session object of its own.
//!   [`ClientSessionCache`] does the client side.
//! - **Remote stores never block a handshake.** A store that says it is remote is asked only
//!   through [`SessionStore::lookup`], from OpenSSL's ClientHello callback, which suspends the
//!   handshake until the answer is in; the application waits on a [`PendingLookup`] (a `Future`,
//!   or a `Waker`), the DTLS [`Endpoint`] parks the peer and serves everyone else.
//! - [`TicketKeys`]: session ticket keys derived per epoch from a key file with HKDF, the same on
//!   every host of a farm, rotating by themselves and reloadable at runtime.
//! - [`MemoryStore`] is the default store; [`NullStore`] stores nothing; with the `redis` feature a
//!   shared, encrypted store serves server farms ([`KeyRing`], [`envelope`]); [`snapshot`]
//!   carries the memory store across restarts.
//! - [`Dsm`](dsm::Dsm), the DTLS session manager (after RIOT's `dsm`), bounds what peers can make a server
//!   hold: a fixed number of slots with states NONE/HANDSHAKE/ESTABLISHED and `NO_SPACE` when full,
//!   a separate handshake budget and timeout, a per-source quota, LRU eviction of idle peers, and
//!   a second-chance idle sweeper. Only [`Authenticated`](dsm::Authenticated) traffic keeps a peer alive.
//! - [`Endpoint`] is a sans-IO DTLS 1.2 server library (datagrams and the time in; datagrams,
//!   events for the application and the next deadline out; [`Endpoint::send`] and
//!   [`Endpoint::close`] back) with stateless HMAC cookies, DSM admission and the session cache,
//!   on the user's own TLS policy ([`ServerConfigBuilder`]: client certificates, ciphers, PSK
//!   lookup). [`UdpServer`] drives it on UDP sockets from worker threads and `TokioServer`
//!   (feature `tokio`) from tokio tasks, both with batched UDP I/O ([`IoMode`]), and runs an
//!   [`Application`] on its events; `examples/dtls_echo_server.rs` is a few lines of such an
//!   application. [`DatagramPipe`] runs DTLS over in-memory datagrams, for tests.
//! - Associations outlive the process: [`Endpoint::suspend_all`] and [`save_peers`] carry
//!   established peers across a graceful restart; with [`ServerConfigBuilder::shared_peers`]
//!   their record state lives in the shared store under sequence-number leases (writes the store
//!   confirmed: [`SessionStore::put_confirmed`]), and the host a peer's records reach after a
//!   crash takes it over with no handshake.
//!
//! ```
//! use openssl::ssl::{SslContext, SslMethod};
//! use openssl_session_cache::SessionCache;
//!
//! let cache = SessionCache::builder().max_entries(10_000).build()?;
//! let mut ctx = SslContext::builder(SslMethod::dtls())?;
//! cache.install(&mut ctx)?; // callbacks, SERVER|NO_INTERNAL, NO_TICKET, session id context
//! // ... certificate, key, accept connections ...
//! println!("{:?}", cache.stats());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Architecture
//!
//! Dependencies point one way: the server (`Endpoint`, drivers) uses the DSM and the cache; the
//! cache uses the stores; nothing below the cache knows an `Ssl`, nothing below the server knows a
//! socket, and only the drivers own sockets. The endpoint is pure (time and datagrams in;
//! datagrams, events, deadlines and store requests out), so every driver and every test drives
//! the same code. The crate's only `unsafe` code is one module of OpenSSL calls, each with a
//! safety argument that holds for every later safe call (`quinn-udp` keeps its own). One file
//! per concept:
//!
//! ```text
//! lib.rs          crate docs, features, mod lines, re-exports
//! error.rs        Error (by what a caller does: a setting, a file, the store, OpenSSL), FileKind,
//!                 StoreError; with `server`: RefusedSetting, RestoreError, SendError
//! ffi.rs          the only unsafe code: OpenSSL calls rust-openssl leaves unsafe or does not
//!                 bind, a SAFETY note each (session dup, DTLSv1_listen, buffer release, CCM-8 rating, TLS1-PRF, the
//!                 ticket key callback, the reuseport BPF program)
//! ex_data.rs      the ex_data slots on Ssl and SslContext, each asked of OpenSSL once
//! clock.rs        Clock, SystemClock, ManualClock (tests move time by hand)
//! stats.rs        CacheStats, EvictionStats: atomics bumped in the callbacks, snapshots read
//! tickets.rs      TicketKeys: farm-wide ticket keys, HKDF per epoch, rotating by themselves
//! cache/          what OpenSSL sees: SessionCache and its builder (mod.rs); callbacks.rs (the
//!                 new/get/remove callbacks, panics turned into misses); lookup.rs (ClientHello-
//!                 callback lookups for remote stores, PendingLookup); policy.rs (today's policy
//!                 on every hit: lifetime, ciphers, PSK key fingerprints, the veto); der.rs (the
//!                 compact stored DER); client.rs (ClientSessionCache)
//! store/          bytes in, bytes out, no SSL objects: SessionStore, SessionStoreAdmin (mod.rs);
//!                 memory.rs + memory/slab.rs (the sharded LRU), lookup.rs (LookupDone: answers
//!                 that come later), envelope.rs (KeyRing, AES-256-GCM at rest), snapshot.rs,
//!                 file.rs (reading and writing the crate's files safely), from_url.rs;
//!                 redis/ (feature `redis`): client, write-behind, invalidation, cluster, breaker,
//!                 codec, admin, runtime
//! dsm/            the public dsm module, after RIOT: peer slots and states (mod.rs), slab.rs,
//!                 sweeper.rs
//! server/         (feature `server`) the DTLS 1.2 server
//!   config.rs     ServerConfig(Builder): the user's TLS policy in one SslContext, plus what the
//!                 server owns (DTLS 1.2, cookies, MTU, the session cache, DSM limits)
//!   endpoint/     the sans-IO Endpoint: mod.rs (handle, poll_transmit, poll_timeout, send,
//!                 close), park.rs (handshakes waiting for a remote lookup), lean.rs (taking a
//!                 peer over from OpenSSL, its records in and out), continuity.rs (suspending
//!                 and restoring peers), farm.rs (shared peers: their state written to the
//!                 store under leases, the takeover of a dead host's peer), tests.rs (the
//!                 endpoint's unit tests)
//!   event.rs      what an endpoint hands out: Transmit, Event, ConnectionInfo, CloseReason,
//!                 DropReason
//!   stats.rs      EndpointStats, each counter declared once (struct, merge, drops, metrics)
//!   timers.rs     TimerHeap: retransmit and parked-lookup deadlines in one lazy min-heap
//!   peer.rs       one peer: its connection (an Ssl over a DatagramPipe, or the lean record
//!                 state), what only its handshake needs (start, budget, parked lookup), its
//!                 timer entry, its DSM key
//!   pipe.rs       DatagramPipe, the in-memory datagram transport of every Ssl
//!   lean.rs       a lean peer: an established association whose records the endpoint protects
//!                 itself after OpenSSL's Ssl was freed
//!   record/       the record layer: mod.rs (parsing, the stateless ClientHello screen and
//!                 HelloVerifyRequest, the handshake budget), keys.rs (record keys from
//!                 OpenSSL's TLS1-PRF), protect.rs (RecordState: open and seal on EVP AEAD),
//!                 replay.rs (the anti-replay window), differential.rs (tests against OpenSSL's
//!                 own record layer)
//!   lease.rs      a shared peer's sequence-number lease and read mark (pure logic)
//!   cid.rs        RFC 9146 connection IDs: the extension, their layout, worker steering
//!   cookie.rs     stateless HMAC cookies under a rotating secret
//!   continuity.rs SuspendedPeer, save_peers, take_peers: peers carried across a graceful
//!                 restart, sealed with the key ring
//!   app.rs        Application, AppContext: the application's side of a server
//!   router.rs     sends from any thread: which worker holds which peer, an inbox per worker
//!   driver.rs     the worker body every driver shares (a batch in, events, timers, send,
//!                 counters)
//!   io.rs         UDP I/O for the drivers, batched through quinn-udp (IoMode, IoStats)
//!   udp.rs        UdpServer, the std driver (mio's epoll, a thread per worker)
//!   tokio.rs      TokioServer (feature `tokio`), the same workers as tokio tasks
//!   metrics.rs    the `metrics` facade (feature `metrics`)
//!   testing.rs    DTLS clients for the unit tests
//! fuzzing.rs      entry points for the fuzz targets (feature `__fuzzing`, not public API)
//! ```
//!
//! A datagram's way in: the driver reads a batch (`io.rs`) and hands each datagram to
//! `Endpoint::handle`, which routes it by connection ID, else by address; an unknown peer's
//! ClientHello is screened (`record/`) and answered with a cookie (`cookie.rs`) before any state
//! exists; a cookie-proven one gets a DSM slot and an `Ssl` (`peer.rs`), which the session cache
//! serves (`cache/`); once the handshake finishes with an AEAD suite the peer becomes lean
//! (`lean.rs`) and its records are opened and sealed by `record/protect.rs`, OpenSSL off the
//! path; only a record that opened ([`Authenticated`](dsm::Authenticated)) refreshes the DSM.
//!
//! # OpenSSL versions
//! Built on the system OpenSSL (3.0 on Debian bookworm) and tested on it and on OpenSSL 3.6 and
//! 4.0 (`scripts/openssl_matrix.sh`). What differs, and what the crate relies on:
//! - OpenSSL 3.2+ refuses the AES-CCM-8 suites at every security level above 0 (it rates them at
//!   64 bits for their short tag); the DTLS server rates them by key size as 3.0 does
//!   ([`rate_ccm8_by_key_size`], which a client context can use too).
//! - OpenSSL 4.0 refuses a session from the get callback whose id is not the ClientHello's
//!   (a miss), where 3.x resumed it under the wrong id; the cache checks the id of every
//!   session it decodes, so such stored bytes are a decode error on every version.
//! - OpenSSL 4.0 ends a connection whose transport reads 0 bytes with a fatal alert (which
//!   deletes its session); [`DatagramPipe`] reads an empty datagram as an error instead.
//! - Idle DTLS peers release their record buffers on 3.0.14+ and on the rewritten record layer
//!   of 3.2.2+/3.3.1+ (3.6, 4.0) alike.
//!
//! # Crate features
//! - `server` (default): the DTLS server: [`Endpoint`], [`ServerConfig`], [`UdpServer`] and
//!   the rest of its API, on `mio` and `quinn-udp`. Without it (`default-features = false`) the
//!   crate is the TLS session cache, its stores, ticket keys and the [`dsm`], and compiles
//!   neither of those.
//! - `redis`: a Redis-backed [`SessionStore`] for server farms (the `redis` crate, on a small
//!   tokio runtime of its own).
//! - `tokio`: `TokioServer`, the DTLS server driver on tokio (`tokio::net::UdpSocket`), running
//!   the same [`Application`] as [`UdpServer`].
//! - `metrics`: the drivers publish endpoint, DSM, session cache, store and UDP I/O counters
//!   and handshake duration histograms (`HANDSHAKE_DURATION_METRIC`) through the `metrics`
//!   facade; install an exporter (such as `metrics-exporter-prometheus`) before starting the
//!   server.
//!
//! The features `tokio` and `metrics` imply `server`.
//!
#![cfg_attr(
    not(feature = "server"),
    doc = "[`Endpoint`]: crate#crate-features
[`Endpoint::send`]: crate#crate-features
[`Endpoint::close`]: crate#crate-features
[`ServerConfig`]: crate#crate-features
[`ServerConfigBuilder`]: crate#crate-features
[`UdpServer`]: crate#crate-features
[`IoMode`]: crate#crate-features
[`Application`]: crate#crate-features
[`DatagramPipe`]: crate#crate-features
[`rate_ccm8_by_key_size`]: crate#crate-features
[`Endpoint::suspend_all`]: crate#crate-features
[`save_peers`]: crate#crate-features
[`ServerConfigBuilder::shared_peers`]: crate#crate-features"
)]
#![deny(unsafe_code)]

mod cache;
mod clock;
pub mod dsm;
mod error;
mod ex_data;
mod ffi;
#[cfg(feature = "__fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "server")]
mod server;
mod stats;
mod store;
mod tickets;

/// The `openssl` crate this one is built on, so that the types passed in (`SslContextBuilder`,
/// `X509`, `PKey`) are of the same version.
pub use openssl;

pub use cache::client::ClientSessionCache;
pub use cache::lookup::PendingLookup;
pub use cache::policy::SessionInfo;
pub use cache::{SessionCache, SessionCacheBuilder, DEFAULT_SESSION_ID_CONTEXT};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Error, FileKind, StoreError};
#[cfg(feature = "server")]
pub use error::{RefusedSetting, RestoreError, SendError};
#[cfg(feature = "server")]
pub use server::{
    certificate_fingerprint, deliver_events, rate_ccm8_by_key_size, self_signed_certificate,
    AppContext, Application, CloseReason, ConnectionInfo, DatagramPipe, DropReason, Endpoint,
    EndpointStats, Event, IoMode, IoStats, ServerConfig, ServerConfigBuilder, StopHandle,
    SuspendedPeer, Transmit, UdpOptions, UdpServer, DEFAULT_CIPHERS, DEFAULT_COOKIE_ROTATION,
    DEFAULT_LOOKUP_TIMEOUT, DEFAULT_MAX_DATAGRAM, DEFAULT_MTU, DEFAULT_PARKED_DATAGRAMS,
    DEFAULT_SEND_QUEUE, MAX_CONNECTION_ID_HOST, MAX_RECORD_PLAINTEXT, PSK_CIPHERS,
};
#[cfg(feature = "server")]
pub use server::{save_peers, take_peers};
#[cfg(feature = "tokio")]
pub use server::{TokioHandle, TokioServer};
#[cfg(feature = "metrics")]
pub use server::{HANDSHAKE_DURATION_BUCKETS, HANDSHAKE_DURATION_METRIC};
pub use stats::{CacheStats, EvictionStats};
pub use store::envelope;
pub use store::snapshot;
pub use store::version_of;
pub use store::{
    store_from_url, KeyRing, LookupDone, LookupMode, MemoryStore, MemoryStoreBuilder, NullStore,
    PutDone, SessionId, SessionStore, SessionStoreAdmin, StoreUsage, StoredSession,
    MAX_SESSION_ID_LEN,
};
#[cfg(feature = "redis")]
pub use store::{RedisStore, RedisStoreBuilder, RedisStoreStats};
pub use tickets::{TicketKeys, TicketKeysBuilder, TicketStats};

// Runs the README's code blocks as doctests (several drive the server).
#[cfg(all(doctest, feature = "server"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
