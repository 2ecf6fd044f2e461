//! TEMPORARY stand-in for `crate::Dsm` until it lands on main.
#![allow(missing_docs, unreachable_pub, dead_code)]

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use openssl::ssl::SslRef;
use parking_lot::Mutex;

use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    NoSpace,
    None,
    Handshake,
    Established,
}
pub trait PeerKey: Eq + Hash + Clone + Debug + Send + Sync + 'static {
    fn source(&self) -> IpAddr;
}
impl PeerKey for SocketAddr {
    fn source(&self) -> IpAddr {
        self.ip()
    }
}
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DsmConfig {
    pub max_slots: usize,
    pub max_handshakes: usize,
    pub max_per_source: usize,
    pub handshake_timeout: Duration,
    pub idle_tick: Duration,
    pub evict_idle_after: Option<Duration>,
}
impl Default for DsmConfig {
    fn default() -> Self {
        Self {
            max_slots: 1024,
            max_handshakes: 128,
            max_per_source: 64,
            handshake_timeout: Duration::from_secs(10),
            idle_tick: Duration::from_secs(60),
            evict_idle_after: None,
        }
    }
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeReason {
    Removed,
    HandshakeTimeout,
    Idle,
    Evicted,
}
#[derive(Debug)]
pub struct StoreOutcome<K, V> {
    pub previous: PeerState,
    pub restored: Option<V>,
    pub evicted: Option<(K, V)>,
}
#[derive(Debug, Clone, Copy, Default)]
pub struct DsmStats {
    pub stored: u64,
    pub removed: u64,
    pub no_space: u64,
    pub handshake_timeouts: u64,
    pub idle_evictions: u64,
    pub quota_rejections: u64,
    pub handshakes: usize,
    pub established: usize,
}
pub struct Authenticated;
impl Authenticated {
    pub fn from_ssl(ssl: &SslRef) -> Option<Self> {
        ssl.is_init_finished().then_some(Self)
    }
}
struct Slot<V> {
    state: PeerState,
    value: V,
    since: Instant,
}
pub struct Dsm<K: PeerKey, V = ()> {
    config: DsmConfig,
    slots: Mutex<HashMap<K, Slot<V>>>,
    stats: Mutex<DsmStats>,
}
impl<K: PeerKey, V: Clone + Send + 'static> Dsm<K, V> {
    pub fn new(config: DsmConfig) -> Result<Self, Error> {
        Ok(Self {
            config,
            slots: Mutex::new(HashMap::new()),
            stats: Mutex::new(DsmStats::default()),
        })
    }
    pub fn store(
        &self,
        peer: &K,
        new_state: PeerState,
        value: V,
        _restore: bool,
        now: Instant,
    ) -> StoreOutcome<K, V> {
        let mut slots = self.slots.lock();
        let mut stats = self.stats.lock();
        if let Some(slot) = slots.get_mut(peer) {
            let previous = slot.state;
            slot.state = new_state;
            slot.value = value;
            slot.since = now;
            return StoreOutcome {
                previous,
                restored: None,
                evicted: None,
            };
        }
        let hs = slots
            .values()
            .filter(|s| s.state == PeerState::Handshake)
            .count();
        let per = slots.keys().filter(|k| k.source() == peer.source()).count();
        if slots.len() >= self.config.max_slots
            || (new_state == PeerState::Handshake && hs >= self.config.max_handshakes)
        {
            stats.no_space += 1;
            return StoreOutcome {
                previous: PeerState::NoSpace,
                restored: None,
                evicted: None,
            };
        }
        if per >= self.config.max_per_source {
            stats.quota_rejections += 1;
            return StoreOutcome {
                previous: PeerState::NoSpace,
                restored: None,
                evicted: None,
            };
        }
        stats.stored += 1;
        slots.insert(
            peer.clone(),
            Slot {
                state: new_state,
                value,
                since: now,
            },
        );
        StoreOutcome {
            previous: PeerState::None,
            restored: None,
            evicted: None,
        }
    }
    pub fn remove(&self, peer: &K) -> Option<V> {
        let v = self.slots.lock().remove(peer).map(|s| s.value);
        if v.is_some() {
            self.stats.lock().removed += 1;
        }
        v
    }
    pub fn touch(&self, peer: &K, _proof: Authenticated, now: Instant) -> bool {
        match self.slots.lock().get_mut(peer) {
            Some(s) => {
                s.since = now;
                true
            }
            None => false,
        }
    }
    pub fn state(&self, peer: &K) -> PeerState {
        self.slots
            .lock()
            .get(peer)
            .map_or(PeerState::None, |s| s.state)
    }
    pub fn sweep(&self, now: Instant) -> Vec<(K, V, FreeReason)> {
        let mut slots = self.slots.lock();
        let mut out = Vec::new();
        let idle = self
            .config
            .evict_idle_after
            .unwrap_or(self.config.idle_tick * 2);
        slots.retain(|k, s| {
            let reason = match s.state {
                PeerState::Handshake if now >= s.since + self.config.handshake_timeout => {
                    Some(FreeReason::HandshakeTimeout)
                }
                PeerState::Established if now >= s.since + idle => Some(FreeReason::Idle),
                _ => None,
            };
            match reason {
                Some(r) => {
                    out.push((k.clone(), s.value.clone(), r));
                    false
                }
                None => true,
            }
        });
        out
    }
    pub fn next_deadline(&self) -> Option<Instant> {
        let idle = self
            .config
            .evict_idle_after
            .unwrap_or(self.config.idle_tick * 2);
        self.slots
            .lock()
            .values()
            .map(|s| match s.state {
                PeerState::Handshake => s.since + self.config.handshake_timeout,
                _ => s.since + idle,
            })
            .min()
    }
    pub fn stats(&self) -> DsmStats {
        let slots = self.slots.lock();
        let mut s = *self.stats.lock();
        s.handshakes = slots
            .values()
            .filter(|s| s.state == PeerState::Handshake)
            .count();
        s.established = slots
            .values()
            .filter(|s| s.state == PeerState::Established)
            .count();
        s
    }
}
