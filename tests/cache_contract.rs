//! What the cache promises beyond resumption itself: warming with `insert`, the decoded tier,
//! refusing bad configurations one by one, a panicking store or veto never failing a handshake,
//! and TLS 1.3 early data with single use instead of OpenSSL's anti-replay.

mod support;

use std::io::{Read, Write};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use openssl::ssl::{Ssl, SslOptions, SslSession};
use openssl_session_cache::{
    Error, LookupDone, LookupMode, MemoryStore, SessionCache, SessionId, SessionStore, StoreError,
    StoredSession,
};
use support::{client_ctx, connect, server_builder, server_ctx, Ctx, Proto, ServerClose};

/// A TLS 1.2 handshake that returns the client's and the server's session objects.
fn sessions(server: &Ctx, client: &Ctx) -> (SslSession, SslSession) {
    let (a, b) = support::stream_pair();
    let ctx = server.ctx.clone();
    let srv = thread::spawn(move || {
        let mut s = Ssl::new(&ctx).unwrap().accept(a).unwrap();
        let session = s.ssl().session().unwrap().to_owned();
        let mut buf = [0u8; 1];
        s.read_exact(&mut buf).unwrap();
        let _ = s.read(&mut buf);
        let _ = s.shutdown();
        session
    });
    let mut c = Ssl::new(&client.ctx).unwrap().connect(b).unwrap();
    c.write_all(b"x").unwrap();
    let session = c.ssl().session().unwrap().to_owned();
    let _ = c.shutdown();
    (session, srv.join().unwrap())
}

#[test]
fn insert_warms_a_cache_with_a_session_made_elsewhere() {
    let origin = SessionCache::builder().build().unwrap();
    let origin_ctx = server_ctx(Proto::Tls12, &origin, false);
    let client = client_ctx(Proto::Tls12, false);
    let (client_session, server_session) = sessions(&origin_ctx, &client);
    let warm = SessionCache::builder().build().unwrap();
    let warm_ctx = server_ctx(Proto::Tls12, &warm, false);
    let cold = connect(
        &warm_ctx,
        &client,
        Some(&client_session),
        ServerClose::Clean,
    );
    assert!(!cold.server_reused);
    warm.insert(&server_session);
    let s = warm.stats();
    assert_eq!((s.inserts, s.entries), (2, 2), "{s:?}"); // the cold full handshake's and this
    let out = connect(
        &warm_ctx,
        &client,
        Some(&client_session),
        ServerClose::Clean,
    );
    assert!(out.server_reused, "an inserted session did not resume");
    assert_eq!(warm.stats().hits, 1);
}

#[test]
fn the_decoded_tier_serves_repeated_resumptions_without_decoding() {
    for (entries, expected) in [(1024, 2), (0, 0)] {
        let cache = SessionCache::builder()
            .decoded_entries(entries)
            .build()
            .unwrap();
        let server = server_ctx(Proto::Dtls12, &cache, true);
        let client = client_ctx(Proto::Dtls12, true);
        let first = connect(&server, &client, None, ServerClose::Clean);
        for _ in 0..3 {
            let out = connect(&server, &client, first.session.as_ref(), ServerClose::Clean);
            assert!(out.server_reused && out.server_saw_client_cert);
        }
        let s = cache.stats();
        assert_eq!(
            (s.hits, s.decoded_hits),
            (3, expected),
            "tier {entries}: {s:?}"
        );
    }
}

#[test]
fn every_invalid_setting_is_refused_on_its_own() {
    let ok = || SessionCache::builder();
    assert!(ok().build().is_ok());
    assert!(ok().session_id_context([7u8; 32]).build().is_ok());
    let bad: Vec<(&str, openssl_session_cache::SessionCacheBuilder)> = vec![
        ("context of 33 bytes", ok().session_id_context([7u8; 33])),
        ("zero ttl", ok().max_ttl(Duration::ZERO)),
        ("zero session size", ok().max_session_size(0)),
        ("zero purge batch", ok().purge_batch(0)),
        ("zero purge interval", ok().purge_interval(Duration::ZERO)),
        ("zero entries", ok().max_entries(0)),
    ];
    for (what, builder) in bad {
        match builder.build() {
            Err(Error::InvalidSetting { reason, .. }) => assert!(!reason.is_empty(), "{what}"),
            other => panic!("{what}: expected a configuration error, got {other:?}"),
        }
    }
}

