//! Real OpenSSL handshakes resumed through the external cache, with exact counters.

mod support;

use std::sync::Arc;
use std::time::Duration;

use openssl_session_cache::{
    CacheStats, ManualClock, MemoryStore, SessionCache, SessionId, SessionStore, StoreError,
    StoredSession,
};
use support::{client_ctx, connect, server_builder, server_ctx, Ctx, Proto, ServerClose};

fn counts(s: &CacheStats) -> (u64, u64, u64) {
    (s.hits, s.misses, s.inserts)
}

/// Full handshake, then resumption: the exact counts OpenSSL's callbacks produce.
fn full_then_resume(proto: Proto, inserts_per_full: u64, inserts_per_resume: u64) {
    let cache = SessionCache::builder().build().unwrap();
    let server = server_ctx(proto, &cache, false);
    let client = client_ctx(proto, false);

    let first = connect(&server, &client, None, ServerClose::Clean);
    assert!(!first.client_reused && !first.server_reused);
    let s = cache.stats();
    assert_eq!(counts(&s), (0, 0, inserts_per_full), "{s:?}");
    assert_eq!(s.entries, inserts_per_full);

    let second = connect(&server, &client, first.session.as_ref(), ServerClose::Clean);
    assert!(
        second.client_reused && second.server_reused,
        "{proto:?} did not resume"
    );
    let s = cache.stats();
    assert_eq!(
        counts(&s),
        (1, 0, inserts_per_full + inserts_per_resume),
        "{s:?}"
    );
    assert_eq!(s.removed, 0);
    assert_eq!(s.decode_errors + s.store_errors + s.expired, 0);
}

#[test]
fn tls12_resumes_through_the_cache() {
    full_then_resume(Proto::Tls12, 1, 0);
}

#[test]
fn tls13_stateful_tickets_resume_through_the_cache() {
    // Two tickets after a full handshake, one more after a resumption (OpenSSL's defaults).
    full_then_resume(Proto::Tls13, 2, 1);
}

#[test]
fn dtls12_resumes_through_the_cache() {
    full_then_resume(Proto::Dtls12, 1, 0);
}

#[test]
fn a_second_context_sharing_the_cache_resumes_the_first_ones_session() {
    for proto in [Proto::Tls12, Proto::Tls13, Proto::Dtls12] {
        let cache = SessionCache::builder().build().unwrap();
        let a = server_ctx(proto, &cache, false);
        let b = server_ctx(proto, &cache, false);
        let client = client_ctx(proto, false);
        let first = connect(&a, &client, None, ServerClose::Clean);
        let second = connect(&b, &client, first.session.as_ref(), ServerClose::Clean);
        assert!(
            second.server_reused,
            "{proto:?}: context B did not resume A's session"
        );
        assert_eq!(cache.stats().hits, 1);
    }
}

#[test]
fn mutual_tls_resumption_keeps_the_peer_certificate() {
    for proto in [Proto::Tls12, Proto::Dtls12] {
        let cache = SessionCache::builder().build().unwrap();
        let server = server_ctx(proto, &cache, true);
        let client = client_ctx(proto, true);
        let first = connect(&server, &client, None, ServerClose::Clean);
        assert!(first.server_saw_client_cert);
        // Twice: once decoded from DER, once from the decoded tier.
        for _ in 0..2 {
            let again = connect(&server, &client, first.session.as_ref(), ServerClose::Clean);
            assert!(again.server_reused, "{proto:?}");
            assert!(
                again.server_saw_client_cert,
                "{proto:?}: peer cert lost on resumption"
            );
        }
        assert_eq!(cache.stats().hits, 2);
    }
}

