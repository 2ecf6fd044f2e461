//! Just enough of the DTLS record layer to answer a ClientHello without keeping state.
//!
//! The endpoint reads the first record of a datagram from an unknown peer: a ClientHello without
//! a cookie is answered with a HelloVerifyRequest built here, so no `Ssl` exists for a source
//! address that has not proven it can receive. Only a ClientHello with a valid cookie gets an
//! `Ssl`; OpenSSL then parses everything properly.

use std::ops::Range;

#[cfg(test)]
mod differential;
pub(crate) mod keys;
pub(crate) mod protect;
pub(crate) mod replay;

/// DTLS record header length (type, version, epoch, sequence number, length).
pub(crate) const RECORD_HEADER: usize = 13;
/// DTLS handshake header length (type, length, message_seq, fragment offset and length).
const HANDSHAKE_HEADER: usize = 12;
const CONTENT_HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const HELLO_VERIFY_REQUEST: u8 = 3;
/// DTLS 1.0's version, which RFC 6347 §4.2.1 says a HelloVerifyRequest carries.
const DTLS1_VERSION: [u8; 2] = [0xfe, 0xff];

/// Why a datagram from an unknown peer is not a ClientHello the endpoint can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotHello {
    /// Not a DTLS record at all, or a truncated or inconsistent one.
    Garbage,
    /// A well-formed DTLS record that is not an epoch-0 ClientHello (stale data, alerts...).
    NotClientHello,
    /// A ClientHello split over several fragments (not supported for the stateless exchange).
    Fragmented,
}

/// The parts of a ClientHello's first record that the stateless cookie exchange needs.
#[derive(Debug, Clone)]
pub(crate) struct ClientHello<'a> {
    record: &'a [u8],
    record_seq: u64,
    message_seq: u16,
    cookie: Range<usize>,
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

fn u24_at(b: &[u8], at: usize) -> usize {
    (usize::from(b[at]) << 16) | (usize::from(b[at + 1]) << 8) | usize::from(b[at + 2])
}

pub(crate) fn u48_at(b: &[u8], at: usize) -> u64 {
    b[at..at + 6]
        .iter()
        .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
}

impl<'a> ClientHello<'a> {
    /// Parses the first record of `datagram` as an unfragmented epoch-0 ClientHello.
    pub(crate) fn parse(datagram: &'a [u8]) -> Result<Self, NotHello> {
        if datagram.len() < RECORD_HEADER {
            return Err(NotHello::Garbage);
        }
        // Versions are 0xfeXX for DTLS (0xfeff 1.0, 0xfefd 1.2).
        if datagram[1] != 0xfe {
            return Err(NotHello::Garbage);
        }
        let record_len = u16_at(datagram, 11);
        let record_end = RECORD_HEADER + record_len;
        if record_end > datagram.len() {
            return Err(NotHello::Garbage);
        }
        if datagram[0] != CONTENT_HANDSHAKE || datagram[3..5] != [0, 0] {
            return Err(NotHello::NotClientHello);
        }
        let record = &datagram[..record_end];
        let hs = &record[RECORD_HEADER..];
        if hs.len() < HANDSHAKE_HEADER {
            return Err(NotHello::Garbage);
        }
        if hs[0] != CLIENT_HELLO {
            return Err(NotHello::NotClientHello);
        }
        let length = u24_at(hs, 1);
        let message_seq = u16::from_be_bytes([hs[4], hs[5]]);
        let fragment_offset = u24_at(hs, 6);
        let fragment_length = u24_at(hs, 9);
        if fragment_offset != 0 || fragment_length != length {
            return Err(NotHello::Fragmented);
        }
        if HANDSHAKE_HEADER + length != hs.len() {
            return Err(NotHello::Garbage);
        }
        // client_version (2), random (32), session_id <0..32>, cookie <0..255>, then the rest.
        let body = RECORD_HEADER + HANDSHAKE_HEADER;
        let sid_len_at = body + 2 + 32;
        let sid_len = usize::from(*record.get(sid_len_at).ok_or(NotHello::Garbage)?);
        if sid_len > 32 {
            return Err(NotHello::Garbage);
        }
        let cookie_len_at = sid_len_at + 1 + sid_len;
        let cookie_len = usize::from(*record.get(cookie_len_at).ok_or(NotHello::Garbage)?);
        let cookie = cookie_len_at + 1..cookie_len_at + 1 + cookie_len;
        // Cipher suites must follow the cookie.
        if cookie.end + 2 > record.len() {
            return Err(NotHello::Garbage);
        }
        Ok(Self {
            record,
            record_seq: u48_at(record, 5),
            message_seq,
            cookie,
        })
    }

