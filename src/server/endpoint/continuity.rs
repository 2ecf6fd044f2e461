//! The endpoint's side of associations carried across a restart: suspending its lean peers,
//! restoring saved ones, and saved peers waiting to be claimed by the worker their first
//! datagram reaches.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl::hash::MessageDigest;

use super::Endpoint;
use crate::cache::policy::{context_keys, psk_fingerprint};
use crate::dsm::PeerState;
use crate::server::continuity::{unix_secs, Binding, SuspendedPeer};
use crate::server::event::{CloseReason, ConnectionInfo, Event};
use crate::server::lean::Lean;
use crate::server::peer::{DsmKey, Peer};
use crate::RestoreError;

/// The names of the AEAD suites OpenSSL offers for DTLS 1.2, for the `&'static str` a restored
/// peer's [`ConnectionInfo::cipher`] is.
const AEAD_SUITES: &[&str] = &[
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-CCM",
    "ECDHE-ECDSA-AES256-CCM",
    "ECDHE-ECDSA-AES128-CCM8",
    "ECDHE-ECDSA-AES256-CCM8",
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-CCM",
    "DHE-RSA-AES256-CCM",
    "DHE-RSA-AES128-CCM8",
    "DHE-RSA-AES256-CCM8",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-CCM",
    "AES256-CCM",
    "AES128-CCM8",
    "AES256-CCM8",
    "PSK-AES128-CCM8",
    "PSK-AES128-CCM",
    "PSK-AES128-GCM-SHA256",
    "PSK-AES256-GCM-SHA384",
    "PSK-CHACHA20-POLY1305",
    "PSK-AES256-CCM",
    "PSK-AES256-CCM8",
    "ECDHE-PSK-CHACHA20-POLY1305",
    "DHE-PSK-AES128-GCM-SHA256",
    "DHE-PSK-AES256-GCM-SHA384",
    "DHE-PSK-CHACHA20-POLY1305",
    "DHE-PSK-AES128-CCM",
    "DHE-PSK-AES256-CCM",
    "DHE-PSK-AES128-CCM8",
    "DHE-PSK-AES256-CCM8",
];

fn static_cipher(name: &str) -> &'static str {
    AEAD_SUITES
        .iter()
        .find(|n| **n == name)
        .copied()
        .unwrap_or("")
}

/// Saved peers handed to a server's workers, each waiting until a datagram of its (by address,
/// or by connection ID) reaches one of them, which then restores it. Shared by the workers.
#[derive(Debug, Default)]
pub(crate) struct Restorable {
    waiting: parking_lot::Mutex<Waiting>,
    /// Whether any peer waits (read without the lock on every unknown datagram).
    any: AtomicBool,
}

#[derive(Debug, Default)]
struct Waiting {
    by_addr: HashMap<SocketAddr, SuspendedPeer>,
    by_cid: HashMap<Box<[u8]>, SocketAddr>,
}

impl Restorable {
    /// Adds `peers` to those waiting.
    pub(crate) fn add(&self, peers: Vec<SuspendedPeer>) {
        let mut w = self.waiting.lock();
        for p in peers {
            if let Some(cid) = p.connection_id() {
                w.by_cid.insert(cid.into(), p.peer());
            }
            w.by_addr.insert(p.peer(), p);
        }
        self.any.store(!w.by_addr.is_empty(), Ordering::Release);
    }

    /// Takes the waiting peer at `addr`, or with connection ID `cid`.
    fn take(&self, addr: SocketAddr, cid: Option<&[u8]>) -> Option<SuspendedPeer> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let mut w = self.waiting.lock();
        let at = match cid {
            Some(cid) => w.by_cid.remove(cid)?,
            None => addr,
        };
        let peer = w.by_addr.remove(&at)?;
        if let Some(cid) = peer.connection_id() {
            w.by_cid.remove(cid);
        }
        self.any.store(!w.by_addr.is_empty(), Ordering::Release);
        Some(peer)
    }

    /// How many wait.
    pub(crate) fn len(&self) -> usize {
        self.waiting.lock().by_addr.len()
    }
}

