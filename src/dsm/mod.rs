//! The DTLS session manager ([`Dsm`]): a bounded table of peers, their handshake state, and an
//! idle sweeper, after RIOT's `dsm` module. The overview and an example are on [`Dsm`].
//!
//! The DTLS server runs a [`Dsm`] of its own: its user meets this module only through
//! [`DsmConfig`] (given to [`ServerConfigBuilder::dsm`][server-dsm], feature `server`) and
//! [`DsmStats`] (from the drivers' `dsm_stats`). The rest ([`Dsm`] itself, [`PeerState`] and
//! [`PeerState::to_riot`], [`SocketPeer`], [`StoreOutcome`], [`Sweeper`], [`Authenticated`]) is
//! the RIOT-parity API for a server that drives its own peers.
//!
#![cfg_attr(
    feature = "server",
    doc = "[server-dsm]: crate::ServerConfigBuilder::dsm"
)]
#![cfg_attr(not(feature = "server"), doc = "[server-dsm]: crate#crate-features")]

mod slab;
mod sweeper;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl::ssl::SslRef;
use parking_lot::Mutex;

use self::slab::{List, Slab};
use crate::Error;

pub use self::sweeper::Sweeper;

/// The default number of peer slots in [`DsmConfig`].
///
/// RIOT's `CONFIG_DSM_PEER_MAX` defaults to `CONFIG_DTLS_PEER_MAX`, which is 2 with `gcoap_dtls`
/// and 1 otherwise: sized for a constrained node. A server crate defaults to a few more; size it
/// for your load with [`DsmConfig::new`].
pub const DEFAULT_MAX_SLOTS: usize = 8;

/// The state of a peer, matching RIOT's `dsm_state_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerState {
    /// `NO_SPACE`: the peer is unknown and could not be stored (table full, handshake budget
    /// spent, or the source over its quota). Nothing changed.
    NoSpace,
    /// `SESSION_STATE_NONE`: the peer is not stored. As the previous state returned by
    /// [`Dsm::store`], it means a free slot was just taken.
    None,
    /// `SESSION_STATE_HANDSHAKE`: a handshake is in progress; the slot counts against the
    /// handshake budget and times out.
    Handshake,
    /// `SESSION_STATE_ESTABLISHED`: the handshake finished. Never downgraded by a later store.
    Established,
}

impl PeerState {
    /// The numeric value of the matching `dsm_state_t` constant (`NO_SPACE = -1` … `ESTABLISHED = 2`).
    pub const fn to_riot(self) -> i8 {
        match self {
            Self::NoSpace => -1,
            Self::None => 0,
            Self::Handshake => 1,
            Self::Established => 2,
        }
    }
}

/// Identifies a peer in a [`Dsm`].
pub trait PeerKey: Eq + std::hash::Hash + Clone + fmt::Debug + Send + Sync + 'static {
    /// The source address the per-source quota counts.
    fn source(&self) -> IpAddr;
}

/// The peer's IP address, in canonical form (an IPv4-mapped IPv6 address, as a dual-stack socket
/// reports IPv4 peers, counts as its IPv4 address).
impl PeerKey for SocketAddr {
    fn source(&self) -> IpAddr {
        self.ip().to_canonical()
    }
}

/// RIOT keys a session by (socket, UDP endpoint): `listener` names the listening socket (any id
/// the server chooses) and `addr` is the peer's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketPeer {
    /// The listening socket's id.
    pub listener: u32,
    /// The peer's UDP endpoint.
    pub addr: SocketAddr,
}

impl PeerKey for SocketPeer {
    fn source(&self) -> IpAddr {
        self.addr.source()
    }
}

/// Configuration of a [`Dsm`]; see each field. Build with [`DsmConfig::new`] (or `default()`) and
/// the `with_*` methods.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DsmConfig {
    /// Number of peer slots ([`DEFAULT_MAX_SLOTS`]; RIOT: `CONFIG_DSM_PEER_MAX`). Zero is valid:
    /// every store is refused.
    pub max_slots: usize,
    /// Budget of slots in the `Handshake` state, at most `max_slots`. Default: `max_slots / 2`, at
    /// least 1 (when `max_slots > 0`). Zero refuses every new `Handshake` peer.
    pub max_handshakes: usize,
    /// Slots one source address may hold, at least 1. Default: `max_slots` (no quota).
    pub max_per_source: usize,
    /// IPv6 sources are grouped by this prefix length for the quota (an IPv6 host usually owns a
    /// whole /64). Default 64; 128 counts each address on its own; at most 128.
    pub ipv6_quota_prefix: u8,
    /// A `Handshake` slot not used (stored or touched) for this long is freed. Default 10 s; must
    /// not be zero.
    pub handshake_timeout: Duration,
    /// The sweeper's tick: an established peer not used for two ticks is freed (one that was last
    /// used just before a tick pass goes at the next pass, so after one to two ticks of silence).
    /// Default 60 s; must not be zero.
    pub idle_tick: Duration,
    /// When the table is full, a new peer takes the slot of the least recently used established
    /// peer if that one has been idle for at least this long. `None` (the default, RIOT's
    /// behaviour) never evicts: the store returns `NoSpace`.
    pub evict_idle_after: Option<Duration>,
}

