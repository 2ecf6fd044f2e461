//! The crate's only unsafe code: OpenSSL calls that rust-openssl leaves `unsafe` or does not bind.
//!
//! Each call carries a `// SAFETY:` note. Everything else in the crate is safe Rust over the
//! `openssl` crate. (ARCHITECTURE.md puts the unsafe code in `cache/callbacks.rs`; the DTLS
//! server needs a few unbound calls too, so they share this one module instead.)
#![allow(unsafe_code)]

use std::io::{Read, Write};
#[cfg(feature = "server")]
use std::time::Duration;

use foreign_types::{ForeignType, ForeignTypeRef};
use libc::c_int;
#[cfg(feature = "server")]
use libc::c_void;
use openssl::error::ErrorStack;
use openssl::ssl::{
    ShutdownState, SslCipherRef, SslContextBuilder, SslRef, SslSession, SslSessionRef, SslStream,
};
use openssl::x509::X509Ref;
use zeroize::{Zeroize, Zeroizing};

extern "C" {
    fn SSL_SESSION_is_resumable(s: *const openssl_sys::SSL_SESSION) -> c_int;
    fn SSL_SESSION_dup(s: *const openssl_sys::SSL_SESSION) -> *mut openssl_sys::SSL_SESSION;
    fn SSL_SESSION_get0_cipher(
        s: *const openssl_sys::SSL_SESSION,
    ) -> *const openssl_sys::SSL_CIPHER;
    fn SSL_SESSION_get0_peer(s: *mut openssl_sys::SSL_SESSION) -> *mut openssl_sys::X509;
    fn SSL_get_ciphers(s: *const openssl_sys::SSL) -> *mut openssl_sys::stack_st_SSL_CIPHER;
    fn SSL_CIPHER_get_id(c: *const openssl_sys::SSL_CIPHER) -> u32;
    fn SSL_CTX_set_tlsext_ticket_key_evp_cb(
        ctx: *mut openssl_sys::SSL_CTX,
        cb: Option<TicketKeyCallback>,
    ) -> c_int;
    #[cfg(feature = "server")]
    fn DTLSv1_listen(s: *mut openssl_sys::SSL, client: *mut BioAddr) -> c_int;
    #[cfg(feature = "server")]
    fn BIO_ADDR_new() -> *mut BioAddr;
    #[cfg(feature = "server")]
    fn BIO_ADDR_free(a: *mut BioAddr);
    #[cfg(feature = "server")]
    fn SSL_free_buffers(ssl: *mut openssl_sys::SSL) -> c_int;
    #[cfg(feature = "server")]
    fn SSL_alloc_buffers(ssl: *mut openssl_sys::SSL) -> c_int;
    fn OSSL_PARAM_construct_utf8_string(
        key: *const libc::c_char,
        buf: *mut libc::c_char,
        bsize: libc::size_t,
    ) -> openssl_sys::OSSL_PARAM;
    #[cfg(feature = "server")]
    fn SSL_CTX_set_security_callback(ctx: *mut openssl_sys::SSL_CTX, cb: Option<SecurityCallback>);
    #[cfg(feature = "server")]
    fn SSL_CTX_get_security_callback(ctx: *const openssl_sys::SSL_CTX) -> Option<SecurityCallback>;
    #[cfg(feature = "server")]
    fn SSL_CTX_set0_security_ex_data(ctx: *mut openssl_sys::SSL_CTX, ex: *mut c_void);
    #[cfg(feature = "server")]
    fn SSL_CTX_get0_security_ex_data(ctx: *const openssl_sys::SSL_CTX) -> *mut c_void;
    #[cfg(feature = "server")]
    fn SSL_CIPHER_get_bits(c: *const openssl_sys::SSL_CIPHER, alg_bits: *mut c_int) -> c_int;
}

/// `int (*)(const SSL *s, const SSL_CTX *ctx, int op, int bits, int nid, void *other, void *ex)`,
/// OpenSSL's security callback.
#[cfg(feature = "server")]
type SecurityCallback = unsafe extern "C" fn(
    *const openssl_sys::SSL,
    *const openssl_sys::SSL_CTX,
    c_int,
    c_int,
    c_int,
    *mut c_void,
    *mut c_void,
) -> c_int;

/// `int (*)(SSL *, unsigned char key_name[16], unsigned char iv[16], EVP_CIPHER_CTX *,
/// EVP_MAC_CTX *, int enc)`.
type TicketKeyCallback = unsafe extern "C" fn(
    *mut openssl_sys::SSL,
    *mut u8,
    *mut u8,
    *mut openssl_sys::EVP_CIPHER_CTX,
    *mut openssl_sys::EVP_MAC_CTX,
    c_int,
) -> c_int;

/// `DTLS_CTRL_GET_TIMEOUT` from OpenSSL 3.0's `ssl.h` (the `DTLSv1_get_timeout` macro).
#[cfg(feature = "server")]
const DTLS_CTRL_GET_TIMEOUT: c_int = 73;

/// A session object of its own, made by the get-session callback and handed to OpenSSL.
///
/// Only [`fresh_session`] and [`dup_session`] make one: an `SSL_SESSION` that nothing else holds
/// (no owning context, not linked into any internal cache list, one reference). This is what
/// makes the get callback's contract hold whatever the cache mode of the context asking for it.
pub(crate) struct FreshSession(SslSession);

impl FreshSession {
    /// The session object itself, to keep (the decoded tier keeps a copy of its own).
    pub(crate) fn into_inner(self) -> SslSession {
        self.0
    }
}

impl std::ops::Deref for FreshSession {
    type Target = SslSessionRef;

    fn deref(&self) -> &SslSessionRef {
        &self.0
    }
}

impl std::fmt::Debug for FreshSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FreshSession").finish_non_exhaustive()
    }
}

/// Wraps a session just decoded from DER (`d2i_SSL_SESSION` returns an unowned object with one
/// reference).
pub(crate) fn fresh_session(decoded: SslSession) -> FreshSession {
    FreshSession(decoded)
}

