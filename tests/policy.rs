//! Stored sessions obey today's policy, not the one they were made under: a shorter lifetime, a
//! cipher suite the server no longer offers, a revoked or re-keyed PSK identity, and the
//! application's veto. Each "restart" is a new cache and context over the same store, as after a
//! snapshot reload or on another host of a farm.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openssl::ssl::{SslContext, SslMethod, SslVerifyMode, SslVersion};
use openssl_session_cache::{CacheStats, ManualClock, MemoryStore, SessionCache, SessionStore};
use support::{client_ctx, connect, server_builder, Ctx, Proto, ServerClose};
use zeroize::Zeroizing;

fn cache_on(store: &Arc<MemoryStore>) -> openssl_session_cache::SessionCacheBuilder {
    SessionCache::builder().store(store.clone() as Arc<dyn SessionStore>)
}

fn refusals(s: &CacheStats) -> (u64, u64, u64, u64) {
    (s.hits, s.expired, s.stale, s.vetoed)
}

#[test]
fn a_shorter_lifetime_applies_to_sessions_made_under_a_longer_one() {
    let store = Arc::new(MemoryStore::builder().build().unwrap());
    let clock = Arc::new(ManualClock::starting_now());
    let before = cache_on(&store).clock(clock.clone()).build().unwrap();
    let client = client_ctx(Proto::Tls12, false);
    let first = connect(
        &support::server_ctx(Proto::Tls12, &before, false),
        &client,
        None,
        ServerClose::Clean,
    );
    // Restarted with a 5 s lifetime; 8 s later the session made under 2 h no longer resumes.
    let after = cache_on(&store)
        .clock(clock.clone())
        .max_ttl(Duration::from_secs(5))
        .build()
        .unwrap();
    let server = support::server_ctx(Proto::Tls12, &after, false);
    clock.advance(Duration::from_secs(8));
    let out = connect(&server, &client, first.session.as_ref(), ServerClose::Clean);
    assert!(!out.server_reused);
    assert_eq!(
        refusals(&after.stats()),
        (0, 1, 0, 0),
        "{:?}",
        after.stats()
    );
    assert_eq!(store.usage().entries, 1, "only the new session is left");
}

#[test]
fn a_cipher_the_server_no_longer_offers_does_not_resume() {
    let store = Arc::new(MemoryStore::builder().build().unwrap());
    let before = cache_on(&store).build().unwrap();
    let mut b = server_builder(Proto::Tls12, false);
    b.set_cipher_list("ECDHE-ECDSA-AES256-GCM-SHA384").unwrap();
    before.install(&mut b).unwrap();
    let old_server = Ctx {
        ctx: b.build(),
        proto: Proto::Tls12,
    };
    let client = client_ctx(Proto::Tls12, false);
    let first = connect(&old_server, &client, None, ServerClose::Clean);

    let after = cache_on(&store).build().unwrap();
    let mut b = server_builder(Proto::Tls12, false);
    b.set_cipher_list("ECDHE-ECDSA-AES128-GCM-SHA256").unwrap();
    after.install(&mut b).unwrap();
    let new_server = Ctx {
        ctx: b.build(),
        proto: Proto::Tls12,
    };
    let out = connect(
        &new_server,
        &client,
        first.session.as_ref(),
        ServerClose::Clean,
    );
    assert!(
        !out.server_reused,
        "resumed with a cipher the server dropped"
    );
    assert_eq!(
        refusals(&after.stats()),
        (0, 0, 1, 0),
        "{:?}",
        after.stats()
    );
    // Still offered: it resumes.
    let again = connect(
        &old_server,
        &client,
        first.session.as_ref(),
        ServerClose::Clean,
    );
    assert!(
        !again.server_reused,
        "the stale session was removed from the store"
    );
}

/// PSK identities and keys the "server" knows now.
type Keys = Arc<Mutex<HashMap<Vec<u8>, Vec<u8>>>>;