impl Default for DsmConfig {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_SLOTS)
    }
}

impl DsmConfig {
    /// The defaults for a table of `max_slots` peers.
    pub fn new(max_slots: usize) -> Self {
        Self {
            max_slots,
            max_handshakes: (max_slots / 2).max(1).min(max_slots),
            max_per_source: max_slots.max(1),
            ipv6_quota_prefix: 64,
            handshake_timeout: Duration::from_secs(10),
            idle_tick: Duration::from_secs(60),
            evict_idle_after: None,
        }
    }

    /// Sets [`max_slots`](Self::max_slots) and **resets** `max_handshakes` and `max_per_source` to
    /// their defaults for `n`, so call it before setting those.
    #[must_use]
    pub fn with_max_slots(self, n: usize) -> Self {
        let derived = Self::new(n);
        Self {
            max_slots: n,
            max_handshakes: derived.max_handshakes,
            max_per_source: derived.max_per_source,
            ..self
        }
    }

    /// Sets [`max_handshakes`](Self::max_handshakes).
    #[must_use]
    pub fn with_max_handshakes(mut self, n: usize) -> Self {
        self.max_handshakes = n;
        self
    }

    /// Sets [`max_per_source`](Self::max_per_source).
    #[must_use]
    pub fn with_max_per_source(mut self, n: usize) -> Self {
        self.max_per_source = n;
        self
    }

    /// Sets [`ipv6_quota_prefix`](Self::ipv6_quota_prefix).
    #[must_use]
    pub fn with_ipv6_quota_prefix(mut self, bits: u8) -> Self {
        self.ipv6_quota_prefix = bits;
        self
    }

    /// Sets [`handshake_timeout`](Self::handshake_timeout).
    #[must_use]
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets [`idle_tick`](Self::idle_tick).
    #[must_use]
    pub fn with_idle_tick(mut self, tick: Duration) -> Self {
        self.idle_tick = tick;
        self
    }

    /// Sets [`evict_idle_after`](Self::evict_idle_after).
    #[must_use]
    pub fn with_evict_idle_after(mut self, idle: Option<Duration>) -> Self {
        self.evict_idle_after = idle;
        self
    }

    fn validate(&self) -> Result<(), Error> {
        if self.max_handshakes > self.max_slots {
            return Err(Error::setting(
                "max_handshakes",
                format!(
                    "dsm max_handshakes ({}) exceeds max_slots ({})",
                    self.max_handshakes, self.max_slots
                ),
            ));
        }
        if self.max_per_source == 0 {
            return Err(Error::setting(
                "max_per_source",
                "dsm max_per_source must be at least 1",
            ));
        }
        if self.ipv6_quota_prefix > 128 {
            return Err(Error::setting(
                "ipv6_quota_prefix",
                format!(
                    "dsm ipv6_quota_prefix ({}) exceeds 128",
                    self.ipv6_quota_prefix
                ),
            ));
        }
        if self.handshake_timeout.is_zero() {
            return Err(Error::setting(
                "handshake_timeout",
                "dsm handshake_timeout must not be zero",
            ));
        }
        if self.idle_tick.is_zero() {
            return Err(Error::setting(
                "idle_tick",
                "dsm idle_tick must not be zero",
            ));
        }
        Ok(())
    }
}

/// Why a peer left the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FreeReason {
    /// [`Dsm::remove`] (the close hook is not called for these).
    Removed,
    /// A `Handshake` slot unused for [`DsmConfig::handshake_timeout`].
    HandshakeTimeout,
    /// An established peer unused for two sweeper ticks.
    Idle,
    /// An idle established peer evicted to make room ([`DsmConfig::evict_idle_after`]).
    Evicted,
}

/// What [`Dsm::store`] did.
#[derive(Debug)]
pub struct StoreOutcome<K, V> {
    /// RIOT's return value, the state before the call: `None` (a free slot was taken),
    /// `Handshake`/`Established` (the peer was known), or `NoSpace` (nothing changed).
    pub previous: PeerState,
    /// With `restore` and a known peer: a clone of the stored value.
    pub restored: Option<V>,
    /// The peer freed to make room for this one, also passed to the close hook: a timed-out
    /// handshake (reclaimed before the sweeper got to it) or, under
    /// [`DsmConfig::evict_idle_after`], the least recently used idle established peer.
    pub evicted: Option<(K, V)>,
}

