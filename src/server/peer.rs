//! One DTLS peer: its `Ssl` over an in-memory [`DatagramPipe`], and everything else the
//! endpoint keeps for it (what only its handshake needs, its timer entry, its send queue).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use openssl::ssl::{ErrorCode, Ssl, SslRef, SslStream};

use super::config::MAX_RECORD_PLAINTEXT;
use super::endpoint::park::Parked;
use super::lean::{Epoch1Trace, Lean};
use super::pipe::DatagramPipe;
use super::record::keys::RecordKeys;
use super::record::protect::{Crypto, Framing, CONTENT_TLS12_CID};
use super::record::HandshakeBudget;
use super::record::{records, u16_at, u48_at, RECORD_HEADER};
use super::timers::Timer;
use crate::dsm::PeerKey;
use crate::ffi;

/// What driving a peer produced, besides datagrams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    /// The handshake finished.
    Established,
    /// One application record's plaintext.
    Data(Vec<u8>),
    /// The peer sent close_notify; the server answered with its own.
    Closed,
    /// The connection failed (bad record MAC, handshake failure, too many retransmissions).
    Failed,
    /// The handshake waits for a session lookup (`WANT_CLIENT_HELLO_CB`): drive it again once
    /// the lookup completed.
    Suspended,
}

/// One peer of the endpoint: its connection and what the endpoint keeps for it.
///
/// OpenSSL runs the handshake ([`Conn::Ssl`]). Once it finished with an AEAD suite the
/// endpoint takes the records over and frees the `Ssl` ([`Conn::Lean`], [`Peer::go_lean`]);
/// other suites (CBC), or all with lean peers off, keep their `Ssl`, which then holds no record
/// buffers and no datagram queue storage between calls ([`rest`](Self::rest)): it sets its
/// buffers up again for each call that reads or writes ([`ffi::LeanStream`]).
pub(crate) struct Peer {
    /// Tells this peer's datagrams from those of an earlier peer at the same address.
    pub(crate) id: u64,
    /// The connection: OpenSSL's, or the endpoint's own record state.
    conn: Conn,
    /// What only the handshake needs: `Some` from the peer's creation until the endpoint saw
    /// its handshake finish (or the peer closed). Boxed, so that an established peer keeps one
    /// word of it.
    pub(crate) handshake: Option<Box<Handshake>>,
    /// This peer's live entry in the endpoint's timer heap, if it has one.
    pub(crate) timer: Option<Timer>,
    /// Datagrams of this peer waiting for `poll_transmit`.
    pub(crate) queued: usize,
    /// What the DSM knows the peer by.
    pub(crate) dsm_key: DsmKey,
}

/// What a peer keeps only while its handshake runs.
#[derive(Debug)]
pub(crate) struct Handshake {
    /// When its cookie verified (the start of
    /// [`ConnectionInfo::handshake_time`](crate::ConnectionInfo::handshake_time)).
    pub(crate) started: Instant,
    /// What the rest of its handshake may still make OpenSSL buffer.
    pub(crate) budget: HandshakeBudget,
    /// Its session lookup, while the handshake waits for it.
    pub(crate) parked: Option<Parked>,
}

impl Handshake {
    fn new(started: Instant) -> Self {
        Self {
            started,
            budget: HandshakeBudget::default(),
            parked: None,
        }
    }
}

/// What the endpoint's DSM knows a peer by: its address, or, once an association with a
/// connection ID is established, that connection ID (and the source address its handshake came
/// from, which its per-source quota counts), so that a change of address changes nothing there.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum DsmKey {
    /// By address.
    Addr(SocketAddr),
    /// By the server's connection ID.
    Cid(Box<[u8]>, IpAddr),
}

impl PeerKey for DsmKey {
    fn source(&self) -> IpAddr {
        match self {
            Self::Addr(a) => a.source(),
            Self::Cid(_, ip) => *ip,
        }
    }
}

/// The connection IDs a handshake settled, and the keys to translate its epoch-1 handshake
/// records between the `tls12_cid` format on the wire and the plain format OpenSSL reads and
/// writes.
struct CidHandshake {
    /// Ours: the peer's records carry it.
    ours: Box<[u8]>,
    /// The peer's: ours carry it (empty: ours go without one).
    theirs: Box<[u8]>,
    /// The record keys, once OpenSSL has the master secret.
    keys: Option<RecordKeys>,
}

