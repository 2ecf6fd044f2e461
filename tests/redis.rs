//! The Redis store against a real `redis-server` (started by each test on a free loopback port),
//! some through a delay/pause TCP proxy the tests start themselves.
#![cfg(feature = "redis")]

#[path = "support/delay_proxy.rs"]
mod delay_proxy;
#[path = "support/redis_server.rs"]
mod redis_server;
mod support;

use std::collections::HashSet;
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use openssl_session_cache::envelope::envelope_key_id;
use openssl_session_cache::{
    KeyRing, LookupDone, LookupMode, MemoryStore, RedisStore, RedisStoreBuilder, SessionCache,
    SessionId, SessionStore, SessionStoreAdmin, StoreError, StoredSession,
};
use redis::Commands;

use delay_proxy::DelayProxy;
use redis_server::{flush, lookups, lookups_in, wait_until, LookupResult, RedisServer, PATIENCE};
use support::{client_ctx, connect, server_ctx, Ctx, Proto, ServerClose};

/// The operation deadline of most stores here: far beyond a loopback round trip on a loaded
/// machine, so that a test not about the deadline never meets it. Tests of outages set their
/// own.
const OP_TIMEOUT: Duration = Duration::from_secs(1);

fn id(i: u32) -> SessionId {
    SessionId::new(&[&i.to_be_bytes()[..], b"-session"].concat()).unwrap()
}

fn sess(tag: u8, ttl: Duration) -> StoredSession {
    StoredSession::new(vec![tag; 200], SystemTime::now() + ttl)
}

fn hour() -> Duration {
    Duration::from_secs(3600)
}

fn ring() -> KeyRing {
    KeyRing::new(1, [0x5a; 32])
}

fn builder(url: String, ring: KeyRing, tier: usize) -> RedisStoreBuilder {
    RedisStore::builder(url)
        .key_ring(ring)
        .tier_entries(tier)
        .op_timeout(OP_TIMEOUT)
}

fn store(server: &RedisServer, ring: KeyRing, tier: usize) -> RedisStore {
    builder(server.url(), ring, tier).build().unwrap()
}

fn raw_get(server: &RedisServer, key: &str) -> Option<Vec<u8>> {
    server.raw().get(key).unwrap()
}

fn wait_subscribed(s: &RedisStore) {
    wait_until("the store subscribed to invalidations", || {
        s.stats().subscribed
    });
}

/// Starts a lookup; returns where its result arrives.
fn start_lookup(s: &RedisStore, id: SessionId, mode: LookupMode) -> mpsc::Receiver<LookupResult> {
    let (tx, rx) = mpsc::channel();
    s.lookup(id, mode, LookupDone::new(move |r| tx.send(r).unwrap()));
    rx
}

/// One lookup, waited for (bounded); the call itself must not wait (see [`lookups_in`]).
fn lookup(s: &RedisStore, id: SessionId, mode: LookupMode) -> LookupResult {
    lookups_in(s, &[id], mode).pop().unwrap().result
}

fn redis_addr(server: &RedisServer) -> std::net::SocketAddr {
    ([127, 0, 0, 1], server.port()).into()
}

#[test]
fn round_trips_without_and_with_tier() {
    let server = RedisServer::start();
    for tier in [0, 64] {
        let s = store(&server, ring(), tier);
        s.clear().unwrap();
        for i in 0..20 {
            s.put(id(i), sess(i as u8, hour())).unwrap();
        }
        flush(&s);
        assert_eq!(s.len().unwrap(), 20);
        assert_eq!(s.bytes().unwrap(), 20 * 200);
        let got = s.get(&id(3)).unwrap().unwrap();
        assert_eq!(got.data(), &[3u8; 200][..]);
        let want = sess(3, hour());
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
        assert!(s.remove(&id(5)).unwrap(), "queued");
        assert!(s.get(&id(5)).unwrap().is_none());
        flush(&s);
        assert!(s.get(&id(5)).unwrap().is_none());
        assert_eq!(s.len().unwrap(), 18);
        // Replacing keeps one entry.
        s.put(id(6), sess(0xee, hour())).unwrap();
        assert_eq!(s.get(&id(6)).unwrap().unwrap().data()[0], 0xee);
        flush(&s);
        assert_eq!(s.len().unwrap(), 18);
        s.clear().unwrap();
        assert_eq!(s.len().unwrap(), 0);
        assert!(s.get(&id(1)).unwrap().is_none());
        let st = s.stats();
        assert_eq!(
            (st.redis_errors, st.write_errors, st.admin_errors),
            (0, 0, 0)
        );
        assert!(st.remote_lookups > 0);
    }
}

