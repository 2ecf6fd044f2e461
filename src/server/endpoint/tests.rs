//! The endpoint's unit tests: real DTLS clients (the openssl crate's, over in-memory datagrams)
//! against an endpoint, driven by hand.

use std::task::Wake;
use std::time::Duration;

use openssl::ssl::{ErrorCode, SslSession};
use rand::{Rng, SeedableRng};

use super::*;
use crate::dsm::DsmConfig;
use crate::server::config::{
    ServerConfigBuilder, DEFAULT_CIPHERS, DEFAULT_MAX_DATAGRAM, DEFAULT_MTU,
};
use crate::server::peer::DsmKey;
use crate::server::record::test_hello;
use crate::server::testing::{addr, CidClient, Client};
use crate::{RestoreError, SessionCache};

fn builder() -> ServerConfigBuilder {
    ServerConfig::builder(SessionCache::builder().build().unwrap())
}

fn config_with(dsm: DsmConfig) -> Arc<ServerConfig> {
    builder().dsm(dsm).build().unwrap()
}

fn config() -> Arc<ServerConfig> {
    config_with(DsmConfig::new(64))
}

/// The cookie exchange every handshake starts with: `c`'s first ClientHello to `ep`, `ep`'s
/// HelloVerifyRequest (made without state) back to `c`. Returns the ClientHello with the cookie
/// that `c` sends next, not handed to `ep` yet.
fn cookie_exchange(ep: &mut Endpoint, c: &mut Client, now: Instant) -> Vec<Vec<u8>> {
    for d in c.drive() {
        ep.handle(now, c.addr, &d);
    }
    let hvr = ep.poll_transmit().expect("a HelloVerifyRequest");
    c.stream.get_mut().push(hvr.payload);
    c.drive()
}

/// Moves datagrams both ways until nothing moves.
fn pump(ep: &mut Endpoint, client: &mut Client, now: Instant) {
    let mut out = client.drive();
    for _ in 0..20 {
        for d in out.drain(..) {
            ep.handle(now, client.addr, &d);
        }
        let mut any = false;
        while let Some(t) = ep.poll_transmit() {
            assert_eq!(t.to, client.addr);
            assert!(
                t.payload.len() <= DEFAULT_MTU as usize,
                "datagram over the mtu"
            );
            client.stream.get_mut().push(t.payload);
            any = true;
        }
        out = client.drive();
        if !any && out.is_empty() {
            return;
        }
    }
}

fn events(ep: &mut Endpoint) -> Vec<Event> {
    std::iter::from_fn(|| ep.poll_event()).collect()
}

/// The application of these tests: echoes every record back.
fn echo(ep: &mut Endpoint) -> Vec<Event> {
    let events = events(ep);
    for e in &events {
        if let Event::Data { peer, data } = e {
            ep.send(*peer, data).unwrap();
        }
    }
    events
}

fn connected(events: &[Event]) -> Vec<&ConnectionInfo> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Connected { info, .. } => Some(info),
            _ => None,
        })
        .collect()
}

#[test]
fn records_become_events_and_sends_become_records() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    let mut c = Client::new(1000, None);
    pump(&mut ep, &mut c, now);
    assert!(c.established);
    let ev = events(&mut ep);
    let info = connected(&ev);
    assert_eq!(info.len(), 1);
    assert!(!info[0].resumed);
    assert!(
        DEFAULT_CIPHERS.split(':').any(|c| c == info[0].cipher),
        "{}",
        info[0].cipher
    );
    assert_eq!(
        (&info[0].peer_certificate, &info[0].psk_identity),
        (&None, &None)
    );
    assert!(ep.is_connected(c.addr));
    for d in c.send(b"ping") {
        ep.handle(now, c.addr, &d);
    }
    for d in c.send(b"pong") {
        ep.handle(now, c.addr, &d);
    }
    assert_eq!(
        events(&mut ep),
        vec![
            Event::Data {
                peer: c.addr,
                data: b"ping".to_vec()
            },
            Event::Data {
                peer: c.addr,
                data: b"pong".to_vec()
            },
        ]
    );
    assert!(ep.poll_transmit().is_none(), "nothing is echoed");
    ep.send(c.addr, b"PING").unwrap();
    ep.send(c.addr, b"").unwrap();
    assert_eq!(
        ep.queued_datagrams(c.addr),
        1,
        "an empty send sends nothing"
    );
    pump(&mut ep, &mut c, now);
    assert_eq!(c.received, vec![b"PING".to_vec()]);
    assert_eq!(ep.queued_datagrams(c.addr), 0);
    let s = ep.stats();
    assert_eq!(s.hello_verify_requests, 1);
    assert_eq!((s.handshakes, s.resumed), (1, 0));
    assert_eq!((s.records_received, s.bytes_received), (2, 8));
    assert_eq!((s.records_sent, s.bytes_sent), (1, 4));
    assert_eq!(ep.peer_state(c.addr), PeerState::Established);
}

#[test]
fn send_refusals_are_typed_and_disturb_nothing() {
    let config = builder().send_queue(3).build().unwrap();
    let mut ep = Endpoint::new(config).unwrap();
    let now = Instant::now();
    assert_eq!(ep.send(addr(9), b"x"), Err(SendError::UnknownPeer));
    // A peer in its handshake takes no data yet.
    half_open(&mut ep, 7, now);
    assert_eq!(ep.send(addr(7), b"x"), Err(SendError::NotConnected));
    while ep.poll_transmit().is_some() {}
    let mut c = Client::new(1000, None);
    pump(&mut ep, &mut c, now);
    assert!(c.established);
    assert_eq!(
        ep.send(c.addr, &vec![0; MAX_RECORD_PLAINTEXT + 1]),
        Err(SendError::TooLarge)
    );
    // The queue counts datagrams not taken by poll_transmit yet.
    for i in 0..3u8 {
        ep.send(c.addr, &[i]).unwrap();
    }
    assert_eq!(ep.send(c.addr, b"one too many"), Err(SendError::QueueFull));
    assert_eq!(ep.stats().send_queue_full, 1);
    assert_eq!(ep.stats().records_sent, 3);
    let first = ep.poll_transmit().unwrap();
    ep.send(c.addr, &[3]).unwrap();
    assert_eq!(ep.send(c.addr, b"full again"), Err(SendError::QueueFull));
    // The refused sends left no trace: the client reads exactly what was accepted.
    c.stream.get_mut().push(first.payload);
    pump(&mut ep, &mut c, now);
    assert_eq!(c.received, vec![vec![0], vec![1], vec![2], vec![3]]);
    assert!(ep.is_connected(c.addr));
    assert_eq!(ep.peer_state(addr(7)), PeerState::Handshake);
    // A closed peer is unknown.
    assert!(ep.close(c.addr));
    assert_eq!(ep.send(c.addr, b"late"), Err(SendError::UnknownPeer));
    assert!(!ep.close(c.addr));
}

#[test]
fn close_from_the_application_sends_close_notify_and_keeps_the_session() {
    let config = config();
    let mut ep = Endpoint::new(Arc::clone(&config)).unwrap();
    let now = Instant::now();
    let mut c = Client::new(1000, None);
    pump(&mut ep, &mut c, now);
    let session = c.stream.ssl().session().unwrap().to_owned();
    while ep.poll_event().is_some() {}
    assert!(ep.close(c.addr));
    assert_eq!(
        events(&mut ep),
        vec![Event::Closed {
            peer: c.addr,
            reason: CloseReason::Local
        }]
    );
    assert_eq!((ep.peer_count(), ep.stats().closed_locally), (0, 1));
    assert_eq!(ep.peer_state(c.addr), PeerState::None);
    let bye = ep.poll_transmit().expect("close_notify");
    c.stream.get_mut().push(bye.payload);
    c.drive();
    assert!(c
        .stream
        .get_shutdown()
        .contains(openssl::ssl::ShutdownState::RECEIVED));
    let mut again = Client::new(1001, Some(&session));
    pump(&mut ep, &mut again, now);
    assert!(again.stream.ssl().session_reused());
    assert!(connected(&events(&mut ep))[0].resumed);
}

fn psk_client(port: u16, session: Option<&SslSession>, cipher: &str) -> Client {
    let cipher = cipher.to_owned();
    Client::with(port, session, move |b| {
        // CCM8 passes the client's own security level on OpenSSL 3.2+ only with this.
        crate::rate_ccm8_by_key_size(b);
        b.set_cipher_list(&cipher).unwrap();
        b.set_psk_client_callback(|_, _, identity, key| {
            identity[..8].copy_from_slice(b"client1\0");
            key[..16].copy_from_slice(&[0x42; 16]);
            Ok(16)
        });
    })
}

#[test]
fn connected_reports_the_psk_identity_on_resumption_too() {
    let config = builder()
        .psk_lookup(|id| (id == b"client1").then(|| vec![0x42; 16]))
        .build()
        .unwrap();
    let mut ep = Endpoint::new(config).unwrap();
    let now = Instant::now();
    let mut c = psk_client(1000, None, "PSK-AES128-CCM8");
    pump(&mut ep, &mut c, now);
    assert!(c.established);
    let session = c.stream.ssl().session().unwrap().to_owned();
    let ev = events(&mut ep);
    let info = connected(&ev)[0];
    assert_eq!(info.cipher, "PSK-AES128-CCM8");
    assert_eq!(info.psk_identity.as_deref(), Some(&b"client1"[..]));
    assert!(info.peer_certificate.is_none());
    c.stream.shutdown().unwrap();
    for d in c.stream.get_mut().take_outbound() {
        ep.handle(now, c.addr, &d);
    }
    while ep.poll_transmit().is_some() {}
    let mut again = psk_client(1001, Some(&session), "PSK-AES128-CCM8");
    pump(&mut ep, &mut again, now);
    assert!(again.stream.ssl().session_reused());
    let ev = events(&mut ep);
    let info = connected(&ev)[0];
    assert!(info.resumed);
    assert_eq!(info.psk_identity.as_deref(), Some(&b"client1"[..]));
}

#[test]
fn an_unknown_psk_identity_fails_the_handshake() {
    let config = builder()
        .psk_lookup(|id| (id == b"someone else").then(|| vec![0x42; 16]))
        .build()
        .unwrap();
    let mut ep = Endpoint::new(config).unwrap();
    let mut c = psk_client(1000, None, "PSK-AES128-CCM8");
    for d in cookie_exchange(&mut ep, &mut c, Instant::now()) {
        ep.handle(Instant::now(), c.addr, &d);
    }
    for t in std::iter::from_fn(|| ep.poll_transmit()) {
        c.stream.get_mut().push(t.payload);
    }
    // The client's key exchange names the identity; the server fails the handshake.
    let _ = c.stream.do_handshake();
    for d in c.stream.get_mut().take_outbound() {
        ep.handle(Instant::now(), c.addr, &d);
    }
    assert!(!c.established);
    assert_eq!(ep.stats().failed, 1);
    assert!(connected(&events(&mut ep)).is_empty());
}

#[test]
fn close_notify_keeps_the_session_resumable() {
    let config = config();
    let mut ep = Endpoint::new(Arc::clone(&config)).unwrap();
    let now = Instant::now();
    let mut c = Client::new(1000, None);
    pump(&mut ep, &mut c, now);
    let session = c.stream.ssl().session().unwrap().to_owned();
    c.stream.shutdown().unwrap();
    for d in c.stream.get_mut().take_outbound() {
        ep.handle(now, c.addr, &d);
    }
    assert_eq!(ep.peer_count(), 0);
    assert!(events(&mut ep).contains(&Event::Closed {
        peer: c.addr,
        reason: CloseReason::CloseNotify
    }));
    assert_eq!(ep.stats().closed, 1, "closed by the peer's close_notify");
    let answer = ep.poll_transmit().expect("close_notify answered");
    assert_eq!(answer.to, c.addr);
    let mut again = Client::new(1001, Some(&session));
    pump(&mut ep, &mut again, now);
    assert!(again.established);
    assert!(again.stream.ssl().session_reused());
    assert_eq!(ep.stats().resumed, 1);
    assert_eq!(config.session_cache().stats().hits, 1);
}