/// A copy of `session` as a new object (`SSL_SESSION_dup`): no owner, no list links, one
/// reference; certificates are shared by reference count, so it is cheap. `None` if OpenSSL
/// cannot allocate.
pub(crate) fn dup_session(session: &SslSessionRef) -> Option<FreshSession> {
    // SAFETY: the pointer comes from a live SslSessionRef and SSL_SESSION_dup only reads it
    // (under no lock that a callback could hold: it takes none). It returns NULL or a new session
    // with exactly one reference, which SslSession::from_ptr takes over.
    let ptr = unsafe { SSL_SESSION_dup(session.as_ptr()) };
    // SAFETY: ptr is non-null and owned (one reference, see above).
    (!ptr.is_null()).then(|| FreshSession(unsafe { SslSession::from_ptr(ptr) }))
}

/// Installs the get-session callback (`SSL_CTX_sess_set_get_cb`).
///
/// The callback returns a [`FreshSession`]: an object no context holds, so whatever OpenSSL does
/// with it (link it into the internal cache of the asking context when the user re-enabled the
/// internal store after `install`, mark it not resumable, free it) touches nothing else.
pub(crate) fn set_get_session_callback<F>(builder: &mut SslContextBuilder, callback: F)
where
    F: Fn(&mut SslRef, &[u8]) -> Option<FreshSession> + 'static + Sync + Send,
{
    // SAFETY: rust-openssl's contract is that the returned session is not associated with a
    // different SslContext. Every session the closure returns is a FreshSession, and those are
    // only made by fresh_session (a d2i decode: no owner, one reference) or dup_session
    // (SSL_SESSION_dup: no owner, no list links, one reference). rust-openssl hands that single
    // reference to OpenSSL (copy = 0). No other SSL_CTX holds the object, at the time of the call
    // or later, whatever cache mode any context is switched to afterwards: the crate keeps its
    // own decoded copies and never returns them, only duplicates of them.
    unsafe { builder.set_get_session_callback(move |ssl, id| callback(ssl, id).map(|s| s.0)) }
}

/// Offers `session` for resumption on a client `ssl` (`SSL_set_session`).
pub(crate) fn set_client_session(
    ssl: &mut SslRef,
    session: &SslSessionRef,
) -> Result<(), ErrorStack> {
    // The client cache's copy may already be linked into a client context's internal cache
    // (a user may turn it on after `install`): offer a duplicate of our own instead.
    let own = dup_session(session).ok_or_else(ErrorStack::get)?;
    // SAFETY: `own` is a new SSL_SESSION no SSL_CTX holds (SSL_SESSION_dup: no owner, no list
    // links); SSL_set_session takes its own reference, and `own` drops ours afterwards. If the
    // handshake links it into this context's internal cache, no other context ever sees it.
    unsafe { ssl.set_session(&own.0) }
}

/// Whether OpenSSL would still resume `session` (`SSL_SESSION_is_resumable`): false once
/// `SSL_CTX_remove_session` marked it, e.g. after a connection holding it ended uncleanly.
pub(crate) fn session_is_resumable(session: &SslSessionRef) -> bool {
    // SAFETY: the pointer comes from a live SslSessionRef; the function only reads flags.
    unsafe { SSL_SESSION_is_resumable(session.as_ptr()) == 1 }
}

/// OpenSSL's opaque `BIO_ADDR`.
#[repr(C)]
#[cfg(feature = "server")]
struct BioAddr {
    _opaque: [u8; 0],
}

/// Runs `DTLSv1_listen` on a fresh server `ssl` whose read BIO holds one ClientHello carrying a
/// cookie: OpenSSL reads it, checks the cookie with the context's verify callback, sets the
/// handshake and record sequence numbers as after its own HelloVerifyRequest and keeps the
/// record for the handshake, which then goes on from that ClientHello. Returns whether it did
/// (`false`: the cookie or the record was refused; OpenSSL may have written a
/// HelloVerifyRequest to the write BIO, which the caller discards).
#[cfg(feature = "server")]
pub(crate) fn dtls_listen(ssl: &SslRef) -> bool {
    // SAFETY: BIO_ADDR_new allocates a zeroed address or returns NULL (checked).
    let client = unsafe { BIO_ADDR_new() };
    if client.is_null() {
        return false;
    }
    // SAFETY: ssl is a live SSL with its BIOs set (an SslStream's); DTLSv1_listen reads from
    // the read BIO, may write to the write BIO and writes the peer address (if the BIO knows
    // one) into `client`, a live BIO_ADDR. The SSL's state sits behind rust-openssl's opaque
    // (UnsafeCell) type, so changing it through `&SslRef` is sound; the caller owns the stream.
    let r = unsafe { DTLSv1_listen(ssl.as_ptr(), client) };
    // SAFETY: `client` came from BIO_ADDR_new and is freed once.
    unsafe { BIO_ADDR_free(client) };
    if r <= 0 {
        // Leave no error on the thread's queue for the next OpenSSL call to trip over.
        let _ = ErrorStack::get();
    }
    r == 1
}

/// How long until the DTLS retransmission timer of `ssl` fires (`DTLSv1_get_timeout`), or
/// `None` when no timer runs.
#[cfg(feature = "server")]
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