/// Who runs a peer's records.
enum Conn {
    /// OpenSSL: the handshake, and afterwards the records of a peer that did not go lean
    /// (boxed: a lean peer's entry in the endpoint's table stays small).
    Ssl(Box<SslConn>),
    /// The endpoint's record layer, the `Ssl` gone.
    Lean(Box<Lean>),
}

/// The peer's `Ssl`, over its in-memory pipe, and what driving it reported.
struct SslConn {
    stream: ffi::LeanStream<DatagramPipe>,
    /// The handshake finished.
    established: bool,
    /// The DTLS retransmission deadline, if a timer runs.
    deadline: Option<Instant>,
    /// The connection ended (failed, closed): nothing more is read or written.
    finished: bool,
    /// [`min_protected_body`] of the negotiated cipher, once OpenSSL chose it.
    min_body: Option<usize>,
    /// The epoch-1 records fed and written until the handshake finished (for [`Lean`]).
    trace: Epoch1Trace,
    /// The last `drive` finished the handshake: what it wrote is the final flight.
    just_established: bool,
    /// The final flight of a full handshake, as taken from the pipe.
    final_flight: Option<Vec<Vec<u8>>>,
    /// The connection IDs, once the ServerHello settled them.
    cid: Option<Box<CidHandshake>>,
}

impl Drop for SslConn {
    /// Freeing an `Ssl` whose handshake finished without close_notify makes OpenSSL delete its
    /// session (`ssl_clear_bad_session`). A peer's state can go for reasons that say nothing
    /// against the session (an unanswered retransmission, an idle timeout, a local decision), and
    /// OpenSSL already deleted it itself where one did (a fatal alert sent or received), so the
    /// session is always kept here.
    fn drop(&mut self) {
        // `SessionCache::keep_resumable`, on a stream that may hold no buffers: only a flag.
        self.stream.keep_resumable();
    }
}

impl CidHandshake {
    /// The connection IDs the handshake on `ssl` settled, once its ServerHello carried ours.
    fn settled(ssl: &SslRef) -> Option<Box<Self>> {
        let index = super::config::peer_addr_index().ok()?;
        let (ours, theirs) = ssl.ex_data(index)?.cid.settled()?;
        Some(Box::new(Self {
            ours: ours.into(),
            theirs: theirs.into(),
            keys: None,
        }))
    }

    /// The record keys, derived once OpenSSL has the master secret.
    fn keys(&mut self, ssl: &SslRef) -> Option<&RecordKeys> {
        if self.keys.is_none() {
            self.keys = RecordKeys::derive(ssl).ok();
        }
        self.keys.as_ref()
    }
}

impl SslConn {
    /// The client's `tls12_cid` record (our connection ID) as the plain record OpenSSL reads:
    /// opened under the client's key, sealed again under it with the same sequence number and
    /// explicit nonce. The plain record exists only in memory between the endpoint and OpenSSL.
    fn plain_from_cid(&mut self, record: &[u8], crypto: &mut Crypto) -> Option<Vec<u8>> {
        let ssl = self.stream.ssl();
        let cid = self.cid.as_mut()?;
        let header = RECORD_HEADER + cid.ours.len();
        if record.len() < header || record[11..11 + cid.ours.len()] != *cid.ours {
            return None;
        }
        let ours = cid.ours.clone();
        let keys = cid.keys(ssl)?;
        let (epoch, seq) = (u16_at(record, 3) as u16, u48_at(record, 5));
        let mut plain = Vec::new();
        let content_type = crypto
            .open(
                keys.aead,
                &keys.client,
                Framing::Cid(&ours),
                record[0],
                epoch,
                seq,
                &record[header..],
                &mut plain,
            )
            .ok()?;
        let explicit = keys.aead.explicit_nonce_len();
        let nonce = (explicit > 0).then(|| {
            let mut n = [0u8; 8];
            n.copy_from_slice(&record[header..header + 8]);
            n
        });
        let mut out = Vec::with_capacity(record.len());
        let sealed = crypto.seal(
            keys.aead,
            &keys.client,
            Framing::Plain,
            content_type,
            epoch,
            seq,
            nonce,
            &plain,
            &mut out,
        );
        zeroize::Zeroize::zeroize(&mut plain);
        sealed.ok().map(|()| out)
    }