fn psk_server(cache: &SessionCache, keys: &Keys) -> Ctx {
    let mut b = SslContext::builder(SslMethod::tls()).unwrap();
    b.set_min_proto_version(Some(SslVersion::TLS1_2)).unwrap();
    b.set_max_proto_version(Some(SslVersion::TLS1_2)).unwrap();
    b.set_cipher_list("PSK-AES128-GCM-SHA256").unwrap();
    let k = keys.clone();
    b.set_psk_server_callback(move |_ssl, identity, out| {
        let keys = k.lock().unwrap();
        match identity.and_then(|i| keys.get(i)) {
            Some(key) if key.len() <= out.len() => {
                out[..key.len()].copy_from_slice(key);
                Ok(key.len())
            }
            _ => Ok(0),
        }
    });
    cache.install(&mut b).unwrap();
    Ctx {
        ctx: b.build(),
        proto: Proto::Tls12,
    }
}

fn psk_client(identity: &'static [u8], key: &'static [u8]) -> Ctx {
    let mut b = SslContext::builder(SslMethod::tls()).unwrap();
    b.set_min_proto_version(Some(SslVersion::TLS1_2)).unwrap();
    b.set_max_proto_version(Some(SslVersion::TLS1_2)).unwrap();
    b.set_cipher_list("PSK-AES128-GCM-SHA256").unwrap();
    b.set_verify(SslVerifyMode::NONE);
    b.set_psk_client_callback(move |_ssl, _hint, id_out, key_out| {
        id_out[..identity.len()].copy_from_slice(identity);
        id_out[identity.len()] = 0;
        key_out[..key.len()].copy_from_slice(key);
        Ok(key.len())
    });
    Ctx {
        ctx: b.build(),
        proto: Proto::Tls12,
    }
}

fn psk_cache(store: &Arc<MemoryStore>, keys: &Keys) -> SessionCache {
    let k = keys.clone();
    cache_on(store)
        .psk_keys(move |identity| k.lock().unwrap().get(identity).cloned().map(Zeroizing::new))
        .build()
        .unwrap()
}

#[test]
fn a_revoked_or_rekeyed_psk_identity_does_not_resume() {
    let store = Arc::new(MemoryStore::builder().build().unwrap());
    let keys: Keys = Arc::default();
    keys.lock()
        .unwrap()
        .insert(b"dev-1".to_vec(), b"0123456789abcdef".to_vec());
    let cache = psk_cache(&store, &keys);
    let server = psk_server(&cache, &keys);
    let client = psk_client(b"dev-1", b"0123456789abcdef");
    let first = connect(&server, &client, None, ServerClose::Clean);
    let session = first.session.unwrap();
    // Same key: resumes (twice, so the decoded tier is exercised too).
    for _ in 0..2 {
        assert!(connect(&server, &client, Some(&session), ServerClose::Clean).server_reused);
    }
    assert_eq!(refusals(&cache.stats()), (2, 0, 0, 0));

    // Restarted with the identity re-keyed: the stored session must not resume.
    keys.lock()
        .unwrap()
        .insert(b"dev-1".to_vec(), b"fedcba9876543210".to_vec());
    let restarted = psk_cache(&store, &keys);
    let server2 = psk_server(&restarted, &keys);
    // The client still holds the old key, so once the session is refused the full handshake
    // fails too; without the check the old session would resume and the connection succeed.
    assert!(
        !handshake_succeeds(&server2, &client, &session),
        "a session of the old key resumed"
    );
    assert_eq!(refusals(&restarted.stats()), (0, 0, 1, 0));

    // Revoked: neither the old nor any session of that identity resumes.
    let store = Arc::new(MemoryStore::builder().build().unwrap());
    keys.lock()
        .unwrap()
        .insert(b"dev-1".to_vec(), b"0123456789abcdef".to_vec());
    let cache = psk_cache(&store, &keys);
    let server = psk_server(&cache, &keys);
    let first = connect(&server, &client, None, ServerClose::Clean);
    keys.lock().unwrap().remove(&b"dev-1"[..]);
    assert!(
        !handshake_succeeds(&server, &client, first.session.as_ref().unwrap()),
        "a revoked identity resumed"
    );
    assert_eq!(refusals(&cache.stats()), (0, 0, 1, 0));
}

