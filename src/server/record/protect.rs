//! Protecting and opening DTLS 1.2 records of an established peer with its [`RecordKeys`],
//! on OpenSSL's EVP AEAD: the endpoint only frames records.
//!
//! A `DTLSCiphertext` (RFC 6347 §4.1) is a 13-byte header (type, version, epoch, 48-bit sequence
//! number, length) and the fragment. For AES-GCM (RFC 5288) and AES-CCM (RFC 6655) the fragment
//! is an 8-byte explicit nonce, the ciphertext and the tag, the nonce being the 4-byte salt of the
//! key block followed by the explicit part. We use the record's epoch and sequence number as the
//! explicit part (RFC 5288 §3 allows it; OpenSSL does so for CCM, and for GCM starts from random
//! bytes and counts up), so a nonce is unique exactly when the sequence number is; for ChaCha20-Poly1305 (RFC 7905) it is the ciphertext and the tag, the
//! nonce being the 12-byte IV XORed with the epoch and sequence number. The additional data is
//! the epoch and sequence number, type, version and plaintext length (RFC 5246 §6.2.3.3 with
//! RFC 6347 §4.1.2.1's sequence number). The tag is checked by the AEAD (`EVP_CipherFinal` for
//! GCM and ChaCha20-Poly1305, the data update for CCM): never compared here.
//!
//! Sequence numbers are the endpoint's: [`RecordState`] hands out each write sequence number
//! once and refuses to seal past the last one, so a (key, nonce) pair is never used twice.

use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;
use openssl::error::ErrorStack;

use super::keys::{Aead, DirectionKey, RecordKeys};
use super::replay::ReplayWindow;
use super::{u16_at, u48_at, RECORD_HEADER};

/// The DTLS 1.2 record version.
pub(crate) const DTLS12: [u8; 2] = [0xfe, 0xfd];
/// The largest record plaintext (2^14).
pub(crate) const MAX_PLAINTEXT: usize = 1 << 14;
/// The largest sequence number of an epoch (2^48 - 1).
pub(crate) const MAX_SEQ: u64 = (1 << 48) - 1;
/// `alert`.
pub(crate) const CONTENT_ALERT: u8 = 21;
/// `handshake`.
pub(crate) const CONTENT_HANDSHAKE: u8 = 22;
/// `application_data`.
pub(crate) const CONTENT_APPLICATION_DATA: u8 = 23;
/// `tls12_cid` (RFC 9146): a protected record carrying a connection ID.
pub(crate) const CONTENT_TLS12_CID: u8 = 25;

/// How many keyed contexts the endpoint keeps per AEAD and direction: the keys of the peers
/// that talked last keep their key schedule (AES round keys, GHASH table), so a record costs
/// setting a nonce, not a key setup; past that, the least recently used context is keyed anew.
const KEYED_CONTEXTS: usize = 64;

/// Hashes a key id ([`DirectionKey::id`]) for the keyed-context caches. Key ids come from the
/// process's own counter, never from the network, so SipHash's defence against chosen keys buys
/// nothing here; a multiply by the golden ratio spreads consecutive ids over the hash bits (the
/// table uses the top ones as tags). Two of these lookups are made per record.
#[derive(Default, Clone, Copy)]
struct KeyIdHasher(u64);

impl std::hash::Hasher for KeyIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not reached for u64 keys; kept correct for any other use.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The keyed contexts of one AEAD and direction, by key id.
type KeyedContexts = lru::LruCache<u64, CipherCtx, std::hash::BuildHasherDefault<KeyIdHasher>>;

/// An EVP cipher fetched once and, for each direction, contexts keyed for recent peers' keys.
struct AeadContexts {
    cipher: Cipher,
    seal: KeyedContexts,
    open: KeyedContexts,
}

/// The endpoint's EVP contexts, per AEAD, made on first use.
#[derive(Default)]
pub(crate) struct Crypto {
    contexts: [Option<AeadContexts>; 7],
}

impl std::fmt::Debug for Crypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crypto").finish_non_exhaustive()
    }
}

fn slot(aead: Aead) -> usize {
    Aead::ALL
        .iter()
        .position(|a| *a == aead)
        .expect("BUG: every AEAD is in Aead::ALL")
}

