//! The only code that touches OpenSSL's session callbacks.
//!
//! Each closure captures an `Arc` of the cache's shared state (not the context's ex_data: in the
//! new and get callbacks `ssl.ssl_context()` is the *current* context, which differs from the
//! session context after an SNI switch). The callbacks run inside OpenSSL's `extern "C"` frames,
//! where a panic would abort the process, so each body runs under `catch_unwind` and a panic
//! becomes a cache miss and a log line.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use openssl::ssl::{ClientHelloResponse, SslContextBuilder};

use crate::cache::Inner;
use crate::ffi;

/// Registers the new, get and remove session callbacks on `ctx`.
pub(crate) fn install(ctx: &mut SslContextBuilder, inner: Arc<Inner>) {
    let on_new = inner.clone();
    // SSL_CTX_sess_set_new_cb. rust-openssl returns 1 to OpenSSL: the closure owns the reference.
    ctx.set_new_session_callback(move |ssl, session| {
        if catch_unwind(AssertUnwindSafe(|| on_new.on_new_session(ssl, &session))).is_err() {
            tracing::error!("BUG: panic in the new-session callback; session not cached");
        }
    });
    let on_remove = inner.clone();
    // SSL_CTX_sess_set_remove_cb. The session is borrowed; only its id is read.
    ctx.set_remove_session_callback(move |_ctx, session| {
        if catch_unwind(AssertUnwindSafe(|| on_remove.on_remove_session(session))).is_err() {
            tracing::error!("BUG: panic in the remove-session callback");
        }
    });
    if inner.store.is_remote() {
        let on_hello = inner.clone();
        // SSL_CTX_set_client_hello_cb: start the lookup, suspend the handshake until it is in.
        ctx.set_client_hello_callback(move |ssl, _alert| {
            Ok(
                catch_unwind(AssertUnwindSafe(|| on_hello.on_client_hello(ssl))).unwrap_or_else(
                    |_| {
                        tracing::error!("BUG: panic in the ClientHello callback; no lookup");
                        ClientHelloResponse::SUCCESS
                    },
                ),
            )
        });
    }
    // SSL_CTX_sess_set_get_cb. A returned session hands its one reference to OpenSSL.
    ffi::set_get_session_callback(ctx, move |ssl, id| {
        catch_unwind(AssertUnwindSafe(|| inner.on_get_session(ssl, id))).unwrap_or_else(|_| {
            inner.count_failed_lookup();
            tracing::error!("BUG: panic in the get-session callback; full handshake");
            None
        })
    });
}
