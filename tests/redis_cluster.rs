//! The Redis store on a Redis Cluster of three masters started here (`redis-server
//! --cluster-enabled yes` three times, joined by `redis-cli --cluster create`), one of them
//! killed (SIGKILL) or hung (SIGSTOP) by PID in the failure tests.
//!
//! No test here times the store: a lookup's call is shown not to wait by its completion
//! waiting for the call to return (see `redis_server::lookups`), and a hung master's lookups by their
//! `Timeout` results, which only the operation deadline produces.
#![cfg(feature = "redis")]

#[path = "support/redis_server.rs"]
mod redis_server;
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use openssl_session_cache::{
    KeyRing, RedisStore, RedisStoreBuilder, SessionCache, SessionId, SessionStore,
    SessionStoreAdmin, StoreError, StoredSession,
};

use redis_server::{flush, lookups, wait_until, RedisCluster};
use support::{client_ctx, connect, server_ctx, Proto, ServerClose};

/// The operation deadline of the failure tests.
const OP_TIMEOUT: Duration = Duration::from_millis(200);

fn id(i: u32) -> SessionId {
    SessionId::new(&[&i.to_be_bytes()[..], b"-cluster"].concat()).unwrap()
}

fn sess(tag: u8) -> StoredSession {
    StoredSession::new(vec![tag; 200], SystemTime::now() + Duration::from_secs(600))
}

/// A store on the cluster; its deadline is generous (the failure tests set their own), so a
/// test not about it never meets it on a loaded machine.
fn builder(url: String, tier: usize) -> RedisStoreBuilder {
    RedisStore::builder(url)
        .key_ring(KeyRing::new(1, [0x5a; 32]))
        .tier_entries(tier)
        .op_timeout(Duration::from_secs(2))
}

fn dbsize(cluster: &RedisCluster, master: usize) -> usize {
    redis::cmd("DBSIZE")
        .query(&mut cluster.masters[master].raw())
        .unwrap()
}

/// For each key, the index of the master whose slots hold it (asked of the cluster itself:
/// `CLUSTER SLOTS` and `CLUSTER KEYSLOT` on the first master).
fn holders(cluster: &RedisCluster, keys: &[String]) -> Vec<usize> {
    let mut raw = cluster.masters[0].raw();
    let ranges: Vec<(u16, u16, Vec<redis::Value>)> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query::<Vec<redis::Value>>(&mut raw)
        .unwrap()
        .into_iter()
        .map(|r| redis::from_redis_value(r).unwrap())
        .map(|mut r: Vec<redis::Value>| {
            let master: Vec<redis::Value> = redis::from_redis_value(r.remove(2)).unwrap();
            let first: u16 = redis::from_redis_value(r[0].clone()).unwrap();
            let last: u16 = redis::from_redis_value(r[1].clone()).unwrap();
            (first, last, master)
        })
        .collect();
    let port_of = |slot: u16| {
        let (_, _, master) = ranges
            .iter()
            .find(|(a, b, _)| (*a..=*b).contains(&slot))
            .expect("every slot is covered");
        redis::from_redis_value::<u16>(master[1].clone()).unwrap()
    };
    keys.iter()
        .map(|k| {
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(k)
                .query(&mut raw)
                .unwrap();
            let port = port_of(slot);
            cluster
                .masters
                .iter()
                .position(|m| m.port() == port)
                .unwrap()
        })
        .collect()
}