/// Whether `SSL_free_buffers` of the OpenSSL running here is one [`LeanStream`] relies on: from
/// the releases that refuse while a record is half read, a write is pending or decrypted data is
/// unread (the fix of CVE-2024-4741: 3.0.14, 3.1.6, 3.2.2, 3.3.1, and every release since), on
/// either record layer:
/// - 3.0 and 3.1 (`ssl/record/ssl3_buffer.c`, `ssl3_release_read_buffer` and
///   `ssl3_release_write_buffer`): the DTLS read path sets a missing read buffer up again, the
///   DTLS write path does not (see [`LeanStream`]);
/// - 3.2 and later, the record layer rewritten as `OSSL_RECORD_METHOD`s
///   (`ssl/record/methods/tls_common.c`, `tls_free_buffers` and `tls_alloc_buffers`, which
///   `SSL_free_buffers` and `SSL_alloc_buffers` call for the current read and write record
///   layers): `dtls_get_more_records` (`dtls_meth.c`) sets a missing read buffer up, and every
///   DTLS record write sets its write buffer up first (`tls_write_records_default` calls
///   `allocate_write_buffers`, for DTLS `tls_allocate_write_buffers_default`, i.e.
///   `tls_setup_write_buffer`). Checked on 3.6.2 and 4.0.3.
///
/// A later major release is not assumed to keep that shape: there the buffers are simply kept.
#[cfg(feature = "server")]
fn free_buffers_supported(version: i64) -> bool {
    (0x3000_00e0..0x3010_0000).contains(&version)
        || (0x3010_0060..0x3020_0000).contains(&version)
        || (0x3020_0020..0x3030_0000).contains(&version)
        || (0x3030_0010..0x5000_0000).contains(&version)
}

/// Whether `SSL_MODE_RELEASE_BUFFERS` releases DTLS record buffers in the OpenSSL running here:
/// on the record layer of 3.2 and later (`ssl/record/methods/tls_common.c`:
/// `tls_release_record` frees the read buffer once its records are consumed,
/// `tls_retry_write_records` the write buffer once a write went out, neither with a DTLS
/// exception), not on 3.0/3.1, whose `ssl3_read_n` and `ssl3_write_bytes` skip DTLS. It matters
/// for the one buffer [`LeanStream::release_buffers`] cannot reach there: a DTLS server's last
/// flight keeps the epoch-0 write record layer for the ChangeCipherSpec it may retransmit
/// (`saved_retransmit_state`, `ssl/statem/statem_dtls.c`, freed only with the buffered flight),
/// and `SSL_free_buffers` frees the current layers only. With the mode, that layer frees its
/// write buffer as soon as the ChangeCipherSpec went out (16.6 KB of the 88.9 KB an idle peer
/// held on 4.0.3, `examples/idle_peer_memory`); a later retransmission sets it up again
/// (`tls_allocate_write_buffers_default`).
#[cfg(feature = "server")]
pub(crate) fn release_buffers_mode_covers_dtls(version: i64) -> bool {
    version >= 0x3020_0000
}

/// The mode bits set on `ssl` (`SSL_get_mode`).
#[cfg(all(test, feature = "server"))]
pub(crate) fn ssl_mode(ssl: &SslRef) -> openssl::ssl::SslMode {
    // SAFETY: ssl is live; SSL_CTRL_MODE with larg 0 ORs nothing in and returns the mode.
    let bits = unsafe {
        openssl_sys::SSL_ctrl(
            ssl.as_ptr(),
            openssl_sys::SSL_CTRL_MODE,
            0,
            std::ptr::null_mut(),
        )
    };
    openssl::ssl::SslMode::from_bits_retain(bits as _)
}

/// A DTLS connection whose record-layer buffers are released while it is idle.
///
/// An established DTLS connection holds a read buffer (16.7 KB) and a write buffer (16.6 KB)
/// whether or not anything moves. On OpenSSL 3.0 and 3.1 `SSL_MODE_RELEASE_BUFFERS` does not
/// release them for DTLS (3.0 tests `!SSL_IS_DTLS(s)` where the shared paths release them,
/// `ssl3_read_n` and `ssl3_write_bytes`, and DTLS's own read and write paths never do), so
/// [`release_buffers`](Self::release_buffers) calls `SSL_free_buffers`, and every call into
/// OpenSSL that may read or write on the connection goes through [`with`](Self::with), which sets
/// them up again first (`SSL_alloc_buffers`). That is needed on 3.0: its DTLS read path sets
/// its buffers up when they are missing, but its write path (`do_dtls1_write`, reached by
/// `SSL_write`, `SSL_shutdown`, alerts, and the retransmission of a flight) writes through the
/// write buffer's pointer without checking it. The record layer of 3.2 and later sets both up
/// itself when missing (see [`free_buffers_supported`]); `with` costs one allocation per buffer
/// there too, as OpenSSL would make it anyway. On 3.2 and later a server's last flight keeps the
/// epoch-0 write record layer (for the ChangeCipherSpec it may retransmit,
/// `saved_retransmit_state` in `ssl/statem/statem_dtls.c`), whose write buffer `SSL_free_buffers`
/// does not reach (it frees the current layers' only); the server's `SSL_MODE_RELEASE_BUFFERS`
/// frees that one (see [`release_buffers_mode_covers_dtls`]).
#[cfg(feature = "server")]
pub(crate) struct LeanStream<S> {
    /// Private: the only `&mut` to it is the one [`with`](Self::with) lends.
    stream: SslStream<S>,
    /// `SSL_free_buffers` released the buffers and nothing set them up again yet.
    released: bool,
}

#[cfg(feature = "server")]
impl<S: Read + Write> LeanStream<S> {
    /// Wraps `stream` (its buffers, if any, are kept until [`release_buffers`](Self::release_buffers)).
    pub(crate) fn new(stream: SslStream<S>) -> Self {
        Self {
            stream,
            released: false,
        }
    }

    /// The connection, to read its state (cipher, timer, session, certificates).
    pub(crate) fn ssl(&self) -> &SslRef {
        self.stream.ssl()
    }

    /// The transport under the connection.
    pub(crate) fn get_ref(&self) -> &S {
        self.stream.get_ref()
    }

    /// The transport under the connection (to queue datagrams and take what OpenSSL wrote).
    pub(crate) fn get_mut(&mut self) -> &mut S {
        self.stream.get_mut()
    }

