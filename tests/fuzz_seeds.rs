//! Writes the seed corpora of the fuzz targets (`fuzz/corpus/<target>/`) from real sessions.
//! Run by hand when a target or a stored format changes:
//! `cargo test --all-features --test fuzz_seeds -- --ignored`.
#![cfg(feature = "server")]

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use openssl_session_cache::{
    KeyRing, MemoryStore, SessionCache, SessionId, SessionStoreAdmin, StoredSession,
};
use support::{client_ctx, connect, server_ctx, Proto, ServerClose};

fn corpus(target: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
#[ignore = "writes files; run by hand"]
fn write_seed_corpora() {
    // Stored forms of real server sessions, as the cache stores them.
    let dir = corpus("stored_session");
    for proto in [Proto::Tls12, Proto::Tls13, Proto::Dtls12] {
        for mtls in [false, true] {
            let store = Arc::new(MemoryStore::builder().build().unwrap());
            let cache = SessionCache::builder()
                .store(store.clone())
                .build()
                .unwrap();
            let server = server_ctx(proto, &cache, mtls);
            connect(&server, &client_ctx(proto, mtls), None, ServerClose::Clean);
            let mut n = 0;
            store
                .for_each(&mut |_, s| {
                    n += 1;
                    std::fs::write(dir.join(format!("{proto:?}-mtls{mtls}-{n}")), s.data())
                        .unwrap();
                })
                .unwrap();
        }
    }
    // Envelopes sealed with the ring the target opens with: first byte n, id [n; 8].
    let dir = corpus("envelope_open");
    let ring = KeyRing::new(1, [7; 32]);
    for n in [0u8, 9, 200] {
        let id = SessionId::new(&[n; 8]).unwrap();
        let s = StoredSession::new(
            vec![n; 40 + usize::from(n)],
            SystemTime::now() + Duration::from_secs(60),
        );
        let mut bytes = vec![n];
        bytes.extend(ring.seal_session(&id, &s).unwrap());
        std::fs::write(dir.join(format!("sealed-{n}")), bytes).unwrap();
    }
    let dir = corpus("key_file");
    std::fs::write(
        dir.join("two-keys"),
        "# store keys; the last one seals\n1:8f1c0d5e0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5\n2:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
    )
    .unwrap();
    std::fs::write(dir.join("bad-line"), "1:zz\n").unwrap();

    // A real client's first flights: its cookieless ClientHello, and after the server's
    // HelloVerifyRequest its ClientHello with the cookie.
    use openssl::ssl::{Ssl, SslStream};
    use openssl_session_cache::{DatagramPipe, Endpoint, ServerConfig};
    let config = ServerConfig::builder(SessionCache::builder().build().unwrap())
        .build()
        .unwrap();
    let mut ep = Endpoint::new(config).unwrap();
    let from: std::net::SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let mut ssl = Ssl::new(&support::server::client_ctx()).unwrap();
    ssl.set_mtu(1400).unwrap();
    ssl.set_connect_state();
    let mut client = SslStream::new(ssl, DatagramPipe::new()).unwrap();
    let mut flights = Vec::new();
    for _ in 0..3 {
        let _ = client.do_handshake();
        for d in client.get_mut().take_outbound() {
            ep.handle(std::time::Instant::now(), from, &d);
            flights.push(d);
        }
        while let Some(t) = ep.poll_transmit() {
            client.get_mut().push(t.payload);
        }
    }
    let dir = corpus("datagram");
    for (i, d) in flights.iter().enumerate() {
        std::fs::write(dir.join(format!("client-flight-{i}")), d).unwrap();
    }
    // The endpoint target: [port][flags][len][bytes] per datagram; flag 1 puts a valid cookie
    // into a ClientHello, flag 2 advances time.
    let dir = corpus("endpoint");
    let mut seq = Vec::new();
    for (i, d) in flights.iter().enumerate() {
        seq.push(0);
        seq.push(if i == 0 { 1 } else { 0 });
        seq.extend_from_slice(&(d.len() as u16).to_be_bytes());
        seq.extend_from_slice(d);
    }
    std::fs::write(dir.join("cookie-then-flights"), &seq).unwrap();
    seq.extend_from_slice(&[0, 2, 0, 0]);
    std::fs::write(dir.join("then-a-second"), &seq).unwrap();
    // Snapshots sealed with the target's ring, at the target's "now" (2023-11-14T22:13:20Z).
    let dir = corpus("snapshot_load");
    let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let ring = KeyRing::new(1, [9; 32]);
    let store = MemoryStore::builder().shards(1).build().unwrap();
    for i in 0..4u8 {
        let id = SessionId::new(&[i; 32]).unwrap();
        let s = StoredSession::new(vec![i; 60], now + Duration::from_secs(3600 * u64::from(i)));
        openssl_session_cache::SessionStore::put(&store, id, s).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("s.snap");
    openssl_session_cache::snapshot::save_snapshot(&store, &path, &ring, now).unwrap();
    let file = std::fs::read(&path).unwrap();
    let mut whole = vec![0u8];
    whole.extend_from_slice(&file);
    std::fs::write(dir.join("valid-file"), whole).unwrap();
    // Mode 1: the target appends the trailer itself.
    let mut body = vec![1u8];
    // The trailer is an envelope of a 32-byte digest: as long as any 32-byte envelope.
    let trailer_len = ring
        .seal(&SessionId::new(&[0; 8]).unwrap(), &[0; 32])
        .unwrap()
        .len();
    body.extend_from_slice(&file[..file.len() - trailer_len]);
    std::fs::write(dir.join("body-for-a-fresh-trailer"), body).unwrap();
    let dir = corpus("cookie");
    std::fs::write(dir.join("short"), [7u8, 1, 2, 3]).unwrap();
    std::fs::write(dir.join("full-length"), [9u8; 33]).unwrap();
}
