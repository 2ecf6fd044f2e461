//! A DTLS server on a remote (Redis) store never holds up a datagram on Redis: a handshake whose
//! session lookup is in flight is parked while the worker serves everyone else, and goes on when
//! the lookup completes or fails. A real `redis-server`, reached through a TCP proxy the test
//! pauses, a real `UdpServer`, openssl-crate clients over UDP.
#![cfg(feature = "redis")]

#[path = "support/delay_proxy.rs"]
mod delay_proxy;
#[path = "support/redis_server.rs"]
mod redis_server;
mod support;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use openssl::ssl::{ErrorCode, Ssl, SslSession, SslStream};
use openssl_session_cache::dsm::DsmConfig;
use openssl_session_cache::{
    EndpointStats, KeyRing, RedisStore, ServerConfig, SessionCache, UdpOptions, UdpServer,
};

use delay_proxy::DelayProxy;
use redis_server::RedisServer;
use support::server::{client_ctx, echo, echo_app, UdpIo};

struct Host {
    server: UdpServer,
    cache: SessionCache,
    store: Arc<RedisStore>,
}

fn host(redis_url: &str, ring: &KeyRing, op_timeout: Duration, lookup_timeout: Duration) -> Host {
    let store = Arc::new(
        RedisStore::builder(redis_url)
            .key_ring(ring.clone())
            .op_timeout(op_timeout)
            // A paused proxy also holds the invalidation subscription, and once its heartbeat
            // fails the tier stops serving (tests/redis.rs covers that): keep it out of these
            // tests' time, or a tier hit would wait on Redis whenever the machine is slow.
            .invalidation_heartbeat(Duration::from_secs(60))
            .build()
            .unwrap(),
    );
    let cache = SessionCache::builder()
        .store(store.clone())
        .build()
        .unwrap();
    let config = ServerConfig::builder(cache.clone())
        .dsm(DsmConfig::new(1024).with_max_handshakes(256))
        .lookup_timeout(lookup_timeout)
        .build()
        .unwrap();
    let mut options = UdpOptions::new("127.0.0.1:0".parse().unwrap());
    options.stats_interval = None;
    let server = UdpServer::spawn(config, options, || echo_app).unwrap();
    Host {
        server,
        cache,
        store,
    }
}

/// A DTLS client over its own UDP socket, offering `session`; bounded (10 s).
fn connect(server: SocketAddr, session: Option<&SslSession>) -> SslStream<UdpIo> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(server).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut ssl = Ssl::new(&client_ctx()).unwrap();
    ssl.set_mtu(1400).unwrap();
    ssl.set_connect_state();
    if let Some(s) = session {
        // SAFETY: the test client context keeps no internal session cache.
        #[allow(unsafe_code)]
        unsafe {
            ssl.set_session(s).unwrap()
        };
    }
    let mut stream = SslStream::new(ssl, UdpIo(sock)).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match stream.do_handshake() {
            Ok(()) => return stream,
            Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < end => {}
            Err(e) => panic!("dtls client handshake: {e}"),
        }
    }
}

/// A full handshake on `server`; returns the client's session after a clean close.
fn new_session(server: SocketAddr) -> SslSession {
    let mut c = connect(server, None);
    assert_eq!(echo(&mut c, b"hi"), b"hi");
    let s = c.ssl().session().unwrap().to_owned();
    let _ = c.shutdown();
    s
}

