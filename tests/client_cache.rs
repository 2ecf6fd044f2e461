//! The client-side cache resumes against a real server and keys sessions correctly.

mod support;

use std::io::{Read, Write};
use std::thread;

use openssl::ssl::{Ssl, SslContext, SslMethod, SslVerifyMode, SslVersion};
use openssl_session_cache::{ClientSessionCache, SessionCache};
use support::{server_ctx, Ctx, Proto};

fn client(proto: Proto, sessions: &ClientSessionCache) -> SslContext {
    let mut b = SslContext::builder(SslMethod::tls()).unwrap();
    let v = if proto == Proto::Tls13 {
        SslVersion::TLS1_3
    } else {
        SslVersion::TLS1_2
    };
    b.set_min_proto_version(Some(v)).unwrap();
    b.set_max_proto_version(Some(v)).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    sessions.install(&mut b);
    b.build()
}

/// Connects under `key`; returns (offered a session, server says reused).
fn connect(
    server: &Ctx,
    client: &SslContext,
    sessions: &ClientSessionCache,
    key: &str,
) -> (bool, bool) {
    let (a, b) = support::stream_pair();
    thread::scope(|scope| {
        let srv = scope.spawn(move || {
            let mut s = Ssl::new(&server.ctx).unwrap().accept(a).unwrap();
            let reused = s.ssl().session_reused();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
            let _ = s.read(&mut buf); // close_notify
            let _ = s.shutdown();
            reused
        });
        let mut ssl = Ssl::new(client).unwrap();
        let offered = sessions.resume(&mut ssl, key).unwrap();
        let mut c = ssl.connect(b).unwrap();
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).unwrap(); // also reads TLS 1.3 tickets
        let _ = c.shutdown();
        let reused = srv.join().unwrap();
        (offered, reused)
    })
}

#[test]
fn the_client_cache_resumes_tls12_repeatedly() {
    let cache = SessionCache::builder().build().unwrap();
    let server = server_ctx(Proto::Tls12, &cache, false);
    let sessions = ClientSessionCache::new(16, 2);
    let client = client(Proto::Tls12, &sessions);
    assert_eq!(
        connect(&server, &client, &sessions, "a:443"),
        (false, false)
    );
    assert_eq!(sessions.sessions_for("a:443"), 1);
    for _ in 0..3 {
        assert_eq!(connect(&server, &client, &sessions, "a:443"), (true, true));
    }
    assert_eq!(
        sessions.sessions_for("a:443"),
        1,
        "a TLS 1.2 resumption stores nothing new"
    );
}

#[test]
fn the_client_cache_does_not_offer_a_session_to_another_key() {
    let cache = SessionCache::builder().build().unwrap();
    let server = server_ctx(Proto::Tls12, &cache, false);
    let sessions = ClientSessionCache::new(16, 2);
    let client = client(Proto::Tls12, &sessions);
    connect(&server, &client, &sessions, "a:443");
    assert_eq!(
        connect(&server, &client, &sessions, "b:443"),
        (false, false)
    );
    assert_eq!(sessions.sessions_for("b:443"), 1);
    assert_eq!(sessions.len(), 2);
}

#[test]
fn tls13_tickets_are_taken_once_and_bounded_per_key() {
    let cache = SessionCache::builder().build().unwrap();
    let server = server_ctx(Proto::Tls13, &cache, false);
    let sessions = ClientSessionCache::new(16, 3);
    let client = client(Proto::Tls13, &sessions);
    connect(&server, &client, &sessions, "k");
    assert_eq!(
        sessions.sessions_for("k"),
        2,
        "two tickets after a full handshake"
    );
    assert_eq!(connect(&server, &client, &sessions, "k"), (true, true));
    // One ticket used (taken), one new ticket from the resumption.
    assert_eq!(sessions.sessions_for("k"), 2);
    for _ in 0..3 {
        assert_eq!(connect(&server, &client, &sessions, "k"), (true, true));
    }
    // One slot per key: of the two tickets a full handshake brings, only the newest is kept.
    let one = ClientSessionCache::new(16, 1);
    let single = self::client(Proto::Tls13, &one);
    connect(&server, &single, &one, "fresh");
    assert_eq!(one.sessions_for("fresh"), 1, "per-key bound exceeded");
    assert_eq!(connect(&server, &single, &one, "fresh"), (true, true));
}

#[test]
fn expired_client_sessions_are_not_offered() {
    use openssl_session_cache::ManualClock;
    use std::sync::Arc;
    use std::time::Duration;
    let cache = SessionCache::builder().build().unwrap();
    let server = server_ctx(Proto::Tls12, &cache, false);
    let clock = Arc::new(ManualClock::starting_now());
    let sessions = ClientSessionCache::with_clock(16, 2, clock.clone());
    let client = client(Proto::Tls12, &sessions);
    connect(&server, &client, &sessions, "a");
    assert_eq!(sessions.sessions_for("a"), 1);
    // OpenSSL's default session lifetime is 7200 s.
    clock.advance(Duration::from_secs(7199));
    assert_eq!(connect(&server, &client, &sessions, "a"), (true, true));
    clock.advance(Duration::from_secs(2));
    assert_eq!(
        connect(&server, &client, &sessions, "a"),
        (false, false),
        "an expired session was offered"
    );
}

#[test]
fn keys_beyond_the_limit_are_dropped_least_recently_used_first() {
    let cache = SessionCache::builder().build().unwrap();
    let server = server_ctx(Proto::Tls12, &cache, false);
    let sessions = ClientSessionCache::new(2, 1);
    let client = client(Proto::Tls12, &sessions);
    connect(&server, &client, &sessions, "a");
    connect(&server, &client, &sessions, "b");
    assert_eq!(connect(&server, &client, &sessions, "a"), (true, true)); // a is fresher than b
    connect(&server, &client, &sessions, "c");
    assert_eq!(sessions.sessions_for("b"), 0);
    assert_eq!(sessions.sessions_for("a"), 1);
}
