//! A compact stored form of a session's DER: what every entry would repeat is left out.
//!
//! `i2d_SSL_SESSION` writes `SEQUENCE { version INTEGER, ssl_version INTEGER, cipher OCTET STRING,
//! session_id OCTET STRING, master_key OCTET STRING, ..., [4] EXPLICIT session_id_context OCTET
//! STRING, ... }` (OpenSSL `ssl/ssl_asn1.c`). Two parts are known to the cache already:
//!
//! - the session id (32 of a DTLS server session's ~150 bytes) is the store key, so the compact
//!   form holds an empty OCTET STRING there (as HAProxy strips the id before storing);
//! - the session id context is the same for every session of a cache, so the compact form holds
//!   an 8-byte fingerprint of it instead (SHA-256 prefix, under a NULL tag so it cannot be taken
//!   for a context). Expanding under a cache with another context does not put that cache's
//!   context back: it reports [`Expanded::OtherContext`], and the cache answers with a miss, which
//!   is what OpenSSL would decide after decoding.
//!
//! Bytes that do not have that shape are stored and returned unchanged, so a future OpenSSL
//! encoding degrades to plain DER rather than to a decode error.

use openssl::sha::sha256;

/// Tag of a universal constructed SEQUENCE.
const SEQUENCE: u8 = 0x30;
/// Tag of a universal OCTET STRING.
const OCTET_STRING: u8 = 0x04;
/// Tag of a universal INTEGER.
const INTEGER: u8 = 0x02;
/// Tag of a universal NULL, reused in the compact form to mark a context fingerprint.
const FINGERPRINT: u8 = 0x05;
/// `[4]` EXPLICIT, constructed: the session id context.
const SID_CTX: u8 = 0xa4;
/// `[8]` EXPLICIT, constructed: the PSK identity.
const PSK_IDENTITY: u8 = 0xa8;
/// First byte of a stored form that starts with a policy header (DER always starts with 0x30).
const POLICY_V1: u8 = 0x01;
/// Length of the PSK key fingerprint in a policy header.
pub(crate) const PSK_FINGERPRINT_LEN: usize = 8;

/// The fingerprint of a session id context kept in compact forms.
pub(crate) type ContextFingerprint = [u8; 8];

/// The fingerprint of `ctx`.
pub(crate) fn fingerprint(ctx: &[u8]) -> ContextFingerprint {
    let digest = sha256(ctx);
    let mut fp = [0u8; 8];
    fp.copy_from_slice(&digest[..8]);
    fp
}

/// What [`expand`] made of stored bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Expanded {
    /// The full DER, ready for `d2i_SSL_SESSION`.
    Der(Vec<u8>),
    /// Not a compact form: use the stored bytes as they are.
    AsIs,
    /// A compact form made under another session id context.
    OtherContext,
}

/// A parsed tag-length header: where its content starts and how long it is.
struct Tlv {
    start: usize,
    tag: u8,
    content: usize,
    len: usize,
}

impl Tlv {
    fn end(&self) -> usize {
        self.content + self.len
    }
}

/// Reads the tag and definite length at `pos`; `None` if malformed or past the end.
fn read_tlv(der: &[u8], pos: usize) -> Option<Tlv> {
    let tag = *der.get(pos)?;
    let first = *der.get(pos + 1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = der.get(pos + 2..pos + 2 + n)?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, 2 + n)
    };
    let content = pos + header;
    (content.checked_add(len)? <= der.len()).then_some(Tlv {
        start: pos,
        tag,
        content,
        len,
    })
}

/// Appends a DER definite length.
fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// Appends a whole TLV.
fn push_tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    push_len(out, content.len());
    out.extend_from_slice(content);
}

/// The parts of an `SSL_SESSION` encoding the compact form touches.
struct Layout {
    outer: Tlv,
    id: Tlv,
    /// The `[4]` element and the TLV inside it, if present.
    ctx: Option<(Tlv, Tlv)>,
}