/// The context keyed with `key` in `cache` (keyed now if it was not), its nonce set to `nonce`
/// for one record.
fn keyed<'a>(
    cache: &'a mut KeyedContexts,
    cipher: &Cipher,
    aead: Aead,
    key: &DirectionKey,
    nonce: &[u8; 12],
    seal: bool,
) -> Result<&'a mut CipherCtx, ErrorStack> {
    let init = |ctx: &mut CipherCtx, key: Option<&[u8]>| {
        if seal {
            ctx.encrypt_init(None, key, Some(nonce))
        } else {
            ctx.decrypt_init(None, key, Some(nonce))
        }
    };
    if cache.contains(&key.id()) {
        // One more lookup than needed (the borrow checker cannot return the first one's
        // borrow); cheap with this hasher.
        let ctx = cache.get_mut(&key.id()).expect("BUG: just looked up");
        init(ctx, None)?;
        return Ok(ctx);
    }
    // A context to key: a new one, or the least recently used one (its old key schedule is
    // overwritten by the new key's).
    let mut ctx = match cache.len() >= KEYED_CONTEXTS {
        true => cache.pop_lru().map(|(_, c)| c),
        false => None,
    };
    if ctx.is_none() {
        let mut c = CipherCtx::new()?;
        if seal {
            c.encrypt_init(Some(cipher), None, None)?;
        } else {
            c.decrypt_init(Some(cipher), None, None)?;
        }
        if aead.is_ccm() {
            // Both before the key: CCM's tag length goes into its key setup.
            c.set_iv_length(12)?;
            c.set_tag_length(aead.tag_len())?;
        }
        ctx = Some(c);
    }
    let mut ctx = ctx.expect("BUG: just made");
    init(&mut ctx, Some(key.key(aead.key_len())))?;
    cache.push(key.id(), ctx);
    Ok(cache.get_mut(&key.id()).expect("BUG: just pushed"))
}

impl Crypto {
    fn contexts(&mut self, aead: Aead) -> Result<&mut AeadContexts, ErrorStack> {
        let entry = &mut self.contexts[slot(aead)];
        if entry.is_none() {
            let cap = std::num::NonZeroUsize::new(KEYED_CONTEXTS).expect("BUG: not zero");
            *entry = Some(AeadContexts {
                cipher: Cipher::fetch(None, aead.evp_name(), None)?,
                seal: KeyedContexts::with_hasher(cap, Default::default()),
                open: KeyedContexts::with_hasher(cap, Default::default()),
            });
        }
        Ok(entry.as_mut().expect("BUG: just set"))
    }

    /// Drops the contexts keyed with `keys` (a peer that went): `EVP_CIPHER_CTX_free` wipes the
    /// key schedules.
    pub(crate) fn forget(&mut self, keys: &RecordKeys) {
        if let Some(c) = self.contexts[slot(keys.aead)].as_mut() {
            for id in [keys.client.id(), keys.server.id()] {
                c.seal.pop(&id);
                c.open.pop(&id);
            }
        }
    }