    /// The cookie the client echoed (empty on a first ClientHello).
    pub(crate) fn cookie(&self) -> &'a [u8] {
        &self.record[self.cookie.clone()]
    }

    /// The handshake message sequence number (0 first, 1 after a HelloVerifyRequest).
    pub(crate) fn message_seq(&self) -> u16 {
        self.message_seq
    }

    /// The same record with `cookie` in place of the one it carries, and message_seq 1 (what
    /// the client sends after a HelloVerifyRequest). Record and handshake lengths follow.
    #[cfg(any(test, feature = "__fuzzing"))]
    pub(crate) fn with_cookie(&self, cookie: &[u8]) -> Vec<u8> {
        let grow = cookie.len() as isize - self.cookie.len() as isize;
        let mut out = Vec::with_capacity(self.record.len() + cookie.len());
        out.extend_from_slice(&self.record[..self.cookie.start - 1]);
        out.push(cookie.len() as u8);
        out.extend_from_slice(cookie);
        out.extend_from_slice(&self.record[self.cookie.end..]);
        let record_len = (u16_at(&out, 11) as isize + grow) as u16;
        out[11..13].copy_from_slice(&record_len.to_be_bytes());
        let hs = RECORD_HEADER;
        let length = (u24_at(&out, hs + 1) as isize + grow) as u32;
        out[hs + 1..hs + 4].copy_from_slice(&length.to_be_bytes()[1..]);
        out[hs + 4..hs + 6].copy_from_slice(&1u16.to_be_bytes());
        out[hs + 9..hs + 12].copy_from_slice(&length.to_be_bytes()[1..]);
        out
    }

    /// The record sequence number.
    pub(crate) fn record_seq(&self) -> u64 {
        self.record_seq
    }

    /// A HelloVerifyRequest carrying `cookie`, as OpenSSL's `DTLSv1_listen` builds it: the
    /// record sequence and message sequence numbers copied from this ClientHello.
    pub(crate) fn hello_verify_request(&self, cookie: &[u8]) -> Vec<u8> {
        debug_assert!(cookie.len() <= 255);
        let body_len = 2 + 1 + cookie.len();
        let mut out = Vec::with_capacity(RECORD_HEADER + HANDSHAKE_HEADER + body_len);
        out.push(CONTENT_HANDSHAKE);
        out.extend_from_slice(&DTLS1_VERSION);
        out.extend_from_slice(&self.record[3..11]); // epoch 0 and the client's record sequence
        out.extend_from_slice(&((HANDSHAKE_HEADER + body_len) as u16).to_be_bytes());
        out.push(HELLO_VERIFY_REQUEST);
        out.extend_from_slice(&(body_len as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&self.message_seq.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&(body_len as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&DTLS1_VERSION);
        out.push(cookie.len() as u8);
        out.extend_from_slice(cookie);
        out
    }

    /// The cookieless first ClientHello this one answers: the same hello with the cookie removed,
    /// message_seq 0 and the previous record sequence number.
    ///
    /// A fresh `Ssl` fed this record answers with its own HelloVerifyRequest (discarded) and then
    /// expects message_seq 1, exactly the state the client is in. The first ClientHello and the
    /// HelloVerifyRequest are not part of the handshake transcript (RFC 6347 §4.2.1), so the
    /// reconstruction does not need to be byte-identical to what the client first sent.
    /// `None` when the record sequence number is 0 (no earlier record can exist).
    /// (The endpoint now uses `DTLSv1_listen` instead; kept for the fuzz targets and tests.)
    #[cfg(any(test, feature = "__fuzzing"))]
    pub(crate) fn reconstruct_first(&self) -> Option<Vec<u8>> {
        let seq = self.record_seq.checked_sub(1)?;
        let cookie_len = self.cookie.len();
        let mut out = Vec::with_capacity(self.record.len() - cookie_len);
        out.extend_from_slice(&self.record[..self.cookie.start]);
        out.extend_from_slice(&self.record[self.cookie.end..]);
        out[5..11].copy_from_slice(&seq.to_be_bytes()[2..]);
        let record_len = u16_at(&out, 11) - cookie_len;
        out[11..13].copy_from_slice(&(record_len as u16).to_be_bytes());
        let hs = RECORD_HEADER;
        let length = (u24_at(&out, hs + 1) - cookie_len) as u32;
        out[hs + 1..hs + 4].copy_from_slice(&length.to_be_bytes()[1..]);
        out[hs + 4..hs + 6].copy_from_slice(&[0, 0]);
        out[hs + 9..hs + 12].copy_from_slice(&length.to_be_bytes()[1..]);
        out[self.cookie.start - 1] = 0;
        Some(out)
    }
}

/// The length of the record at the start of `rest`, header included, if it is whole: a
/// `tls12_cid` record (RFC 9146) carries a connection ID of `cid_len` bytes between its sequence
/// number and its length.
pub(crate) fn record_len(rest: &[u8], cid_len: usize) -> Option<usize> {
    let header = header_len(rest.first().copied()?, cid_len);
    if rest.len() < header {
        return None;
    }
    let end = header + u16_at(rest, header - 2);
    (end <= rest.len()).then_some(end)
}

/// The header length of a record of type `content_type`: 13 bytes, plus the connection ID of a
/// `tls12_cid` record.
pub(crate) fn header_len(content_type: u8, cid_len: usize) -> usize {
    if content_type == protect::CONTENT_TLS12_CID {
        RECORD_HEADER + cid_len
    } else {
        RECORD_HEADER
    }
}

/// The whole records of `datagram`, in order; a truncated record and anything after it are
/// left out (OpenSSL reads a datagram the same way: by each record's length field).
/// `tls12_cid` records are taken to carry connection IDs of `cid_len` bytes.
pub(crate) fn records(datagram: &[u8], cid_len: usize) -> impl Iterator<Item = &[u8]> {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        let Some(end) = record_len(rest, cid_len) else {
            rest = &[];
            return None;
        };
        let (record, tail) = rest.split_at(end);
        rest = tail;
        Some(record)
    })
}