#[test]
fn values_at_rest_are_sealed_and_ttl_matches_the_session() {
    let server = RedisServer::start();
    let s = store(&server, ring(), 0);
    let lifetime = Duration::from_secs(30);
    s.put(id(1), sess(0x42, lifetime)).unwrap();
    flush(&s);
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
    flush(&s);
    assert!(raw_get(&server, &key).is_none());
    // Redis expires the key itself.
    s.put(id(2), sess(1, Duration::from_millis(150))).unwrap();
    flush(&s);
    wait_until("redis expired the key", || {
        raw_get(&server, &s.key_for(&id(2))).is_none()
    });
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
    flush(&a);
    // Host B also has every session in its tier (it looked them up).
    wait_subscribed(&b);
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
    wait_subscribed(&b);
    a.put(id(1), sess(7, Duration::from_secs(60))).unwrap();
    flush(&a);
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
    flush(&a);
    assert!(b.take(&id(2)).unwrap().is_some());
    assert!(a.take(&id(2)).unwrap().is_none());
    assert!(
        a.get(&id(2)).unwrap().is_none(),
        "the failed take dropped A's tier copy"
    );
    // remove on one host is seen by the other's Redis lookups.
    a.put(id(3), sess(9, Duration::from_secs(60))).unwrap();
    flush(&a);
    assert!(b.remove(&id(3)).unwrap());
    flush(&b);
    assert!(store(&server, ring(), 0).get(&id(3)).unwrap().is_none());
}

