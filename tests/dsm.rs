//! Behaviour of the DTLS session manager: RIOT's `dsm` semantics call by call, the hardening
//! (handshake budget and timeout, per-source quota, idle eviction, the second-chance sweeper),
//! a handshake flood, concurrency, and the background sweeper thread.
//!
//! Time is injected everywhere (`base + offset`); only the `Sweeper` thread tests wait, briefly
//! and with bounds.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use openssl::asn1::Asn1Time;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::ssl::{Ssl, SslAcceptor, SslConnector, SslMethod, SslVerifyMode};
use openssl::x509::{X509NameBuilder, X509};
use parking_lot::Mutex;

use openssl_session_cache::dsm::{
    Authenticated, Dsm, DsmConfig, FreeReason, PeerKey, PeerState, SocketPeer, Sweeper,
};
use openssl_session_cache::Error;

use PeerState::{Established as EST, Handshake as HS, NoSpace, None as NONE};

const SEC: Duration = Duration::from_secs(1);

/// Peer `i` on its own IPv4 address.
fn peer(i: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), 5684)
}

/// Port `port` on one shared address.
fn same_host(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)), port)
}

fn auth() -> Authenticated {
    Authenticated::assume_verified()
}

fn new_dsm(config: DsmConfig) -> Dsm<SocketAddr, u32> {
    Dsm::new(config).expect("valid config")
}

type HookLog = Arc<Mutex<Vec<(SocketAddr, u32, FreeReason)>>>;

fn record_hook(dsm: &Dsm<SocketAddr, u32>) -> HookLog {
    let log: HookLog = Arc::default();
    let sink = Arc::clone(&log);
    dsm.set_close_hook(move |k, v, why| sink.lock().push((*k, *v, why)));
    log
}

fn assert_counts(dsm: &Dsm<SocketAddr, u32>) {
    let s = dsm.stats();
    assert_eq!(dsm.available_slots() + dsm.len(), dsm.max_slots());
    assert_eq!(s.handshakes + s.established, dsm.len());
    assert!(s.handshakes <= dsm.config().max_handshakes);
    let freed = s.removed + s.handshake_timeouts + s.idle_evictions + s.evicted;
    assert_eq!(s.stored - freed, dsm.len() as u64, "{s:?}");
}

// ---------------------------------------------------------------------------------------------
// RIOT's behaviour, call by call
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Known {
    No,
    InHandshake,
    InEstablished,
}

struct Row {
    known: Known,
    full: bool,
    new_state: PeerState,
    restore: bool,
    previous: PeerState,
    after: PeerState,
    restored: Option<u32>,
}

#[test]
fn store_follows_riot_for_every_state() {
    #[rustfmt::skip]
    let rows = [
        // unknown peer: takes a free slot, or NoSpace when full
        Row { known: Known::No, full: false, new_state: HS, restore: false, previous: NONE, after: HS, restored: None },
        Row { known: Known::No, full: false, new_state: EST, restore: true, previous: NONE, after: EST, restored: None },
        Row { known: Known::No, full: true, new_state: HS, restore: false, previous: NoSpace, after: NONE, restored: None },
        Row { known: Known::No, full: true, new_state: EST, restore: true, previous: NoSpace, after: NONE, restored: None },
        // None/NoSpace are not states to store: an unknown peer is not stored
        Row { known: Known::No, full: false, new_state: NONE, restore: false, previous: NoSpace, after: NONE, restored: None },
        Row { known: Known::No, full: false, new_state: NoSpace, restore: false, previous: NoSpace, after: NONE, restored: None },
        // a known handshake: the state moves forward to ESTABLISHED only
        Row { known: Known::InHandshake, full: false, new_state: HS, restore: false, previous: HS, after: HS, restored: None },
        Row { known: Known::InHandshake, full: false, new_state: HS, restore: true, previous: HS, after: HS, restored: Some(7) },
        Row { known: Known::InHandshake, full: false, new_state: EST, restore: true, previous: HS, after: EST, restored: Some(7) },
        Row { known: Known::InHandshake, full: true, new_state: EST, restore: false, previous: HS, after: EST, restored: None },
        Row { known: Known::InHandshake, full: false, new_state: NONE, restore: true, previous: HS, after: HS, restored: Some(7) },
        // a known established peer: ESTABLISHED sticks
        Row { known: Known::InEstablished, full: false, new_state: HS, restore: true, previous: EST, after: EST, restored: Some(7) },
        Row { known: Known::InEstablished, full: true, new_state: HS, restore: false, previous: EST, after: EST, restored: None },
        Row { known: Known::InEstablished, full: false, new_state: EST, restore: false, previous: EST, after: EST, restored: None },
        Row { known: Known::InEstablished, full: true, new_state: EST, restore: true, previous: EST, after: EST, restored: Some(7) },
        Row { known: Known::InEstablished, full: false, new_state: NoSpace, restore: false, previous: EST, after: EST, restored: None },
    ];
    let t0 = Instant::now();
    for (i, row) in rows.iter().enumerate() {
        let ctx = format!(
            "row {i}: {:?} full={} {:?}",
            row.known, row.full, row.new_state
        );
        let dsm = new_dsm(DsmConfig::new(3).with_max_handshakes(3));
        let p = peer(1);
        match row.known {
            Known::No => {}
            Known::InHandshake => assert_eq!(dsm.store(&p, HS, 7, false, t0).previous, NONE),
            Known::InEstablished => assert_eq!(dsm.store(&p, EST, 7, false, t0).previous, NONE),
        }
        if row.full {
            for j in 2..=3 {
                let _ = dsm.store(&peer(j), EST, j, false, t0);
            }
            if matches!(row.known, Known::No) {
                let _ = dsm.store(&peer(4), EST, 4, false, t0);
            }
            assert_eq!(dsm.available_slots(), 0, "{ctx}");
        }
        let before = dsm.stats();
        let len_before = dsm.len();
        let out = dsm.store(&p, row.new_state, 99, row.restore, t0 + SEC);
        assert_eq!(out.previous, row.previous, "{ctx}");
        assert_eq!(out.restored, row.restored, "{ctx}");
        assert!(out.evicted.is_none(), "{ctx}");
        assert_eq!(dsm.state(&p), row.after, "{ctx}");
        let after = dsm.stats();
        match row.previous {
            NONE => {
                assert_eq!(dsm.get(&p), Some(99), "{ctx}: a new peer stores its value");
                assert_eq!(dsm.len(), len_before + 1, "{ctx}");
                assert_eq!(after.stored, before.stored + 1, "{ctx}");
            }
            NoSpace => {
                assert_eq!(dsm.get(&p), None, "{ctx}");
                assert_eq!(dsm.len(), len_before, "{ctx}: nothing changes");
                let counted = u64::from(matches!(row.new_state, HS | EST));
                assert_eq!(after.no_space, before.no_space + counted, "{ctx}");
            }
            _ => {
                assert_eq!(dsm.get(&p), Some(7), "{ctx}: a known peer keeps its value");
                assert_eq!(dsm.len(), len_before, "{ctx}");
                assert_eq!(after.stored, before.stored, "{ctx}");
            }
        }
        assert_counts(&dsm);
    }
}

