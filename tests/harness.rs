//! The test harness's own guarantees: an in-process handshake whose peer goes silent fails,
//! saying so, instead of hanging; a test run in a child process fails unless the child ran it
//! (a filter that matches nothing runs zero tests and exits 0, which used to pass).

mod support;

use std::os::unix::net::UnixStream;
use std::time::Duration;

use openssl::ssl::Ssl;
use support::child::{assert_ran_one, run_child, test_name, CHILD_LIMIT};
use support::{server_ctx, Bounded, Proto};

#[test]
fn a_handshake_whose_peer_goes_silent_fails_with_a_message() {
    let cache = openssl_session_cache::SessionCache::builder()
        .build()
        .unwrap();
    let server = server_ctx(Proto::Tls12, &cache, false);
    let (a, silent) = UnixStream::pair().unwrap();
    let io = Bounded::stream_within(a, "server side", Duration::from_millis(200));
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = Ssl::new(&server.ctx).unwrap().accept(io);
    }))
    .expect_err("the handshake waited on a silent peer without failing");
    let message = failed.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.contains("server side: nothing arrived from the other side"),
        "{message}"
    );
    drop(silent);
}

#[test]
fn a_child_that_ran_no_test_fails_its_parent() {
    // What a renamed test asked its child for by its old name: libtest runs nothing, exits 0.
    let name = test_name(module_path!(), "a_test_that_is_not_here");
    let run = run_child(&name, &[], CHILD_LIMIT);
    assert!(run.status.success(), "{run:?}");
    let caught = std::panic::catch_unwind(|| assert_ran_one(&name, &run));
    assert!(caught.is_err(), "a child that ran no test passed: {run:?}");
}

isolated_test! {
    /// And a child that runs its one test passes (its name taken from this function's).
    fn a_child_that_runs_its_test_passes() {
        assert!(support::child::is_child_for(&test_name(
            module_path!(),
            "a_child_that_runs_its_test_passes"
        )));
    }
}
