//! Server CPU per resumed DTLS 1.2 handshake, in-process and without sockets: the sans-IO
//! `Endpoint` (stateless cookie exchange, DSM admission, the session cache, close_notify, its
//! timers and maps) against OpenSSL's server side alone with its internal cache (the baseline of
//! `benches/resumption.rs`), and against OpenSSL alone doing the endpoint's whole exchange (a
//! cookie through `SSL_OP_COOKIE_EXCHANGE`, the resumption, the client's close_notify answered
//! with the server's), all measured in the same run. The difference between this and the
//! figure under real load (`scripts/driver_bench.sh`) is what the sockets and the driver cost.
//!
//! Client and endpoint run in one thread in lockstep over in-memory datagrams; only the time in
//! the endpoint's calls (handle, poll_transmit, poll_event) is counted. The two are run
//! interleaved and each handshake is timed alone; the medians are compared (a shared machine's
//! preemption only lengthens samples). Run: `cargo bench --bench endpoint` (`ROUNDS=N`;
//! `LEAN=0` runs the endpoint with lean peers off, its peers keeping their `Ssl`).
#![allow(missing_docs)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use openssl::ssl::{ErrorCode, Ssl, SslContext, SslOptions, SslStream, SslVerifyMode};
use openssl_session_cache::dsm::DsmConfig;
use openssl_session_cache::{
    ClientSessionCache, DatagramPipe, Endpoint, Event, ServerConfig, SessionCache,
};

#[path = "support/dtls.rs"]
mod dtls;

use dtls::{cookie_server_ctx, dtls_builder, full_exchange, handshake, identity, server_ctx, Pki};

/// Moves what the client wrote to the endpoint and back until the client's handshake is done,
/// then sends close_notify; returns the time spent in the endpoint and whether it resumed.
fn endpoint_connection(
    ep: &mut Endpoint,
    client: &SslContext,
    sessions: &ClientSessionCache,
    addr: SocketAddr,
) -> (Duration, bool) {
    endpoint_phases(ep, client, sessions, addr, &mut Vec::new())
}

/// [`endpoint_connection`], also pushing the time of each exchange onto `phases` (the first
/// ClientHello, the one with the cookie, the client's Finished with its close_notify).
fn endpoint_phases(
    ep: &mut Endpoint,
    client: &SslContext,
    sessions: &ClientSessionCache,
    addr: SocketAddr,
    phases: &mut Vec<Duration>,
) -> (Duration, bool) {
    let mut ssl = Ssl::new(client).unwrap();
    ssl.set_mtu(1400).unwrap();
    ssl.set_connect_state();
    sessions.resume(&mut ssl, "bench").unwrap();
    let mut c = SslStream::new(ssl, DatagramPipe::new()).unwrap();
    let mut spent = Duration::ZERO;
    let mut done = false;
    let mut closed = false;
    let mut resumed = false;
    loop {
        if !done {
            match c.do_handshake() {
                Ok(()) => {
                    done = true;
                    let _ = c.shutdown();
                }
                Err(e) if e.code() == ErrorCode::WANT_READ => {}
                Err(e) => panic!("client handshake: {e}"),
            }
        }
        let out = c.get_mut().take_outbound();
        if out.is_empty() && done {
            break;
        }
        let t = Instant::now();
        let now = Instant::now();
        for d in &out {
            ep.handle(now, addr, d);
        }
        let mut back = Vec::new();
        while let Some(t) = ep.poll_transmit() {
            back.push(t.payload);
        }
        while let Some(e) = ep.poll_event() {
            match e {
                Event::Connected { info, .. } => resumed = info.resumed,
                Event::Closed { .. } => closed = true,
                _ => {}
            }
            black_box(());
        }
        let took = t.elapsed();
        phases.push(took);
        spent += took;
        for d in back {
            c.get_mut().push(d);
        }
    }
    assert!(closed, "the endpoint closed the peer");
    (spent, resumed)
}

