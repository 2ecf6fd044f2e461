//! Safe calls a user can make after `install` must not corrupt memory.
//!
//! The scenarios run in a child process (this test binary re-executed with an environment
//! variable), so that a hang or an abort shows up as a failed test instead of killing the run.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use openssl::ssl::SslSessionCacheMode;
use openssl_session_cache::SessionCache;
use support::{client_ctx, connect, server_builder, Ctx, Proto, ServerClose};

const SCENARIO: &str = "OSC_MEMORY_SAFETY_SCENARIO";

/// Runs `name` in a child process; fails if it crashes or does not finish within 20 s.
fn run_isolated(name: &str) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(SCENARIO, name)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            assert!(status.success(), "scenario {name} crashed: {status}\n{err}");
            return;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("scenario {name} hung (killed after 20 s)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn in_child() -> bool {
    std::env::var_os(SCENARIO).is_some()
}

/// Two contexts share one cache; after `install` the user turns OpenSSL's internal store back on
/// (a safe call). Each context then links whatever session object the get callback hands out into
/// its own internal list. A session object shared between both lists hangs
/// `SSL_CTX_flush_sessions` and double-frees when the contexts are dropped.
#[test]
fn internal_store_re_enabled_on_two_contexts_after_install() {
    if !in_child() {
        return run_isolated("internal_store_re_enabled_on_two_contexts_after_install");
    }
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