/// An epoch-1 DTLS 1.2 record of `content_type` with `body` (what an off-path attacker who
/// knows the peer's address can send).
fn epoch1_record(content_type: u8, seq: u64, body: &[u8]) -> Vec<u8> {
    let mut rec = vec![content_type, 0xfe, 0xfd, 0, 1];
    rec.extend_from_slice(&seq.to_be_bytes()[2..]);
    rec.extend_from_slice(&(body.len() as u16).to_be_bytes());
    rec.extend_from_slice(body);
    rec
}

#[test]
fn spoofed_datagrams_from_a_peers_address_change_nothing() {
    let config = config();
    let mut ep = Endpoint::new(Arc::clone(&config)).unwrap();
    let now = Instant::now();
    let mut c = Client::new(1000, None);
    pump(&mut ep, &mut c, now);
    assert!(c.established);
    let session = c.stream.ssl().session().unwrap().to_owned();
    while ep.poll_event().is_some() {}
    // An empty datagram (read as end of file), then short epoch-1 records of every content
    // type, then records of garbage the size of real ones: all from the peer's own address.
    ep.handle(now, c.addr, b"");
    let mut seq = 1000;
    for content_type in [0u8, 20, 21, 22, 23, 24, 25, 255] {
        for len in 0..=48 {
            seq += 1;
            let body: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(37)).collect();
            ep.handle(now, c.addr, &epoch1_record(content_type, seq, &body));
        }
    }
    // Two records in one datagram, the second truncated.
    let mut two = epoch1_record(23, 5000, &[1; 40]);
    two.extend_from_slice(&epoch1_record(23, 5001, &[2; 40])[..20]);
    ep.handle(now, c.addr, &two);
    let ev = events(&mut ep);
    assert!(
        !ev.iter().any(|e| matches!(e, Event::Closed { .. })),
        "a spoofed datagram closed the peer: {ev:?}"
    );
    assert_eq!(ep.peer_count(), 1);
    assert_eq!(ep.peer_state(c.addr), PeerState::Established);
    assert_eq!(ep.stats().failed, 0);
    // The peer still works, and its session still resumes.
    for d in c.send(b"still here") {
        ep.handle(now, c.addr, &d);
    }
    echo(&mut ep);
    pump(&mut ep, &mut c, now);
    assert_eq!(
        c.received.last().map(Vec::as_slice),
        Some(&b"still here"[..])
    );
    c.stream.shutdown().unwrap();
    for d in c.stream.get_mut().take_outbound() {
        ep.handle(now, c.addr, &d);
    }
    while ep.poll_transmit().is_some() {}
    let mut again = Client::new(1001, Some(&session));
    pump(&mut ep, &mut again, now);
    assert!(again.stream.ssl().session_reused());
    assert_eq!(config.session_cache().stats().removed, 0);
    assert!(ep.stats().dropped_invalid > 0);
}

/// Spoofed epoch-1 records (random bodies of every length 1..100, content types 20 to 23)
/// from the address of `c`'s established peer: nothing changes, the peer still talks.
fn spoof_changes_nothing(ep: &mut Endpoint, c: &mut Client, now: Instant) {
    assert!(c.established);
    while ep.poll_event().is_some() {}
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut seq = 100;
    for content_type in 20u8..=23 {
        for len in 1..100 {
            seq += 1;
            let body: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            ep.handle(now, c.addr, &epoch1_record(content_type, seq, &body));
        }
    }
    let ev: Vec<_> = events(ep)
        .into_iter()
        .filter(|e| matches!(e, Event::Closed { .. } | Event::Data { .. }))
        .collect();
    assert!(
        ev.is_empty(),
        "a spoofed record reached the application or closed the peer: {ev:?}"
    );
    assert_eq!(ep.peer_state(c.addr), PeerState::Established);
    assert_eq!(ep.stats().failed, 0);
    for d in c.send(b"after the spoof") {
        ep.handle(now, c.addr, &d);
    }
    echo(ep);
    pump(ep, c, now);
    assert_eq!(
        c.received.last().map(Vec::as_slice),
        Some(&b"after the spoof"[..])
    );
}

#[test]
fn spoofed_records_leave_a_cbc_peer_established() {
    // The client offers encrypt-then-MAC, as OpenSSL clients do by default for CBC suites;
    // the server declines it (MAC-then-encrypt), so records with a bad MAC are discarded.
    let cbc = "ECDHE-ECDSA-AES128-SHA256";
    let config = builder().ciphers(cbc).build().unwrap();
    let mut ep = Endpoint::new(config).unwrap();
    let now = Instant::now();
    let mut c = Client::with(1000, None, |b| b.set_cipher_list(cbc).unwrap());
    pump(&mut ep, &mut c, now);
    assert_eq!(c.stream.ssl().current_cipher().map(|c| c.name()), Some(cbc));
    spoof_changes_nothing(&mut ep, &mut c, now);
}

#[test]
fn spoofed_records_leave_a_psk_ccm8_peer_established() {
    let config = builder().psk(b"client1", &[0x42; 16]).build().unwrap();
    let mut ep = Endpoint::new(config).unwrap();
    let now = Instant::now();
    let mut c = psk_client(1000, None, "PSK-AES128-CCM8");
    pump(&mut ep, &mut c, now);
    assert_eq!(
        c.stream.ssl().current_cipher().map(|c| c.name()),
        Some("PSK-AES128-CCM8")
    );
    spoof_changes_nothing(&mut ep, &mut c, now);
    // Bodies under 16 bytes cannot be CCM8 records: dropped unread.
    assert!(ep.stats().dropped_invalid >= 4 * 15);
    // 396 records that did not open: CCM8's integrity limit (2^7) was passed once, noted, and
    // the peer kept (spoof_changes_nothing saw it echo afterwards).
    assert!(ep.peers[&c.addr].is_lean());
    assert_eq!(ep.stats().records_unopened, 4 * 99);
    assert_eq!(ep.stats().integrity_limits_passed, 1);
}

#[test]
fn a_thousand_datagrams_to_one_peer_leave_the_timer_heap_bounded() {
    let mut ep = Endpoint::new(config()).unwrap();
    // A peer in its handshake runs a DTLS timer; it retransmits its client hello.
    let mut c = Client::new(1000, None);
    let hello = cookie_exchange(&mut ep, &mut c, Instant::now());
    assert_eq!(hello.len(), 1);
    for _ in 0..1000 {
        ep.handle(Instant::now(), c.addr, &hello[0]);
        while ep.poll_transmit().is_some() {}
    }
    assert_eq!(ep.peer_count(), 1);
    assert!(ep.peers[&c.addr].deadline().is_some(), "the timer runs");
    // One live entry, and stale ones only when OpenSSL's deadline moved earlier by more than
    // the slack (a thread preempted between reading the two clocks): bounded either way.
    assert!(
        ep.timers.len() <= 2 + crate::server::timers::TIMER_HEAP_SPARE + 1,
        "{} timer entries",
        ep.timers.len()
    );
    // With time standing still for the endpoint while OpenSSL's clock runs, every deadline
    // comes a little earlier; stale entries are still bounded.
    let frozen = Instant::now();
    for _ in 0..1000 {
        ep.handle(frozen, c.addr, &hello[0]);
        while ep.poll_transmit().is_some() {}
    }
    assert!(
        ep.timers.len() <= 2 + crate::server::timers::TIMER_HEAP_SPARE + 1,
        "{} timer entries",
        ep.timers.len()
    );
    assert!(ep.poll_timeout().is_some());
}

#[test]
fn a_peer_failing_without_an_alert_keeps_its_session() {
    // An established peer that keeps its Ssl (lean peers off, or a CBC suite).
    let config = builder().lean_peers(false).build().unwrap();
    let mut ep = Endpoint::new(Arc::clone(&config)).unwrap();
    let now = Instant::now();
    let mut c = Client::new(1000, None);
    pump(&mut ep, &mut c, now);
    let session = c.stream.ssl().session().unwrap().to_owned();
    // An empty datagram (a read error under the record layer: DatagramPipe) fails the
    // connection without any alert.
    let peer = ep.peers.get_mut(&c.addr).unwrap();
    peer.push(Vec::new(), 0);
    peer.drive(now, &mut ep.scratch);
    ep.after_drive(now, c.addr);
    assert_eq!(ep.stats().failed, 1);
    assert_eq!(ep.peer_count(), 0);
    assert_eq!(config.session_cache().stats().removed, 0);
    let mut again = Client::new(1001, Some(&session));
    pump(&mut ep, &mut again, now);
    assert!(again.stream.ssl().session_reused());
}

/// A remote store stand-in: sessions in memory, every lookup held until `release`.
#[derive(Debug, Default)]
struct HeldStore {
    inner: std::sync::OnceLock<crate::MemoryStore>,
    held: parking_lot::Mutex<Vec<(crate::SessionId, crate::LookupMode, crate::LookupDone)>>,
}

impl HeldStore {
    fn mem(&self) -> &crate::MemoryStore {
        self.inner
            .get_or_init(|| crate::MemoryStore::builder().build().unwrap())
    }

    fn release(&self) -> usize {
        use crate::SessionStore;
        let held: Vec<_> = self.held.lock().drain(..).collect();
        let n = held.len();
        for (id, _, done) in held {
            done.complete(self.mem().get(&id));
        }
        n
    }
}

impl crate::SessionStore for HeldStore {
    fn get(&self, _: &crate::SessionId) -> Result<Option<crate::StoredSession>, crate::StoreError> {
        panic!("a remote store is never asked synchronously")
    }
    fn put(&self, id: crate::SessionId, s: crate::StoredSession) -> Result<(), crate::StoreError> {
        self.mem().put(id, s)
    }
    fn take(
        &self,
        _: &crate::SessionId,
    ) -> Result<Option<crate::StoredSession>, crate::StoreError> {
        panic!("a remote store is never asked synchronously")
    }
    fn remove(&self, id: &crate::SessionId) -> Result<bool, crate::StoreError> {
        self.mem().remove(id)
    }
    fn lookup(&self, id: crate::SessionId, mode: crate::LookupMode, done: crate::LookupDone) {
        self.held.lock().push((id, mode, done));
    }
    fn is_remote(&self) -> bool {
        true
    }
}

#[derive(Default)]
struct CountWake(std::sync::atomic::AtomicUsize);