#[test]
fn the_manager_and_sweeper_can_be_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Dsm<SocketAddr, u32>>();
    send_sync::<Dsm<SocketPeer, Arc<Vec<u8>>>>();
    send_sync::<Sweeper>();
}

#[test]
fn states_numbers_match_dsm_state_t() {
    assert_eq!(
        [NoSpace, NONE, HS, EST].map(PeerState::to_riot),
        [-1, 0, 1, 2]
    );
}

#[test]
fn remove_is_idempotent_and_frees_the_slot() {
    let dsm = new_dsm(DsmConfig::new(2));
    let log = record_hook(&dsm);
    let t0 = Instant::now();
    assert_eq!(
        dsm.remove(&peer(1)),
        None,
        "removing an unknown peer changes nothing"
    );
    let _ = dsm.store(&peer(1), EST, 11, false, t0);
    let _ = dsm.store(&peer(2), HS, 22, false, t0);
    assert_eq!(dsm.available_slots(), 0);
    assert_eq!(dsm.remove(&peer(1)), Some(11));
    assert_eq!(dsm.remove(&peer(1)), None);
    assert_eq!(dsm.state(&peer(1)), NONE);
    assert_eq!(dsm.available_slots(), 1);
    assert_eq!(dsm.remove(&peer(2)), Some(22));
    assert_eq!(dsm.remove(&peer(2)), None);
    assert!(dsm.is_empty());
    assert_eq!(dsm.available_slots(), 2);
    assert_eq!(dsm.stats().removed, 2);
    assert!(
        log.lock().is_empty(),
        "the close hook is not called for remove"
    );
    // The freed slots can be taken again.
    assert_eq!(dsm.store(&peer(3), HS, 3, false, t0).previous, NONE);
    assert_counts(&dsm);
}

#[test]
fn available_plus_used_is_max_through_a_lifecycle() {
    let dsm = new_dsm(DsmConfig::new(5).with_max_handshakes(5));
    let t0 = Instant::now();
    assert_eq!(dsm.max_slots(), 5);
    for i in 0..5 {
        assert_eq!(dsm.available_slots(), 5 - i as usize);
        let _ = dsm.store(&peer(i), if i % 2 == 0 { HS } else { EST }, i, false, t0);
        assert_counts(&dsm);
    }
    assert_eq!(dsm.store(&peer(9), EST, 9, false, t0).previous, NoSpace);
    for i in 0..5 {
        let _ = dsm.store(&peer(i), EST, 0, false, t0);
        assert_counts(&dsm);
    }
    assert_eq!(dsm.stats().established, 5);
    for i in (0..5).rev() {
        assert!(dsm.remove(&peer(i)).is_some());
        assert_counts(&dsm);
    }
    assert_eq!(dsm.available_slots(), 5);
}

#[test]
fn least_recently_used_is_among_established_only_with_ties_by_call_order() {
    let dsm = new_dsm(DsmConfig::new(4).with_max_handshakes(2));
    let t0 = Instant::now();
    assert_eq!(dsm.least_recently_used(), None, "all slots free");
    // A handshake that is older than everything is never a candidate.
    let _ = dsm.store(&peer(9), HS, 9, false, t0);
    assert_eq!(dsm.least_recently_used(), None);
    // Two peers used at the same instant: the earlier call is less recent.
    let _ = dsm.store(&peer(1), EST, 1, false, t0 + SEC);
    let _ = dsm.store(&peer(2), EST, 2, false, t0 + SEC);
    assert_eq!(dsm.least_recently_used(), Some(peer(1)));
    // A touch moves peer 1 to the most recent end.
    assert!(dsm.touch(&peer(1), auth(), t0 + SEC));
    assert_eq!(dsm.least_recently_used(), Some(peer(2)));
    // A store (even of HANDSHAKE, which does not downgrade) is a use as well.
    let _ = dsm.store(&peer(2), HS, 0, false, t0 + 2 * SEC);
    assert_eq!(dsm.least_recently_used(), Some(peer(1)));
    // get/state do not count as uses.
    assert_eq!(dsm.get(&peer(1)), Some(1));
    assert_eq!(dsm.state(&peer(1)), EST);
    assert_eq!(dsm.least_recently_used(), Some(peer(1)));
    // The handshake that finishes becomes the most recent established peer.
    let _ = dsm.store(&peer(9), EST, 0, false, t0 + 3 * SEC);
    assert_eq!(dsm.least_recently_used(), Some(peer(1)));
    assert!(dsm.remove(&peer(1)).is_some());
    assert_eq!(dsm.least_recently_used(), Some(peer(2)));
    assert!(dsm.remove(&peer(2)).is_some());
    assert_eq!(dsm.least_recently_used(), Some(peer(9)));
    assert!(dsm.remove(&peer(9)).is_some());
    assert_eq!(dsm.least_recently_used(), None);
}