/// Finds the session id and session id context elements, or `None` if the bytes do not look
/// like an `SSL_SESSION` encoding.
fn locate(der: &[u8]) -> Option<Layout> {
    let outer = read_tlv(der, 0)?;
    if outer.tag != SEQUENCE || outer.end() != der.len() {
        return None;
    }
    let mut pos = outer.content;
    for expected in [INTEGER, INTEGER, OCTET_STRING] {
        let t = read_tlv(der, pos)?;
        if t.tag != expected {
            return None;
        }
        pos = t.end();
    }
    let id = read_tlv(der, pos)?;
    if id.tag != OCTET_STRING {
        return None;
    }
    let mut ctx = None;
    pos = id.end();
    while pos < outer.end() {
        let t = read_tlv(der, pos)?;
        pos = t.end();
        if t.tag == SID_CTX {
            let inner = read_tlv(der, t.content)?;
            if inner.end() != t.end() {
                return None;
            }
            ctx = Some((t, inner));
            break;
        }
    }
    Some(Layout { outer, id, ctx })
}

/// Rebuilds `der` with the id's content replaced by `id`, and the context element (if any)
/// replaced by `ctx_element` (a whole TLV).
fn rebuild(der: &[u8], layout: &Layout, id: &[u8], ctx_element: Option<&[u8]>) -> Vec<u8> {
    let mut inner = Vec::with_capacity(der.len() + id.len());
    inner.extend_from_slice(&der[layout.outer.content..layout.id.start]);
    push_tlv(&mut inner, OCTET_STRING, id);
    match (&layout.ctx, ctx_element) {
        (Some((elem, _)), Some(replacement)) => {
            inner.extend_from_slice(&der[layout.id.end()..elem.start]);
            inner.extend_from_slice(replacement);
            inner.extend_from_slice(&der[elem.end()..]);
        }
        _ => inner.extend_from_slice(&der[layout.id.end()..]),
    }
    let mut out = Vec::with_capacity(inner.len() + 6);
    out.push(SEQUENCE);
    push_len(&mut out, inner.len());
    out.extend_from_slice(&inner);
    zeroize::Zeroize::zeroize(&mut inner);
    out
}

/// The `[4]` element holding `inner_tag`/`content`.
fn ctx_element(inner_tag: u8, content: &[u8]) -> Vec<u8> {
    let mut inner = Vec::with_capacity(content.len() + 2);
    push_tlv(&mut inner, inner_tag, content);
    let mut out = Vec::with_capacity(inner.len() + 2);
    push_tlv(&mut out, SID_CTX, &inner);
    out
}

/// The compact form of `der`, whose session id is `id`, made by a cache whose context is `ctx`
/// (fingerprint `fp`); `None` to store `der` as it is.
pub(crate) fn compact(
    der: &[u8],
    id: &[u8],
    ctx: &[u8],
    fp: &ContextFingerprint,
) -> Option<Vec<u8>> {
    let layout = locate(der)?;
    if der.get(layout.id.content..layout.id.end())? != id || id.is_empty() {
        return None;
    }
    let replacement = match &layout.ctx {
        Some((_, inner))
            if inner.tag == OCTET_STRING && &der[inner.content..inner.end()] == ctx =>
        {
            Some(ctx_element(FINGERPRINT, fp))
        }
        _ => None,
    };
    let small = rebuild(der, &layout, &[], replacement.as_deref());
    // Trust the layout only when the round trip gives back the very same bytes: an encoding
    // this module does not fully understand (a future OpenSSL, a non-minimal length) is stored
    // as plain DER instead.
    match expand(&small, id, ctx, fp) {
        Expanded::Der(mut back) => {
            let same = back == der;
            zeroize::Zeroize::zeroize(&mut back);
            same.then_some(small)
        }
        _ => None,
    }
}

/// Prefixes stored bytes with a policy header holding the fingerprint of the PSK the session
/// was made with.
pub(crate) fn with_psk_fingerprint(fp: &[u8; PSK_FINGERPRINT_LEN], body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + PSK_FINGERPRINT_LEN + body.len());
    out.push(POLICY_V1);
    out.extend_from_slice(fp);
    out.extend_from_slice(&body);
    let mut body = body;
    zeroize::Zeroize::zeroize(&mut body);
    out
}

