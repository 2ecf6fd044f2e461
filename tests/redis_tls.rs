//! The Redis store over TLS: a `redis-server` started here with `--tls-port` (and `--port 0`, so
//! only TLS is served), a test CA and server certificates made here with rust-openssl.
#![cfg(feature = "redis")]

#[path = "support/redis_server.rs"]
mod redis_server;

use std::net::IpAddr;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use openssl_session_cache::envelope::envelope_key_id;
use openssl_session_cache::{
    Error, KeyRing, LookupDone, LookupMode, RedisStore, RedisStoreBuilder, SessionId, SessionStore,
    SessionStoreAdmin, StoreError, StoredSession,
};

use redis_server::{flush, wait_until, RedisServer, TestPki, PATIENCE};

fn id(i: u32) -> SessionId {
    SessionId::new(&[&i.to_be_bytes()[..], b"-tls"].concat()).unwrap()
}

fn sess(tag: u8) -> StoredSession {
    StoredSession::new(vec![tag; 200], SystemTime::now() + Duration::from_secs(600))
}

fn ring() -> KeyRing {
    KeyRing::new(1, [0x5a; 32])
}

fn loopback() -> IpAddr {
    [127, 0, 0, 1].into()
}

fn builder(server: &RedisServer, ca: &std::path::Path, tier: usize) -> RedisStoreBuilder {
    RedisStore::builder(server.url())
        .key_ring(ring())
        .ca_file(ca)
        .tier_entries(tier)
        .op_timeout(Duration::from_millis(500))
}

/// A connection of our own over TLS, trusting `ca`.
fn raw_tls(server: &RedisServer, ca: &std::path::Path) -> redis::Connection {
    let certs = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(std::fs::read(ca).unwrap()),
    };
    let client = redis::Client::build_with_tls(server.url(), certs).unwrap();
    client
        .get_connection_with_timeout(Duration::from_secs(5))
        .expect("a TLS connection with the right CA")
}

#[test]
fn sessions_are_written_and_read_over_tls() {
    let pki = TestPki::new();
    let server = RedisServer::start_tls(&pki.write_server("server", loopback()));
    assert!(server.url().starts_with("rediss://"));
    assert!(!server.ping(), "the server speaks no plain TCP on its port");
    let a = builder(&server, &pki.ca, 64).build().unwrap();
    let b = builder(&server, &pki.ca, 64).build().unwrap();
    a.check().expect("the right CA verifies the server");
    assert_eq!(
        a.stats().connects,
        1,
        "check() opened the shared connection"
    );
    for i in 0..20 {
        a.put(id(i), sess(i as u8)).unwrap();
    }
    flush(&a);
    // What Redis holds, read over our own TLS connection: sealed values under the store's keys.
    let mut raw = raw_tls(&server, &pki.ca);
    let value: Vec<u8> = redis::cmd("GET")
        .arg(a.key_for(&id(3)))
        .query(&mut raw)
        .unwrap();
    assert_eq!(envelope_key_id(&value), Some(1));
    assert!(!value.windows(16).any(|w| w == [3; 16]), "sealed at rest");
    // Host B reads them over its own TLS connection, by the blocking and the async call.
    assert_eq!(b.get(&id(3)).unwrap().unwrap().data()[0], 3);
    let (tx, rx) = mpsc::channel();
    b.lookup(
        id(4),
        LookupMode::Get,
        LookupDone::new(move |r| tx.send(r).unwrap()),
    );
    let r = rx.recv_timeout(PATIENCE).expect("completed");
    assert_eq!(r.unwrap().unwrap().data()[0], 4);
    // Single use across hosts, and tier invalidation over the TLS subscription.
    wait_until("B subscribed over TLS", || b.stats().subscribed);
    assert!(b.get(&id(5)).unwrap().is_some());
    assert!(b.get(&id(5)).unwrap().is_some());
    assert_eq!(b.stats().tier_hits, 1);
    let heard = b.stats().invalidations_received;
    assert!(a.take(&id(5)).unwrap().is_some());
    assert!(b.take(&id(5)).unwrap().is_none(), "taken once");
    wait_until("B heard of the take", || {
        b.stats().invalidations_received > heard
    });
    assert!(b.get(&id(5)).unwrap().is_none());
    // The admin walk runs over TLS too.
    assert_eq!(a.len().unwrap(), 19);
    for s in [&a, &b] {
        let st = s.stats();
        assert_eq!((st.redis_errors, st.admin_errors), (0, 0), "{st:?}");
    }
}

#[test]
fn a_wrong_ca_is_refused_with_a_clear_error() {
    let pki = TestPki::new();
    let server = RedisServer::start_tls(&pki.write_server("server", loopback()));
    let good = builder(&server, &pki.ca, 0).build().unwrap();
    good.put(id(1), sess(1)).unwrap();
    flush(&good);

    for wrong in [
        builder(&server, &pki.other_ca, 0),
        // No CA file: the system's roots, which do not hold the test CA either.
        RedisStore::builder(server.url())
            .key_ring(ring())
            .tier_entries(0)
            .op_timeout(Duration::from_millis(500)),
    ] {
        let s = wrong.breaker(3, Duration::from_secs(60)).build().unwrap();
        // Early: at start-up.
        let err = s.check().unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, Error::Store(StoreError::Unavailable(_))),
            "{err:?}"
        );
        assert!(
            msg.contains(&format!("cannot connect to {}", server.url()))
                && msg.contains("certificate")
                && msg.contains("UnknownIssuer"),
            "{msg}"
        );
        assert_eq!(s.stats().admin_errors, 1);
        // On use: each lookup a counted store error that names the cause, never a session.
        for i in 0..3 {
            match s.get(&id(1)) {
                Err(StoreError::Unavailable(m)) => assert!(m.contains("UnknownIssuer"), "{m}"),
                other => panic!("lookup {i}: {other:?}"),
            }
        }
        let st = s.stats();
        assert_eq!((st.redis_errors, st.connects), (3, 0), "{st:?}");
        assert!(
            st.breaker_open,
            "refused connections open the breaker: {st:?}"
        );
        // Writes never reach Redis through an unverified connection.
        s.put(id(2), sess(2)).unwrap();
        assert!(!s.flush(Duration::from_millis(300)));
    }
    assert!(good.get(&id(2)).unwrap().is_none(), "nothing was written");
    assert_eq!(good.get(&id(1)).unwrap().unwrap().data()[0], 1);
}

#[test]
fn a_certificate_for_another_address_is_refused() {
    let pki = TestPki::new();
    // Signed by the right CA, but for 127.0.0.2: the store connects to 127.0.0.1.
    let server = RedisServer::start_tls(&pki.write_server("elsewhere", [127, 0, 0, 2].into()));
    let s = builder(&server, &pki.ca, 0).build().unwrap();
    let msg = s.check().unwrap_err().to_string();
    assert!(
        msg.contains("certificate not valid for name \"127.0.0.1\""),
        "{msg}"
    );
    assert!(matches!(s.get(&id(1)), Err(StoreError::Unavailable(_))));
    assert_eq!(s.stats().redis_errors, 1);
}