    /// Runs `f` on the stream with its buffers set up. `None`, and `f` is not run, if they were
    /// released and OpenSSL cannot allocate them again.
    pub(crate) fn with<R>(&mut self, f: impl FnOnce(&mut SslStream<S>) -> R) -> Option<R> {
        if self.released {
            // SAFETY: the SSL is live (owned by `stream`). SSL_alloc_buffers is
            // ssl3_setup_buffers on 3.0/3.1 and tls_alloc_buffers of the current read and
            // write record layers on 3.2+: it allocates a missing read buffer and a missing (or
            // differently sized) write buffer, marked empty, and touches nothing else (with
            // data pending, the buffers are there and it returns 1); it returns 0, leaving a
            // buffer missing, only when an allocation failed.
            if unsafe { SSL_alloc_buffers(self.stream.ssl().as_ptr()) } != 1 {
                return None;
            }
            self.released = false;
        }
        Some(f(&mut self.stream))
    }

    /// Releases the connection's read and write buffers (`SSL_free_buffers`) if nothing is
    /// pending in them; returns whether they are released now. A no-op where the OpenSSL
    /// running here is not one whose `SSL_free_buffers` this relies on (see
    /// [`free_buffers_supported`]).
    pub(crate) fn release_buffers(&mut self) -> bool {
        if !self.released && free_buffers_supported(openssl::version::number()) {
            // SAFETY: the SSL is live (owned by `stream`). In the releases free_buffers_supported
            // accepts, SSL_free_buffers returns 0 and changes nothing while a record is half
            // read, a write is pending or decrypted data is unread (3.0/3.1:
            // ssl3_release_*_buffer behind RECORD_LAYER_read_pending / write_pending checks;
            // 3.2+: tls_free_buffers checks curr_rec/num_recs/num_released, rbuf.left,
            // rstate == SSL_ST_READ_BODY and nextwbuf/numwpipes); otherwise it frees the read and
            // write buffers, leaving null pointers, no write pipes and no current packet. DTLS
            // records queued for a later epoch or read early own buffers of their own (3.0:
            // `rlayer.d`; 3.2+: the read layer's `unprocessed_rcds`, moved or copied out of
            // rbuf by dtls_rlayer_buffer_record), and the retained last flight
            // (`d1->sent_messages`, `init_buf`, on 3.2+ with its saved write layer) is not
            // touched. Afterwards a null buffer is only dereferenced by the 3.0/3.1 DTLS write
            // path (see the type's docs; 3.2+ sets a missing buffer up on every read and
            // write), and OpenSSL only runs it inside the calls that do I/O on the connection:
            // SSL_write, SSL_shutdown, SSL_do_handshake (SSL_accept, SSL_connect), SSL_read,
            // SSL_peek (the `_ex` forms, and the TLS 1.3-only early data and stateless calls)
            // and DTLSv1_handle_timeout. rust-openssl makes all but the last only on an
            // `SslStream` (`&mut`), and none of them, nor any other call that writes, on
            // `SslRef` (what reads the record layer there, such as SSL_pending, reads lengths,
            // never the buffers); nothing in this crate sends DTLS_CTRL_HANDLE_TIMEOUT. This
            // type never lends `&mut SslStream` but in `with`, after SSL_alloc_buffers
            // succeeded, and `ssl()` lends only `&SslRef`; callbacks OpenSSL runs on this
            // connection run inside those calls and are given an `SslRef`, not the stream.
            // Freeing the SSL with null buffers is fine (OPENSSL_free(NULL)).
            self.released = unsafe { SSL_free_buffers(self.stream.ssl().as_ptr()) } == 1;
        }
        self.released
    }

    /// Whether the buffers are released now.
    #[cfg(test)]
    pub(crate) fn buffers_released(&self) -> bool {
        self.released
    }

    /// [`keep_resumable`] on the stream, which needs none of its buffers.
    pub(crate) fn keep_resumable(&mut self) {
        keep_resumable(&mut self.stream);
    }
}

/// Marks the connection's close_notify as sent (`SSL_set_shutdown(SSL_SENT_SHUTDOWN)`), which
/// keeps its session resumable when it is freed (see `SessionCache::keep_resumable`); writes
/// nothing.
pub(crate) fn keep_resumable<S: Read + Write>(stream: &mut SslStream<S>) {
    let state = stream.get_shutdown();
    stream.set_shutdown(state | ShutdownState::SENT);
}

/// The body of extension `ext_type` in the ClientHello being processed on `ssl`
/// (`SSL_client_hello_get0_ext`), or `None` when the client did not send it or no ClientHello is
/// being processed (outside the ClientHello callback).
pub(crate) fn client_hello_ext(ssl: &SslRef, ext_type: u16) -> Option<&[u8]> {
    let mut out: *const u8 = std::ptr::null();
    let mut len: libc::size_t = 0;
    // SAFETY: ssl is a live SSL. SSL_client_hello_get0_ext returns 0 unless a ClientHello is
    // being processed (s->clienthello != NULL, i.e. inside the ClientHello callback), and
    // otherwise points `out` into that ClientHello's buffer, which lives until the handshake
    // moves on; that needs `&mut SslRef`, which the shared borrow of `ssl` tied to the returned
    // slice rules out.
    let found = unsafe {
        openssl_sys::SSL_client_hello_get0_ext(
            ssl.as_ptr(),
            libc::c_uint::from(ext_type),
            &mut out,
            &mut len,
        )
    };
    if found != 1 || out.is_null() {
        return None;
    }
    // SAFETY: on success OpenSSL set `out` to `len` readable bytes (see above for the lifetime).
    Some(unsafe { std::slice::from_raw_parts(out, len) })
}

/// The highest protocol version `ssl` may negotiate (`SSL_get_max_proto_version`), or `None`
/// when no maximum is set (the library's highest).
pub(crate) fn max_proto_version(ssl: &SslRef) -> Option<i32> {
    // SAFETY: ssl is a live SSL; SSL_CTRL_GET_MAX_PROTO_VERSION only reads an int field.
    let v = unsafe { openssl_sys::SSL_get_max_proto_version(ssl.as_ptr()) };
    (v != 0).then_some(v)
}