#[test]
fn least_recently_used_can_be_filtered_by_socket_like_riot() {
    let dsm: Dsm<SocketPeer, ()> = Dsm::new(DsmConfig::new(4)).unwrap();
    let t0 = Instant::now();
    let on = |listener, i| SocketPeer {
        listener,
        addr: peer(i),
    };
    let _ = dsm.store(&on(1, 1), EST, (), false, t0);
    let _ = dsm.store(&on(2, 1), EST, (), false, t0 + SEC);
    let _ = dsm.store(&on(2, 2), EST, (), false, t0 + 2 * SEC);
    assert_eq!(dsm.least_recently_used(), Some(on(1, 1)));
    assert_eq!(
        dsm.least_recently_used_matching(|p| p.listener == 2),
        Some(on(2, 1))
    );
    assert_eq!(dsm.least_recently_used_matching(|p| p.listener == 3), None);
    // Same address on two listeners: two distinct peers, one source.
    assert_eq!(on(1, 1).source(), on(2, 1).source());
    assert_eq!(dsm.state(&on(1, 2)), NONE);
}

#[test]
fn time_running_backwards_is_clamped() {
    let dsm = new_dsm(DsmConfig::new(2));
    let t0 = Instant::now();
    let _ = dsm.store(&peer(1), EST, 1, false, t0 + 10 * SEC);
    // A later call carrying an earlier instant still counts as the more recent use.
    let _ = dsm.store(&peer(2), EST, 2, false, t0);
    assert!(dsm.touch(&peer(1), auth(), t0));
    assert_eq!(dsm.least_recently_used(), Some(peer(2)));
}

// ---------------------------------------------------------------------------------------------
// 0 and 1 slots
// ---------------------------------------------------------------------------------------------

#[test]
fn zero_slots_store_nothing() {
    let dsm = new_dsm(DsmConfig::new(0));
    let t0 = Instant::now();
    assert_eq!(dsm.max_slots(), 0);
    assert_eq!(dsm.available_slots(), 0);
    for state in [HS, EST] {
        let out = dsm.store(&peer(1), state, 1, true, t0);
        assert_eq!(out.previous, NoSpace);
        assert!(out.restored.is_none() && out.evicted.is_none());
    }
    assert_eq!(dsm.state(&peer(1)), NONE);
    assert!(!dsm.touch(&peer(1), auth(), t0));
    assert_eq!(dsm.remove(&peer(1)), None);
    assert_eq!(dsm.least_recently_used(), None);
    assert!(dsm.sweep(t0 + 1000 * SEC).is_empty());
    assert_eq!(dsm.next_deadline(), None);
    assert!(dsm.is_empty());
    let s = dsm.stats();
    assert_eq!((s.stored, s.no_space, s.quota_rejections), (0, 2, 0));
    // Zero slots with the eviction policy on is still zero slots.
    let dsm = new_dsm(DsmConfig::new(0).with_evict_idle_after(Some(Duration::ZERO)));
    assert_eq!(dsm.store(&peer(1), EST, 1, false, t0).previous, NoSpace);
}