#[test]
fn tampered_moved_and_wrong_key_values_are_counted_misses() {
    let server = RedisServer::start();
    let s = store(&server, ring(), 0);
    let mut raw = server.raw();

    // Tampered ciphertext.
    s.put(id(1), sess(1, hour())).unwrap();
    flush(&s);
    let key1 = s.key_for(&id(1));
    let mut v = raw_get(&server, &key1).unwrap();
    let mid = v.len() / 2;
    v[mid] ^= 0x80;
    let _: () = raw.set(&key1, &v).unwrap();
    assert!(matches!(
        s.get(&id(1)),
        Err(StoreError::Unauthentic { key_id: 1 })
    ));
    assert_eq!(s.stats().decrypt_failures, 1);
    flush(&s);
    assert!(
        raw_get(&server, &key1).is_none(),
        "the bad value is deleted"
    );

    // A valid value copied under another id.
    s.put(id(2), sess(2, hour())).unwrap();
    flush(&s);
    let v2 = raw_get(&server, &s.key_for(&id(2))).unwrap();
    let _: () = raw.set(s.key_for(&id(3)), &v2).unwrap();
    assert!(matches!(s.get(&id(3)), Err(StoreError::Unauthentic { .. })));
    flush(&s);
    assert!(matches!(
        s.take(&id(3)),
        Ok(None) | Err(StoreError::Unauthentic { .. })
    ));
    assert_eq!(
        s.get(&id(2)).unwrap().unwrap().data()[0],
        2,
        "the original still opens"
    );
    assert!(s.stats().decrypt_failures >= 2);

    // The wrong key, same key id: fails to open.
    let wrong = store(&server, KeyRing::new(1, [0x11; 32]), 0);
    assert!(matches!(
        wrong.get(&id(2)),
        Err(StoreError::Unauthentic { key_id: 1 })
    ));
    assert_eq!(wrong.stats().decrypt_failures, 1);
    flush(&wrong);
    // A value that fails authentication under a key the host holds is deleted (it cannot tell
    // tampering from a wrong key with the same id).
    assert!(s.get(&id(2)).unwrap().is_none());
    // A key id this host does not hold (another host ahead in a rotation): a miss, counted, and
    // the value is left for the hosts that can open it.
    s.put(id(4), sess(4, hour())).unwrap();
    flush(&s);
    let other = store(&server, KeyRing::new(9, [0x5a; 32]), 0);
    assert!(matches!(
        other.get(&id(4)),
        Err(StoreError::UnknownKey { key_id: 1 })
    ));
    assert_eq!(other.stats().decrypt_failures, 1);
    flush(&other);
    assert_eq!(s.get(&id(4)).unwrap().unwrap().data()[0], 4);

    // Garbage and plaintext values: misses, never panics.
    for junk in [
        &b""[..],
        b"\x00\x00\x00\x00\x00\x00\x00\x00\x09abc",
        &[1u8; 40][..],
    ] {
        let _: () = raw.set(s.key_for(&id(5)), junk).unwrap();
        assert!(matches!(
            s.get(&id(5)),
            Err(StoreError::Corrupt(_)
                | StoreError::UnknownKey { .. }
                | StoreError::Unauthentic { .. })
        ));
        flush(&s);
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
    flush(&old);
    let rotated = store(&server, ring().rotate(2, [0x77; 32]).unwrap(), 0);
    assert_eq!(rotated.get(&id(1)).unwrap().unwrap().data()[0], 1);
    rotated
        .put(id(2), sess(2, Duration::from_secs(60)))
        .unwrap();
    flush(&rotated);
    let v = raw_get(&server, &rotated.key_for(&id(2))).unwrap();
    assert_eq!(envelope_key_id(&v), Some(2));
    // A host still on the old ring misses the new session, but does not delete it.
    assert!(old.get(&id(2)).is_err());
    flush(&old);
    assert!(rotated.get(&id(2)).unwrap().is_some());
    assert_eq!(rotated.stats().decrypt_failures, 0);
}

#[test]
fn a_key_ring_replaced_at_runtime_keeps_old_sessions_and_seals_new_ones_with_its_active_key() {
    let server = RedisServer::start();
    let proxy = DelayProxy::start(redis_addr(&server));
    // Id 999 is sealed under key 1 and in flight behind the paused proxy.
    let s = writer_held(&proxy, 64);
    // A put queued before the reload (the writer waits for the batch in flight) is sealed when
    // it is sent, with the new ring.
    s.put(id(2), sess(2, hour())).unwrap();
    let rotated = ring().rotate(2, [0x77; 32]).unwrap();
    s.replace_key_ring(rotated).unwrap();
    proxy.resume();
    flush(&s);
    s.put(id(3), sess(3, hour())).unwrap();
    flush(&s);
    let key_id = |i| envelope_key_id(&raw_get(&server, &s.key_for(&id(i))).unwrap());
    assert_eq!(
        (key_id(999), key_id(2), key_id(3)),
        (Some(1), Some(2), Some(2))
    );
    // Key 1 is still in the ring: what it sealed keeps opening.
    assert_eq!(s.get(&id(999)).unwrap().unwrap().data()[0], 9);
    for i in 2..=3 {
        assert_eq!(s.get(&id(i)).unwrap().unwrap().data()[0], i as u8, "id {i}");
    }
    // A host holding only key 2 opens the new values.
    let only_new = store(&server, KeyRing::new(2, [0x77; 32]), 0);
    assert!(only_new.get(&id(3)).unwrap().is_some());
    // Key 1 retired: its values become counted misses, left in Redis (another host may still
    // hold key 1); key 2's values keep opening.
    s.replace_key_ring(KeyRing::new(2, [0x77; 32])).unwrap();
    assert!(matches!(
        s.get(&id(999)),
        Err(StoreError::UnknownKey { key_id: 1 })
    ));
    assert_eq!(s.stats().decrypt_failures, 1);
    flush(&s);
    assert!(raw_get(&server, &s.key_for(&id(999))).is_some());
    assert!(s.get(&id(2)).unwrap().is_some());
}

#[test]
fn sessions_resume_across_a_key_ring_reload() {
    let server = RedisServer::start();
    let a = host(&server, Proto::Tls12, false, Duration::from_secs(1));
    let b = host_with(&server, Proto::Tls12, false, Duration::from_secs(1), ring());
    let client = client_ctx(Proto::Tls12, false);
    let before = connect(&a.ctx, &client, None, ServerClose::Clean);
    flush(&a.store);
    // Both hosts reload a key file with key 2 appended (SIGHUP in the echo server).
    let rotated = ring().rotate(2, [0x77; 32]).unwrap();
    a.store.replace_key_ring(rotated.clone()).unwrap();
    b.store.replace_key_ring(rotated).unwrap();
    let resumed = connect(&b.ctx, &client, before.session.as_ref(), ServerClose::Clean);
    assert!(
        resumed.server_reused,
        "a session sealed before the reload resumes"
    );
    let after = connect(&a.ctx, &client, None, ServerClose::Clean);
    flush(&a.store);
    let sid = SessionId::new(after.session.as_ref().unwrap().id()).unwrap();
    let v = raw_get(&server, &a.store.key_for(&sid)).unwrap();
    assert_eq!(
        envelope_key_id(&v),
        Some(2),
        "sealed with the new active key"
    );
    let on_b = connect(&b.ctx, &client, after.session.as_ref(), ServerClose::Clean);
    assert!(on_b.server_reused);
    assert_eq!(b.cache.stats().store_errors, 0);
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
    flush(&s);
    // The key is the prefix plus the id's bytes in hex (id 1 is 00000001 then "-session").
    let key = "plain:000000012d73657373696f6e";
    assert_eq!(s.key_for(&id(1)), key);
    let v = raw_get(&server, key).expect("the value sits under exactly that key");
    assert_eq!(v[0], 0, "plaintext version byte");
    assert_eq!(&v[9..], &[0x42; 200][..], "the session bytes, in the clear");
    assert!(s.take(&id(1)).unwrap().is_some());
    // An encrypted store under the same prefix refuses plaintext values.
    s.put(id(2), sess(0x42, Duration::from_secs(60))).unwrap();
    flush(&s);
    let sealed = RedisStore::builder(server.url())
        .key_ring(ring())
        .prefix("plain:")
        .tier_entries(0)
        .build()
        .unwrap();
    assert!(sealed.get(&id(2)).is_err());
}

/// Drives the store through an outage: `down` takes Redis away, `up` brings it back.
fn outage(server: &mut RedisServer, down: fn(&mut RedisServer), up: fn(&mut RedisServer)) {
    let backoff = Duration::from_millis(300);
    let s = builder(server.url(), ring(), 0)
        .op_timeout(Duration::from_millis(100))
        .breaker(3, backoff)
        .build()
        .unwrap();
    for i in 0..4 {
        s.put(id(i), sess(1, Duration::from_secs(60))).unwrap();
    }
    flush(&s);
    for i in 0..4 {
        assert!(s.get(&id(i)).unwrap().is_some());
    }
    down(server);
    // The first failures reach Redis, each bounded by the deadline.
    for i in 0..3 {
        let r = s.get(&id(i));
        assert!(
            matches!(r, Err(StoreError::Timeout | StoreError::Unavailable(_))),
            "op {i}: {r:?}"
        );
    }
    let st = s.stats();
    assert_eq!(st.redis_errors, 3, "{st:?}");
    assert!(st.breaker_open);
    assert_eq!(st.breaker_opens, 1);
    // Then the breaker answers lookups at once, on the calling thread, and writes queue.
    for i in 0..50 {
        let l = lookups(&s, &[id(i)]).pop().unwrap();
        assert!(
            l.inline && matches!(l.result, Err(StoreError::BreakerOpen)),
            "lookup {i} was not answered inline: {l:?}"
        );
        s.put(id(100 + i), sess(2, Duration::from_secs(60)))
            .unwrap();
    }
    assert_eq!(s.stats().breaker_open_skips, 50);
    up(server);
    // The writer's probe (or a lookup's) goes through on a fresh connection and closes the
    // breaker; the writes queued during the outage then reach Redis.
    flush(&s);
    assert!(!s.stats().breaker_open);
    let fresh = store(server, ring(), 0);
    for i in 0..50 {
        assert_eq!(fresh.get(&id(100 + i)).unwrap().unwrap().data()[0], 2);
    }
    assert_eq!(s.stats().puts_dropped, 0);
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

/// With Redis hung (SIGSTOP: connected, silent), no call waits on it: each lookup's completion
/// waits for its call to return ([`lookups`]), and puts on a store whose deadline is a minute
/// away all return (within [`PATIENCE`]) although Redis acknowledges nothing. Every lookup
/// completes, with an error, and counted.
#[test]
fn redis_hung_never_blocks_a_caller_and_every_lookup_completes() {
    let mut server = RedisServer::start();
    let s = builder(server.url(), ring(), 64)
        .op_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let patient = Arc::new(
        builder(server.url(), ring(), 0)
            .op_timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
    );
    for store in [&s, &*patient] {
        store.put(id(0), sess(1, hour())).unwrap();
        flush(store); // connected, and the connection is known good
    }
    let written = patient.stats().writes_done;
    server.pause();
    let puts = {
        let patient = Arc::clone(&patient);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for i in 0..200 {
                patient.put(id(2000 + i), sess(2, hour())).unwrap();
            }
            tx.send(()).unwrap();
        });
        rx
    };
    let ids: Vec<SessionId> = (0..200).map(|i| id(1000 + i)).collect();
    let results = lookups(&s, &ids);
    assert!(
        results.iter().all(|l| matches!(
            l.result,
            Err(StoreError::Timeout | StoreError::Unavailable(_) | StoreError::BreakerOpen)
        )),
        "{results:?}"
    );
    puts.recv_timeout(PATIENCE)
        .expect("200 puts returned although Redis answers nothing and their deadline is 60 s away");
    let p = patient.stats();
    assert_eq!(
        (p.writes_done, p.puts_queued - 1),
        (written, 200),
        "queued, none acknowledged: {p:?}"
    );
    let st = s.stats();
    assert!(st.timeouts >= 3, "{st:?}");
    assert!(st.breaker_opens >= 1, "{st:?}");
    assert_eq!(
        st.remote_lookups + st.breaker_open_skips,
        200,
        "each lookup either went to Redis or was skipped: {st:?}"
    );
    server.resume();
    flush(&patient);
    assert!(patient.get(&id(2199)).unwrap().is_some());
}