impl Wake for CountWake {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// An endpoint over a held remote store, a session made by a first client, and the
/// driver's waker.
fn parked_setup() -> (Endpoint, Arc<HeldStore>, SslSession, Arc<CountWake>) {
    let store = Arc::new(HeldStore::default());
    let cache = SessionCache::builder()
        .store(store.clone())
        .build()
        .unwrap();
    let config = ServerConfig::builder(cache)
        .lookup_timeout(Duration::from_millis(300))
        .parked_datagrams(2)
        .build()
        .unwrap();
    let mut ep = Endpoint::new(config).unwrap();
    let wake = Arc::new(CountWake::default());
    ep.set_waker(Waker::from(wake.clone()));
    let now = Instant::now();
    let mut first = Client::new(1000, None);
    pump(&mut ep, &mut first, now);
    let session = first.stream.ssl().session().unwrap().to_owned();
    first.stream.shutdown().unwrap();
    for d in first.stream.get_mut().take_outbound() {
        ep.handle(now, first.addr, &d);
    }
    while ep.poll_transmit().is_some() {}
    while ep.poll_event().is_some() {}
    (ep, store, session, wake)
}

#[test]
fn a_parked_peer_waits_for_its_lookup_while_others_are_served_then_resumes() {
    let (mut ep, store, session, wake) = parked_setup();
    let now = Instant::now();
    // An established peer that will keep talking while the other one is parked.
    let mut busy = Client::new(2000, None);
    pump(&mut ep, &mut busy, now);
    while ep.poll_event().is_some() {}
    // The resuming client: cookie exchange, then its ClientHello parks it.
    let mut resuming = Client::new(1001, Some(&session));
    pump(&mut ep, &mut resuming, now);
    assert!(!resuming.established);
    assert_eq!(store.held.lock().len(), 1);
    let s = ep.stats();
    assert_eq!((s.lookups_parked, s.parked), (1, 1), "{s:?}");
    assert_eq!(ep.peer_state(resuming.addr), PeerState::Handshake);
    // Its retransmissions wait, bounded (2 here); the rest is dropped and counted.
    for _ in 0..4 {
        ep.handle(now, resuming.addr, &test_hello(9, 1, &[], &[1; 32]));
    }
    assert_eq!(ep.stats().dropped_parked, 2);
    // The established peer is served meanwhile.
    for d in busy.send(b"still served") {
        ep.handle(now, busy.addr, &d);
    }
    assert!(events(&mut ep).contains(&Event::Data {
        peer: busy.addr,
        data: b"still served".to_vec()
    }));
    // Nothing is due before the store answers (but the lookup deadline).
    assert!(
        ep.poll_timeout().unwrap() >= now + Duration::from_millis(300) - Duration::from_millis(1)
    );
    // The store answers from another thread: the driver's waker fires, and handle_timeout
    // goes on with the handshake, which resumes.
    let s2 = Arc::clone(&store);
    assert_eq!(std::thread::spawn(move || s2.release()).join().unwrap(), 1);
    assert_eq!(wake.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(ep.poll_timeout().unwrap() <= now);
    ep.handle_timeout(now);
    let s = ep.stats();
    assert_eq!(
        (s.lookups_completed, s.lookups_timed_out, s.parked),
        (1, 0, 0),
        "{s:?}"
    );
    pump(&mut ep, &mut resuming, now);
    assert!(resuming.established && resuming.stream.ssl().session_reused());
    assert_eq!(ep.stats().resumed, 1);
    let cache = ep.config().session_cache().stats();
    assert_eq!(
        (cache.lookups, cache.suspended, cache.hits),
        (1, 1, 1),
        "{cache:?}"
    );
}

#[test]
fn a_lookup_past_its_bound_is_a_full_handshake_never_a_hung_peer() {
    let (mut ep, store, session, _) = parked_setup();
    let now = Instant::now();
    let mut resuming = Client::new(1001, Some(&session));
    pump(&mut ep, &mut resuming, now);
    assert_eq!(ep.stats().parked, 1);
    ep.handle_timeout(now + Duration::from_millis(299));
    assert_eq!(ep.stats().parked, 1, "given up too early");
    let due = ep.poll_timeout().unwrap();
    assert!(due <= now + Duration::from_millis(300));
    ep.handle_timeout(now + Duration::from_millis(300));
    let s = ep.stats();
    assert_eq!((s.lookups_timed_out, s.parked), (1, 0), "{s:?}");
    pump(&mut ep, &mut resuming, now + Duration::from_millis(300));
    assert!(resuming.established);
    assert!(!resuming.stream.ssl().session_reused(), "a full handshake");
    // The answer arriving afterwards changes nothing.
    assert_eq!(store.release(), 1);
    ep.handle_timeout(now + Duration::from_millis(400));
    let cache = ep.config().session_cache().stats();
    assert_eq!((cache.hits, cache.abandoned), (0, 1), "{cache:?}");
    assert_eq!(ep.stats().handshakes, 2);
}

#[test]
fn a_completed_lookup_of_a_peer_that_went_neither_counts_nor_drives_the_next_peer_at_its_address() {
    let (mut ep, store, session, _) = parked_setup();
    let now = Instant::now();
    let mut first = Client::new(1001, Some(&session));
    pump(&mut ep, &mut first, now);
    assert_eq!(ep.stats().parked, 1);
    // Its lookup completes (its waker records it as ready), but the peer is closed before the
    // endpoint gets to it.
    assert_eq!(store.release(), 1);
    assert!(ep.close(first.addr));
    assert_eq!(ep.stats().parked, 0);
    // A new client from the same address parks on a lookup of its own.
    let mut second = Client::new(1001, Some(&session));
    pump(&mut ep, &mut second, now);
    assert_eq!(ep.stats().parked, 1);
    assert_eq!(store.held.lock().len(), 1);
    // The first peer's completion is stale: not counted, and the second peer stays parked.
    ep.handle_timeout(now);
    let s = ep.stats();
    assert_eq!(
        (s.lookups_completed, s.lookups_timed_out, s.parked),
        (0, 0, 1),
        "{s:?}"
    );
    assert_eq!(ep.peer_state(second.addr), PeerState::Handshake);
    // Its own answer resumes it.
    assert_eq!(store.release(), 1);
    ep.handle_timeout(now);
    let s = ep.stats();
    assert_eq!((s.lookups_completed, s.parked), (1, 0), "{s:?}");
    pump(&mut ep, &mut second, now);
    assert!(second.established && second.stream.ssl().session_reused());
}

#[test]
fn a_parked_peer_closed_leaves_no_live_lookup_and_the_others_stay_parked() {
    let (mut ep, store, session, _) = parked_setup();
    let now = Instant::now();
    let mut gone = Client::new(1001, Some(&session));
    pump(&mut ep, &mut gone, now);
    let mut kept = Client::new(1002, Some(&session));
    pump(&mut ep, &mut kept, now + Duration::from_millis(10));
    assert_eq!(ep.stats().parked, 2);
    assert!(ep.close(gone.addr));
    assert_eq!(ep.stats().parked, 1, "the other one is still parked");
    // The closed peer's lookup deadline is no longer one: the next is the kept peer's.
    assert_eq!(
        ep.parked.next_deadline(&ep.peers),
        Some(now + Duration::from_millis(310)),
        "only the kept peer's lookup deadline"
    );
    // Past both deadlines, only the kept peer's lookup times out.
    ep.handle_timeout(now + Duration::from_millis(310));
    let s = ep.stats();
    assert_eq!(
        (s.lookups_timed_out, s.lookups_completed, s.parked),
        (1, 0, 0),
        "{s:?}"
    );
    // Both answers arriving now are dropped: both lookups were abandoned. Only the kept peer's
    // handshake went on without its answer (`abandoned` counts those); the closed one is gone.
    assert_eq!(store.release(), 2);
    ep.handle_timeout(now + Duration::from_millis(400));
    let cache = ep.config().session_cache().stats();
    assert_eq!((cache.hits, cache.abandoned), (0, 1), "{cache:?}");
    assert_eq!(ep.stats().lookups_completed, 0);
}

#[test]
fn a_lookup_answered_as_its_deadline_passes_counts_as_completed_and_resumes() {
    let (mut ep, store, session, _) = parked_setup();
    let now = Instant::now();
    let mut resuming = Client::new(1001, Some(&session));
    pump(&mut ep, &mut resuming, now);
    assert_eq!(ep.stats().parked, 1);
    // The answer arrives on the store's thread after handle_timeout took the ready list and
    // before it looked at the deadlines: the peer is not in the list, its deadline is due,
    // and its lookup has an answer (as here, where the list the waker filled is emptied).
    assert_eq!(store.release(), 1);
    ep.parked.ready.lock().clear();
    ep.handle_timeout(now + Duration::from_millis(300));
    let s = ep.stats();
    assert_eq!(
        (s.lookups_completed, s.lookups_timed_out, s.parked),
        (1, 0, 0),
        "{s:?}"
    );
    pump(&mut ep, &mut resuming, now + Duration::from_millis(300));
    assert!(resuming.established && resuming.stream.ssl().session_reused());
}

#[test]
fn garbage_and_strays_are_dropped_and_counted() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    ep.handle(now, addr(1), b"");
    ep.handle(now, addr(1), b"GET / HTTP/1.1\r\n\r\n");
    let mut appdata = test_hello(1, 0, &[], &[]);
    appdata[0] = 23;
    ep.handle(now, addr(2), &appdata);
    ep.handle(now, addr(3), &vec![22; DEFAULT_MAX_DATAGRAM + 1]);
    let s = ep.stats();
    assert_eq!(s.dropped_garbage, 2);
    assert_eq!(s.dropped_not_client_hello, 1);
    assert_eq!(s.dropped_oversize, 1);
    assert_eq!(s.dropped(), 4);
    assert_eq!(ep.peer_count(), 0);
    assert!(ep.poll_transmit().is_none());
    assert_eq!(ep.dsm_stats().stored, 0);
}

#[test]
fn a_datagram_of_the_maximum_size_is_read_one_byte_more_is_not() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    ep.handle(now, addr(1), &vec![0; DEFAULT_MAX_DATAGRAM]);
    ep.handle(now, addr(1), &vec![0; DEFAULT_MAX_DATAGRAM + 1]);
    let s = ep.stats();
    assert_eq!(
        (s.datagrams_in, s.dropped_garbage, s.dropped_oversize),
        (2, 1, 1)
    );
    assert_eq!(
        format!("{ep:?}"),
        format!("Endpoint {{ peers: 0, stats: {s:?}, .. }}")
    );
}

#[test]
fn the_waker_given_is_the_waker_kept() {
    let mut ep = Endpoint::new(config()).unwrap();
    assert!(ep.waker().is_none());
    let wake = Arc::new(CountWake::default());
    ep.set_waker(Waker::from(Arc::clone(&wake)));
    ep.waker().expect("kept").wake_by_ref();
    assert_eq!(wake.0.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn a_new_hello_on_an_established_association_gets_a_cookie_and_keeps_the_old_one() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    let mut c = Client::new(9, None);
    pump(&mut ep, &mut c, now);
    assert!(c.established);
    let before = ep.stats().hello_verify_requests;
    ep.handle(now, addr(9), &test_hello(0, 0, &[], &[]));
    assert_eq!(ep.stats().hello_verify_requests, before + 1);
    assert_eq!(ep.poll_transmit().map(|t| t.to), Some(addr(9)));
    assert_eq!(ep.peer_state(addr(9)), PeerState::Established);
}

#[test]
fn a_cookie_hello_that_never_saw_a_verify_request_is_taken_as_it_is() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    ep.handle(now, addr(5), &test_hello(0, 0, &[], &[]));
    let cookie = cookie_of(&ep.poll_transmit().unwrap().payload);
    // Message sequence 0 with a valid cookie: a client that got its cookie earlier.
    ep.handle(now, addr(5), &test_hello(0, 0, &[], &cookie));
    let s = ep.stats();
    assert_eq!((s.hello_verify_requests, s.dropped_bad_sequence), (1, 0));
    assert_eq!(ep.dsm_stats().stored, 1, "it got a handshake slot");
}

#[test]
fn an_idle_peer_evicted_for_a_new_handshake_closes_as_evicted() {
    // One slot; every test client is on 127.0.0.1, so the quota must not refuse first.
    let dsm = DsmConfig::new(1)
        .with_max_per_source(2)
        .with_evict_idle_after(Some(Duration::from_secs(1)));
    let mut ep = Endpoint::new(config_with(dsm)).unwrap();
    let t0 = Instant::now();
    let mut a = Client::new(1, None);
    pump(&mut ep, &mut a, t0);
    assert!(a.established);
    let _ = events(&mut ep);
    half_open(&mut ep, 2, t0 + Duration::from_secs(2));
    let closed: Vec<_> = events(&mut ep)
        .into_iter()
        .filter(|e| matches!(e, Event::Closed { .. }))
        .collect();
    assert_eq!(
        closed,
        vec![Event::Closed {
            peer: addr(1),
            reason: CloseReason::Evicted
        }]
    );
    assert_eq!(ep.peer_state(addr(2)), PeerState::Handshake);
}

