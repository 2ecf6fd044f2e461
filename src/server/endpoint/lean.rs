//! The endpoint's side of lean peers: taking a peer over from OpenSSL when its handshake
//! finishes, its records in and out, and what an opened record may do to it.

use std::net::SocketAddr;
use std::time::Instant;

use super::Endpoint;
use crate::dsm::Authenticated;
use crate::dsm::PeerState;
use crate::server::event::{CloseReason, DropReason, Event};
use crate::server::peer::DsmKey;
use crate::server::record::protect::{
    Rejected, SealError, CONTENT_ALERT, CONTENT_APPLICATION_DATA, CONTENT_HANDSHAKE,
};
use crate::server::record::records;
use crate::SendError;

/// Handshake message types a lean peer looks at.
const HS_CLIENT_HELLO: u8 = 1;
const HS_FINISHED: u8 = 20;
/// Alert levels and the descriptions a lean peer sends or acts on.
const ALERT_WARNING: u8 = 1;
const ALERT_FATAL: u8 = 2;
const CLOSE_NOTIFY: u8 = 0;
const NO_RENEGOTIATION: u8 = 100;

/// What one opened record asks of the endpoint.
enum Opened {
    /// Application data (possibly empty).
    Data,
    /// The peer's close_notify.
    CloseNotify,
    /// A fatal alert.
    Fatal,
    /// The client retransmitted its Finished: our final flight did not arrive.
    Retransmitted,
    /// A new handshake (renegotiation), which the server refuses, as OpenSSL does.
    Renegotiation,
    /// Nothing to do (a warning alert, an unexpected handshake message).
    Nothing,
}

impl Endpoint {
    /// Takes the association of the peer at `addr`, whose handshake just finished, over from
    /// OpenSSL if its suite is one the endpoint protects.
    pub(super) fn go_lean(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        reported: crate::server::continuity::Reported,
    ) {
        let max_ttl = self.config.session_cache().max_ttl();
        let Some(peer) = self.peers.get_mut(&addr) else {
            return;
        };
        if !peer.go_lean(&mut self.crypto, reported, max_ttl) {
            self.schedule(addr);
            return;
        }
        self.stats.lean += 1;
        peer.timer = None;
        if let Some(cid) = peer.our_cid() {
            // Found by its connection ID from now on, whatever its address; the DSM knows it by
            // that ID too (counted against the source its handshake came from).
            let cid: Box<[u8]> = cid.into();
            let key = DsmKey::Cid(cid.clone(), crate::dsm::PeerKey::source(&addr));
            let old = std::mem::replace(&mut peer.dsm_key, key.clone());
            self.dsm.remove(&old);
            self.dsm.store(&key, PeerState::Established, (), false, now);
            self.cids.insert(cid, addr);
        }
        self.share_new(now, addr);
    }