#[test]
fn a_session_id_context_mismatch_does_not_resume() {
    let store: Arc<dyn SessionStore> = Arc::new(MemoryStore::builder().build().unwrap());
    let cache_a = SessionCache::builder()
        .store(store.clone())
        .session_id_context(b"service-a")
        .build()
        .unwrap();
    let cache_b = SessionCache::builder()
        .store(store)
        .session_id_context(b"service-b")
        .build()
        .unwrap();
    let a = server_ctx(Proto::Tls12, &cache_a, false);
    let b = server_ctx(Proto::Tls12, &cache_b, false);
    let client = client_ctx(Proto::Tls12, false);
    let first = connect(&a, &client, None, ServerClose::Clean);
    let second = connect(&b, &client, first.session.as_ref(), ServerClose::Clean);
    assert!(!second.server_reused);
    // The stored form carries a fingerprint of the context: cache B sees the entry is not its
    // own, answers with a miss, and leaves it in the shared store for cache A.
    let s = cache_b.stats();
    assert_eq!(
        (s.hits, s.misses, s.inserts, s.decode_errors),
        (0, 1, 1, 0),
        "{s:?}"
    );
    assert_eq!(s.entries, 2);
    let third = connect(&a, &client, first.session.as_ref(), ServerClose::Clean);
    assert!(third.server_reused, "A's session was lost");
}

#[test]
fn session_id_context_longer_than_32_bytes_is_refused() {
    let err = SessionCache::builder()
        .session_id_context([b'x'; 33])
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("at most 32"), "{err}");
}

#[test]
fn with_tickets_on_tls12_resumes_statelessly_and_bypasses_the_cache() {
    let cache = SessionCache::builder().tickets(true).build().unwrap();
    let server = server_ctx(Proto::Tls12, &cache, false);
    let client = client_ctx(Proto::Tls12, false);
    let first = connect(&server, &client, None, ServerClose::Clean);
    let second = connect(&server, &client, first.session.as_ref(), ServerClose::Clean);
    assert!(second.server_reused);
    let s = cache.stats();
    assert_eq!(counts(&s), (0, 0, 0), "the cache was consulted: {s:?}");
}

#[test]
fn dropping_a_connection_without_shutdown_removes_its_session_unless_kept() {
    for proto in [Proto::Tls12, Proto::Dtls12] {
        let cache = SessionCache::builder().build().unwrap();
        let server = server_ctx(proto, &cache, false);
        let client = client_ctx(proto, false);

        let dropped = connect(&server, &client, None, ServerClose::Drop);
        assert_eq!(cache.stats().removed, 1, "{proto:?}");
        let retry = connect(
            &server,
            &client,
            dropped.session.as_ref(),
            ServerClose::Clean,
        );
        assert!(!retry.server_reused, "{proto:?}");

        let kept = connect(&server, &client, None, ServerClose::KeepResumable);
        let s = cache.stats();
        assert_eq!(s.removed, 1, "{proto:?}: keep_resumable did not keep it");
        let again = connect(&server, &client, kept.session.as_ref(), ServerClose::Clean);
        assert!(again.server_reused, "{proto:?}");
    }
}

#[test]
fn ignoring_remove_callbacks_keeps_sessions_of_dropped_connections() {
    let cache = SessionCache::builder()
        .honor_remove_callback(false)
        .build()
        .unwrap();
    let server = server_ctx(Proto::Tls12, &cache, false);
    let client = client_ctx(Proto::Tls12, false);
    let first = connect(&server, &client, None, ServerClose::Clean);
    // A resumed connection dropped uncleanly marks the shared decoded session not resumable;
    // the next lookup must notice and decode afresh from the store.
    let dropped = connect(&server, &client, first.session.as_ref(), ServerClose::Drop);
    assert!(dropped.server_reused);
    let again = connect(&server, &client, first.session.as_ref(), ServerClose::Clean);
    assert!(again.server_reused);
    assert_eq!(cache.stats().removed, 0);
}

#[test]
fn single_use_tls13_tickets_resume_once() {
    let cache = SessionCache::builder().single_use(true).build().unwrap();
    let server = server_ctx(Proto::Tls13, &cache, false);
    let client = client_ctx(Proto::Tls13, false);
    let first = connect(&server, &client, None, ServerClose::Clean);
    let ticket = first.session.unwrap();
    let second = connect(&server, &client, Some(&ticket), ServerClose::Clean);
    assert!(second.server_reused);
    let replay = connect(&server, &client, Some(&ticket), ServerClose::Clean);
    assert!(!replay.server_reused, "a single-use ticket resumed twice");
    // The fresh ticket from the resumption still works.
    let fresh = connect(
        &server,
        &client,
        second.session.as_ref(),
        ServerClose::Clean,
    );
    assert!(fresh.server_reused);
    let s = cache.stats();
    assert_eq!((s.hits, s.misses), (2, 1), "{s:?}");
}