    /// Seals one record of `content_type` holding `payload` under `key` with sequence number
    /// `seq` of `epoch`, framed as `framing` says, appending the whole record (header included)
    /// to `out`. The explicit nonce of GCM and CCM records is the sequence number unless
    /// `explicit` gives one (tests: OpenSSL's own choice for GCM).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn seal(
        &mut self,
        aead: Aead,
        key: &DirectionKey,
        framing: Framing<'_>,
        content_type: u8,
        epoch: u16,
        seq: u64,
        explicit_nonce: Option<[u8; 8]>,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), ErrorStack> {
        debug_assert!(payload.len() <= MAX_PLAINTEXT && seq <= MAX_SEQ);
        let explicit = aead.explicit_nonce_len();
        let tag_len = aead.tag_len();
        let seq_num = seq_num(epoch, seq);
        let explicit_part = explicit_nonce.unwrap_or(seq_num);
        let nonce = nonce(aead, key, &seq_num, &explicit_part);
        // The plaintext that is encrypted: the content, and for tls12_cid the real type after it.
        let inner_len = payload.len() + usize::from(matches!(framing, Framing::Cid(_)));
        let (outer_type, aad) = match framing {
            Framing::Plain => (
                content_type,
                Aad::Plain(additional_data(&seq_num, content_type, inner_len)),
            ),
            Framing::Cid(cid) => (
                CONTENT_TLS12_CID,
                Aad::Cid(cid_additional_data(&seq_num, cid, inner_len)),
            ),
        };
        let start = out.len();
        out.push(outer_type);
        out.extend_from_slice(&DTLS12);
        out.extend_from_slice(&seq_num);
        if let Framing::Cid(cid) = framing {
            out.extend_from_slice(cid);
        }
        out.extend_from_slice(&((explicit + inner_len + tag_len) as u16).to_be_bytes());
        if explicit > 0 {
            out.extend_from_slice(&explicit_part);
        }
        let body = out.len();
        out.extend_from_slice(payload);
        if let Framing::Cid(_) = framing {
            out.push(content_type);
        }
        let sealed = (|| {
            let c = self.contexts(aead)?;
            let ctx = keyed(&mut c.seal, &c.cipher, aead, key, &nonce, true)?;
            if aead.is_ccm() {
                ctx.set_data_len(inner_len)?;
            }
            ctx.cipher_update(aad.bytes(), None)?;
            let n = ctx.cipher_update_inplace(&mut out[body..], inner_len)?;
            debug_assert_eq!(n, inner_len);
            ctx.cipher_final(&mut [])?;
            let mut tag = [0u8; 16];
            ctx.tag(&mut tag[..tag_len])?;
            out.extend_from_slice(&tag[..tag_len]);
            Ok(())
        })();
        if sealed.is_err() {
            out.truncate(start);
        }
        sealed
    }

    /// Opens the fragment `body` of a record of (outer) `content_type`, `epoch` and `seq` under
    /// `key`, framed as `framing` says, writing the plaintext to `out` (cleared first); returns
    /// the record's real content type (for tls12_cid, the one inside). `Err` if it does not
    /// authenticate, is too short to hold a nonce and a tag, or is a tls12_cid record with no
    /// real type inside; `out` then holds nothing.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        &mut self,
        aead: Aead,
        key: &DirectionKey,
        framing: Framing<'_>,
        content_type: u8,
        epoch: u16,
        seq: u64,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<u8, Unopened> {
        out.clear();
        let explicit = aead.explicit_nonce_len();
        let tag_len = aead.tag_len();
        if body.len() < explicit + tag_len {
            return Err(Unopened);
        }
        let seq_num = seq_num(epoch, seq);
        let mut explicit_part = [0u8; 8];
        explicit_part[..explicit].copy_from_slice(&body[..explicit]);
        let nonce = nonce(aead, key, &seq_num, &explicit_part);
        let (ciphertext, tag) = body[explicit..].split_at(body.len() - explicit - tag_len);
        let aad = match framing {
            Framing::Plain => Aad::Plain(additional_data(&seq_num, content_type, ciphertext.len())),
            Framing::Cid(cid) => Aad::Cid(cid_additional_data(&seq_num, cid, ciphertext.len())),
        };
        out.resize(ciphertext.len(), 0);
        let opened = (|| {
            let c = self.contexts(aead)?;
            let ctx = keyed(&mut c.open, &c.cipher, aead, key, &nonce, false)?;
            if aead.is_ccm() {
                // The expected tag (and its length) before the data, as CCM needs.
                ctx.set_tag(tag)?;
                ctx.set_data_len(ciphertext.len())?;
            }
            ctx.cipher_update(aad.bytes(), None)?;
            // For CCM, this is where the tag is verified.
            ctx.cipher_update(ciphertext, Some(&mut out[..]))?;
            if !aead.is_ccm() {
                ctx.set_tag(tag)?;
                ctx.cipher_final(&mut [])?;
            }
            Ok::<(), ErrorStack>(())
        })();
        let real_type = match (opened, framing) {
            (Ok(()), Framing::Plain) => Some(content_type),
            // DTLSInnerPlaintext: the content, the real type, zero padding.
            (Ok(()), Framing::Cid(_)) => match out.iter().rposition(|&b| b != 0) {
                Some(at) => {
                    let real = out[at];
                    out.truncate(at);
                    Some(real)
                }
                None => None,
            },
            (Err(_), _) => None,
        };
        match real_type {
            Some(t) => Ok(t),
            None => {
                zeroize::Zeroize::zeroize(&mut out[..]);
                out.clear();
                Err(Unopened)
            }
        }
    }
}

