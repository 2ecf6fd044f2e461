//! Model test of the DTLS session manager: seeded random operations run against both [`Dsm`]
//! and a naive reference (a `Vec` of peers scanned on every call, recency by a sequence number),
//! and every observable is compared after every operation.
//!
//! What is compared after each operation (for every key of the pool):
//! - the outcome of the operation itself (`store`'s previous state, restored value and evicted
//!   peer; `touch`'s and `remove`'s results; `sweep`'s freed peers, in order, with reasons);
//! - `state` and `get` of every key, `len`, `is_empty`, `available_slots` (and that
//!   `available + len == max`), `least_recently_used`, a filtered `least_recently_used_matching`,
//!   `next_deadline`, every field of `stats`;
//! - the close hook's calls (exactly the peers the operation freed by sweep or eviction, in order);
//! - the budgets: handshakes <= `max_handshakes`, stored peers <= `max_slots`, per quota group
//!   <= `max_per_source` (checked on the reference, whose states equal the manager's).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use openssl_session_cache::dsm::{Authenticated, Dsm, DsmConfig, FreeReason, PeerState};

const SEC: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
struct RefPeer {
    key: SocketAddr,
    value: u32,
    state: PeerState,
    last_used: Instant,
    seq: u64,
    used: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct RefStats {
    stored: u64,
    removed: u64,
    no_space: u64,
    handshake_timeouts: u64,
    idle_evictions: u64,
    quota_rejections: u64,
    evicted: u64,
}

/// The rules, written as plainly as possible.
struct Reference {
    config: DsmConfig,
    peers: Vec<RefPeer>,
    seq: u64,
    latest: Option<Instant>,
    next_tick: Option<Instant>,
    stats: RefStats,
}

type Freed = Vec<(SocketAddr, u32, FreeReason)>;

impl Reference {
    fn new(config: DsmConfig) -> Self {
        Self {
            config,
            peers: Vec::new(),
            seq: 0,
            latest: None,
            next_tick: None,
            stats: RefStats::default(),
        }
    }

    fn observe(&mut self, now: Instant) -> Instant {
        let now = match self.latest {
            None => {
                self.next_tick = now.checked_add(self.config.idle_tick);
                now
            }
            Some(latest) if now < latest => latest,
            Some(_) => now,
        };
        self.latest = Some(now);
        now
    }

    /// The quota group: canonical IPv4, or IPv6 with bits past the prefix zeroed, bit by bit.
    fn group(&self, key: &SocketAddr) -> IpAddr {
        match key.ip() {
            IpAddr::V4(v4) => IpAddr::V4(v4),
            IpAddr::V6(v6) => {
                if let Some(v4) = v6.to_ipv4_mapped() {
                    return IpAddr::V4(v4);
                }
                let mut octets = v6.octets();
                for bit in 0..128usize {
                    if bit >= usize::from(self.config.ipv6_quota_prefix) {
                        octets[bit / 8] &= !(0x80u8 >> (bit % 8));
                    }
                }
                IpAddr::V6(octets.into())
            }
        }
    }

    fn find(&self, key: &SocketAddr) -> Option<usize> {
        self.peers.iter().position(|p| p.key == *key)
    }

    fn lru_in(&self, state: PeerState) -> Option<usize> {
        (0..self.peers.len())
            .filter(|&i| self.peers[i].state == state)
            .min_by_key(|&i| self.peers[i].seq)
    }

    fn use_peer(&mut self, i: usize, now: Instant) {
        self.seq += 1;
        let p = &mut self.peers[i];
        p.last_used = now;
        p.seq = self.seq;
        p.used = true;
    }

    fn hs_expired(&self, i: usize, now: Instant) -> bool {
        now.saturating_duration_since(self.peers[i].last_used) >= self.config.handshake_timeout
    }

    fn count(&self, state: PeerState) -> usize {
        self.peers.iter().filter(|p| p.state == state).count()
    }

    fn take(&mut self, i: usize, why: FreeReason) -> (SocketAddr, u32, FreeReason) {
        let p = self.peers.remove(i);
        (p.key, p.value, why)
    }

