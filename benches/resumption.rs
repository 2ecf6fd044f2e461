//! Resumed DTLS 1.2 handshakes: this cache against OpenSSL's internal cache, measured in the same
//! run, for server-only and mutual (client certificate) authentication.
//!
//! Client and server run in one thread in lockstep over in-memory datagram queues, and only the
//! time spent in the server's calls is counted, so the figure is server CPU per resumption.
//! Run: `cargo bench --bench resumption`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use openssl_session_cache::SessionCache;

#[path = "support/dtls.rs"]
mod dtls;

use dtls::{client_ctx, handshake, identity, server_ctx, Pki};

fn bench(c: &mut Criterion) {
    let pki = Pki {
        server: identity("server"),
        client: identity("client"),
    };
    for mtls in [false, true] {
        let auth = if mtls { "mutual" } else { "server-only" };
        let mut group = c.benchmark_group(format!("dtls12_resumption_server_cpu/{auth}"));
        let client = client_ctx(&pki, mtls);
        let internal = server_ctx(&pki, mtls, None);
        let cache = SessionCache::builder().build().unwrap();
        let external = server_ctx(&pki, mtls, Some(&cache));
        // The same cache without the decoded tier: every resumption pays d2i_SSL_SESSION.
        let no_tier_cache = SessionCache::builder().decoded_entries(0).build().unwrap();
        let no_tier = server_ctx(&pki, mtls, Some(&no_tier_cache));
        for (name, server) in [
            ("openssl_internal_cache", &internal),
            ("this_cache", &external),
            ("this_cache_decode_every_time", &no_tier),
        ] {
            let (_, session, _, _) = handshake(server, &client, None);
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let (t, _, reused, _) = handshake(server, &client, Some(&session));
                        assert!(reused, "{name}: not resumed");
                        total += black_box(t);
                    }
                    total
                })
            });
        }
        group.bench_function("full_handshake_reference", |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| handshake(&external, &client, None).0)
                    .sum()
            })
        });
        group.finish();
        let s = cache.stats();
        assert_eq!(s.misses + s.decode_errors + s.store_errors, 0, "{s:?}");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