#[test]
fn lru_by_entries_drops_the_oldest_unused_session() {
    let cache = SessionCache::builder().max_entries(2).build().unwrap();
    let server = server_ctx(Proto::Tls12, &cache, false);
    let client = client_ctx(Proto::Tls12, false);
    let a = connect(&server, &client, None, ServerClose::Clean).session;
    let b = connect(&server, &client, None, ServerClose::Clean).session;
    // Resume A so that B becomes the least recently used.
    assert!(connect(&server, &client, a.as_ref(), ServerClose::Clean).server_reused);
    let _c = connect(&server, &client, None, ServerClose::Clean).session;
    assert_eq!(cache.stats().evicted_capacity, 1);
    // A first: B's failed attempt makes a new session, which evicts the next LRU entry.
    assert!(connect(&server, &client, a.as_ref(), ServerClose::Clean).server_reused);
    assert!(!connect(&server, &client, b.as_ref(), ServerClose::Clean).server_reused);
}

#[test]
fn lru_by_bytes_drops_the_oldest_unused_session() {
    // Measure one session's size, then allow a little over two.
    let probe = SessionCache::builder().build().unwrap();
    let server = server_ctx(Proto::Tls12, &probe, false);
    let client = client_ctx(Proto::Tls12, false);
    connect(&server, &client, None, ServerClose::Clean);
    let one = probe.stats().bytes as usize;
    assert!(one > 64, "a TLS 1.2 session is {one} bytes?");

    let cache = SessionCache::builder()
        .max_entries(1000)
        .max_bytes(2 * one + one / 2)
        .build()
        .unwrap();
    let server = server_ctx(Proto::Tls12, &cache, false);
    let a = connect(&server, &client, None, ServerClose::Clean).session;
    let b = connect(&server, &client, None, ServerClose::Clean).session;
    assert!(connect(&server, &client, a.as_ref(), ServerClose::Clean).server_reused);
    connect(&server, &client, None, ServerClose::Clean);
    let s = cache.stats();
    assert_eq!((s.evicted_bytes, s.evicted_capacity), (1, 0), "{s:?}");
    assert!(connect(&server, &client, a.as_ref(), ServerClose::Clean).server_reused);
    assert!(!connect(&server, &client, b.as_ref(), ServerClose::Clean).server_reused);
}

#[test]
fn past_the_ttl_resumption_falls_back_to_a_full_handshake() {
    let clock = Arc::new(ManualClock::starting_now());
    let cache = SessionCache::builder()
        .clock(clock.clone())
        .max_ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    let server = server_ctx(Proto::Dtls12, &cache, false);
    let client = client_ctx(Proto::Dtls12, false);
    let first = connect(&server, &client, None, ServerClose::Clean);
    clock.advance(Duration::from_secs(30));
    assert!(connect(&server, &client, first.session.as_ref(), ServerClose::Clean).server_reused);
    clock.advance(Duration::from_secs(31));
    let late = connect(&server, &client, first.session.as_ref(), ServerClose::Clean);
    assert!(!late.server_reused);
    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.expired), (1, 1, 1), "{s:?}");
    // The expired entry is gone; the new full handshake stored its own session.
    assert_eq!((s.entries, s.inserts), (1, 2), "{s:?}");
}

