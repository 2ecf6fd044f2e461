//! Spoofed records never keep a peer alive, for peers whose records OpenSSL still reads: a peer
//! with `lean_peers(false)`, and a peer on a CBC suite (which never goes lean). Forged records
//! in the peer's epoch (random bodies: they never authenticate) and replays of a genuine one,
//! all from the peer's own address, neither refresh its idle timer nor move it in the DSM's
//! least-recently-used order, nor fail it. (The endpoint's own tests show the same for lean
//! peers.)
//!
//! Through the public sans-IO API, with injected time: an `Endpoint`, openssl-crate clients over
//! `DatagramPipe`s.
#![cfg(feature = "server")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVerifyMode};
use openssl_session_cache::dsm::DsmConfig;
use openssl_session_cache::{
    CloseReason, DatagramPipe, Endpoint, Event, ServerConfig, SessionCache,
};
use rand::{Rng, SeedableRng};

/// A server whose peers keep their `Ssl`.
#[derive(Debug, Clone, Copy)]
enum Kept {
    /// An AEAD suite with lean peers off.
    NotLean,
    /// A CBC suite (MAC-then-encrypt, as the server sets it).
    Cbc,
}

const KEPT: [Kept; 2] = [Kept::NotLean, Kept::Cbc];

fn config(kept: Kept, dsm: DsmConfig) -> Arc<ServerConfig> {
    let b = ServerConfig::builder(SessionCache::builder().build().unwrap()).dsm(dsm);
    match kept {
        Kept::NotLean => b.lean_peers(false),
        Kept::Cbc => b.ciphers("ECDHE-ECDSA-AES128-SHA256"),
    }
    .build()
    .unwrap()
}