#[test]
fn one_slot_holds_one_peer_at_a_time() {
    let dsm = new_dsm(DsmConfig::new(1));
    let t0 = Instant::now();
    assert_eq!(dsm.config().max_handshakes, 1);
    assert_eq!(dsm.store(&peer(1), HS, 1, false, t0).previous, NONE);
    assert_eq!(dsm.store(&peer(2), HS, 2, false, t0).previous, NoSpace);
    assert_eq!(dsm.store(&peer(2), EST, 2, false, t0).previous, NoSpace);
    assert_eq!(dsm.store(&peer(1), EST, 0, false, t0).previous, HS);
    assert_eq!(dsm.least_recently_used(), Some(peer(1)));
    assert_eq!(dsm.store(&peer(2), HS, 2, false, t0).previous, NoSpace);
    assert_eq!(dsm.remove(&peer(1)), Some(1));
    assert_eq!(dsm.store(&peer(2), EST, 2, false, t0).previous, NONE);
    assert_eq!(dsm.least_recently_used(), Some(peer(2)));
    assert_eq!(dsm.stats().no_space, 3);
    assert_counts(&dsm);
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_configs_are_rejected() {
    let bad = [
        DsmConfig::new(4).with_max_handshakes(5),
        DsmConfig::new(4).with_max_per_source(0),
        DsmConfig::new(4).with_handshake_timeout(Duration::ZERO),
        DsmConfig::new(4).with_idle_tick(Duration::ZERO),
        DsmConfig::new(4).with_ipv6_quota_prefix(129),
        DsmConfig::new(0).with_max_handshakes(1),
    ];
    for config in bad {
        match Dsm::<SocketAddr, ()>::new(config.clone()) {
            Err(e @ Error::InvalidSetting { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("dsm"), "{msg}")
            }
            other => panic!("{config:?} gave {other:?}"),
        }
    }
    for config in [
        DsmConfig::default(),
        DsmConfig::new(0),
        DsmConfig::new(4).with_max_handshakes(0),
        DsmConfig::new(4).with_max_per_source(1000),
        DsmConfig::new(4).with_ipv6_quota_prefix(128),
        DsmConfig::new(4).with_handshake_timeout(Duration::MAX),
        DsmConfig::new(4).with_idle_tick(Duration::MAX),
    ] {
        assert!(Dsm::<SocketAddr, ()>::new(config).is_ok());
    }
}

#[test]
fn huge_durations_never_overflow() {
    let config = DsmConfig::new(2)
        .with_handshake_timeout(Duration::MAX)
        .with_idle_tick(Duration::MAX)
        .with_evict_idle_after(Some(Duration::MAX));
    let dsm = new_dsm(config);
    let t0 = Instant::now();
    let _ = dsm.store(&peer(1), HS, 1, false, t0);
    let _ = dsm.store(&peer(2), EST, 2, false, t0);
    assert_eq!(
        dsm.store(&peer(3), EST, 3, false, t0 + SEC).previous,
        NoSpace
    );
    assert!(dsm.sweep(t0 + 1_000_000 * SEC).is_empty());
    assert_eq!(dsm.next_deadline(), None, "nothing is ever due");
}

// ---------------------------------------------------------------------------------------------
// Handshake budget and per-source quota
// ---------------------------------------------------------------------------------------------

#[test]
fn handshake_budget_keeps_room_for_established_peers() {
    let dsm = new_dsm(
        DsmConfig::new(4)
            .with_max_handshakes(2)
            .with_evict_idle_after(Some(Duration::ZERO)),
    );
    let log = record_hook(&dsm);
    let t0 = Instant::now();
    assert_eq!(dsm.store(&peer(1), HS, 1, false, t0).previous, NONE);
    assert_eq!(dsm.store(&peer(2), HS, 2, false, t0).previous, NONE);
    assert_eq!(dsm.store(&peer(3), HS, 3, false, t0).previous, NoSpace);
    assert_eq!(dsm.stats().no_space, 1);
    // Slots outside the budget still take established peers.
    assert_eq!(dsm.store(&peer(4), EST, 4, false, t0).previous, NONE);
    // A finished handshake leaves the budget, making room for another.
    assert_eq!(dsm.store(&peer(1), EST, 0, false, t0).previous, HS);
    assert_eq!(dsm.store(&peer(3), HS, 3, false, t0).previous, NONE);
    let s = dsm.stats();
    assert_eq!((s.handshakes, s.established), (2, 2));
    // Full table, budget spent, idle established peers and eviction on: a new handshake still
    // never takes an established peer's slot.
    assert_eq!(
        dsm.store(&peer(5), HS, 5, false, t0 + SEC).previous,
        NoSpace
    );
    assert_eq!(dsm.stats().established, 2);
    assert!(log.lock().is_empty());
    // ... but an established newcomer may evict the idle one (the policy is on).
    let out = dsm.store(&peer(5), EST, 5, false, t0 + SEC);
    assert_eq!(out.previous, NONE);
    assert_eq!(out.evicted, Some((peer(4), 4)));
    assert_counts(&dsm);
}

#[test]
fn zero_handshake_budget_admits_only_established_peers() {
    let dsm = new_dsm(DsmConfig::new(2).with_max_handshakes(0));
    let t0 = Instant::now();
    assert_eq!(dsm.store(&peer(1), HS, 1, false, t0).previous, NoSpace);
    assert_eq!(dsm.store(&peer(1), EST, 1, false, t0).previous, NONE);
    assert_eq!(dsm.store(&peer(1), HS, 1, false, t0).previous, EST);
}

#[test]
fn per_source_quota_limits_one_host() {
    let dsm = new_dsm(DsmConfig::new(8).with_max_per_source(2));
    let t0 = Instant::now();
    assert_eq!(dsm.store(&same_host(1), HS, 1, false, t0).previous, NONE);
    assert_eq!(dsm.store(&same_host(2), EST, 2, false, t0).previous, NONE);
    assert_eq!(
        dsm.store(&same_host(3), EST, 3, false, t0).previous,
        NoSpace
    );
    assert_eq!(dsm.store(&same_host(3), HS, 3, false, t0).previous, NoSpace);
    let s = dsm.stats();
    assert_eq!((s.quota_rejections, s.no_space), (2, 0));
    // Known peers of that host are still served.
    assert_eq!(dsm.store(&same_host(1), EST, 0, true, t0).restored, Some(1));
    // Other hosts are not affected.
    assert_eq!(dsm.store(&peer(1), EST, 1, false, t0).previous, NONE);
    // Freeing one of the host's slots gives it room again.
    assert_eq!(dsm.remove(&same_host(2)), Some(2));
    assert_eq!(dsm.store(&same_host(3), EST, 3, false, t0).previous, NONE);
    assert_counts(&dsm);
}

#[test]
fn quota_groups_ipv6_prefixes_and_mapped_ipv4() {
    let v6 = |s: &str| SocketAddr::new(s.parse().unwrap(), 5684);
    let dsm = new_dsm(DsmConfig::new(8).with_max_per_source(1));
    let t0 = Instant::now();
    assert_eq!(
        dsm.store(&v6("2001:db8:0:1::1"), EST, 1, false, t0)
            .previous,
        NONE
    );
    // Another address in the same /64 is the same source.
    assert_eq!(
        dsm.store(&v6("2001:db8:0:1::2"), EST, 2, false, t0)
            .previous,
        NoSpace
    );
    assert_eq!(
        dsm.store(&v6("2001:db8:0:2::1"), EST, 3, false, t0)
            .previous,
        NONE
    );
    // An IPv4-mapped address counts as the IPv4 address.
    let v4 = SocketAddr::new("192.0.2.1".parse().unwrap(), 1);
    assert_eq!(dsm.store(&v4, EST, 4, false, t0).previous, NONE);
    assert_eq!(
        dsm.store(&v6("::ffff:192.0.2.1"), EST, 5, false, t0)
            .previous,
        NoSpace
    );
    assert_eq!(dsm.stats().quota_rejections, 2);

    // With /128 each IPv6 address is its own source.
    let dsm = new_dsm(
        DsmConfig::new(8)
            .with_max_per_source(1)
            .with_ipv6_quota_prefix(128),
    );
    assert_eq!(
        dsm.store(&v6("2001:db8:0:1::1"), EST, 1, false, t0)
            .previous,
        NONE
    );
    assert_eq!(
        dsm.store(&v6("2001:db8:0:1::2"), EST, 2, false, t0)
            .previous,
        NONE
    );
}

// ---------------------------------------------------------------------------------------------
// Eviction of idle established peers when full
// ---------------------------------------------------------------------------------------------

#[test]
fn evict_idle_after_evicts_the_lru_idle_peer_and_calls_the_hook() {
    let limit = 30 * SEC;
    let dsm = new_dsm(DsmConfig::new(2).with_evict_idle_after(Some(limit)));
    let log = record_hook(&dsm);
    let t0 = Instant::now();
    let _ = dsm.store(&peer(1), EST, 1, false, t0);
    let _ = dsm.store(&peer(2), EST, 2, false, t0 + 10 * SEC);
    // Peer 1 idle for 20 s only: no room.
    assert_eq!(
        dsm.store(&peer(3), EST, 3, false, t0 + 20 * SEC).previous,
        NoSpace
    );
    assert_eq!(dsm.stats().no_space, 1);
    // Idle for exactly the limit: evicted.
    let out = dsm.store(&peer(3), EST, 3, false, t0 + limit);
    assert_eq!(out.previous, NONE);
    assert_eq!(out.evicted, Some((peer(1), 1)));
    assert_eq!(*log.lock(), vec![(peer(1), 1, FreeReason::Evicted)]);
    assert_eq!(dsm.state(&peer(1)), NONE);
    // A touch protects peer 2; peer 3 (used at 30 s) is now the LRU and gets evicted at 60 s.
    assert!(dsm.touch(&peer(2), auth(), t0 + 35 * SEC));
    let out = dsm.store(&peer(4), HS, 4, false, t0 + 60 * SEC);
    assert_eq!(out.evicted, Some((peer(3), 3)));
    assert_eq!(dsm.state(&peer(2)), EST);
    assert_eq!(log.lock().len(), 2);
    let s = dsm.stats();
    assert_eq!((s.evicted, s.idle_evictions, s.no_space), (2, 0, 1));
    assert_counts(&dsm);
}

#[test]
fn without_the_policy_a_full_table_never_evicts() {
    let dsm = new_dsm(DsmConfig::new(1));
    let log = record_hook(&dsm);
    let t0 = Instant::now();
    let _ = dsm.store(&peer(1), EST, 1, false, t0);
    for i in 2..50 {
        let out = dsm.store(&peer(i), EST, i, false, t0 + 1_000_000 * SEC);
        assert_eq!(out.previous, NoSpace);
        assert!(out.evicted.is_none());
    }
    assert_eq!(dsm.state(&peer(1)), EST);
    assert!(log.lock().is_empty());
}

// ---------------------------------------------------------------------------------------------
// The sweeper (second-chance clock) and the handshake timeout
// ---------------------------------------------------------------------------------------------

fn sweep_config() -> DsmConfig {
    DsmConfig::new(8)
        .with_max_handshakes(4)
        .with_idle_tick(60 * SEC)
        .with_handshake_timeout(10 * SEC)
}

#[test]
fn an_idle_established_peer_is_freed_after_two_ticks() {
    let dsm = new_dsm(sweep_config());
    let log = record_hook(&dsm);
    let t0 = Instant::now();
    let _ = dsm.store(&peer(1), EST, 1, false, t0);
    assert_eq!(dsm.next_deadline(), Some(t0 + 60 * SEC));
    assert!(dsm.sweep(t0 + 59 * SEC).is_empty(), "no tick due yet");
    assert!(
        dsm.sweep(t0 + 60 * SEC).is_empty(),
        "first pass clears the used bit"
    );
    assert_eq!(dsm.next_deadline(), Some(t0 + 120 * SEC));
    assert!(dsm.sweep(t0 + 119 * SEC).is_empty());
    assert_eq!(
        dsm.sweep(t0 + 120 * SEC),
        vec![(peer(1), 1, FreeReason::Idle)],
        "second pass without use frees it"
    );
    assert_eq!(*log.lock(), vec![(peer(1), 1, FreeReason::Idle)]);
    assert_eq!(dsm.stats().idle_evictions, 1);
    assert_eq!(dsm.next_deadline(), None, "nothing left to do");
    assert!(dsm.sweep(t0 + 1000 * SEC).is_empty());
    assert_eq!(log.lock().len(), 1, "the hook ran exactly once");
}

#[test]
fn a_late_sweep_runs_one_pass_and_restarts_the_tick() {
    let dsm = new_dsm(sweep_config());
    let t0 = Instant::now();
    let _ = dsm.store(&peer(1), EST, 1, false, t0);
    // Far later than several ticks: still only one pass, which only clears the bit.
    assert!(dsm.sweep(t0 + 500 * SEC).is_empty());
    assert_eq!(dsm.next_deadline(), Some(t0 + 560 * SEC));
    assert!(dsm.sweep(t0 + 559 * SEC).is_empty());
    assert_eq!(dsm.sweep(t0 + 560 * SEC).len(), 1);
}

#[test]
fn a_peer_in_use_is_never_freed() {
    let dsm = new_dsm(sweep_config());
    let log = record_hook(&dsm);
    let t0 = Instant::now();
    let _ = dsm.store(&peer(1), EST, 1, false, t0); // touched just before each pass
    let _ = dsm.store(&peer(2), EST, 2, false, t0); // touched just after each pass
    let _ = dsm.store(&peer(3), EST, 3, false, t0); // stored (a use) once per tick
    for tick in 1..=100u32 {
        let pass = t0 + 60 * SEC * tick;
        assert!(dsm.touch(&peer(1), auth(), pass - SEC));
        let _ = dsm.store(&peer(3), HS, 0, false, pass - 30 * SEC);
        assert!(dsm.sweep(pass).is_empty(), "tick {tick}");
        assert!(dsm.touch(&peer(2), auth(), pass + SEC));
    }
    assert_eq!(dsm.len(), 3);
    assert!(log.lock().is_empty());
    // When they all stop, each is freed once: those last used before the final pass at the next
    // pass, the one used after it at the pass after.
    let end = t0 + 60 * SEC * 100;
    let first: HashSet<_> = dsm.sweep(end + 60 * SEC).into_iter().map(|f| f.0).collect();
    assert_eq!(first, HashSet::from([peer(1), peer(3)]));
    let second: HashSet<_> = dsm
        .sweep(end + 120 * SEC)
        .into_iter()
        .map(|f| f.0)
        .collect();
    assert_eq!(second, HashSet::from([peer(2)]));
    assert_eq!(log.lock().len(), 3);
}

#[test]
fn the_hook_is_called_exactly_once_per_freed_peer() {
    let dsm = new_dsm(DsmConfig::new(64).with_max_handshakes(32));
    let calls: Arc<Mutex<HashMap<SocketAddr, usize>>> = Arc::default();
    let sink = Arc::clone(&calls);
    dsm.set_close_hook(move |k, _, _| *sink.lock().entry(*k).or_default() += 1);
    let t0 = Instant::now();
    let tick = dsm.config().idle_tick;
    let mut returned = Vec::new();
    for i in 0..64u32 {
        let state = if i % 3 == 0 { HS } else { EST };
        let _ = dsm.store(&peer(i), state, i, false, t0);
    }
    for round in 1..=5u32 {
        let now = t0 + tick * round;
        // Keep every fourth peer busy.
        for i in (0..64).step_by(4) {
            let _ = dsm.touch(&peer(i), auth(), now);
        }
        returned.extend(dsm.sweep(now));
    }
    let calls = calls.lock();
    assert_eq!(calls.len(), returned.len());
    assert!(calls.values().all(|&n| n == 1));
    for (k, v, _) in &returned {
        assert_eq!(peer(*v), *k, "the hook and sweep see the peer's own value");
        assert!(calls.contains_key(k));
    }
    // Busy peers survive (an authenticated touch also restarts a handshake's timeout); idle
    // established peers and stuck handshakes are gone.
    for i in 0..64u32 {
        let expect = match (i % 4 == 0, i % 3 == 0) {
            (true, true) => HS,
            (true, false) => EST,
            (false, _) => NONE,
        };
        assert_eq!(dsm.state(&peer(i)), expect, "peer {i}");
    }
    let s = dsm.stats();
    assert_eq!(
        s.handshake_timeouts + s.idle_evictions,
        returned.len() as u64
    );
    assert_eq!(dsm.len() + returned.len(), 64);
}

#[test]
fn a_stuck_handshake_times_out() {
    let dsm = new_dsm(sweep_config());
    let log = record_hook(&dsm);
    let t0 = Instant::now();
    let _ = dsm.store(&peer(1), HS, 1, false, t0);
    let _ = dsm.store(&peer(2), HS, 2, false, t0 + SEC);
    assert_eq!(dsm.next_deadline(), Some(t0 + 10 * SEC));
    assert!(dsm
        .sweep(t0 + 10 * SEC - Duration::from_millis(1))
        .is_empty());
    assert_eq!(
        dsm.sweep(t0 + 10 * SEC),
        vec![(peer(1), 1, FreeReason::HandshakeTimeout)]
    );
    assert_eq!(dsm.next_deadline(), Some(t0 + 11 * SEC));
    // A store or a touch is a use that restarts the timeout.
    let _ = dsm.store(&peer(2), HS, 0, false, t0 + 11 * SEC);
    assert!(dsm.touch(&peer(2), auth(), t0 + 12 * SEC));
    assert!(dsm.sweep(t0 + 21 * SEC).is_empty());
    assert_eq!(dsm.sweep(t0 + 22 * SEC).len(), 1);
    assert_eq!(log.lock().len(), 2);
    assert_eq!(dsm.stats().handshake_timeouts, 2);
    assert!(dsm.is_empty());
}

#[test]
fn an_expired_handshake_is_reclaimed_by_a_new_peer() {
    let dsm = new_dsm(DsmConfig::new(4).with_max_handshakes(1));
    let log = record_hook(&dsm);
    let t0 = Instant::now();
    let _ = dsm.store(&peer(1), HS, 1, false, t0);
    assert_eq!(
        dsm.store(&peer(2), HS, 2, false, t0 + 9 * SEC).previous,
        NoSpace
    );
    let out = dsm.store(&peer(2), HS, 2, false, t0 + 10 * SEC);
    assert_eq!(out.previous, NONE);
    assert_eq!(out.evicted, Some((peer(1), 1)));
    assert_eq!(
        *log.lock(),
        vec![(peer(1), 1, FreeReason::HandshakeTimeout)]
    );
    let s = dsm.stats();
    assert_eq!((s.handshake_timeouts, s.no_space, s.handshakes), (1, 1, 1));
    // When the table (not the budget) is full, an expired handshake is also reclaimed, in
    // preference to evicting anyone established.
    let dsm = new_dsm(
        DsmConfig::new(2)
            .with_max_handshakes(1)
            .with_evict_idle_after(Some(Duration::ZERO)),
    );
    let _ = dsm.store(&peer(1), EST, 1, false, t0);
    let _ = dsm.store(&peer(2), HS, 2, false, t0);
    let out = dsm.store(&peer(3), EST, 3, false, t0 + 10 * SEC);
    assert_eq!(out.evicted, Some((peer(2), 2)));
    assert_eq!(dsm.state(&peer(1)), EST);
}

#[test]
fn next_deadline_is_the_earliest_due_work() {
    let dsm = new_dsm(sweep_config());
    let t0 = Instant::now();
    assert_eq!(dsm.next_deadline(), None);
    let _ = dsm.store(&peer(2), HS, 2, false, t0);
    assert_eq!(
        dsm.next_deadline(),
        Some(t0 + 10 * SEC),
        "no established peer: no tick"
    );
    assert_eq!(dsm.sweep(t0 + 10 * SEC).len(), 1);
    assert_eq!(dsm.next_deadline(), None);
    let _ = dsm.store(&peer(1), EST, 1, false, t0 + 20 * SEC);
    assert_eq!(
        dsm.next_deadline(),
        Some(t0 + 60 * SEC),
        "ticks count from the first time seen"
    );
    let _ = dsm.store(&peer(3), HS, 3, false, t0 + 45 * SEC);
    assert_eq!(dsm.next_deadline(), Some(t0 + 55 * SEC));
    let _ = dsm.store(&peer(3), EST, 3, false, t0 + 46 * SEC);
    assert_eq!(dsm.next_deadline(), Some(t0 + 60 * SEC));
}

// ---------------------------------------------------------------------------------------------
// Flood
// ---------------------------------------------------------------------------------------------

#[test]
fn a_handshake_flood_cannot_displace_established_peers_or_exceed_budgets() {
    // 40 established + 10 handshakes fill the table while the budget (16) still has room, so
    // the eviction policy is consulted too, and must find no idle legitimate peer.
    let config = DsmConfig::new(50)
        .with_max_handshakes(16)
        .with_max_per_source(2)
        .with_evict_idle_after(Some(120 * SEC));
    let dsm = new_dsm(config);
    let log = record_hook(&dsm);
    let t0 = Instant::now();
    let legit: Vec<SocketAddr> = (0..40).map(|i| peer(1_000_000 + i)).collect();
    for (i, p) in legit.iter().enumerate() {
        assert_eq!(dsm.store(p, EST, i as u32, false, t0).previous, NONE);
    }
    let mut admitted = 0u64;
    let mut now = t0;
    for i in 0..20_000u32 {
        now += Duration::from_millis(5);
        // Half the flood from many addresses, half from a handful of hosts on many ports.
        let p = if i % 2 == 0 {
            peer(i)
        } else {
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(203, 0, 113, (i % 3) as u8)),
                i as u16,
            )
        };
        let out = dsm.store(&p, HS, i, false, now);
        if out.previous == NONE {
            admitted += 1;
        }
        if let Some((k, _)) = &out.evicted {
            assert!(!legit.contains(k), "a flood peer evicted a legitimate one");
        }
        let s = dsm.stats();
        assert!(s.handshakes <= 10);
        assert_eq!(s.established, 40);
        if i % 1000 == 0 {
            // The legitimate peers talk now and then, and the owner sweeps.
            for p in &legit {
                assert!(dsm.touch(p, auth(), now));
            }
            for (k, _, why) in dsm.sweep(now) {
                assert!(!legit.contains(&k));
                assert_eq!(why, FreeReason::HandshakeTimeout);
            }
        }
    }
    for p in &legit {
        assert_eq!(dsm.state(p), EST);
    }
    let s = dsm.stats();
    assert_eq!(s.established, 40);
    assert!(
        admitted > 16,
        "timed-out handshakes are recycled: {admitted}"
    );
    assert_eq!(s.no_space + s.quota_rejections + admitted, 20_000);
    assert_eq!(s.evicted, 0);
    assert!(s.quota_rejections > 0);
    assert!(
        log.lock().iter().all(|(k, _, _)| !legit.contains(k)),
        "only flood peers were closed"
    );
    // Exactly the 40 legitimate peers plus the handshakes still inside their budget.
    assert_eq!(dsm.len(), 40 + s.handshakes);
    assert!(s.handshakes <= 10);
    assert_counts(&dsm);
}