/// A store whose lookups panic (a bug in a user's store).
#[derive(Debug)]
struct PanickingStore {
    remote: bool,
    inner: MemoryStore,
}

impl SessionStore for PanickingStore {
    fn get(&self, _: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        panic!("store bug")
    }
    fn put(&self, id: SessionId, s: StoredSession) -> Result<(), StoreError> {
        self.inner.put(id, s)
    }
    fn take(&self, _: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        panic!("store bug")
    }
    fn remove(&self, id: &SessionId) -> Result<bool, StoreError> {
        self.inner.remove(id)
    }
    fn lookup(&self, _: SessionId, _: LookupMode, _: LookupDone) {
        panic!("store bug")
    }
    fn is_remote(&self) -> bool {
        self.remote
    }
}

#[test]
fn a_panicking_store_is_a_miss_never_a_failed_handshake() {
    for remote in [false, true] {
        let store = Arc::new(PanickingStore {
            remote,
            inner: MemoryStore::builder().build().unwrap(),
        });
        let cache = SessionCache::builder().store(store).build().unwrap();
        let server = server_ctx(Proto::Dtls12, &cache, false);
        let client = client_ctx(Proto::Dtls12, false);
        let first = connect(&server, &client, None, ServerClose::Clean);
        let second = connect(&server, &client, first.session.as_ref(), ServerClose::Clean);
        assert!(!second.server_reused, "remote {remote}");
        let s = cache.stats();
        assert_eq!((s.hits, s.misses), (0, 1), "remote {remote}: {s:?}");
        if !remote {
            assert_eq!(
                s.store_errors, 1,
                "a panicking lookup counts as a store error"
            );
        }
    }
}

/// TLS 1.3 with early data on: OpenSSL's anti-replay refuses every resumption from an external
/// cache; with `SSL_OP_NO_ANTI_REPLAY` and single use it resumes, once per ticket.
#[test]
fn early_data_resumes_with_single_use_instead_of_openssl_anti_replay() {
    const NO_ANTI_REPLAY: SslOptions = SslOptions::from_bits_retain(1 << 24);
    for (anti_replay_off, expect) in [(false, false), (true, true)] {
        let cache = SessionCache::builder().single_use(true).build().unwrap();
        let mut b = server_builder(Proto::Tls13, false);
        cache.install(&mut b).unwrap();
        b.set_max_early_data(16384).unwrap();
        if anti_replay_off {
            b.set_options(NO_ANTI_REPLAY);
        }
        let server = Ctx {
            ctx: b.build(),
            proto: Proto::Tls13,
        };
        let client = client_ctx(Proto::Tls13, false);
        let first = connect(&server, &client, None, ServerClose::Clean);
        let ticket = first.session.unwrap();
        let second = connect(&server, &client, Some(&ticket), ServerClose::Clean);
        assert_eq!(
            second.server_reused, expect,
            "anti-replay off: {anti_replay_off}"
        );
        if expect {
            // Single use: the same ticket does not resume twice.
            let replay = connect(&server, &client, Some(&ticket), ServerClose::Clean);
            assert!(!replay.server_reused, "a single-use ticket resumed twice");
        }
    }
}

#[test]
fn debug_output_names_the_settings_and_holds_no_secret() {
    let builder = SessionCache::builder().max_entries(77).single_use(true);
    let text = format!("{builder:?}");
    assert!(
        text.contains("max_entries: 77") && text.contains("single_use: true"),
        "{text}"
    );
    let cache = builder.build().unwrap();
    let server = server_ctx(Proto::Tls12, &cache, false);
    connect(
        &server,
        &client_ctx(Proto::Tls12, false),
        None,
        ServerClose::Clean,
    );
    let text = format!("{cache:?}");
    assert!(
        text.contains("SessionCache") && text.contains("inserts: 1"),
        "{text}"
    );
    // The stored session's bytes never show (the store prints counts only).
    assert!(
        !text.contains("SecretBytes") && !text.contains("StoredSession"),
        "{text}"
    );
}