/// Counters and current occupancy of a [`Dsm`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DsmStats {
    /// Peers stored in a new slot.
    pub stored: u64,
    /// Peers freed by [`Dsm::remove`].
    pub removed: u64,
    /// New peers refused for lack of a slot or of handshake budget.
    pub no_space: u64,
    /// `Handshake` slots freed by the handshake timeout (by a sweep, or reclaimed by a store).
    pub handshake_timeouts: u64,
    /// Established peers freed by the sweeper after two idle ticks.
    pub idle_evictions: u64,
    /// New peers refused because their source was at its quota.
    pub quota_rejections: u64,
    /// Established peers evicted to make room ([`DsmConfig::evict_idle_after`]).
    pub evicted: u64,
    /// Slots in `Handshake` now.
    pub handshakes: usize,
    /// Slots in `Established` now.
    pub established: usize,
}

/// Proof that the DTLS layer authenticated traffic from a peer (a record's MAC verified, or the
/// handshake finished). [`Dsm::touch`] takes one, so that only authenticated traffic, never a
/// spoofed datagram, keeps a peer's slot alive.
///
/// Get one from [`Authenticated::from_ssl`] right after OpenSSL handed you application data (it
/// only returns records whose MAC verified), or, for another DTLS stack, from
/// [`Authenticated::assume_verified`].
#[derive(Debug)]
#[must_use]
pub struct Authenticated {
    _private: (),
}

impl Authenticated {
    /// `Some` only when `ssl`'s handshake has finished (`SSL_is_init_finished`). Call it after a
    /// successful read of application data from that connection.
    pub fn from_ssl(ssl: &SslRef) -> Option<Self> {
        ssl.is_init_finished().then_some(Self { _private: () })
    }

    /// The proof the endpoint's own record layer gives for a record that opened under its
    /// peer's key (the AEAD verified it).
    #[cfg(feature = "server")]
    pub(crate) fn opened() -> Self {
        Self { _private: () }
    }

    /// The escape hatch for other DTLS stacks: asserts that the caller's DTLS layer verified the
    /// record that prompts this touch. Do not call it for unverified datagrams.
    pub fn assume_verified() -> Self {
        Self { _private: () }
    }
}

type CloseHook<K, V> = dyn Fn(&K, &V, FreeReason) + Send + Sync;

/// One occupied slot.
struct Peer<K, V> {
    key: K,
    value: V,
    state: PeerState,
    /// The quota group of `key.source()`.
    source: IpAddr,
    last_used: Instant,
    used: bool,
}

#[derive(Default)]
struct Counters {
    stored: u64,
    removed: u64,
    no_space: u64,
    handshake_timeouts: u64,
    idle_evictions: u64,
    quota_rejections: u64,
    evicted: u64,
}

struct Inner<K, V> {
    slab: Slab<Peer<K, V>>,
    index: HashMap<K, usize>,
    per_source: HashMap<IpAddr, usize>,
    /// `Handshake` slots, least recently used first.
    handshakes: List,
    /// `Established` slots, least recently used first.
    established: List,
    /// The latest `now` seen; `None` until the first call that carries time.
    latest: Option<Instant>,
    /// When the next tick pass is due; `None` before the first time is seen, or if it would
    /// overflow `Instant`.
    next_tick: Option<Instant>,
    counters: Counters,
    hook: Option<Arc<CloseHook<K, V>>>,
}

