//! Redis Cluster: which master holds a key, one connection and one circuit breaker per master.
//!
//! The store routes each command itself: it keeps the slot map (`CLUSTER SLOTS`, read at start,
//! every heartbeat, and at once when a master answers `MOVED`) and sends a key's command on the
//! multiplexed connection of the master that holds the key's slot. Masters share nothing: a
//! master that is down fails (or times out) only the commands for its own slots, opens its own
//! breaker, and its keys then become immediate misses, while lookups and writes of keys on the
//! other masters go on as before. Until the map is known (and for a slot no master covers) a
//! fallback breaker stands in.
//!
//! Why not the `redis` crate's cluster client (`cluster-async`, 1.8): its connection runs one
//! recovery state machine for the whole cluster, and with a master killed, a burst of lookups
//! for the dead master's slots sent it into slot refreshes during which no command for any
//! master was served; in our test every lookup, on the live masters too, ran into the
//! deadline, and the refresh did not finish while we watched (retries 0, 1 and 3 alike).
//!
//! Keys spread over the slots: a key is the prefix plus the session id in hex, and the slot is
//! the CRC16 of the whole key, unless the key holds a hash tag (`{…}`), which the builder
//! refuses in a cluster prefix: every session would then hash to one slot, on one master.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::redis::Value;
use arc_swap::ArcSwap;
use parking_lot::Mutex;

use super::breaker::SharedBreaker;
use super::runtime::Link;

/// The number of hash slots of a Redis Cluster.
pub(crate) const SLOTS: usize = 16384;
/// A slot no known master covers.
const NO_NODE: u16 = u16::MAX;

/// The hash slot of `key`: CRC16 (XMODEM) of the key, or of its hash tag, modulo 16384.
pub(crate) fn key_slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key).unwrap_or(key)) % SLOTS as u16
}

/// The part of `key` between the first `{` and the first `}` after it, if not empty.
pub(crate) fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let len = key[open + 1..].iter().position(|&b| b == b'}')?;
    (len > 0).then(|| &key[open + 1..open + 1 + len])
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc = 0u16;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A master: host, port, its connection and its breaker.
struct Node {
    host: String,
    port: u16,
    link: Arc<Link>,
    breaker: Arc<SharedBreaker>,
}

/// Slot → master, as last read.
struct SlotMap {
    nodes: Vec<Node>,
    /// For each slot, an index into `nodes` or [`NO_NODE`].
    owner: Box<[u16]>,
}

/// The cluster's masters as the store last saw them, with their breakers.
pub(crate) struct Topology {
    failures: u32,
    backoff: Duration,
    map: ArcSwap<SlotMap>,
    fallback: Arc<SharedBreaker>,
    /// Connections to the nodes the store was given, to read the map from.
    seeds: Vec<Arc<Link>>,
    refreshes: AtomicU64,
    /// Serialises updates, so that two refreshes never race to install their maps.
    updating: Mutex<()>,
    /// One `CLUSTER SLOTS` at a time; the others wait for its map.
    pub(crate) refreshing: tokio::sync::Mutex<()>,
}