/// `SSL_SECOP_OTHER_CIPHER` and the three cipher operations of OpenSSL's `ssl.h`
/// (`SSL_SECOP_CIPHER_SUPPORTED`, `_SHARED`, `_CHECK`): the security callback's questions about
/// one cipher suite (`other` points at its `SSL_CIPHER`, `bits` is its strength).
#[cfg(feature = "server")]
const SSL_SECOP_OTHER_CIPHER: c_int = 1 << 16;
#[cfg(feature = "server")]
const SECOP_CIPHER_OPS: [c_int; 3] = [
    1 | SSL_SECOP_OTHER_CIPHER,
    2 | SSL_SECOP_OTHER_CIPHER,
    3 | SSL_SECOP_OTHER_CIPHER,
];

/// The TLS 1.2 / DTLS 1.2 AES-CCM-8 suites (`TLS1_CK_*_CCM_8` in OpenSSL's `tls1.h`): RSA,
/// DHE-RSA, PSK, DHE-PSK and ECDHE-ECDSA, each with AES-128 and AES-256.
#[cfg(feature = "server")]
const CCM8_SUITES: [u32; 10] = [
    0x0300_C0A0,
    0x0300_C0A1,
    0x0300_C0A2,
    0x0300_C0A3,
    0x0300_C0A8,
    0x0300_C0A9,
    0x0300_C0AA,
    0x0300_C0AB,
    0x0300_C0AE,
    0x0300_C0AF,
];

/// Whether the OpenSSL running here may rate the CCM8 suites below their key size. OpenSSL 3.0
/// gives them the key's strength (128 or 256 bits); the cipher table of 3.2 and later
/// (`ssl/s3_lib.c`, the `TLS1_CK_*_CCM_8` entries: "CCM8 uses a short tag, so we have a low
/// security strength") gives them 64, which every security level above 0 refuses
/// (`ssl/ssl_cert.c` `ssl_security_default_callback`: `bits < minbits`, 80 bits at level 1,
/// 112 at level 2, the default since 3.2). 3.1 is counted in: where a release still rates them by
/// key size, [`ccm8_security_callback`] changes nothing.
#[cfg(feature = "server")]
pub(crate) fn ccm8_rated_below_key_size(version: i64) -> bool {
    version >= 0x3010_0000
}

/// Makes the context's security level judge the AES-CCM-8 suites by their key size (128 or 256
/// bits), as OpenSSL 3.0 does, instead of by their 8-byte tag (64 bits: refused at every level
/// above 0 on OpenSSL 3.2 and later). Every other question the security level answers
/// (certificate keys, signature algorithms, groups, versions, other suites) is still answered by
/// the context's own callback, unchanged. Returns whether the callback is installed: not where
/// OpenSSL still rates them by key size (3.0, nothing to do), and not on a context whose security
/// callback already carries data of its own (`SSL_CTX_set0_security_ex_data`: a callback some
/// C code installed, which is left alone).
#[cfg(feature = "server")]
pub(crate) fn rate_ccm8_by_key_size(builder: &mut SslContextBuilder) -> bool {
    if !ccm8_rated_below_key_size(openssl::version::number()) {
        return false;
    }
    let ctx = builder.as_ptr();
    // SAFETY: ctx is the live SSL_CTX being built; both getters only read its CERT's fields.
    let (previous, ex) = unsafe {
        (
            SSL_CTX_get_security_callback(ctx),
            SSL_CTX_get0_security_ex_data(ctx),
        )
    };
    let Some(previous) = previous else {
        return false;
    };
    if !ex.is_null() {
        return false;
    }
    if previous as usize == ccm8_security_callback as SecurityCallback as usize {
        return true;
    }
    // SAFETY: ctx is live. The previous callback (OpenSSL's default, which takes no data: ex was
    // NULL) is kept as the security data, a function pointer in a `void *`, which
    // ccm8_security_callback reads back and calls with the NULL data it had; OpenSSL copies
    // callback and data together into every SSL made from the context (ssl_cert_dup) and into an
    // SSL switched to it (SSL_set_SSL_CTX), so the callback always finds its own data. Neither
    // can be changed through rust-openssl's safe API afterwards (it binds no security callback
    // or data setter); `set_security_level` only changes the level, which the previous callback
    // still reads.
    unsafe {
        SSL_CTX_set0_security_ex_data(ctx, previous as *mut c_void);
        SSL_CTX_set_security_callback(ctx, Some(ccm8_security_callback));
    }
    true
}

/// The security callback [`rate_ccm8_by_key_size`] installs: for the cipher questions about an
/// AES-CCM-8 suite it passes the key's strength instead of the suite's rating to the callback
/// it replaced (kept in `ex`); everything else goes to that callback unchanged. Never unwinds
/// (no Rust code here can panic).
#[cfg(feature = "server")]
unsafe extern "C" fn ccm8_security_callback(
    s: *const openssl_sys::SSL,
    ctx: *const openssl_sys::SSL_CTX,
    op: c_int,
    bits: c_int,
    nid: c_int,
    other: *mut c_void,
    ex: *mut c_void,
) -> c_int {
    // SAFETY: OpenSSL passes the data installed with this callback (see rate_ccm8_by_key_size):
    // the previous callback's function pointer, never NULL there. A NULL (impossible through the
    // safe API) refuses the operation instead of calling through it.
    let previous = unsafe { std::mem::transmute::<*mut c_void, Option<SecurityCallback>>(ex) };
    let Some(previous) = previous else {
        return 0;
    };
    let mut bits = bits;
    if SECOP_CIPHER_OPS.contains(&op) && !other.is_null() {
        let cipher = other.cast::<openssl_sys::SSL_CIPHER>().cast_const();
        // SAFETY: for the cipher operations `other` is the SSL_CIPHER being judged, an entry of
        // OpenSSL's static cipher tables; both getters only read it.
        unsafe {
            if CCM8_SUITES.contains(&SSL_CIPHER_get_id(cipher)) {
                let mut key_bits: c_int = 0;
                SSL_CIPHER_get_bits(cipher, &mut key_bits);
                bits = bits.max(key_bits);
            }
        }
    }
    // SAFETY: the callback OpenSSL installed (or that was installed) before this one, called with
    // the arguments OpenSSL passed and the NULL data it was installed with.
    unsafe { previous(s, ctx, op, bits, nid, other, std::ptr::null_mut()) }
}