/// The additional data of either framing.
enum Aad {
    Plain([u8; 13]),
    Cid(Vec<u8>),
}

impl Aad {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Plain(a) => a,
            Self::Cid(a) => a,
        }
    }
}

/// How a record is framed on the wire: RFC 6347's `DTLSCiphertext`, or RFC 9146's `tls12_cid`
/// record carrying a connection ID after the sequence number, whose plaintext is the content
/// followed by the real content type (and no padding, when we write it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing<'a> {
    /// No connection ID.
    Plain,
    /// With this connection ID.
    Cid(&'a [u8]),
}

/// A record that did not authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unopened;

/// The 8-byte DTLS sequence number: epoch and 48-bit sequence.
fn seq_num(epoch: u16, seq: u64) -> [u8; 8] {
    ((u64::from(epoch) << 48) | (seq & MAX_SEQ)).to_be_bytes()
}

/// The per-record nonce: for ChaCha20-Poly1305 the IV XORed with the sequence number, for GCM
/// and CCM the salt and the record's explicit part.
fn nonce(aead: Aead, key: &DirectionKey, seq_num: &[u8; 8], explicit: &[u8; 8]) -> [u8; 12] {
    let mut n = [0u8; 12];
    match aead {
        Aead::ChaCha20Poly1305 => {
            n.copy_from_slice(key.iv(12));
            for (b, s) in n[4..].iter_mut().zip(seq_num) {
                *b ^= s;
            }
        }
        _ => {
            n[..4].copy_from_slice(key.iv(4));
            n[4..].copy_from_slice(explicit);
        }
    }
    n
}

/// RFC 9146 §5's additional data of a `tls12_cid` record: eight 0xff bytes, the tls12_cid type,
/// the CID's length, the tls12_cid type again, version, epoch and sequence number, the CID, the
/// length of the inner plaintext.
fn cid_additional_data(seq_num: &[u8; 8], cid: &[u8], inner_len: usize) -> Vec<u8> {
    let mut aad = Vec::with_capacity(23 + cid.len());
    aad.extend_from_slice(&[0xff; 8]);
    aad.push(CONTENT_TLS12_CID);
    aad.push(cid.len() as u8);
    aad.push(CONTENT_TLS12_CID);
    aad.extend_from_slice(&DTLS12);
    aad.extend_from_slice(seq_num);
    aad.extend_from_slice(cid);
    aad.extend_from_slice(&(inner_len as u16).to_be_bytes());
    aad
}

/// The additional data: sequence number, type, version, plaintext length.
fn additional_data(seq_num: &[u8; 8], content_type: u8, len: usize) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(seq_num);
    aad[8] = content_type;
    aad[9..11].copy_from_slice(&DTLS12);
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    aad
}

/// Why a record for an established peer was not taken. Every one is a silent drop (RFC 6347
/// §4.1.2.7); none changes the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejected {
    /// Not a whole DTLS 1.2 record (truncated, another version).
    Malformed,
    /// Of an epoch other than the peer's current one (an epoch-0 handshake retransmission, a
    /// stale or future epoch).
    OtherEpoch,
    /// Its sequence number was seen already or is older than the replay window.
    Replayed,
    /// It did not authenticate under the peer's key (forged, corrupted, or too short).
    Unopened,
    /// It authenticated but holds more than 2^14 bytes of plaintext.
    Overflow,
}

/// A record that opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Opened {
    /// Its content type (for a `tls12_cid` record, the real one inside).
    pub(crate) content_type: u8,
    /// Its sequence number.
    pub(crate) seq: u64,
    /// It is newer than every record of the peer's taken before (RFC 9146 §6: only such a record
    /// may move the peer to the address it came from).
    pub(crate) newest: bool,
}

/// Why a record was not sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SealError {
    /// The epoch's sequence numbers are used up (only close_notify may take the last one).
    Exhausted,
    /// OpenSSL's AEAD failed.
    Crypto,
    /// A shared peer's lease does not cover the next sequence number yet (its extension has not
    /// reached the store): the record is not written.
    NoLease,
}