impl Topology {
    /// An empty map: every key uses the fallback breaker until the first refresh, which reads
    /// the map from one of `seeds`.
    pub(crate) fn new(failures: u32, backoff: Duration, seeds: Vec<Arc<Link>>) -> Self {
        Self {
            failures,
            backoff,
            map: ArcSwap::from_pointee(SlotMap {
                nodes: Vec::new(),
                owner: vec![NO_NODE; SLOTS].into_boxed_slice(),
            }),
            fallback: SharedBreaker::new(failures, backoff),
            seeds,
            refreshes: AtomicU64::new(0),
            updating: Mutex::new(()),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// The connection of the master that holds `key`, if the map knows one.
    pub(crate) fn link_for(&self, key: &[u8]) -> Option<Arc<Link>> {
        let map = self.map.load();
        match map.owner[usize::from(key_slot(key))] {
            NO_NODE => None,
            i => Some(Arc::clone(&map.nodes[usize::from(i)].link)),
        }
    }

    /// Connections to ask for something any node answers (`PUBLISH`, `CLUSTER SLOTS`), best
    /// first: masters whose breaker is closed, then the others, then the seeds.
    pub(crate) fn candidates(&self) -> Vec<Arc<Link>> {
        let map = self.map.load();
        let (up, down): (Vec<&Node>, Vec<&Node>) =
            map.nodes.iter().partition(|n| !n.breaker.is_open());
        up.iter()
            .chain(down.iter())
            .map(|n| Arc::clone(&n.link))
            .chain(self.seeds.iter().cloned())
            .collect()
    }

    /// Forgets the connection of the master whose breaker is `breaker` (it just opened).
    pub(crate) fn reset_link_of(&self, breaker: &Arc<SharedBreaker>) {
        let map = self.map.load();
        if let Some(n) = map.nodes.iter().find(|n| Arc::ptr_eq(&n.breaker, breaker)) {
            n.link.reset_any();
        }
    }

    /// Connections opened so far, to every node.
    pub(crate) fn connects(&self) -> u64 {
        let map = self.map.load();
        map.nodes.iter().map(|n| n.link.connects()).sum::<u64>()
            + self.seeds.iter().map(|l| l.connects()).sum::<u64>()
    }

    /// The breaker of the master that holds `key`.
    pub(crate) fn breaker_for(&self, key: &[u8]) -> Arc<SharedBreaker> {
        let map = self.map.load();
        match map.owner[usize::from(key_slot(key))] {
            NO_NODE => Arc::clone(&self.fallback),
            i => Arc::clone(&map.nodes[usize::from(i)].breaker),
        }
    }

    /// Installs the slot ranges `(first, last, host, port)` of a `CLUSTER SLOTS` reply. A master
    /// seen before keeps its connection and breaker (and so its state); a new one gets a
    /// connection from `link` (a master it cannot make one for is left out); masters no longer
    /// listed are forgotten.
    pub(crate) fn update(
        &self,
        ranges: &[(u16, u16, String, u16)],
        link: impl Fn(&str, u16) -> Option<Link>,
    ) {
        let _one_at_a_time = self.updating.lock();
        let old = self.map.load();
        let mut nodes: Vec<Node> = Vec::new();
        let mut owner = vec![NO_NODE; SLOTS].into_boxed_slice();
        for (first, last, host, port) in ranges {
            let i = match nodes
                .iter()
                .position(|n| n.host == *host && n.port == *port)
            {
                Some(i) => i,
                None => {
                    let node = match old
                        .nodes
                        .iter()
                        .find(|n| n.host == *host && n.port == *port)
                    {
                        Some(n) => Node {
                            host: host.clone(),
                            port: *port,
                            link: Arc::clone(&n.link),
                            breaker: Arc::clone(&n.breaker),
                        },
                        None => {
                            let Some(link) = link(host, *port) else {
                                continue;
                            };
                            Node {
                                host: host.clone(),
                                port: *port,
                                link: Arc::new(link),
                                breaker: SharedBreaker::new(self.failures, self.backoff),
                            }
                        }
                    };
                    nodes.push(node);
                    nodes.len() - 1
                }
            };
            let Ok(i) = u16::try_from(i) else {
                continue; // more masters than slots: not a real reply
            };
            for slot in usize::from(*first)..=usize::from(*last).min(SLOTS - 1) {
                owner[slot] = i;
            }
        }
        self.map.store(Arc::new(SlotMap { nodes, owner }));
        self.refreshes.fetch_add(1, Ordering::Relaxed);
    }

    /// The masters known now, `(host, port)`.
    pub(crate) fn masters(&self) -> Vec<(String, u16)> {
        self.map
            .load()
            .nodes
            .iter()
            .map(|n| (n.host.clone(), n.port))
            .collect()
    }

    /// Masters known now.
    pub(crate) fn len(&self) -> usize {
        self.map.load().nodes.len()
    }

    /// Breakers open now (the masters' and the fallback).
    pub(crate) fn open(&self) -> usize {
        let map = self.map.load();
        map.nodes.iter().filter(|n| n.breaker.is_open()).count()
            + usize::from(self.fallback.is_open())
    }

    /// Times a slot map was installed.
    pub(crate) fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }
}

/// The slot ranges of a `CLUSTER SLOTS` reply, `(first, last, host, port)` of each range's
/// master; `None` if the reply does not have that shape.
pub(crate) fn parse_cluster_slots(reply: &Value) -> Option<Vec<(u16, u16, String, u16)>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let int = |v: &Value| match v {
        Value::Int(i) => Some(*i),
        _ => None,
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(fields) = range else {
            return None;
        };
        let [first, last, master, ..] = fields.as_slice() else {
            return None;
        };
        let Value::Array(master) = master else {
            return None;
        };
        let [host, port, ..] = master.as_slice() else {
            return None;
        };
        let first = u16::try_from(int(first)?).ok()?;
        let last = u16::try_from(int(last)?).ok()?;
        let port = u16::try_from(int(port)?).ok()?;
        if first > last || usize::from(last) >= SLOTS {
            return None;
        }
        out.push((first, last, text(host)?, port));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn key_slots_match_redis() {
        // From the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(
            key_slot(b"foo{}{bar}"),
            key_slot(b"foo{}{bar}"),
            "empty tag: whole key"
        );
        assert_eq!(hash_tag(b"foo{}{bar}"), None);
        assert_eq!(hash_tag(b"foo{{bar}}zap"), Some(&b"{bar"[..]));
        assert_eq!(hash_tag(b"ossl:sess:00ab"), None);
    }