/// The cipher suite `session` was made with (`SSL_SESSION_get0_cipher`).
pub(crate) fn session_cipher(session: &SslSessionRef) -> Option<&SslCipherRef> {
    // SAFETY: the session is live; SSL_SESSION_get0_cipher returns NULL or a pointer into
    // OpenSSL's static cipher tables, which outlive every session (so borrowing it for the
    // session's lifetime is conservative).
    let c = unsafe { SSL_SESSION_get0_cipher(session.as_ptr()) };
    // SAFETY: non-null and valid for at least the session's lifetime (see above).
    (!c.is_null()).then(|| unsafe { SslCipherRef::from_ptr(c.cast_mut()) })
}

/// The peer (client) certificate kept in `session` (`SSL_SESSION_get0_peer`), borrowed.
pub(crate) fn session_peer(session: &SslSessionRef) -> Option<&X509Ref> {
    // SAFETY: the session is live; SSL_SESSION_get0_peer only reads a field and returns NULL or
    // a certificate the session holds a reference to, which lives as long as the session does
    // and is not changed through a shared session (only d2i and the handshake set it).
    let x = unsafe { SSL_SESSION_get0_peer(session.as_ptr()) };
    // SAFETY: non-null, owned by the session for the borrow's lifetime (see above).
    (!x.is_null()).then(|| unsafe { X509Ref::from_ptr(x) })
}

/// Whether the cipher with id `cipher_id` (`SSL_CIPHER_get_id`) is in the list `ssl` offers
/// now (`SSL_get_ciphers`: the connection's list, initially its context's).
pub(crate) fn offers_cipher(ssl: &SslRef, cipher_id: u32) -> bool {
    // SAFETY: ssl is live; SSL_get_ciphers returns NULL or the connection's (or its context's)
    // cipher stack, which lives while ssl is borrowed (changing it needs `&mut SslRef`).
    let stack = unsafe { SSL_get_ciphers(ssl.as_ptr()) };
    if stack.is_null() {
        return false;
    }
    let stack = stack.cast::<openssl_sys::OPENSSL_STACK>();
    // SAFETY: `stack` is a valid STACK_OF(SSL_CIPHER) (see above); OPENSSL_sk_num and
    // OPENSSL_sk_value only read it, and each value is a pointer into the static cipher tables.
    unsafe {
        let n = openssl_sys::OPENSSL_sk_num(stack);
        (0..n).any(|i| {
            let c = openssl_sys::OPENSSL_sk_value(stack, i).cast::<openssl_sys::SSL_CIPHER>();
            !c.is_null() && SSL_CIPHER_get_id(c) == cipher_id
        })
    }
}

/// The id of `cipher` (`SSL_CIPHER_get_id`).
pub(crate) fn cipher_id(cipher: &SslCipherRef) -> u32 {
    // SAFETY: the cipher is a live table entry; the call only reads a field.
    unsafe { SSL_CIPHER_get_id(cipher.as_ptr()) }
}

// The ticket key callback's side of the ticket keys: what it asks (`TicketKeySource`) and
// what it is handed (`EpochKey`). `tickets.rs` implements the trait; this file knows nothing of it.

/// Length of a ticket key name (`TLSEXT_KEYNAME_LENGTH`).
pub(crate) const KEY_NAME_LEN: usize = 16;
/// AES-256 key length.
pub(crate) const AES_KEY_LEN: usize = 32;
/// HMAC-SHA256 key length.
pub(crate) const HMAC_KEY_LEN: usize = 32;

/// The keys for one (secret, epoch): what OpenSSL's ticket callback needs.
#[derive(Clone)]
pub(crate) struct EpochKey {
    pub(crate) name: [u8; KEY_NAME_LEN],
    // Boxed: the map holding these moves entries around; key bytes stay put and are wiped.
    pub(crate) aes: Box<Zeroizing<[u8; AES_KEY_LEN]>>,
    pub(crate) hmac: Box<Zeroizing<[u8; HMAC_KEY_LEN]>>,
}

/// What the ticket callback does with a ticket it was shown.
pub(crate) enum Opened {
    /// Unknown key name, or a key past its window: a full handshake.
    Refused,
    /// Sealed under the current key: resume.
    Current(EpochKey),
    /// Sealed under an earlier key still in its window: resume and issue a new ticket.
    Renew(EpochKey),
}

impl Drop for EpochKey {
    fn drop(&mut self) {
        self.name.zeroize();
    }
}

/// What OpenSSL's ticket callback asks of the keys ([`ticket_key_callback`] calls it; `TicketKeys`
/// implements it).
pub(crate) trait TicketKeySource: Send + Sync {
    /// The key to seal a new ticket with.
    fn sealing_key(&self) -> Option<EpochKey>;
    /// The key a ticket named `name` was sealed with, and whether to renew it.
    fn opening_key(&self, name: &[u8; KEY_NAME_LEN]) -> Opened;
}

/// The ticket keys a context holds (its ex_data), read by [`ticket_key_callback`].
struct TicketSlot(std::sync::Arc<dyn TicketKeySource>);

crate::ex_data::ex_data_index! {
    fn ticket_slot_index() -> Index<openssl::ssl::SslContext, TicketSlot>
}

/// Installs `keys` as the ticket key callback of `ctx`
/// (`SSL_CTX_set_tlsext_ticket_key_evp_cb`), keeping them in the context's ex_data.
pub(crate) fn set_ticket_key_callback(
    ctx: &mut SslContextBuilder,
    keys: std::sync::Arc<dyn TicketKeySource>,
) -> Result<(), ErrorStack> {
    let index = ticket_slot_index()?;
    ctx.set_ex_data(index, TicketSlot(keys));
    // SAFETY: ctx is a live SSL_CTX being built; the callback is a plain extern "C" function
    // with the signature OpenSSL 3.0 declares, and it reads only what the context's ex_data
    // holds (set just above, replaced in place and freed with the context).
    let r =
        unsafe { SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx.as_ptr(), Some(ticket_key_callback)) };
    if r == 1 {
        Ok(())
    } else {
        Err(ErrorStack::get())
    }
}