/// Authenticated data refreshes a peer against the idle sweeper, lean or keeping its `Ssl`.
fn authenticated_data_keeps_a_peer_from_going_idle_when(lean: bool) {
    let dsm = DsmConfig::new(8).with_idle_tick(Duration::from_secs(10));
    let config = builder().dsm(dsm).lean_peers(lean).build().unwrap();
    let mut ep = Endpoint::new(config).unwrap();
    let t0 = Instant::now();
    let mut c = Client::new(3, None);
    pump(&mut ep, &mut c, t0);
    assert!(c.established);
    assert_eq!(ep.peers[&c.addr].is_lean(), lean);
    let at = |s: u64| t0 + Duration::from_secs(s);
    // The sweeper passes every 10 s: a peer unused between two passes goes.
    for s in [5, 10, 15] {
        ep.handle_timeout(at(s));
    }
    for d in c.send(b"still here") {
        ep.handle(at(15), c.addr, &d);
    }
    for s in [20, 25] {
        ep.handle_timeout(at(s));
    }
    assert_eq!(ep.peer_state(addr(3)), PeerState::Established);
    for s in [30, 35, 40, 45] {
        ep.handle_timeout(at(s));
    }
    assert_eq!(
        ep.peer_state(addr(3)),
        PeerState::None,
        "silent for two passes"
    );
}

#[test]
fn authenticated_data_keeps_a_peer_from_going_idle() {
    authenticated_data_keeps_a_peer_from_going_idle_when(true);
}

#[test]
fn the_endpoint_rotates_cookie_secrets_as_time_passes() {
    let config = builder()
        .cookie_rotation(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut ep = Endpoint::new(config).unwrap();
    let t0 = Instant::now();
    ep.handle(t0, addr(5), &test_hello(0, 0, &[], &[]));
    let cookie = cookie_of(&ep.poll_transmit().unwrap().payload);
    // Datagrams from elsewhere carry the clock through two rotation periods.
    for s in [11, 22] {
        ep.handle(t0 + Duration::from_secs(s), addr(6), b"x");
    }
    ep.handle(
        t0 + Duration::from_secs(22),
        addr(5),
        &test_hello(1, 1, &[], &cookie),
    );
    assert_eq!(ep.stats().bad_cookies, 1, "a cookie two secrets old");
    assert_eq!(ep.peer_count(), 0);
}

fn cookie_of(hvr: &[u8]) -> Vec<u8> {
    hvr[13 + 12 + 3..].to_vec()
}

#[test]
fn cookieless_hellos_keep_no_state() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    for port in 0..1000 {
        ep.handle(now, addr(port), &test_hello(0, 0, &[], &[]));
    }
    assert_eq!(ep.stats().hello_verify_requests, 1000);
    assert_eq!(ep.peer_count(), 0);
    assert_eq!(ep.dsm_stats().stored, 0);
    // A wrong cookie gets a fresh HelloVerifyRequest, not a peer.
    ep.handle(now, addr(5), &test_hello(1, 1, &[], &[0; 32]));
    assert_eq!(ep.stats().bad_cookies, 1);
    assert_eq!(ep.peer_count(), 0);
    // A cookie made for another address does not verify either.
    let hvr = std::iter::from_fn(|| ep.poll_transmit()).last().unwrap();
    assert_eq!(hvr.to, addr(5));
    ep.handle(
        now,
        addr(6),
        &test_hello(1, 1, &[], &cookie_of(&hvr.payload)),
    );
    assert_eq!(ep.stats().bad_cookies, 2);
    assert_eq!(ep.peer_count(), 0);
}

/// A real client from `port` does the cookie exchange, sends its second ClientHello and
/// goes silent.
fn half_open(ep: &mut Endpoint, port: u16, now: Instant) {
    while ep.poll_transmit().is_some() {}
    let mut c = Client::new(port, None);
    for d in cookie_exchange(ep, &mut c, now) {
        ep.handle(now, c.addr, &d);
    }
}

#[test]
fn handshake_budget_is_never_exceeded() {
    let dsm = DsmConfig::new(64).with_max_handshakes(3);
    let mut ep = Endpoint::new(config_with(dsm)).unwrap();
    let now = Instant::now();
    for port in 0..10 {
        half_open(&mut ep, port, now);
    }
    assert_eq!(ep.peer_count(), 3);
    assert_eq!(ep.stats().dropped_no_space, 7);
    assert_eq!(ep.stats().max_handshaking, 3);
    assert_eq!(ep.dsm_stats().handshakes, 3);
}

#[test]
fn stalled_handshake_is_freed_after_the_timeout() {
    let dsm = DsmConfig::new(64).with_handshake_timeout(Duration::from_millis(300));
    let mut ep = Endpoint::new(config_with(dsm)).unwrap();
    let t0 = Instant::now();
    half_open(&mut ep, 7, t0);
    assert_eq!(ep.peer_state(addr(7)), PeerState::Handshake);
    let deadline = ep.poll_timeout().unwrap();
    assert!(deadline <= t0 + Duration::from_millis(300));
    ep.handle_timeout(t0 + Duration::from_millis(299));
    assert_eq!(ep.peer_count(), 1);
    ep.handle_timeout(t0 + Duration::from_millis(300));
    assert_eq!(ep.peer_count(), 0);
    assert_eq!(ep.peer_state(addr(7)), PeerState::None);
    assert_eq!(ep.stats().handshake_timeouts, 1);
    assert!(events(&mut ep).contains(&Event::Closed {
        peer: addr(7),
        reason: CloseReason::HandshakeTimeout
    }));
}

#[test]
fn idle_peer_is_shut_down_and_resumes() {
    let dsm = DsmConfig::new(64).with_idle_tick(Duration::from_secs(1));
    let config = config_with(dsm);
    let mut ep = Endpoint::new(Arc::clone(&config)).unwrap();
    let t0 = Instant::now();
    let mut c = Client::new(1000, None);
    pump(&mut ep, &mut c, t0);
    let session = c.stream.ssl().session().unwrap().to_owned();
    while ep.poll_transmit().is_some() {}
    // The DSM frees a peer unused for two sweeper ticks (one pass per tick).
    ep.handle_timeout(t0 + Duration::from_millis(1500));
    assert_eq!(ep.peer_count(), 1, "one tick of silence is not idle yet");
    let next = ep.poll_timeout().unwrap();
    assert!(next <= t0 + Duration::from_millis(2500));
    ep.handle_timeout(next);
    assert_eq!(ep.peer_count(), 0);
    assert_eq!(ep.stats().idle_closed, 1);
    // The server's close_notify went out.
    let bye = ep.poll_transmit().expect("close_notify");
    c.stream.get_mut().push(bye.payload);
    c.drive();
    assert!(c
        .stream
        .get_shutdown()
        .contains(openssl::ssl::ShutdownState::RECEIVED));
    let mut again = Client::new(1001, Some(&session));
    pump(&mut ep, &mut again, t0 + Duration::from_secs(6));
    assert!(again.stream.ssl().session_reused());
}

#[test]
fn lost_flight_is_retransmitted_by_the_timer() {
    let mut ep = Endpoint::new(config()).unwrap();
    let mut c = Client::new(1000, None);
    // Cookie exchange, then the client's second hello; the server's flight is lost.
    for d in cookie_exchange(&mut ep, &mut c, Instant::now()) {
        ep.handle(Instant::now(), c.addr, &d);
    }
    let lost: Vec<_> = std::iter::from_fn(|| ep.poll_transmit()).collect();
    assert!(!lost.is_empty());
    let deadline = ep.poll_timeout().unwrap();
    let wait = deadline.saturating_duration_since(Instant::now());
    assert!(
        wait <= Duration::from_secs(1),
        "first DTLS timer is 1 s, got {wait:?}"
    );
    // Before the deadline nothing is resent.
    ep.handle_timeout(Instant::now());
    assert!(ep.poll_transmit().is_none());
    // OpenSSL's DTLS timer reads the real clock, so this one test waits for it.
    std::thread::sleep(wait + Duration::from_millis(20));
    ep.handle_timeout(Instant::now());
    let resent: Vec<_> = std::iter::from_fn(|| ep.poll_transmit()).collect();
    assert!(!resent.is_empty(), "flight retransmitted");
    for t in resent {
        c.stream.get_mut().push(t.payload);
    }
    pump(&mut ep, &mut c, Instant::now());
    assert!(c.established);
    assert_eq!(ep.stats().handshakes, 1);
}

/// `timeouts_handled` counts calls, one each (a mutant that multiplied it stayed at 0).
#[test]
fn every_call_to_handle_timeout_is_counted() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    for n in 1..=3 {
        ep.handle_timeout(now);
        assert_eq!(ep.stats().timeouts_handled, n);
    }
}

/// The bound on queued data and drop events counts what is queued, not what was ever queued:
/// an application that polls every event never loses one, however many pass.
#[test]
fn events_polled_as_they_come_are_never_dropped_by_the_queue_bound() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    for _ in 0..2 * super::MAX_QUEUED_EVENTS + 1 {
        ep.handle(now, addr(1), b"GET / HTTP/1.1\r\n\r\n");
        assert!(matches!(ep.poll_event(), Some(Event::Dropped { .. })));
    }
    assert_eq!(ep.stats().dropped_events, 0);
    // Unpolled, the queue holds its bound and counts the rest.
    for _ in 0..super::MAX_QUEUED_EVENTS + 3 {
        ep.handle(now, addr(1), b"GET / HTTP/1.1\r\n\r\n");
    }
    assert_eq!(ep.stats().dropped_events, 3);
    assert_eq!(events(&mut ep).len(), super::MAX_QUEUED_EVENTS);
}

/// `close_all` shuts every peer down: close_notify to the established one, both freed, each
/// reported closed by shutdown.
#[test]
fn close_all_sends_close_notify_and_frees_every_peer() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    let mut c = Client::new(1000, None);
    pump(&mut ep, &mut c, now);
    half_open(&mut ep, 1001, now);
    assert_eq!(ep.peer_count(), 2);
    while ep.poll_event().is_some() {}
    while ep.poll_transmit().is_some() {}
    ep.close_all();
    assert_eq!(ep.peer_count(), 0);
    let closed: Vec<_> = events(&mut ep)
        .into_iter()
        .filter_map(|e| match e {
            Event::Closed { peer, reason } => Some((peer, reason)),
            _ => None,
        })
        .collect();
    assert!(
        closed.contains(&(c.addr, CloseReason::Shutdown)),
        "{closed:?}"
    );
    let bye = ep.poll_transmit().expect("close_notify");
    assert_eq!(bye.to, c.addr);
    c.stream.get_mut().push(bye.payload);
    c.drive();
    assert!(c
        .stream
        .get_shutdown()
        .contains(openssl::ssl::ShutdownState::RECEIVED));
}

/// `is_connected` is true only for a peer whose handshake finished and that is still open.
#[test]
fn is_connected_only_while_established() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    assert!(!ep.is_connected(addr(9)), "unknown");
    let mut c = Client::new(1000, None);
    pump(&mut ep, &mut c, now);
    half_open(&mut ep, 1001, now);
    assert!(!ep.is_connected(addr(1001)), "handshaking");
    assert!(ep.is_connected(c.addr));
    assert!(ep.close(c.addr));
    assert!(!ep.is_connected(c.addr), "closed");
}

/// A peer timer due exactly at the time given is run, not put back: `handle_timeout` at the
/// deadline `poll_timeout` gave returns (a mutant that re-armed a timer due now looped forever),
/// and the next deadline is later. (OpenSSL's own timer reads the real clock, so nothing is
/// resent yet.)
#[test]
fn a_timer_due_exactly_now_is_run_not_rearmed_for_now() {
    let mut ep = Endpoint::new(config()).unwrap();
    let mut c = Client::new(1000, None);
    for d in cookie_exchange(&mut ep, &mut c, Instant::now()) {
        ep.handle(Instant::now(), c.addr, &d);
    }
    while ep.poll_transmit().is_some() {}
    let deadline = ep.poll_timeout().unwrap();
    ep.handle_timeout(deadline);
    assert_eq!(ep.peer_count(), 1);
    assert!(ep.poll_timeout().unwrap() > deadline);
}

