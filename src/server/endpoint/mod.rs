//! The sans-IO DTLS endpoint: datagrams and the current time in; datagrams to send, events and
//! the next deadline out.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use openssl::ssl::Ssl;

use super::config::{PeerInfo, ServerConfig, MAX_RECORD_PLAINTEXT};
use super::event::{CloseReason, ConnectionInfo, DropReason, Event, Transmit};
use super::peer::{DsmKey, Peer, Progress};
use super::record::protect::Crypto;
use super::record::{screen, ClientHello, NotHello, Screened};
use super::stats::EndpointStats;
use super::timers::{Timer, TimerHeap};
use crate::dsm::{Authenticated, Dsm, DsmStats, FreeReason, PeerState};
use crate::{ffi, Error, SendError};
use park::ParkedLookups;

pub(crate) mod continuity;
mod farm;
mod lean;
pub(super) mod park;
#[cfg(test)]
mod tests;

/// [`Event::Data`] and [`Event::Dropped`] events kept for [`Endpoint::poll_event`] before further
/// ones are only counted ([`EndpointStats::dropped_events`]). `Connected` and `Closed` events are
/// always kept: there is at most one of each per handshake.
const MAX_QUEUED_EVENTS: usize = 4096;
/// A peer's DTLS deadline that moved earlier by less than this keeps its timer entry (it fires
/// that much later at most), so the heap does not grow with every datagram.
const TIMER_SLACK: Duration = Duration::from_millis(1);

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
    dsm: Dsm<DsmKey>,
    peers: HashMap<SocketAddr, Peer>,
    /// The address of each established peer with a connection ID, by that ID (ours).
    cids: HashMap<Box<[u8]>, SocketAddr>,
    /// This endpoint's worker index (the first byte of its connection IDs).
    worker: u8,
    next_peer_id: u64,
    /// DTLS retransmission deadlines, at most one live entry per peer (its `timer`); entries
    /// whose peer moved on are skipped lazily.
    timers: TimerHeap<SocketAddr>,
    transmits: VecDeque<Queued>,
    events: VecDeque<Event>,
    /// Data and Dropped events in `events`.
    bounded_events: usize,
    stats: EndpointStats,
    scratch: Vec<Progress>,
    waker: Option<Waker>,
    /// The lookup deadlines and completions of peers whose handshake waits for a session
    /// lookup (each peer holds its own lookup).
    parked: ParkedLookups,
    /// The latest time the endpoint was given (what `poll_timeout` answers when work is ready).
    last_now: Option<Instant>,
    /// OpenSSL's AEAD contexts for the records of lean peers.
    crypto: Crypto,
    /// The plaintext of the lean record being opened.
    plain: Vec<u8>,
    /// Saved peers waiting to be claimed (shared by a server's workers).
    restorable: Option<Arc<continuity::Restorable>>,
    /// Shared peers' leases and takeovers (`shared_peers`).
    farm: Option<farm::Farm>,
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
    /// An endpoint with its own DSM built from `config`'s limits (worker 0).
    pub fn new(config: Arc<ServerConfig>) -> Result<Self, Error> {
        Self::for_worker(config, 0)
    }

    /// An endpoint for worker `worker` of a driver with several (`SO_REUSEPORT` sockets): the
    /// index goes into the first byte of its connection IDs, by which the sockets' steering
    /// program sends a peer's `tls12_cid` datagrams to this worker whatever their source.
    pub fn for_worker(config: Arc<ServerConfig>, worker: u8) -> Result<Self, Error> {
        let dsm = Dsm::new(config.dsm.clone())?;
        let farm = config.shared_peers.then(farm::Farm::default);
        Ok(Self {
            config,
            dsm,
            peers: HashMap::new(),
            cids: HashMap::new(),
            worker,
            next_peer_id: 1,
            timers: TimerHeap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            bounded_events: 0,
            stats: EndpointStats::default(),
            scratch: Vec::new(),
            waker: None,
            parked: ParkedLookups::new(),
            last_now: None,
            crypto: Crypto::default(),
            plain: Vec::new(),
            restorable: None,
            farm,
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
        self.handle_datagram(now, from, datagram);
        if self.farm.is_some() {
            self.farm_progress(now);
        }
    }

    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.stats.datagrams_in += 1;
        self.last_now = Some(now);
        if datagram.len() > self.config.max_datagram {
            self.drop_datagram(from, DropReason::Oversize);
            return;
        }
        // A record with one of our connection IDs finds its peer by it, from any address.
        let cid = self
            .config
            .connection_id
            .as_ref()
            .and_then(|layout| layout.cid_of(datagram));
        if let Some(cid) = cid {
            let known = self.cids.get(cid).copied();
            let handshaking = self
                .peers
                .get(&from)
                .is_some_and(|p| !p.is_lean() && p.our_cid() == Some(cid));
            let known = match known {
                None if !handshaking => self.claim(now, from, Some(cid), datagram),
                k => k,
            };
            return match known {
                Some(addr) => self.handle_lean(now, addr, from, datagram),
                // The client's Finished of a handshake that settled a connection ID.
                None if handshaking => self.handle_peer(now, from, datagram),
                // A peer whose host died, its state in the shared store?
                None if self.start_takeover(
                    now,
                    from,
                    Some(cid),
                    datagram,
                    DropReason::UnknownConnectionId,
                ) => {}
                None => self.drop_datagram(from, DropReason::UnknownConnectionId),
            };
        }
        if let Some(peer) = self.peers.get(&from) {
            let restart = peer.is_established() && Self::is_client_hello(datagram);
            if !restart {
                if peer.is_lean() {
                    return self.handle_lean(now, from, from, datagram);
                }
                return self.handle_peer(now, from, datagram);
            }
            // A new epoch-0 ClientHello on an established association: answer it like one from
            // an unknown peer; the old association goes only once the new cookie verifies.
        }
        self.handle_unknown(now, from, datagram);
    }

    /// A datagram for the peer at `from` that keeps its `Ssl` (in its handshake, or of a suite
    /// the endpoint does not protect itself).
    fn handle_peer(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let cid_len = self.config.cid_len();
        let Some(peer) = self.peers.get_mut(&from) else {
            return;
        };
        let mut payload = match screen(datagram, peer.min_protected_body(), cid_len) {
            Screened::Whole(d) => d.to_vec(),
            Screened::Kept(d) => d,
            Screened::Nothing => return self.drop_datagram(from, DropReason::Invalid),
        };
        if let Some(handshake) = peer.handshake.as_mut() {
            payload = match handshake.budget.admit(&payload, cid_len) {
                Screened::Whole(_) => payload,
                Screened::Kept(d) => d,
                Screened::Nothing => return self.drop_datagram(from, DropReason::OverBudget),
            };
        }
        if peer.parked().is_some() {
            // Its handshake waits for a lookup: keep the datagram for when it goes on.
            if peer.inbound_len() >= self.config.parked_datagrams {
                return self.drop_datagram(from, DropReason::Parked);
            }
            peer.push(payload, cid_len);
            return;
        }
        peer.feed(now, payload, cid_len, &mut self.crypto, &mut self.scratch);
        self.after_drive(now, from);
    }

    fn is_client_hello(datagram: &[u8]) -> bool {
        ClientHello::parse(datagram).is_ok()
    }

    fn handle_unknown(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let hello = match ClientHello::parse(datagram) {
            Ok(h) => h,
            Err(NotHello::Garbage) => return self.drop_datagram(from, DropReason::Garbage),
            Err(NotHello::NotClientHello) => {
                // A record of a saved peer waiting to be restored (after a restart)?
                if let Some(addr) = self.claim(now, from, None, datagram) {
                    return self.handle_lean(now, addr, from, datagram);
                }
                // Or of a peer whose host died, its state in the shared store?
                if self.start_takeover(now, from, None, datagram, DropReason::NotClientHello) {
                    return;
                }
                return self.drop_datagram(from, DropReason::NotClientHello);
            }
            Err(NotHello::Fragmented) => return self.drop_datagram(from, DropReason::Fragmented),
        };
        // Secrets checked for rotation where cookies are made and verified, not on every
        // datagram (the timers rotate them on schedule too: `poll_timeout` holds the next).
        self.rotate_cookies(now);
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
        let mut peer = match self.new_peer(now, from, hello.cookie()) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create an ssl for a peer");
                self.dsm.remove(&DsmKey::Addr(from));
                self.stats.failed += 1;
                return;
            }
        };
        peer.push(datagram.to_vec(), 0);
        // DTLSv1_listen takes the hello as the answer to a HelloVerifyRequest (sequence numbers
        // set, cookie checked against the one verified above) without OpenSSL processing a
        // first hello only for its answer to be thrown away.
        if after_hvr && !peer.ssl().is_some_and(ffi::dtls_listen) {
            peer.discard_outbound();
            drop(peer);
            self.dsm.remove(&DsmKey::Addr(from));
            return self.drop_datagram(from, DropReason::BadSequence);
        }
        peer.drive(now, &mut self.scratch);
        self.peers.insert(from, peer);
        self.stats.peers = self.peers.len() as u64;
        self.stats.handshaking += 1;
        self.stats.max_handshaking = self.stats.max_handshaking.max(self.stats.handshaking);
        self.after_drive(now, from);
    }

    /// Asks the DSM for a handshake slot for `from`.
    fn admit(&mut self, now: Instant, from: SocketAddr) -> bool {
        let outcome = self
            .dsm
            .store(&DsmKey::Addr(from), PeerState::Handshake, (), false, now);
        if let Some((evicted, ())) = outcome.evicted {
            let Some(evicted) = self.address_of(&evicted) else {
                return outcome.previous != PeerState::NoSpace;
            };
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

    /// A peer for `from`, whose ClientHello with `verified_cookie` arrived at `now`.
    fn new_peer(
        &mut self,
        now: Instant,
        from: SocketAddr,
        verified_cookie: &[u8],
    ) -> Result<Peer, Error> {
        let mut ssl = Ssl::new(&self.config.ctx)?;
        ssl.set_ex_data(
            self.config.peer_addr,
            PeerInfo {
                addr: from,
                verified_cookie: verified_cookie.to_vec(),
                cid: super::cid::CidNegotiation {
                    worker: self.worker,
                    ..Default::default()
                },
            },
        );
        ssl.set_mtu(self.config.mtu)?;
        let id = self.next_peer_id;
        self.next_peer_id += 1;
        Ok(Peer::new(ssl, id, now, from)?)
    }

    /// Handles what driving the peer at `addr` produced: events, DSM updates, transmits, timer.
    fn after_drive(&mut self, now: Instant, addr: SocketAddr) {
        let mut progress = std::mem::take(&mut self.scratch);
        let mut end = None;
        let mut touched = false;
        let mut suspended = false;
        let mut reported = None;
        for p in progress.drain(..) {
            match p {
                Progress::Established => {
                    if let Some(peer) = self.peers.get(&addr) {
                        self.dsm
                            .store(&peer.dsm_key, PeerState::Established, (), false, now);
                    }
                    self.stats.handshakes += 1;
                    self.stats.handshaking = self.stats.handshaking.saturating_sub(1);
                    let Some(peer) = self.peers.get_mut(&addr) else {
                        continue;
                    };
                    // What only the handshake needed goes now.
                    let handshake = peer.handshake.take();
                    let started = handshake.as_ref().map_or(now, |h| h.started);
                    if let Some(parked) = handshake.and_then(|h| h.parked) {
                        self.parked.forget(parked);
                        self.stats.parked = self.parked.count() as u64;
                    }
                    let Some(ssl) = peer.ssl() else {
                        continue;
                    };
                    let info =
                        ConnectionInfo::from_ssl(ssl, now.saturating_duration_since(started));
                    reported = Some(super::continuity::Reported {
                        resumed: info.resumed,
                        cipher: info.cipher.to_owned(),
                        psk_identity: info.psk_identity.clone(),
                        peer_certificate: info
                            .peer_certificate
                            .as_ref()
                            .filter(|_| self.config.keep_peer_certificates)
                            .and_then(|c| c.to_der().ok()),
                    });
                    self.stats.resumed += u64::from(info.resumed);
                    tracing::debug!(%addr, resumed = info.resumed, cipher = info.cipher, "dtls handshake done");
                    self.event(Event::Connected { peer: addr, info });
                }
                Progress::Data(data) => {
                    if !touched {
                        touched = true;
                        if let Some(peer) = self.peers.get(&addr) {
                            if let Some(proof) = peer.ssl().and_then(Authenticated::from_ssl) {
                                self.dsm.touch(&peer.dsm_key, proof, now);
                            }
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
        } else if let Some(reported) = reported.filter(|_| self.config.lean_peers) {
            self.go_lean(now, addr, reported);
        } else if suspended {
            self.park(now, addr);
        } else {
            self.schedule(addr);
        }
    }

    fn drive_peer(&mut self, now: Instant, addr: SocketAddr) {
        if let Some(peer) = self.peers.get_mut(&addr) {
            peer.drive(now, &mut self.scratch);
            self.after_drive(now, addr);
        }
    }

    /// Makes sure the timer heap wakes the peer at `addr` by its DTLS deadline: pushes an entry
    /// only when the peer has none or its deadline moved earlier than the one it has.
    fn schedule(&mut self, addr: SocketAddr) {
        let Some(peer) = self.peers.get_mut(&addr) else {
            return;
        };
        let Some(deadline) = peer.deadline() else {
            return;
        };
        if peer.timer.is_some_and(|t| t.at() <= deadline + TIMER_SLACK) {
            return;
        }
        peer.timer = Some(self.timers.push(addr, deadline));
        let peers = &self.peers;
        self.timers
            .compact(peers.len(), |a, t| Self::timer_is_live(peers, a, t));
    }

    /// Whether `timer` is the live DTLS timer entry of the peer at `addr`.
    fn timer_is_live(peers: &HashMap<SocketAddr, Peer>, addr: &SocketAddr, timer: Timer) -> bool {
        peers.get(addr).is_some_and(|p| p.timer == Some(timer))
    }

    fn flush_peer(&mut self, addr: SocketAddr) {
        if let Some(peer) = self.peers.get_mut(&addr) {
            let out = peer.take_outbound(&mut self.crypto);
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
    /// `data` sends nothing. If the record cannot be written (OpenSSL fails, or the
    /// association used up its sequence numbers: 2^48 records), the peer is closed
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
        if let Some(lean) = p.lean_mut() {
            // Sealed under the one lookup the checks made.
            let sealed = lean.seal(
                &mut self.crypto,
                super::record::protect::CONTENT_APPLICATION_DATA,
                data,
            );
            let shared = lean.lease().is_some();
            if sealed.is_ok() {
                p.queued += 1;
            }
            let id = p.id;
            return self.sent_lean(peer, id, data.len(), sealed, shared);
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
        if let Some(parked) = peer.handshake.take().and_then(|h| h.parked) {
            self.parked.forget(parked);
            self.stats.parked = self.parked.count() as u64;
        }
        if !peer.is_established() {
            self.stats.handshaking = self.stats.handshaking.saturating_sub(1);
        }
        if peer.is_lean() {
            self.stats.lean = self.stats.lean.saturating_sub(1);
        }
        if shutdown {
            let sealed = peer.close(&mut self.crypto);
            for payload in peer
                .take_outbound(&mut self.crypto)
                .into_iter()
                .chain(sealed)
            {
                self.transmit(addr, payload, 0);
            }
        }
        self.forget_peer(addr, &peer);
        if !matches!(reason, CloseReason::Suspended | CloseReason::LeaseLost)
            && peer.lean().is_some_and(|l| l.lease().is_some())
        {
            let cid = peer.our_cid().map(<[u8]>::to_vec);
            let ours = peer
                .lean()
                .and_then(|l| l.lease())
                .map(crate::server::lease::Lease::ours)
                .unwrap_or_default();
            self.unshare(addr, cid.as_deref(), peer.id, &ours);
        }
        match reason {
            CloseReason::CloseNotify => self.stats.closed += 1,
            CloseReason::Local => self.stats.closed_locally += 1,
            CloseReason::Failed => self.stats.failed += 1,
            CloseReason::HandshakeTimeout => self.stats.handshake_timeouts += 1,
            CloseReason::Idle | CloseReason::Evicted => self.stats.idle_closed += 1,
            CloseReason::LeaseLost => self.stats.leases_lost += 1,
            CloseReason::Replaced | CloseReason::Shutdown | CloseReason::Suspended => {}
        }
        self.stats.peers = self.peers.len() as u64;
        tracing::debug!(%addr, ?reason, "peer closed");
        self.event(Event::Closed { peer: addr, reason });
    }

    /// Removes what the endpoint knows of `peer` (at `addr`) besides its entry: its connection ID
    /// and its DSM slot.
    fn forget_peer(&mut self, addr: SocketAddr, peer: &Peer) {
        if let Some(lean) = peer.lean() {
            // Its keys' schedules in the shared contexts go with it.
            self.crypto.forget(lean.record().keys());
        }
        if let Some(cid) = peer.our_cid() {
            if self.cids.get(cid) == Some(&addr) {
                self.cids.remove(cid);
            }
        }
        self.dsm.remove(&peer.dsm_key);
    }

    fn transmit(&mut self, to: SocketAddr, payload: Vec<u8>, peer_id: u64) {
        self.stats.datagrams_out += 1;
        self.transmits.push_back(Queued {
            transmit: Transmit { to, payload },
            peer_id,
        });
    }

    fn drop_datagram(&mut self, from: SocketAddr, reason: DropReason) {
        self.stats.count_drop(reason);
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
        if self.farm.is_some() {
            self.farm_progress(now);
        }
        for (key, (), reason) in self.dsm.sweep(now) {
            let Some(addr) = self.address_of(&key) else {
                continue;
            };
            let reason = match reason {
                FreeReason::HandshakeTimeout => CloseReason::HandshakeTimeout,
                FreeReason::Idle => CloseReason::Idle,
                FreeReason::Evicted | FreeReason::Removed => CloseReason::Evicted,
            };
            self.close_peer(addr, reason, true);
        }
        loop {
            let peers = &self.peers;
            let due = self
                .timers
                .pop_due(now, |a, t| Self::timer_is_live(peers, a, t));
            let Some((addr, _)) = due else {
                break;
            };
            let Some(peer) = self.peers.get_mut(&addr) else {
                continue;
            };
            peer.timer = None;
            match peer.deadline() {
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
        let peers = &self.peers;
        let timer = self
            .timers
            .next_deadline(|a, t| Self::timer_is_live(peers, a, t));
        let park = self.parked.next_deadline(&self.peers);
        // A completed lookup is due now.
        let ready = if self.parked.any_ready() {
            self.last_now
        } else {
            None
        };
        [
            timer,
            park,
            ready,
            self.dsm.next_deadline(),
            self.config.cookies.next_rotation(),
            self.farm_deadline(),
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
        match self.peers.get(&peer) {
            Some(p) => self.dsm.state(&p.dsm_key),
            None => self.dsm.state(&DsmKey::Addr(peer)),
        }
    }

    /// The address of the peer the DSM knows by `key`.
    fn address_of(&self, key: &DsmKey) -> Option<SocketAddr> {
        match key {
            DsmKey::Addr(addr) => Some(*addr),
            DsmKey::Cid(cid, _) => self.cids.get(cid).copied(),
        }
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