/// Splits stored bytes into the PSK fingerprint of their policy header (if any) and the
/// session encoding (compact or plain DER).
pub(crate) fn split_policy(stored: &[u8]) -> (Option<[u8; PSK_FINGERPRINT_LEN]>, &[u8]) {
    match stored.split_first() {
        Some((&POLICY_V1, rest)) if rest.len() >= PSK_FINGERPRINT_LEN => {
            let (fp, body) = rest.split_at(PSK_FINGERPRINT_LEN);
            let mut out = [0u8; PSK_FINGERPRINT_LEN];
            out.copy_from_slice(fp);
            (Some(out), body)
        }
        _ => (None, stored),
    }
}

/// The PSK identity recorded in a session encoding (compact or plain DER), if any.
pub(crate) fn psk_identity(encoded: &[u8]) -> Option<&[u8]> {
    let outer = read_tlv(encoded, 0)?;
    if outer.tag != SEQUENCE {
        return None;
    }
    let mut pos = outer.content;
    while pos < outer.end() {
        let t = read_tlv(encoded, pos)?;
        if t.end() > outer.end() {
            return None;
        }
        if t.tag == PSK_IDENTITY {
            let inner = read_tlv(encoded, t.content)?;
            return (inner.tag == OCTET_STRING && inner.end() == t.end())
                .then(|| &encoded[inner.content..inner.end()]);
        }
        pos = t.end();
    }
    None
}