#[test]
fn sessions_spread_over_the_masters_and_two_hosts_share_them() {
    let cluster = RedisCluster::start();
    let a = builder(cluster.url(), 64).build().unwrap();
    let b = RedisStore::cluster_builder(cluster.node_urls())
        .key_ring(KeyRing::new(1, [0x5a; 32]))
        .tier_entries(64)
        .op_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    a.check().unwrap();
    b.check().unwrap();
    assert_eq!(a.stats().cluster_nodes, 3, "{:?}", a.stats());
    const N: u32 = 300;
    for i in 0..N {
        a.put(id(i), sess(i as u8)).unwrap();
    }
    flush(&a);
    // Session keys hash over the slots, so every master holds a share.
    let shares: Vec<usize> = (0..3).map(|m| dbsize(&cluster, m)).collect();
    assert_eq!(shares.iter().sum::<usize>(), N as usize, "{shares:?}");
    assert!(shares.iter().all(|&n| n >= 50), "uneven spread: {shares:?}");
    // The admin walk visits every master.
    assert_eq!(a.len().unwrap(), N as usize);
    assert_eq!(a.bytes().unwrap(), N as usize * 200);
    let mut seen = 0;
    a.for_each(&mut |_, v| {
        assert_eq!(v.len(), 200);
        seen += 1;
    })
    .unwrap();
    assert_eq!(seen, N);
    // Host B reads every one, whichever master holds it.
    for i in 0..N {
        assert_eq!(b.get(&id(i)).unwrap().unwrap().data()[0], i as u8, "id {i}");
    }
    // Invalidation crosses the cluster: B subscribed on one node, A publishes through another.
    wait_until("B subscribed", || b.stats().subscribed);
    assert!(b.get(&id(1)).unwrap().is_some());
    assert!(b.get(&id(1)).unwrap().is_some());
    assert!(b.stats().tier_hits >= 1);
    let heard = b.stats().invalidations_received;
    assert!(a.remove(&id(1)).unwrap());
    flush(&a);
    wait_until("B heard of the removal", || {
        b.stats().invalidations_received > heard
    });
    let still = b.get(&id(1)).unwrap();
    assert!(
        still.is_none(),
        "B still serves a removed session: {:?} / A {:?}",
        b.stats(),
        a.stats()
    );
    // Single use across hosts.
    assert!(a.take(&id(2)).unwrap().is_some());
    assert!(b.take(&id(2)).unwrap().is_none());
    // Clearing walks every master.
    a.clear().unwrap();
    assert_eq!((0..3).map(|m| dbsize(&cluster, m)).sum::<usize>(), 0);
    for s in [&a, &b] {
        let st = s.stats();
        assert_eq!(
            (st.redis_errors, st.admin_errors, st.breakers_open),
            (0, 0, 0),
            "{st:?}"
        );
    }
}

#[test]
fn a_master_down_is_a_counted_miss_and_never_a_stall() {
    let mut cluster = RedisCluster::start();
    let s = builder(cluster.url(), 0)
        .op_timeout(OP_TIMEOUT)
        .breaker(3, Duration::from_secs(60))
        .build()
        .unwrap();
    s.check().unwrap();
    const N: u32 = 300;
    let ids: Vec<SessionId> = (0..N).map(id).collect();
    for (i, id) in ids.iter().enumerate() {
        s.put(*id, sess(i as u8)).unwrap();
    }
    flush(&s);
    let keys: Vec<String> = ids.iter().map(|i| s.key_for(i)).collect();
    let holder = holders(&cluster, &keys);
    let victim = 1;
    let on_victim = holder.iter().filter(|&&h| h == victim).count();
    assert!(on_victim >= 50, "{on_victim} of {N} on the victim");
    let pid = cluster.masters[victim].pid().expect("running");
    cluster.masters[victim].kill(); // SIGKILL to that PID
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}/status")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/status"))
                .is_ok_and(|s| s.contains("State:\tZ")),
        "master {victim} (pid {pid}) is gone"
    );

    // Every lookup completes, and no call waits for its answer; keys on the live masters
    // resume, the victim's are misses.
    let first = lookups(&s, &ids);
    for (n, l) in first.iter().enumerate() {
        let r = &l.result;
        if holder[n] == victim {
            assert!(
                matches!(
                    r,
                    Err(StoreError::Unavailable(_) | StoreError::BreakerOpen | StoreError::Timeout)
                ),
                "lookup {n}: {r:?}"
            );
        } else {
            assert_eq!(
                r.as_ref()
                    .expect("a live master answers")
                    .as_ref()
                    .unwrap()
                    .data()[0],
                n as u8,
                "lookup {n}"
            );
        }
    }
    let st = s.stats();
    assert_eq!(
        st.remote_lookups + st.breaker_open_skips,
        u64::from(N),
        "{st:?}"
    );
    assert_eq!(
        st.redis_errors + st.breaker_open_skips,
        on_victim as u64,
        "each of the victim's lookups was a counted error or skip: {st:?}"
    );
    assert_eq!((st.breakers_open, st.cluster_nodes), (1, 3), "{st:?}");
    assert!(st.breaker_opens >= 1);

    // With the victim's breaker open its keys are misses at once, on the calling thread.
    let again = lookups(&s, &ids);
    let skips_before = st.breaker_open_skips;
    for (n, l) in again.iter().enumerate() {
        let r = &l.result;
        if holder[n] == victim {
            assert!(
                matches!(r, Err(StoreError::BreakerOpen)) && l.inline,
                "lookup {n} (inline {}): {r:?}",
                l.inline
            );
        } else {
            assert!(matches!(r, Ok(Some(_))), "lookup {n}: {r:?}");
        }
    }
    let st = s.stats();
    assert_eq!(
        st.breaker_open_skips - skips_before,
        on_victim as u64,
        "{st:?}"
    );

    // Writes: the live masters' land; the victim's are held back in the queue.
    let fresh: Vec<SessionId> = (N..2 * N).map(id).collect();
    let fresh_keys: Vec<String> = fresh.iter().map(|i| s.key_for(i)).collect();
    // Asked of a live master (the victim is gone); the slot map has not changed.
    let fresh_holder = holders(&cluster, &fresh_keys);
    let fresh_on_victim = fresh_holder.iter().filter(|&&h| h == victim).count();
    for id in &fresh {
        s.put(*id, sess(7)).unwrap();
    }
    wait_until("only the victim's writes are left", || {
        s.stats().write_queue_len == fresh_on_victim as u64
    });
    let reader = builder(cluster.url(), 0).build().unwrap();
    for (n, id) in fresh.iter().enumerate() {
        if fresh_holder[n] != victim {
            assert!(reader.get(id).unwrap().is_some(), "fresh put {n} landed");
        }
    }
    assert_eq!(s.stats().puts_dropped, 0);
}