    /// `datagram` as OpenSSL wrote it, its epoch-1 records (the server's Finished) framed as
    /// `tls12_cid` records with the peer's connection ID: each opened under the server's key and
    /// sealed again with the same sequence number, the explicit nonce being that number (the
    /// plain record OpenSSL sealed never leaves the process). A record that cannot be translated
    /// is left out.
    fn cid_from_plain(&mut self, datagram: Vec<u8>, crypto: &mut Crypto) -> Vec<u8> {
        let ssl = self.stream.ssl();
        let Some(cid) = self.cid.as_mut() else {
            return datagram;
        };
        if !records(&datagram, 0).any(|r| u16_at(r, 3) == 1) {
            return datagram;
        }
        let theirs = cid.theirs.clone();
        let Some(keys) = cid.keys(ssl) else {
            return datagram;
        };
        let mut out = Vec::with_capacity(datagram.len() + 16);
        let mut plain = Vec::new();
        for record in records(&datagram, 0) {
            if u16_at(record, 3) != 1 {
                out.extend_from_slice(record);
                continue;
            }
            let (epoch, seq) = (1, u48_at(record, 5));
            let opened = crypto.open(
                keys.aead,
                &keys.server,
                Framing::Plain,
                record[0],
                epoch,
                seq,
                &record[RECORD_HEADER..],
                &mut plain,
            );
            if let Ok(content_type) = opened {
                let sealed = crypto.seal(
                    keys.aead,
                    &keys.server,
                    Framing::Cid(&theirs),
                    content_type,
                    epoch,
                    seq,
                    None,
                    &plain,
                    &mut out,
                );
                if sealed.is_err() {
                    tracing::debug!("an epoch-1 record could not be framed with the peer's cid");
                }
            }
            zeroize::Zeroize::zeroize(&mut plain);
        }
        out
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("id", &self.id)
            .field("established", &self.is_established())
            .field("lean", &self.is_lean())
            .field("deadline", &self.deadline())
            .field("queued", &self.queued)
            .finish_non_exhaustive()
    }
}

/// The shortest body a protected DTLS 1.2 record of `cipher` can have: the explicit nonce plus
/// the tag for AEAD suites (AES-GCM and AES-CCM 8 + 16, AES-CCM8 8 + 8, ChaCha20-Poly1305
/// 0 + 16). OpenSSL 3.0 fails the connection on a shorter one instead of discarding it. For other
/// suites (CBC, run MAC-then-encrypt, where OpenSSL discards bad records itself) 0: no length
/// test applies.
pub(crate) fn min_protected_body(cipher: &str) -> usize {
    if cipher.contains("CHACHA20") || cipher.contains("CCM8") {
        16
    } else if cipher.contains("GCM") || cipher.contains("CCM") {
        24
    } else {
        0
    }
}

impl Peer {
    /// A lean peer restored from a saved state, at `addr`, known to the DSM as `dsm_key`.
    pub(crate) fn restored(id: u64, lean: Lean, dsm_key: DsmKey) -> Self {
        Self {
            id,
            conn: Conn::Lean(Box::new(lean)),
            handshake: None,
            timer: None,
            queued: 0,
            dsm_key,
        }
    }

    /// The lean association, if the peer went lean.
    pub(crate) fn lean(&self) -> Option<&Lean> {
        match &self.conn {
            Conn::Lean(l) => Some(l),
            Conn::Ssl(_) => None,
        }
    }

    /// A server-side peer on `ssl` (already configured: MTU, ex_data), not yet fed, whose
    /// handshake started (its cookie verified) at `started`.
    pub(crate) fn new(
        mut ssl: Ssl,
        id: u64,
        started: Instant,
        addr: SocketAddr,
    ) -> Result<Self, openssl::error::ErrorStack> {
        ssl.set_accept_state();
        Ok(Self {
            id,
            conn: Conn::Ssl(Box::new(SslConn {
                stream: ffi::LeanStream::new(SslStream::new(ssl, DatagramPipe::new())?),
                established: false,
                deadline: None,
                finished: false,
                min_body: None,
                trace: Epoch1Trace::default(),
                just_established: false,
                final_flight: None,
                cid: None,
            })),
            handshake: Some(Box::new(Handshake::new(started))),
            timer: None,
            queued: 0,
            dsm_key: DsmKey::Addr(addr),
        })
    }

    /// The session lookup its handshake waits for, if it is parked.
    pub(crate) fn parked(&self) -> Option<&Parked> {
        self.handshake.as_ref()?.parked.as_ref()
    }