#[test]
fn lookup_through_a_paused_proxy_times_out_then_recovers() {
    let server = RedisServer::start();
    let proxy = DelayProxy::start(redis_addr(&server));
    let op_timeout = Duration::from_millis(100);
    let s = builder(proxy.url(), ring(), 0)
        .op_timeout(op_timeout)
        .breaker(3, Duration::from_millis(200))
        .build()
        .unwrap();
    s.put(id(1), sess(1, hour())).unwrap();
    flush(&s);
    assert!(lookup(&s, id(1), LookupMode::Get).unwrap().is_some());
    proxy.pause();
    for l in lookups(&s, &[id(1); 5]) {
        assert!(
            matches!(l.result, Err(StoreError::Timeout)) && !l.inline,
            "{l:?}"
        );
        assert!(l.took >= op_timeout, "timed out after {:?}", l.took);
    }
    let st = s.stats();
    assert_eq!((st.timeouts, st.redis_errors), (5, 5), "{st:?}");
    assert!(st.breaker_open);
    proxy.resume();
    wait_until("lookups succeed again", || {
        matches!(lookup(&s, id(1), LookupMode::Get), Ok(Some(_)))
    });
    assert!(!s.stats().breaker_open);
}

#[test]
fn dropping_the_store_completes_lookups_in_flight() {
    let server = RedisServer::start();
    let proxy = DelayProxy::start(redis_addr(&server));
    let s = builder(proxy.url(), ring(), 0)
        .op_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    assert!(s.get(&id(1)).unwrap().is_none()); // connected
    proxy.pause();
    let rx = start_lookup(&s, id(1), LookupMode::Take);
    assert!(rx.try_recv().is_err(), "in flight");
    drop(s);
    let r = rx
        .recv_timeout(PATIENCE)
        .expect("completed when the store went away");
    assert!(matches!(r, Err(StoreError::Stopped)), "{r:?}");
}