#[test]
fn what_only_the_handshake_needs_goes_when_it_finishes() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    half_open(&mut ep, 7, now);
    assert!(ep.peers[&addr(7)].handshake.is_some(), "kept while it runs");
    while ep.poll_transmit().is_some() {}
    let mut c = Client::new(1000, None);
    pump(&mut ep, &mut c, now);
    assert!(c.established);
    let ev = events(&mut ep);
    let handshake_time = connected(&ev)[0].handshake_time;
    assert_eq!(handshake_time, Duration::ZERO, "all at one `now`");
    assert!(
        ep.peers[&c.addr].handshake.is_none(),
        "dropped once it finished"
    );
    assert!(ep.peers[&addr(7)].handshake.is_some());
}

// ---------------------------------------------------------------------------------- lean peers

/// A client's record layer sealing with its own write key: derived from the client's `Ssl`, as
/// the endpoint derives it from its own, continuing after the client's last record `last`.
fn client_record_layer(c: &Client, last: &[u8]) -> crate::server::record::protect::RecordState {
    use crate::server::record::keys::RecordKeys;
    use crate::server::record::protect::RecordState;
    use crate::server::record::{u16_at, u48_at};
    let keys = RecordKeys::derive(c.stream.ssl()).unwrap().swapped();
    assert_eq!(u16_at(last, 3), 1);
    RecordState::new(keys, 1, u48_at(last, 5) + 1, Default::default())
}

#[test]
fn an_aead_peer_goes_lean_and_talks_both_ways_without_its_ssl() {
    for lean in [true, false] {
        let mut ep = Endpoint::new(builder().lean_peers(lean).build().unwrap()).unwrap();
        let now = Instant::now();
        let mut c = Client::new(1000, None);
        pump(&mut ep, &mut c, now);
        assert!(c.established);
        let peer = &ep.peers[&c.addr];
        assert_eq!(peer.is_lean(), lean);
        assert_eq!(peer.ssl().is_none(), lean, "the ssl is freed");
        assert_eq!(ep.stats().lean, u64::from(lean));
        assert!(
            peer.deadline().is_none(),
            "no DTLS timer after the handshake"
        );
        assert_eq!(connected(&events(&mut ep)).len(), 1);
        for d in c.send(b"ping") {
            ep.handle(now, c.addr, &d);
        }
        for d in c.send(b"pong") {
            ep.handle(now, c.addr, &d);
        }
        let ev = echo(&mut ep);
        assert_eq!(
            ev,
            vec![
                Event::Data {
                    peer: c.addr,
                    data: b"ping".to_vec()
                },
                Event::Data {
                    peer: c.addr,
                    data: b"pong".to_vec()
                },
            ],
            "lean {lean}"
        );
        ep.send(c.addr, &[7; 1300]).unwrap();
        pump(&mut ep, &mut c, now);
        assert_eq!(
            c.received,
            vec![b"ping".to_vec(), b"pong".to_vec(), vec![7; 1300]]
        );
        // The client's close_notify: answered with ours, the peer closed, the session kept.
        c.stream.shutdown().unwrap();
        for d in c.stream.get_mut().take_outbound() {
            ep.handle(now, c.addr, &d);
        }
        assert_eq!(
            events(&mut ep),
            vec![Event::Closed {
                peer: c.addr,
                reason: CloseReason::CloseNotify
            }]
        );
        let bye = ep.poll_transmit().expect("our close_notify");
        c.stream.get_mut().push(bye.payload);
        c.drive();
        assert!(c
            .stream
            .get_shutdown()
            .contains(openssl::ssl::ShutdownState::RECEIVED));
        assert_eq!(ep.stats().lean, 0);
        assert_eq!(ep.config().session_cache().stats().removed, 0);
        let session = c.stream.ssl().session().unwrap().to_owned();
        let mut again = Client::new(1001, Some(&session));
        pump(&mut ep, &mut again, now);
        assert!(again.stream.ssl().session_reused(), "lean {lean}");
        assert_eq!(ep.peers[&again.addr].is_lean(), lean);
    }
}

#[test]
fn a_cbc_peer_keeps_its_ssl() {
    let cbc = "ECDHE-ECDSA-AES128-SHA256";
    let mut ep = Endpoint::new(builder().ciphers(cbc).build().unwrap()).unwrap();
    let now = Instant::now();
    let mut c = Client::with(1000, None, |b| b.set_cipher_list(cbc).unwrap());
    pump(&mut ep, &mut c, now);
    assert!(c.established);
    assert!(!ep.peers[&c.addr].is_lean());
    assert_eq!(ep.stats().lean, 0);
    for d in c.send(b"cbc") {
        ep.handle(now, c.addr, &d);
    }
    echo(&mut ep);
    pump(&mut ep, &mut c, now);
    assert_eq!(c.received, vec![b"cbc".to_vec()]);
}

#[test]
fn a_lost_final_flight_is_sent_again_from_what_the_lean_peer_kept() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    let mut c = Client::new(1000, None);
    for d in cookie_exchange(&mut ep, &mut c, now) {
        ep.handle(now, c.addr, &d);
    }
    while let Some(t) = ep.poll_transmit() {
        c.stream.get_mut().push(t.payload);
    }
    // The client's timer for its last flight expires at once: no waiting on OpenSSL's clock.
    // Its flight goes to the server until the handshake is done there; what follows in the same
    // output is already the retransmission.
    crate::ffi::dtls_timer_expires_at_once(c.stream.ssl());
    let mut flight = c.drive().into_iter();
    for d in flight.by_ref() {
        ep.handle(now, c.addr, &d);
        if ep.peers[&c.addr].is_lean() {
            break;
        }
    }
    assert!(ep.peers[&c.addr].is_lean());
    // The server's final flight (ChangeCipherSpec, Finished) is lost.
    let lost: Vec<Vec<u8>> = std::iter::from_fn(|| ep.poll_transmit())
        .map(|t| t.payload)
        .collect();
    assert!(!lost.is_empty());
    assert!(!c.established);
    let mut again: Vec<Vec<u8>> = flight.collect();
    if again.is_empty() {
        again = c.drive();
    }
    assert!(!again.is_empty(), "the client sent its flight again");
    for d in again {
        ep.handle(now, c.addr, &d);
    }
    let resent: Vec<Vec<u8>> = std::iter::from_fn(|| ep.poll_transmit())
        .map(|t| t.payload)
        .collect();
    assert_eq!(resent, lost, "the kept flight, as it was sent");
    assert_eq!(ep.stats().final_flights_resent, 1);
    for d in resent {
        c.stream.get_mut().push(d);
    }
    c.drive();
    assert!(
        c.established,
        "the flight sent again completed the handshake"
    );
    // The client's first protected record shows the flight arrived: it is let go.
    for d in c.send(b"arrived") {
        ep.handle(now, c.addr, &d);
    }
    echo(&mut ep);
    pump(&mut ep, &mut c, now);
    assert_eq!(c.received, vec![b"arrived".to_vec()]);
    let lean = ep.peers.get_mut(&c.addr).unwrap().lean_mut().unwrap();
    assert!(lean.final_flight().is_none());
}

#[test]
fn a_resumed_lean_peer_keeps_no_final_flight() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    let mut first = Client::new(1000, None);
    pump(&mut ep, &mut first, now);
    assert!(ep
        .peers
        .get_mut(&first.addr)
        .unwrap()
        .lean_mut()
        .unwrap()
        .final_flight()
        .is_some());
    let session = first.stream.ssl().session().unwrap().to_owned();
    let mut again = Client::new(1001, Some(&session));
    pump(&mut ep, &mut again, now);
    assert!(again.stream.ssl().session_reused());
    let lean = ep.peers.get_mut(&again.addr).unwrap().lean_mut().unwrap();
    assert!(lean.final_flight().is_none(), "the client spoke last");
}

/// Runs `c`'s renegotiation against `ep`: returns how the peer closed and what the cache
/// removed.
fn renegotiate(ep: &mut Endpoint, c: &mut Client, now: Instant) -> (Vec<Event>, u64) {
    while ep.poll_event().is_some() {}
    assert!(crate::ffi::renegotiate(c.stream.ssl()));
    let e = c.stream.do_handshake().unwrap_err();
    assert_eq!(e.code(), ErrorCode::WANT_READ);
    let hello = c.stream.get_mut().take_outbound();
    assert!(!hello.is_empty(), "the ClientHello of the renegotiation");
    for d in hello {
        ep.handle(now, c.addr, &d);
    }
    let answer: Vec<Vec<u8>> = std::iter::from_fn(|| ep.poll_transmit())
        .map(|t| t.payload)
        .collect();
    assert_eq!(answer.len(), 1, "one alert");
    assert_eq!(answer[0][0], 21, "an alert record");
    for d in answer {
        c.stream.get_mut().push(d);
    }
    // OpenSSL's client gives up on "no renegotiation" with a fatal alert.
    let e = c.stream.do_handshake().unwrap_err();
    assert!(e.to_string().contains("renegotiation"), "{e}");
    for d in c.stream.get_mut().take_outbound() {
        ep.handle(now, c.addr, &d);
    }
    let removed = ep.config().session_cache().stats().removed;
    (events(ep), removed)
}

#[test]
fn a_renegotiation_is_refused_as_openssl_refuses_it() {
    let mut outcomes = Vec::new();
    for lean in [true, false] {
        let mut ep = Endpoint::new(builder().lean_peers(lean).build().unwrap()).unwrap();
        let now = Instant::now();
        let mut c = Client::new(1000, None);
        pump(&mut ep, &mut c, now);
        let (events, removed) = renegotiate(&mut ep, &mut c, now);
        assert_eq!(ep.stats().renegotiations_refused, u64::from(lean));
        outcomes.push((events, removed));
    }
    assert_eq!(
        outcomes[0], outcomes[1],
        "lean and OpenSSL's record layer differ"
    );
    assert_eq!(
        outcomes[0].0,
        vec![Event::Closed {
            peer: addr(1000),
            reason: CloseReason::Failed
        }],
        "the client's fatal alert ends the peer"
    );
    assert_eq!(outcomes[0].1, 1, "and its session");
}

#[test]
fn a_fatal_alert_from_the_peer_ends_it_and_its_session_as_with_openssl() {
    let mut outcomes = Vec::new();
    for lean in [true, false] {
        let mut ep = Endpoint::new(builder().lean_peers(lean).build().unwrap()).unwrap();
        let now = Instant::now();
        let mut c = Client::new(1000, None);
        pump(&mut ep, &mut c, now);
        let ping = c.send(b"ping");
        for d in &ping {
            ep.handle(now, c.addr, d);
        }
        while ep.poll_event().is_some() {}
        let mut client = client_record_layer(&c, &ping[0]);
        let mut alert = Vec::new();
        client
            .seal(
                &mut crate::server::record::protect::Crypto::default(),
                21,
                &[2, 40],
                &mut alert,
            )
            .unwrap();
        ep.handle(now, c.addr, &alert);
        let removed = ep.config().session_cache().stats().removed;
        let session = c.stream.ssl().session().unwrap().to_owned();
        let mut again = Client::new(1001, Some(&session));
        pump(&mut ep, &mut again, now);
        let reused = again.stream.ssl().session_reused();
        outcomes.push((events(&mut ep).first().cloned(), removed, reused));
    }
    assert_eq!(outcomes[0], outcomes[1]);
    assert_eq!(
        outcomes[0],
        (
            Some(Event::Closed {
                peer: addr(1000),
                reason: CloseReason::Failed
            }),
            1,
            false
        )
    );
}

