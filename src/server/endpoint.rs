//! The sans-IO DTLS endpoint: datagrams and the current time in; datagrams to send, events and
//! the next deadline out.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

use openssl::ssl::{Ssl, SslRef};
use openssl::x509::X509;

use super::config::{PeerInfo, ServerConfig, MAX_RECORD_PLAINTEXT};
use super::peer::{Peer, Progress};
use super::record::{screen, ClientHello, HandshakeBudget, NotHello, Screened};
use crate::{
    ffi, Authenticated, Dsm, DsmStats, Error, FreeReason, PeerState, PendingLookup, SendError,
    SessionCache,
};

/// [`Event::Data`] and [`Event::Dropped`] events kept for [`Endpoint::poll_event`] before further
/// ones are only counted ([`EndpointStats::dropped_events`]). `Connected` and `Closed` events are
/// always kept: there is at most one of each per handshake.
const MAX_QUEUED_EVENTS: usize = 4096;
/// A peer's DTLS deadline that moved earlier by less than this keeps its timer entry (it fires
/// that much later at most), so the heap does not grow with every datagram.
const TIMER_SLACK: Duration = Duration::from_millis(1);
/// Stale timer entries allowed beyond two per peer before the heap is rebuilt.
const TIMER_HEAP_SPARE: usize = 64;

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
    /// that finished it (by the times the driver handed the endpoint).
    pub handshake_time: Duration,
}

impl ConnectionInfo {
    fn from_ssl(ssl: &SslRef, handshake_time: Duration) -> Self {
        Self {
            resumed: ssl.session_reused(),
            cipher: ssl.current_cipher().map_or("", |c| c.name()),
            peer_certificate: ssl.peer_certificate(),
            psk_identity: ssl.psk_identity().map(<[u8]>::to_vec),
            handshake_time,
        }
    }
}

/// Something that happened, from [`Endpoint::poll_event`].
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
    /// A peer's state was freed; sending to it now fails with [`SendError::UnknownPeer`].
    Closed {
        /// The peer.
        peer: SocketAddr,
        /// Why.
        reason: CloseReason,
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
    /// The application called [`Endpoint::close`] (close_notify sent; the session stays
    /// resumable).
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
    /// [`Endpoint::close_all`] (server shutdown).
    Shutdown,
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
}

/// The endpoint's counters, from [`Endpoint::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointStats {
    /// Datagrams handed to [`Endpoint::handle`].
    pub datagrams_in: u64,
    /// Datagrams produced for [`Endpoint::poll_transmit`].
    pub datagrams_out: u64,
    /// HelloVerifyRequests sent without creating state.
    pub hello_verify_requests: u64,
    /// ClientHellos with a cookie that did not verify (answered with a fresh HelloVerifyRequest).
    pub bad_cookies: u64,
    /// Datagrams dropped as garbage.
    pub dropped_garbage: u64,
    /// Datagrams from unknown peers that were not ClientHellos.
    pub dropped_not_client_hello: u64,
    /// Fragmented ClientHellos dropped.
    pub dropped_fragmented: u64,
    /// Oversized datagrams dropped.
    pub dropped_oversize: u64,
    /// ClientHellos with impossible sequence numbers dropped.
    pub dropped_bad_sequence: u64,
    /// Cookie-valid ClientHellos refused by the DSM (no slot, budget or quota).
    pub dropped_no_space: u64,
    /// Datagrams for known peers discarded unread ([`DropReason::Invalid`]).
    pub dropped_invalid: u64,
    /// Data and Dropped events not queued because [`Endpoint::poll_event`] was not called.
    pub dropped_events: u64,
    /// Handshakes completed (full and resumed).
    pub handshakes: u64,
    /// Of those, resumed.
    pub resumed: u64,
    /// Connections that failed.
    pub failed: u64,
    /// Peers closed by their close_notify.
    pub closed: u64,
    /// Peers closed by the application ([`Endpoint::close`]).
    pub closed_locally: u64,
    /// Handshakes freed by the handshake timeout.
    pub handshake_timeouts: u64,
    /// Peers shut down as idle or evicted.
    pub idle_closed: u64,
    /// Application records received.
    pub records_received: u64,
    /// Application bytes received.
    pub bytes_received: u64,
    /// Application records sent ([`Endpoint::send`]).
    pub records_sent: u64,
    /// Application bytes sent.
    pub bytes_sent: u64,
    /// Sends refused with [`SendError::QueueFull`].
    pub send_queue_full: u64,
    /// Calls of [`Endpoint::handle_timeout`].
    pub timeouts_handled: u64,
    /// Peers now.
    pub peers: u64,
    /// Peers now in the handshake.
    pub handshaking: u64,
    /// The most peers ever in the handshake at once.
    pub max_handshaking: u64,
    /// Handshakes suspended while a remote store looked their session up (parked peers).
    pub lookups_parked: u64,
    /// Of those, the ones that went on because the lookup completed.
    pub lookups_completed: u64,
    /// Of those, the ones that went on without it: the lookup took longer than
    /// [`lookup_timeout`](crate::ServerConfigBuilder::lookup_timeout) (a full handshake follows).
    pub lookups_timed_out: u64,
    /// Datagrams dropped because a parked peer already had
    /// [`parked_datagrams`](crate::ServerConfigBuilder::parked_datagrams) waiting.
    pub dropped_parked: u64,
    /// Peers parked now.
    pub parked: u64,
    /// Datagrams of handshaking peers dropped because they held only records over the
    /// handshake's buffering budget ([`DropReason::OverBudget`]).
    pub dropped_over_budget: u64,
}

impl EndpointStats {
    /// Adds `other`'s counters to these (for summing workers); gauges add up too, except
    /// `max_handshaking`, which takes the larger.
    pub fn merge(&mut self, other: &Self) {
        let max = self.max_handshaking.max(other.max_handshaking);
        macro_rules! add { ($($f:ident),*) => { $(self.$f += other.$f;)* } }
        add!(
            datagrams_in,
            datagrams_out,
            hello_verify_requests,
            bad_cookies,
            dropped_garbage,
            dropped_not_client_hello,
            dropped_fragmented,
            dropped_oversize,
            dropped_bad_sequence,
            dropped_no_space,
            dropped_invalid,
            dropped_events,
            handshakes,
            resumed,
            failed,
            closed,
            closed_locally,
            handshake_timeouts,
            idle_closed,
            records_received,
            bytes_received,
            records_sent,
            bytes_sent,
            send_queue_full,
            timeouts_handled,
            peers,
            handshaking,
            lookups_parked,
            lookups_completed,
            lookups_timed_out,
            dropped_parked,
            parked,
            dropped_over_budget
        );
        self.max_handshaking = max;
    }

    /// All dropped datagrams.
    pub fn dropped(&self) -> u64 {
        self.dropped_garbage
            + self.dropped_not_client_hello
            + self.dropped_fragmented
            + self.dropped_oversize
            + self.dropped_bad_sequence
            + self.dropped_no_space
            + self.dropped_invalid
            + self.dropped_parked
            + self.dropped_over_budget
    }
}

/// A datagram waiting for `poll_transmit`, and the peer it counts against (0: none).
#[derive(Debug)]
struct Queued {
    transmit: Transmit,
    peer_id: u64,
}

/// A sans-IO DTLS 1.2 server for many peers, demultiplexed by source address.
///
/// The driver (a UDP loop such as [`UdpServer`](crate::UdpServer), a tokio task, a test) feeds it
/// datagrams with [`handle`](Self::handle) and the passing of time with
/// [`handle_timeout`](Self::handle_timeout); it sends what [`poll_transmit`](Self::poll_transmit)
/// returns, hands what [`poll_event`](Self::poll_event) returns to the application, and wakes
/// up at [`poll_timeout`](Self::poll_timeout) at the latest, or when the waker it gave
/// [`set_waker`](Self::set_waker) is woken. The application answers with
/// [`send`](Self::send) and [`close`](Self::close).
///
/// * A ClientHello without a valid cookie gets a HelloVerifyRequest built here, statelessly; only
///   a ClientHello with a valid cookie asks the DSM for a handshake slot and gets an `Ssl`, so a
///   spoofed flood costs an HMAC per datagram and no memory.
/// * Peers move through the DSM's states; its sweep frees stalled handshakes and shuts idle
///   peers down with close_notify, which keeps their sessions resumable. Only authenticated
///   records keep a peer alive.
/// * Each application record becomes one [`Event::Data`].
///
/// ```
/// use std::time::Instant;
/// use openssl_session_cache::{Endpoint, Event, ServerConfig, SessionCache};
///
/// let config = ServerConfig::builder(SessionCache::builder().build()?).build()?;
/// let mut endpoint = Endpoint::new(config)?;
/// # let (from, datagram) = ("127.0.0.1:5684".parse()?, &[][..]);
/// // For each datagram read from the socket:
/// endpoint.handle(Instant::now(), from, datagram);
/// while let Some(event) = endpoint.poll_event() {
///     if let Event::Data { peer, data } = event {
///         endpoint.send(peer, &data.to_ascii_uppercase())?;
///     }
/// }
/// while let Some(transmit) = endpoint.poll_transmit() {
///     // socket.send_to(&transmit.payload, transmit.to)?;
/// #   let _ = transmit;
/// }
/// // Then sleep until endpoint.poll_timeout() and call endpoint.handle_timeout(now).
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Endpoint {
    config: Arc<ServerConfig>,
    dsm: Dsm<SocketAddr>,
    peers: HashMap<SocketAddr, Peer>,
    next_peer_id: u64,
    /// DTLS retransmission deadlines, at most one live entry per peer (its `scheduled`); entries
    /// whose peer moved on are skipped lazily.
    timers: BinaryHeap<Reverse<(Instant, SocketAddr, u64)>>,
    transmits: VecDeque<Queued>,
    events: VecDeque<Event>,
    /// Data and Dropped events in `events`.
    bounded_events: usize,
    stats: EndpointStats,
    scratch: Vec<Progress>,
    waker: Option<Waker>,
    /// Peers whose handshake waits for a session lookup.
    parked: HashMap<SocketAddr, Parked>,
    /// Their lookup deadlines (entries of peers no longer parked are skipped).
    park_timers: BinaryHeap<Reverse<(Instant, SocketAddr, u64)>>,
    /// Parked peers whose lookup completed, filled by their wakers from any thread.
    ready: Arc<parking_lot::Mutex<Vec<(SocketAddr, u64)>>>,
    /// The latest time the endpoint was given (what `poll_timeout` answers when work is ready).
    last_now: Option<Instant>,
    /// When each handshaking peer's cookie verified ([`ConnectionInfo::handshake_time`]).
    handshake_started: HashMap<SocketAddr, Instant>,
    /// What each peer still in its handshake may make OpenSSL buffer (by peer id).
    budgets: HashMap<SocketAddr, (u64, HandshakeBudget)>,
}