// ---------------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_store_touch_remove_keep_the_invariants() {
    const THREADS: u32 = 4;
    const OPS: u32 = 5_000;
    let config = DsmConfig::new(16)
        .with_max_handshakes(6)
        .with_max_per_source(3)
        .with_handshake_timeout(Duration::from_millis(2))
        .with_idle_tick(Duration::from_millis(3))
        .with_evict_idle_after(Some(Duration::from_millis(1)));
    let dsm = new_dsm(config);
    let hooked = Arc::new(AtomicU64::new(0));
    let sink = Arc::clone(&hooked);
    dsm.set_close_hook(move |_, _, _| {
        sink.fetch_add(1, Ordering::Relaxed);
    });
    let stored = AtomicU64::new(0);
    let removed = AtomicU64::new(0);
    let swept = AtomicU64::new(0);
    let evicted = AtomicU64::new(0);
    thread::scope(|s| {
        for t in 0..THREADS {
            let (dsm, stored, removed, swept, evicted) =
                (&dsm, &stored, &removed, &swept, &evicted);
            s.spawn(move || {
                // A tiny LCG per thread: deterministic op mix without shared state.
                let mut x = u64::from(t).wrapping_mul(0x9E37_79B9_7F4A_7C15) + 1;
                let mut next = move || {
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    (x >> 33) as u32
                };
                for _ in 0..OPS {
                    let r = next();
                    // 40 peers on 8 hosts, shared by all threads.
                    let k = r % 40;
                    let p = SocketAddr::new(
                        IpAddr::V4(Ipv4Addr::new(10, 9, 0, (k % 8) as u8)),
                        1000 + k as u16,
                    );
                    let now = Instant::now();
                    match (r >> 8) % 8 {
                        0..=2 => {
                            let state = if (r >> 12) % 2 == 0 { HS } else { EST };
                            let out = dsm.store(&p, state, k, r % 3 == 0, now);
                            if out.previous == NONE {
                                stored.fetch_add(1, Ordering::Relaxed);
                            }
                            if out.evicted.is_some() {
                                evicted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        3 | 4 => {
                            let _ = dsm.touch(&p, auth(), now);
                        }
                        5 => {
                            if dsm.remove(&p).is_some() {
                                removed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        6 => {
                            swept.fetch_add(dsm.sweep(now).len() as u64, Ordering::Relaxed);
                        }
                        _ => {
                            let _ = dsm.least_recently_used();
                            let _ = dsm.get(&p);
                        }
                    }
                    let st = dsm.stats();
                    assert!(st.handshakes <= 6, "{st:?}");
                    assert!(st.handshakes + st.established <= 16, "{st:?}");
                }
            });
        }
    });
    assert_counts(&dsm);
    let s = dsm.stats();
    assert_eq!(s.stored, stored.into_inner());
    assert_eq!(s.removed, removed.into_inner());
    let swept = swept.into_inner();
    let evicted = evicted.into_inner();
    assert_eq!(
        s.handshake_timeouts + s.idle_evictions + s.evicted,
        swept + evicted
    );
    assert_eq!(hooked.load(Ordering::Relaxed), swept + evicted);
    assert!(s.stored > 0 && s.removed > 0);
}

// ---------------------------------------------------------------------------------------------
// The background sweeper thread
// ---------------------------------------------------------------------------------------------

#[test]
fn the_sweeper_thread_frees_idle_peers_and_stops_on_drop() {
    let config = DsmConfig::new(4)
        .with_idle_tick(Duration::from_millis(20))
        .with_handshake_timeout(Duration::from_millis(20));
    let dsm = Arc::new(new_dsm(config));
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    dsm.set_close_hook(move |k, _, why| {
        let _ = tx.lock().send((*k, why));
    });
    let start = Instant::now();
    let _ = dsm.store(&peer(1), EST, 1, false, start);
    let _ = dsm.store(&peer(2), HS, 2, false, start);
    let sweeper = Sweeper::start(Arc::clone(&dsm), Duration::from_millis(10)).unwrap();
    let mut freed = HashMap::new();
    while freed.len() < 2 {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok((k, why)) => {
                freed.insert(k, why);
            }
            Err(e) => panic!("sweeper did not free the peers in time: {e:?} {freed:?}"),
        }
    }
    assert_eq!(freed[&peer(1)], FreeReason::Idle);
    assert_eq!(freed[&peer(2)], FreeReason::HandshakeTimeout);
    assert!(
        start.elapsed() >= Duration::from_millis(20),
        "not before one tick"
    );
    assert!(dsm.is_empty());
    assert_eq!(Arc::strong_count(&dsm), 2, "the thread holds the manager");
    drop(sweeper);
    assert_eq!(
        Arc::strong_count(&dsm),
        1,
        "drop joined the thread, which let go of the manager"
    );
}

/// Runs `f` on a thread of its own; fails if it has not returned after 10 s.
fn returns<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what} had not returned after 10 s"))
}