/// What [`screen`] made of a datagram for a known peer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Screened<'a> {
    /// Every record is well formed: hand the datagram over as it is.
    Whole(&'a [u8]),
    /// Some records were discarded; these are the rest.
    Kept(Vec<u8>),
    /// Nothing is left to hand over.
    Nothing,
}

/// Discards the records of `datagram` that OpenSSL would treat as fatal although nobody
/// authenticated them (RFC 6347 §4.1.2.7: invalid records are silently discarded): a datagram
/// with no record at all (which OpenSSL reads as the end of the stream), records past a truncated
/// one, and records of a protected epoch (1 and later) too short to hold the cipher's explicit
/// nonce and tag (`min_protected_body`, 0 when unknown: OpenSSL 3.0 fails the connection on those
/// instead of dropping them).
pub(crate) fn screen(datagram: &[u8], min_protected_body: usize, cid_len: usize) -> Screened<'_> {
    keep_records(datagram, cid_len, |record| {
        u16_at(record, 3) == 0
            || record.len() - header_len(record[0], cid_len) >= min_protected_body
    })
}

/// Keeps the whole records of `datagram` that `keep` accepts, in order; a truncated record and
/// anything after it are dropped. [`Screened::Nothing`] when no record is kept.
fn keep_records(
    datagram: &[u8],
    cid_len: usize,
    mut keep: impl FnMut(&[u8]) -> bool,
) -> Screened<'_> {
    let mut at = 0;
    let mut kept: Option<Vec<u8>> = None;
    let mut any = false;
    while at < datagram.len() {
        let rest = &datagram[at..];
        let Some(end) = record_len(rest, cid_len) else {
            break;
        };
        let ok = keep(&rest[..end]);
        match (&mut kept, ok) {
            (Some(out), true) => out.extend_from_slice(&rest[..end]),
            (None, false) => kept = Some(datagram[..at].to_vec()),
            _ => {}
        }
        any |= ok;
        at += end;
    }
    if at < datagram.len() && kept.is_none() {
        // A truncated tail: keep what came before it.
        kept = Some(datagram[..at].to_vec());
    }
    match kept {
        _ if !any => Screened::Nothing,
        None => Screened::Whole(datagram),
        Some(out) => Screened::Kept(out),
    }
}