/// The DTLS session manager: a bounded table of peers, their handshake state, and an idle sweeper.
///
/// A DTLS server must bound what any number of peers can make it hold. [`Dsm`] follows RIOT's
/// `dsm` module (`sys/net/dsm/dsm.c`): a fixed number of slots, one per peer, each holding a
/// [`PeerState`] and a caller value; [`Dsm::store`] returns the *previous* state (`None` when a
/// slot was taken, `NoSpace` when nothing could be stored), a stored `Established` state is never
/// downgraded, and [`Dsm::least_recently_used`] names the established peer to evict by hand.
///
/// On top of RIOT's semantics it adds the hardening that RIOT and the tinydtls gem lack:
///
/// - **Handshake budget.** At most [`DsmConfig::max_handshakes`] slots can be in `Handshake`, so a
///   flood of half-open handshakes can never take the slots that established peers need. An
///   established peer makes room for a new handshake only with [`DsmConfig::evict_idle_after`]
///   set, and only when it has been idle at least that long (never, by default).
/// - **Handshake timeout.** A `Handshake` slot not used for [`DsmConfig::handshake_timeout`] is
///   freed by [`Dsm::sweep`], or reclaimed at once when a new peer needs its room (RIOT never frees
///   stuck `HANDSHAKE` slots).
/// - **Per-source quota.** At most [`DsmConfig::max_per_source`] slots per source address (IPv6
///   grouped by [`DsmConfig::ipv6_quota_prefix`]), so one host cannot take the table.
/// - **Eviction of idle peers when full** ([`DsmConfig::evict_idle_after`], off by default as in
///   RIOT): a new peer may take the slot of the least recently used established peer if that one
///   has been idle long enough. This is what RIOT's gcoap does by hand with a timer.
/// - **Idle sweeper.** A second-chance clock: every [`store`](Dsm::store) and
///   [`touch`](Dsm::touch) sets a peer's *used* bit; each tick pass of [`Dsm::sweep`] clears the
///   bits of established peers and frees those whose bit was already clear, i.e. peers not used
///   since the previous pass. Unlike the tinydtls gem, the bit is set on *every* use, so live
///   peers are never freed. [`Sweeper`] runs the sweep on a thread, or the server calls
///   [`Dsm::sweep`] itself when [`Dsm::next_deadline`] is due.
/// - **Close hook.** Peers freed by the sweeper or evicted are handed to the hook set with
///   [`Dsm::set_close_hook`] (called outside the lock), so the server can end their DTLS
///   connection cleanly and keep their session resumable.
/// - **Only authenticated traffic refreshes a peer.** [`Dsm::touch`] needs an [`Authenticated`]
///   proof, which [`Authenticated::from_ssl`] only gives for a connection whose handshake has
///   finished; spoofed datagrams cannot keep a slot alive.
/// - Counters ([`DsmStats`]) for stores, removals, refusals and every kind of free.
///
/// Time is injected: every call that depends on time takes an [`Instant`], so tests never sleep.
/// Time never runs backwards inside a manager: a `now` earlier than one already seen counts as the
/// latest one seen (threads that read the clock before waiting for the lock stay consistent).
///
/// # Example
///
/// ```
/// use std::net::SocketAddr;
/// use std::time::{Duration, Instant};
/// use openssl_session_cache::dsm::{Authenticated, Dsm, DsmConfig, FreeReason, PeerState};
///
/// let config = DsmConfig::new(2)
///     .with_max_handshakes(1)
///     .with_idle_tick(Duration::from_secs(60));
/// let dsm: Dsm<SocketAddr, u32> = Dsm::new(config)?;
/// let t0 = Instant::now();
/// let alice: SocketAddr = "192.0.2.1:5684".parse().unwrap();
/// let bob: SocketAddr = "192.0.2.2:5684".parse().unwrap();
///
/// // A ClientHello with a valid cookie: take a slot in the handshake budget.
/// assert_eq!(dsm.store(&alice, PeerState::Handshake, 1, false, t0).previous, PeerState::None);
/// // The budget holds one handshake, so a second one is refused and nothing changes.
/// assert_eq!(dsm.store(&bob, PeerState::Handshake, 2, false, t0).previous, PeerState::NoSpace);
/// // Alice's handshake finishes: she moves out of the handshake budget.
/// let done = dsm.store(&alice, PeerState::Established, 0, true, t0);
/// assert_eq!(done.previous, PeerState::Handshake);
/// assert_eq!(done.restored, Some(1)); // the stored value is kept and handed back
/// assert_eq!(dsm.store(&bob, PeerState::Handshake, 2, false, t0).previous, PeerState::None);
/// assert_eq!(dsm.available_slots(), 0);
///
/// // Authenticated application data from Alice keeps her alive across sweeper ticks;
/// // Bob never finishes his handshake and times out.
/// let tick = Duration::from_secs(60);
/// for i in 1..=3 {
///     let now = t0 + tick * i;
///     let freed = dsm.sweep(now); // a tick pass: clears Alice's used bit
///     if i == 1 {
///         assert_eq!(freed, vec![(bob, 2, FreeReason::HandshakeTimeout)]);
///     } else {
///         assert!(freed.is_empty());
///     }
///     assert!(dsm.touch(&alice, Authenticated::assume_verified(), now));
/// }
/// // Once Alice goes quiet, the next pass clears her used bit and the one after frees her.
/// assert!(dsm.sweep(t0 + tick * 4).is_empty());
/// assert_eq!(dsm.sweep(t0 + tick * 5), vec![(alice, 1, FreeReason::Idle)]);
/// assert!(dsm.is_empty());
/// # Ok::<(), openssl_session_cache::Error>(())
/// ```
///
/// # Concurrency and cost
///
/// `Dsm` is `Send + Sync` and all methods take `&self`; one mutex guards the table. Every
/// operation is O(1) (a hash map from key to slot, and intrusive recency lists for handshakes and
/// established peers) except [`Dsm::sweep`]'s tick pass and
/// [`Dsm::least_recently_used_matching`], which walk the established peers. Memory is bounded by
/// `max_slots`: the per-source counts hold only stored peers, and refused peers leave nothing
/// behind. The close hook runs outside the mutex.
pub struct Dsm<K: PeerKey, V = ()> {
    config: DsmConfig,
    inner: Mutex<Inner<K, V>>,
}