/// The full DER for bytes stored under `id`, read by a cache whose context is `ctx`
/// (fingerprint `fp`).
pub(crate) fn expand(stored: &[u8], id: &[u8], ctx: &[u8], fp: &ContextFingerprint) -> Expanded {
    let Some(layout) = locate(stored) else {
        return Expanded::AsIs;
    };
    if layout.id.len != 0 || id.is_empty() || id.len() > 32 {
        return Expanded::AsIs;
    }
    let replacement = match &layout.ctx {
        Some((_, inner)) if inner.tag == FINGERPRINT => {
            if stored[inner.content..inner.end()] != fp[..] {
                return Expanded::OtherContext;
            }
            Some(ctx_element(OCTET_STRING, ctx))
        }
        _ => None,
    };
    Expanded::Der(rebuild(stored, &layout, id, replacement.as_deref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: &[u8] = b"openssl-session-cache";

    /// A minimal SSL_SESSION-shaped encoding: id, a master key of `tail` bytes, a time, and
    /// optionally a session id context and one more field after it.
    fn sample(id: &[u8], tail: usize, ctx: Option<&[u8]>) -> Vec<u8> {
        let mut inner = vec![
            INTEGER,
            1,
            1,
            INTEGER,
            2,
            0xfe,
            0xfd,
            OCTET_STRING,
            2,
            0xc0,
            0x2b,
        ];
        push_tlv(&mut inner, OCTET_STRING, id);
        push_tlv(&mut inner, OCTET_STRING, &vec![0x42; tail]);
        inner.extend_from_slice(&[0xa1, 0x06, INTEGER, 0x04, 0x65, 0x00, 0x00, 0x01]);
        if let Some(ctx) = ctx {
            inner.extend(ctx_element(OCTET_STRING, ctx));
        }
        inner.extend_from_slice(&[0xa5, 0x03, INTEGER, 0x01, 0x00]);
        let mut der = Vec::new();
        push_tlv(&mut der, SEQUENCE, &inner);
        der
    }

    #[test]
    fn compact_then_expand_restores_the_exact_bytes() {
        let fp = fingerprint(CTX);
        for tail in [10, 48, 120] {
            for ctx in [None, Some(CTX)] {
                let id = [0xab; 32];
                let der = sample(&id, tail, ctx);
                let small = compact(&der, &id, CTX, &fp).unwrap();
                let saved = 32 + ctx.map_or(0, |c| c.len() - fp.len());
                assert!(small.len() + saved <= der.len() && small.len() + saved + 2 >= der.len());
                assert_eq!(expand(&small, &id, CTX, &fp), Expanded::Der(der));
            }
        }
    }

    #[test]
    fn another_context_is_reported_not_substituted() {
        let id = [3; 32];
        let der = sample(&id, 48, Some(CTX));
        let small = compact(&der, &id, CTX, &fingerprint(CTX)).unwrap();
        let other = b"other-service";
        assert_eq!(
            expand(&small, &id, other, &fingerprint(other)),
            Expanded::OtherContext
        );
    }

    #[test]
    fn a_foreign_context_is_kept_verbatim() {
        let id = [3; 32];
        let der = sample(&id, 48, Some(b"someone-else"));
        let fp = fingerprint(CTX);
        let small = compact(&der, &id, CTX, &fp).unwrap();
        assert_eq!(small.len() + 32, der.len());
        assert_eq!(expand(&small, &id, CTX, &fp), Expanded::Der(der));
    }

    #[test]
    fn a_different_id_is_not_compacted() {
        let fp = fingerprint(CTX);
        let der = sample(&[1; 32], 10, Some(CTX));
        assert!(compact(&der, &[2; 32], CTX, &fp).is_none());
    }

    #[test]
    fn plain_der_and_garbage_pass_through() {
        let fp = fingerprint(CTX);
        let der = sample(&[1; 32], 10, Some(CTX));
        assert_eq!(expand(&der, &[1; 32], CTX, &fp), Expanded::AsIs);
        for junk in [
            &b""[..],
            b"\x30",
            b"\x30\x85\xff\xff\xff\xff\xff",
            b"\x04\x00",
            &[0xff; 40],
        ] {
            assert!(compact(junk, &[1; 32], CTX, &fp).is_none());
            assert_eq!(expand(junk, &[1; 32], CTX, &fp), Expanded::AsIs);
        }
    }

    #[test]
    fn a_layout_that_does_not_round_trip_is_stored_plain() {
        // The outer length in the long form (0x81 n for n < 128): valid BER that the rebuild,
        // which writes minimal lengths, would not reproduce.
        let fp = fingerprint(CTX);
        let id = [9; 32];
        let der = sample(&id, 10, Some(CTX));
        assert!(der[1] < 0x80);
        let mut odd = vec![SEQUENCE, 0x81];
        odd.extend_from_slice(&der[1..]);
        assert!(compact(&der, &id, CTX, &fp).is_some());
        assert!(compact(&odd, &id, CTX, &fp).is_none());
    }

    #[test]
    fn policy_header_round_trips_and_plain_bytes_have_none() {
        let der = sample(&[1; 32], 10, Some(CTX));
        assert_eq!(split_policy(&der), (None, &der[..]));
        let wrapped = with_psk_fingerprint(&[7; 8], der.clone());
        assert_eq!(split_policy(&wrapped), (Some([7; 8]), &der[..]));
        assert_eq!(
            split_policy(&[POLICY_V1, 1, 2]),
            (None, &[POLICY_V1, 1, 2][..])
        );
    }

    #[test]
    fn psk_identity_is_found_in_plain_and_compact_forms() {
        let id = [4; 32];
        let mut der = sample(&id, 10, Some(CTX));
        assert_eq!(psk_identity(&der), None);
        // Append [8] { OCTET STRING "dev-7" } inside the outer SEQUENCE.
        let mut inner = der[2..].to_vec();
        inner.extend_from_slice(&[
            PSK_IDENTITY,
            7,
            OCTET_STRING,
            5,
            b'd',
            b'e',
            b'v',
            b'-',
            b'7',
        ]);
        der.clear();
        push_tlv(&mut der, SEQUENCE, &inner);
        assert_eq!(psk_identity(&der), Some(&b"dev-7"[..]));
        let fp = fingerprint(CTX);
        let small = compact(&der, &id, CTX, &fp).unwrap();
        assert_eq!(psk_identity(&small), Some(&b"dev-7"[..]));
        for cut in 0..der.len() {
            let _ = psk_identity(&der[..cut]);
        }
    }

    #[test]
    fn truncated_or_flipped_compact_forms_never_panic() {
        let id = [7; 32];
        let fp = fingerprint(CTX);
        let small = compact(&sample(&id, 120, Some(CTX)), &id, CTX, &fp).unwrap();
        for cut in 0..small.len() {
            let _ = expand(&small[..cut], &id, CTX, &fp);
        }
        for i in 0..small.len() {
            let mut bad = small.clone();
            bad[i] ^= 0xff;
            let _ = expand(&bad, &id, CTX, &fp);
        }
    }
}