/// Waits (at most 10 s) for `cond` on the host's endpoint counters.
fn wait_stats(h: &Host, what: &str, cond: impl Fn(&EndpointStats) -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !cond(&h.server.stats()) {
        assert!(Instant::now() < end, "{what}: {:?}", h.server.stats());
        thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the host's write-behind queue wrote `n` operations to Redis.
fn wait_written(h: &Host, n: u64) {
    let end = Instant::now() + Duration::from_secs(10);
    while h.store.stats().writes_done < n {
        assert!(Instant::now() < end, "writes: {:?}", h.store.stats());
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_held_lookup_parks_one_peer_while_the_worker_serves_the_others() {
    let redis = RedisServer::start();
    let proxy = DelayProxy::start(([127, 0, 0, 1], redis.port()).into());
    let ring = KeyRing::generate().unwrap();
    // Host A reaches Redis through the proxy; host B directly (another host of the farm).
    // A's deadline is long enough that a slow machine cannot time the held lookup out
    // between its parking and the checks made while it waits.
    let a = host(
        &proxy.url(),
        &ring,
        Duration::from_secs(2),
        Duration::from_secs(5),
    );
    let b = host(
        &redis.url(),
        &ring,
        Duration::from_millis(600),
        Duration::from_secs(5),
    );
    let addr = a.server.local_addr();
    // A session A made itself (in A's tier) and two made on B (only in Redis).
    let own = new_session(addr);
    wait_written(&a, 1);
    let elsewhere = new_session(b.server.local_addr());
    let elsewhere2 = new_session(b.server.local_addr());
    wait_written(&b, 2);
    let mut established = connect(addr, None);
    assert_eq!(echo(&mut established, b"before"), b"before");

    // A's tier serves only while its invalidation subscription is up: wait for it, or a slow
    // machine pauses the proxy first and the tier hit below becomes a lookup held there.
    redis_server::wait_until("A subscribed to invalidations", || {
        a.store.stats().subscribed
    });
    // Redis unreachable for A: a resumption of B's session parks.
    proxy.pause();
    let parked = {
        let s = elsewhere.clone();
        thread::spawn(move || {
            let mut c = connect(addr, Some(&s));
            let reused = c.ssl().session_reused();
            assert_eq!(echo(&mut c, b"parked"), b"parked");
            let _ = c.shutdown();
            reused
        })
    };
    wait_stats(&a, "parked", |s| s.parked == 1);
    // Meanwhile the same worker serves an established peer and a tier-hit resumption.
    assert_eq!(echo(&mut established, b"during"), b"during");
    let mut tier_hit = connect(addr, Some(&own));
    assert!(
        tier_hit.ssl().session_reused(),
        "a tier hit waited for Redis"
    );
    let _ = tier_hit.shutdown();
    assert_eq!(
        a.server.stats().parked,
        1,
        "the parked peer is still waiting"
    );

    // Redis reachable again: the parked handshake completes, resumed.
    proxy.resume();
    assert!(parked.join().unwrap(), "the parked peer did not resume");
    // Worker counters are published every few milliseconds.
    wait_stats(&a, "resumed", |s| s.resumed == 2 && s.parked == 0);
    let s = a.server.stats();
    assert_eq!(
        (
            s.lookups_parked,
            s.lookups_completed,
            s.lookups_timed_out,
            s.parked
        ),
        (1, 1, 0, 0),
        "{s:?}"
    );
    let c = a.cache.stats();
    assert_eq!(
        (c.lookups, c.suspended, c.hits, c.misses),
        (2, 1, 2, 0),
        "{c:?}"
    );

    // Held past the store's deadline (2 s): the lookup fails, a full handshake follows.
    proxy.pause();
    let mut late = connect(addr, Some(&elsewhere2));
    assert!(!late.ssl().session_reused());
    assert_eq!(echo(&mut late, b"full"), b"full");
    proxy.resume();
    wait_stats(&a, "completed", |s| s.lookups_completed == 2);
    let s = a.server.stats();
    assert_eq!((s.lookups_parked, s.lookups_completed), (2, 2), "{s:?}");
    let c = a.cache.stats();
    assert_eq!(
        (c.lookups, c.suspended, c.hits, c.misses),
        (3, 2, 2, 1),
        "{c:?}"
    );
    assert_eq!(c.store_errors, 1, "{c:?}");
    assert_eq!(echo(&mut established, b"after"), b"after");
}

#[test]
fn past_the_endpoint_bound_a_parked_peer_goes_on_with_a_full_handshake() {
    let redis = RedisServer::start();
    let proxy = DelayProxy::start(([127, 0, 0, 1], redis.port()).into());
    let ring = KeyRing::generate().unwrap();
    // The store would wait 30 s; the endpoint gives up after 300 ms.
    let a = host(
        &proxy.url(),
        &ring,
        Duration::from_secs(30),
        Duration::from_millis(300),
    );
    let b = host(
        &redis.url(),
        &ring,
        Duration::from_secs(30),
        Duration::from_millis(300),
    );
    let elsewhere = new_session(b.server.local_addr());
    wait_written(&b, 1);
    proxy.pause();
    let mut c = connect(a.server.local_addr(), Some(&elsewhere));
    assert!(!c.ssl().session_reused());
    assert_eq!(echo(&mut c, b"full"), b"full");
    wait_stats(&a, "timed out", |s| s.lookups_timed_out == 1);
    let s = a.server.stats();
    assert_eq!(
        (s.lookups_parked, s.lookups_timed_out, s.parked),
        (1, 1, 0),
        "{s:?}"
    );
    assert_eq!(a.cache.stats().abandoned, 1);
    proxy.resume();
}

/// Redis hung through 200 handshakes, half of them offering a session: every lookup fails
/// (counted, a miss), every handshake completes in full, none fails, and the established peer
/// is answered throughout.
#[test]
fn redis_hung_during_200_handshakes_fails_every_lookup_and_no_handshake() {
    let mut redis = RedisServer::start();
    let ring = KeyRing::generate().unwrap();
    let a = host(
        &redis.url(),
        &ring,
        Duration::from_millis(200),
        Duration::from_secs(5),
    );
    let b = host(
        &redis.url(),
        &ring,
        Duration::from_millis(200),
        Duration::from_secs(5),
    );
    let addr = a.server.local_addr();
    // Sessions made on B, to be offered to A while Redis is hung.
    let sessions: Vec<SslSession> = (0..20)
        .map(|_| new_session(b.server.local_addr()))
        .collect();
    wait_written(&b, 20);
    let mut established = connect(addr, None);
    redis.pause();
    let workers: Vec<_> = (0..8)
        .map(|t| {
            let sessions = sessions.clone();
            thread::spawn(move || {
                let mut resumed = 0;
                for i in 0..25 {
                    // Half offer a session (a lookup that times out), half are new clients.
                    let offer = (i % 2 == 0).then(|| &sessions[(t * 25 + i) % sessions.len()]);
                    let mut c = connect(addr, offer);
                    resumed += usize::from(c.ssl().session_reused());
                    assert_eq!(echo(&mut c, b"x"), b"x");
                    let _ = c.shutdown();
                }
                resumed
            })
        })
        .collect();
    // The established peer is answered throughout.
    for i in 0..20 {
        let msg = format!("ping {i}");
        assert_eq!(echo(&mut established, msg.as_bytes()), msg.as_bytes());
        thread::sleep(Duration::from_millis(10));
    }
    let resumed: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    redis.resume();
    assert_eq!(resumed, 0, "nothing resumes with Redis hung");
    wait_stats(&a, "handshakes", |s| s.handshakes == 201);
    let s = a.server.stats();
    assert_eq!(s.handshakes, 201, "{s:?}");
    assert_eq!(s.failed, 0, "{s:?}");
    // Every offered session was parked once and went on when its lookup failed (or the breaker
    // answered at once: then no park).
    assert!(s.lookups_parked >= 1 && s.lookups_parked <= 100, "{s:?}");
    assert_eq!(s.lookups_completed, s.lookups_parked, "{s:?}");
    let c = a.cache.stats();
    // One lookup per offered session (a client that retransmits its ClientHello after a lost
    // flight gets a second connection state, and a second lookup).
    assert!(c.lookups >= 100 && c.hits == 0, "{c:?}");
    assert_eq!(
        c.store_errors, c.lookups,
        "every failed lookup counted: {c:?}"
    );
    assert_eq!(c.misses, c.lookups, "{c:?}");
}

/// While Redis is hung, handshakes whose lookups wait on it hold up no other datagram: with
/// eight of them parked at once (their deadline a minute away, so none can end), the same
/// worker answers an established peer and completes ten new handshakes, and all eight are still
/// parked; once Redis answers, the eight resume. Shown by counters, not by timing.
#[test]
fn lookups_parked_on_a_hung_redis_hold_up_no_other_peer() {
    const PARKED: usize = 8;
    let mut redis = RedisServer::start();
    let ring = KeyRing::generate().unwrap();
    let a = host(
        &redis.url(),
        &ring,
        Duration::from_secs(60),
        Duration::from_secs(60),
    );
    let b = host(
        &redis.url(),
        &ring,
        Duration::from_millis(600),
        Duration::from_secs(5),
    );
    let addr = a.server.local_addr();
    let sessions: Vec<SslSession> = (0..PARKED)
        .map(|_| new_session(b.server.local_addr()))
        .collect();
    wait_written(&b, PARKED as u64);
    let mut established = connect(addr, None);
    assert_eq!(echo(&mut established, b"before"), b"before");
    wait_stats(&a, "the first handshake", |s| s.handshakes == 1);
    redis.pause();
    let parked: Vec<_> = sessions
        .into_iter()
        .map(|s| {
            thread::spawn(move || {
                let mut c = connect(addr, Some(&s));
                let reused = c.ssl().session_reused();
                assert_eq!(echo(&mut c, b"parked"), b"parked");
                let _ = c.shutdown();
                reused
            })
        })
        .collect();
    wait_stats(&a, "all parked", |s| s.parked == PARKED as u64);
    for i in 0..10 {
        let msg = format!("while parked {i}");
        assert_eq!(echo(&mut established, msg.as_bytes()), msg.as_bytes());
        let mut fresh = connect(addr, None);
        assert!(!fresh.ssl().session_reused());
        assert_eq!(echo(&mut fresh, b"fresh"), b"fresh");
        let _ = fresh.shutdown();
    }
    wait_stats(&a, "the fresh handshakes", |s| s.handshakes == 11);
    let s = a.server.stats();
    assert_eq!(
        (s.parked, s.lookups_completed, s.lookups_timed_out),
        (PARKED as u64, 0, 0),
        "the parked lookups are all still waiting on Redis: {s:?}"
    );
    redis.resume();
    for (n, p) in parked.into_iter().enumerate() {
        assert!(p.join().unwrap(), "parked peer {n} did not resume");
    }
    wait_stats(&a, "resumed", |s| {
        s.resumed == PARKED as u64 && s.parked == 0
    });
    let s = a.server.stats();
    assert_eq!(s.lookups_completed, s.lookups_parked, "{s:?}");
    assert_eq!((s.lookups_timed_out, s.failed), (0, 0), "{s:?}");
}

#[test]
fn a_session_larger_than_the_memory_tier_still_goes_to_redis() {
    use openssl_session_cache::{MemoryStore, SessionId, SessionStore, StoredSession};
    let redis = RedisServer::start();
    let store = RedisStore::builder(redis.url())
        .key_ring(KeyRing::generate().unwrap())
        .tier(MemoryStore::builder().max_bytes(16).build().unwrap())
        .build()
        .unwrap();
    let id = SessionId::new(&[3; 32]).unwrap();
    let expires = std::time::SystemTime::now() + Duration::from_secs(60);
    store
        .put(id, StoredSession::new(vec![1; 200], expires))
        .unwrap();
    assert!(store.flush(Duration::from_secs(5)));
    let got = store.get(&id).unwrap().expect("the session reached Redis");
    assert_eq!(got.data(), &[1; 200][..]);
}