type Freed<K, V> = Vec<(K, V, FreeReason)>;

impl<K: PeerKey, V: Clone + Send + 'static> Dsm<K, V> {
    /// A manager with the given configuration.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] if `max_handshakes > max_slots`, `max_per_source == 0`,
    /// `ipv6_quota_prefix > 128`, or a duration is zero.
    pub fn new(config: DsmConfig) -> Result<Self, Error> {
        config.validate()?;
        Ok(Self {
            inner: Mutex::new(Inner {
                slab: Slab::new(config.max_slots),
                index: HashMap::new(),
                per_source: HashMap::new(),
                handshakes: List::new(),
                established: List::new(),
                latest: None,
                next_tick: None,
                counters: Counters::default(),
                hook: None,
            }),
            config,
        })
    }

    /// The configuration this manager was built with.
    pub fn config(&self) -> &DsmConfig {
        &self.config
    }

    /// Stores `peer` in `new_state` (`dsm_store`) and returns the previous state with what else
    /// happened.
    ///
    /// - **Unknown peer**: takes a free slot with `value` (`previous` is `None`). A `Handshake`
    ///   peer also needs handshake budget. When there is no room, an expired `Handshake` slot is
    ///   reclaimed, or else (with [`DsmConfig::evict_idle_after`] and only if the budget allows
    ///   the new peer) the least recently used established peer idle long enough is evicted; the
    ///   freed peer is returned in `evicted` and passed to the close hook. Otherwise `previous` is
    ///   `NoSpace`, nothing changes, and `no_space` is counted; a source at its quota is refused
    ///   the same way but counted in `quota_rejections`.
    /// - **Known peer**: `previous` is its state. `Established` replaces `Handshake` (the peer
    ///   leaves the handshake budget); `Established` is never downgraded. The stored value is kept
    ///   and `value` is dropped (use [`Dsm::replace_value`] to change it); with `restore`, a clone
    ///   of the stored value is returned in `restored`.
    /// - Every store that finds or takes a slot is a *use*: it refreshes the peer's LRU position,
    ///   handshake timeout and the sweeper's used bit.
    /// - `new_state` of `None` or `NoSpace` is not a state to store (RIOT would leak the slot):
    ///   a known peer is only used as above; an unknown peer gets `NoSpace`, uncounted.
    pub fn store(
        &self,
        peer: &K,
        new_state: PeerState,
        value: V,
        restore: bool,
        now: Instant,
    ) -> StoreOutcome<K, V> {
        let mut inner = self.inner.lock();
        let now = inner.observe(now, self.config.idle_tick);
        if let Some(&idx) = inner.index.get(peer) {
            let previous = inner.slab.get(idx).state;
            if previous == PeerState::Handshake && new_state == PeerState::Established {
                let Inner {
                    slab,
                    handshakes,
                    established,
                    ..
                } = &mut *inner;
                slab.move_to_back(handshakes, established, idx);
                slab.get_mut(idx).state = PeerState::Established;
            }
            inner.use_slot(idx, now);
            let restored = restore.then(|| inner.slab.get(idx).value.clone());
            return StoreOutcome {
                previous,
                restored,
                evicted: None,
            };
        }
        let no_space = StoreOutcome {
            previous: PeerState::NoSpace,
            restored: None,
            evicted: None,
        };
        if !matches!(new_state, PeerState::Handshake | PeerState::Established) {
            return no_space;
        }
        let source = quota_group(peer.source(), self.config.ipv6_quota_prefix);
        if inner.per_source.get(&source).copied().unwrap_or(0) >= self.config.max_per_source {
            inner.counters.quota_rejections += 1;
            return no_space;
        }
        let wants_handshake = new_state == PeerState::Handshake;
        let mut freed = None;
        if inner.slab.is_full() || (wants_handshake && !self.handshake_budget_left(&inner)) {
            if let Some(idx) = inner.handshakes.front() {
                if self.handshake_expired(inner.slab.get(idx), now) {
                    inner.counters.handshake_timeouts += 1;
                    freed = Some(inner.free(idx, FreeReason::HandshakeTimeout));
                }
            }
        }
        if wants_handshake && !self.handshake_budget_left(&inner) {
            debug_assert!(freed.is_none(), "a reclaimed handshake leaves budget");
            inner.counters.no_space += 1;
            return no_space;
        }
        if inner.slab.is_full() {
            match (self.config.evict_idle_after, inner.established.front()) {
                (Some(limit), Some(idx))
                    if now.saturating_duration_since(inner.slab.get(idx).last_used) >= limit =>
                {
                    inner.counters.evicted += 1;
                    freed = Some(inner.free(idx, FreeReason::Evicted));
                }
                _ => {
                    debug_assert!(freed.is_none(), "a reclaimed handshake leaves a slot");
                    inner.counters.no_space += 1;
                    return no_space;
                }
            }
        }
        inner.insert(peer, new_state, value, source, now);
        let hook = freed.as_ref().and_then(|_| inner.hook.clone());
        drop(inner);
        let evicted = freed.map(|(key, value, reason)| {
            if let Some(hook) = &hook {
                hook(&key, &value, reason);
            }
            (key, value)
        });
        StoreOutcome {
            previous: PeerState::None,
            restored: None,
            evicted,
        }
    }

    /// Replaces the value stored for a known peer, returning the old one, without counting as a
    /// use. An unknown peer gets its value back as `Err`.
    pub fn replace_value(&self, peer: &K, value: V) -> Result<V, V> {
        let mut inner = self.inner.lock();
        match inner.index.get(peer) {
            Some(&idx) => Ok(std::mem::replace(&mut inner.slab.get_mut(idx).value, value)),
            None => Err(value),
        }
    }

    /// Frees the peer's slot (`dsm_remove`) and returns its value; `None` if it was not stored
    /// (idempotent). The close hook is not called.
    pub fn remove(&self, peer: &K) -> Option<V> {
        let mut inner = self.inner.lock();
        let idx = *inner.index.get(peer)?;
        inner.counters.removed += 1;
        let (_, value, _) = inner.free(idx, FreeReason::Removed);
        Some(value)
    }

    /// Records a use of a known peer after authenticated traffic: refreshes its LRU position,
    /// its handshake timeout and the sweeper's used bit. `false` if the peer is not stored.
    pub fn touch(&self, peer: &K, proof: Authenticated, now: Instant) -> bool {
        let _ = proof;
        let mut inner = self.inner.lock();
        let now = inner.observe(now, self.config.idle_tick);
        match inner.index.get(peer) {
            Some(&idx) => {
                inner.use_slot(idx, now);
                true
            }
            None => false,
        }
    }

    /// The peer's state; `None` if it is not stored.
    pub fn state(&self, peer: &K) -> PeerState {
        let inner = self.inner.lock();
        inner
            .index
            .get(peer)
            .map_or(PeerState::None, |&idx| inner.slab.get(idx).state)
    }

    /// A clone of the peer's value, without counting as a use.
    pub fn get(&self, peer: &K) -> Option<V> {
        let inner = self.inner.lock();
        inner
            .index
            .get(peer)
            .map(|&idx| inner.slab.get(idx).value.clone())
    }

    /// The number of slots (`dsm_get_num_maximum_slots`).
    pub fn max_slots(&self) -> usize {
        self.config.max_slots
    }

    /// Free slots (`dsm_get_num_available_slots`), read under the lock.
    pub fn available_slots(&self) -> usize {
        self.config.max_slots - self.inner.lock().slab.len()
    }

    /// The established peer used least recently (`dsm_get_least_recently_used_session`); `None`
    /// if there is none. `Handshake` peers are never candidates. Recency is the order of uses
    /// (stores and touches): of two peers used at the same instant, the one used by the earlier
    /// call is less recent. O(1).
    pub fn least_recently_used(&self) -> Option<K> {
        let inner = self.inner.lock();
        inner
            .established
            .front()
            .map(|idx| inner.slab.get(idx).key.clone())
    }

    /// The least recently used established peer for which `filter` holds, as RIOT filters by
    /// socket (e.g. `|p: &SocketPeer| p.listener == 3`). O(established peers) in the worst case.
    pub fn least_recently_used_matching(&self, filter: impl Fn(&K) -> bool) -> Option<K> {
        let inner = self.inner.lock();
        let mut cur = inner.established.front();
        while let Some(idx) = cur {
            let key = &inner.slab.get(idx).key;
            if filter(key) {
                return Some(key.clone());
            }
            cur = inner.slab.next(idx);
        }
        None
    }

    /// Frees what is due at `now` and returns it, after calling the close hook once for each:
    ///
    /// 1. every `Handshake` slot unused for [`DsmConfig::handshake_timeout`]
    ///    ([`FreeReason::HandshakeTimeout`]), least recently used first;
    /// 2. if a tick is due (the first tick is due one `idle_tick` after the first time the manager
    ///    saw, each later one `idle_tick` after the previous pass), a second-chance pass over the
    ///    established peers, least recently used first: a set used bit is cleared, a clear one
    ///    frees the peer ([`FreeReason::Idle`]). A peer freed this way was not used since the
    ///    previous pass, at least one `idle_tick` ago; a peer unused for two ticks is freed.
    ///
    /// One call runs at most one tick pass, however late it comes.
    pub fn sweep(&self, now: Instant) -> Vec<(K, V, FreeReason)> {
        let mut inner = self.inner.lock();
        let now = inner.observe(now, self.config.idle_tick);
        let mut freed: Freed<K, V> = Vec::new();
        while let Some(idx) = inner.handshakes.front() {
            if !self.handshake_expired(inner.slab.get(idx), now) {
                break;
            }
            inner.counters.handshake_timeouts += 1;
            freed.push(inner.free(idx, FreeReason::HandshakeTimeout));
        }
        if inner.next_tick.is_some_and(|due| now >= due) {
            inner.next_tick = now.checked_add(self.config.idle_tick);
            let mut cur = inner.established.front();
            while let Some(idx) = cur {
                cur = inner.slab.next(idx);
                let peer = inner.slab.get_mut(idx);
                if peer.used {
                    peer.used = false;
                } else {
                    inner.counters.idle_evictions += 1;
                    freed.push(inner.free(idx, FreeReason::Idle));
                }
            }
        }
        let hook = inner.hook.clone();
        drop(inner);
        if let Some(hook) = hook {
            for (key, value, reason) in &freed {
                hook(key, value, *reason);
            }
        }
        freed
    }

    /// Sets the hook called, outside the lock, once for each peer freed by [`Dsm::sweep`] or
    /// evicted by [`Dsm::store`] (not for [`Dsm::remove`]). The slot is already free when it runs,
    /// so the hook may call back into the manager; another thread may have stored the same peer
    /// again by then. The hook should not panic: a panic reaches the caller of `sweep`/`store`
    /// and skips the hook calls for the remaining peers of that sweep.
    pub fn set_close_hook(&self, hook: impl Fn(&K, &V, FreeReason) + Send + Sync + 'static) {
        self.inner.lock().hook = Some(Arc::new(hook));
    }

    /// When [`Dsm::sweep`] next has work to do: the earliest handshake timeout, or the next tick
    /// if there are established peers. `None` when no peer is stored. May be in the past.
    pub fn next_deadline(&self) -> Option<Instant> {
        let inner = self.inner.lock();
        let handshake = inner.handshakes.front().and_then(|idx| {
            inner
                .slab
                .get(idx)
                .last_used
                .checked_add(self.config.handshake_timeout)
        });
        let tick = if inner.established.len() > 0 {
            inner.next_tick
        } else {
            None
        };
        match (handshake, tick) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Counters and current occupancy.
    pub fn stats(&self) -> DsmStats {
        let inner = self.inner.lock();
        let c = &inner.counters;
        DsmStats {
            stored: c.stored,
            removed: c.removed,
            no_space: c.no_space,
            handshake_timeouts: c.handshake_timeouts,
            idle_evictions: c.idle_evictions,
            quota_rejections: c.quota_rejections,
            evicted: c.evicted,
            handshakes: inner.handshakes.len(),
            established: inner.established.len(),
        }
    }

    /// The number of stored peers (`max_slots() - available_slots()`).
    pub fn len(&self) -> usize {
        self.inner.lock().slab.len()
    }

    /// Whether no peer is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn handshake_budget_left(&self, inner: &Inner<K, V>) -> bool {
        inner.handshakes.len() < self.config.max_handshakes
    }

    fn handshake_expired(&self, peer: &Peer<K, V>, now: Instant) -> bool {
        now.saturating_duration_since(peer.last_used) >= self.config.handshake_timeout
    }
}