#[test]
fn the_sweep_removes_expired_entries_and_keeps_live_ones() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = Arc::new(MemoryStore::builder().build().unwrap());
    let cache = SessionCache::builder()
        .clock(clock.clone())
        .store(store.clone())
        .max_ttl(Duration::from_secs(600))
        .build()
        .unwrap();
    let server = server_ctx(Proto::Tls12, &cache, false);
    let client = client_ctx(Proto::Tls12, false);
    let old = connect(&server, &client, None, ServerClose::Clean)
        .session
        .unwrap();
    let live = connect(&server, &client, None, ServerClose::Clean)
        .session
        .unwrap();
    // Give the first session a shorter life in the store.
    let old_id = SessionId::new(old.id()).unwrap();
    let entry = store.get(&old_id).unwrap().unwrap();
    store
        .put(
            old_id,
            StoredSession::new(
                entry.data().to_vec(),
                clock.now_plus(Duration::from_secs(60)),
            ),
        )
        .unwrap();
    clock.advance(Duration::from_secs(120));
    assert_eq!(cache.purge_expired(), 1);
    assert_eq!(cache.stats().expired, 1);
    assert!(store
        .get(&SessionId::new(old.id()).unwrap())
        .unwrap()
        .is_none());
    assert!(connect(&server, &client, Some(&live), ServerClose::Clean).server_reused);
}

trait NowPlus {
    fn now_plus(&self, d: Duration) -> std::time::SystemTime;
}

impl NowPlus for ManualClock {
    fn now_plus(&self, d: Duration) -> std::time::SystemTime {
        use openssl_session_cache::Clock;
        self.now() + d
    }
}

#[test]
fn a_background_purge_thread_runs_and_stops_with_the_cache() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = Arc::new(MemoryStore::builder().build().unwrap());
    let cache = SessionCache::builder()
        .clock(clock.clone())
        .store(store.clone())
        .purge_interval(Duration::from_millis(5))
        .build()
        .unwrap();
    store
        .put(
            SessionId::new(b"stale").unwrap(),
            StoredSession::new(vec![1; 10], clock.now_plus(Duration::from_secs(1))),
        )
        .unwrap();
    clock.advance(Duration::from_secs(2));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    // The thread deletes the entry, then counts it: wait for the count.
    while cache.stats().expired == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the purge thread never ran"
        );
        std::thread::yield_now();
    }
    assert_eq!(cache.stats().expired, 1);
    assert_eq!(store.usage().entries, 0);
    drop(cache); // joins the thread; a hang here fails the test by timeout
}

#[test]
fn the_purge_thread_runs_while_a_context_uses_the_cache_after_the_last_clone_is_gone() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = Arc::new(MemoryStore::builder().build().unwrap());
    let cache = SessionCache::builder()
        .clock(clock.clone())
        .store(store.clone())
        .purge_interval(Duration::from_millis(5))
        .build()
        .unwrap();
    let server = server_ctx(Proto::Tls12, &cache, false);
    drop(cache); // the context still uses it
    store
        .put(
            SessionId::new(b"stale").unwrap(),
            StoredSession::new(vec![1; 10], clock.now_plus(Duration::from_secs(1))),
        )
        .unwrap();
    clock.advance(Duration::from_secs(2));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while store.usage().entries != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the purge thread stopped with the last SessionCache clone"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(server); // the last user: the thread is stopped and joined (a hang fails the test)
}

#[test]
fn corrupted_stored_bytes_are_a_full_handshake_and_a_decode_error() {
    let store = Arc::new(MemoryStore::builder().build().unwrap());
    let cache = SessionCache::builder()
        .store(store.clone())
        .build()
        .unwrap();
    let server = server_ctx(Proto::Dtls12, &cache, false);
    let client = client_ctx(Proto::Dtls12, false);
    let first = connect(&server, &client, None, ServerClose::Clean)
        .session
        .unwrap();
    let id = SessionId::new(first.id()).unwrap();
    let entry = store.get(&id).unwrap().unwrap();
    let mut bytes = entry.data().to_vec();
    bytes.truncate(bytes.len() / 2);
    store
        .put(id, StoredSession::new(bytes, entry.expires_at()))
        .unwrap();

    let second = connect(&server, &client, Some(&first), ServerClose::Clean);
    assert!(!second.server_reused);
    let s = cache.stats();
    assert_eq!((s.decode_errors, s.hits, s.misses), (1, 0, 1), "{s:?}");
    assert!(
        store.get(&id).unwrap().is_none(),
        "the corrupt entry was kept"
    );
}