/// OpenSSL's ticket key callback: seals (`enc == 1`) or opens (`enc == 0`) a ticket with the
/// keys of the connection's context. Returns 1 (done), 2 (opened with an older key: renew the
/// ticket), 0 (no ticket / unknown key: full handshake) or -1 (error). Never unwinds.
unsafe extern "C" fn ticket_key_callback(
    ssl: *mut openssl_sys::SSL,
    key_name: *mut u8,
    iv: *mut u8,
    cipher: *mut openssl_sys::EVP_CIPHER_CTX,
    mac: *mut openssl_sys::EVP_MAC_CTX,
    enc: c_int,
) -> c_int {
    let run = std::panic::AssertUnwindSafe(|| {
        // SAFETY: OpenSSL passes the live SSL whose ticket is being made or read.
        let ssl_ref = unsafe { SslRef::from_ptr(ssl) };
        let Ok(index) = ticket_slot_index() else {
            return -1;
        };
        let Some(TicketSlot(keys)) = ssl_ref.ssl_context().ex_data(index) else {
            return 0; // a context without keys (an SNI switch): no ticket
        };
        // SAFETY: OpenSSL passes key_name[TLSEXT_KEYNAME_LENGTH] and iv[EVP_MAX_IV_LENGTH]
        // buffers, writable when sealing and filled from the ticket when opening.
        let (name, iv) = unsafe {
            (
                &mut *key_name.cast::<[u8; KEY_NAME_LEN]>(),
                std::slice::from_raw_parts_mut(iv, 16),
            )
        };
        let (key, status) = if enc == 1 {
            let Some(key) = keys.sealing_key() else {
                return 0;
            };
            if openssl::rand::rand_bytes(iv).is_err() {
                return -1;
            }
            name.copy_from_slice(&key.name);
            (key, 1)
        } else {
            match keys.opening_key(name) {
                Opened::Refused => return 0,
                Opened::Current(key) => (key, 1),
                Opened::Renew(key) => (key, 2),
            }
        };
        let mut digest = *b"SHA256\0";
        // SAFETY: cipher and mac are the live contexts OpenSSL passes for this ticket; the key
        // and IV buffers hold 32 and 16 bytes (AES-256-CBC); the params array lives across the
        // EVP_MAC_init call and names a NUL-terminated digest.
        unsafe {
            let params = [
                OSSL_PARAM_construct_utf8_string(
                    c"digest".as_ptr(),
                    digest.as_mut_ptr().cast::<libc::c_char>(),
                    0,
                ),
                openssl_sys::OSSL_PARAM_construct_end(),
            ];
            let init = if enc == 1 {
                openssl_sys::EVP_EncryptInit_ex(
                    cipher,
                    openssl_sys::EVP_aes_256_cbc(),
                    std::ptr::null_mut(),
                    key.aes.as_ptr(),
                    iv.as_ptr(),
                )
            } else {
                openssl_sys::EVP_DecryptInit_ex(
                    cipher,
                    openssl_sys::EVP_aes_256_cbc(),
                    std::ptr::null_mut(),
                    key.aes.as_ptr(),
                    iv.as_ptr(),
                )
            };
            if init != 1
                || openssl_sys::EVP_MAC_init(
                    mac,
                    key.hmac.as_ptr(),
                    key.hmac.len(),
                    params.as_ptr(),
                ) != 1
            {
                return -1;
            }
        }
        status
    });
    std::panic::catch_unwind(run).unwrap_or(-1)
}

/// The TLS 1.2 PRF (RFC 5246 §5), `PRF(secret, label, seed)` with `digest` as its hash, through
/// OpenSSL's own "TLS1-PRF" KDF (`EVP_KDF_fetch`, `EVP_KDF_derive`): fills `out`.
#[cfg(feature = "server")]
pub(crate) fn tls1_prf(
    digest: openssl::hash::MessageDigest,
    secret: &[u8],
    label: &[u8],
    seed: &[&[u8]],
    out: &mut [u8],
) -> Result<(), ErrorStack> {
    let name = digest
        .type_()
        .short_name()
        .ok()
        .and_then(|n| std::ffi::CString::new(n).ok())
        .ok_or_else(ErrorStack::get)?;
    let mut full_seed = zeroize::Zeroizing::new(Vec::with_capacity(
        label.len() + seed.iter().map(|s| s.len()).sum::<usize>(),
    ));
    full_seed.extend_from_slice(label);
    for s in seed {
        full_seed.extend_from_slice(s);
    }
    // SAFETY: the KDF and its context are fetched and made here, checked for NULL, used only
    // within this call and freed on every path. The params array points into `name`,
    // `secret` and `full_seed`, which outlive EVP_KDF_derive; OpenSSL only reads through the
    // octet-string pointers (the KDF copies what it keeps), so the `*mut` casts of shared
    // buffers are never written through. `out` is a valid writable buffer of `out.len()` bytes.
    unsafe {
        let kdf = openssl_sys::EVP_KDF_fetch(
            std::ptr::null_mut(),
            c"TLS1-PRF".as_ptr(),
            std::ptr::null(),
        );
        if kdf.is_null() {
            return Err(ErrorStack::get());
        }
        let ctx = openssl_sys::EVP_KDF_CTX_new(kdf);
        openssl_sys::EVP_KDF_free(kdf);
        if ctx.is_null() {
            return Err(ErrorStack::get());
        }
        let params = [
            OSSL_PARAM_construct_utf8_string(c"digest".as_ptr(), name.as_ptr().cast_mut(), 0),
            openssl_sys::OSSL_PARAM_construct_octet_string(
                c"secret".as_ptr(),
                secret.as_ptr().cast_mut().cast::<c_void>(),
                secret.len(),
            ),
            openssl_sys::OSSL_PARAM_construct_octet_string(
                c"seed".as_ptr(),
                full_seed.as_ptr().cast_mut().cast::<c_void>(),
                full_seed.len(),
            ),
            openssl_sys::OSSL_PARAM_construct_end(),
        ];
        let ok = openssl_sys::EVP_KDF_derive(ctx, out.as_mut_ptr(), out.len(), params.as_ptr());
        openssl_sys::EVP_KDF_CTX_free(ctx);
        if ok != 1 {
            return Err(ErrorStack::get());
        }
    }
    Ok(())
}