/// A peer waiting for its session lookup.
struct Parked {
    id: u64,
    lookup: PendingLookup,
    deadline: Instant,
}

/// The waker a parked peer's lookup wakes: records the peer as ready and wakes the driver.
struct ParkWake {
    addr: SocketAddr,
    id: u64,
    ready: Arc<parking_lot::Mutex<Vec<(SocketAddr, u64)>>>,
    driver: Option<Waker>,
}

impl Wake for ParkWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.lock().push((self.addr, self.id));
        if let Some(driver) = &self.driver {
            driver.wake_by_ref();
        }
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("peers", &self.peers.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// An endpoint with its own DSM built from `config`'s limits.
    pub fn new(config: Arc<ServerConfig>) -> Result<Self, Error> {
        let dsm = Dsm::new(config.dsm.clone())?;
        Ok(Self {
            config,
            dsm,
            peers: HashMap::new(),
            next_peer_id: 1,
            timers: BinaryHeap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            bounded_events: 0,
            stats: EndpointStats::default(),
            scratch: Vec::new(),
            waker: None,
            parked: HashMap::new(),
            park_timers: BinaryHeap::new(),
            ready: Arc::default(),
            last_now: None,
            handshake_started: HashMap::new(),
            budgets: HashMap::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Arc<ServerConfig> {
        &self.config
    }

    /// Gives the endpoint the driver's waker. Work that completes later, such as a remote session
    /// lookup, wakes it; the driver must then call [`handle_timeout`](Self::handle_timeout) with
    /// the current time (even if [`poll_timeout`](Self::poll_timeout) is not due). A later call
    /// replaces the waker.
    pub fn set_waker(&mut self, waker: Waker) {
        self.waker = Some(waker);
    }

    /// The waker from [`set_waker`](Self::set_waker), if any.
    pub fn waker(&self) -> Option<&Waker> {
        self.waker.as_ref()
    }

    /// Processes one datagram received from `from` at `now`.
    pub fn handle(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.stats.datagrams_in += 1;
        self.last_now = Some(now);
        self.rotate_cookies(now);
        if datagram.len() > self.config.max_datagram {
            self.drop_datagram(from, DropReason::Oversize);
            return;
        }
        if let Some(peer) = self.peers.get_mut(&from) {
            let restart = peer.is_established() && Self::is_client_hello(datagram);
            if !restart {
                let mut payload = match screen(datagram, peer.min_protected_body()) {
                    Screened::Whole(d) => d.to_vec(),
                    Screened::Kept(d) => d,
                    Screened::Nothing => return self.drop_datagram(from, DropReason::Invalid),
                };
                if let Some((id, budget)) = self.budgets.get_mut(&from) {
                    if *id == peer.id {
                        payload = match budget.admit(&payload) {
                            Screened::Whole(_) => payload,
                            Screened::Kept(d) => d,
                            Screened::Nothing => {
                                return self.drop_datagram(from, DropReason::OverBudget)
                            }
                        };
                    }
                }
                if self.parked.contains_key(&from) {
                    // Its handshake waits for a lookup: keep the datagram for when it goes on.
                    if peer.inbound_len() >= self.config.parked_datagrams {
                        return self.drop_datagram(from, DropReason::Parked);
                    }
                    peer.push(payload);
                    return;
                }
                peer.push(payload);
                peer.drive(now, &mut self.scratch);
                self.after_drive(now, from);
                return;
            }
            // A new epoch-0 ClientHello on an established association: answer it like one from
            // an unknown peer; the old association goes only once the new cookie verifies.
        }
        self.handle_unknown(now, from, datagram);
    }

    fn is_client_hello(datagram: &[u8]) -> bool {
        ClientHello::parse(datagram).is_ok()
    }

    fn handle_unknown(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let hello = match ClientHello::parse(datagram) {
            Ok(h) => h,
            Err(NotHello::Garbage) => return self.drop_datagram(from, DropReason::Garbage),
            Err(NotHello::NotClientHello) => {
                return self.drop_datagram(from, DropReason::NotClientHello)
            }
            Err(NotHello::Fragmented) => return self.drop_datagram(from, DropReason::Fragmented),
        };
        let cookie_ok =
            !hello.cookie().is_empty() && self.config.cookies.verify(from, hello.cookie());
        if !cookie_ok {
            if !hello.cookie().is_empty() {
                self.stats.bad_cookies += 1;
            }
            let cookie = self.config.cookies.generate(from);
            self.stats.hello_verify_requests += 1;
            let payload = hello.hello_verify_request(&cookie);
            self.transmit(from, payload, 0);
            return;
        }
        // Before the cookie exchange the client's hello had message_seq 0; a retransmission of
        // it with the cookie has 1. A hello that was never answered statelessly (0) is fed as is.
        // A hello answering a HelloVerifyRequest follows an earlier record: record sequence > 0.
        let after_hvr = match (hello.message_seq(), hello.record_seq()) {
            (0, _) => false,
            (1, 1..) => true,
            _ => return self.drop_datagram(from, DropReason::BadSequence),
        };
        if self.peers.contains_key(&from) {
            self.close_peer(from, CloseReason::Replaced, true);
        }
        if !self.admit(now, from) {
            return self.drop_datagram(from, DropReason::NoSpace);
        }
        let mut peer = match self.new_peer(from, hello.cookie()) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create an ssl for a peer");
                self.dsm.remove(&from);
                self.stats.failed += 1;
                return;
            }
        };
        peer.push(datagram.to_vec());
        // DTLSv1_listen takes the hello as the answer to a HelloVerifyRequest (sequence numbers
        // set, cookie checked against the one verified above) without OpenSSL processing a
        // first hello only for its answer to be thrown away.
        if after_hvr && !ffi::dtls_listen(peer.ssl()) {
            peer.discard_outbound();
            drop(peer);
            self.dsm.remove(&from);
            return self.drop_datagram(from, DropReason::BadSequence);
        }
        peer.drive(now, &mut self.scratch);
        self.budgets
            .insert(from, (peer.id, HandshakeBudget::default()));
        self.peers.insert(from, peer);
        self.handshake_started.insert(from, now);
        self.stats.peers = self.peers.len() as u64;
        self.stats.handshaking += 1;
        self.stats.max_handshaking = self.stats.max_handshaking.max(self.stats.handshaking);
        self.after_drive(now, from);
    }

    /// Asks the DSM for a handshake slot for `from`.
    fn admit(&mut self, now: Instant, from: SocketAddr) -> bool {
        let outcome = self.dsm.store(&from, PeerState::Handshake, (), false, now);
        if let Some((evicted, ())) = outcome.evicted {
            // The DSM reclaims an expired handshake or (with `evict_idle_after`) evicts the least
            // recently used idle peer; the latter is shut down so its session stays resumable.
            let handshaking = self
                .peers
                .get(&evicted)
                .is_some_and(|p| !p.is_established());
            if handshaking {
                self.close_peer(evicted, CloseReason::HandshakeTimeout, false);
            } else {
                self.close_peer(evicted, CloseReason::Evicted, true);
            }
        }
        outcome.previous != PeerState::NoSpace
    }

    fn new_peer(&mut self, from: SocketAddr, verified_cookie: &[u8]) -> Result<Peer, Error> {
        let mut ssl = Ssl::new(&self.config.ctx)?;
        ssl.set_ex_data(
            self.config.peer_addr,
            PeerInfo {
                addr: from,
                verified_cookie: verified_cookie.to_vec(),
            },
        );
        ssl.set_mtu(self.config.mtu)?;
        let id = self.next_peer_id;
        self.next_peer_id += 1;
        Ok(Peer::new(ssl, id)?)
    }

    /// Handles what driving the peer at `addr` produced: events, DSM updates, transmits, timer.
    fn after_drive(&mut self, now: Instant, addr: SocketAddr) {
        let mut progress = std::mem::take(&mut self.scratch);
        let mut end = None;
        let mut touched = false;
        let mut suspended = false;
        for p in progress.drain(..) {
            match p {
                Progress::Established => {
                    self.budgets.remove(&addr);
                    self.dsm
                        .store(&addr, PeerState::Established, (), false, now);
                    self.stats.handshakes += 1;
                    self.stats.handshaking = self.stats.handshaking.saturating_sub(1);
                    let Some(peer) = self.peers.get(&addr) else {
                        continue;
                    };
                    let started = self.handshake_started.remove(&addr).unwrap_or(now);
                    let info = ConnectionInfo::from_ssl(
                        peer.ssl(),
                        now.saturating_duration_since(started),
                    );
                    self.stats.resumed += u64::from(info.resumed);
                    tracing::debug!(%addr, resumed = info.resumed, cipher = info.cipher, "dtls handshake done");
                    self.event(Event::Connected { peer: addr, info });
                }
                Progress::Data(data) => {
                    if !touched {
                        touched = true;
                        if let Some(proof) = self
                            .peers
                            .get(&addr)
                            .and_then(|p| Authenticated::from_ssl(p.ssl()))
                        {
                            self.dsm.touch(&addr, proof, now);
                        }
                    }
                    self.stats.records_received += 1;
                    self.stats.bytes_received += data.len() as u64;
                    self.event(Event::Data { peer: addr, data });
                }
                Progress::Closed => end = Some(CloseReason::CloseNotify),
                Progress::Failed => end = Some(CloseReason::Failed),
                Progress::Suspended => suspended = true,
            }
        }
        self.scratch = progress;
        self.flush_peer(addr);
        if let Some(reason) = end {
            self.close_peer(addr, reason, false);
        } else if suspended {
            self.park(now, addr);
        } else {
            self.schedule(addr);
        }
    }

    /// Parks the peer at `addr`, whose handshake waits for a session lookup: its datagrams wait,
    /// the lookup's completion wakes the driver, and past the lookup timeout it goes on without.
    fn park(&mut self, now: Instant, addr: SocketAddr) {
        let Some(peer) = self.peers.get(&addr) else {
            return;
        };
        let id = peer.id;
        let Some(lookup) = SessionCache::pending_lookup(peer.ssl()) else {
            // Completed between the handshake call and here: go on at once.
            self.ready.lock().push((addr, id));
            return;
        };
        let deadline = now + self.config.lookup_timeout;
        lookup.register(&Waker::from(Arc::new(ParkWake {
            addr,
            id,
            ready: Arc::clone(&self.ready),
            driver: self.waker.clone(),
        })));
        self.stats.lookups_parked += 1;
        self.parked.insert(
            addr,
            Parked {
                id,
                lookup,
                deadline,
            },
        );
        self.stats.parked = self.parked.len() as u64;
        self.park_timers.push(Reverse((deadline, addr, id)));
    }

    /// Drives the parked peer at `addr` (of id `id`) again, its lookup completed or abandoned.
    fn unpark(&mut self, now: Instant, addr: SocketAddr, id: u64) {
        match self.parked.get(&addr) {
            Some(p) if p.id == id => {}
            _ => {
                // Not parked (any more), or parked only for an instant: drive it if it waits.
                let waiting = self.peers.get(&addr).is_some_and(|p| p.id == id)
                    && !self.parked.contains_key(&addr);
                if waiting {
                    self.drive_peer(now, addr);
                }
                return;
            }
        }
        self.parked.remove(&addr);
        self.stats.parked = self.parked.len() as u64;
        self.drive_peer(now, addr);
    }

    fn drive_peer(&mut self, now: Instant, addr: SocketAddr) {
        if let Some(peer) = self.peers.get_mut(&addr) {
            peer.drive(now, &mut self.scratch);
            self.after_drive(now, addr);
        }
    }

    /// Goes on with parked peers whose lookup completed, and gives up on those past their
    /// lookup timeout.
    fn resume_parked(&mut self, now: Instant) {
        let ready = std::mem::take(&mut *self.ready.lock());
        for (addr, id) in ready {
            if self.parked.get(&addr).is_some_and(|p| p.id == id) {
                self.stats.lookups_completed += 1;
            }
            self.unpark(now, addr, id);
        }
        while let Some(&Reverse((at, addr, id))) = self.park_timers.peek() {
            if at > now {
                break;
            }
            self.park_timers.pop();
            let Some(p) = self.parked.get(&addr) else {
                continue;
            };
            if p.id != id || p.deadline != at {
                continue;
            }
            if p.lookup.abandon() {
                self.stats.lookups_timed_out += 1;
            } else {
                self.stats.lookups_completed += 1;
            }
            self.unpark(now, addr, id);
        }
    }

    /// Makes sure the timer heap wakes the peer at `addr` by its DTLS deadline: pushes an entry
    /// only when the peer has none or its deadline moved earlier than the one it has.
    fn schedule(&mut self, addr: SocketAddr) {
        let Some(peer) = self.peers.get_mut(&addr) else {
            return;
        };
        let Some(deadline) = peer.deadline else {
            return;
        };
        if peer
            .scheduled
            .is_some_and(|at| at <= deadline + TIMER_SLACK)
        {
            return;
        }
        peer.scheduled = Some(deadline);
        self.timers.push(Reverse((deadline, addr, peer.id)));
        if self.timers.len() > 2 * self.peers.len() + TIMER_HEAP_SPARE {
            // Only live entries are kept: one per peer at most.
            self.timers = self
                .peers
                .iter()
                .filter_map(|(a, p)| p.scheduled.map(|at| Reverse((at, *a, p.id))))
                .collect();
        }
    }

    fn flush_peer(&mut self, addr: SocketAddr) {
        if let Some(peer) = self.peers.get_mut(&addr) {
            let out = peer.take_outbound();
            peer.queued += out.len();
            let id = peer.id;
            for payload in out {
                self.transmit(addr, payload, id);
            }
        }
    }

    /// Sends `data` to `peer` as one DTLS application record.
    ///
    /// The record is queued for [`poll_transmit`](Self::poll_transmit) at once. Refused, nothing
    /// is sent and nothing changes: [`SendError::UnknownPeer`] if no peer has that address (never
    /// connected, or closed), [`SendError::NotConnected`] before its [`Event::Connected`],
    /// [`SendError::QueueFull`] while the peer has
    /// [`send_queue`](crate::ServerConfigBuilder::send_queue) datagrams waiting for
    /// `poll_transmit`, [`SendError::TooLarge`] over [`MAX_RECORD_PLAINTEXT`] bytes. An empty
    /// `data` sends nothing. If OpenSSL fails to write, the peer is closed
    /// ([`CloseReason::Failed`]) and the answer is [`SendError::Failed`].
    pub fn send(&mut self, peer: SocketAddr, data: &[u8]) -> Result<(), SendError> {
        let max = self.config.send_queue;
        let p = self.peers.get_mut(&peer).ok_or(SendError::UnknownPeer)?;
        if !p.is_established() {
            return Err(SendError::NotConnected);
        }
        if data.len() > MAX_RECORD_PLAINTEXT {
            return Err(SendError::TooLarge);
        }
        if p.queued >= max {
            self.stats.send_queue_full += 1;
            return Err(SendError::QueueFull);
        }
        if data.is_empty() {
            return Ok(());
        }
        if p.write(data).is_err() {
            self.flush_peer(peer);
            self.close_peer(peer, CloseReason::Failed, false);
            return Err(SendError::Failed);
        }
        self.stats.records_sent += 1;
        self.stats.bytes_sent += data.len() as u64;
        self.flush_peer(peer);
        Ok(())
    }

    /// Closes `peer`: close_notify if its handshake finished (its session stays resumable), then
    /// its state is freed and [`Event::Closed`] with [`CloseReason::Local`] follows. Returns
    /// whether there was such a peer.
    pub fn close(&mut self, peer: SocketAddr) -> bool {
        if !self.peers.contains_key(&peer) {
            return false;
        }
        self.close_peer(peer, CloseReason::Local, true);
        true
    }

    /// Frees `addr`'s state; with `shutdown`, an established peer is sent close_notify first.
    fn close_peer(&mut self, addr: SocketAddr, reason: CloseReason, shutdown: bool) {
        let Some(mut peer) = self.peers.remove(&addr) else {
            return;
        };
        self.budgets.remove(&addr);
        if let Some(p) = self.parked.remove(&addr) {
            p.lookup.abandon();
            self.stats.parked = self.parked.len() as u64;
        }
        if !peer.is_established() {
            self.stats.handshaking = self.stats.handshaking.saturating_sub(1);
            self.handshake_started.remove(&addr);
        }
        if shutdown {
            peer.close();
            for payload in peer.take_outbound() {
                self.transmit(addr, payload, 0);
            }
        }
        self.dsm.remove(&addr);
        match reason {
            CloseReason::CloseNotify => self.stats.closed += 1,
            CloseReason::Local => self.stats.closed_locally += 1,
            CloseReason::Failed => self.stats.failed += 1,
            CloseReason::HandshakeTimeout => self.stats.handshake_timeouts += 1,
            CloseReason::Idle | CloseReason::Evicted => self.stats.idle_closed += 1,
            CloseReason::Replaced | CloseReason::Shutdown => {}
        }
        self.stats.peers = self.peers.len() as u64;
        tracing::debug!(%addr, ?reason, "peer closed");
        self.event(Event::Closed { peer: addr, reason });
    }

    fn transmit(&mut self, to: SocketAddr, payload: Vec<u8>, peer_id: u64) {
        self.stats.datagrams_out += 1;
        self.transmits.push_back(Queued {
            transmit: Transmit { to, payload },
            peer_id,
        });
    }

    fn drop_datagram(&mut self, from: SocketAddr, reason: DropReason) {
        match reason {
            DropReason::Garbage => self.stats.dropped_garbage += 1,
            DropReason::NotClientHello => self.stats.dropped_not_client_hello += 1,
            DropReason::Fragmented => self.stats.dropped_fragmented += 1,
            DropReason::Oversize => self.stats.dropped_oversize += 1,
            DropReason::BadSequence => self.stats.dropped_bad_sequence += 1,
            DropReason::NoSpace => self.stats.dropped_no_space += 1,
            DropReason::Invalid => self.stats.dropped_invalid += 1,
            DropReason::Parked => self.stats.dropped_parked += 1,
            DropReason::OverBudget => self.stats.dropped_over_budget += 1,
        }
        tracing::trace!(%from, ?reason, "datagram dropped");
        self.event(Event::Dropped { from, reason });
    }

    fn event(&mut self, event: Event) {
        let bounded = matches!(event, Event::Data { .. } | Event::Dropped { .. });
        if bounded {
            if self.bounded_events >= MAX_QUEUED_EVENTS {
                self.stats.dropped_events += 1;
                return;
            }
            self.bounded_events += 1;
        }
        self.events.push_back(event);
    }

    fn rotate_cookies(&self, now: Instant) {
        if let Err(e) = self.config.cookies.rotate_if_due(now) {
            tracing::warn!(error = %e, "cookie secret rotation failed");
        }
    }

    /// Runs everything due at `now`: DTLS retransmissions, the DSM sweep (stalled handshakes,
    /// idle peers), cookie rotation, and work completed since the waker was woken.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.stats.timeouts_handled += 1;
        self.last_now = Some(now);
        self.rotate_cookies(now);
        self.resume_parked(now);
        for (addr, (), reason) in self.dsm.sweep(now) {
            let reason = match reason {
                FreeReason::HandshakeTimeout => CloseReason::HandshakeTimeout,
                FreeReason::Idle => CloseReason::Idle,
                FreeReason::Evicted | FreeReason::Removed => CloseReason::Evicted,
            };
            self.close_peer(addr, reason, true);
        }
        while let Some(&Reverse((at, addr, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(peer) = self.peers.get_mut(&addr) else {
                continue;
            };
            if peer.id != id || peer.scheduled != Some(at) {
                continue;
            }
            peer.scheduled = None;
            match peer.deadline {
                Some(deadline) if deadline <= now + TIMER_SLACK => {
                    peer.handle_timeout(now, &mut self.scratch);
                    self.after_drive(now, addr);
                }
                Some(_) => self.schedule(addr),
                None => {}
            }
        }
    }

    /// The next time [`handle_timeout`](Self::handle_timeout) has something to do.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, addr, id))) = self.timers.peek() {
            let live = self
                .peers
                .get(&addr)
                .is_some_and(|p| p.id == id && p.scheduled == Some(at));
            if live {
                break;
            }
            self.timers.pop();
        }
        while let Some(&Reverse((at, addr, id))) = self.park_timers.peek() {
            if self
                .parked
                .get(&addr)
                .is_some_and(|p| p.id == id && p.deadline == at)
            {
                break;
            }
            self.park_timers.pop();
        }
        let timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
        let park = self.park_timers.peek().map(|Reverse((at, _, _))| *at);
        // A completed lookup is due now.
        let ready = if self.ready.lock().is_empty() {
            None
        } else {
            self.last_now
        };
        [
            timer,
            park,
            ready,
            self.dsm.next_deadline(),
            self.config.cookies.next_rotation(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let Queued { transmit, peer_id } = self.transmits.pop_front()?;
        if peer_id != 0 {
            if let Some(p) = self.peers.get_mut(&transmit.to) {
                if p.id == peer_id {
                    p.queued = p.queued.saturating_sub(1);
                }
            }
        }
        Some(transmit)
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        let event = self.events.pop_front()?;
        if matches!(event, Event::Data { .. } | Event::Dropped { .. }) {
            self.bounded_events -= 1;
        }
        Some(event)
    }

    /// Shuts every peer down (close_notify to established ones, keeping their sessions
    /// resumable) and frees them; send the transmits afterwards.
    pub fn close_all(&mut self) {
        let addrs: Vec<_> = self.peers.keys().copied().collect();
        for addr in addrs {
            self.close_peer(addr, CloseReason::Shutdown, true);
        }
    }

    /// The endpoint's counters.
    pub fn stats(&self) -> EndpointStats {
        self.stats
    }

    /// The endpoint's DSM counters.
    pub fn dsm_stats(&self) -> DsmStats {
        self.dsm.stats()
    }

    /// The DSM state of `peer`.
    pub fn peer_state(&self, peer: SocketAddr) -> PeerState {
        self.dsm.state(&peer)
    }

    /// Whether `peer` finished its handshake and is not closed (so [`send`](Self::send) takes
    /// data for it).
    pub fn is_connected(&self, peer: SocketAddr) -> bool {
        self.peers.get(&peer).is_some_and(Peer::is_established)
    }

    /// Number of peers with state.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Datagrams waiting for [`poll_transmit`](Self::poll_transmit) that count against `peer`'s
    /// [`send_queue`](crate::ServerConfigBuilder::send_queue).
    pub fn queued_datagrams(&self, peer: SocketAddr) -> usize {
        self.peers.get(&peer).map_or(0, |p| p.queued)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use openssl::ssl::{
        ErrorCode, SslContext, SslContextBuilder, SslMethod, SslOptions, SslSession, SslStream,
        SslVerifyMode,
    };

    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::server::config::{
        ServerConfigBuilder, DEFAULT_CIPHERS, DEFAULT_MAX_DATAGRAM, DEFAULT_MTU,
    };
    use crate::server::pipe::DatagramPipe;
    use crate::server::record::test_hello;
    use crate::{DsmConfig, SessionCache};

    fn builder() -> ServerConfigBuilder {
        ServerConfig::builder(SessionCache::builder().build().unwrap())
    }

    fn config_with(dsm: DsmConfig) -> Arc<ServerConfig> {
        builder().dsm(dsm).build().unwrap()
    }

    fn config() -> Arc<ServerConfig> {
        config_with(DsmConfig::new(64))
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// An openssl-crate DTLS client over in-memory datagrams.
    struct Client {
        addr: SocketAddr,
        stream: SslStream<DatagramPipe>,
        established: bool,
        received: Vec<Vec<u8>>,
    }

    impl Client {
        fn new(port: u16, session: Option<&SslSession>) -> Self {
            Self::with(port, session, |_| {})
        }

        /// A client whose context `tweak` changes (cipher list, PSK).
        fn with(
            port: u16,
            session: Option<&SslSession>,
            tweak: impl FnOnce(&mut SslContextBuilder),
        ) -> Self {
            let mut ctx = SslContext::builder(SslMethod::dtls_client()).unwrap();
            ctx.set_verify(SslVerifyMode::NONE);
            ctx.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
            tweak(&mut ctx);
            let ctx = ctx.build();
            let mut ssl = Ssl::new(&ctx).unwrap();
            ssl.set_mtu(1400).unwrap();
            ssl.set_connect_state();
            if let Some(s) = session {
                crate::ffi::set_client_session(&mut ssl, s).unwrap();
            }
            Self {
                addr: addr(port),
                stream: SslStream::new(ssl, DatagramPipe::new()).unwrap(),
                established: false,
                received: Vec::new(),
            }
        }

        /// Runs the client and returns what it wants to send.
        fn drive(&mut self) -> Vec<Vec<u8>> {
            if !self.established {
                match self.stream.do_handshake() {
                    Ok(()) => self.established = true,
                    Err(e) => assert_eq!(e.code(), ErrorCode::WANT_READ, "{e}"),
                }
            }
            if self.established {
                let mut buf = [0u8; 2048];
                loop {
                    match self.stream.ssl_read(&mut buf) {
                        Ok(n) => self.received.push(buf[..n].to_vec()),
                        Err(e) if e.code() == ErrorCode::WANT_READ => break,
                        Err(e) if e.code() == ErrorCode::ZERO_RETURN => break,
                        Err(e) => panic!("client read: {e}"),
                    }
                }
            }
            self.stream.get_mut().take_outbound()
        }

        fn send(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
            self.stream.ssl_write(data).unwrap();
            self.stream.get_mut().take_outbound()
        }
    }

    /// Moves datagrams both ways until nothing moves.
    fn pump(ep: &mut Endpoint, client: &mut Client, now: Instant) {
        let mut out = client.drive();
        for _ in 0..20 {
            for d in out.drain(..) {
                ep.handle(now, client.addr, &d);
            }
            let mut any = false;
            while let Some(t) = ep.poll_transmit() {
                assert_eq!(t.to, client.addr);
                assert!(
                    t.payload.len() <= DEFAULT_MTU as usize,
                    "datagram over the mtu"
                );
                client.stream.get_mut().push(t.payload);
                any = true;
            }
            out = client.drive();
            if !any && out.is_empty() {
                return;
            }
        }
    }

    fn events(ep: &mut Endpoint) -> Vec<Event> {
        std::iter::from_fn(|| ep.poll_event()).collect()
    }

    /// The application of these tests: echoes every record back.
    fn echo(ep: &mut Endpoint) -> Vec<Event> {
        let events = events(ep);
        for e in &events {
            if let Event::Data { peer, data } = e {
                ep.send(*peer, data).unwrap();
            }
        }
        events
    }

    fn connected(events: &[Event]) -> Vec<&ConnectionInfo> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Connected { info, .. } => Some(info),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn records_become_events_and_sends_become_records() {
        let mut ep = Endpoint::new(config()).unwrap();
        let now = Instant::now();
        let mut c = Client::new(1000, None);
        pump(&mut ep, &mut c, now);
        assert!(c.established);
        let ev = events(&mut ep);
        let info = connected(&ev);
        assert_eq!(info.len(), 1);
        assert!(!info[0].resumed);
        assert!(
            DEFAULT_CIPHERS.split(':').any(|c| c == info[0].cipher),
            "{}",
            info[0].cipher
        );
        assert_eq!(
            (&info[0].peer_certificate, &info[0].psk_identity),
            (&None, &None)
        );
        assert!(ep.is_connected(c.addr));
        for d in c.send(b"ping") {
            ep.handle(now, c.addr, &d);
        }
        for d in c.send(b"pong") {
            ep.handle(now, c.addr, &d);
        }
        assert_eq!(
            events(&mut ep),
            vec![
                Event::Data {
                    peer: c.addr,
                    data: b"ping".to_vec()
                },
                Event::Data {
                    peer: c.addr,
                    data: b"pong".to_vec()
                },
            ]
        );
        assert!(ep.poll_transmit().is_none(), "nothing is echoed");
        ep.send(c.addr, b"PING").unwrap();
        ep.send(c.addr, b"").unwrap();
        assert_eq!(
            ep.queued_datagrams(c.addr),
            1,
            "an empty send sends nothing"
        );
        pump(&mut ep, &mut c, now);
        assert_eq!(c.received, vec![b"PING".to_vec()]);
        assert_eq!(ep.queued_datagrams(c.addr), 0);
        let s = ep.stats();
        assert_eq!(s.hello_verify_requests, 1);
        assert_eq!((s.handshakes, s.resumed), (1, 0));
        assert_eq!((s.records_received, s.bytes_received), (2, 8));
        assert_eq!((s.records_sent, s.bytes_sent), (1, 4));
        assert_eq!(ep.peer_state(c.addr), PeerState::Established);
    }

    #[test]
    fn send_refusals_are_typed_and_disturb_nothing() {
        let config = builder().send_queue(3).build().unwrap();
        let mut ep = Endpoint::new(config).unwrap();
        let now = Instant::now();
        assert_eq!(ep.send(addr(9), b"x"), Err(SendError::UnknownPeer));
        // A peer in its handshake takes no data yet.
        half_open(&mut ep, 7, now);
        assert_eq!(ep.send(addr(7), b"x"), Err(SendError::NotConnected));
        while ep.poll_transmit().is_some() {}
        let mut c = Client::new(1000, None);
        pump(&mut ep, &mut c, now);
        assert!(c.established);
        assert_eq!(
            ep.send(c.addr, &vec![0; MAX_RECORD_PLAINTEXT + 1]),
            Err(SendError::TooLarge)
        );
        // The queue counts datagrams not taken by poll_transmit yet.
        for i in 0..3u8 {
            ep.send(c.addr, &[i]).unwrap();
        }
        assert_eq!(ep.send(c.addr, b"one too many"), Err(SendError::QueueFull));
        assert_eq!(ep.stats().send_queue_full, 1);
        assert_eq!(ep.stats().records_sent, 3);
        let first = ep.poll_transmit().unwrap();
        ep.send(c.addr, &[3]).unwrap();
        assert_eq!(ep.send(c.addr, b"full again"), Err(SendError::QueueFull));
        // The refused sends left no trace: the client reads exactly what was accepted.
        c.stream.get_mut().push(first.payload);
        pump(&mut ep, &mut c, now);
        assert_eq!(c.received, vec![vec![0], vec![1], vec![2], vec![3]]);
        assert!(ep.is_connected(c.addr));
        assert_eq!(ep.peer_state(addr(7)), PeerState::Handshake);
        // A closed peer is unknown.
        assert!(ep.close(c.addr));
        assert_eq!(ep.send(c.addr, b"late"), Err(SendError::UnknownPeer));
        assert!(!ep.close(c.addr));
    }

    #[test]
    fn close_from_the_application_sends_close_notify_and_keeps_the_session() {
        let config = config();
        let mut ep = Endpoint::new(Arc::clone(&config)).unwrap();
        let now = Instant::now();
        let mut c = Client::new(1000, None);
        pump(&mut ep, &mut c, now);
        let session = c.stream.ssl().session().unwrap().to_owned();
        while ep.poll_event().is_some() {}
        assert!(ep.close(c.addr));
        assert_eq!(
            events(&mut ep),
            vec![Event::Closed {
                peer: c.addr,
                reason: CloseReason::Local
            }]
        );
        assert_eq!((ep.peer_count(), ep.stats().closed_locally), (0, 1));
        assert_eq!(ep.peer_state(c.addr), PeerState::None);
        let bye = ep.poll_transmit().expect("close_notify");
        c.stream.get_mut().push(bye.payload);
        c.drive();
        assert!(c
            .stream
            .get_shutdown()
            .contains(openssl::ssl::ShutdownState::RECEIVED));
        let mut again = Client::new(1001, Some(&session));
        pump(&mut ep, &mut again, now);
        assert!(again.stream.ssl().session_reused());
        assert!(connected(&events(&mut ep))[0].resumed);
    }

    fn psk_client(port: u16, session: Option<&SslSession>, cipher: &str) -> Client {
        let cipher = cipher.to_owned();
        Client::with(port, session, move |b| {
            // CCM8 passes the client's own security level on OpenSSL 3.2+ only with this.
            crate::rate_ccm8_by_key_size(b);
            b.set_cipher_list(&cipher).unwrap();
            b.set_psk_client_callback(|_, _, identity, key| {
                identity[..8].copy_from_slice(b"client1\0");
                key[..16].copy_from_slice(&[0x42; 16]);
                Ok(16)
            });
        })
    }

    #[test]
    fn connected_reports_the_psk_identity_on_resumption_too() {
        let config = builder()
            .psk_lookup(|id| (id == b"client1").then(|| vec![0x42; 16]))
            .build()
            .unwrap();
        let mut ep = Endpoint::new(config).unwrap();
        let now = Instant::now();
        let mut c = psk_client(1000, None, "PSK-AES128-CCM8");
        pump(&mut ep, &mut c, now);
        assert!(c.established);
        let session = c.stream.ssl().session().unwrap().to_owned();
        let ev = events(&mut ep);
        let info = connected(&ev)[0];
        assert_eq!(info.cipher, "PSK-AES128-CCM8");
        assert_eq!(info.psk_identity.as_deref(), Some(&b"client1"[..]));
        assert!(info.peer_certificate.is_none());
        c.stream.shutdown().unwrap();
        for d in c.stream.get_mut().take_outbound() {
            ep.handle(now, c.addr, &d);
        }
        while ep.poll_transmit().is_some() {}
        let mut again = psk_client(1001, Some(&session), "PSK-AES128-CCM8");
        pump(&mut ep, &mut again, now);
        assert!(again.stream.ssl().session_reused());
        let ev = events(&mut ep);
        let info = connected(&ev)[0];
        assert!(info.resumed);
        assert_eq!(info.psk_identity.as_deref(), Some(&b"client1"[..]));
    }

    #[test]
    fn an_unknown_psk_identity_fails_the_handshake() {
        let config = builder()
            .psk_lookup(|id| (id == b"someone else").then(|| vec![0x42; 16]))
            .build()
            .unwrap();
        let mut ep = Endpoint::new(config).unwrap();
        let mut c = psk_client(1000, None, "PSK-AES128-CCM8");
        for d in c.drive() {
            ep.handle(Instant::now(), c.addr, &d);
        }
        let hvr = ep.poll_transmit().unwrap();
        c.stream.get_mut().push(hvr.payload);
        for d in c.drive() {
            ep.handle(Instant::now(), c.addr, &d);
        }
        for t in std::iter::from_fn(|| ep.poll_transmit()) {
            c.stream.get_mut().push(t.payload);
        }
        // The client's key exchange names the identity; the server fails the handshake.
        let _ = c.stream.do_handshake();
        for d in c.stream.get_mut().take_outbound() {
            ep.handle(Instant::now(), c.addr, &d);
        }
        assert!(!c.established);
        assert_eq!(ep.stats().failed, 1);
        assert!(connected(&events(&mut ep)).is_empty());
    }

    #[test]
    fn close_notify_keeps_the_session_resumable() {
        let config = config();
        let mut ep = Endpoint::new(Arc::clone(&config)).unwrap();
        let now = Instant::now();
        let mut c = Client::new(1000, None);
        pump(&mut ep, &mut c, now);
        let session = c.stream.ssl().session().unwrap().to_owned();
        c.stream.shutdown().unwrap();
        for d in c.stream.get_mut().take_outbound() {
            ep.handle(now, c.addr, &d);
        }
        assert_eq!(ep.peer_count(), 0);
        assert!(events(&mut ep).contains(&Event::Closed {
            peer: c.addr,
            reason: CloseReason::CloseNotify
        }));
        let answer = ep.poll_transmit().expect("close_notify answered");
        assert_eq!(answer.to, c.addr);
        let mut again = Client::new(1001, Some(&session));
        pump(&mut ep, &mut again, now);
        assert!(again.established);
        assert!(again.stream.ssl().session_reused());
        assert_eq!(ep.stats().resumed, 1);
        assert_eq!(config.session_cache().stats().hits, 1);
    }

    /// An epoch-1 DTLS 1.2 record of `content_type` with `body` (what an off-path attacker who
    /// knows the peer's address can send).
    fn epoch1_record(content_type: u8, seq: u64, body: &[u8]) -> Vec<u8> {
        let mut rec = vec![content_type, 0xfe, 0xfd, 0, 1];
        rec.extend_from_slice(&seq.to_be_bytes()[2..]);
        rec.extend_from_slice(&(body.len() as u16).to_be_bytes());
        rec.extend_from_slice(body);
        rec
    }

    #[test]
    fn spoofed_datagrams_from_a_peers_address_change_nothing() {
        let config = config();
        let mut ep = Endpoint::new(Arc::clone(&config)).unwrap();
        let now = Instant::now();
        let mut c = Client::new(1000, None);
        pump(&mut ep, &mut c, now);
        assert!(c.established);
        let session = c.stream.ssl().session().unwrap().to_owned();
        while ep.poll_event().is_some() {}
        // An empty datagram (read as end of file), then short epoch-1 records of every content
        // type, then records of garbage the size of real ones: all from the peer's own address.
        ep.handle(now, c.addr, b"");
        let mut seq = 1000;
        for content_type in [0u8, 20, 21, 22, 23, 24, 25, 255] {
            for len in 0..=48 {
                seq += 1;
                let body: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(37)).collect();
                ep.handle(now, c.addr, &epoch1_record(content_type, seq, &body));
            }
        }
        // Two records in one datagram, the second truncated.
        let mut two = epoch1_record(23, 5000, &[1; 40]);
        two.extend_from_slice(&epoch1_record(23, 5001, &[2; 40])[..20]);
        ep.handle(now, c.addr, &two);
        let ev = events(&mut ep);
        assert!(
            !ev.iter().any(|e| matches!(e, Event::Closed { .. })),
            "a spoofed datagram closed the peer: {ev:?}"
        );
        assert_eq!(ep.peer_count(), 1);
        assert_eq!(ep.peer_state(c.addr), PeerState::Established);
        assert_eq!(ep.stats().failed, 0);
        // The peer still works, and its session still resumes.
        for d in c.send(b"still here") {
            ep.handle(now, c.addr, &d);
        }
        echo(&mut ep);
        pump(&mut ep, &mut c, now);
        assert_eq!(
            c.received.last().map(Vec::as_slice),
            Some(&b"still here"[..])
        );
        c.stream.shutdown().unwrap();
        for d in c.stream.get_mut().take_outbound() {
            ep.handle(now, c.addr, &d);
        }
        while ep.poll_transmit().is_some() {}
        let mut again = Client::new(1001, Some(&session));
        pump(&mut ep, &mut again, now);
        assert!(again.stream.ssl().session_reused());
        assert_eq!(config.session_cache().stats().removed, 0);
        assert!(ep.stats().dropped_invalid > 0);
    }

    /// Spoofed epoch-1 records (random bodies of every length 1..100, content types 20 to 23)
    /// from the address of `c`'s established peer: nothing changes, the peer still talks.
    fn spoof_changes_nothing(ep: &mut Endpoint, c: &mut Client, now: Instant) {
        assert!(c.established);
        while ep.poll_event().is_some() {}
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let mut seq = 100;
        for content_type in 20u8..=23 {
            for len in 1..100 {
                seq += 1;
                let body: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                ep.handle(now, c.addr, &epoch1_record(content_type, seq, &body));
            }
        }
        let ev: Vec<_> = events(ep)
            .into_iter()
            .filter(|e| matches!(e, Event::Closed { .. } | Event::Data { .. }))
            .collect();
        assert!(
            ev.is_empty(),
            "a spoofed record reached the application or closed the peer: {ev:?}"
        );
        assert_eq!(ep.peer_state(c.addr), PeerState::Established);
        assert_eq!(ep.stats().failed, 0);
        for d in c.send(b"after the spoof") {
            ep.handle(now, c.addr, &d);
        }
        echo(ep);
        pump(ep, c, now);
        assert_eq!(
            c.received.last().map(Vec::as_slice),
            Some(&b"after the spoof"[..])
        );
    }

    #[test]
    fn spoofed_records_leave_a_cbc_peer_established() {
        // The client offers encrypt-then-MAC, as OpenSSL clients do by default for CBC suites;
        // the server declines it (MAC-then-encrypt), so records with a bad MAC are discarded.
        let cbc = "ECDHE-ECDSA-AES128-SHA256";
        let config = builder().ciphers(cbc).build().unwrap();
        let mut ep = Endpoint::new(config).unwrap();
        let now = Instant::now();
        let mut c = Client::with(1000, None, |b| b.set_cipher_list(cbc).unwrap());
        pump(&mut ep, &mut c, now);
        assert_eq!(c.stream.ssl().current_cipher().map(|c| c.name()), Some(cbc));
        spoof_changes_nothing(&mut ep, &mut c, now);
    }

    #[test]
    fn spoofed_records_leave_a_psk_ccm8_peer_established() {
        let config = builder().psk(b"client1", &[0x42; 16]).build().unwrap();
        let mut ep = Endpoint::new(config).unwrap();
        let now = Instant::now();
        let mut c = psk_client(1000, None, "PSK-AES128-CCM8");
        pump(&mut ep, &mut c, now);
        assert_eq!(
            c.stream.ssl().current_cipher().map(|c| c.name()),
            Some("PSK-AES128-CCM8")
        );
        spoof_changes_nothing(&mut ep, &mut c, now);
        // Bodies under 16 bytes cannot be CCM8 records: screened before OpenSSL.
        assert!(ep.stats().dropped_invalid >= 4 * 15);
    }

    #[test]
    fn a_thousand_datagrams_to_one_peer_leave_the_timer_heap_bounded() {
        let mut ep = Endpoint::new(config()).unwrap();
        // A peer in its handshake runs a DTLS timer; it retransmits its client hello.
        let mut c = Client::new(1000, None);
        for d in c.drive() {
            ep.handle(Instant::now(), c.addr, &d);
        }
        let hvr = ep.poll_transmit().unwrap();
        c.stream.get_mut().push(hvr.payload);
        let hello = c.drive();
        assert_eq!(hello.len(), 1);
        for _ in 0..1000 {
            ep.handle(Instant::now(), c.addr, &hello[0]);
            while ep.poll_transmit().is_some() {}
        }
        assert_eq!(ep.peer_count(), 1);
        assert!(ep.peers[&c.addr].deadline.is_some(), "the timer runs");
        assert!(ep.timers.len() <= 2, "{} timer entries", ep.timers.len());
        // With time standing still for the endpoint while OpenSSL's clock runs, every deadline
        // comes a little earlier; stale entries are still bounded.
        let frozen = Instant::now();
        for _ in 0..1000 {
            ep.handle(frozen, c.addr, &hello[0]);
            while ep.poll_transmit().is_some() {}
        }
        assert!(
            ep.timers.len() <= 2 + TIMER_HEAP_SPARE + 1,
            "{} timer entries",
            ep.timers.len()
        );
        assert!(ep.poll_timeout().is_some());
    }

    #[test]
    fn a_peer_failing_without_an_alert_keeps_its_session() {
        let config = config();
        let mut ep = Endpoint::new(Arc::clone(&config)).unwrap();
        let now = Instant::now();
        let mut c = Client::new(1000, None);
        pump(&mut ep, &mut c, now);
        let session = c.stream.ssl().session().unwrap().to_owned();
        // An empty datagram (a read error under the record layer: DatagramPipe) fails the
        // connection without any alert.
        let peer = ep.peers.get_mut(&c.addr).unwrap();
        peer.push(Vec::new());
        peer.drive(now, &mut ep.scratch);
        ep.after_drive(now, c.addr);
        assert_eq!(ep.stats().failed, 1);
        assert_eq!(ep.peer_count(), 0);
        assert_eq!(config.session_cache().stats().removed, 0);
        let mut again = Client::new(1001, Some(&session));
        pump(&mut ep, &mut again, now);
        assert!(again.stream.ssl().session_reused());
    }

    /// A remote store stand-in: sessions in memory, every lookup held until `release`.
    #[derive(Debug, Default)]
    struct HeldStore {
        inner: std::sync::OnceLock<crate::MemoryStore>,
        held: parking_lot::Mutex<Vec<(crate::SessionId, crate::LookupMode, crate::LookupDone)>>,
    }

    impl HeldStore {
        fn mem(&self) -> &crate::MemoryStore {
            self.inner
                .get_or_init(|| crate::MemoryStore::builder().build().unwrap())
        }

        fn release(&self) -> usize {
            use crate::SessionStore;
            let held: Vec<_> = self.held.lock().drain(..).collect();
            let n = held.len();
            for (id, _, done) in held {
                done.complete(self.mem().get(&id));
            }
            n
        }
    }

    impl crate::SessionStore for HeldStore {
        fn get(
            &self,
            _: &crate::SessionId,
        ) -> Result<Option<crate::StoredSession>, crate::StoreError> {
            panic!("a remote store is never asked synchronously")
        }
        fn put(
            &self,
            id: crate::SessionId,
            s: crate::StoredSession,
        ) -> Result<(), crate::StoreError> {
            self.mem().put(id, s)
        }
        fn take(
            &self,
            _: &crate::SessionId,
        ) -> Result<Option<crate::StoredSession>, crate::StoreError> {
            panic!("a remote store is never asked synchronously")
        }
        fn remove(&self, id: &crate::SessionId) -> Result<bool, crate::StoreError> {
            self.mem().remove(id)
        }
        fn lookup(&self, id: crate::SessionId, mode: crate::LookupMode, done: crate::LookupDone) {
            self.held.lock().push((id, mode, done));
        }
        fn is_remote(&self) -> bool {
            true
        }
    }

    #[derive(Default)]
    struct CountWake(std::sync::atomic::AtomicUsize);

    impl Wake for CountWake {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// An endpoint over a held remote store, a session made by a first client, and the
    /// driver's waker.
    fn parked_setup() -> (Endpoint, Arc<HeldStore>, SslSession, Arc<CountWake>) {
        let store = Arc::new(HeldStore::default());
        let cache = SessionCache::builder()
            .store(store.clone())
            .build()
            .unwrap();
        let config = ServerConfig::builder(cache)
            .lookup_timeout(Duration::from_millis(300))
            .parked_datagrams(2)
            .build()
            .unwrap();
        let mut ep = Endpoint::new(config).unwrap();
        let wake = Arc::new(CountWake::default());
        ep.set_waker(Waker::from(wake.clone()));
        let now = Instant::now();
        let mut first = Client::new(1000, None);
        pump(&mut ep, &mut first, now);
        let session = first.stream.ssl().session().unwrap().to_owned();
        first.stream.shutdown().unwrap();
        for d in first.stream.get_mut().take_outbound() {
            ep.handle(now, first.addr, &d);
        }
        while ep.poll_transmit().is_some() {}
        while ep.poll_event().is_some() {}
        (ep, store, session, wake)
    }

    #[test]
    fn a_parked_peer_waits_for_its_lookup_while_others_are_served_then_resumes() {
        let (mut ep, store, session, wake) = parked_setup();
        let now = Instant::now();
        // An established peer that will keep talking while the other one is parked.
        let mut busy = Client::new(2000, None);
        pump(&mut ep, &mut busy, now);
        while ep.poll_event().is_some() {}
        // The resuming client: cookie exchange, then its ClientHello parks it.
        let mut resuming = Client::new(1001, Some(&session));
        pump(&mut ep, &mut resuming, now);
        assert!(!resuming.established);
        assert_eq!(store.held.lock().len(), 1);
        let s = ep.stats();
        assert_eq!((s.lookups_parked, s.parked), (1, 1), "{s:?}");
        assert_eq!(ep.peer_state(resuming.addr), PeerState::Handshake);
        // Its retransmissions wait, bounded (2 here); the rest is dropped and counted.
        for _ in 0..4 {
            ep.handle(now, resuming.addr, &test_hello(9, 1, &[], &[1; 32]));
        }
        assert_eq!(ep.stats().dropped_parked, 2);
        // The established peer is served meanwhile.
        for d in busy.send(b"still served") {
            ep.handle(now, busy.addr, &d);
        }
        assert!(events(&mut ep).contains(&Event::Data {
            peer: busy.addr,
            data: b"still served".to_vec()
        }));
        // Nothing is due before the store answers (but the lookup deadline).
        assert!(
            ep.poll_timeout().unwrap()
                >= now + Duration::from_millis(300) - Duration::from_millis(1)
        );
        // The store answers from another thread: the driver's waker fires, and handle_timeout
        // goes on with the handshake, which resumes.
        let s2 = Arc::clone(&store);
        assert_eq!(std::thread::spawn(move || s2.release()).join().unwrap(), 1);
        assert_eq!(wake.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(ep.poll_timeout().unwrap() <= now);
        ep.handle_timeout(now);
        let s = ep.stats();
        assert_eq!(
            (s.lookups_completed, s.lookups_timed_out, s.parked),
            (1, 0, 0),
            "{s:?}"
        );
        pump(&mut ep, &mut resuming, now);
        assert!(resuming.established && resuming.stream.ssl().session_reused());
        assert_eq!(ep.stats().resumed, 1);
        let cache = ep.config().session_cache().stats();
        assert_eq!(
            (cache.lookups, cache.suspended, cache.hits),
            (1, 1, 1),
            "{cache:?}"
        );
    }

    #[test]
    fn a_lookup_past_its_bound_is_a_full_handshake_never_a_hung_peer() {
        let (mut ep, store, session, _) = parked_setup();
        let now = Instant::now();
        let mut resuming = Client::new(1001, Some(&session));
        pump(&mut ep, &mut resuming, now);
        assert_eq!(ep.stats().parked, 1);
        ep.handle_timeout(now + Duration::from_millis(299));
        assert_eq!(ep.stats().parked, 1, "given up too early");
        let due = ep.poll_timeout().unwrap();
        assert!(due <= now + Duration::from_millis(300));
        ep.handle_timeout(now + Duration::from_millis(300));
        let s = ep.stats();
        assert_eq!((s.lookups_timed_out, s.parked), (1, 0), "{s:?}");
        pump(&mut ep, &mut resuming, now + Duration::from_millis(300));
        assert!(resuming.established);
        assert!(!resuming.stream.ssl().session_reused(), "a full handshake");
        // The answer arriving afterwards changes nothing.
        assert_eq!(store.release(), 1);
        ep.handle_timeout(now + Duration::from_millis(400));
        let cache = ep.config().session_cache().stats();
        assert_eq!((cache.hits, cache.abandoned), (0, 1), "{cache:?}");
        assert_eq!(ep.stats().handshakes, 2);
    }

    #[test]
    fn garbage_and_strays_are_dropped_and_counted() {
        let mut ep = Endpoint::new(config()).unwrap();
        let now = Instant::now();
        ep.handle(now, addr(1), b"");
        ep.handle(now, addr(1), b"GET / HTTP/1.1\r\n\r\n");
        let mut appdata = test_hello(1, 0, &[], &[]);
        appdata[0] = 23;
        ep.handle(now, addr(2), &appdata);
        ep.handle(now, addr(3), &vec![22; DEFAULT_MAX_DATAGRAM + 1]);
        let s = ep.stats();
        assert_eq!(s.dropped_garbage, 2);
        assert_eq!(s.dropped_not_client_hello, 1);
        assert_eq!(s.dropped_oversize, 1);
        assert_eq!(s.dropped(), 4);
        assert_eq!(ep.peer_count(), 0);
        assert!(ep.poll_transmit().is_none());
        assert_eq!(ep.dsm_stats().stored, 0);
    }

    #[test]
    fn a_datagram_of_the_maximum_size_is_read_one_byte_more_is_not() {
        let mut ep = Endpoint::new(config()).unwrap();
        let now = Instant::now();
        ep.handle(now, addr(1), &vec![0; DEFAULT_MAX_DATAGRAM]);
        ep.handle(now, addr(1), &vec![0; DEFAULT_MAX_DATAGRAM + 1]);
        let s = ep.stats();
        assert_eq!(
            (s.datagrams_in, s.dropped_garbage, s.dropped_oversize),
            (2, 1, 1)
        );
        assert_eq!(
            format!("{ep:?}"),
            format!("Endpoint {{ peers: 0, stats: {s:?}, .. }}")
        );
    }

    #[test]
    fn the_waker_given_is_the_waker_kept() {
        let mut ep = Endpoint::new(config()).unwrap();
        assert!(ep.waker().is_none());
        let wake = Arc::new(CountWake::default());
        ep.set_waker(Waker::from(Arc::clone(&wake)));
        ep.waker().expect("kept").wake_by_ref();
        assert_eq!(wake.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn a_new_hello_on_an_established_association_gets_a_cookie_and_keeps_the_old_one() {
        let mut ep = Endpoint::new(config()).unwrap();
        let now = Instant::now();
        let mut c = Client::new(9, None);
        pump(&mut ep, &mut c, now);
        assert!(c.established);
        let before = ep.stats().hello_verify_requests;
        ep.handle(now, addr(9), &test_hello(0, 0, &[], &[]));
        assert_eq!(ep.stats().hello_verify_requests, before + 1);
        assert_eq!(ep.poll_transmit().map(|t| t.to), Some(addr(9)));
        assert_eq!(ep.peer_state(addr(9)), PeerState::Established);
    }

    #[test]
    fn a_cookie_hello_that_never_saw_a_verify_request_is_taken_as_it_is() {
        let mut ep = Endpoint::new(config()).unwrap();
        let now = Instant::now();
        ep.handle(now, addr(5), &test_hello(0, 0, &[], &[]));
        let cookie = cookie_of(&ep.poll_transmit().unwrap().payload);
        // Message sequence 0 with a valid cookie: a client that got its cookie earlier.
        ep.handle(now, addr(5), &test_hello(0, 0, &[], &cookie));
        let s = ep.stats();
        assert_eq!((s.hello_verify_requests, s.dropped_bad_sequence), (1, 0));
        assert_eq!(ep.dsm_stats().stored, 1, "it got a handshake slot");
    }

    #[test]
    fn an_idle_peer_evicted_for_a_new_handshake_closes_as_evicted() {
        // One slot; every test client is on 127.0.0.1, so the quota must not refuse first.
        let dsm = DsmConfig::new(1)
            .with_max_per_source(2)
            .with_evict_idle_after(Some(Duration::from_secs(1)));
        let mut ep = Endpoint::new(config_with(dsm)).unwrap();
        let t0 = Instant::now();
        let mut a = Client::new(1, None);
        pump(&mut ep, &mut a, t0);
        assert!(a.established);
        let _ = events(&mut ep);
        half_open(&mut ep, 2, t0 + Duration::from_secs(2));
        let closed: Vec<_> = events(&mut ep)
            .into_iter()
            .filter(|e| matches!(e, Event::Closed { .. }))
            .collect();
        assert_eq!(
            closed,
            vec![Event::Closed {
                peer: addr(1),
                reason: CloseReason::Evicted
            }]
        );
        assert_eq!(ep.peer_state(addr(2)), PeerState::Handshake);
    }

    #[test]
    fn authenticated_data_keeps_a_peer_from_going_idle() {
        let dsm = DsmConfig::new(8).with_idle_tick(Duration::from_secs(10));
        let mut ep = Endpoint::new(config_with(dsm)).unwrap();
        let t0 = Instant::now();
        let mut c = Client::new(3, None);
        pump(&mut ep, &mut c, t0);
        assert!(c.established);
        let at = |s: u64| t0 + Duration::from_secs(s);
        // The sweeper passes every 10 s: a peer unused between two passes goes.
        for s in [5, 10, 15] {
            ep.handle_timeout(at(s));
        }
        for d in c.send(b"still here") {
            ep.handle(at(15), c.addr, &d);
        }
        for s in [20, 25] {
            ep.handle_timeout(at(s));
        }
        assert_eq!(ep.peer_state(addr(3)), PeerState::Established);
        for s in [30, 35, 40, 45] {
            ep.handle_timeout(at(s));
        }
        assert_eq!(
            ep.peer_state(addr(3)),
            PeerState::None,
            "silent for two passes"
        );
    }

    #[test]
    fn the_endpoint_rotates_cookie_secrets_as_time_passes() {
        let config = builder()
            .cookie_rotation(Duration::from_secs(10))
            .build()
            .unwrap();
        let mut ep = Endpoint::new(config).unwrap();
        let t0 = Instant::now();
        ep.handle(t0, addr(5), &test_hello(0, 0, &[], &[]));
        let cookie = cookie_of(&ep.poll_transmit().unwrap().payload);
        // Datagrams from elsewhere carry the clock through two rotation periods.
        for s in [11, 22] {
            ep.handle(t0 + Duration::from_secs(s), addr(6), b"x");
        }
        ep.handle(
            t0 + Duration::from_secs(22),
            addr(5),
            &test_hello(1, 1, &[], &cookie),
        );
        assert_eq!(ep.stats().bad_cookies, 1, "a cookie two secrets old");
        assert_eq!(ep.peer_count(), 0);
    }

    #[test]
    fn dropped_sums_every_drop_counter() {
        let s = EndpointStats {
            dropped_garbage: 1,
            dropped_not_client_hello: 2,
            dropped_fragmented: 4,
            dropped_oversize: 8,
            dropped_bad_sequence: 16,
            dropped_no_space: 32,
            dropped_invalid: 64,
            dropped_parked: 128,
            dropped_over_budget: 256,
            ..EndpointStats::default()
        };
        assert_eq!(s.dropped(), 511);
    }

    fn cookie_of(hvr: &[u8]) -> Vec<u8> {
        hvr[13 + 12 + 3..].to_vec()
    }

    #[test]
    fn cookieless_hellos_keep_no_state() {
        let mut ep = Endpoint::new(config()).unwrap();
        let now = Instant::now();
        for port in 0..1000 {
            ep.handle(now, addr(port), &test_hello(0, 0, &[], &[]));
        }
        assert_eq!(ep.stats().hello_verify_requests, 1000);
        assert_eq!(ep.peer_count(), 0);
        assert_eq!(ep.dsm_stats().stored, 0);
        // A wrong cookie gets a fresh HelloVerifyRequest, not a peer.
        ep.handle(now, addr(5), &test_hello(1, 1, &[], &[0; 32]));
        assert_eq!(ep.stats().bad_cookies, 1);
        assert_eq!(ep.peer_count(), 0);
        // A cookie made for another address does not verify either.
        let hvr = std::iter::from_fn(|| ep.poll_transmit()).last().unwrap();
        assert_eq!(hvr.to, addr(5));
        ep.handle(
            now,
            addr(6),
            &test_hello(1, 1, &[], &cookie_of(&hvr.payload)),
        );
        assert_eq!(ep.stats().bad_cookies, 2);
        assert_eq!(ep.peer_count(), 0);
    }

    /// A real client from `port` does the cookie exchange, sends its second ClientHello and
    /// goes silent.
    fn half_open(ep: &mut Endpoint, port: u16, now: Instant) {
        while ep.poll_transmit().is_some() {}
        let mut c = Client::new(port, None);
        for d in c.drive() {
            ep.handle(now, c.addr, &d);
        }
        let hvr = ep.poll_transmit().unwrap();
        c.stream.get_mut().push(hvr.payload);
        for d in c.drive() {
            ep.handle(now, c.addr, &d);
        }
    }

    #[test]
    fn handshake_budget_is_never_exceeded() {
        let dsm = DsmConfig::new(64).with_max_handshakes(3);
        let mut ep = Endpoint::new(config_with(dsm)).unwrap();
        let now = Instant::now();
        for port in 0..10 {
            half_open(&mut ep, port, now);
        }
        assert_eq!(ep.peer_count(), 3);
        assert_eq!(ep.stats().dropped_no_space, 7);
        assert_eq!(ep.stats().max_handshaking, 3);
        assert_eq!(ep.dsm_stats().handshakes, 3);
    }

    #[test]
    fn stalled_handshake_is_freed_after_the_timeout() {
        let dsm = DsmConfig::new(64).with_handshake_timeout(Duration::from_millis(300));
        let mut ep = Endpoint::new(config_with(dsm)).unwrap();
        let t0 = Instant::now();
        half_open(&mut ep, 7, t0);
        assert_eq!(ep.peer_state(addr(7)), PeerState::Handshake);
        let deadline = ep.poll_timeout().unwrap();
        assert!(deadline <= t0 + Duration::from_millis(300));
        ep.handle_timeout(t0 + Duration::from_millis(299));
        assert_eq!(ep.peer_count(), 1);
        ep.handle_timeout(t0 + Duration::from_millis(300));
        assert_eq!(ep.peer_count(), 0);
        assert_eq!(ep.peer_state(addr(7)), PeerState::None);
        assert_eq!(ep.stats().handshake_timeouts, 1);
        assert!(events(&mut ep).contains(&Event::Closed {
            peer: addr(7),
            reason: CloseReason::HandshakeTimeout
        }));
    }

    #[test]
    fn idle_peer_is_shut_down_and_resumes() {
        let dsm = DsmConfig::new(64).with_idle_tick(Duration::from_secs(1));
        let config = config_with(dsm);
        let mut ep = Endpoint::new(Arc::clone(&config)).unwrap();
        let t0 = Instant::now();
        let mut c = Client::new(1000, None);
        pump(&mut ep, &mut c, t0);
        let session = c.stream.ssl().session().unwrap().to_owned();
        while ep.poll_transmit().is_some() {}
        // The DSM frees a peer unused for two sweeper ticks (one pass per tick).
        ep.handle_timeout(t0 + Duration::from_millis(1500));
        assert_eq!(ep.peer_count(), 1, "one tick of silence is not idle yet");
        let next = ep.poll_timeout().unwrap();
        assert!(next <= t0 + Duration::from_millis(2500));
        ep.handle_timeout(next);
        assert_eq!(ep.peer_count(), 0);
        assert_eq!(ep.stats().idle_closed, 1);
        // The server's close_notify went out.
        let bye = ep.poll_transmit().expect("close_notify");
        c.stream.get_mut().push(bye.payload);
        c.drive();
        assert!(c
            .stream
            .get_shutdown()
            .contains(openssl::ssl::ShutdownState::RECEIVED));
        let mut again = Client::new(1001, Some(&session));
        pump(&mut ep, &mut again, t0 + Duration::from_secs(6));
        assert!(again.stream.ssl().session_reused());
    }

    #[test]
    fn lost_flight_is_retransmitted_by_the_timer() {
        let mut ep = Endpoint::new(config()).unwrap();
        let mut c = Client::new(1000, None);
        // Cookie exchange, then the client's second hello; the server's flight is lost.
        for d in c.drive() {
            ep.handle(Instant::now(), c.addr, &d);
        }
        let hvr = ep.poll_transmit().unwrap();
        c.stream.get_mut().push(hvr.payload);
        for d in c.drive() {
            ep.handle(Instant::now(), c.addr, &d);
        }
        let lost: Vec<_> = std::iter::from_fn(|| ep.poll_transmit()).collect();
        assert!(!lost.is_empty());
        let deadline = ep.poll_timeout().unwrap();
        let wait = deadline.saturating_duration_since(Instant::now());
        assert!(
            wait <= Duration::from_secs(1),
            "first DTLS timer is 1 s, got {wait:?}"
        );
        // Before the deadline nothing is resent.
        ep.handle_timeout(Instant::now());
        assert!(ep.poll_transmit().is_none());
        // OpenSSL's DTLS timer reads the real clock, so this one test waits for it.
        std::thread::sleep(wait + Duration::from_millis(20));
        ep.handle_timeout(Instant::now());
        let resent: Vec<_> = std::iter::from_fn(|| ep.poll_transmit()).collect();
        assert!(!resent.is_empty(), "flight retransmitted");
        for t in resent {
            c.stream.get_mut().push(t.payload);
        }
        pump(&mut ep, &mut c, Instant::now());
        assert!(c.established);
        assert_eq!(ep.stats().handshakes, 1);
    }
}
