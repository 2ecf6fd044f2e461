//! Entry points for the fuzz targets in `fuzz/` (cargo feature `__fuzzing`, not for users): each
//! takes arbitrary bytes, runs one parser the crate exposes to untrusted input, and checks what
//! must hold whatever the input (no panic, round trips). The unit tests below run them on the
//! committed seed corpora, so the stable toolchain exercises them too.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::cache::der;
use crate::dsm::DsmConfig;
use crate::server::record::{screen, ClientHello, HandshakeBudget, Screened};
use crate::store::{KeyRing, SessionId};
use crate::{Endpoint, ServerConfig, SessionCache};

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

/// A snapshot file's contents through the parse `load_snapshot` uses. The first byte picks the
/// mode: odd, the rest gets a valid authenticated trailer appended (as if this process had
/// written it), which reaches the entries behind the trailer's check; even, the rest is the
/// file as is. Whatever loads holds no expired session, and, put into a one-shard store as
/// `load_snapshot` does, saves to a snapshot that loads back to the same sessions in the same
/// order.
pub fn snapshot_load(data: &[u8]) {
    use std::time::{SystemTime, UNIX_EPOCH};

    use crate::store::snapshot;
    use crate::{MemoryStore, SessionStore, SessionStoreAdmin, StoreError};

    let ring = KeyRing::new(1, [9; 32]);
    let now: SystemTime = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let mut file = body.to_vec();
    if mode & 1 == 1 {
        file.extend(snapshot::trailer(&ring, body).expect("sealing a trailer"));
    }
    let Ok(sessions) = snapshot::parse(&file, &ring, now) else {
        return;
    };
    let store = MemoryStore::builder()
        .shards(1)
        .max_entries(1 << 16)
        .max_bytes(1 << 26)
        .build()
        .expect("store");
    for (id, session) in &sessions {
        assert!(!session.is_expired(now), "an expired session loaded");
        match store.put(*id, session.clone()) {
            Ok(()) | Err(StoreError::TooLarge { .. }) => {}
            Err(e) => panic!("a memory store put failed: {e}"),
        }
    }
    let mut walked = Vec::new();
    store
        .for_each(&mut |id, s| walked.push((*id, s.clone())))
        .expect("walk");
    let saved = snapshot::encode(&walked, &ring).expect("a loaded store saves");
    let again = snapshot::parse(&saved, &ring, now).expect("a saved snapshot loads");
    assert_eq!(again, walked, "the reloaded sessions differ");
}

/// One datagram from an unknown or known peer, through the parsers that see it before OpenSSL:
/// the ClientHello parser (and what it builds from one), the record screen and the handshake
/// budget.
pub fn datagram(data: &[u8]) {
    if let Ok(hello) = ClientHello::parse(data) {
        let hvr = hello.hello_verify_request(&[7; 32]);
        assert!(
            ClientHello::parse(&hvr).is_err(),
            "a HelloVerifyRequest is not a ClientHello"
        );
        if let Some(first) = hello.reconstruct_first() {
            let again = ClientHello::parse(&first).expect("the reconstructed hello parses");
            assert!(again.cookie().is_empty());
            assert_eq!(again.message_seq(), 0);
        }
        let with = hello.with_cookie(&[1; 32]);
        let parsed = ClientHello::parse(&with).expect("a hello with a cookie put in parses");
        assert_eq!(parsed.cookie(), &[1; 32]);
    }
    for min in [0, 16, 24] {
        match screen(data, min, 0) {
            Screened::Whole(w) => assert_eq!(w, data),
            Screened::Kept(k) => assert!(!k.is_empty() && k.len() < data.len()),
            Screened::Nothing => {}
        }
    }
    let mut budget = HandshakeBudget::default();
    for _ in 0..3 {
        if let Screened::Kept(k) = budget.admit(data, 0) {
            assert!(k.len() < data.len());
        }
    }
}

fn fuzz_config() -> Arc<ServerConfig> {
    static CONFIG: OnceLock<Arc<ServerConfig>> = OnceLock::new();
    Arc::clone(CONFIG.get_or_init(|| {
        let cache = SessionCache::builder().build().expect("cache");
        ServerConfig::builder(cache)
            .dsm(
                DsmConfig::new(16)
                    .with_max_handshakes(4)
                    .with_max_per_source(8),
            )
            .build()
            .expect("server config")
    }))
}

/// An endpoint fed an arbitrary sequence of datagrams: each is `[port][flags][len: u16 BE][bytes]`;
/// when the bytes parse as a ClientHello and flag bit 0 is set, a valid cookie for the source
/// address is put in, so the fuzzer reaches the state behind the cookie (an `Ssl` fed whatever
/// follows). Bit 1 advances time by a second and runs the timers. The endpoint's bounds must
/// hold after every step.
pub fn endpoint(data: &[u8]) {
    let config = fuzz_config();
    let mut ep = Endpoint::new(Arc::clone(&config)).expect("endpoint");
    let mut now = Instant::now();
    let mut rest = data;
    while rest.len() >= 4 {
        let (port, flags) = (rest[0], rest[1]);
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        rest = &rest[4..];
        let take = len.min(rest.len());
        let (bytes, tail) = rest.split_at(take);
        rest = tail;
        let from = SocketAddr::from(([127, 0, 0, 1], 40_000 + u16::from(port % 8)));
        let fixed;
        let datagram = match ClientHello::parse(bytes) {
            Ok(hello) if flags & 1 == 1 => {
                fixed = hello.with_cookie(&config.cookies.generate(from));
                &fixed[..]
            }
            _ => bytes,
        };
        ep.handle(now, from, datagram);
        if flags & 2 == 2 {
            now += Duration::from_secs(1);
            ep.handle_timeout(now);
        }
        while ep.poll_transmit().is_some() {}
        while ep.poll_event().is_some() {}
        assert!(ep.peer_count() <= 16);
        assert!(ep.stats().handshaking <= 4, "{:?}", ep.stats());
    }
    ep.close_all();
    assert_eq!(ep.peer_count(), 0);
}