#[test]
fn a_psk_session_nothing_can_check_does_not_resume_unless_the_cache_says_so_by_name() {
    // A context of one's own with its own PSK callback and no `psk_keys`: the cache cannot
    // tell a revoked identity from a valid one, so by default such sessions do not resume.
    let keys: Keys = Arc::default();
    keys.lock()
        .unwrap()
        .insert(b"dev-1".to_vec(), b"0123456789abcdef".to_vec());
    let client = psk_client(b"dev-1", b"0123456789abcdef");
    let store = Arc::new(MemoryStore::builder().build().unwrap());
    let cache = cache_on(&store).build().unwrap();
    let server = psk_server(&cache, &keys);
    let first = connect(&server, &client, None, ServerClose::Clean);
    let again = connect(&server, &client, first.session.as_ref(), ServerClose::Clean);
    assert!(!again.server_reused, "an unchecked psk session resumed");
    assert_eq!(refusals(&cache.stats()), (0, 0, 1, 0));

    // Opted out by name: it resumes, as with OpenSSL alone.
    let store = Arc::new(MemoryStore::builder().build().unwrap());
    let open = cache_on(&store)
        .resume_unchecked_psk_sessions()
        .build()
        .unwrap();
    let server = psk_server(&open, &keys);
    let first = connect(&server, &client, None, ServerClose::Clean);
    let again = connect(&server, &client, first.session.as_ref(), ServerClose::Clean);
    assert!(again.server_reused);
    assert_eq!(refusals(&open.stats()), (1, 0, 0, 0));

    // Where a key source exists the opt-out changes nothing: a revoked identity stays out.
    let store = Arc::new(MemoryStore::builder().build().unwrap());
    let k = keys.clone();
    let checked = cache_on(&store)
        .resume_unchecked_psk_sessions()
        .psk_keys(move |identity| k.lock().unwrap().get(identity).cloned().map(Zeroizing::new))
        .build()
        .unwrap();
    let server = psk_server(&checked, &keys);
    let first = connect(&server, &client, None, ServerClose::Clean);
    keys.lock().unwrap().remove(&b"dev-1"[..]);
    assert!(!handshake_succeeds(
        &server,
        &client,
        first.session.as_ref().unwrap()
    ));
    assert_eq!(refusals(&checked.stats()), (0, 0, 1, 0));
}

/// Whether a connection offering `session` completes (the harness panics when a side fails).
fn handshake_succeeds(server: &Ctx, client: &Ctx, session: &openssl::ssl::SslSession) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        connect(server, client, Some(session), ServerClose::Clean)
    }))
    .is_ok()
}

#[test]
fn the_application_can_veto_any_session_and_sees_what_it_decides_on() {
    let store = Arc::new(MemoryStore::builder().build().unwrap());
    type Seen = Vec<(Option<String>, Option<String>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let s = seen.clone();
    let cache = cache_on(&store)
        .accept_session(move |info| {
            let subject = info.peer_certificate.map(|c| {
                c.subject_name()
                    .entries()
                    .next()
                    .map(|e| String::from_utf8_lossy(e.data().as_slice()).into_owned())
                    .unwrap_or_default()
            });
            s.lock()
                .unwrap()
                .push((subject.clone(), info.cipher.map(str::to_owned)));
            assert!(info.age < Duration::from_secs(60));
            subject.as_deref() != Some("client.test")
        })
        .build()
        .unwrap();
    let server = support::server_ctx(Proto::Tls12, &cache, true);
    let client = client_ctx(Proto::Tls12, true);
    let first = connect(&server, &client, None, ServerClose::Clean);
    let out = connect(&server, &client, first.session.as_ref(), ServerClose::Clean);
    assert!(!out.server_reused, "vetoed session resumed");
    assert_eq!(refusals(&cache.stats()), (0, 0, 0, 1));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0.as_deref(), Some("client.test"));
    assert!(seen[0].1.as_deref().is_some_and(|c| c.contains("ECDSA")));
}

#[test]
fn a_panicking_veto_is_a_refusal_not_a_crash() {
    let store = Arc::new(MemoryStore::builder().build().unwrap());
    let cache = cache_on(&store)
        .accept_session(|_| panic!("application bug"))
        .build()
        .unwrap();
    let server = support::server_ctx(Proto::Dtls12, &cache, false);
    let client = client_ctx(Proto::Dtls12, false);
    let first = connect(&server, &client, None, ServerClose::Clean);
    let out = connect(&server, &client, first.session.as_ref(), ServerClose::Clean);
    assert!(!out.server_reused);
    assert_eq!(refusals(&cache.stats()), (0, 0, 0, 1));
}
