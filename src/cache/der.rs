//! A compact stored form of a session's DER: the session id is left out, since it is the key.
//!
//! `i2d_SSL_SESSION` writes `SEQUENCE { version INTEGER, ssl_version INTEGER, cipher OCTET STRING,
//! session_id OCTET STRING, master_key OCTET STRING, ... }` (OpenSSL `ssl/ssl_asn1.c`). The id is
//! 32 bytes of a ~127-byte DTLS session and is already stored as the key, so the compact form
//! replaces it with an empty OCTET STRING (as HAProxy strips the id before storing). Expanding
//! puts the key back. Bytes that do not have that shape are stored and returned unchanged, so a
//! future OpenSSL encoding degrades to plain DER rather than to a decode error.

/// Tag of a universal constructed SEQUENCE.
const SEQUENCE: u8 = 0x30;
/// Tag of a universal OCTET STRING.
const OCTET_STRING: u8 = 0x04;
/// Tag of a universal INTEGER.
const INTEGER: u8 = 0x02;

/// A parsed tag-length header: where its content starts and how long it is.
struct Tlv {
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
    (content.checked_add(len)? <= der.len()).then_some(Tlv { tag, content, len })
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

/// Finds the session id element: returns the outer SEQUENCE and the id's TLV, or `None` if the
/// bytes do not look like an `SSL_SESSION` encoding.
fn locate(der: &[u8]) -> Option<(Tlv, Tlv, usize)> {
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
    (id.tag == OCTET_STRING && id.end() <= outer.end()).then_some((outer, id, pos))
}

/// Rebuilds `der` with the id element's content replaced by `content`.
fn rebuild(der: &[u8], outer: &Tlv, id: &Tlv, id_pos: usize, content: &[u8]) -> Vec<u8> {
    let inner_len = outer.len - (id.end() - id_pos) + 2 + content.len();
    let mut out = Vec::with_capacity(inner_len + 6);
    out.push(SEQUENCE);
    push_len(&mut out, inner_len);
    out.extend_from_slice(&der[outer.content..id_pos]);
    out.push(OCTET_STRING);
    out.push(content.len() as u8);
    out.extend_from_slice(content);
    out.extend_from_slice(&der[id.end()..]);
    out
}

/// The compact form of `der` whose session id is `id`, or `None` to store `der` as it is.
pub(crate) fn compact(der: &[u8], id: &[u8]) -> Option<Vec<u8>> {
    let (outer, tlv, pos) = locate(der)?;
    if der.get(tlv.content..tlv.end())? != id {
        return None;
    }
    Some(rebuild(der, &outer, &tlv, pos, &[]))
}

/// The full DER for stored bytes under `id`: compact forms get the id back, anything else is
/// returned as `None` (use the stored bytes as they are).
pub(crate) fn expand(stored: &[u8], id: &[u8]) -> Option<Vec<u8>> {
    let (outer, tlv, pos) = locate(stored)?;
    if tlv.len != 0 || id.len() > 32 {
        return None;
    }
    Some(rebuild(stored, &outer, &tlv, pos, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal SSL_SESSION-shaped encoding with a long tail, so the outer length needs 2 bytes.
    fn sample(id: &[u8], tail: usize) -> Vec<u8> {
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
        inner.push(OCTET_STRING);
        inner.push(id.len() as u8);
        inner.extend_from_slice(id);
        inner.push(OCTET_STRING);
        inner.push(tail as u8);
        inner.extend(std::iter::repeat_n(0x42, tail));
        let mut der = vec![SEQUENCE];
        push_len(&mut der, inner.len());
        der.extend(inner);
        der
    }

    #[test]
    fn compact_then_expand_restores_the_exact_bytes() {
        for tail in [10, 100, 120] {
            let id = [0xab; 32];
            let der = sample(&id, tail);
            let small = compact(&der, &id).unwrap();
            assert_eq!(
                small.len() + 32 + usize::from(der.len() > 129 && small.len() <= 129),
                der.len()
            );
            assert_eq!(expand(&small, &id).unwrap(), der);
        }
    }

    #[test]
    fn a_different_id_is_not_compacted() {
        let der = sample(&[1; 32], 10);
        assert!(compact(&der, &[2; 32]).is_none());
    }

    #[test]
    fn plain_der_and_garbage_pass_through() {
        let der = sample(&[1; 32], 10);
        assert!(
            expand(&der, &[1; 32]).is_none(),
            "a full encoding is used as it is"
        );
        for junk in [
            &b""[..],
            b"\x30",
            b"\x30\x85\xff\xff\xff\xff\xff",
            b"\x04\x00",
            &[0xff; 40],
        ] {
            assert!(compact(junk, &[1; 32]).is_none());
            assert!(expand(junk, &[1; 32]).is_none());
        }
    }

    #[test]
    fn truncated_compact_forms_never_panic() {
        let id = [7; 32];
        let small = compact(&sample(&id, 120), &id).unwrap();
        for cut in 0..small.len() {
            let _ = expand(&small[..cut], &id);
        }
    }
}