    /// The DTLS retransmission deadline, if a timer runs.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match &self.conn {
            Conn::Ssl(c) => c.deadline,
            Conn::Lean(_) => None,
        }
    }

    /// Whether the record buffers are released now.
    #[cfg(test)]
    fn buffers_released(&self) -> bool {
        match &self.conn {
            Conn::Ssl(c) => c.stream.buffers_released(),
            Conn::Lean(_) => true,
        }
    }

    /// Whether the handshake has finished.
    pub(crate) fn is_established(&self) -> bool {
        match &self.conn {
            Conn::Ssl(c) => c.established,
            Conn::Lean(_) => true,
        }
    }

    /// Whether the endpoint runs this peer's records (its `Ssl` is gone).
    pub(crate) fn is_lean(&self) -> bool {
        matches!(self.conn, Conn::Lean(_))
    }

    /// The lean association, if the peer went lean.
    pub(crate) fn lean_mut(&mut self) -> Option<&mut Lean> {
        match &mut self.conn {
            Conn::Lean(l) => Some(l),
            Conn::Ssl(_) => None,
        }
    }

    /// The peer's `Ssl`, while it has one.
    pub(crate) fn ssl(&self) -> Option<&SslRef> {
        match &self.conn {
            Conn::Ssl(c) => Some(c.stream.ssl()),
            Conn::Lean(_) => None,
        }
    }

    /// Datagrams queued and not read by OpenSSL yet.
    pub(crate) fn inbound_len(&self) -> usize {
        match &self.conn {
            Conn::Ssl(c) => c.stream.get_ref().inbound_len(),
            Conn::Lean(_) => 0,
        }
    }

    /// Queues one inbound datagram for OpenSSL (a peer with an `Ssl`; a lean peer's datagrams
    /// go through [`lean_mut`](Self::lean_mut)), its `tls12_cid` records taken to carry
    /// connection IDs of `cid_len` bytes.
    pub(crate) fn push(&mut self, datagram: Vec<u8>, cid_len: usize) {
        if let Conn::Ssl(c) = &mut self.conn {
            if !c.established {
                c.trace.fed(&datagram, cid_len);
            }
            c.stream.get_mut().push(datagram);
        }
    }

    /// The connection ID the peer's records carry (ours), if its handshake settled one.
    pub(crate) fn our_cid(&self) -> Option<&[u8]> {
        match &self.conn {
            Conn::Ssl(c) => c.cid.as_ref().map(|cid| &*cid.ours),
            Conn::Lean(l) => l.record().cid_in(),
        }
    }

    /// Queues `datagram` for OpenSSL and drives the connection on it. For a handshake that
    /// settled connection IDs, its `tls12_cid` records (the client's Finished) are opened and
    /// handed to OpenSSL in the plain format it reads, each after what came before it was
    /// driven (so that OpenSSL has the master secret the keys come from); one that does not
    /// open, or comes before the keys exist, is discarded.
    pub(crate) fn feed(
        &mut self,
        now: Instant,
        datagram: Vec<u8>,
        cid_len: usize,
        crypto: &mut Crypto,
        progress: &mut Vec<Progress>,
    ) {
        let has_cid_records = matches!(&self.conn, Conn::Ssl(c) if c.cid.is_some())
            && records(&datagram, cid_len).any(|r| r[0] == CONTENT_TLS12_CID);
        if !has_cid_records {
            self.push(datagram, cid_len);
            self.drive(now, progress);
            return;
        }
        let mut plain: Vec<u8> = Vec::new();
        for record in records(&datagram, cid_len) {
            if record[0] != CONTENT_TLS12_CID {
                plain.extend_from_slice(record);
                continue;
            }
            if !plain.is_empty() {
                self.push(std::mem::take(&mut plain), cid_len);
                self.drive(now, progress);
            }
            let Conn::Ssl(c) = &mut self.conn else {
                return;
            };
            let Some(translated) = c.plain_from_cid(record, crypto) else {
                continue;
            };
            if !c.established {
                // The record as the peer sent it: what the lean record layer opens later.
                c.trace.fed(record, cid_len);
            }
            c.stream.get_mut().push(translated);
            self.drive(now, progress);
        }
        if !plain.is_empty() {
            self.push(plain, cid_len);
            self.drive(now, progress);
        }
    }

    /// The shortest protected record body OpenSSL does not fail on, for the cipher negotiated
    /// so far (0 before the cipher is chosen, and for a lean peer, whose records the endpoint
    /// screens itself).
    pub(crate) fn min_protected_body(&mut self) -> usize {
        let Conn::Ssl(c) = &mut self.conn else {
            return 0;
        };
        if let Some(n) = c.min_body {
            return n;
        }
        let Some(cipher) = c.stream.ssl().current_cipher() else {
            return 0;
        };
        let n = min_protected_body(cipher.name());
        c.min_body = Some(n);
        n
    }

    /// Takes the datagrams OpenSSL wrote (its epoch-1 records in the `tls12_cid` format when
    /// the handshake settled connection IDs and the peer asked for one in our records).
    pub(crate) fn take_outbound(&mut self, crypto: &mut Crypto) -> Vec<Vec<u8>> {
        let Conn::Ssl(c) = &mut self.conn else {
            return Vec::new();
        };
        let pipe = c.stream.get_mut();
        let mut out = pipe.take_outbound();
        pipe.free_empty_queues();
        if !c.established || c.just_established {
            if c.cid.is_none() {
                c.cid = CidHandshake::settled(c.stream.ssl());
            }
            for d in &out {
                c.trace.sent(d);
            }
            if c.cid.as_ref().is_some_and(|cid| !cid.theirs.is_empty()) {
                out = out
                    .into_iter()
                    .map(|d| c.cid_from_plain(d, crypto))
                    .collect();
            }
        }
        if std::mem::take(&mut c.just_established) && !c.stream.ssl().session_reused() {
            // A full handshake: the server spoke last, and the client may not have it.
            c.final_flight = Some(out.clone());
        }
        out
    }

    /// Drops whatever OpenSSL wrote so far (the HelloVerifyRequest answering a reconstructed
    /// first ClientHello).
    pub(crate) fn discard_outbound(&mut self) {
        if let Conn::Ssl(c) = &mut self.conn {
            c.stream.get_mut().clear_outbound();
        }
    }

    /// Lets the `Ssl` of a peer whose handshake finished go and takes its records over
    /// ([`Lean`]), once what OpenSSL wrote was taken ([`take_outbound`](Self::take_outbound)).
    /// Whether it did: a suite the endpoint does not protect (CBC), or anything OpenSSL
    /// cannot give, keeps the `Ssl`.
    pub(crate) fn go_lean(
        &mut self,
        crypto: &mut Crypto,
        reported: super::continuity::Reported,
        max_ttl: Duration,
    ) -> bool {
        let Conn::Ssl(c) = &mut self.conn else {
            return true;
        };
        if !c.established || c.finished || c.stream.get_ref().inbound_len() > 0 {
            return false;
        }
        let final_flight = c.final_flight.take();
        if let Some(keys) = c.cid.as_ref().and_then(|cid| cid.keys.as_ref()) {
            // The keys that translated the Finished messages go with the Ssl.
            crypto.forget(keys);
        }
        let cids = c.cid.as_ref().map(|cid| (&*cid.ours, &*cid.theirs));
        match Lean::take_over(
            c.stream.ssl(),
            &c.trace,
            final_flight,
            cids,
            reported,
            max_ttl,
            crypto,
        ) {
            Ok(lean) => {
                // Dropping the SslConn frees the Ssl (its session kept resumable).
                self.conn = Conn::Lean(Box::new(lean));
                true
            }
            Err(why) => {
                tracing::debug!(?why, "peer keeps its ssl");
                false
            }
        }
    }

    /// Runs the connection on everything queued: the handshake, then reading application
    /// records. Pushes what happened onto `progress`.
    pub(crate) fn drive(&mut self, now: Instant, progress: &mut Vec<Progress>) {
        let Conn::Ssl(c) = &mut self.conn else {
            return;
        };
        if !c.finished {
            let established = &mut c.established;
            let was = *established;
            let outcome = c
                .stream
                .with(|stream| Self::drive_inner(stream, established, progress));
            c.just_established = !was && c.established;
            match outcome {
                Some(None) => {}
                Some(Some(end)) => {
                    c.finished = true;
                    progress.push(end);
                }
                None => {
                    tracing::debug!("dtls record buffers cannot be allocated");
                    c.finished = true;
                    progress.push(Progress::Failed);
                }
            }
        }
        Self::update_deadline(c, now);
        Self::rest(c);
    }

    /// Releases what an established peer holds only while OpenSSL runs: the record buffers
    /// (33 KB) and the datagram queues' storage.
    fn rest(c: &mut SslConn) {
        if c.established && !c.finished {
            c.stream.release_buffers();
        }
        c.stream.get_mut().free_empty_queues();
    }

    /// Runs the handshake, then reads records; `Some` when the connection ended.
    fn drive_inner(
        stream: &mut SslStream<DatagramPipe>,
        established: &mut bool,
        progress: &mut Vec<Progress>,
    ) -> Option<Progress> {
        if !*established {
            match stream.do_handshake() {
                Ok(()) => {
                    *established = true;
                    progress.push(Progress::Established);
                }
                Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => {
                    return None;
                }
                Err(e) if e.code() == ErrorCode::WANT_CLIENT_HELLO_CB => {
                    progress.push(Progress::Suspended);
                    return None;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "dtls handshake failed");
                    return Some(Progress::Failed);
                }
            }
        }
        let mut buf = [0u8; MAX_RECORD_PLAINTEXT];
        loop {
            match stream.ssl_read(&mut buf) {
                Ok(0) => continue,
                Ok(n) => progress.push(Progress::Data(buf[..n].to_vec())),
                Err(e) if e.code() == ErrorCode::WANT_READ => break None,
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => {
                    // close_notify: answer with ours, which also keeps the session resumable.
                    let _ = stream.shutdown();
                    break Some(Progress::Closed);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "dtls read failed");
                    break Some(Progress::Failed);
                }
            }
        }
    }

    /// Writes one application record through OpenSSL (a peer that kept its `Ssl`). `Err` means
    /// the connection failed (it is finished then). The caller checks the length (at most
    /// [`MAX_RECORD_PLAINTEXT`]) and that the handshake finished.
    pub(crate) fn write(&mut self, data: &[u8]) -> Result<(), ()> {
        let Conn::Ssl(c) = &mut self.conn else {
            return Err(());
        };
        if c.finished {
            return Err(());
        }
        let written = match c.stream.with(|stream| stream.ssl_write(data)) {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "dtls write failed");
                Err(())
            }
            None => {
                tracing::debug!("dtls record buffers cannot be allocated");
                Err(())
            }
        };
        c.finished |= written.is_err();
        Self::rest(c);
        written
    }

    /// Runs the DTLS retransmission timer if it expired; `Failed` after too many retransmissions.
    ///
    /// `SslStream` gives no `&mut SslRef` for `DTLSv1_handle_timeout`, so this re-drives the
    /// connection instead: OpenSSL's DTLS record read (`dtls1_read_bytes`) runs the expired timer
    /// itself, retransmitting the last flight, before it reports that nothing is queued.
    pub(crate) fn handle_timeout(&mut self, now: Instant, progress: &mut Vec<Progress>) {
        self.drive(now, progress);
    }

    fn update_deadline(c: &mut SslConn, now: Instant) {
        c.deadline = if c.finished {
            None
        } else {
            ffi::dtls_get_timeout(c.stream.ssl()).map(|d| now + d.max(Duration::from_millis(1)))
        };
    }

    /// Sends close_notify (if the handshake finished) so that dropping the peer keeps its session
    /// resumable; a lean peer's is sealed by the record layer (`crypto`) and returned with what
    /// OpenSSL wrote by [`take_outbound`](Self::take_outbound).
    pub(crate) fn close(&mut self, crypto: &mut Crypto) -> Option<Vec<u8>> {
        match &mut self.conn {
            Conn::Ssl(c) => {
                if c.established && !c.finished {
                    let _ = c.stream.with(|stream| stream.shutdown());
                }
                c.finished = true;
                c.deadline = None;
                None
            }
            Conn::Lean(l) => l.close(crypto),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use openssl::ssl::{ShutdownState, SslContext, SslMethod, SslOptions, SslVerifyMode};

    use super::*;

    /// A DTLS 1.2 server `Ssl` (no cookie exchange: the endpoint's is tested with it).
    fn server_ssl() -> Ssl {
        let (cert, key) = crate::self_signed_certificate().unwrap();
        let mut ctx = SslContext::builder(SslMethod::dtls_server()).unwrap();
        ctx.set_certificate(&cert).unwrap();
        ctx.set_private_key(&key).unwrap();
        ctx.set_options(SslOptions::NO_QUERY_MTU);
        let ctx = ctx.build();
        let mut ssl = Ssl::new(&ctx).unwrap();
        ssl.set_mtu(1400).unwrap();
        ssl
    }

    fn client() -> SslStream<DatagramPipe> {
        let mut ctx = SslContext::builder(SslMethod::dtls_client()).unwrap();
        ctx.set_verify(SslVerifyMode::NONE);
        ctx.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
        let mut ssl = Ssl::new(&ctx.build()).unwrap();
        ssl.set_mtu(1400).unwrap();
        ssl.set_connect_state();
        SslStream::new(ssl, DatagramPipe::new()).unwrap()
    }

    /// Runs the client's handshake (or reads its records) and returns what it sent.
    fn drive_client(c: &mut SslStream<DatagramPipe>, got: &mut Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        if let Err(e) = c.do_handshake() {
            assert_eq!(e.code(), ErrorCode::WANT_READ, "{e}");
        } else {
            let mut buf = [0u8; 2048];
            loop {
                match c.ssl_read(&mut buf) {
                    Ok(n) => got.push(buf[..n].to_vec()),
                    Err(e) if e.code() == ErrorCode::WANT_READ => break,
                    Err(e) if e.code() == ErrorCode::ZERO_RETURN => break,
                    Err(e) => panic!("client read: {e}"),
                }
            }
        }
        c.get_mut().take_outbound()
    }

    fn feed(peer: &mut Peer, datagrams: Vec<Vec<u8>>, progress: &mut Vec<Progress>) {
        for d in datagrams {
            peer.push(d, 0);
            peer.drive(Instant::now(), progress);
        }
    }

    #[test]
    fn an_established_peer_holds_no_record_buffers_and_still_resends_sends_and_closes() {
        let mut peer = Peer::new(
            server_ssl(),
            1,
            Instant::now(),
            "127.0.0.1:1".parse().unwrap(),
        )
        .unwrap();
        let mut c = client();
        let mut got = Vec::new();
        let mut progress = Vec::new();
        // ClientHello; the server's first flight; the client's last flight.
        let hello = drive_client(&mut c, &mut got);
        feed(&mut peer, hello, &mut progress);
        assert!(!peer.buffers_released(), "kept during the handshake");
        for d in peer.take_outbound(&mut Crypto::default()) {
            c.get_mut().push(d);
        }
        let last = drive_client(&mut c, &mut got);
        feed(&mut peer, last, &mut progress);
        assert_eq!(progress, vec![Progress::Established]);
        assert!(
            peer.buffers_released(),
            "released once established and idle"
        );
        assert_eq!(peer.inbound_len(), 0);
        // The server's last flight (ChangeCipherSpec, Finished) is lost.
        let lost = peer.take_outbound(&mut Crypto::default());
        assert!(!lost.is_empty());
        assert!(c.do_handshake().is_err(), "the client waits for it");
        // The client's timer (1 s, OpenSSL's real clock) resends its flight; the server, its
        // buffers set up again for the read, answers from the flight it kept.
        std::thread::sleep(Duration::from_millis(1100));
        let again = drive_client(&mut c, &mut got);
        assert!(!again.is_empty(), "the client resent its flight");
        feed(&mut peer, again, &mut progress);
        assert!(peer.buffers_released());
        let resent = peer.take_outbound(&mut Crypto::default());
        assert!(!resent.is_empty(), "the server resent its last flight");
        for d in resent {
            c.get_mut().push(d);
        }
        assert!(drive_client(&mut c, &mut got).is_empty());
        c.do_handshake()
            .expect("the resent flight completed the handshake");
        // A send on released buffers (the write path needs them set up first), a record from
        // the client, then a close.
        peer.write(b"from the server").unwrap();
        assert!(peer.buffers_released());
        for d in peer.take_outbound(&mut Crypto::default()) {
            c.get_mut().push(d);
        }
        drive_client(&mut c, &mut got);
        assert_eq!(got, vec![b"from the server".to_vec()]);
        c.ssl_write(b"from the client").unwrap();
        let record = c.get_mut().take_outbound();
        progress.clear();
        feed(&mut peer, record, &mut progress);
        assert_eq!(progress, vec![Progress::Data(b"from the client".to_vec())]);
        assert!(peer.buffers_released());
        peer.close(&mut Crypto::default());
        for d in peer.take_outbound(&mut Crypto::default()) {
            c.get_mut().push(d);
        }
        drive_client(&mut c, &mut got);
        assert!(c.get_shutdown().contains(ShutdownState::RECEIVED));
    }
}