    fn store(
        &mut self,
        key: SocketAddr,
        new_state: PeerState,
        value: u32,
        restore: bool,
        now: Instant,
    ) -> (
        PeerState,
        Option<u32>,
        Option<(SocketAddr, u32, FreeReason)>,
    ) {
        let now = self.observe(now);
        if let Some(i) = self.find(&key) {
            let previous = self.peers[i].state;
            if previous == PeerState::Handshake && new_state == PeerState::Established {
                self.peers[i].state = PeerState::Established;
            }
            self.use_peer(i, now);
            return (previous, restore.then_some(self.peers[i].value), None);
        }
        if !matches!(new_state, PeerState::Handshake | PeerState::Established) {
            return (PeerState::NoSpace, None, None);
        }
        let g = self.group(&key);
        let same_source = self
            .peers
            .iter()
            .filter(|p| self.group(&p.key) == g)
            .count();
        if same_source >= self.config.max_per_source {
            self.stats.quota_rejections += 1;
            return (PeerState::NoSpace, None, None);
        }
        let hs = new_state == PeerState::Handshake;
        let full = |r: &Self| r.peers.len() >= r.config.max_slots;
        let budget_spent = |r: &Self| r.count(PeerState::Handshake) >= r.config.max_handshakes;
        let mut freed = None;
        if full(self) || (hs && budget_spent(self)) {
            if let Some(i) = self.lru_in(PeerState::Handshake) {
                if self.hs_expired(i, now) {
                    self.stats.handshake_timeouts += 1;
                    freed = Some(self.take(i, FreeReason::HandshakeTimeout));
                }
            }
        }
        if hs && budget_spent(self) {
            self.stats.no_space += 1;
            return (PeerState::NoSpace, None, None);
        }
        if full(self) {
            let victim = self.lru_in(PeerState::Established).filter(|&i| {
                self.config.evict_idle_after.is_some_and(|limit| {
                    now.saturating_duration_since(self.peers[i].last_used) >= limit
                })
            });
            match victim {
                Some(i) => {
                    self.stats.evicted += 1;
                    freed = Some(self.take(i, FreeReason::Evicted));
                }
                None => {
                    self.stats.no_space += 1;
                    return (PeerState::NoSpace, None, None);
                }
            }
        }
        self.seq += 1;
        self.peers.push(RefPeer {
            key,
            value,
            state: new_state,
            last_used: now,
            seq: self.seq,
            used: true,
        });
        self.stats.stored += 1;
        (PeerState::None, None, freed)
    }

    fn touch(&mut self, key: &SocketAddr, now: Instant) -> bool {
        let now = self.observe(now);
        match self.find(key) {
            Some(i) => {
                self.use_peer(i, now);
                true
            }
            None => false,
        }
    }

    fn remove(&mut self, key: &SocketAddr) -> Option<u32> {
        let i = self.find(key)?;
        self.stats.removed += 1;
        Some(self.peers.remove(i).value)
    }

    fn sweep(&mut self, now: Instant) -> Freed {
        let now = self.observe(now);
        let mut freed = Vec::new();
        let mut expired: Vec<RefPeer> = self
            .peers
            .iter()
            .filter(|p| {
                p.state == PeerState::Handshake
                    && now.saturating_duration_since(p.last_used) >= self.config.handshake_timeout
            })
            .cloned()
            .collect();
        expired.sort_by_key(|p| p.seq);
        for p in expired {
            self.stats.handshake_timeouts += 1;
            let i = self.find(&p.key).unwrap();
            freed.push(self.take(i, FreeReason::HandshakeTimeout));
        }
        if self.next_tick.is_some_and(|t| now >= t) {
            self.next_tick = now.checked_add(self.config.idle_tick);
            let mut est: Vec<(u64, SocketAddr)> = self
                .peers
                .iter()
                .filter(|p| p.state == PeerState::Established)
                .map(|p| (p.seq, p.key))
                .collect();
            est.sort();
            for (_, key) in est {
                let i = self.find(&key).unwrap();
                if self.peers[i].used {
                    self.peers[i].used = false;
                } else {
                    self.stats.idle_evictions += 1;
                    freed.push(self.take(i, FreeReason::Idle));
                }
            }
        }
        freed
    }

    fn state(&self, key: &SocketAddr) -> PeerState {
        self.find(key)
            .map_or(PeerState::None, |i| self.peers[i].state)
    }

    fn lru_matching(&self, filter: impl Fn(&SocketAddr) -> bool) -> Option<SocketAddr> {
        self.peers
            .iter()
            .filter(|p| p.state == PeerState::Established && filter(&p.key))
            .min_by_key(|p| p.seq)
            .map(|p| p.key)
    }