impl Endpoint {
    /// Takes every established lean peer out of the endpoint without a word to it (no
    /// close_notify: its client keeps the association) and returns their states, to be saved
    /// ([`save_peers`](crate::save_peers)) and restored by the next process
    /// ([`restore`](Self::restore)); each reports [`Event::Closed`] with
    /// [`CloseReason::Suspended`]. Peers that cannot be carried (still in their handshake, or
    /// of a suite that keeps its `Ssl`) are shut down as by [`close_all`](Self::close_all).
    pub fn suspend_all(&mut self) -> Vec<SuspendedPeer> {
        let addrs: Vec<SocketAddr> = self.peers.keys().copied().collect();
        let mut out = Vec::new();
        for addr in addrs {
            match self.suspended(addr) {
                Some(state) => {
                    if let Some(peer) = self.peers.remove(&addr) {
                        self.forget_peer(addr, &peer);
                        self.stats.lean = self.stats.lean.saturating_sub(1);
                        self.stats.suspended += 1;
                        self.stats.peers = self.peers.len() as u64;
                        self.event(Event::Closed {
                            peer: addr,
                            reason: CloseReason::Suspended,
                        });
                        out.push(state);
                    }
                }
                None => self.close_peer(addr, CloseReason::Shutdown, true),
            }
        }
        out
    }

    /// The saved state of the lean peer at `addr`, if it can be carried.
    pub(super) fn suspended(&self, addr: SocketAddr) -> Option<SuspendedPeer> {
        let peer = self.peers.get(&addr)?;
        let lean = peer.lean()?;
        if lean.is_finished() {
            return None;
        }
        let reported = lean.reported().clone();
        let binding = self.binding(reported.psk_identity.as_deref())?;
        let record = lean.record();
        Some(SuspendedPeer {
            addr,
            keys: record.keys().clone(),
            epoch: record.epoch(),
            next_write: record.next_write(),
            window: record.window(),
            cid_in: record.cid_in().map(<[u8]>::to_vec),
            cid_out: Some(record.cid_out().unwrap_or_default().to_vec()),
            session: lean.session().copied(),
            reported,
            expires_at: lean.expires_at(),
            binding,
            versions: lean
                .lease()
                .map(crate::server::lease::Lease::ours)
                .unwrap_or_default(),
        })
    }

    /// What binds a peer to this server now: the PSK fingerprint of `psk_identity`'s current key
    /// (none: the identity is unknown now), or the certificate's SHA-256.
    fn binding(&self, psk_identity: Option<&[u8]>) -> Option<Binding> {
        match psk_identity {
            Some(identity) => {
                let keys = context_keys(&self.config.ctx)?;
                let key = keys(identity)?;
                Some(Binding::Psk(psk_fingerprint(identity, &key)))
            }
            None => {
                let cert = self.config.ctx.certificate()?;
                let digest = cert.digest(MessageDigest::sha256()).ok()?;
                Some(Binding::Certificate(digest.as_ref().try_into().ok()?))
            }
        }
    }

    /// Puts a saved association back, at the address it had, as an established lean peer, and
    /// reports [`Event::Connected`] for it ([`ConnectionInfo::restored`] set); its client goes on
    /// with no handshake. Refused ([`RestoreError`], counted in `restores_refused`, nothing
    /// changed) when its session expired (by the session cache's clock), when it was made by a
    /// server with another certificate or for a PSK identity whose key is not the one it had,
    /// when its address or connection ID is taken, or when the DSM has no slot for it.
    pub fn restore(
        &mut self,
        now: Instant,
        peer: SuspendedPeer,
    ) -> Result<SocketAddr, RestoreError> {
        let versions = peer.versions.clone();
        let outcome = self.try_restore(now, peer);
        match &outcome {
            Ok(addr) => {
                self.stats.restored += 1;
                self.share_restored(now, *addr, &versions);
            }
            Err(why) => {
                tracing::debug!(?why, "saved peer not restored");
                self.stats.restores_refused += 1;
            }
        }
        outcome
    }