fn client_ctx() -> SslContext {
    let mut b = SslContext::builder(SslMethod::dtls_client()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    b.set_options(SslOptions::NO_QUERY_MTU);
    b.build()
}

struct Client {
    addr: SocketAddr,
    ssl: SslStream<DatagramPipe>,
    /// The endpoint's other events during the handshake (another peer evicted).
    events: Vec<Event>,
}

impl Client {
    /// Sends `data` as one record; returns the datagrams it made.
    fn send(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        self.ssl.ssl_write(data).unwrap();
        self.ssl.get_mut().take_outbound()
    }
}

/// The address of client `n` (each its own source address, so no per-source quota applies).
fn addr(n: u8) -> SocketAddr {
    ([127, 0, 0, n], 5000).into()
}

/// Client `n` through a full handshake with `ep` at `now`; the endpoint's events are drained
/// and the peer checked to keep its `Ssl` (no lean peer).
fn connect(ep: &mut Endpoint, n: u8, now: Instant, kept: Kept) -> Client {
    let addr = addr(n);
    let mut ssl = Ssl::new(&client_ctx()).unwrap();
    ssl.set_mtu(1400).unwrap();
    ssl.set_connect_state();
    let mut ssl = SslStream::new(ssl, DatagramPipe::new()).unwrap();
    let mut connected = None;
    let mut events = Vec::new();
    for _ in 0..20 {
        let done = match ssl.do_handshake() {
            Ok(()) => true,
            Err(e) if e.code() == ErrorCode::WANT_READ => false,
            Err(e) => panic!("client handshake: {e}"),
        };
        for d in ssl.get_mut().take_outbound() {
            ep.handle(now, addr, &d);
        }
        while let Some(t) = ep.poll_transmit() {
            // (Another peer's close_notify when this handshake evicts it.)
            if t.to == addr {
                ssl.get_mut().push(t.payload);
            }
        }
        while let Some(e) = ep.poll_event() {
            match e {
                Event::Connected { peer, info } if peer == addr => connected = Some(info.cipher),
                other => events.push(other),
            }
        }
        if done && connected.is_some() {
            break;
        }
    }
    let cipher = connected.expect("the handshake completed");
    match kept {
        Kept::Cbc => assert!(
            cipher.contains("SHA256") && !cipher.contains("GCM"),
            "{cipher}"
        ),
        Kept::NotLean => assert!(
            cipher.contains("GCM") || cipher.contains("CHACHA"),
            "{cipher}"
        ),
    }
    assert_eq!(ep.stats().lean, 0, "{kept:?}: the peer went lean");
    Client { addr, ssl, events }
}

/// A DTLS 1.2 application-data record in epoch 1 with sequence number `seq` and `body`.
fn epoch1_record(seq: u64, body: &[u8]) -> Vec<u8> {
    let mut r = vec![23, 0xfe, 0xfd, 0, 1];
    r.extend_from_slice(&seq.to_be_bytes()[2..]);
    r.extend_from_slice(&(body.len() as u16).to_be_bytes());
    r.extend_from_slice(body);
    r
}

/// Forged records of every plausible length for the suites here (random bodies, which never
/// authenticate) and a replay of `genuine`, from `from` at `now`.
fn spoof(
    ep: &mut Endpoint,
    rng: &mut impl Rng,
    from: SocketAddr,
    seq: u64,
    genuine: &[u8],
    now: Instant,
) {
    for (i, len) in [24usize, 40, 48, 64, 80].into_iter().enumerate() {
        let body: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        ep.handle(now, from, &epoch1_record(seq + i as u64, &body));
    }
    ep.handle(now, from, genuine);
}

/// Drains the endpoint's events; returns the peers it closed and why.
fn closed(ep: &mut Endpoint) -> Vec<(SocketAddr, CloseReason)> {
    let mut out = Vec::new();
    while let Some(e) = ep.poll_event() {
        if let Event::Closed { peer, reason } = e {
            out.push((peer, reason));
        }
    }
    while ep.poll_transmit().is_some() {}
    out
}

#[test]
fn spoofed_records_never_refresh_a_kept_peers_idle_timer() {
    let dsm = DsmConfig::new(64).with_idle_tick(Duration::from_secs(1));
    let t0 = Instant::now();
    for kept in KEPT {
        // Two endpoints, one peer each; one hears nothing more, the other a stream of forged
        // records and replays of a genuine one: both peers go idle at the same sweep.
        let mut idle_at = Vec::new();
        for spoofed in [false, true] {
            let mut ep = Endpoint::new(config(kept, dsm.clone())).unwrap();
            let mut c = connect(&mut ep, 1, t0, kept);
            let genuine = c.send(b"genuine");
            assert_eq!(genuine.len(), 1);
            ep.handle(t0, c.addr, &genuine[0]);
            let data = std::iter::from_fn(|| ep.poll_event())
                .filter(|e| matches!(e, Event::Data { .. }))
                .count();
            assert_eq!(data, 1, "{kept:?}");
            let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
            let mut at = None;
            for ms in (100..10_000).step_by(100) {
                let now = t0 + Duration::from_millis(ms);
                if spoofed {
                    spoof(&mut ep, &mut rng, c.addr, 1000 + ms * 8, &genuine[0], now);
                }
                ep.handle_timeout(now);
                let gone = closed(&mut ep);
                if !gone.is_empty() {
                    assert_eq!(
                        gone,
                        [(c.addr, CloseReason::Idle)],
                        "{kept:?} spoofed {spoofed}"
                    );
                    at = Some(ms);
                    break;
                }
            }
            let s = ep.stats();
            assert_eq!(
                (s.records_received, s.failed),
                (1, 0),
                "{kept:?} spoofed {spoofed}: nothing forged was taken, nothing failed: {s:?}"
            );
            idle_at.push(at.expect("the idle peer was swept"));
        }
        assert_eq!(
            idle_at[0], idle_at[1],
            "{kept:?}: a spoofed record refreshed the peer's idle timer"
        );
    }
}

/// Two established peers fill a two-slot table; a third client's handshake evicts the least
/// recently used one. Records forged, and replays of its first record, from the older peer's
/// address leave it the least recently used (it is evicted); one fresh genuine record from it
/// makes the other one so.
#[test]
fn spoofed_records_never_move_a_kept_peer_in_the_dsm_lru() {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    for kept in KEPT {
        let mut evicted = Vec::new();
        for genuine_use in [false, true] {
            let dsm = DsmConfig::new(2).with_evict_idle_after(Some(Duration::from_secs(1)));
            let mut ep = Endpoint::new(config(kept, dsm)).unwrap();
            let mut older = connect(&mut ep, 1, at(0), kept);
            let first = older.send(b"first from the older");
            ep.handle(at(0), older.addr, &first[0]);
            let newer = connect(&mut ep, 2, at(1), kept);
            if genuine_use {
                let fresh = older.send(b"fresh from the older");
                ep.handle(at(2), older.addr, &fresh[0]);
            }
            let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
            for s in 3..10 {
                spoof(&mut ep, &mut rng, older.addr, 500 + s * 8, &first[0], at(s));
            }
            let mut third = connect(&mut ep, 3, at(12), kept);
            let mut gone: Vec<(SocketAddr, CloseReason)> = third
                .events
                .drain(..)
                .filter_map(|e| match e {
                    Event::Closed { peer, reason } => Some((peer, reason)),
                    _ => None,
                })
                .collect();
            gone.extend(closed(&mut ep));
            assert_eq!(gone.len(), 1, "{kept:?}: {gone:?}");
            assert_eq!(gone[0].1, CloseReason::Evicted, "{kept:?}: {gone:?}");
            assert!(ep.is_connected(third.addr));
            let kept_peer = if gone[0].0 == older.addr {
                newer.addr
            } else {
                older.addr
            };
            assert!(ep.is_connected(kept_peer), "{kept:?}");
            let _ = third.send(b"x");
            let s = ep.stats();
            assert_eq!(
                (s.records_received, s.failed),
                (1 + u64::from(genuine_use), 0),
                "{kept:?}: {s:?}"
            );
            evicted.push(gone[0].0);
        }
        assert_eq!(
            evicted,
            [addr(1), addr(2)],
            "{kept:?}: forged and replayed records moved the older peer in the LRU order"
        );
    }
}