/// OpenSSL 4.0 refuses a session from the get callback whose own id is not the one the
/// ClientHello offered (`ssl_get_prev_session`, ssl/ssl_sess.c: a miss); 3.0 and 3.6 resume it
/// and answer with the stored id, which the client does not take for a resumption, and the
/// handshake fails. The cache refuses such bytes itself, the same on every version: a decode
/// error, the entry removed, a full handshake.
#[test]
fn stored_bytes_of_another_session_id_are_a_decode_error_not_a_failed_handshake() {
    let store = Arc::new(MemoryStore::builder().build().unwrap());
    let cache = SessionCache::builder()
        .store(store.clone())
        .build()
        .unwrap();
    let server = server_ctx(Proto::Dtls12, &cache, false);
    let client = client_ctx(Proto::Dtls12, false);
    let first = connect(&server, &client, None, ServerClose::Clean)
        .session
        .unwrap();
    let id = SessionId::new(first.id()).unwrap();
    let entry = store.get(&id).unwrap().unwrap();

    // Plain DER (with its own id) of a session another server context made, with the same
    // session id context, filed under the first session's id.
    let other_der = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut b = server_builder(Proto::Dtls12, false);
    b.set_session_id_context(openssl_session_cache::DEFAULT_SESSION_ID_CONTEXT)
        .unwrap();
    b.set_session_cache_mode(openssl::ssl::SslSessionCacheMode::SERVER);
    b.set_options(openssl::ssl::SslOptions::NO_TICKET);
    let slot = Arc::clone(&other_der);
    b.set_new_session_callback(move |_, session| {
        *slot.lock().unwrap() = session.to_der().unwrap();
    });
    let other = Ctx {
        ctx: b.build(),
        proto: Proto::Dtls12,
    };
    let made = connect(&other, &client, None, ServerClose::Clean)
        .session
        .unwrap();
    assert_ne!(made.id(), first.id());
    let der = other_der.lock().unwrap().clone();
    assert!(!der.is_empty());
    store
        .put(id, StoredSession::new(der, entry.expires_at()))
        .unwrap();

    let second = connect(&server, &client, Some(&first), ServerClose::Clean);
    assert!(!second.server_reused && !second.client_reused);
    let s = cache.stats();
    assert_eq!((s.decode_errors, s.hits, s.misses), (1, 0, 1), "{s:?}");
    assert!(store.get(&id).unwrap().is_none(), "the entry was kept");
}

/// A store that fails every call, as a down backend would.
#[derive(Debug)]
struct BrokenStore;