    fn next_deadline(&self) -> Option<Instant> {
        let hs = self
            .peers
            .iter()
            .filter(|p| p.state == PeerState::Handshake)
            .filter_map(|p| p.last_used.checked_add(self.config.handshake_timeout))
            .min();
        let tick = if self.count(PeerState::Established) > 0 {
            self.next_tick
        } else {
            None
        };
        [hs, tick].into_iter().flatten().min()
    }
}

fn key_pool() -> Vec<SocketAddr> {
    let ips = [
        "192.0.2.1",
        "192.0.2.2",
        "198.51.100.9",
        "::ffff:192.0.2.1", // the same source as 192.0.2.1
        "2001:db8:0:1::1",
        "2001:db8:0:1::2", // same /64 as the one above
        "2001:db8:0:2::1",
    ];
    let mut keys = Vec::new();
    for ip in ips {
        for port in [1000, 1001, 2000] {
            keys.push(SocketAddr::new(ip.parse().unwrap(), port));
        }
    }
    keys
}

fn random_config(rng: &mut SmallRng) -> DsmConfig {
    let slots = rng.random_range(0..=8usize);
    let pick = |rng: &mut SmallRng, xs: &[Duration]| xs[rng.random_range(0..xs.len())];
    let evict = match rng.random_range(0..4) {
        0 | 1 => None,
        2 => Some(Duration::ZERO),
        _ => Some(pick(rng, &[5 * SEC, 30 * SEC, 90 * SEC])),
    };
    DsmConfig::new(slots)
        .with_max_handshakes(rng.random_range(0..=slots))
        .with_max_per_source(rng.random_range(1..=slots + 1))
        .with_ipv6_quota_prefix([0, 64, 128][rng.random_range(0..3)])
        .with_handshake_timeout(pick(rng, &[SEC, 10 * SEC, 45 * SEC]))
        .with_idle_tick(pick(rng, &[5 * SEC, 20 * SEC, 60 * SEC]))
        .with_evict_idle_after(evict)
}

fn run_seed(seed: u64, ops: usize, config: Option<DsmConfig>) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let random = random_config(&mut rng);
    let config = config.unwrap_or(random);
    let ctx = format!("seed {seed} config {config:?}");
    let dsm: Dsm<SocketAddr, u32> = Dsm::new(config.clone()).expect(&ctx);
    let mut model = Reference::new(config.clone());
    let hooked: Arc<Mutex<Freed>> = Arc::default();
    let sink = Arc::clone(&hooked);
    dsm.set_close_hook(move |k, v, why| sink.lock().push((*k, *v, why)));
    let keys = key_pool();
    let steps = [
        Duration::ZERO,
        Duration::ZERO,
        Duration::from_millis(1),
        Duration::from_millis(500),
        SEC,
        5 * SEC,
        10 * SEC,
        20 * SEC,
        30 * SEC,
        60 * SEC,
        61 * SEC,
    ];
    let mut clock = Instant::now();
    let mut next_value = 0u32;
    for op_no in 0..ops {
        if rng.random_bool(0.3) {
            clock += steps[rng.random_range(0..steps.len())];
        }
        // Now and then a call carries an instant from the past (a thread that read the clock
        // before waiting for the lock).
        let now = if rng.random_bool(0.05) {
            clock
                .checked_sub(steps[rng.random_range(0..steps.len())])
                .unwrap_or(clock)
        } else {
            clock
        };
        let key = keys[rng.random_range(0..keys.len())];
        let op_ctx = format!("{ctx} op {op_no}");
        let mut expected_hook: Freed = Vec::new();
        match rng.random_range(0..100) {
            0..=44 => {
                let state = match rng.random_range(0..20) {
                    0 => PeerState::None,
                    1 => PeerState::NoSpace,
                    2..=10 => PeerState::Handshake,
                    _ => PeerState::Established,
                };
                let restore = rng.random_bool(0.5);
                next_value += 1;
                let got = dsm.store(&key, state, next_value, restore, now);
                let want = model.store(key, state, next_value, restore, now);
                let (previous, restored, freed) = want;
                assert_eq!(
                    (got.previous, got.restored, got.evicted),
                    (previous, restored, freed.map(|(k, v, _)| (k, v))),
                    "{op_ctx}: store {key} {state:?}"
                );
                // The freed peer's reason is checked through the hook's log.
                expected_hook.extend(freed);
            }
            45..=69 => {
                let got = dsm.touch(&key, Authenticated::assume_verified(), now);
                assert_eq!(got, model.touch(&key, now), "{op_ctx}: touch {key}");
            }
            70..=79 => {
                assert_eq!(
                    dsm.remove(&key),
                    model.remove(&key),
                    "{op_ctx}: remove {key}"
                );
            }
            _ => {
                let got = dsm.sweep(now);
                let want = model.sweep(now);
                assert_eq!(got, want, "{op_ctx}: sweep");
                expected_hook = want;
            }
        }
        let calls = std::mem::take(&mut *hooked.lock());
        assert_eq!(calls, expected_hook, "{op_ctx}: hook calls");
        check_snapshot(&dsm, &model, &keys, &op_ctx);
    }
}