    #[test]
    fn session_keys_spread_over_the_slots() {
        let mut seen = std::collections::HashSet::new();
        for i in 0u32..1000 {
            let key = format!(
                "ossl:sess:{:064x}",
                u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            );
            seen.insert(key_slot(key.as_bytes()));
        }
        assert!(seen.len() > 900, "1000 keys fell in {} slots", seen.len());
    }

    fn ranges() -> Vec<(u16, u16, String, u16)> {
        vec![
            (0, 5460, "127.0.0.1".into(), 7000),
            (5461, 10922, "127.0.0.1".into(), 7001),
            (10923, 16383, "127.0.0.1".into(), 7002),
        ]
    }

    /// A key whose slot is `slot` or after it.
    fn key_in(from: u16) -> Vec<u8> {
        (0u32..)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| key_slot(k) >= from && key_slot(k) < from + 100)
            .unwrap()
    }

    fn link(host: &str, port: u16) -> Option<Link> {
        let client = ::redis::Client::open(format!("redis://{host}:{port}")).ok()?;
        Some(Link::new(client, ::redis::AsyncConnectionConfig::new()))
    }

    #[test]
    fn each_master_has_its_own_breaker_and_keeps_it_across_refreshes() {
        let t = Topology::new(1, Duration::from_secs(60), Vec::new());
        let k0 = key_in(100);
        let k2 = key_in(11000);
        assert!(
            Arc::ptr_eq(&t.breaker_for(&k0), &t.breaker_for(&k2)),
            "fallback"
        );
        assert!(t.link_for(&k0).is_none());
        t.update(&ranges(), link);
        assert!(!Arc::ptr_eq(
            &t.link_for(&k0).unwrap(),
            &t.link_for(&k2).unwrap()
        ));
        assert_eq!(t.len(), 3);
        let b0 = t.breaker_for(&k0);
        let b2 = t.breaker_for(&k2);
        assert!(!Arc::ptr_eq(&b0, &b2));
        let now = Instant::now();
        assert!(b2.admit(now).unwrap().failure(now), "master 2 down");
        assert_eq!(t.open(), 1);
        assert!(t.breaker_for(&k2).admit(now).is_none());
        assert!(
            t.breaker_for(&k0).admit(now).is_some(),
            "master 0 unaffected"
        );
        assert!(
            Arc::ptr_eq(&t.candidates()[2], &t.link_for(&k2).unwrap()),
            "a master that is down is asked last"
        );
        let l2 = t.link_for(&k2).unwrap();
        t.update(&ranges(), |_, _| None);
        assert!(
            t.breaker_for(&k2).admit(now).is_none(),
            "a refresh keeps the state"
        );
        assert!(
            Arc::ptr_eq(&t.link_for(&k2).unwrap(), &l2),
            "and the connection"
        );
        // Master 2's slots move to a new master (a failover): a fresh breaker.
        let mut moved = ranges();
        moved[2].3 = 7005;
        t.update(&moved, link);
        assert!(t.breaker_for(&k2).admit(now).is_some());
        assert_eq!(t.open(), 0, "the old master is forgotten");
        assert_eq!(t.masters().len(), 3);
        assert_eq!(t.refreshes(), 3);
    }

    #[test]
    fn cluster_slots_replies_parse_and_bad_ones_are_refused() {
        let node = |port: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(8191),
                node(7000),
                node(7100),
            ]),
            Value::Array(vec![Value::Int(8192), Value::Int(16383), node(7001)]),
        ]);
        assert_eq!(
            parse_cluster_slots(&reply).unwrap(),
            vec![
                (0, 8191, "127.0.0.1".into(), 7000),
                (8192, 16383, "127.0.0.1".into(), 7001)
            ]
        );
        for bad in [
            Value::Nil,
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(0),
                Value::Int(16384),
                node(1),
            ])]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(5),
                Value::Int(4),
                node(1),
            ])]),
            Value::Array(vec![Value::Array(vec![
                Value::Int(0),
                Value::Int(1),
                node(70000),
            ])]),
        ] {
            assert_eq!(parse_cluster_slots(&bad), None, "{bad:?}");
        }
    }
}
