//! Entry points for the fuzz targets in `fuzz/` (cargo feature `__fuzzing`, not for users): each
//! takes arbitrary bytes, runs one parser the crate exposes to untrusted input, and checks what
//! must hold whatever the input (no panic, round trips). The unit tests below run them on the
//! committed seed corpora, so the stable toolchain exercises them too.

use crate::cache::der;
use crate::store::{KeyRing, SessionId};

const CTX: &[u8] = crate::DEFAULT_SESSION_ID_CONTEXT;

/// Stored session bytes as a store hands them back: the policy header, the compact form, the
/// DER decode. Whatever decodes must survive the compact round trip unchanged.
pub fn stored_session(data: &[u8]) {
    let id = [0x11u8; 32];
    let fp = der::fingerprint(CTX);
    let (_, body) = der::split_policy(data);
    let _ = der::psk_identity(body);
    let full = match der::expand(body, &id, CTX, &fp) {
        der::Expanded::Der(full) => full,
        der::Expanded::AsIs => body.to_vec(),
        der::Expanded::OtherContext => return,
    };
    if openssl::ssl::SslSession::from_der(&full).is_err() {
        return;
    }
    if let Some(small) = der::compact(&full, &id, CTX, &fp) {
        assert!(small.len() <= full.len());
        assert_eq!(der::expand(&small, &id, CTX, &fp), der::Expanded::Der(full));
    }
}

/// An envelope read from a hostile store: it opens only if it is authentic, and then decodes
/// to a session no longer than the envelope.
pub fn envelope_open(data: &[u8]) {
    let ring = KeyRing::new(1, [7; 32]);
    let Some((&n, envelope)) = data.split_first() else {
        return;
    };
    let id = SessionId::new(&[n; 8]).expect("8 bytes is a valid id");
    if let Ok(plain) = ring.open(&id, envelope) {
        assert!(plain.len() < envelope.len());
    }
    if let Ok(session) = ring.open_session(&id, envelope) {
        assert!(session.len() < envelope.len());
    }
}

/// A key file: what parses writes back to a file that parses to the same ring.
pub fn key_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ring) = KeyRing::parse(text) {
        let again = KeyRing::parse(&ring.to_file_string()).expect("a written key file parses");
        assert_eq!(again.key_ids(), ring.key_ids());
        assert_eq!(again.active_key_id(), ring.active_key_id());
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Runs `f` on every file of `fuzz/corpus/<target>` (the committed seeds).
    fn on_corpus(target: &str, f: fn(&[u8])) -> usize {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            f(&bytes);
            n += 1;
        }
        n
    }

    #[test]
    fn seed_corpora_pass_their_targets() {
        assert!(on_corpus("stored_session", super::stored_session) > 0);
        assert!(on_corpus("envelope_open", super::envelope_open) > 0);
        assert!(on_corpus("key_file", super::key_file) > 0);
    }
}
