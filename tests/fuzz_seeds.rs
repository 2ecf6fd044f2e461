//! Writes the seed corpora of the fuzz targets (`fuzz/corpus/<target>/`) from real sessions.
//! Run by hand when a target or a stored format changes:
//! `cargo test --all-features --test fuzz_seeds -- --ignored`.

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
}