#[test]
fn a_lean_peer_closes_before_its_write_sequence_numbers_run_out() {
    use crate::server::record::protect::MAX_SEQ;
    use crate::server::record::u48_at;
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    let mut c = Client::new(1000, None);
    pump(&mut ep, &mut c, now);
    while ep.poll_event().is_some() {}
    ep.peers
        .get_mut(&c.addr)
        .unwrap()
        .lean_mut()
        .unwrap()
        .record_mut()
        .set_next_write(MAX_SEQ - 1);
    ep.send(c.addr, b"the last record").unwrap();
    assert_eq!(ep.send(c.addr, b"one too many"), Err(SendError::Failed));
    assert_eq!(
        events(&mut ep),
        vec![Event::Closed {
            peer: c.addr,
            reason: CloseReason::Failed
        }]
    );
    let out: Vec<Vec<u8>> = std::iter::from_fn(|| ep.poll_transmit())
        .map(|t| t.payload)
        .collect();
    let seqs: Vec<u64> = out.iter().map(|d| u48_at(d, 5)).collect();
    assert_eq!(
        seqs,
        vec![MAX_SEQ - 1, MAX_SEQ],
        "data, then close_notify last"
    );
    for d in out {
        c.stream.get_mut().push(d);
    }
    c.drive();
    assert_eq!(c.received, vec![b"the last record".to_vec()]);
    assert!(c
        .stream
        .get_shutdown()
        .contains(openssl::ssl::ShutdownState::RECEIVED));
}

#[test]
fn records_that_do_not_open_never_refresh_a_lean_peer() {
    // Two endpoints, one peer each; one hears nothing more, the other a stream of forged
    // records and replays of a genuine one: both peers go idle at the same sweep.
    let dsm = DsmConfig::new(64).with_idle_tick(Duration::from_secs(1));
    let t0 = Instant::now();
    let mut closed_at = Vec::new();
    for spoof in [false, true] {
        let mut ep = Endpoint::new(config_with(dsm.clone())).unwrap();
        let mut c = Client::new(1000, None);
        pump(&mut ep, &mut c, t0);
        let genuine = c.send(b"genuine");
        for d in &genuine {
            ep.handle(t0, c.addr, d);
        }
        while ep.poll_event().is_some() {}
        let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
        let mut at = None;
        for ms in (100..10_000).step_by(100) {
            let now = t0 + Duration::from_millis(ms);
            if spoof {
                let body: Vec<u8> = (0..40).map(|_| rng.random()).collect();
                ep.handle(now, c.addr, &epoch1_record(23, 1000 + ms, &body));
                ep.handle(now, c.addr, &genuine[0]);
            }
            ep.handle_timeout(now);
            if ep.peer_count() == 0 {
                at = Some(ms);
                break;
            }
        }
        if spoof {
            let s = ep.stats();
            assert!(s.records_unopened > 0 && s.records_replayed > 0, "{s:?}");
            assert_eq!(s.records_received, 1);
        }
        closed_at.push(at.expect("the idle peer was swept"));
    }
    assert_eq!(
        closed_at[0], closed_at[1],
        "a spoofed record refreshed the peer"
    );
}

#[test]
fn records_that_do_not_open_never_move_a_lean_peer_in_the_dsm_lru() {
    let mut ep = Endpoint::new(config()).unwrap();
    let t0 = Instant::now();
    let mut older = Client::new(1000, None);
    pump(&mut ep, &mut older, t0);
    let mut newer = Client::new(1001, None);
    pump(&mut ep, &mut newer, t0 + Duration::from_secs(1));
    let genuine = older.send(b"from the older");
    assert_eq!(ep.dsm.least_recently_used(), Some(DsmKey::Addr(older.addr)));
    // Forged and replayed records from the older peer's address: it stays the older.
    ep.handle(t0 + Duration::from_secs(2), older.addr, &genuine[0]);
    let replay_at = t0 + Duration::from_secs(3);
    ep.handle(replay_at, older.addr, &genuine[0]);
    ep.handle(replay_at, older.addr, &epoch1_record(23, 77, &[0; 40]));
    // The genuine one (the first time) moved it; start again from a clean order.
    let mut ep2 = Endpoint::new(config()).unwrap();
    let mut a = Client::new(2000, None);
    pump(&mut ep2, &mut a, t0);
    let mut b = Client::new(2001, None);
    pump(&mut ep2, &mut b, t0 + Duration::from_secs(1));
    let from_a = a.send(b"a");
    ep2.handle(t0 + Duration::from_secs(2), a.addr, &from_a[0]);
    assert_eq!(
        ep2.dsm.least_recently_used(),
        Some(DsmKey::Addr(b.addr)),
        "authentic data moves a"
    );
    for s in 3..10 {
        let now = t0 + Duration::from_secs(s);
        ep2.handle(now, b.addr, &epoch1_record(23, 500 + s, &[1; 40]));
        ep2.handle(now, a.addr, &from_a[0]);
    }
    assert_eq!(
        ep2.dsm.least_recently_used(),
        Some(DsmKey::Addr(b.addr)),
        "forged records from b and a replay from a moved nobody"
    );
}

// --------------------------------------------------------------------------- connection IDs

#[test]
fn a_client_with_a_connection_id_echoes_from_every_address_it_moves_to() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    let mut c = CidClient::new(1000, b"client-cid", None);
    let mut at = addr(1000);
    c.pump(&mut ep, at, now);
    assert!(c.client.established);
    let server_cid = c
        .server_cid
        .lock()
        .clone()
        .expect("the server gave a connection id");
    assert_eq!(server_cid.len(), ep.config().cid_len());
    assert_eq!(server_cid[0], 0, "worker 0");
    let peer = &ep.peers[&at];
    assert!(peer.is_lean());
    assert_eq!(peer.our_cid(), Some(&server_cid[..]));
    assert!(matches!(peer.dsm_key, DsmKey::Cid(..)));
    assert_eq!(ep.peer_state(at), PeerState::Established);
    while ep.poll_event().is_some() {}
    for (i, port) in [1000u16, 2001, 2002, 3003, 3003, 1000]
        .into_iter()
        .enumerate()
    {
        let next = addr(port);
        let line = format!("line {i} from {port}");
        for d in c.send(line.as_bytes()) {
            assert_eq!(d[0], 25, "a tls12_cid record");
            ep.handle(now, next, &d);
        }
        let ev = echo(&mut ep);
        let moved = next != at;
        if moved {
            assert_eq!(
                ev[0],
                Event::Migrated {
                    peer: next,
                    previous: at
                }
            );
            at = next;
        }
        assert_eq!(
            ev.last(),
            Some(&Event::Data {
                peer: next,
                data: line.clone().into_bytes()
            })
        );
        c.pump(&mut ep, at, now);
        assert_eq!(c.client.received.last(), Some(&line.into_bytes()));
    }
    assert_eq!(ep.stats().migrations, 4);
    assert_eq!(ep.peer_count(), 1);
    assert_eq!(ep.peer_state(at), PeerState::Established);
    // A close from the new address ends it there.
    assert!(ep.close(at));
    assert_eq!(ep.cids.len(), 0);
    assert_eq!(ep.dsm.len(), 0);
}

#[test]
fn spoofed_and_replayed_cid_records_from_another_address_move_and_refresh_nothing() {
    let dsm = DsmConfig::new(64).with_idle_tick(Duration::from_secs(1));
    let mut ep = Endpoint::new(config_with(dsm)).unwrap();
    let t0 = Instant::now();
    let mut c = CidClient::new(1000, b"", None);
    c.pump(&mut ep, addr(1000), t0);
    let server_cid = c.server_cid.lock().clone().unwrap();
    let genuine = c.send(b"genuine");
    ep.handle(t0, addr(1000), &genuine[0]);
    while ep.poll_event().is_some() {}
    // A forged record with the right connection ID from another address.
    let mut forged = vec![25, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 99];
    forged.extend_from_slice(&server_cid);
    forged.extend_from_slice(&40u16.to_be_bytes());
    forged.extend_from_slice(&[0x5a; 40]);
    ep.handle(t0, addr(4000), &forged);
    // The genuine record again, from another address: a replay.
    ep.handle(t0, addr(4001), &genuine[0]);
    // An unknown connection ID.
    let mut stranger = forged.clone();
    stranger[11] ^= 0xff;
    ep.handle(t0, addr(4002), &stranger);
    let ev = events(&mut ep);
    assert!(
        ev.iter().all(|e| matches!(e, Event::Dropped { .. })),
        "{ev:?}"
    );
    assert_eq!(ep.stats().migrations, 0);
    assert_eq!(ep.stats().records_unopened, 1);
    assert_eq!(ep.stats().records_replayed, 1);
    assert_eq!(ep.stats().dropped_unknown_cid, 1);
    assert!(ep.peers.contains_key(&addr(1000)), "the peer did not move");
    // Nor were they a sign of life: the peer goes idle on schedule.
    ep.handle_timeout(t0 + Duration::from_millis(1500));
    ep.handle(t0 + Duration::from_millis(1600), addr(4000), &forged);
    ep.handle(t0 + Duration::from_millis(1600), addr(4001), &genuine[0]);
    ep.handle_timeout(t0 + Duration::from_millis(2500));
    assert_eq!(ep.peer_count(), 0, "swept as idle");
    assert_eq!(ep.stats().idle_closed, 1);
}

#[test]
fn an_older_record_from_a_new_address_is_taken_but_does_not_move_the_peer() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    let mut c = CidClient::new(1000, b"x", None);
    c.pump(&mut ep, addr(1000), now);
    while ep.poll_event().is_some() {}
    let first = c.send(b"first");
    let second = c.send(b"second");
    ep.handle(now, addr(1000), &second[0]);
    ep.handle(now, addr(5000), &first[0]);
    let ev = events(&mut ep);
    assert_eq!(
        ev,
        vec![
            Event::Data {
                peer: addr(1000),
                data: b"second".to_vec()
            },
            Event::Data {
                peer: addr(1000),
                data: b"first".to_vec()
            }
        ]
    );
    assert_eq!(ep.stats().migrations, 0);
    assert_eq!(ep.stats().migrations_refused_old, 1);
    assert!(ep.peers.contains_key(&addr(1000)));
}

#[test]
fn a_resumed_handshake_negotiates_connection_ids_again() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    let mut first = CidClient::new(1000, b"first", None);
    first.pump(&mut ep, addr(1000), now);
    let session = first.client.stream.ssl().session().unwrap().to_owned();
    let first_cid = first.server_cid.lock().clone().unwrap();
    let mut again = CidClient::new(1001, b"again", Some(&session));
    again.pump(&mut ep, addr(1001), now);
    assert!(again.client.stream.ssl().session_reused());
    let second_cid = again
        .server_cid
        .lock()
        .clone()
        .expect("a connection id again");
    assert_ne!(first_cid, second_cid, "a new one");
    for d in again.send(b"resumed") {
        ep.handle(now, addr(7000), &d);
    }
    let ev = echo(&mut ep);
    assert!(ev.contains(&Event::Migrated {
        peer: addr(7000),
        previous: addr(1001)
    }));
    again.pump(&mut ep, addr(7000), now);
    assert_eq!(again.client.received, vec![b"resumed".to_vec()]);
}

#[test]
fn a_connection_id_is_drawn_only_for_a_client_that_offers_the_extension() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    // Whether the handshaking peer at `port` has a connection ID drawn for it.
    let drawn = |ep: &Endpoint, port| {
        let peer = &ep.peers[&addr(port)];
        assert!(!peer.is_established(), "stopped in its handshake");
        peer.ssl()
            .and_then(|s| s.ex_data(ep.config.peer_addr))
            .map(|info| info.cid.ours.is_some())
    };
    // Each client stopped while the server waits for its second flight: ClientHello and
    // HelloVerifyRequest, then the ClientHello with the cookie and the server's flight.
    let mut plain = Client::new(1000, None);
    for _ in 0..2 {
        for d in plain.drive() {
            ep.handle(now, addr(1000), &d);
        }
        while let Some(t) = ep.poll_transmit() {
            plain.stream.get_mut().push(t.payload);
        }
    }
    assert_eq!(drawn(&ep, 1000), Some(false), "no extension, no draw");
    let mut cid = CidClient::new(1001, b"c", None);
    for _ in 0..2 {
        for d in cid.drive() {
            ep.handle(now, addr(1001), &d);
        }
        while let Some(t) = ep.poll_transmit() {
            cid.inbound(t.payload);
        }
    }
    assert_eq!(drawn(&ep, 1001), Some(true), "drawn for the ServerHello");
    cid.pump(&mut ep, addr(1001), now);
    assert!(cid.client.established);
    assert_eq!(
        ep.peers[&addr(1001)].our_cid(),
        cid.server_cid.lock().as_deref(),
        "the one drawn is the one the client was given"
    );
}