fn check_snapshot(dsm: &Dsm<SocketAddr, u32>, model: &Reference, keys: &[SocketAddr], ctx: &str) {
    for key in keys {
        assert_eq!(dsm.state(key), model.state(key), "{ctx}: state of {key}");
        let want = model.find(key).map(|i| model.peers[i].value);
        assert_eq!(dsm.get(key), want, "{ctx}: value of {key}");
    }
    let config = &model.config;
    assert_eq!(dsm.len(), model.peers.len(), "{ctx}: len");
    assert_eq!(dsm.is_empty(), model.peers.is_empty(), "{ctx}");
    assert_eq!(dsm.max_slots(), config.max_slots);
    assert_eq!(
        dsm.available_slots(),
        config.max_slots - model.peers.len(),
        "{ctx}: available"
    );
    assert_eq!(dsm.available_slots() + dsm.len(), dsm.max_slots(), "{ctx}");
    assert_eq!(
        dsm.least_recently_used(),
        model.lru_matching(|_| true),
        "{ctx}: lru"
    );
    let even = |k: &SocketAddr| k.port().is_multiple_of(2);
    assert_eq!(
        dsm.least_recently_used_matching(even),
        model.lru_matching(even),
        "{ctx}: filtered lru"
    );
    assert_eq!(
        dsm.next_deadline(),
        model.next_deadline(),
        "{ctx}: next deadline"
    );
    let s = dsm.stats();
    let m = model.stats;
    assert_eq!(
        (
            s.stored,
            s.removed,
            s.no_space,
            s.handshake_timeouts,
            s.idle_evictions,
            s.quota_rejections,
            s.evicted
        ),
        (
            m.stored,
            m.removed,
            m.no_space,
            m.handshake_timeouts,
            m.idle_evictions,
            m.quota_rejections,
            m.evicted
        ),
        "{ctx}: counters"
    );
    assert_eq!(s.handshakes, model.count(PeerState::Handshake), "{ctx}");
    assert_eq!(s.established, model.count(PeerState::Established), "{ctx}");
    // Budgets, on the reference (whose state was just shown equal to the manager's).
    assert!(
        s.handshakes <= config.max_handshakes,
        "{ctx}: handshake budget"
    );
    assert!(model.peers.len() <= config.max_slots, "{ctx}: slots");
    for p in &model.peers {
        let g = model.group(&p.key);
        let n = model
            .peers
            .iter()
            .filter(|q| model.group(&q.key) == g)
            .count();
        assert!(n <= config.max_per_source, "{ctx}: quota of {g}");
        assert!(matches!(
            p.state,
            PeerState::Handshake | PeerState::Established
        ));
    }
    assert_eq!(
        s.stored - (s.removed + s.handshake_timeouts + s.idle_evictions + s.evicted),
        dsm.len() as u64,
        "{ctx}: counts add up"
    );
}

#[test]
fn dsm_matches_the_reference_model() {
    for seed in 0..48 {
        run_seed(seed, 2_500, None);
    }
}

#[test]
fn dsm_matches_the_reference_model_on_small_tables() {
    // Long runs on tight configurations, where every refusal and reclaim path is hot.
    let tight = [
        DsmConfig::new(0),
        DsmConfig::new(1),
        DsmConfig::new(1).with_evict_idle_after(Some(Duration::ZERO)),
        DsmConfig::new(2)
            .with_max_handshakes(1)
            .with_max_per_source(1)
            .with_evict_idle_after(Some(10 * SEC)),
        DsmConfig::new(3)
            .with_max_handshakes(0)
            .with_evict_idle_after(Some(SEC)),
    ];
    for (i, config) in tight.into_iter().enumerate() {
        for seed in 0..4 {
            run_seed(1000 * (i as u64 + 1) + seed, 3_000, Some(config.clone()));
        }
    }
}