/// A store through a paused proxy whose writer is holding one batch in flight.
fn writer_held(proxy: &DelayProxy, capacity: usize) -> RedisStore {
    let s = builder(proxy.url(), ring(), 0)
        .op_timeout(Duration::from_secs(30))
        .write_queue(capacity)
        .build()
        .unwrap();
    assert!(s.get(&id(999)).unwrap().is_none()); // connected
    proxy.pause();
    s.put(id(999), sess(9, hour())).unwrap();
    wait_until("the writer took the first batch", || {
        s.stats().write_queue_len == 0
    });
    s
}

#[test]
fn write_queue_overflow_is_counted_and_the_lost_put_is_absent() {
    let server = RedisServer::start();
    let proxy = DelayProxy::start(redis_addr(&server));
    let s = writer_held(&proxy, 8);
    for i in 0..8 {
        s.put(id(i), sess(1, hour())).unwrap();
    }
    assert!(matches!(
        s.put(id(8), sess(1, hour())),
        Err(StoreError::QueueFull)
    ));
    let st = s.stats();
    assert_eq!((st.puts_dropped, st.write_queue_len), (1, 8), "{st:?}");
    // Removals still have room while puts overflow.
    assert!(s.remove(&id(50)).unwrap());
    proxy.resume();
    flush(&s);
    for i in 0..8 {
        assert!(raw_get(&server, &s.key_for(&id(i))).is_some(), "put {i}");
    }
    assert!(
        raw_get(&server, &s.key_for(&id(8))).is_none(),
        "the dropped put never reached Redis"
    );
    assert!(
        store(&server, ring(), 0).get(&id(8)).unwrap().is_none(),
        "a miss (a full handshake), not an error"
    );
    assert_eq!(s.stats().write_errors, 0);
}

#[test]
fn a_remove_after_a_put_of_the_same_id_wins_whether_or_not_the_put_was_sent() {
    let server = RedisServer::start();
    let proxy = DelayProxy::start(redis_addr(&server));
    let s = writer_held(&proxy, 64);
    // Both queued before the writer sends either: coalesced into the removal.
    s.put(id(1), sess(1, hour())).unwrap();
    assert!(s.remove(&id(1)).unwrap());
    assert_eq!(s.stats().writes_coalesced, 1);
    assert!(
        s.get(&id(1)).unwrap().is_none(),
        "the queued removal answers"
    );
    // The put already sent (in flight behind the paused proxy) when the removal is queued.
    s.put(id(2), sess(2, hour())).unwrap();
    proxy.resume();
    flush(&s);
    proxy.pause();
    s.put(id(3), sess(3, hour())).unwrap();
    wait_until("the put of id 3 is in flight", || {
        s.stats().write_queue_len == 0
    });
    assert!(s.remove(&id(3)).unwrap());
    assert_eq!(s.stats().writes_coalesced, 1, "nothing to coalesce with");
    proxy.resume();
    flush(&s);
    assert!(raw_get(&server, &s.key_for(&id(1))).is_none());
    assert!(
        raw_get(&server, &s.key_for(&id(2))).is_some(),
        "a put on its own lands"
    );
    assert!(
        raw_get(&server, &s.key_for(&id(3))).is_none(),
        "the removal ran after the put it followed"
    );
    let st = s.stats();
    assert_eq!((st.write_errors, st.removes_dropped), (0, 0), "{st:?}");
}

