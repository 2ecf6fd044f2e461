//! Safe calls a user can make after `install` must not corrupt memory.
//!
//! The scenarios run in a child process (this test binary run again on that test alone, with a
//! time limit: `support::child`), so that a hang or an abort shows up as a failed test instead
//! of killing the run.

mod support;

use openssl::ssl::SslSessionCacheMode;
use openssl_session_cache::SessionCache;
use support::{client_ctx, connect, server_builder, Ctx, Proto, ServerClose};

isolated_test! {
/// Two contexts share one cache; after `install` the user turns OpenSSL's internal store back on
/// (a safe call). Each context then links whatever session object the get callback hands out into
/// its own internal list. A session object shared between both lists hangs
/// `SSL_CTX_flush_sessions` and double-frees when the contexts are dropped.
fn internal_store_re_enabled_on_two_contexts_after_install() {
    for proto in [Proto::Tls12, Proto::Dtls12] {
        let cache = SessionCache::builder().build().unwrap();
        let make = || {
            let mut b = server_builder(proto, true);
            cache.install(&mut b).unwrap();
            b.set_session_cache_mode(SslSessionCacheMode::SERVER);
            Ctx {
                ctx: b.build(),
                proto,
            }
        };
        // The session is made on a third context that keeps the crate's mode, so that neither
        // A nor B holds it internally and both ask the get callback for it.
        let origin = support::server_ctx(proto, &cache, true);
        let (a, b) = (make(), make());
        let client = client_ctx(proto, true);
        let first = connect(&origin, &client, None, ServerClose::Clean);
        let session = first.session.unwrap();
        for server in [&a, &b] {
            let out = connect(server, &client, Some(&session), ServerClose::Clean);
            assert!(out.server_reused, "{proto:?} did not resume");
        }
        assert_eq!(cache.stats().hits, 2);
        drop(a);
        drop(b);
    }
}
}