impl<K: PeerKey, V> Inner<K, V> {
    /// Clamps `now` so time never runs backwards, and starts the tick clock on first sight.
    fn observe(&mut self, now: Instant, tick: Duration) -> Instant {
        let now = match self.latest {
            Some(latest) => latest.max(now),
            None => {
                self.next_tick = now.checked_add(tick);
                now
            }
        };
        self.latest = Some(now);
        now
    }

    /// The slab and the list that holds slots in `state`.
    fn slab_and_list(&mut self, state: PeerState) -> (&mut Slab<Peer<K, V>>, &mut List) {
        let list = if state == PeerState::Handshake {
            &mut self.handshakes
        } else {
            &mut self.established
        };
        (&mut self.slab, list)
    }

    fn use_slot(&mut self, idx: usize, now: Instant) {
        let peer = self.slab.get_mut(idx);
        peer.last_used = now;
        peer.used = true;
        let state = peer.state;
        let (slab, list) = self.slab_and_list(state);
        slab.refresh(list, idx);
    }

    fn insert(&mut self, key: &K, state: PeerState, value: V, source: IpAddr, now: Instant) {
        let peer = Peer {
            key: key.clone(),
            value,
            state,
            source,
            last_used: now,
            used: true,
        };
        let (slab, list) = self.slab_and_list(state);
        let Ok(idx) = slab.insert(list, peer) else {
            unreachable!("BUG: dsm inserted into a full table");
        };
        self.index.insert(key.clone(), idx);
        *self.per_source.entry(source).or_insert(0) += 1;
        self.counters.stored += 1;
    }