#[test]
fn with_the_internal_store_on_openssl_serves_repeat_resumptions_itself() {
    for (internal, expected_hits) in [(false, 2), (true, 0)] {
        let cache = SessionCache::builder()
            .internal_store(internal)
            .build()
            .unwrap();
        let server = server_ctx(Proto::Tls12, &cache, false);
        let client = client_ctx(Proto::Tls12, false);
        let first = connect(&server, &client, None, ServerClose::Clean);
        for _ in 0..2 {
            assert!(
                connect(&server, &client, first.session.as_ref(), ServerClose::Clean).server_reused
            );
        }
        assert_eq!(
            cache.stats().hits,
            expected_hits,
            "internal store {internal}"
        );
    }
}

#[test]
fn a_session_of_exactly_the_size_limit_is_stored_and_one_byte_over_is_not() {
    let origin = SessionCache::builder().build().unwrap();
    let origin_ctx = server_ctx(Proto::Tls12, &origin, false);
    let (_, session) = sessions(&origin_ctx, &client_ctx(Proto::Tls12, false));
    let len = session.to_der().unwrap().len();
    for (limit, inserted) in [(len, 1), (len - 1, 0)] {
        let cache = SessionCache::builder()
            .max_session_size(limit)
            .build()
            .unwrap();
        cache.insert(&session);
        let s = cache.stats();
        assert_eq!(
            (s.inserts, s.rejected_oversize),
            (inserted, 1 - inserted),
            "limit {limit}"
        );
    }
}

#[test]
fn a_session_gone_from_the_store_is_decoded_afresh_when_it_comes_back() {
    let store = Arc::new(MemoryStore::builder().build().unwrap());
    let cache = SessionCache::builder()
        .store(store.clone())
        .build()
        .unwrap();
    let ctx = server_ctx(Proto::Tls12, &cache, false);
    let client = client_ctx(Proto::Tls12, false);
    let (client_session, server_session) = sessions(&ctx, &client);
    // Two resumptions: the second is served from the decoded tier.
    for _ in 0..2 {
        assert!(connect(&ctx, &client, Some(&client_session), ServerClose::Clean).server_reused);
    }
    assert_eq!(cache.stats().decoded_hits, 1);
    // Evicted from the store behind the cache's back: a miss, and the tier lets go of it.
    let id = SessionId::new(server_session.id()).unwrap();
    assert!(store.remove(&id).unwrap());
    assert!(!connect(&ctx, &client, Some(&client_session), ServerClose::Clean).server_reused);
    // Back in the store (warmed again): it resumes from a fresh decode, not from the tier.
    cache.insert(&server_session);
    assert!(connect(&ctx, &client, Some(&client_session), ServerClose::Clean).server_reused);
    assert_eq!(
        cache.stats().decoded_hits,
        1,
        "served from a tier entry the store had dropped"
    );
}

/// Threads of this process named like the purge thread ("session-cache-purge", 15 characters
/// kept by the kernel).
fn purge_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "session-cache-p")
        .count()
}

isolated_test! {
/// Alone in a child process, so that no other test's cache has a purge thread.
fn the_purge_thread_is_joined_when_the_last_user_goes() {
    assert_eq!(purge_threads(), 0);
    let none = SessionCache::builder().build().unwrap();
    assert_eq!(purge_threads(), 0, "a thread without a purge interval");
    let cache = SessionCache::builder()
        .purge_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    // The thread names itself once it runs.
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while purge_threads() != 1 {
        assert!(std::time::Instant::now() < end, "no purge thread");
        std::thread::sleep(Duration::from_millis(1));
    }
    let ctx = server_ctx(Proto::Tls12, &cache, false);
    drop(cache);
    assert_eq!(purge_threads(), 1, "a context still uses the cache");
    drop(ctx);
    // Joined, not left to notice an hour later.
    assert_eq!(purge_threads(), 0);
    drop(none);
}
}