impl SessionStore for BrokenStore {
    fn get(&self, _: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    fn put(&self, _: SessionId, _: StoredSession) -> Result<(), StoreError> {
        Err(StoreError::Timeout)
    }
    fn take(&self, _: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        Err(StoreError::Timeout)
    }
    fn remove(&self, _: &SessionId) -> Result<bool, StoreError> {
        Err(StoreError::Timeout)
    }
}

#[test]
fn a_store_that_fails_never_fails_a_handshake() {
    for proto in [Proto::Tls12, Proto::Tls13, Proto::Dtls12] {
        let cache = SessionCache::builder()
            .store(Arc::new(BrokenStore))
            .build()
            .unwrap();
        let server = server_ctx(proto, &cache, false);
        let client = client_ctx(proto, false);
        let first = connect(&server, &client, None, ServerClose::Clean);
        let second = connect(&server, &client, first.session.as_ref(), ServerClose::Clean);
        assert!(!second.server_reused);
        let s = cache.stats();
        assert_eq!((s.hits, s.inserts), (0, 0), "{proto:?} {s:?}");
        assert_eq!(s.misses, 1, "{proto:?} {s:?}");
        assert!(s.store_errors >= 2, "{proto:?} {s:?}");
        assert_eq!(cache.purge_expired(), 0);
    }
}

#[test]
fn oversized_sessions_are_rejected_and_counted() {
    let cache = SessionCache::builder()
        .max_session_size(64)
        .build()
        .unwrap();
    let server = server_ctx(Proto::Tls12, &cache, false);
    let client = client_ctx(Proto::Tls12, false);
    let first = connect(&server, &client, None, ServerClose::Clean);
    assert!(!connect(&server, &client, first.session.as_ref(), ServerClose::Clean).server_reused);
    let s = cache.stats();
    assert_eq!(
        (s.rejected_oversize, s.inserts, s.entries),
        (2, 0, 0),
        "{s:?}"
    );
}

#[test]
fn concurrent_handshakes_add_up_and_do_not_deadlock() {
    const THREADS: usize = 4;
    const ROUNDS: usize = 10;
    for proto in [Proto::Tls12, Proto::Dtls12] {
        let cache = SessionCache::builder().max_entries(64).build().unwrap();
        let server = server_ctx(proto, &cache, false);
        let client = client_ctx(proto, false);
        let resumed: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    scope.spawn(|| {
                        let mut resumed = 0;
                        let first = connect(&server, &client, None, ServerClose::Clean);
                        for _ in 0..ROUNDS {
                            let r = connect(
                                &server,
                                &client,
                                first.session.as_ref(),
                                ServerClose::Clean,
                            );
                            resumed += usize::from(r.server_reused);
                        }
                        resumed
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        let s = cache.stats();
        assert_eq!(resumed, THREADS * ROUNDS, "{proto:?} {s:?}");
        assert_eq!(s.hits as usize, THREADS * ROUNDS, "{proto:?} {s:?}");
        assert_eq!(
            (s.misses, s.inserts as usize),
            (0, THREADS),
            "{proto:?} {s:?}"
        );
    }
}

#[test]
fn stored_entries_leave_out_the_session_id_and_the_context() {
    let store = Arc::new(MemoryStore::builder().build().unwrap());
    let cache = SessionCache::builder()
        .store(store.clone())
        .build()
        .unwrap();
    let server = server_ctx(Proto::Dtls12, &cache, false);
    let client = client_ctx(Proto::Dtls12, false);
    let session = connect(&server, &client, None, ServerClose::Clean)
        .session
        .unwrap();
    let stored = store
        .get(&SessionId::new(session.id()).unwrap())
        .unwrap()
        .unwrap();
    let has = |needle: &[u8]| stored.data().windows(needle.len()).any(|w| w == needle);
    let context = openssl_session_cache::DEFAULT_SESSION_ID_CONTEXT;
    assert!(!has(session.id()), "the id is stored twice");
    assert!(!has(context), "the context is stored in every entry");
    assert!(
        has(&openssl::sha::sha256(context)[..8]),
        "no context fingerprint"
    );
    // And it still resumes from that form.
    assert!(connect(&server, &client, Some(&session), ServerClose::Clean).server_reused);
}

#[test]
fn a_session_openssl_refuses_after_the_lookup_is_not_a_hit() {
    // A session made without the extended master secret, offered in a ClientHello that asks for
    // it: the cache hands it out, OpenSSL refuses to resume it (RFC 7627 §5.3) and runs a full
    // handshake.
    use openssl::ssl::{SslContext, SslMethod, SslOptions, SslVerifyMode, SslVersion};
    let cache = SessionCache::builder().build().unwrap();
    let server = server_ctx(Proto::Tls12, &cache, false);
    let mut b = SslContext::builder(SslMethod::tls()).unwrap();
    b.set_min_proto_version(Some(SslVersion::TLS1_2)).unwrap();
    b.set_max_proto_version(Some(SslVersion::TLS1_2)).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    b.set_options(SslOptions::from_bits_retain(0x1)); // SSL_OP_NO_EXTENDED_MASTER_SECRET
    let no_ems = support::Ctx {
        ctx: b.build(),
        proto: Proto::Tls12,
    };
    let first = connect(&server, &no_ems, None, ServerClose::Clean);
    let client = client_ctx(Proto::Tls12, false);
    let second = connect(&server, &client, first.session.as_ref(), ServerClose::Clean);
    assert!(!second.server_reused);
    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.refused), (0, 1, 1), "{s:?}");
    assert_eq!(s.inserts, 2);
}