#[test]
fn connection_ids_off_leave_the_extension_unanswered() {
    let mut ep = Endpoint::new(builder().connection_id(false).build().unwrap()).unwrap();
    let now = Instant::now();
    let mut c = CidClient::new(1000, b"asked", None);
    c.pump(&mut ep, addr(1000), now);
    assert!(c.client.established);
    assert!(c.server_cid.lock().is_none());
    assert!(ep.peers[&addr(1000)].our_cid().is_none());
    for d in c.send(b"plain") {
        assert_eq!(d[0], 23);
        ep.handle(now, addr(1000), &d);
    }
    echo(&mut ep);
    c.pump(&mut ep, addr(1000), now);
    assert_eq!(c.client.received, vec![b"plain".to_vec()]);
}

// ------------------------------------------------------------------ across a restart

#[test]
fn a_suspended_peer_goes_on_in_another_endpoint_with_no_handshake() {
    use crate::server::record::u48_at;
    let config = config();
    let mut ep = Endpoint::new(Arc::clone(&config)).unwrap();
    let now = Instant::now();
    let mut c = Client::new(1000, None);
    pump(&mut ep, &mut c, now);
    for d in c.send(b"before") {
        ep.handle(now, c.addr, &d);
    }
    echo(&mut ep);
    let last_sent: Vec<u8> = std::iter::from_fn(|| ep.poll_transmit())
        .map(|t| t.payload)
        .last()
        .unwrap();
    c.stream.get_mut().push(last_sent.clone());
    c.drive();
    assert_eq!(c.received, vec![b"before".to_vec()]);
    while ep.poll_event().is_some() {}
    let saved = ep.suspend_all();
    assert_eq!(saved.len(), 1);
    assert_eq!(
        events(&mut ep),
        vec![Event::Closed {
            peer: c.addr,
            reason: CloseReason::Suspended
        }]
    );
    assert!(
        ep.poll_transmit().is_none(),
        "no close_notify: the client keeps it"
    );
    assert_eq!(ep.peer_count(), 0);
    // "Restart": another endpoint of the same server, through the file.
    let ring = crate::KeyRing::new(1, [8; 32]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("peers");
    crate::save_peers(&path, &saved, &ring).unwrap();
    drop(saved);
    let mut restarted = Endpoint::new(Arc::clone(&config)).unwrap();
    let back = crate::take_peers(&path, &ring, std::time::SystemTime::now()).unwrap();
    assert_eq!(
        restarted.restore(now, back.into_iter().next().unwrap()),
        Ok(c.addr)
    );
    let ev = events(&mut restarted);
    let info = connected(&ev);
    assert_eq!(info.len(), 1);
    assert!(info[0].restored && !info[0].resumed);
    assert!(!info[0].cipher.is_empty());
    for d in c.send(b"after") {
        restarted.handle(now, c.addr, &d);
    }
    echo(&mut restarted);
    let answer = restarted.poll_transmit().unwrap().payload;
    assert!(
        u48_at(&answer, 5) > u48_at(&last_sent, 5),
        "the write sequence numbers go on above the last one used"
    );
    c.stream.get_mut().push(answer);
    c.drive();
    assert_eq!(c.received, vec![b"before".to_vec(), b"after".to_vec()]);
    let s = restarted.stats();
    assert_eq!((s.handshakes, s.restored, s.lean), (0, 1, 1));
}

#[test]
fn a_saved_peer_is_refused_when_it_expired_belongs_to_another_identity_or_its_place_is_taken() {
    let config = config();
    let now = Instant::now();
    let suspend_one = |config: &Arc<ServerConfig>, port: u16| {
        let mut ep = Endpoint::new(Arc::clone(config)).unwrap();
        let mut c = Client::new(port, None);
        pump(&mut ep, &mut c, now);
        ep.suspend_all().pop().unwrap()
    };
    // Another certificate.
    let other = builder().build().unwrap();
    let mut ep = Endpoint::new(Arc::clone(&other)).unwrap();
    assert_eq!(
        ep.restore(now, suspend_one(&config, 1000)),
        Err(RestoreError::Foreign)
    );
    // The address is taken.
    let mut ep = Endpoint::new(Arc::clone(&config)).unwrap();
    let mut c = Client::new(1001, None);
    pump(&mut ep, &mut c, now);
    assert_eq!(
        ep.restore(now, suspend_one(&config, 1001)),
        Err(RestoreError::Occupied)
    );
    // No slot.
    let tight = builder().dsm(DsmConfig::new(1)).build().unwrap();
    let mut ep = Endpoint::new(Arc::clone(&tight)).unwrap();
    let mut c = Client::new(1002, None);
    pump(&mut ep, &mut c, now);
    assert_eq!(
        ep.restore(now, suspend_one(&tight, 1003)),
        Err(RestoreError::NoSpace)
    );
    // Expired: the session cache's clock is past the session's lifetime.
    let clock = Arc::new(crate::ManualClock::starting_now());
    let timed = ServerConfig::builder(
        SessionCache::builder()
            .clock(clock.clone())
            .max_ttl(Duration::from_secs(60))
            .build()
            .unwrap(),
    )
    .build()
    .unwrap();
    let saved = suspend_one(&timed, 1004);
    clock.advance(Duration::from_secs(61));
    let mut ep = Endpoint::new(Arc::clone(&timed)).unwrap();
    assert_eq!(ep.restore(now, saved), Err(RestoreError::Expired));
    assert_eq!(ep.stats().restores_refused, 1);
    assert_eq!(ep.peer_count(), 0);
}

#[test]
fn a_saved_psk_peer_is_refused_once_its_identity_has_another_key() {
    let now = Instant::now();
    let first = builder().psk(b"client1", &[0x42; 16]).build().unwrap();
    let mut ep = Endpoint::new(Arc::clone(&first)).unwrap();
    let mut c = psk_client(1000, None, "PSK-AES128-CCM8");
    pump(&mut ep, &mut c, now);
    let saved = ep.suspend_all().pop().unwrap();
    let rekeyed = builder().psk(b"client1", &[0x43; 16]).build().unwrap();
    let mut ep = Endpoint::new(rekeyed).unwrap();
    assert_eq!(ep.restore(now, saved), Err(RestoreError::Foreign));
    let mut ep = Endpoint::new(Arc::clone(&first)).unwrap();
    let mut c2 = psk_client(1001, None, "PSK-AES128-CCM8");
    pump(&mut ep, &mut c2, now);
    let again = ep.suspend_all().pop().unwrap();
    let same = builder().psk(b"client1", &[0x42; 16]).build().unwrap();
    let mut ep = Endpoint::new(same).unwrap();
    assert_eq!(ep.restore(now, again), Ok(c2.addr));
    let info = connected(&events(&mut ep))
        .into_iter()
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(info[0].psk_identity.as_deref(), Some(&b"client1"[..]));
    assert_eq!(info[0].cipher, "PSK-AES128-CCM8");
}

#[test]
fn a_saved_cid_peer_is_claimed_by_its_first_datagram_from_anywhere() {
    let config = config();
    let mut ep = Endpoint::new(Arc::clone(&config)).unwrap();
    let now = Instant::now();
    let mut c = CidClient::new(1000, b"cid", None);
    c.pump(&mut ep, addr(1000), now);
    let saved = ep.suspend_all();
    let mut restarted = Endpoint::new(Arc::clone(&config)).unwrap();
    let waiting = Arc::new(continuity::Restorable::default());
    waiting.add(saved);
    restarted.set_restorable(Arc::clone(&waiting));
    // Garbage from the saved address does not claim it; a record with its CID from a new
    // address does, and moves it there.
    restarted.handle(now, addr(1000), &epoch1_record(23, 5, &[0; 40]));
    assert_eq!(waiting.len(), 1);
    assert_eq!(restarted.peer_count(), 0);
    assert_eq!(
        events(&mut restarted),
        vec![Event::Dropped {
            from: addr(1000),
            reason: DropReason::NotClientHello
        }]
    );
    for d in c.send(b"moved and restarted") {
        restarted.handle(now, addr(2000), &d);
    }
    assert_eq!(waiting.len(), 0);
    let ev = echo(&mut restarted);
    assert!(
        matches!(ev[0], Event::Connected { peer, ref info } if peer == addr(1000) && info.restored)
    );
    assert!(ev.contains(&Event::Migrated {
        peer: addr(2000),
        previous: addr(1000)
    }));
    c.pump(&mut restarted, addr(2000), now);
    assert_eq!(c.client.received, vec![b"moved and restarted".to_vec()]);
}

// ------------------------------------------------------------------- a measurement (issue 18)

/// A client of [`cid_echo_cost`]: the openssl crate's, or the one that asks for a connection ID.
enum EchoClient {
    Plain(Client),
    Cid(Box<CidClient>),
}

impl EchoClient {
    fn handshake(&mut self, ep: &mut Endpoint, at: SocketAddr, now: Instant) {
        match self {
            Self::Plain(c) => pump(ep, c, now),
            Self::Cid(c) => c.pump(ep, at, now),
        }
    }

    fn send(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        match self {
            Self::Plain(c) => c.send(data),
            Self::Cid(c) => c.send(data),
        }
    }

    fn receive(&mut self, datagram: Vec<u8>) {
        match self {
            Self::Plain(c) => {
                c.stream.get_mut().push(datagram);
                assert!(c.drive().is_empty());
            }
            Self::Cid(c) => {
                c.inbound(datagram);
                assert!(c.drive().is_empty());
            }
        }
    }

    fn received(&self) -> usize {
        match self {
            Self::Plain(c) => c.received.len(),
            Self::Cid(c) => c.client.received.len(),
        }
    }
}

/// Not a test but a measurement (BENCHMARKS.md, "Connection IDs"): the endpoint's time per
/// echoed record of a lean peer with a connection ID (both ways, and the server's only) against
/// without, and with a move to a new address every 4 echoes (the echoes that moved the peer
/// reported apart), in-process over in-memory datagrams, no sockets: one record opened, the `Data` event,
/// the echo sealed. 16 peers, each echo timed alone (only the endpoint's calls: handle,
/// poll_event, send, poll_transmit; the clients' records are made before and their echoes read
/// after, none of their work runs between the timed calls) and the median taken, so a shared
/// machine's preemption only lengthens samples that the median ignores; ten rounds, the modes in
/// turn in each, their samples pooled. Run: `cargo test --release --lib -- --ignored --nocapture
/// cid_echo_cost`.
#[test]
#[ignore = "a measurement; run it in release with --ignored --nocapture"]
fn cid_echo_cost() {
    const PEERS: u16 = 16;
    const ECHOES: usize = 500;
    const ROUNDS: usize = 10;
    // (name, the client's CID if it asks for one, whether it moves to a new port every 4 echoes)
    let modes: [(&str, Option<&[u8]>, bool); 4] = [
        ("none", None, false),
        ("both", Some(b"\x0a\x0b\x0c\x0d"), false),
        ("server-only", Some(b""), false),
        ("both-moving-every-4", Some(b"\x0a\x0b\x0c\x0d"), true),
    ];
    for size in [13usize, 1000] {
        // Every round's samples of each mode together (the modes take turns in each round, so
        // a shared machine's slow and fast spells fall on all alike); the last: the moving
        // mode's echoes of a record from a new address alone.
        let mut pooled = vec![Vec::new(); modes.len() + 1];
        for _ in 0..ROUNDS {
            for (m, (_, cid, moving)) in modes.iter().enumerate() {
                let mut ep = Endpoint::new(config_with(DsmConfig::new(256))).unwrap();
                let now = Instant::now();
                let mut clients: Vec<(SocketAddr, EchoClient)> = (0..PEERS)
                    .map(|i| {
                        let port = 1000 + i;
                        let c = match cid {
                            None => EchoClient::Plain(Client::new(port, None)),
                            Some(own) => EchoClient::Cid(Box::new(CidClient::new(port, own, None))),
                        };
                        (addr(port), c)
                    })
                    .collect();
                for (at, c) in &mut clients {
                    c.handshake(&mut ep, *at, now);
                }
                assert_eq!(ep.stats().lean, u64::from(PEERS));
                while ep.poll_event().is_some() {}
                let line = vec![b'.'; size];
                // Every client's records first, so that no client work runs between the timed
                // calls (its crypto would only cool the endpoint's caches).
                let sent: Vec<Vec<Vec<Vec<u8>>>> = clients
                    .iter_mut()
                    .map(|(_, c)| (0..ECHOES).map(|_| c.send(&line)).collect())
                    .collect();
                let mut samples = Vec::with_capacity(ECHOES * usize::from(PEERS));
                let mut move_samples = Vec::new();
                let mut echoes: Vec<Vec<Vec<u8>>> = vec![Vec::new(); clients.len()];
                let mut next: Vec<_> = sent.iter().map(|s| s.iter()).collect();
                for i in 0..ECHOES {
                    for (p, (at, _)) in clients.iter_mut().enumerate() {
                        let datagrams = next[p].next().expect("one record per echo");
                        let moves_now = *moving && i > 0 && i % 4 == 0;
                        if moves_now {
                            *at = addr(1000 + PEERS * (i / 4) as u16 + p as u16);
                        }
                        let start = Instant::now();
                        for d in datagrams {
                            ep.handle(now, *at, d);
                        }
                        while let Some(ev) = ep.poll_event() {
                            if let Event::Data { peer, data } = ev {
                                ep.send(peer, &data).unwrap();
                            }
                        }
                        while let Some(t) = ep.poll_transmit() {
                            echoes[p].push(t.payload);
                        }
                        if moves_now {
                            move_samples.push(start.elapsed());
                        } else {
                            samples.push(start.elapsed());
                        }
                    }
                }
                for ((_, c), echoes) in clients.iter_mut().zip(echoes) {
                    for d in echoes {
                        c.receive(d);
                    }
                }
                for (_, c) in &clients {
                    assert_eq!(c.received(), ECHOES);
                }
                assert_eq!(ep.stats().records_unopened, 0);
                let moves = if *moving { (ECHOES - 1) / 4 } else { 0 };
                assert_eq!(ep.stats().migrations, (moves * usize::from(PEERS)) as u64);
                pooled[m].extend(samples);
                pooled[modes.len()].extend(move_samples);
            }
        }
        let names = modes
            .iter()
            .map(|m| m.0)
            .chain(["both-moving-every-4, the echoes that moved"]);
        for (name, mut samples) in names.zip(pooled) {
            samples.sort_unstable();
            let at = |q: usize| samples[samples.len() * q / 100].as_nanos();
            println!(
                "cid_echo_cost size={size} mode={name} median_ns={} p25_ns={} p75_ns={} samples={}",
                at(50),
                at(25),
                at(75),
                samples.len()
            );
        }
    }
}

/// Records both ways on an established peer, lean or keeping its `Ssl`: counted by records and
/// bytes, the send queue bounded, the largest record taken and one byte more refused.
fn records_are_counted_and_the_send_queue_bounded(lean: bool) {
    let config = builder().lean_peers(lean).send_queue(3).build().unwrap();
    let mut ep = Endpoint::new(config).unwrap();
    let now = Instant::now();
    let mut c = Client::new(1000, None);
    pump(&mut ep, &mut c, now);
    assert!(c.established);
    assert_eq!(ep.peers[&c.addr].is_lean(), lean);
    while ep.poll_event().is_some() {}
    let mut inbound = c.send(b"hello");
    inbound.extend(c.send(b"there!"));
    for d in inbound {
        ep.handle(now, c.addr, &d);
    }
    let s = ep.stats();
    assert_eq!((s.records_received, s.bytes_received), (2, 11), "{s:?}");
    assert_eq!(
        ep.send(c.addr, &vec![7; MAX_RECORD_PLAINTEXT + 1]),
        Err(SendError::TooLarge)
    );
    let datagrams_out = ep.stats().datagrams_out;
    assert!(datagrams_out > 0, "the handshake's flights");
    ep.send(c.addr, &vec![7; MAX_RECORD_PLAINTEXT]).unwrap();
    ep.send(c.addr, b"ab").unwrap();
    ep.send(c.addr, b"cde").unwrap();
    assert_eq!(ep.send(c.addr, b"f"), Err(SendError::QueueFull));
    let s = ep.stats();
    assert_eq!(
        (s.records_sent, s.bytes_sent, s.send_queue_full),
        (3, MAX_RECORD_PLAINTEXT as u64 + 5, 1),
        "{s:?}"
    );
    let sent: Vec<_> = std::iter::from_fn(|| ep.poll_transmit()).collect();
    assert_eq!(sent.len(), 3);
    assert_eq!(ep.stats().datagrams_out, datagrams_out + 3);
    assert!(
        sent[0].payload.len() > MAX_RECORD_PLAINTEXT,
        "the whole record"
    );
    // The queue has room again.
    ep.send(c.addr, b"g").unwrap();
}

#[test]
fn records_are_counted_and_the_send_queue_bounded_for_lean_peers() {
    records_are_counted_and_the_send_queue_bounded(true);
}

#[test]
fn records_are_counted_and_the_send_queue_bounded_for_peers_keeping_their_ssl() {
    records_are_counted_and_the_send_queue_bounded(false);
}

#[test]
fn authenticated_data_keeps_a_peer_keeping_its_ssl_from_going_idle() {
    authenticated_data_keeps_a_peer_from_going_idle_when(false);
}

#[test]
fn rescheduling_a_peer_whose_deadline_did_not_move_adds_no_timer_entry() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    half_open(&mut ep, 7, now);
    let at = addr(7);
    let deadline = ep.peers[&at]
        .deadline()
        .expect("a handshake has a deadline");
    assert_eq!(ep.peers[&at].timer.map(Timer::at), Some(deadline));
    let entries = ep.timers.len();
    for _ in 0..10 {
        ep.schedule(at);
    }
    assert_eq!(
        ep.timers.len(),
        entries,
        "no entry pushed for the same deadline"
    );
    assert_eq!(ep.peers[&at].timer.map(Timer::at), Some(deadline));
}

