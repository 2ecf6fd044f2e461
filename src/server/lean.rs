//! A lean peer: an established DTLS 1.2 association whose records the endpoint protects itself,
//! after OpenSSL ran the handshake and its `Ssl` was freed.
//!
//! What it keeps is the record state ([`RecordState`]: the two write keys and IVs, the epoch,
//! the next write sequence number, the replay window), the server's final flight of a full
//! handshake until the client's first protected record proves it arrived, and the session id
//! (a fatal alert from the peer removes the session, as OpenSSL does). It is made by
//! [`Lean::take_over`] from an `Ssl` whose handshake just finished with an AEAD suite.

use openssl::ssl::SslRef;
use zeroize::Zeroize;

use super::continuity::Reported;
use super::lease::Lease;
use super::record::keys::{NoKeys, RecordKeys};
use super::record::protect::{Crypto, Opened, RecordState, Rejected, SealError, CONTENT_ALERT};
use super::record::replay::ReplayWindow;
use super::record::{records, u16_at, u48_at, RECORD_HEADER};
use crate::store::SessionId;

/// What a handshaking `Ssl` fed and wrote at epoch 1, which the record layer needs to take the
/// association over where OpenSSL leaves it.
#[derive(Debug, Default)]
pub(crate) struct Epoch1Trace {
    /// Copies of the epoch-1 records fed to OpenSSL (the client's Finished, an early record):
    /// those that open are the sequence numbers OpenSSL already accepted. Bounded by the
    /// handshake budget's protected records; never more than [`MAX_TRACED`] are kept.
    fed: Vec<Vec<u8>>,
    /// The highest epoch-1 sequence number OpenSSL wrote (its Finished and retransmissions).
    highest_sent: Option<u64>,
}

/// Epoch-1 records a handshake may feed OpenSSL that are traced (the handshake budget lets
/// through two; retransmitted Finished messages are the only others a client sends).
const MAX_TRACED: usize = 4;

impl Epoch1Trace {
    /// Notes the epoch-1 records of a datagram fed to OpenSSL (`tls12_cid` records carrying
    /// connection IDs of `cid_len` bytes).
    pub(crate) fn fed(&mut self, datagram: &[u8], cid_len: usize) {
        for record in records(datagram, cid_len).filter(|r| u16_at(r, 3) == 1) {
            if self.fed.len() < MAX_TRACED {
                self.fed.push(record.to_vec());
            }
        }
    }

    /// Notes the epoch-1 records of a datagram OpenSSL wrote.
    pub(crate) fn sent(&mut self, datagram: &[u8]) {
        for record in records(datagram, 0).filter(|r| u16_at(r, 3) == 1) {
            let seq = u48_at(record, 5);
            self.highest_sent = Some(self.highest_sent.map_or(seq, |h| h.max(seq)));
        }
    }
}

impl Drop for Epoch1Trace {
    fn drop(&mut self) {
        for r in &mut self.fed {
            r.zeroize();
        }
    }
}

/// An established peer without an `Ssl`.
pub(crate) struct Lean {
    record: RecordState,
    /// The datagrams of the server's final flight of a full handshake (ChangeCipherSpec,
    /// Finished, a ticket), as sent, until the client's first protected record that is not a
    /// retransmitted Finished.
    final_flight: Option<Box<[Vec<u8>]>>,
    /// The session's id, to remove it on a fatal alert.
    session: Option<SessionId>,
    /// No more records are read or written (closed, failed).
    finished: bool,
    /// What `Event::Connected` reported, and when the session expires (seconds since the
    /// epoch): what a suspended peer carries.
    reported: Box<Reported>,
    expires_at: u64,
    /// Its sequence-number lease, when its state is shared in the store (`shared_peers`).
    lease: Option<Box<Lease>>,
}