/// What protecting one established peer's records takes: the keys, the epoch, the next write
/// sequence number, the replay window, and a count of records that failed to open.
#[derive(Debug, Clone)]
pub(crate) struct RecordState {
    keys: RecordKeys,
    epoch: u16,
    next_write: u64,
    window: ReplayWindow,
    unopened: u64,
    /// The connection ID the peer's records carry (ours), if one was negotiated: its records are
    /// then `tls12_cid` records (RFC 9146), and only those are taken.
    cid_in: Option<Box<[u8]>>,
    /// The connection ID our records carry (the peer's), if it asked for a non-empty one.
    cid_out: Option<Box<[u8]>>,
}

impl RecordState {
    /// The state of a peer whose handshake just finished: `epoch` (1 after the first
    /// handshake), writing on from `next_write` (above every sequence number OpenSSL used under
    /// this key), with `window` holding what OpenSSL already accepted.
    pub(crate) fn new(keys: RecordKeys, epoch: u16, next_write: u64, window: ReplayWindow) -> Self {
        Self {
            keys,
            epoch,
            next_write,
            window,
            unopened: 0,
            cid_in: None,
            cid_out: None,
        }
    }

    /// The same state with connection IDs (RFC 9146): `cid_in` the one the peer's records carry
    /// (ours; `None` if none was negotiated), `cid_out` the one ours carry (the peer's; `None` or
    /// empty: our records go without one).
    pub(crate) fn with_cids(mut self, cid_in: Option<&[u8]>, cid_out: Option<&[u8]>) -> Self {
        self.cid_in = cid_in.map(Box::from);
        self.cid_out = cid_out.filter(|c| !c.is_empty()).map(Box::from);
        self
    }

    /// The connection ID the peer's records carry, if one was negotiated.
    pub(crate) fn cid_in(&self) -> Option<&[u8]> {
        self.cid_in.as_deref()
    }

    /// The keys.
    pub(crate) fn keys(&self) -> &RecordKeys {
        &self.keys
    }

    /// The AEAD.
    pub(crate) fn aead(&self) -> Aead {
        self.keys.aead
    }

    /// The next sequence number a sealed record takes.
    pub(crate) fn next_write(&self) -> u64 {
        self.next_write
    }

    /// The epoch.
    pub(crate) fn epoch(&self) -> u16 {
        self.epoch
    }

    /// The connection ID our records carry, if any.
    pub(crate) fn cid_out(&self) -> Option<&[u8]> {
        self.cid_out.as_deref()
    }

    /// The replay window.
    pub(crate) fn window(&self) -> ReplayWindow {
        self.window
    }

    /// Records that failed to open under this key.
    pub(crate) fn unopened(&self) -> u64 {
        self.unopened
    }

    /// Whether only the last sequence number is left (kept for close_notify).
    #[cfg(test)]
    pub(crate) fn exhausted(&self) -> bool {
        self.next_write >= MAX_SEQ
    }