#[test]
fn a_quick_redis_restart_costs_no_failed_operation() {
    let mut server = RedisServer::start();
    let s = store(&server, ring(), 0);
    for i in 0..4 {
        s.put(id(i), sess(1, Duration::from_secs(60))).unwrap();
    }
    flush(&s);
    server.restart(); // no persistence: the sessions are gone, the connection dead
    assert!(
        s.get(&id(0)).unwrap().is_none(),
        "a dead connection is replaced, not an error"
    );
    s.put(id(5), sess(5, Duration::from_secs(60))).unwrap();
    flush(&s);
    assert!(s.get(&id(5)).unwrap().is_some());
    let st = s.stats();
    assert_eq!((st.redis_errors, st.write_errors), (0, 0), "{st:?}");
    assert_eq!(st.connects, 2);
}

#[test]
fn without_invalidation_the_tier_serves_hot_sessions_while_redis_is_down() {
    let mut server = RedisServer::start();
    let tier = MemoryStore::builder().max_entries(8).build().unwrap();
    let s = RedisStore::builder(server.url())
        .key_ring(ring())
        .tier(tier)
        .invalidation(false)
        .breaker(1, Duration::from_secs(60))
        .build()
        .unwrap();
    s.put(id(1), sess(1, Duration::from_secs(60))).unwrap();
    flush(&s);
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

#[test]
fn with_invalidation_the_tier_stops_serving_when_the_subscription_is_lost() {
    let server = RedisServer::start();
    let proxy = DelayProxy::start(redis_addr(&server));
    let s = builder(proxy.url(), ring(), 64)
        .op_timeout(Duration::from_millis(100))
        .invalidation_heartbeat(Duration::from_millis(100))
        .build()
        .unwrap();
    wait_subscribed(&s);
    // A healthy subscription answers its heartbeats and stays up.
    wait_until("three heartbeats answered", || s.stats().heartbeats >= 3);
    assert_eq!(s.stats().subscription_losses, 0);
    assert!(s.stats().subscribed);
    s.put(id(1), sess(1, hour())).unwrap();
    flush(&s);
    assert!(s.get(&id(1)).unwrap().is_some());
    assert_eq!(s.stats().tier_hits, 1);
    // Redis unreachable, the subscription silently dead: the heartbeat notices.
    proxy.pause();
    wait_until("the lost subscription is noticed", || !s.stats().subscribed);
    let r = lookup(&s, id(1), LookupMode::Get);
    assert!(matches!(r, Err(StoreError::Timeout)), "{r:?}");
    assert_eq!(s.stats().tier_hits, 1, "the tier did not answer");
    proxy.resume();
    wait_subscribed(&s);
    assert!(s.stats().subscription_losses >= 1);
    let remote = s.stats().remote_lookups;
    assert!(s.get(&id(1)).unwrap().is_some());
    assert_eq!(
        s.stats().remote_lookups,
        remote + 1,
        "the tier was cleared on resubscribing: the first lookup reads Redis"
    );
    assert!(s.get(&id(1)).unwrap().is_some());
    assert_eq!(s.stats().tier_hits, 2, "then the tier serves again");
}

#[test]
fn a_removal_or_take_on_one_host_stops_the_other_hosts_tier_serving_it() {
    let server = RedisServer::start();
    let a = store(&server, ring(), 64);
    let b = store(&server, ring(), 64);
    wait_subscribed(&a);
    wait_subscribed(&b);
    for i in [1, 2] {
        a.put(id(i), sess(i as u8, hour())).unwrap();
    }
    flush(&a);
    for i in [1, 2] {
        assert!(b.get(&id(i)).unwrap().is_some()); // from Redis, into B's tier
        assert!(lookup(&b, id(i), LookupMode::Get).unwrap().is_some());
    }
    assert_eq!(b.stats().tier_hits, 2);
    let heard = b.stats().invalidations_received;

    assert!(a.remove(&id(1)).unwrap());
    flush(&a);
    wait_until("B heard of the removal", || {
        b.stats().invalidations_received > heard
    });
    assert!(lookup(&b, id(1), LookupMode::Get).unwrap().is_none());

    assert!(a.take(&id(2)).unwrap().is_some(), "single use, on host A");
    wait_until("B heard of the take", || {
        b.stats().invalidations_received > heard + 1
    });
    assert!(lookup(&b, id(2), LookupMode::Get).unwrap().is_none());
    assert_eq!(b.stats().tier_hits, 2, "B's tier served neither again");
    // A counts a PUBLISH when Redis answers it, which may come after B has heard the message.
    wait_until("A counted both invalidations it sent", || {
        a.stats().invalidations_sent >= 2
    });
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
        builder(server.url(), ring, 1024)
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
        flush(&a.store);
        let second = connect(&b.ctx, &client, first.session.as_ref(), ServerClose::Clean);
        assert!(
            second.server_reused && second.client_reused,
            "{proto:?}: B did not resume A's session"
        );
        let st = b.cache.stats();
        assert_eq!((st.hits, st.misses, st.store_errors), (1, 0, 0), "{st:?}");
        assert_eq!(b.store.stats().tier_hits, 0, "B read it from Redis");
        assert_eq!(b.store.stats().remote_lookups, 1);
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
    flush(&old.store);
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
    flush(&rotated.store);
    let id = SessionId::new(fresh.session.as_ref().unwrap().id()).unwrap();
    let v = raw_get(&server, &rotated.store.key_for(&id)).unwrap();
    assert_eq!(envelope_key_id(&v), Some(2));
    // A host with the wrong key (same id 1) misses, counts it, and the handshake goes on.
    let other = connect(&old.ctx, &client, None, ServerClose::Clean);
    flush(&old.store);
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
    flush(&a.store);
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
    flush(&a.store);

    server.kill();
    for i in 0..10 {
        // A session from before the outage, offered to B (not in B's tier): a full handshake.
        let out = connect(&b.ctx, &client, before.session.as_ref(), ServerClose::Clean);
        assert!(!out.server_reused, "handshake {i} resumed without Redis");
    }
    let st = b.cache.stats();
    assert_eq!(
        st.store_errors, 10,
        "each lookup failed and was counted: {st:?}"
    );
    assert_eq!((st.hits, st.inserts), (0, 10), "{st:?}");
    let rs = b.store.stats();
    assert!(rs.breaker_opens >= 1, "{rs:?}");
    assert!(
        rs.breaker_open_skips >= 1,
        "once open, the breaker kept lookups off the network: {rs:?}"
    );
    assert_eq!(
        rs.puts_dropped, 0,
        "the new sessions wait in the queue: {rs:?}"
    );

    let port = server.port();
    server = RedisServer::start_on(port);
    // Resumption across hosts works again (a probe closes the breaker).
    let fresh = connect(&a.ctx, &client, None, ServerClose::Clean);
    flush(&a.store);
    wait_until("B resumes A's sessions again", || {
        connect(&b.ctx, &client, fresh.session.as_ref(), ServerClose::Clean).server_reused
    });
    assert!(!b.store.stats().breaker_open);
    flush(&b.store);
    assert!(
        b.store.stats().writes_done >= 10,
        "the sessions B made during the outage reached Redis"
    );
    drop(server);
}

/// Handshake figures (not a test of behaviour):
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
    let timed = |f: &dyn Fn() -> bool| {
        let t = Instant::now();
        let r = f();
        (r, t.elapsed())
    };
    // Sessions made on `a`, then resumed on `b` (each session once).
    let resume = |a: &Host, b: &Ctx, expect_reuse: bool| {
        let sessions: Vec<_> = (0..N)
            .map(|_| {
                connect(&a.ctx, &client, None, ServerClose::Clean)
                    .session
                    .unwrap()
            })
            .collect();
        flush(&a.store);
        sessions
            .iter()
            .map(|s| {
                let (reused, d) =
                    timed(&|| connect(b, &client, Some(s), ServerClose::Clean).server_reused);
                assert_eq!(reused, expect_reuse);
                d
            })
            .collect::<Vec<_>>()
    };
    let full = |a: &Ctx| {
        (0..N)
            .map(|_| timed(&|| connect(a, &client, None, ServerClose::Clean).server_reused).1)
            .collect::<Vec<_>>()
    };

    let mem_cache = SessionCache::builder().build().unwrap();
    let mem = server_ctx(Proto::Tls12, &mem_cache, false);
    report("memory store: full handshake", full(&mem));
    let sessions: Vec<_> = (0..N)
        .map(|_| {
            connect(&mem, &client, None, ServerClose::Clean)
                .session
                .unwrap()
        })
        .collect();
    report(
        "memory store: resumed",
        sessions
            .iter()
            .map(|s| timed(&|| connect(&mem, &client, Some(s), ServerClose::Clean).server_reused).1)
            .collect(),
    );

    let a = host(&server, Proto::Tls12, false, Duration::from_secs(60));
    let b = host(&server, Proto::Tls12, false, Duration::from_secs(60));
    wait_subscribed(&a.store);
    report(
        "redis store: resumed on the same host (tier hit)",
        resume(&a, &a.ctx, true),
    );
    report(
        "redis store: resumed on another host (tier miss)",
        resume(&a, &b.ctx, true),
    );
    report("redis store: full handshake (put queued)", full(&a.ctx));
    let sessions: Vec<_> = (0..N)
        .map(|_| {
            connect(&a.ctx, &client, None, ServerClose::Clean)
                .session
                .unwrap()
        })
        .collect();
    flush(&a.store);
    server.kill();
    let down: Vec<_> = sessions
        .iter()
        .map(|s| timed(&|| connect(&b.ctx, &client, Some(s), ServerClose::Clean).server_reused).1)
        .collect();
    report("redis down: resumption offered, full handshake", down);
    report("redis down: new client, full handshake", full(&b.ctx));
    println!("host b store stats: {:?}", b.store.stats());
    println!("host b cache stats: {:?}", b.cache.stats());
}