#[test]
fn a_sweeper_with_a_long_tick_still_stops_promptly() {
    let dsm = Arc::new(new_dsm(DsmConfig::new(1)));
    let sweeper = Sweeper::start(Arc::clone(&dsm), Duration::from_secs(3600)).unwrap();
    assert_eq!(Arc::strong_count(&dsm), 2, "the thread holds the manager");
    assert!(format!("{sweeper:?}").contains("running: true"));
    // Whether the thread is in its hour-long wait yet or not, stop does not wait for the tick.
    returns(
        "stop, with the sweeper's next tick an hour away",
        move || sweeper.stop(),
    );
    assert_eq!(
        Arc::strong_count(&dsm),
        1,
        "stop joined the thread, which let go of the manager"
    );
    assert!(Sweeper::start(dsm, Duration::ZERO).is_err());
}

// ---------------------------------------------------------------------------------------------
// Authenticated
// ---------------------------------------------------------------------------------------------

fn self_signed() -> (PKey<openssl::pkey::Private>, X509) {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", "localhost").unwrap();
    let name = name.build();
    let mut cert = X509::builder().unwrap();
    cert.set_version(2).unwrap();
    cert.set_subject_name(&name).unwrap();
    cert.set_issuer_name(&name).unwrap();
    cert.set_pubkey(&key).unwrap();
    cert.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    cert.set_not_after(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    cert.sign(&key, MessageDigest::sha256()).unwrap();
    (key, cert.build())
}

#[test]
fn authenticated_comes_only_from_a_finished_handshake() {
    // Before any handshake: no proof.
    let ctx = openssl::ssl::SslContext::builder(SslMethod::dtls())
        .unwrap()
        .build();
    let fresh = Ssl::new(&ctx).unwrap();
    assert!(Authenticated::from_ssl(&fresh).is_none());

    // After a finished (TLS, over a socket pair) handshake: a proof.
    let (key, cert) = self_signed();
    let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
    acceptor.set_private_key(&key).unwrap();
    acceptor.set_certificate(&cert).unwrap();
    let acceptor = acceptor.build();
    let mut connector = SslConnector::builder(SslMethod::tls()).unwrap();
    connector.set_verify(SslVerifyMode::NONE);
    let connector = connector.build();
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    let server = thread::spawn(move || {
        let stream = acceptor.accept(a).unwrap();
        Authenticated::from_ssl(stream.ssl()).is_some()
    });
    let client = connector.connect("localhost", b).unwrap();
    assert!(Authenticated::from_ssl(client.ssl()).is_some());
    assert!(server.join().unwrap());

    // The proof refreshes a stored peer; an unknown peer is not refreshed.
    let dsm = new_dsm(DsmConfig::new(1));
    let t0 = Instant::now();
    let _ = dsm.store(&peer(1), EST, 1, false, t0);
    let proof = Authenticated::from_ssl(client.ssl()).unwrap();
    assert!(dsm.touch(&peer(1), proof, t0));
    assert!(!dsm.touch(&peer(2), auth(), t0));
}

#[test]
fn replace_value_swaps_without_a_use() {
    let dsm = new_dsm(DsmConfig::new(2));
    let t0 = Instant::now();
    assert_eq!(dsm.replace_value(&peer(1), 5), Err(5));
    let _ = dsm.store(&peer(1), EST, 1, false, t0);
    let _ = dsm.store(&peer(2), EST, 2, false, t0);
    assert_eq!(dsm.replace_value(&peer(1), 10), Ok(1));
    assert_eq!(dsm.get(&peer(1)), Some(10));
    assert_eq!(dsm.least_recently_used(), Some(peer(1)), "not a use");
    let dbg = format!("{dsm:?}");
    assert!(dbg.contains("established: 2"), "{dbg}");
}
