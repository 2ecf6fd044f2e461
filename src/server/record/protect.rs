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

/// An EVP cipher fetched once and a context for each direction, reused for every record of
/// every peer of one endpoint (re-keyed per record, which costs a key schedule, not an
/// allocation).
struct AeadContexts {
    seal: CipherCtx,
    open: CipherCtx,
}

/// The endpoint's EVP contexts, one set per AEAD, made on first use.
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

impl Crypto {
    fn contexts(&mut self, aead: Aead) -> Result<&mut AeadContexts, ErrorStack> {
        let entry = &mut self.contexts[slot(aead)];
        if entry.is_none() {
            let cipher = Cipher::fetch(None, aead.evp_name(), None)?;
            let mut seal = CipherCtx::new()?;
            seal.encrypt_init(Some(&cipher), None, None)?;
            let mut open = CipherCtx::new()?;
            open.decrypt_init(Some(&cipher), None, None)?;
            if aead.is_ccm() {
                seal.set_iv_length(12)?;
                seal.set_tag_length(aead.tag_len())?;
                open.set_iv_length(12)?;
            }
            // Each context holds its own reference to the fetched cipher.
            *entry = Some(AeadContexts { seal, open });
        }
        Ok(entry.as_mut().expect("BUG: just set"))
    }

    /// Seals one record of `content_type` holding `payload` under `key` with sequence number
    /// `seq` of `epoch`, appending the whole record (header included) to `out`. The explicit
    /// nonce of GCM and CCM records is the sequence number unless `explicit` gives one (tests:
    /// OpenSSL's own choice for GCM).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn seal(
        &mut self,
        aead: Aead,
        key: &DirectionKey,
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
        let aad = additional_data(&seq_num, content_type, payload.len());
        let start = out.len();
        out.push(content_type);
        out.extend_from_slice(&DTLS12);
        out.extend_from_slice(&seq_num);
        out.extend_from_slice(&((explicit + payload.len() + tag_len) as u16).to_be_bytes());
        if explicit > 0 {
            out.extend_from_slice(&explicit_part);
        }
        let body = out.len();
        out.extend_from_slice(payload);
        let c = self.contexts(aead)?;
        let sealed = (|| {
            c.seal
                .encrypt_init(None, Some(key.key(aead.key_len())), Some(&nonce))?;
            if aead.is_ccm() {
                c.seal.set_data_len(payload.len())?;
            }
            c.seal.cipher_update(&aad, None)?;
            let n = c
                .seal
                .cipher_update_inplace(&mut out[body..], payload.len())?;
            debug_assert_eq!(n, payload.len());
            c.seal.cipher_final(&mut [])?;
            let mut tag = [0u8; 16];
            c.seal.tag(&mut tag[..tag_len])?;
            out.extend_from_slice(&tag[..tag_len]);
            Ok(())
        })();
        if sealed.is_err() {
            out.truncate(start);
        }
        sealed
    }

    /// Opens the fragment `body` of a record of `content_type`, `epoch` and `seq` under `key`,
    /// writing the plaintext to `out` (cleared first). `Err` if it does not authenticate (or is
    /// too short to hold a nonce and a tag); `out` then holds nothing.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        &mut self,
        aead: Aead,
        key: &DirectionKey,
        content_type: u8,
        epoch: u16,
        seq: u64,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Unopened> {
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
        let aad = additional_data(&seq_num, content_type, ciphertext.len());
        let Ok(c) = self.contexts(aead) else {
            return Err(Unopened);
        };
        out.resize(ciphertext.len(), 0);
        let opened = (|| {
            if aead.is_ccm() {
                c.open.set_tag(tag)?;
            }
            c.open
                .decrypt_init(None, Some(key.key(aead.key_len())), Some(&nonce))?;
            if aead.is_ccm() {
                c.open.set_data_len(ciphertext.len())?;
            }
            c.open.cipher_update(&aad, None)?;
            // For CCM, this is where the tag is verified.
            c.open.cipher_update(ciphertext, Some(&mut out[..]))?;
            if !aead.is_ccm() {
                c.open.set_tag(tag)?;
                c.open.cipher_final(&mut [])?;
            }
            Ok::<(), ErrorStack>(())
        })();
        if opened.is_err() {
            zeroize::Zeroize::zeroize(&mut out[..]);
            out.clear();
            return Err(Unopened);
        }
        Ok(())
    }
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
    /// Its content type.
    pub(crate) content_type: u8,
    /// Its sequence number.
    pub(crate) seq: u64,
}

/// Why a record was not sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SealError {
    /// The epoch's sequence numbers are used up (only close_notify may take the last one).
    Exhausted,
    /// OpenSSL's AEAD failed.
    Crypto,
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
        }
    }

    /// The keys.
    #[cfg(test)]
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

    /// The replay window.
    #[cfg(any(test, feature = "__fuzzing"))]
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
    /// plaintext to `out`. Checks, in order: a DTLS 1.2 header whose length matches, the current
    /// epoch, the replay window, the AEAD; only a record that opened moves the window.
    pub(crate) fn open(
        &mut self,
        crypto: &mut Crypto,
        record: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Opened, Rejected> {
        out.clear();
        if record.len() < RECORD_HEADER
            || record[1..3] != DTLS12
            || u16_at(record, 11) != record.len() - RECORD_HEADER
            || record.len() - RECORD_HEADER > MAX_PLAINTEXT + 2048
        {
            return Err(Rejected::Malformed);
        }
        let content_type = record[0];
        let epoch = u16_at(record, 3) as u16;
        let seq = u48_at(record, 5);
        if epoch != self.epoch {
            return Err(Rejected::OtherEpoch);
        }
        if !self.window.is_fresh(seq) {
            return Err(Rejected::Replayed);
        }
        let body = &record[RECORD_HEADER..];
        if crypto
            .open(
                self.keys.aead,
                &self.keys.client,
                content_type,
                epoch,
                seq,
                body,
                out,
            )
            .is_err()
        {
            self.unopened = self.unopened.saturating_add(1);
            return Err(Rejected::Unopened);
        }
        // Authentic from here on: it counts as seen whatever follows.
        self.window.accept(seq);
        if out.len() > MAX_PLAINTEXT {
            zeroize::Zeroize::zeroize(&mut out[..]);
            out.clear();
            return Err(Rejected::Overflow);
        }
        Ok(Opened { content_type, seq })
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
        crypto
            .seal(
                self.keys.aead,
                &self.keys.server,
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