    fn try_restore(
        &mut self,
        now: Instant,
        peer: SuspendedPeer,
    ) -> Result<SocketAddr, RestoreError> {
        let wall = self.config.session_cache().wall_clock();
        if unix_secs(wall) >= peer.expires_at {
            return Err(RestoreError::Expired);
        }
        if self.binding(peer.reported.psk_identity.as_deref()) != Some(peer.binding.clone()) {
            return Err(RestoreError::Foreign);
        }
        let addr = peer.addr;
        let cid_ok = match (&peer.cid_in, &self.config.connection_id) {
            (Some(cid), Some(layout)) => cid.len() == layout.len(),
            (Some(_), None) => false,
            (None, _) => true,
        };
        if !cid_ok {
            return Err(RestoreError::Foreign);
        }
        if self.peers.contains_key(&addr)
            || peer
                .cid_in
                .as_deref()
                .is_some_and(|c| self.cids.contains_key(c))
        {
            return Err(RestoreError::Occupied);
        }
        let key = match &peer.cid_in {
            Some(cid) => DsmKey::Cid(cid.as_slice().into(), crate::dsm::PeerKey::source(&addr)),
            None => DsmKey::Addr(addr),
        };
        let stored = self.dsm.store(&key, PeerState::Established, (), false, now);
        if stored.previous == PeerState::NoSpace {
            return Err(RestoreError::NoSpace);
        }
        if let Some((evicted, ())) = stored.evicted {
            if let Some(evicted) = self.address_of(&evicted) {
                self.close_peer(evicted, CloseReason::Evicted, true);
            }
        }
        let lean = Lean::restored(&peer);
        let reported = lean.reported();
        let info = ConnectionInfo {
            resumed: reported.resumed,
            cipher: static_cipher(&reported.cipher),
            peer_certificate: reported
                .peer_certificate
                .as_deref()
                .and_then(|der| openssl::x509::X509::from_der(der).ok()),
            psk_identity: reported.psk_identity.clone(),
            handshake_time: Duration::ZERO,
            restored: true,
        };
        let id = self.next_peer_id;
        self.next_peer_id += 1;
        if let Some(cid) = &peer.cid_in {
            self.cids.insert(cid.as_slice().into(), addr);
        }
        self.peers.insert(addr, Peer::restored(id, lean, key));
        self.stats.lean += 1;
        self.stats.peers = self.peers.len() as u64;
        tracing::debug!(%addr, "saved peer restored");
        self.event(Event::Connected { peer: addr, info });
        Ok(addr)
    }

    /// Gives the endpoint the saved peers its server's workers share: a datagram from an
    /// unknown address that is not a ClientHello, or with an unknown connection ID, restores the
    /// waiting peer it belongs to, if any.
    pub(crate) fn set_restorable(&mut self, restorable: Arc<Restorable>) {
        self.restorable = Some(restorable);
    }

    /// Restores the waiting peer `datagram` from `from` (with connection ID `cid`) belongs to,
    /// if there is one and a record of the datagram opens under its keys (an unauthenticated
    /// datagram restores nothing: the state goes back to waiting); its address, if it was
    /// restored.
    pub(super) fn claim(
        &mut self,
        now: Instant,
        from: SocketAddr,
        cid: Option<&[u8]>,
        datagram: &[u8],
    ) -> Option<SocketAddr> {
        let restorable = Arc::clone(self.restorable.as_ref()?);
        let peer = restorable.take(from, cid)?;
        // A copy of its record state, so that trying changes nothing of the saved one.
        let mut probe = peer.record_state();
        let cid_len = self.config.cid_len();
        let opens = crate::server::record::records(datagram, cid_len)
            .any(|r| probe.open(&mut self.crypto, r, &mut self.plain).is_ok());
        zeroize::Zeroize::zeroize(&mut self.plain);
        if !opens {
            restorable.add(vec![peer]);
            return None;
        }
        self.restore(now, peer).ok()
    }
}