/// What one handshake may make OpenSSL hold before it is established: the handshake messages
/// it buffers (OpenSSL allocates a message's full claimed length at its first fragment, and keeps
/// up to ten messages ahead) and the protected (epoch 1) records it buffers until the epoch
/// changes (each takes a whole read buffer with it: [`PROTECTED_RECORD_COST`]).
pub(crate) const MAX_HANDSHAKE_BUFFER: usize = 64 * 1024;
/// What OpenSSL 3.0 keeps per buffered early protected record (`dtls1_buffer_record` moves the
/// connection's read buffer, 13 + 2^14 + 2048 bytes, into the queue and allocates a new one).
pub(crate) const PROTECTED_RECORD_COST: usize = 13 + 16384 + 2048;
/// Protected records a peer may send before its handshake finished (the client's Finished and a
/// retransmission of it), within the budget.
pub(crate) const MAX_EARLY_PROTECTED: usize = 2;

/// Bounds what one handshake can make OpenSSL buffer: the claimed lengths of distinct handshake
/// messages (by message sequence number) plus [`PROTECTED_RECORD_COST`] for each protected record
/// let through before the handshake ends (at most [`MAX_EARLY_PROTECTED`]) add up to at most
/// [`MAX_HANDSHAKE_BUFFER`]. Records over budget are dropped before OpenSSL sees them.
#[derive(Debug, Default)]
pub(crate) struct HandshakeBudget {
    /// (message_seq, claimed length) of each message let through.
    messages: Vec<(u16, usize)>,
    claimed: usize,
    protected: usize,
}

impl HandshakeBudget {
    /// Keeps the records of `datagram` (already [`screen`]ed) that fit the budget.
    pub(crate) fn admit<'a>(&mut self, datagram: &'a [u8], cid_len: usize) -> Screened<'a> {
        keep_records(datagram, cid_len, |record| self.fits(record))
    }

    /// Whether one record fits, counting it if it does.
    fn fits(&mut self, record: &[u8]) -> bool {
        let epoch = u16_at(record, 3);
        if epoch != 0 {
            if self.protected >= MAX_EARLY_PROTECTED
                || self.claimed + PROTECTED_RECORD_COST > MAX_HANDSHAKE_BUFFER
            {
                return false;
            }
            self.protected += 1;
            self.claimed += PROTECTED_RECORD_COST;
            return true;
        }
        if record[0] != CONTENT_HANDSHAKE {
            return true;
        }
        // Every fragment in the record must fit; the new messages are counted only if all do.
        let mut fresh: Vec<(u16, usize)> = Vec::new();
        let mut extra = 0usize;
        let mut pos = RECORD_HEADER;
        while pos < record.len() {
            if pos + HANDSHAKE_HEADER > record.len() {
                return false;
            }
            let length = u24_at(record, pos + 1);
            let seq = u16::from_be_bytes([record[pos + 4], record[pos + 5]]);
            let frag_len = u24_at(record, pos + 9);
            let known = self
                .messages
                .iter()
                .chain(fresh.iter())
                .find(|(s, _)| *s == seq)
                .map(|(_, l)| *l);
            match known {
                Some(l) if l != length => return false,
                Some(_) => {}
                None => {
                    extra += length;
                    fresh.push((seq, length));
                }
            }
            pos += HANDSHAKE_HEADER + frag_len;
        }
        if self.claimed + extra > MAX_HANDSHAKE_BUFFER {
            return false;
        }
        self.claimed += extra;
        self.messages.extend(fresh);
        true
    }
}