    /// A datagram from `from` for the lean peer at `addr` (the same address, or, for a peer
    /// with a connection ID, any): each record is opened by the record layer; only a record
    /// that opened may touch, refresh, move or close the peer, and only one newer than every
    /// record before moves it to `from`. A datagram of which nothing opened is dropped
    /// ([`DropReason::Invalid`]) and changes nothing.
    pub(super) fn handle_lean(
        &mut self,
        now: Instant,
        mut addr: SocketAddr,
        from: SocketAddr,
        datagram: &[u8],
    ) {
        if let Some((held_from, held)) = self.take_held(addr) {
            // A record of a peer just taken over waited for its first lease: it goes first.
            self.handle_lean(now, addr, held_from, &held);
        }
        let cid_len = self.config.cid_len();
        let mut opened_any = false;
        let mut opened_n = 0u32;
        let mut end = None;
        for record in records(datagram, cid_len) {
            let Some(peer) = self.peers.get_mut(&addr) else {
                return;
            };
            let Some(lean) = peer.lean_mut() else {
                return;
            };
            let opened = match lean.open(&mut self.crypto, record, &mut self.plain) {
                Ok(o) => o,
                Err(Rejected::Unopened) => {
                    self.stats.records_unopened += 1;
                    if lean.record().unopened() == lean.record().aead().integrity_limit() {
                        // Forgeries stay improbable (each needs the tag guessed), but the AEAD's
                        // bound on failed openings per key is passed: say so. Closing the peer
                        // would hand whoever spoofs its address a way to end it.
                        self.stats.integrity_limits_passed += 1;
                        tracing::warn!(
                            peer = %addr,
                            aead = ?lean.record().aead(),
                            "failed openings under one key reached the aead's integrity limit"
                        );
                    }
                    continue;
                }
                Err(Rejected::Replayed) => {
                    self.stats.records_replayed += 1;
                    continue;
                }
                Err(Rejected::Malformed | Rejected::OtherEpoch | Rejected::Overflow) => continue,
            };
            // The peer looked up once per record, again only after it moved.
            let peer = if from != addr {
                if opened.newest && !self.peers.contains_key(&from) {
                    addr = self.migrate(addr, from);
                } else {
                    // An older record, or one from an address another peer holds: taken, the
                    // peer stays where it is.
                    self.stats.migrations_refused_old += 1;
                }
                let Some(peer) = self.peers.get_mut(&addr) else {
                    return;
                };
                peer
            } else {
                peer
            };
            opened_n += 1;
            if !opened_any {
                opened_any = true;
                self.dsm.touch(&peer.dsm_key, Authenticated::opened(), now);
            }
            let id = peer.id;
            let Some(lean) = peer.lean_mut() else {
                return;
            };
            let plain = &self.plain;
            let what = match opened.content_type {
                CONTENT_APPLICATION_DATA => Opened::Data,
                CONTENT_ALERT => match plain.as_slice() {
                    [_, CLOSE_NOTIFY] => Opened::CloseNotify,
                    [ALERT_FATAL, _] => Opened::Fatal,
                    _ => Opened::Nothing,
                },
                CONTENT_HANDSHAKE => match plain.first() {
                    Some(&HS_FINISHED) => Opened::Retransmitted,
                    Some(&HS_CLIENT_HELLO) => Opened::Renegotiation,
                    _ => Opened::Nothing,
                },
                _ => Opened::Nothing,
            };
            // What the record asks for, taken from the peer while it is borrowed.
            let mut send: Vec<Vec<u8>> = Vec::new();
            match what {
                Opened::Data => {
                    // A protected record of the client's: it has our final flight.
                    lean.flight_arrived();
                }
                Opened::CloseNotify => end = Some(CloseReason::CloseNotify),
                Opened::Fatal => {
                    // As OpenSSL does on a fatal alert: the session must not resume.
                    if let Some(id) = lean.session() {
                        self.config.session_cache().remove_session_id(id);
                    }
                    lean.fail();
                    end = Some(CloseReason::Failed);
                }
                Opened::Retransmitted => {
                    if let Some(flight) = lean.final_flight() {
                        self.stats.final_flights_resent += 1;
                        send.extend(flight.iter().cloned());
                    }
                }
                Opened::Renegotiation => {
                    self.stats.renegotiations_refused += 1;
                    let refusal = [ALERT_WARNING, NO_RENEGOTIATION];
                    send.extend(lean.seal(&mut self.crypto, CONTENT_ALERT, &refusal).ok());
                }
                Opened::Nothing => {}
            }
            if matches!(what, Opened::Data) && !self.plain.is_empty() {
                let data = self.plain.clone();
                self.stats.records_received += 1;
                self.stats.bytes_received += data.len() as u64;
                self.event(Event::Data { peer: addr, data });
            }
            for d in send {
                self.transmit(addr, d, id);
            }
            if end.is_some() {
                break;
            }
        }
        zeroize::Zeroize::zeroize(&mut self.plain);
        if opened_n > 0 && end.is_none() {
            self.share_accepted(now, addr, opened_n);
        }
        match end {
            // close_notify answered with ours, which keeps the session resumable.
            Some(CloseReason::CloseNotify) => self.close_peer(addr, CloseReason::CloseNotify, true),
            Some(reason) => self.close_peer(addr, reason, false),
            None if !opened_any => self.drop_datagram(from, DropReason::Invalid),
            None => {}
        }
    }

    /// Moves the peer with a connection ID at `addr` to `to` (a record from there opened and
    /// was its newest); returns the address it is at now.
    fn migrate(&mut self, addr: SocketAddr, to: SocketAddr) -> SocketAddr {
        let Some(peer) = self.peers.remove(&addr) else {
            return addr;
        };
        if let Some(cid) = peer.our_cid() {
            if let Some(entry) = self.cids.get_mut(cid) {
                *entry = to;
            }
        }
        self.peers.insert(to, peer);
        self.stats.migrations += 1;
        tracing::debug!(from = %addr, %to, "peer moved to a new address");
        self.event(Event::Migrated {
            peer: to,
            previous: addr,
        });
        to
    }

    /// What [`Endpoint::send`] does after sealing a record for the lean peer `id` at `addr`
    /// (the checks done, the peer's queue counted if it sealed): queues the record, or closes
    /// the peer on a failure. `shared`: the peer's state is in a farm's store.
    pub(super) fn sent_lean(
        &mut self,
        addr: SocketAddr,
        id: u64,
        len: usize,
        sealed: Result<Vec<u8>, SealError>,
        shared: bool,
    ) -> Result<(), SendError> {
        match sealed {
            Ok(record) => {
                self.stats.records_sent += 1;
                self.stats.bytes_sent += len as u64;
                self.transmit(addr, record, id);
                if let (true, Some(now)) = (shared, self.last_now) {
                    self.share_due(now, addr);
                }
                Ok(())
            }
            Err(SealError::NoLease) => {
                // As if the network lost it: a lease not stored yet is never written past.
                self.stats.lease_waits += 1;
                if let Some(now) = self.last_now {
                    self.share_due(now, addr);
                }
                Ok(())
            }
            Err(SealError::Exhausted) => {
                // The last sequence number of the epoch is close_notify's.
                tracing::info!(%addr, "write sequence numbers used up; closing the peer");
                self.close_peer(addr, CloseReason::Failed, true);
                Err(SendError::Failed)
            }
            Err(SealError::Crypto) => {
                tracing::warn!(%addr, "sealing a record failed; closing the peer");
                self.close_peer(addr, CloseReason::Failed, false);
                Err(SendError::Failed)
            }
        }
    }
}