impl std::fmt::Debug for Lean {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lean")
            .field("aead", &self.record.aead())
            .field("next_write", &self.record.next_write())
            .field("final_flight", &self.final_flight.as_ref().map(|f| f.len()))
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl Lean {
    /// Takes over the association of `ssl`, whose handshake just finished: its keys, the write
    /// sequence numbers above every one OpenSSL used (`trace`), the replay window holding the
    /// records OpenSSL accepted, the `final_flight` (for a full handshake), and the connection
    /// IDs it settled (`cids`: ours, the peer's).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn take_over(
        ssl: &SslRef,
        trace: &Epoch1Trace,
        final_flight: Option<Vec<Vec<u8>>>,
        cids: Option<(&[u8], &[u8])>,
        reported: Reported,
        max_ttl: std::time::Duration,
        crypto: &mut Crypto,
    ) -> Result<Self, NoKeys> {
        let keys = RecordKeys::derive(ssl)?;
        // OpenSSL always writes its Finished at epoch 1; without one there is nothing to go on.
        let next_write = trace.highest_sent.ok_or(NoKeys::Unavailable)? + 1;
        let mut record = RecordState::new(keys, 1, next_write, ReplayWindow::default())
            .with_cids(cids.map(|c| c.0), cids.map(|c| c.1));
        let mut scratch = Vec::new();
        for fed in &trace.fed {
            // Opening marks the sequence number as seen; records that do not open (spoofed)
            // leave the window as it is.
            let _ = record.open(crypto, fed, &mut scratch);
            scratch.zeroize();
        }
        let session = ssl.session().and_then(|s| SessionId::new(s.id()).ok());
        let expires_at = ssl.session().map_or(0, |s| {
            super::continuity::expiry_secs(s.time(), s.timeout(), max_ttl)
        });
        Ok(Self {
            record,
            final_flight: final_flight
                .filter(|f| !f.is_empty())
                .map(Vec::into_boxed_slice),
            session,
            finished: false,
            reported: Box::new(reported),
            expires_at,
            lease: None,
        })
    }

    /// A lean peer from a saved state (after a restart): no final flight to send again.
    pub(crate) fn restored(peer: &super::continuity::SuspendedPeer) -> Self {
        Self {
            record: peer.record_state(),
            final_flight: None,
            session: peer.session,
            finished: false,
            reported: Box::new(peer.reported.clone()),
            expires_at: peer.expires_at,
            lease: None,
        }
    }

    /// What `Event::Connected` reported.
    pub(crate) fn reported(&self) -> &Reported {
        &self.reported
    }

    /// When the session expires (seconds since the epoch).
    pub(crate) fn expires_at(&self) -> u64 {
        self.expires_at
    }

    /// Whether the association ended (closed, failed).
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// Opens one record from the peer (see [`RecordState::open`]).
    pub(crate) fn open(
        &mut self,
        crypto: &mut Crypto,
        record: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Opened, Rejected> {
        if self.finished {
            return Err(Rejected::OtherEpoch);
        }
        self.record.open(crypto, record, out)
    }

    /// Seals one record of ours.
    pub(crate) fn seal(
        &mut self,
        crypto: &mut Crypto,
        content_type: u8,
        payload: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        if self.finished {
            return Err(SealError::Exhausted);
        }
        if let Some(lease) = &self.lease {
            if !lease.may_write(self.record.next_write()) {
                return Err(SealError::NoLease);
            }
        }
        let mut out = Vec::with_capacity(RECORD_HEADER + 8 + payload.len() + 16);
        self.record.seal(crypto, content_type, payload, &mut out)?;
        Ok(out)
    }

    /// Our close_notify, sealed (`None` if nothing more can be sent); nothing is read or
    /// written afterwards.
    pub(crate) fn close(&mut self, crypto: &mut Crypto) -> Option<Vec<u8>> {
        if self.finished {
            return None;
        }
        let alert = self.seal(crypto, CONTENT_ALERT, &[1, 0]).ok();
        self.finished = true;
        alert
    }

    /// Ends the association without a word (failed).
    pub(crate) fn fail(&mut self) {
        self.finished = true;
    }

    /// The kept final flight, to send again.
    pub(crate) fn final_flight(&self) -> Option<&[Vec<u8>]> {
        self.final_flight.as_deref()
    }

    /// The client showed it has our final flight: forget it.
    pub(crate) fn flight_arrived(&mut self) {
        self.final_flight = None;
    }

    /// Its lease, if its state is shared.
    pub(crate) fn lease(&self) -> Option<&Lease> {
        self.lease.as_deref()
    }

    /// Its lease, to change.
    pub(crate) fn lease_mut(&mut self) -> Option<&mut Lease> {
        self.lease.as_deref_mut()
    }

    /// Shares its state from now on, under `lease`.
    pub(crate) fn set_lease(&mut self, lease: Lease) {
        self.lease = Some(Box::new(lease));
    }

    /// The session's id.
    pub(crate) fn session(&self) -> Option<&SessionId> {
        self.session.as_ref()
    }

    /// The record state.
    pub(crate) fn record(&self) -> &RecordState {
        &self.record
    }

    /// The record state, to change (tests).
    #[cfg(test)]
    pub(crate) fn record_mut(&mut self) -> &mut RecordState {
        &mut self.record
    }
}