/// The median and 10th percentile of `v`, in microseconds.
fn summary(v: &mut [Duration]) -> (f64, f64) {
    v.sort_unstable();
    let at = |p: f64| v[((v.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.1))
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(4000);
    let pki = Pki {
        server: identity("server"),
        client: identity("client"),
    };
    // The baseline: OpenSSL alone, its internal cache, no cookie exchange, no close_notify.
    let internal = server_ctx(&pki, false, None);
    let client = dtls::client_ctx(&pki, false);
    let (_, session, _, _) = handshake(&internal, &client, None);
    // OpenSSL alone doing the endpoint's whole exchange: cookie, resumption, close_notify.
    let cookie = cookie_server_ctx(&pki);
    let (_, cookie_session, _, _) = handshake(&cookie, &client, None);

    let cache = SessionCache::builder().build().unwrap();
    let mut b = dtls_builder();
    b.set_certificate(&pki.server.0).unwrap();
    b.set_private_key(&pki.server.1).unwrap();
    let config = ServerConfig::builder(cache.clone())
        .context(b)
        .dsm(DsmConfig::new(4096))
        .lean_peers(std::env::var("LEAN").map_or(true, |v| v != "0"))
        .build()
        .unwrap();
    let mut ep = Endpoint::new(config).unwrap();
    let sessions = ClientSessionCache::new(1, 1);
    let mut cb = dtls_builder();
    cb.set_verify(SslVerifyMode::NONE);
    cb.set_options(SslOptions::NO_TICKET);
    sessions.install(&mut cb);
    let endpoint_client = cb.build();
    let mut port = 10_000u16;
    let mut next_addr = || {
        port = if port == u16::MAX { 10_000 } else { port + 1 };
        SocketAddr::from(([127, 0, 0, 1], port))
    };
    let (_, resumed) = endpoint_connection(&mut ep, &endpoint_client, &sessions, next_addr());
    assert!(!resumed);

    // Interleaved, so that whatever else the machine runs weighs on both alike; each
    // handshake timed on its own and the median read (preemption only adds to a sample).
    // ONLY=baseline or ONLY=endpoint runs one side (for a profiler).
    let only = std::env::var("ONLY").unwrap_or_default();
    let (mut base, mut full, mut endpoint) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds + rounds / 10 {
        let (t, _, reused, _) = if only != "endpoint" {
            handshake(&internal, &client, Some(&session))
        } else {
            (
                Duration::from_micros(1),
                session.clone(),
                true,
                session.clone(),
            )
        };
        assert!(reused);
        let (f, reused) = if only != "endpoint" {
            full_exchange(&cookie, &client, &cookie_session)
        } else {
            (Duration::from_micros(1), true)
        };
        assert!(reused);
        let (e, resumed) = if only != "baseline" {
            endpoint_connection(&mut ep, &endpoint_client, &sessions, next_addr())
        } else {
            (Duration::from_micros(1), true)
        };
        assert!(resumed);
        if i >= rounds / 10 {
            base.push(t);
            full.push(f);
            endpoint.push(black_box(e));
        }
    }
    // Where the endpoint's time goes, exchange by exchange.
    let mut per_phase: Vec<Vec<Duration>> = vec![Vec::new(); 3];
    for _ in 0..rounds / 2 {
        let mut phases = Vec::new();
        endpoint_phases(
            &mut ep,
            &endpoint_client,
            &sessions,
            next_addr(),
            &mut phases,
        );
        assert_eq!(phases.len(), 3, "{phases:?}");
        for (i, p) in phases.into_iter().enumerate() {
            per_phase[i].push(p);
        }
    }
    let s = cache.stats();
    assert_eq!(s.misses, 0, "{s:?}");
    let (b50, b10) = summary(&mut base);
    let (f50, f10) = summary(&mut full);
    let (e50, e10) = summary(&mut endpoint);
    println!(
        "server CPU per resumed DTLS 1.2 handshake, in-process, {rounds} rounds (median / p10):"
    );
    println!("  openssl_internal_cache (baseline)            {b50:6.1} / {b10:6.1} us");
    println!(
        "  openssl_cookie_close (cookie + close_notify)  {f50:6.1} / {f10:6.1} us   ratio {:.2} / {:.2}",
        f50 / b50,
        f10 / b10
    );
    println!(
        "  endpoint: cookie exchange + close_notify     {e50:6.1} / {e10:6.1} us   ratio {:.2} / {:.2}, {:.2} / {:.2} of openssl_cookie_close",
        e50 / b50,
        e10 / b10,
        e50 / f50,
        e10 / f10
    );
    for (name, mut v) in [
        "first ClientHello -> HelloVerifyRequest",
        "ClientHello with cookie -> ServerHello..Finished",
        "ChangeCipherSpec, Finished, close_notify -> freed",
    ]
    .into_iter()
    .zip(per_phase)
    {
        let (m, p) = summary(&mut v);
        println!("    {name:50} {m:6.1} / {p:6.1} us");
    }
}
