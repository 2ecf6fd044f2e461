//! The Redis store against a real `redis-server` (started by each test on a free loopback port).
#![cfg(feature = "redis")]

#[path = "support/redis_server.rs"]
mod redis_server;
mod support;

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use openssl_session_cache::envelope::envelope_key_id;
use openssl_session_cache::{
    KeyRing, MemoryStore, RedisStore, SessionCache, SessionId, SessionStore, SessionStoreAdmin,
    StoreError, StoredSession,
};
use redis::Commands;

use redis_server::RedisServer;
use support::{client_ctx, connect, server_ctx, Ctx, Proto, ServerClose};

const CMD_TIMEOUT: Duration = Duration::from_millis(50);

fn id(i: u32) -> SessionId {
    SessionId::new(&[&i.to_be_bytes()[..], b"-session"].concat()).unwrap()
}

fn sess(tag: u8, ttl: Duration) -> StoredSession {
    StoredSession::new(vec![tag; 200], SystemTime::now() + ttl)
}

fn ring() -> KeyRing {
    KeyRing::new(1, [0x5a; 32])
}

fn store(server: &RedisServer, ring: KeyRing, tier: usize) -> RedisStore {
    RedisStore::builder(server.url())
        .key_ring(ring)
        .tier_entries(tier)
        .connect_timeout(CMD_TIMEOUT)
        .command_timeout(CMD_TIMEOUT)
        .build()
        .unwrap()
}

fn raw_get(server: &RedisServer, key: &str) -> Option<Vec<u8>> {
    server.raw().get(key).unwrap()
}

#[test]
fn round_trips_without_and_with_tier() {
    let server = RedisServer::start();
    for tier in [0, 64] {
        let s = store(&server, ring(), tier);
        s.clear().unwrap();
        let hour = Duration::from_secs(3600);
        for i in 0..20 {
            s.put(id(i), sess(i as u8, hour)).unwrap();
        }
        assert_eq!(s.len().unwrap(), 20);
        assert_eq!(s.bytes().unwrap(), 20 * 200);
        let got = s.get(&id(3)).unwrap().unwrap();
        assert_eq!(got.data(), &[3u8; 200][..]);
        let want = sess(3, hour);
        assert!(got.expires_at_millis().abs_diff(want.expires_at_millis()) < 1_000);
        let mut seen = HashSet::new();
        s.for_each(&mut |i, v| {
            assert_eq!(v.len(), 200);
            seen.insert(*i);
        })
        .unwrap();
        assert_eq!(seen, (0..20).map(id).collect());
        assert_eq!(s.take(&id(4)).unwrap().unwrap().data(), &[4u8; 200][..]);
        assert!(s.take(&id(4)).unwrap().is_none());
        assert!(s.get(&id(4)).unwrap().is_none());
        assert!(s.remove(&id(5)).unwrap());
        assert!(!s.remove(&id(5)).unwrap());
        assert!(s.get(&id(5)).unwrap().is_none());
        assert_eq!(s.len().unwrap(), 18);
        // Replacing keeps one entry.
        s.put(id(6), sess(0xee, hour)).unwrap();
        assert_eq!(s.get(&id(6)).unwrap().unwrap().data()[0], 0xee);
        assert_eq!(s.len().unwrap(), 18);
        s.clear().unwrap();
        assert_eq!(s.len().unwrap(), 0);
        assert!(s.get(&id(1)).unwrap().is_none());
        assert_eq!(s.stats().redis_errors, 0);
    }
}

