//! Metrics through the `metrics` facade, read the way Prometheus reads them: a real HTTP GET of
//! `metrics-exporter-prometheus`'s listener on a free loopback port, before and after
//! handshakes against the std driver (and, with the feature `tokio`, the tokio driver). The
//! counters move by exactly the handshakes made, and the duration histograms count each one.
//! One test function: the recorder is global to the process.
#![cfg(feature = "metrics")]

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use openssl_session_cache::dsm::DsmConfig;
use openssl_session_cache::{
    EndpointStats, ServerConfig, SessionCache, UdpOptions, UdpServer, HANDSHAKE_DURATION_METRIC,
};

use support::server::{echo, echo_app, ResumingClients};

/// `GET /metrics` over a plain TCP connection; the samples by name (with labels).
fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn get(samples: &HashMap<String, f64>, name: &str) -> f64 {
    samples.get(name).copied().unwrap_or(0.0)
}

fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// One full handshake and three resumptions (each with an echo and close_notify), then checks
/// what the scrapes say moved.
fn handshakes_move_the_counters_by_exactly_their_number(
    metrics: SocketAddr,
    server: SocketAddr,
    cache: &SessionCache,
    stats: impl Fn() -> EndpointStats,
) {
    let hits_before = cache.stats().hits;
    let before = scrape(metrics);
    let clients = ResumingClients::new();
    for i in 0..4 {
        let mut c = clients.connect(server, "k");
        assert_eq!(c.ssl().session_reused(), i > 0);
        assert_eq!(echo(&mut c, b"m"), b"m");
        c.shutdown().unwrap();
    }
    assert!(wait_for(Duration::from_secs(10), || stats().closed == 4));
    // Deltas are published every 200 ms.
    let mut after = HashMap::new();
    let settled = wait_for(Duration::from_secs(10), || {
        after = scrape(metrics);
        let d = |n: &str| get(&after, n) - get(&before, n);
        d("dtls_endpoint_closed_total") == 4.0 && d("session_cache_hits_total") == 3.0
    });
    assert!(settled, "{after:?}");
    let d = |n: &str| get(&after, n) - get(&before, n);
    assert_eq!(d("dtls_endpoint_handshakes_total"), 4.0);
    assert_eq!(d("dtls_endpoint_resumed_total"), 3.0);
    assert_eq!(d("dtls_endpoint_hello_verify_requests_total"), 4.0);
    assert_eq!(d("dtls_endpoint_records_received_total"), 4.0);
    assert_eq!(d("dtls_dsm_stored_total"), 4.0, "one slot per handshake");
    assert_eq!(d("dtls_dsm_removed_total"), 4.0, "freed at close_notify");
    assert_eq!(d("session_cache_hits_total"), 3.0);
    assert_eq!(d("session_cache_misses_total"), 0.0);
    assert_eq!(d("session_cache_inserts_total"), 1.0);
    assert_eq!(cache.stats().hits - hits_before, 3);
    assert_eq!(get(&after, "dtls_endpoint_peers"), 0.0);
    let count = |kind: &str| format!("{HANDSHAKE_DURATION_METRIC}_count{{kind=\"{kind}\"}}");
    assert_eq!(d(&count("full")), 1.0, "{after:?}");
    assert_eq!(d(&count("resumed")), 3.0, "{after:?}");
    let bucket = format!("{HANDSHAKE_DURATION_METRIC}_bucket{{kind=\"resumed\",le=\"+Inf\"}}");
    assert_eq!(d(&bucket), 3.0, "{after:?}");
    assert!(get(&after, "session_store_entries") >= 1.0);
    assert_eq!(
        d("dtls_udp_datagrams_received_total"),
        d("dtls_endpoint_datagrams_in_total")
    );
    assert!(d("dtls_udp_recv_calls_total") >= 1.0);
}

#[test]
fn a_prometheus_scrape_counts_every_handshake_on_each_driver() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    PrometheusBuilder::new()
        .with_http_listener(port)
        .set_buckets_for_metric(
            Matcher::Full(HANDSHAKE_DURATION_METRIC.into()),
            &[0.001, 0.01, 0.1, 1.0],
        )
        .unwrap()
        .install()
        .expect("the exporter listens");
    // Nothing published yet: the listener answers all the same.
    scrape(port);

    let cache = SessionCache::builder().build().unwrap();
    let config = ServerConfig::builder(cache.clone())
        .dsm(DsmConfig::new(64))
        .build()
        .unwrap();
    let mut options = UdpOptions::new("127.0.0.1:0".parse().unwrap());
    options.stats_interval = None;
    let server = UdpServer::spawn(config.clone(), options.clone(), || echo_app).unwrap();
    handshakes_move_the_counters_by_exactly_their_number(port, server.local_addr(), &cache, || {
        server.stats()
    });
    server.shutdown().unwrap();

    #[cfg(feature = "tokio")]
    {
        use openssl_session_cache::TokioServer;
        let (tx, rx) = std::sync::mpsc::channel();
        let runtime = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let server = TokioServer::spawn(config, options, || echo_app)?;
                tx.send((server.local_addr(), server.handle())).unwrap();
                server.wait().await
            })
        });
        let (addr, handle) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        handshakes_move_the_counters_by_exactly_their_number(port, addr, &cache, || handle.stats());
        handle.shutdown();
        runtime.join().unwrap().unwrap();
    }
}