#[test]
fn a_closed_peers_timer_entry_is_no_longer_live() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    half_open(&mut ep, 7, now);
    let timer = ep.peers[&addr(7)].timer.expect("armed");
    assert!(Endpoint::timer_is_live(&ep.peers, &addr(7), timer));
    assert!(ep.close(addr(7)));
    assert!(!Endpoint::timer_is_live(&ep.peers, &addr(7), timer));
    let peers = &ep.peers;
    assert_eq!(
        ep.timers
            .next_deadline(|a, t| Endpoint::timer_is_live(peers, a, t)),
        None
    );
}

#[test]
fn the_handshaking_gauge_counts_only_unfinished_handshakes() {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    half_open(&mut ep, 7, now);
    while ep.poll_transmit().is_some() {}
    let mut c = Client::new(1000, None);
    pump(&mut ep, &mut c, now);
    assert_eq!(ep.stats().handshaking, 1, "the half-open one");
    // An established peer going does not change it; the half-open one going does.
    assert!(ep.close(c.addr));
    assert_eq!(ep.stats().handshaking, 1);
    assert!(ep.close(addr(7)));
    assert_eq!(ep.stats().handshaking, 0);
    assert_eq!(
        ep.stats().closed_locally,
        2,
        "both closed by the application"
    );
}

#[test]
fn a_cid_clients_finished_alone_in_its_datagram_completes_the_handshake() {
    // Some clients send each record of a flight in a datagram of its own: the client's
    // Finished, a tls12_cid record, then arrives alone, before the peer has gone lean.
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    let mut c = CidClient::new(1000, b"client-cid", None);
    let at = addr(1000);
    let cid_len = ep.config().cid_len();
    let mut out = c.drive();
    let mut cid_records = 0;
    for _ in 0..20 {
        for d in out.drain(..) {
            for r in crate::server::record::records(&d, cid_len) {
                cid_records += usize::from(r[0] == 25);
                ep.handle(now, at, r);
            }
        }
        let mut any = false;
        while let Some(t) = ep.poll_transmit() {
            c.inbound(t.payload);
            any = true;
        }
        out = c.drive();
        if !any && out.is_empty() {
            break;
        }
    }
    assert_eq!(cid_records, 1, "the Finished, alone");
    assert!(c.client.established);
    assert!(ep.peers[&at].is_lean());
    assert_eq!(ep.stats().dropped(), 0);
    while ep.poll_event().is_some() {}
    for d in c.send(b"after a split flight") {
        ep.handle(now, at, &d);
    }
    assert_eq!(
        echo(&mut ep).last(),
        Some(&Event::Data {
            peer: at,
            data: b"after a split flight".to_vec()
        })
    );
}

#[test]
fn a_dsm_slot_whose_connection_id_names_no_peer_never_blocks_a_new_handshake() {
    // A slot keyed by a connection ID the endpoint no longer maps to a peer (a state the
    // endpoint never leaves behind; made by hand here): evicted for a new handshake, which
    // goes on, and nothing else is closed.
    let dsm = DsmConfig::new(1)
        .with_max_per_source(2)
        .with_evict_idle_after(Some(Duration::from_secs(1)));
    let mut ep = Endpoint::new(config_with(dsm)).unwrap();
    let t0 = Instant::now();
    let stray = DsmKey::Cid(
        vec![0, 1, 2, 3, 4, 5, 6, 7].into(),
        crate::dsm::PeerKey::source(&addr(1)),
    );
    ep.dsm.store(&stray, PeerState::Established, (), false, t0);
    half_open(&mut ep, 2, t0 + Duration::from_secs(2));
    assert_eq!(ep.peer_state(addr(2)), PeerState::Handshake);
    assert_eq!(ep.stats().dropped_no_space, 0);
    assert!(!events(&mut ep)
        .iter()
        .any(|e| matches!(e, Event::Closed { .. })));
}

#[test]
fn a_record_with_a_strangers_connection_id_from_a_handshaking_peer_is_dropped_and_the_handshake_goes_on(
) {
    let mut ep = Endpoint::new(config()).unwrap();
    let now = Instant::now();
    let mut c = CidClient::new(1000, b"client-cid", None);
    let at = addr(1000);
    // The client's first flights; the server's answer to its cookie hello waits.
    for d in c.drive() {
        ep.handle(now, at, &d);
    }
    let hvr = ep.poll_transmit().expect("a HelloVerifyRequest");
    c.inbound(hvr.payload);
    for d in c.drive() {
        ep.handle(now, at, &d);
    }
    assert_eq!(ep.peer_state(at), PeerState::Handshake);
    // A tls12_cid record from its address, with a connection ID that is not its own.
    let stranger = vec![0x5a; ep.config().cid_len()];
    let mut rec = vec![25, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1];
    rec.extend_from_slice(&stranger);
    rec.extend_from_slice(&40u16.to_be_bytes());
    rec.extend_from_slice(&[7; 40]);
    ep.handle(now, at, &rec);
    assert_eq!(ep.stats().dropped_unknown_cid, 1);
    // The handshake goes on and the peer talks.
    c.pump(&mut ep, at, now);
    assert!(c.client.established);
    assert_eq!(ep.stats().failed, 0);
    while ep.poll_event().is_some() {}
    for d in c.send(b"still fine") {
        ep.handle(now, at, &d);
    }
    assert_eq!(
        echo(&mut ep).last(),
        Some(&Event::Data {
            peer: at,
            data: b"still fine".to_vec()
        })
    );
}