/// A master that hangs (SIGSTOP: its connections stay open, nothing answers) is worse than one
/// that is gone: nothing refuses the connection, so only the operation deadline ends a lookup.
/// Each of its keys' lookups is a `Timeout` (which only the deadline produces: the master says
/// nothing), counted, never before `op_timeout`, while every other master's keys resume; then
/// the breaker answers its keys at once, and once the master runs again they resume.
#[test]
fn a_hung_master_is_a_counted_miss_at_the_deadline_and_the_others_serve_on() {
    let mut cluster = RedisCluster::start();
    let s = builder(cluster.url(), 0)
        .op_timeout(OP_TIMEOUT)
        .breaker(3, Duration::from_millis(500))
        .build()
        .unwrap();
    s.check().unwrap();
    const N: u32 = 150;
    let ids: Vec<SessionId> = (0..N).map(id).collect();
    for (i, id) in ids.iter().enumerate() {
        s.put(*id, sess(i as u8)).unwrap();
    }
    flush(&s);
    let keys: Vec<String> = ids.iter().map(|i| s.key_for(i)).collect();
    let holder = holders(&cluster, &keys);
    let victim = 0;
    let on_victim = holder.iter().filter(|&&h| h == victim).count();
    assert!(on_victim >= 20, "{on_victim} of {N} on the victim");
    // Every master answered once on the store's own connections (a lookup each).
    for m in 0..3 {
        let n = holder.iter().position(|&h| h == m).unwrap();
        assert!(matches!(s.get(&ids[n]), Ok(Some(_))), "master {m}");
    }
    let before = s.stats();
    cluster.masters[victim].pause();

    // (A lookup started after three of the hung master's had timed out finds its breaker open
    // and is answered at once: on a machine slow enough to take 200 ms over the calls.)
    let first = lookups(&s, &ids);
    for (n, l) in first.iter().enumerate() {
        if holder[n] == victim {
            match &l.result {
                Err(StoreError::Timeout) => {
                    assert!(!l.inline, "lookup {n} was answered before the deadline");
                    assert!(
                        l.took >= OP_TIMEOUT,
                        "lookup {n} timed out after {:?}",
                        l.took
                    );
                }
                Err(StoreError::BreakerOpen) if l.inline => {}
                other => panic!("lookup {n}: {other:?}"),
            }
        } else {
            assert_eq!(
                l.result
                    .as_ref()
                    .expect("a live master answers")
                    .as_ref()
                    .unwrap()
                    .data()[0],
                n as u8,
                "lookup {n}"
            );
        }
    }
    let st = s.stats();
    let skipped = st.breaker_open_skips - before.breaker_open_skips;
    let timed_out = first
        .iter()
        .filter(|l| matches!(l.result, Err(StoreError::Timeout)))
        .count() as u64;
    assert!(timed_out >= 3, "{timed_out} timeouts: {st:?}");
    assert_eq!(
        (
            st.remote_lookups - before.remote_lookups,
            st.timeouts - before.timeouts,
            st.redis_errors - before.redis_errors,
            timed_out + skipped,
        ),
        (
            u64::from(N) - skipped,
            timed_out,
            timed_out,
            on_victim as u64
        ),
        "each of the hung master's lookups is a counted timeout (or a breaker skip): {st:?}"
    );
    assert_eq!(st.breakers_open, 1, "{st:?}");

    // The breaker now answers the hung master's keys on the calling thread; the others resume.
    let skips = st.breaker_open_skips;
    for (n, l) in lookups(&s, &ids).iter().enumerate() {
        if holder[n] == victim {
            assert!(
                l.inline && matches!(l.result, Err(StoreError::BreakerOpen)),
                "lookup {n} (inline {}): {:?}",
                l.inline,
                l.result
            );
        } else {
            assert!(
                matches!(l.result, Ok(Some(_))),
                "lookup {n}: {:?}",
                l.result
            );
        }
    }
    assert_eq!(
        s.stats().breaker_open_skips - skips,
        on_victim as u64,
        "{:?}",
        s.stats()
    );

    // Running again: past the breaker's backoff a probe goes through and its keys resume.
    cluster.masters[victim].resume();
    let n = holder.iter().position(|&h| h == victim).unwrap();
    wait_until("the resumed master's keys resume", || {
        matches!(s.get(&ids[n]), Ok(Some(_)))
    });
    assert_eq!(s.stats().breakers_open, 0, "{:?}", s.stats());
}