/// Cookie verification: an arbitrary cookie verifies for an address exactly when it is the
/// cookie made for that address.
pub fn cookie(data: &[u8]) {
    let config = fuzz_config();
    let Some((&port, cookie)) = data.split_first() else {
        return;
    };
    let from = SocketAddr::from(([10, 0, 0, 1], u16::from(port)));
    let made = config.cookies.generate(from);
    assert_eq!(config.cookies.verify(from, cookie), cookie == made);
    assert!(config.cookies.verify(from, &made));
}

/// Arbitrary datagrams to a lean peer's record layer, among genuine records of its client.
/// The first byte picks the AEAD (its value modulo 7) and whether the association has a
/// connection ID (bit 7: the client's records are then `tls12_cid` records); then each step is `[op][a][b]`: op 0 delivers the client's
/// genuine record `a` (sealing it first, `b` bytes long, if it does not exist yet), op 1
/// delivers it with byte `b` XORed with `0x01 << (a % 8)`, op 2 delivers `a` arbitrary bytes
/// taken from the input, op 3 moves the client's sequence numbers `a * 256` ahead. Whatever
/// comes: no panic; a record opens only if it is a genuine record never taken before, with its
/// own plaintext; a record refused leaves the replay window as it was and yields nothing; a
/// genuine record the window still admits is taken.
pub fn lean_record(data: &[u8]) {
    use crate::server::record::keys::{Aead, RecordKeys};
    use crate::server::record::protect::{Crypto, RecordState, CONTENT_APPLICATION_DATA};
    use crate::server::record::records;
    use crate::server::record::replay::ReplayWindow;

    let Some((&pick, mut rest)) = data.split_first() else {
        return;
    };
    let aead = Aead::ALL[usize::from(pick & 0x7f) % Aead::ALL.len()];
    const CID: &[u8] = &[0, 0xc1, 0xd0, 0x5e, 0xed, 0x77, 0x01];
    let cid = (pick & 0x80 != 0).then_some(CID);
    let cid_len = cid.map_or(0, <[u8]>::len);
    let keys = RecordKeys::from_master_secret(
        aead,
        openssl::hash::MessageDigest::sha256(),
        &[5; 48],
        &[6; 32],
        &[7; 32],
    )
    .expect("key block");
    let mut server =
        RecordState::new(keys.clone(), 1, 1, ReplayWindow::default()).with_cids(cid, None);
    let mut client =
        RecordState::new(keys.swapped(), 1, 1, ReplayWindow::default()).with_cids(None, cid);
    let mut crypto = Crypto::default();
    // Genuine client records: (bytes, plaintext, sequence number, taken).
    let mut genuine: Vec<(Vec<u8>, Vec<u8>, u64, bool)> = Vec::new();
    let mut out = Vec::new();
    while rest.len() >= 3 {
        let (op, a, b) = (rest[0] % 4, rest[1], rest[2]);
        rest = &rest[3..];
        let datagram = match op {
            0 | 1 => {
                let i = usize::from(a) % 16;
                while genuine.len() <= i {
                    let plain = vec![genuine.len() as u8; usize::from(b)];
                    let mut record = Vec::new();
                    client
                        .seal(&mut crypto, CONTENT_APPLICATION_DATA, &plain, &mut record)
                        .expect("sealing a client record");
                    let seq = client.next_write() - 1;
                    genuine.push((record, plain, seq, false));
                }
                let mut d = genuine[i].0.clone();
                if op == 1 {
                    let at = usize::from(b) % d.len();
                    d[at] ^= 1 << (a % 8);
                }
                d
            }
            2 => {
                let take = usize::from(a).min(rest.len());
                let (bytes, tail) = rest.split_at(take);
                rest = tail;
                bytes.to_vec()
            }
            _ => {
                client.set_next_write(client.next_write() + u64::from(a) * 256);
                continue;
            }
        };
        for record in records(&datagram, cid_len) {
            let window = server.window();
            let known = genuine.iter().position(|g| g.0 == record);
            let admits = known.is_some_and(|i| window.is_fresh(genuine[i].2));
            match server.open(&mut crypto, record, &mut out) {
                Ok(opened) => {
                    let i = known.expect("a record that is not genuine opened");
                    let g = &mut genuine[i];
                    assert!(!g.3, "a genuine record was taken twice");
                    g.3 = true;
                    assert_eq!(opened.seq, g.2);
                    assert_eq!(out, g.1, "plaintext of another record");
                }
                Err(_) => {
                    assert_eq!(server.window(), window, "a refused record moved the window");
                    assert!(out.is_empty(), "a refused record left plaintext");
                    assert!(!admits, "a genuine, fresh record was refused");
                }
            }
        }
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
        assert!(on_corpus("datagram", super::datagram) > 0);
        assert!(on_corpus("endpoint", super::endpoint) > 0);
        assert!(on_corpus("cookie", super::cookie) > 0);
        assert!(on_corpus("snapshot_load", super::snapshot_load) > 0);
        assert!(on_corpus("lean_record", super::lean_record) > 0);
    }
}