#[test]
fn a_session_larger_than_the_store_holds_is_an_oversize_reject_not_an_insert() {
    let origin = SessionCache::builder().build().unwrap();
    let origin_ctx = server_ctx(Proto::Tls12, &origin, false);
    let (_, session) = sessions(&origin_ctx, &client_ctx(Proto::Tls12, false));
    let small = Arc::new(MemoryStore::builder().max_bytes(32).build().unwrap());
    let cache = SessionCache::builder().store(small).build().unwrap();
    cache.insert(&session);
    let s = cache.stats();
    assert_eq!(
        (s.inserts, s.rejected_oversize, s.store_errors),
        (0, 1, 0),
        "{s:?}"
    );
}

/// A memory store whose lookups fail while `down` is set (a store that is restarting).
#[derive(Debug)]
struct FlakyStore {
    down: std::sync::atomic::AtomicBool,
    inner: MemoryStore,
}

impl SessionStore for FlakyStore {
    fn get(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Unavailable("restarting".into()));
        }
        self.inner.get(id)
    }
    fn put(&self, id: SessionId, s: StoredSession) -> Result<(), StoreError> {
        self.inner.put(id, s)
    }
    fn take(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        self.inner.take(id)
    }
    fn remove(&self, id: &SessionId) -> Result<bool, StoreError> {
        self.inner.remove(id)
    }
}

/// What the decoded tier holds (`decoded_entries` in the stats): each session resumed once,
/// up to the tier's bound; a lookup the store failed takes its entry away (its client gets a
/// new session), and so does a session the store no longer has. Before, a failed lookup left
/// the entry, and a soak with Redis restarted every 20 s filled the tier to its bound (RSS rose
/// for half an hour).
#[test]
fn the_decoded_tier_holds_at_most_its_bound_and_a_failed_lookup_takes_its_entry_away() {
    let store = Arc::new(FlakyStore {
        down: false.into(),
        inner: MemoryStore::builder().build().unwrap(),
    });
    let cache = SessionCache::builder()
        .store(store.clone())
        .decoded_entries(2)
        .build()
        .unwrap();
    let server = server_ctx(Proto::Dtls12, &cache, false);
    let sessions: Vec<_> = (0..3)
        .map(|_| {
            let client = client_ctx(Proto::Dtls12, false);
            let full = connect(&server, &client, None, ServerClose::Clean);
            (client, full.session.expect("a session"))
        })
        .collect();
    assert_eq!(cache.stats().decoded_entries, 0, "nothing resumed yet");
    for (i, (client, session)) in sessions.iter().enumerate() {
        let out = connect(&server, client, Some(session), ServerClose::Clean);
        assert!(out.server_reused);
        assert_eq!(cache.stats().decoded_entries, (i as u64 + 1).min(2));
    }
    // The store fails: a miss, and that session's entry goes.
    store.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let (client, session) = &sessions[2];
    let out = connect(&server, client, Some(session), ServerClose::Clean);
    assert!(!out.server_reused);
    let s = cache.stats();
    assert_eq!((s.store_errors, s.decoded_entries), (1, 1), "{s:?}");
    // Back: the session still resumes (from the store, decoded again).
    store.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let out = connect(&server, client, Some(session), ServerClose::Clean);
    assert!(out.server_reused);
    assert_eq!(cache.stats().decoded_entries, 2);
    // A session the store no longer has (a restarted store that lost it): its entry goes.
    assert!(store
        .inner
        .remove(&SessionId::new(session.id()).unwrap())
        .unwrap());
    let out = connect(&server, client, Some(session), ServerClose::Clean);
    assert!(!out.server_reused);
    assert_eq!(cache.stats().decoded_entries, 1);
}