#[test]
fn handshakes_resume_on_the_live_masters_and_go_full_on_the_dead_one() {
    let mut cluster = RedisCluster::start();
    let host = |tier: usize| {
        let store = Arc::new(
            builder(cluster.url(), tier)
                .op_timeout(OP_TIMEOUT)
                .breaker(3, Duration::from_secs(60))
                .build()
                .unwrap(),
        );
        store.check().unwrap();
        let cache = SessionCache::builder()
            .store(store.clone())
            .build()
            .unwrap();
        let ctx = server_ctx(Proto::Tls12, &cache, false);
        (store, cache, ctx)
    };
    let (a_store, _a_cache, a_ctx) = host(1024);
    let (b_store, b_cache, b_ctx) = host(0);
    let client = client_ctx(Proto::Tls12, false);
    const N: usize = 30;
    let sessions: Vec<_> = (0..N)
        .map(|_| {
            connect(&a_ctx, &client, None, ServerClose::Clean)
                .session
                .expect("a session")
        })
        .collect();
    flush(&a_store);
    let keys: Vec<String> = sessions
        .iter()
        .map(|s| a_store.key_for(&SessionId::new(s.id()).unwrap()))
        .collect();
    let holder = holders(&cluster, &keys);
    let victim = 2;
    let lost: HashMap<usize, bool> = holder
        .iter()
        .enumerate()
        .map(|(n, &h)| (n, h == victim))
        .collect();
    let on_victim = lost.values().filter(|&&l| l).count();
    assert!(
        on_victim > 0 && on_victim < N,
        "{on_victim} of {N} on the victim"
    );
    cluster.masters[victim].kill();

    // Each handshake waits (bounded) for its lookup, which fails on the dead master.
    for (n, s) in sessions.iter().enumerate() {
        let out = connect(&b_ctx, &client, Some(s), ServerClose::Clean);
        assert_eq!(
            out.server_reused, !lost[&n],
            "session {n} (on master {})",
            holder[n]
        );
    }
    let st = b_cache.stats();
    assert_eq!(st.hits, (N - on_victim) as u64, "{st:?}");
    assert_eq!(
        st.store_errors, on_victim as u64,
        "each lost session is a counted store error: {st:?}"
    );
    assert_eq!(b_store.stats().breakers_open, 1, "{:?}", b_store.stats());
}