    /// Opens one whole record (`record`: header and fragment) from the peer, writing its
    /// plaintext to `out`. Checks, in order: a DTLS 1.2 header whose length matches (a
    /// `tls12_cid` header with our connection ID if one was negotiated, a plain one otherwise),
    /// the current epoch, the replay window, the AEAD; only a record that opened moves the
    /// window.
    pub(crate) fn open(
        &mut self,
        crypto: &mut Crypto,
        record: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Opened, Rejected> {
        out.clear();
        let cid_len = self.cid_in.as_ref().map_or(0, |c| c.len());
        let header = RECORD_HEADER + cid_len;
        if record.len() < header
            || record[1..3] != DTLS12
            || u16_at(record, 11 + cid_len) != record.len() - header
            || record.len() - header > MAX_PLAINTEXT + 2048
        {
            return Err(Rejected::Malformed);
        }
        let framing = match &self.cid_in {
            Some(cid) if record[0] == CONTENT_TLS12_CID && record[11..11 + cid_len] == **cid => {
                Framing::Cid(cid)
            }
            Some(_) => return Err(Rejected::Malformed),
            None if record[0] == CONTENT_TLS12_CID => return Err(Rejected::Malformed),
            None => Framing::Plain,
        };
        let outer_type = record[0];
        let epoch = u16_at(record, 3) as u16;
        let seq = u48_at(record, 5);
        if epoch != self.epoch {
            return Err(Rejected::OtherEpoch);
        }
        if !self.window.is_fresh(seq) {
            return Err(Rejected::Replayed);
        }
        let body = &record[header..];
        let content_type = match crypto.open(
            self.keys.aead,
            &self.keys.client,
            framing,
            outer_type,
            epoch,
            seq,
            body,
            out,
        ) {
            Ok(t) => t,
            Err(Unopened) => {
                self.unopened = self.unopened.saturating_add(1);
                return Err(Rejected::Unopened);
            }
        };
        // Authentic from here on: it counts as seen whatever follows.
        let newest = seq > self.window.highest() || self.window == ReplayWindow::default();
        self.window.accept(seq);
        if out.len() > MAX_PLAINTEXT {
            zeroize::Zeroize::zeroize(&mut out[..]);
            out.clear();
            return Err(Rejected::Overflow);
        }
        Ok(Opened {
            content_type,
            seq,
            newest,
        })
    }

    /// Seals one record of `content_type` (application data, an alert) holding `payload`,
    /// appending it to `out`. Application data never takes the epoch's last sequence number,
    /// which is kept for close_notify ([`SealError::Exhausted`]); nothing is sealed past it.
    pub(crate) fn seal(
        &mut self,
        crypto: &mut Crypto,
        content_type: u8,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        let limit = if content_type == CONTENT_ALERT {
            MAX_SEQ
        } else {
            MAX_SEQ - 1
        };
        if self.next_write > limit {
            return Err(SealError::Exhausted);
        }
        let seq = self.next_write;
        // Taken before sealing: a failed seal never gives the number out again either.
        self.next_write += 1;
        let framing = match &self.cid_out {
            Some(cid) => Framing::Cid(cid),
            None => Framing::Plain,
        };
        crypto
            .seal(
                self.keys.aead,
                &self.keys.server,
                framing,
                content_type,
                self.epoch,
                seq,
                None,
                payload,
                out,
            )
            .map_err(|_| SealError::Crypto)
    }

    /// Sets the next write sequence number (tests: the end of an epoch).
    #[cfg(any(test, feature = "__fuzzing"))]
    pub(crate) fn set_next_write(&mut self, seq: u64) {
        self.next_write = seq;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(seed: u8) -> RecordKeys {
        RecordKeys::from_master_secret(
            Aead::Aes128Gcm,
            openssl::hash::MessageDigest::sha256(),
            &[seed; 48],
            &[1; 32],
            &[2; 32],
        )
        .unwrap()
    }

    fn keyed_count(c: &mut Crypto) -> (usize, usize) {
        let a = c.contexts(Aead::Aes128Gcm).unwrap();
        (a.seal.len(), a.open.len())
    }

    #[test]
    fn keyed_contexts_are_bounded_reused_and_forgotten_with_their_peer() {
        let mut crypto = Crypto::default();
        let (a, b) = (keys(1), keys(2));
        let mut out = Vec::new();
        let seal = |crypto: &mut Crypto, k: &RecordKeys, out: &mut Vec<u8>| {
            out.clear();
            crypto
                .seal(k.aead, &k.server, Framing::Plain, 23, 1, 5, None, b"x", out)
                .unwrap();
        };
        seal(&mut crypto, &a, &mut out);
        let first = out.clone();
        seal(&mut crypto, &b, &mut out);
        // Keyed again for `a` from the cache: the same bytes as the first time.
        seal(&mut crypto, &a, &mut out);
        assert_eq!(out, first);
        assert_eq!(keyed_count(&mut crypto), (2, 0));
        crypto.forget(&a);
        assert_eq!(keyed_count(&mut crypto), (1, 0));
        // Past the bound the least recently used context is keyed anew; records stay right.
        let many: Vec<RecordKeys> = (0..KEYED_CONTEXTS as u8 + 8)
            .map(|i| keys(i + 10))
            .collect();
        for k in &many {
            seal(&mut crypto, k, &mut out);
        }
        assert_eq!(keyed_count(&mut crypto).0, KEYED_CONTEXTS);
        seal(&mut crypto, &a, &mut out);
        assert_eq!(out, first, "a key whose context was evicted is keyed again");
    }
}
