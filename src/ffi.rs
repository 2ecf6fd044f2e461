//! The crate's only unsafe code: OpenSSL calls that rust-openssl leaves `unsafe` or does not bind.
//!
//! Each call carries a `// SAFETY:` note. Everything else in the crate is safe Rust over the
//! `openssl` crate. (ARCHITECTURE.md puts the unsafe code in `cache/callbacks.rs`; the DTLS
//! server needs a few unbound calls too, so they share this one module instead.)
#![allow(unsafe_code)]

use std::time::Duration;

use foreign_types::ForeignTypeRef;
use libc::{c_int, c_void};
use openssl::error::ErrorStack;
use openssl::ssl::{SslContextBuilder, SslRef, SslSession, SslSessionRef};

extern "C" {
    fn SSL_SESSION_is_resumable(s: *const openssl_sys::SSL_SESSION) -> c_int;
}

/// `DTLS_CTRL_GET_TIMEOUT` from OpenSSL 3.0's `ssl.h` (the `DTLSv1_get_timeout` macro).
const DTLS_CTRL_GET_TIMEOUT: c_int = 73;

/// Installs the get-session callback (`SSL_CTX_sess_set_get_cb`).
///
/// The callback must only return sessions that are not held by any `SSL_CTX`'s internal cache
/// (a fresh `d2i` decode, or a decoded session this crate keeps and only shares while the
/// context's cache mode has `NO_INTERNAL_STORE`); the caller guarantees it.
pub(crate) fn set_get_session_callback<F>(builder: &mut SslContextBuilder, callback: F)
where
    F: Fn(&mut SslRef, &[u8]) -> Option<SslSession> + 'static + Sync + Send,
{
    // SAFETY: rust-openssl's contract is that the returned session is not associated with a
    // different SslContext. The cache's callback returns either a session freshly decoded from
    // DER (no owner, one reference that OpenSSL takes over) or a clone of a decoded session that
    // the cache only hands out when the context never stores sessions internally
    // (SSL_SESS_CACHE_NO_INTERNAL_STORE), so OpenSSL never links it into an internal cache list;
    // sharing it between SSLs is then what OpenSSL's own cache does for concurrent resumptions
    // (see ssl_sess.c lookup_sess_in_cache).
    unsafe { builder.set_get_session_callback(callback) }
}

/// Offers `session` for resumption on a client `ssl` (`SSL_set_session`).
pub(crate) fn set_client_session(
    ssl: &mut SslRef,
    session: &SslSessionRef,
) -> Result<(), ErrorStack> {
    // SAFETY: the client cache only holds sessions made by contexts whose cache mode includes
    // NO_INTERNAL_STORE, so no session is linked into any SSL_CTX's internal cache; SSL_set_session
    // takes its own reference.
    unsafe { ssl.set_session(session) }
}

/// Whether OpenSSL would still resume `session` (`SSL_SESSION_is_resumable`): false once
/// `SSL_CTX_remove_session` marked it, e.g. after a connection holding it ended uncleanly.
pub(crate) fn session_is_resumable(session: &SslSessionRef) -> bool {
    // SAFETY: the pointer comes from a live SslSessionRef; the function only reads flags.
    unsafe { SSL_SESSION_is_resumable(session.as_ptr()) == 1 }
}

/// Marks `ssl` as having sent close_notify (`SSL_set_shutdown(SSL_SENT_SHUTDOWN)`) so that
/// freeing it does not remove its session from the cache (`ssl_clear_bad_session`).
pub(crate) fn mark_shutdown_sent(ssl: &mut SslRef) {
    // SAFETY: ssl is a live SSL; SSL_get/set_shutdown only read and write an int field.
    unsafe {
        let state = openssl_sys::SSL_get_shutdown(ssl.as_ptr());
        openssl_sys::SSL_set_shutdown(ssl.as_ptr(), state | openssl_sys::SSL_SENT_SHUTDOWN);
    }
}

/// How long until the DTLS retransmission timer of `ssl` fires (`DTLSv1_get_timeout`), or
/// `None` when no timer runs.
pub(crate) fn dtls_get_timeout(ssl: &SslRef) -> Option<Duration> {
    let mut tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    // SAFETY: DTLS_CTRL_GET_TIMEOUT writes one struct timeval through parg, which points at a
    // live, properly aligned timeval on this stack frame.
    let r = unsafe {
        openssl_sys::SSL_ctrl(
            ssl.as_ptr(),
            DTLS_CTRL_GET_TIMEOUT,
            0,
            (&mut tv as *mut libc::timeval).cast::<c_void>(),
        )
    };
    (r == 1).then(|| {
        Duration::new(
            u64::try_from(tv.tv_sec).unwrap_or(0),
            u32::try_from(tv.tv_usec).unwrap_or(0).saturating_mul(1000),
        )
    })
}