/// A conditional write or removal of a versioned value (a shared DTLS peer's state) on a real
/// Redis: it lands only over one of the versions expected, atomically (the version in the
/// clear ahead of the sealed value, compared by the script); two writers expecting the same
/// version: exactly one lands. A clear version that disagrees with the sealed one is refused.
#[test]
fn conditional_writes_of_a_versioned_value_land_only_over_the_expected_version() {
    let server = RedisServer::start();
    let s = Arc::new(store(&server, ring(), 0));
    let peer = SessionId::new(b"\xffOSCpeer-a-peer-state-id-of-32b!").unwrap();
    let versioned = |v: u64, fill: u8| {
        let mut data = v.to_be_bytes().to_vec();
        data.extend_from_slice(&[fill; 100]);
        StoredSession::new(data, SystemTime::now() + hour())
    };
    let put_if = |s: &RedisStore, v: u64, expect: Option<&[u64]>| {
        let (tx, rx) = mpsc::channel();
        s.put_if(
            peer,
            versioned(v, v as u8),
            expect,
            openssl_session_cache::PutDone::new(move |r| tx.send(r).unwrap()),
        );
        rx.recv_timeout(PATIENCE).expect("put_if completes")
    };
    assert!(
        matches!(put_if(&s, 1, Some(&[1])), Err(StoreError::Conflict)),
        "nothing stored: nothing to replace"
    );
    put_if(&s, 1, None).unwrap();
    let key = s.key_for(&peer);
    let value = raw_get(&server, &key).unwrap();
    assert_eq!(value[..8], 1u64.to_be_bytes(), "the version in the clear");
    assert!(!value.windows(16).any(|w| w == [1; 16]), "the rest sealed");
    assert!(matches!(
        put_if(&s, 2, Some(&[7, 8])),
        Err(StoreError::Conflict)
    ));
    assert_eq!(raw_get(&server, &key).unwrap(), value, "unchanged");
    put_if(&s, 2, Some(&[7, 1])).unwrap();
    let got = s.get(&peer).unwrap().unwrap();
    assert_eq!(openssl_session_cache::version_of(got.data()), Some(2));
    // Two writers expecting version 2 at once: one lands.
    let (a, b) = thread::scope(|sc| {
        let a = sc.spawn(|| put_if(&s, 3, Some(&[2])));
        let b = sc.spawn(|| put_if(&s, 4, Some(&[2])));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");
    let won = if a.is_ok() { 3 } else { 4 };
    let got = s.get(&peer).unwrap().unwrap();
    assert_eq!(openssl_session_cache::version_of(got.data()), Some(won));
    // A removal of another version leaves it; of its own, deletes it.
    assert!(s.remove_if(&peer, &[2]).unwrap());
    thread::sleep(Duration::from_millis(100));
    assert!(raw_get(&server, &key).is_some(), "another version stays");
    assert!(s.remove_if(&peer, &[won]).unwrap());
    wait_until("removed", || raw_get(&server, &key).is_none());
    // A clear version that disagrees with the sealed one: refused, and left in place.
    put_if(&s, 5, None).unwrap();
    let mut v = raw_get(&server, &key).unwrap();
    v[7] ^= 1;
    let _: () = server.raw().set(&key, &v).unwrap();
    assert!(matches!(s.get(&peer), Err(StoreError::Corrupt(_))));
    assert!(raw_get(&server, &key).is_some());
}