    fn free(&mut self, idx: usize, reason: FreeReason) -> (K, V, FreeReason) {
        let state = self.slab.get(idx).state;
        let (slab, list) = self.slab_and_list(state);
        let peer = slab.remove(list, idx);
        self.index.remove(&peer.key);
        if let Some(count) = self.per_source.get_mut(&peer.source) {
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&peer.source);
            }
        }
        (peer.key, peer.value, reason)
    }
}

impl<K: PeerKey, V> fmt::Debug for Dsm<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("Dsm")
            .field("config", &self.config)
            .field("len", &inner.slab.len())
            .field("handshakes", &inner.handshakes.len())
            .field("established", &inner.established.len())
            .finish_non_exhaustive()
    }
}

/// The quota group of a source address: IPv4 as is, IPv6 masked to its first `v6_prefix` bits.
fn quota_group(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u32::from(v6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_group_masks_ipv6_and_canonicalizes_mapped_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(quota_group(a, 64), quota_group(b, 64));
        assert_ne!(quota_group(a, 64), quota_group(c, 64));
        assert_ne!(quota_group(a, 128), quota_group(b, 128));
        assert_eq!(quota_group(a, 128), a);
        assert_eq!(quota_group(a, 0), quota_group(c, 0));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(quota_group(mapped, 64), v4);
        assert_eq!(quota_group(v4, 0), v4, "IPv4 is never masked");
    }

    #[test]
    fn default_config_is_valid_and_derived_from_slots() {
        for n in [0, 1, 2, 3, 8, 1000] {
            let c = DsmConfig::new(n);
            c.validate().unwrap();
            assert!(c.max_handshakes <= n);
            assert_eq!(c.max_per_source, n.max(1));
        }
        assert_eq!(DsmConfig::new(1).max_handshakes, 1);
        assert_eq!(DsmConfig::new(0).max_handshakes, 0);
        assert_eq!(DsmConfig::default().max_slots, DEFAULT_MAX_SLOTS);
        assert_eq!(DsmConfig::default().max_handshakes, DEFAULT_MAX_SLOTS / 2);
        let c = DsmConfig::new(4)
            .with_max_per_source(1)
            .with_idle_tick(Duration::from_secs(7))
            .with_max_slots(10);
        assert_eq!(
            (c.max_slots, c.max_handshakes, c.max_per_source),
            (10, 5, 10)
        );
        assert_eq!(
            c.idle_tick,
            Duration::from_secs(7),
            "other settings are kept"
        );
    }

    #[test]
    fn observe_never_runs_backwards() {
        let mut inner: Inner<SocketAddr, ()> = Inner {
            slab: Slab::new(1),
            index: HashMap::new(),
            per_source: HashMap::new(),
            handshakes: List::new(),
            established: List::new(),
            latest: None,
            next_tick: None,
            counters: Counters::default(),
            hook: None,
        };
        let t0 = Instant::now();
        let tick = Duration::from_secs(5);
        assert_eq!(inner.observe(t0 + tick, tick), t0 + tick);
        assert_eq!(inner.next_tick, Some(t0 + tick * 2));
        assert_eq!(
            inner.observe(t0, tick),
            t0 + tick,
            "an earlier now is clamped"
        );
        assert_eq!(
            inner.next_tick,
            Some(t0 + tick * 2),
            "the tick clock starts once"
        );
    }
}