/// Makes the next flight of `ssl` time out at once (`DTLS_set_timer_cb`: 1 µs when a timer
/// starts, a second after an expiry), so that a test gets one retransmission of it without
/// waiting on OpenSSL's clock.
#[cfg(all(test, feature = "server"))]
pub(crate) fn dtls_timer_expires_at_once(ssl: &SslRef) {
    extern "C" {
        fn DTLS_set_timer_cb(
            s: *mut openssl_sys::SSL,
            cb: Option<unsafe extern "C" fn(*mut openssl_sys::SSL, libc::c_uint) -> libc::c_uint>,
        );
    }
    unsafe extern "C" fn one_microsecond(
        _ssl: *mut openssl_sys::SSL,
        previous_us: libc::c_uint,
    ) -> libc::c_uint {
        if previous_us == 0 {
            1
        } else {
            1_000_000
        }
    }
    // SAFETY: ssl is a live SSL (borrowed from a stream a test owns and drives on this thread
    // only); the callback is a plain function that touches nothing and cannot unwind.
    unsafe { DTLS_set_timer_cb(ssl.as_ptr(), Some(one_microsecond)) }
}

/// Starts a renegotiation on a client `ssl` (`SSL_renegotiate`): its next handshake call sends
/// a ClientHello on the established association.
#[cfg(all(test, feature = "server"))]
pub(crate) fn renegotiate(ssl: &SslRef) -> bool {
    extern "C" {
        fn SSL_renegotiate(s: *mut openssl_sys::SSL) -> c_int;
    }
    // SAFETY: ssl is a live SSL (borrowed from a stream a test owns and drives on this thread
    // only); SSL_renegotiate only sets a flag on it.
    unsafe { SSL_renegotiate(ssl.as_ptr()) == 1 }
}

/// Attaches `program`, a classic BPF program, to the `SO_REUSEPORT` group of `socket`
/// (`SO_ATTACH_REUSEPORT_CBPF`): for each datagram the kernel runs it and delivers the datagram
/// to the group's socket whose index it returns, or picks one by its hash when the index is
/// past the group.
#[cfg(target_os = "linux")]
#[cfg(feature = "server")]
pub(crate) fn attach_reuseport_cbpf(
    socket: &impl std::os::fd::AsRawFd,
    program: &[libc::sock_filter],
) -> std::io::Result<()> {
    let len = u16::try_from(program.len())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let prog = libc::sock_fprog {
        len,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: the descriptor belongs to a live socket the caller holds; `prog` points to
    // `program`, which outlives the call, and its length is the program's; the kernel copies
    // the program and checks it before attaching (it never writes through `filter`).
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::from_ref(&prog).cast::<c_void>(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sets the integer socket option `level`/`name` of `socket` to `value` (`setsockopt`).
#[cfg(target_os = "linux")]
#[cfg(feature = "server")]
pub(crate) fn set_int_sockopt(
    socket: &impl std::os::fd::AsFd,
    level: c_int,
    name: c_int,
    value: c_int,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is borrowed from a live socket for the call; the option value is
    // a local `c_int` whose size is passed with it, and the kernel only reads it during the call.
    let r = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast::<c_void>(),
            std::mem::size_of::<c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The integer socket option `level`/`name` of `socket` (`getsockopt`; tests).
#[cfg(target_os = "linux")]
#[cfg(all(test, feature = "server"))]
pub(crate) fn int_sockopt(
    socket: &impl std::os::fd::AsFd,
    level: c_int,
    name: c_int,
) -> std::io::Result<c_int> {
    use std::os::fd::AsRawFd;
    let mut value: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: the descriptor is borrowed from a live socket for the call; `value` and `len` are
    // locals, `len` holding `value`'s size, so the kernel writes at most that many bytes.
    let r = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            level,
            name,
            std::ptr::from_mut(&mut value).cast::<c_void>(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(value)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_released_on_the_releases_with_the_cve_2024_4741_fix_only() {
        for (version, supported) in [
            (0x3000_00d0, false), // 3.0.13
            (0x3000_00e0, true),  // 3.0.14
            (0x3000_0160, true),  // 3.0.22
            (0x3010_0050, false), // 3.1.5
            (0x3010_0060, true),  // 3.1.6
            (0x3020_0010, false), // 3.2.1
            (0x3020_0020, true),  // 3.2.2
            (0x3030_0000, false), // 3.3.0
            (0x3030_0010, true),  // 3.3.1
            (0x3060_0020, true),  // 3.6.2
            (0x4000_0030, true),  // 4.0.3
            (0x5000_0000, false), // a later major release: not assumed
        ] {
            assert_eq!(free_buffers_supported(version), supported, "{version:#x}");
        }
    }

    #[test]
    fn the_release_buffers_mode_covers_dtls_from_3_2_on() {
        assert!(!release_buffers_mode_covers_dtls(0x3000_0160));
        assert!(!release_buffers_mode_covers_dtls(0x3010_0060));
        assert!(release_buffers_mode_covers_dtls(0x3020_0000));
        assert!(release_buffers_mode_covers_dtls(0x4000_0030));
    }

    #[test]
    fn ccm8_is_rerated_from_3_1_on() {
        assert!(!ccm8_rated_below_key_size(0x3000_0160));
        assert!(ccm8_rated_below_key_size(0x3010_0000));
        assert!(ccm8_rated_below_key_size(0x3060_0020));
        assert!(ccm8_rated_below_key_size(0x4000_0030));
    }
}