#[cfg(test)]
/// A minimal ClientHello record (tests only): version, random, session id, cookie, one suite, null compression.
pub(crate) fn test_hello(record_seq: u64, message_seq: u16, sid: &[u8], cookie: &[u8]) -> Vec<u8> {
    let mut body = vec![0xfe, 0xfd];
    body.extend_from_slice(&[7u8; 32]);
    body.push(sid.len() as u8);
    body.extend_from_slice(sid);
    body.push(cookie.len() as u8);
    body.extend_from_slice(cookie);
    body.extend_from_slice(&[0, 2, 0xc0, 0x2b, 1, 0]);
    let mut hs = vec![CLIENT_HELLO];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&message_seq.to_be_bytes());
    hs.extend_from_slice(&[0, 0, 0]);
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![CONTENT_HANDSHAKE, 0xfe, 0xfd, 0, 0];
    rec.extend_from_slice(&record_seq.to_be_bytes()[2..]);
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_hello as hello;

    #[test]
    fn parses_cookie_and_sequence_numbers() {
        let rec = hello(5, 1, &[9; 32], b"cookie!");
        let ch = ClientHello::parse(&rec).unwrap();
        assert_eq!(ch.cookie(), b"cookie!");
        assert_eq!(ch.message_seq(), 1);
        assert_eq!(ch.record_seq(), 5);
        let first = hello(0, 0, &[], &[]);
        let ch = ClientHello::parse(&first).unwrap();
        assert!(ch.cookie().is_empty());
    }

    #[test]
    fn reconstructed_first_hello_drops_the_cookie() {
        let rec = hello(5, 1, &[9; 3], b"cookie!");
        let first = ClientHello::parse(&rec)
            .unwrap()
            .reconstruct_first()
            .unwrap();
        assert_eq!(first, hello(4, 0, &[9; 3], &[]));
        assert!(ClientHello::parse(&hello(0, 1, &[], b"c"))
            .unwrap()
            .reconstruct_first()
            .is_none());
    }

    #[test]
    fn a_cookie_can_be_put_in_place() {
        let rec = hello(4, 0, &[9; 3], &[]);
        let with = ClientHello::parse(&rec).unwrap().with_cookie(b"cookie!");
        assert_eq!(with, hello(4, 1, &[9; 3], b"cookie!"));
        let back = ClientHello::parse(&with).unwrap().with_cookie(&[]);
        assert_eq!(back, hello(4, 1, &[9; 3], &[]));
    }

    #[test]
    fn hello_verify_request_layout() {
        let rec = hello(3, 0, &[], &[]);
        let hvr = ClientHello::parse(&rec)
            .unwrap()
            .hello_verify_request(&[1, 2, 3]);
        assert_eq!(
            hvr,
            [
                22, 0xfe, 0xff, 0, 0, 0, 0, 0, 0, 0, 3, 0, 18, // record header
                3, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 6, // handshake header
                0xfe, 0xff, 3, 1, 2, 3
            ]
        );
    }

    #[test]
    fn rejects_garbage_and_other_records() {
        assert_eq!(ClientHello::parse(b"").unwrap_err(), NotHello::Garbage);
        assert_eq!(
            ClientHello::parse(&[0xff; 40]).unwrap_err(),
            NotHello::Garbage
        );
        let rec = hello(0, 0, &[], &[]);
        // Truncated anywhere: never a panic, never a hello.
        for n in 0..rec.len() {
            assert!(ClientHello::parse(&rec[..n]).is_err(), "prefix {n}");
        }
        let mut appdata = rec.clone();
        appdata[0] = 23;
        assert_eq!(
            ClientHello::parse(&appdata).unwrap_err(),
            NotHello::NotClientHello
        );
        let mut epoch1 = rec.clone();
        epoch1[4] = 1;
        assert_eq!(
            ClientHello::parse(&epoch1).unwrap_err(),
            NotHello::NotClientHello
        );
        let mut frag = rec.clone();
        frag[13 + 11] -= 1; // fragment_length != length
        assert_eq!(ClientHello::parse(&frag).unwrap_err(), NotHello::Fragmented);
        let mut long_sid = hello(0, 0, &[1; 32], &[]);
        long_sid[13 + 12 + 34] = 33;
        assert_eq!(
            ClientHello::parse(&long_sid).unwrap_err(),
            NotHello::Garbage
        );
    }

    fn record(epoch: u16, body_len: usize) -> Vec<u8> {
        let mut r = vec![23, 0xfe, 0xfd];
        r.extend_from_slice(&epoch.to_be_bytes());
        r.extend_from_slice(&[0, 0, 0, 0, 0, 9]);
        r.extend_from_slice(&(body_len as u16).to_be_bytes());
        r.extend(std::iter::repeat_n(0xaa, body_len));
        r
    }

    #[test]
    fn screening_keeps_well_formed_records_and_drops_the_rest() {
        assert_eq!(screen(b"", 24, 0), Screened::Nothing);
        let good = [record(1, 40), record(0, 3), record(1, 24)].concat();
        assert_eq!(screen(&good, 24, 0), Screened::Whole(&good));
        // A short protected record between two good ones.
        let mixed = [record(1, 40), record(1, 23), record(1, 30)].concat();
        assert_eq!(
            screen(&mixed, 24, 0),
            Screened::Kept([record(1, 40), record(1, 30)].concat())
        );
        // Epoch 0 records are never too short (they carry no protection).
        assert_eq!(
            screen(&record(0, 1), 24, 0),
            Screened::Whole(&record(0, 1)[..])
        );
        // With no known cipher, nothing is dropped for its length.
        assert_eq!(
            screen(&record(1, 1), 0, 0),
            Screened::Whole(&record(1, 1)[..])
        );
        assert_eq!(screen(&record(1, 1), 16, 0), Screened::Nothing);
        // A truncated second record goes; the first stays.
        let mut cut = [record(1, 40), record(1, 40)].concat();
        cut.truncate(cut.len() - 5);
        assert_eq!(screen(&cut, 24, 0), Screened::Kept(record(1, 40)));
        assert_eq!(screen(&cut[..10], 24, 0), Screened::Nothing);
    }

    /// An epoch-0 handshake record holding one fragment of message `seq` claiming `length`.
    fn fragment(seq: u16, length: usize, frag: usize) -> Vec<u8> {
        let mut hs = vec![11];
        hs.extend_from_slice(&(length as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&seq.to_be_bytes());
        hs.extend_from_slice(&[0, 0, 0]);
        hs.extend_from_slice(&(frag as u32).to_be_bytes()[1..]);
        hs.extend(std::iter::repeat_n(0x55, frag));
        let mut r = vec![CONTENT_HANDSHAKE, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 9];
        r.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        r.extend_from_slice(&hs);
        r
    }

    #[test]
    fn the_handshake_budget_bounds_claimed_messages_and_early_protected_records() {
        let mut b = HandshakeBudget::default();
        // A legitimate flight: a few small messages, retransmitted.
        for _ in 0..3 {
            for seq in 1..4 {
                let f = fragment(seq, 300, 300);
                assert_eq!(b.admit(&f, 0), Screened::Whole(&f[..]));
            }
        }
        // Fragments of messages claiming 100 KB each: the first that would cross 64 KiB goes.
        let big = fragment(4, 40_000, 100);
        assert_eq!(b.admit(&big, 0), Screened::Whole(&big[..]));
        assert_eq!(b.admit(&fragment(5, 40_000, 100), 0), Screened::Nothing);
        assert_eq!(b.admit(&fragment(6, 100_000, 100), 0), Screened::Nothing);
        // More fragments of a message already counted cost nothing more.
        let more = fragment(4, 40_000, 100);
        assert_eq!(b.admit(&more, 0), Screened::Whole(&more[..]));
        // A fragment claiming another length for a known message is dropped.
        assert_eq!(b.admit(&fragment(4, 41_000, 100), 0), Screened::Nothing);
        // 40 900 bytes claimed: one early protected record (18 KiB) still fits, a second not.
        let p = record(1, 40);
        assert_eq!(b.admit(&p, 0), Screened::Whole(&p[..]));
        assert_eq!(b.admit(&p, 0), Screened::Nothing);
        // Mixed in one datagram: what fits stays.
        let mixed = [fragment(2, 300, 10), record(1, 40)].concat();
        assert_eq!(b.admit(&mixed, 0), Screened::Kept(fragment(2, 300, 10)));
        // Without big claims, MAX_EARLY_PROTECTED protected records pass.
        let mut fresh = HandshakeBudget::default();
        for _ in 0..MAX_EARLY_PROTECTED {
            assert_eq!(fresh.admit(&p, 0), Screened::Whole(&p[..]));
        }
        assert_eq!(fresh.admit(&p, 0), Screened::Nothing);
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(4);
        let base = hello(1, 1, &[2; 8], &[3; 32]);
        for _ in 0..20_000 {
            let mut d = base.clone();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..d.len());
                d[i] = rng.random();
            }
            d.truncate(rng.random_range(0..=d.len()));
            match screen(&d, 24, 0) {
                Screened::Whole(w) => assert_eq!(w, &d[..]),
                Screened::Kept(k) => assert!(!k.is_empty() && k.len() < d.len()),
                Screened::Nothing => {}
            }
            match HandshakeBudget::default().admit(&d, 0) {
                Screened::Whole(w) => assert_eq!(w, &d[..]),
                Screened::Kept(k) => assert!(!k.is_empty() && k.len() < d.len()),
                Screened::Nothing => {}
            }
            if let Ok(ch) = ClientHello::parse(&d) {
                let _ = ch.reconstruct_first();
                let _ = ch.hello_verify_request(ch.cookie());
            }
        }
    }
}