#[test]
fn values_at_rest_are_sealed_and_ttl_matches_the_session() {
    let server = RedisServer::start();
    let s = store(&server, ring(), 0);
    let lifetime = Duration::from_secs(30);
    s.put(id(1), sess(0x42, lifetime)).unwrap();
    let key = s.key_for(&id(1));
    assert!(key.starts_with("ossl:sess:"));
    let value = raw_get(&server, &key).unwrap();
    assert_eq!(envelope_key_id(&value), Some(1));
    assert!(
        !value.windows(16).any(|w| w == [0x42; 16]),
        "session bytes must not be in Redis in the clear"
    );
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query(&mut server.raw())
        .unwrap();
    assert!(
        (28_000..=30_000).contains(&pttl),
        "PTTL {pttl} ms, session lifetime 30 000 ms"
    );
    // An already-expired session is not written (and deletes what was there).
    s.put(
        id(1),
        StoredSession::new(vec![1], SystemTime::now() - Duration::from_secs(1)),
    )
    .unwrap();
    assert!(raw_get(&server, &key).is_none());
    // Redis expires the key itself.
    s.put(id(2), sess(1, Duration::from_millis(150))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while raw_get(&server, &s.key_for(&id(2))).is_some() {
        assert!(Instant::now() < deadline, "redis did not expire the key");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn take_on_two_threads_and_two_hosts_exactly_one_wins() {
    let server = RedisServer::start();
    let a = Arc::new(store(&server, ring(), 256));
    let b = Arc::new(store(&server, ring(), 256));
    const N: u32 = 300;
    for i in 0..N {
        a.put(id(i), sess(1, Duration::from_secs(60))).unwrap();
    }
    // Host B also has every session in its tier (it looked them up).
    for i in 0..N {
        assert!(b.get(&id(i)).unwrap().is_some());
    }
    // Same store on two threads for the first half, the two hosts for the second half.
    let barrier = Arc::new(Barrier::new(2));
    let run = |stores: [Arc<RedisStore>; 2], range: std::ops::Range<u32>| {
        let handles: Vec<_> = stores
            .into_iter()
            .map(|s| {
                let barrier = barrier.clone();
                let range = range.clone();
                thread::spawn(move || {
                    barrier.wait();
                    range
                        .filter(|i| s.take(&id(*i)).unwrap().is_some())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let wins: Vec<Vec<u32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let mut all: Vec<u32> = wins.concat();
        all.sort_unstable();
        assert_eq!(all, range.collect::<Vec<_>>(), "each id taken exactly once");
    };
    run([a.clone(), a.clone()], 0..N / 2);
    run([a.clone(), b.clone()], N / 2..N);
    // B's tier still held copies, but a take never hands out what Redis says is gone.
    for i in 0..N {
        assert!(b.take(&id(i)).unwrap().is_none());
    }
}

#[test]
fn two_hosts_share_sessions() {
    let server = RedisServer::start();
    let a = store(&server, ring(), 64);
    let b = store(&server, ring(), 64);
    a.put(id(1), sess(7, Duration::from_secs(60))).unwrap();
    assert_eq!(b.get(&id(1)).unwrap().unwrap().data()[0], 7);
    assert_eq!(b.stats().tier_hits, 0);
    assert!(b.get(&id(1)).unwrap().is_some());
    assert_eq!(
        b.stats().tier_hits,
        1,
        "the second lookup is answered by B's tier"
    );
    // Take once across hosts: A's tier has it, but B took it first.
    a.put(id(2), sess(8, Duration::from_secs(60))).unwrap();
    assert!(b.take(&id(2)).unwrap().is_some());
    assert!(a.take(&id(2)).unwrap().is_none());
    assert!(
        a.get(&id(2)).unwrap().is_none(),
        "the failed take dropped A's tier copy"
    );
    // remove on one host is seen by the other's Redis lookups.
    a.put(id(3), sess(9, Duration::from_secs(60))).unwrap();
    assert!(b.remove(&id(3)).unwrap());
    assert!(store(&server, ring(), 0).get(&id(3)).unwrap().is_none());
}

#[test]
fn tampered_moved_and_wrong_key_values_are_counted_misses() {
    let server = RedisServer::start();
    let s = store(&server, ring(), 0);
    let mut raw = server.raw();
    let hour = Duration::from_secs(3600);

    // Tampered ciphertext.
    s.put(id(1), sess(1, hour)).unwrap();
    let key1 = s.key_for(&id(1));
    let mut v = raw_get(&server, &key1).unwrap();
    let mid = v.len() / 2;
    v[mid] ^= 0x80;
    let _: () = raw.set(&key1, &v).unwrap();
    assert!(matches!(s.get(&id(1)), Err(StoreError::Corrupt(_))));
    assert_eq!(s.stats().decrypt_failures, 1);
    assert!(
        raw_get(&server, &key1).is_none(),
        "the bad value is deleted"
    );

    // A valid value copied under another id.
    s.put(id(2), sess(2, hour)).unwrap();
    let v2 = raw_get(&server, &s.key_for(&id(2))).unwrap();
    let _: () = raw.set(s.key_for(&id(3)), &v2).unwrap();
    assert!(matches!(s.get(&id(3)), Err(StoreError::Corrupt(_))));
    assert!(matches!(
        s.take(&id(3)),
        Ok(None) | Err(StoreError::Corrupt(_))
    ));
    assert_eq!(
        s.get(&id(2)).unwrap().unwrap().data()[0],
        2,
        "the original still opens"
    );
    assert!(s.stats().decrypt_failures >= 2);

    // The wrong key, same key id: fails to open.
    let wrong = store(&server, KeyRing::new(1, [0x11; 32]), 0);
    assert!(matches!(wrong.get(&id(2)), Err(StoreError::Corrupt(_))));
    assert_eq!(wrong.stats().decrypt_failures, 1);
    // A value that fails authentication under a key the host holds is deleted (it cannot tell
    // tampering from a wrong key with the same id).
    assert!(s.get(&id(2)).unwrap().is_none());
    // A key id this host does not hold (another host ahead in a rotation): a miss, counted, and
    // the value is left for the hosts that can open it.
    s.put(id(4), sess(4, hour)).unwrap();
    let other = store(&server, KeyRing::new(9, [0x5a; 32]), 0);
    assert!(matches!(other.get(&id(4)), Err(StoreError::Corrupt(_))));
    assert_eq!(other.stats().decrypt_failures, 1);
    assert_eq!(s.get(&id(4)).unwrap().unwrap().data()[0], 4);

    // Garbage and plaintext values: misses, never panics.
    for junk in [
        &b""[..],
        b"\x00\x00\x00\x00\x00\x00\x00\x00\x09abc",
        &[1u8; 40][..],
    ] {
        let _: () = raw.set(s.key_for(&id(5)), junk).unwrap();
        assert!(matches!(s.get(&id(5)), Err(StoreError::Corrupt(_))));
    }
    // for_each skips what does not open and counts it.
    let _: () = raw.set(s.key_for(&id(6)), &v2).unwrap();
    let before = s.stats().decrypt_failures;
    let mut n = 0;
    s.for_each(&mut |_, _| n += 1).unwrap();
    assert_eq!(n, 1, "only id 4 opens");
    // Id 6 (moved) and id 5 (its last junk names key id 0x01010101, so it was left in place).
    assert_eq!(s.stats().decrypt_failures, before + 2);
}

#[test]
fn key_rotation_keeps_old_sessions_and_seals_with_the_new_key() {
    let server = RedisServer::start();
    let old = store(&server, ring(), 0);
    old.put(id(1), sess(1, Duration::from_secs(60))).unwrap();
    let rotated = store(&server, ring().rotate(2, [0x77; 32]).unwrap(), 0);
    assert_eq!(rotated.get(&id(1)).unwrap().unwrap().data()[0], 1);
    rotated
        .put(id(2), sess(2, Duration::from_secs(60)))
        .unwrap();
    let v = raw_get(&server, &rotated.key_for(&id(2))).unwrap();
    assert_eq!(envelope_key_id(&v), Some(2));
    // A host still on the old ring misses the new session, but does not delete it.
    assert!(old.get(&id(2)).is_err());
    assert!(rotated.get(&id(2)).unwrap().is_some());
    assert_eq!(rotated.stats().decrypt_failures, 0);
}

#[test]
fn plaintext_store_works_when_opted_into() {
    let server = RedisServer::start();
    let s = RedisStore::builder(server.url())
        .plaintext_i_understand_the_risk()
        .prefix("plain:")
        .build()
        .unwrap();
    s.put(id(1), sess(0x42, Duration::from_secs(60))).unwrap();
    let v = raw_get(&server, "plain:00000001").is_none();
    assert!(v, "keys are prefix + hex id");
    let v = raw_get(&server, &s.key_for(&id(1))).unwrap();
    assert_eq!(v[0], 0);
    assert!(s.take(&id(1)).unwrap().is_some());
    // An encrypted store under the same prefix refuses plaintext values.
    s.put(id(2), sess(0x42, Duration::from_secs(60))).unwrap();
    let sealed = RedisStore::builder(server.url())
        .key_ring(ring())
        .prefix("plain:")
        .tier_entries(0)
        .build()
        .unwrap();
    assert!(sealed.get(&id(2)).is_err());
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

fn assert_fast(d: Duration, what: &str) {
    assert!(
        d < CMD_TIMEOUT * 4,
        "{what} took {d:?}, over 4x the {CMD_TIMEOUT:?} timeout"
    );
}

/// Drives the store through an outage: `down` takes Redis away, `up` brings it back.
fn outage(server: &mut RedisServer, down: fn(&mut RedisServer), up: fn(&mut RedisServer)) {
    let backoff = Duration::from_millis(300);
    let s = RedisStore::builder(server.url())
        .key_ring(ring())
        .tier_entries(0)
        .connect_timeout(CMD_TIMEOUT)
        .command_timeout(CMD_TIMEOUT)
        .pool_size(4)
        .breaker(3, backoff)
        .build()
        .unwrap();
    for i in 0..4 {
        s.put(id(i), sess(1, Duration::from_secs(60))).unwrap();
        assert!(s.get(&id(i)).unwrap().is_some());
    }
    down(server);
    // The first failures reach Redis, each bounded by the timeouts.
    for i in 0..3 {
        let (r, d) = timed(|| s.get(&id(i)));
        assert!(r.is_err(), "op {i}: {r:?}");
        assert_fast(d, "a failing lookup");
    }
    let st = s.stats();
    assert_eq!(st.redis_errors, 3);
    assert!(st.breaker_open);
    assert_eq!(st.breaker_opens, 1);
    // Then the breaker answers at once.
    for i in 0..50 {
        let (r, d) = timed(|| s.put(id(i), sess(2, Duration::from_secs(60))));
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        assert!(d < Duration::from_millis(25), "a skipped op took {d:?}");
    }
    assert_eq!(s.stats().breaker_open_skips, 50);
    assert_eq!(s.stats().redis_errors, 3);
    up(server);
    thread::sleep(backoff + Duration::from_millis(50));
    // The probe goes through on a fresh connection and closes the breaker.
    let (r, d) = timed(|| s.put(id(9), sess(9, Duration::from_secs(60))));
    r.unwrap();
    assert_fast(d, "the probe");
    assert!(!s.stats().breaker_open);
    assert_eq!(s.get(&id(9)).unwrap().unwrap().data()[0], 9);
    // Timings of everything after recovery are normal again.
    for i in 10..20 {
        s.put(id(i), sess(1, Duration::from_secs(60))).unwrap();
    }
}

#[test]
fn redis_killed_fails_fast_opens_the_breaker_and_recovers_after_restart() {
    let mut server = RedisServer::start();
    outage(&mut server, RedisServer::kill, |s| {
        let port = s.port();
        *s = RedisServer::start_on(port);
    });
    assert!(server.ping());
}

#[test]
fn redis_hung_times_out_opens_the_breaker_and_recovers() {
    let mut server = RedisServer::start();
    outage(&mut server, RedisServer::pause, RedisServer::resume);
}

#[test]
fn a_quick_redis_restart_costs_no_failed_operation() {
    let mut server = RedisServer::start();
    let s = store(&server, ring(), 0);
    for i in 0..4 {
        s.put(id(i), sess(1, Duration::from_secs(60))).unwrap();
    }
    server.restart(); // no persistence: the sessions are gone, the idle connections dead
    assert!(
        s.get(&id(0)).unwrap().is_none(),
        "a dead idle connection is replaced, not an error"
    );
    s.put(id(5), sess(5, Duration::from_secs(60))).unwrap();
    assert!(s.get(&id(5)).unwrap().is_some());
    assert_eq!(s.stats().redis_errors, 0);
}

#[test]
fn tier_serves_hot_sessions_while_redis_is_down() {
    let mut server = RedisServer::start();
    let tier = MemoryStore::builder().max_entries(8).build().unwrap();
    let s = RedisStore::builder(server.url())
        .key_ring(ring())
        .tier(tier)
        .breaker(1, Duration::from_secs(60))
        .build()
        .unwrap();
    s.put(id(1), sess(1, Duration::from_secs(60))).unwrap();
    server.kill();
    assert!(
        s.get(&id(1)).unwrap().is_some(),
        "a tier hit needs no round trip"
    );
    assert_eq!(s.stats().tier_hits, 1);
    assert_eq!(s.stats().redis_errors, 0);
    // A take cannot be proven single-use across hosts without Redis: it fails.
    assert!(s.take(&id(1)).is_err());
    assert!(s.get(&id(1)).is_err(), "and the tier copy is gone");
}

/// One "host": a context whose cache sits on its own RedisStore, and that store.
struct Host {
    ctx: Ctx,
    cache: SessionCache,
    store: Arc<RedisStore>,
}

fn host(server: &RedisServer, proto: Proto, single_use: bool, backoff: Duration) -> Host {
    host_with(server, proto, single_use, backoff, ring())
}

fn host_with(
    server: &RedisServer,
    proto: Proto,
    single_use: bool,
    backoff: Duration,
    ring: KeyRing,
) -> Host {
    let store = Arc::new(
        RedisStore::builder(server.url())
            .key_ring(ring)
            .connect_timeout(CMD_TIMEOUT)
            .command_timeout(CMD_TIMEOUT)
            .breaker(3, backoff)
            .build()
            .unwrap(),
    );
    let cache = SessionCache::builder()
        .store(store.clone())
        .single_use(single_use)
        .build()
        .unwrap();
    let ctx = server_ctx(proto, &cache, false);
    Host { ctx, cache, store }
}

#[test]
fn a_session_made_on_one_host_resumes_on_the_other() {
    let server = RedisServer::start();
    for proto in [Proto::Tls12, Proto::Dtls12] {
        let a = host(&server, proto, false, Duration::from_secs(1));
        let b = host(&server, proto, false, Duration::from_secs(1));
        let client = client_ctx(proto, false);
        let first = connect(&a.ctx, &client, None, ServerClose::Clean);
        assert!(!first.server_reused);
        assert_eq!(a.cache.stats().inserts, 1);
        let second = connect(&b.ctx, &client, first.session.as_ref(), ServerClose::Clean);
        assert!(
            second.server_reused && second.client_reused,
            "{proto:?}: B did not resume A's session"
        );
        let st = b.cache.stats();
        assert_eq!((st.hits, st.misses, st.store_errors), (1, 0, 0), "{st:?}");
        assert_eq!(b.store.stats().tier_hits, 0, "B read it from Redis");
    }
}

#[test]
fn sessions_resume_across_a_key_rotation_and_not_under_a_wrong_key() {
    let server = RedisServer::start();
    let second = Duration::from_secs(1);
    let old = host(&server, Proto::Tls12, false, second);
    let rotated_ring = ring().rotate(2, [0x77; 32]).unwrap();
    let rotated = host_with(&server, Proto::Tls12, false, second, rotated_ring);
    let wrong = host_with(
        &server,
        Proto::Tls12,
        false,
        second,
        KeyRing::new(1, [0x11; 32]),
    );
    let client = client_ctx(Proto::Tls12, false);
    // Written under key 1, resumed by a host whose active key is 2.
    let made = connect(&old.ctx, &client, None, ServerClose::Clean);
    let resumed = connect(
        &rotated.ctx,
        &client,
        made.session.as_ref(),
        ServerClose::Clean,
    );
    assert!(
        resumed.server_reused,
        "the old key still opens sessions after a rotation"
    );
    // New sessions are sealed with key 2.
    let fresh = connect(&rotated.ctx, &client, None, ServerClose::Clean);
    let id = SessionId::new(fresh.session.as_ref().unwrap().id()).unwrap();
    let v = raw_get(&server, &rotated.store.key_for(&id)).unwrap();
    assert_eq!(envelope_key_id(&v), Some(2));
    // A host with the wrong key (same id 1) misses, counts it, and the handshake goes on.
    let other = connect(&old.ctx, &client, None, ServerClose::Clean);
    let out = connect(
        &wrong.ctx,
        &client,
        other.session.as_ref(),
        ServerClose::Clean,
    );
    assert!(!out.server_reused);
    assert_eq!(wrong.store.stats().decrypt_failures, 1);
    assert_eq!(wrong.cache.stats().store_errors, 1);
}

#[test]
fn tls13_single_use_session_resumes_once_across_two_hosts() {
    let server = RedisServer::start();
    let a = host(&server, Proto::Tls13, true, Duration::from_secs(1));
    let b = host(&server, Proto::Tls13, true, Duration::from_secs(1));
    let client = client_ctx(Proto::Tls13, false);
    let first = connect(&a.ctx, &client, None, ServerClose::Clean);
    let ticket = first.session.expect("a TLS 1.3 ticket");
    let on_b = connect(&b.ctx, &client, Some(&ticket), ServerClose::Clean);
    assert!(on_b.server_reused, "the ticket resumes once, on B");
    let again_a = connect(&a.ctx, &client, Some(&ticket), ServerClose::Clean);
    assert!(
        !again_a.server_reused,
        "and never again, not even on A which issued it"
    );
    let again_b = connect(&b.ctx, &client, Some(&ticket), ServerClose::Clean);
    assert!(!again_b.server_reused);
    assert_eq!(a.cache.stats().hits + b.cache.stats().hits, 1);
}

#[test]
fn handshakes_go_on_as_full_ones_while_redis_is_down_and_resume_after() {
    let mut server = RedisServer::start();
    let backoff = Duration::from_millis(300);
    let a = host(&server, Proto::Tls12, false, backoff);
    let b = host(&server, Proto::Tls12, false, backoff);
    let client = client_ctx(Proto::Tls12, false);
    let before = connect(&a.ctx, &client, None, ServerClose::Clean);

    server.kill();
    for i in 0..10 {
        // A session from before the outage, offered to B (not in B's tiers): a full handshake.
        let (out, d) =
            timed(|| connect(&b.ctx, &client, before.session.as_ref(), ServerClose::Clean));
        assert!(!out.server_reused, "handshake {i} resumed without Redis");
        assert!(d < Duration::from_millis(500), "handshake {i} took {d:?}");
    }
    let st = b.cache.stats();
    assert!(
        st.store_errors >= 10,
        "lookups and inserts failed and were counted: {st:?}"
    );
    assert_eq!(st.hits, 0);
    let rs = b.store.stats();
    assert_eq!(
        rs.redis_errors, 3,
        "only the breaker's first failures reached the network: {rs:?}"
    );
    assert!(rs.breaker_open_skips > 10, "{rs:?}");

    let port = server.port();
    server = RedisServer::start_on(port);
    thread::sleep(backoff + Duration::from_millis(50));
    // Resumption across hosts works again (the first request probes and closes the breaker).
    let fresh = connect(&a.ctx, &client, None, ServerClose::Clean);
    let resumed = connect(&b.ctx, &client, fresh.session.as_ref(), ServerClose::Clean);
    assert!(
        resumed.server_reused,
        "resumption did not come back with Redis"
    );
    assert!(!b.store.stats().breaker_open);
    drop(server);
}

/// Handshake figures for BENCHMARKS-redis.md (not a test of behaviour):
/// `cargo test --release --features redis --test redis -- --ignored --nocapture handshake_latency`
#[test]
#[ignore = "a measurement; run by hand"]
fn handshake_latency() {
    const N: usize = 300;
    let mut server = RedisServer::start();
    let client = client_ctx(Proto::Tls12, false);
    let report = |name: &str, mut samples: Vec<Duration>| {
        samples.sort_unstable();
        let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
        println!(
            "{name:<52} mean {mean:>9.1?}  p50 {:>9.1?}  p99 {:>9.1?}",
            samples[samples.len() / 2],
            samples[samples.len() * 99 / 100]
        );
    };
    // Sessions made on `a`, then resumed on `b` (each session once).
    let resume = |a: &Ctx, b: &Ctx, expect_reuse: bool| {
        let sessions: Vec<_> = (0..N)
            .map(|_| {
                connect(a, &client, None, ServerClose::Clean)
                    .session
                    .unwrap()
            })
            .collect();
        sessions
            .iter()
            .map(|s| {
                let (out, d) = timed(|| connect(b, &client, Some(s), ServerClose::Clean));
                assert_eq!(out.server_reused, expect_reuse);
                d
            })
            .collect::<Vec<_>>()
    };
    let full = |a: &Ctx| {
        (0..N)
            .map(|_| timed(|| connect(a, &client, None, ServerClose::Clean)).1)
            .collect::<Vec<_>>()
    };

    let mem_cache = SessionCache::builder().build().unwrap();
    let mem = server_ctx(Proto::Tls12, &mem_cache, false);
    report("memory store: full handshake", full(&mem));
    report("memory store: resumed", resume(&mem, &mem, true));

    let a = host(&server, Proto::Tls12, false, Duration::from_secs(60));
    let b = host(&server, Proto::Tls12, false, Duration::from_secs(60));
    report(
        "redis store: resumed on the same host (tier hit)",
        resume(&a.ctx, &a.ctx, true),
    );
    report(
        "redis store: resumed on another host (tier miss)",
        resume(&a.ctx, &b.ctx, true),
    );
    report("redis store: full handshake (put to redis)", full(&a.ctx));
    let sessions: Vec<_> = (0..N)
        .map(|_| {
            connect(&a.ctx, &client, None, ServerClose::Clean)
                .session
                .unwrap()
        })
        .collect();
    server.kill();
    let down: Vec<_> = sessions
        .iter()
        .map(|s| timed(|| connect(&b.ctx, &client, Some(s), ServerClose::Clean)).1)
        .collect();
    report("redis down: resumption offered, full handshake", down);
    report("redis down: new client, full handshake", full(&b.ctx));
    println!("host b store stats: {:?}", b.store.stats());
    println!("host b cache stats: {:?}", b.cache.stats());
}
