//! In-process DTLS 1.2 handshakes in lockstep over in-memory datagram queues, shared by benches.
#![allow(dead_code, unreachable_pub)]

use std::time::{Duration, Instant};

use openssl::asn1::Asn1Time;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{
    HandshakeError, MidHandshakeSslStream, ShutdownState, Ssl, SslContext, SslContextBuilder,
    SslMethod, SslOptions, SslSession, SslSessionCacheMode, SslStream, SslVerifyMode,
};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509NameBuilder, X509};
use openssl_session_cache::{DatagramPipe, SessionCache, DEFAULT_SESSION_ID_CONTEXT};

pub fn identity(cn: &str) -> (X509, PKey<Private>) {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(&name).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    (b.build(), key)
}

pub struct Pki {
    pub server: (X509, PKey<Private>),
    pub client: (X509, PKey<Private>),
}

pub fn dtls_builder() -> SslContextBuilder {
    let mut b = SslContext::builder(SslMethod::dtls()).unwrap();
    b.set_options(SslOptions::NO_QUERY_MTU);
    b
}

pub fn server_ctx(pki: &Pki, mtls: bool, cache: Option<&SessionCache>) -> SslContext {
    let mut b = dtls_builder();
    b.set_certificate(&pki.server.0).unwrap();
    b.set_private_key(&pki.server.1).unwrap();
    if mtls {
        let mut store = X509StoreBuilder::new().unwrap();
        store.add_cert(pki.client.0.clone()).unwrap();
        b.set_verify_cert_store(store.build()).unwrap();
        b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    }
    match cache {
        Some(cache) => cache.install(&mut b).unwrap(),
        None => {
            // The baseline: OpenSSL's internal cache, configured the same way.
            b.set_session_cache_mode(SslSessionCacheMode::SERVER);
            b.set_options(SslOptions::NO_TICKET);
            b.set_session_id_context(DEFAULT_SESSION_ID_CONTEXT)
                .unwrap();
        }
    }
    b.build()
}

pub fn client_ctx(pki: &Pki, mtls: bool) -> SslContext {
    let mut b = dtls_builder();
    b.set_verify(SslVerifyMode::NONE);
    if mtls {
        b.set_certificate(&pki.client.0).unwrap();
        b.set_private_key(&pki.client.1).unwrap();
    }
    b.build()
}

enum Side {
    Mid(MidHandshakeSslStream<DatagramPipe>),
    Done(SslStream<DatagramPipe>),
}

impl Side {
    fn pipe(&mut self) -> &mut DatagramPipe {
        match self {
            Self::Mid(m) => m.get_mut(),
            Self::Done(s) => s.get_mut(),
        }
    }
}

/// Moves what `from` wrote to `to`'s inbound queue.
fn deliver(from: &mut Side, to: &mut Side) {
    for d in from.pipe().take_outbound() {
        to.pipe().push(d);
    }
}

fn step(r: Result<SslStream<DatagramPipe>, HandshakeError<DatagramPipe>>) -> Side {
    match r {
        Ok(s) => Side::Done(s),
        Err(HandshakeError::WouldBlock(m)) => Side::Mid(m),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// A client (resuming `session` if given) and a server on `server` run their handshake in
/// lockstep until both are done; returns the time spent in the server's calls and both streams.
fn lockstep(
    server: &SslContext,
    client: &SslContext,
    session: Option<&SslSession>,
) -> (Duration, SslStream<DatagramPipe>, SslStream<DatagramPipe>) {
    let mut c_ssl = Ssl::new(client).unwrap();
    c_ssl.set_mtu(1400).unwrap();
    if let Some(s) = session {
        #[allow(unsafe_code)]
        // SAFETY: the client context keeps no internal cache (default SERVER mode on a client).
        unsafe {
            c_ssl.set_session(s).unwrap()
        };
    }
    let mut server_time = Duration::ZERO;
    let mut c = step(c_ssl.connect(DatagramPipe::new()));
    let t = Instant::now();
    let mut s_ssl = Ssl::new(server).unwrap();
    s_ssl.set_mtu(1400).unwrap();
    let mut s = step(s_ssl.accept(DatagramPipe::new()));
    server_time += t.elapsed();
    loop {
        deliver(&mut s, &mut c);
        if let Side::Mid(m) = c {
            c = step(m.handshake());
        }
        deliver(&mut c, &mut s);
        if let Side::Mid(m) = s {
            let t = Instant::now();
            s = step(m.handshake());
            server_time += t.elapsed();
        }
        if let (Side::Done(_), Side::Done(_)) = (&c, &s) {
            break;
        }
    }
    let (Side::Done(c), Side::Done(s)) = (c, s) else {
        unreachable!()
    };
    (server_time, c, s)
}

/// One handshake in lockstep; returns (server time, client session, reused, server session).
pub fn handshake(
    server: &SslContext,
    client: &SslContext,
    session: Option<&SslSession>,
) -> (Duration, SslSession, bool, SslSession) {
    let (mut server_time, mut c, mut s) = lockstep(server, client, session);
    let reused = s.ssl().session_reused();
    // Keep both sessions resumable when the streams drop.
    s.set_shutdown(ShutdownState::SENT);
    c.set_shutdown(ShutdownState::SENT);
    let sess = c.ssl().session().unwrap().to_owned();
    let server_sess = s.ssl().session().unwrap().to_owned();
    let t = Instant::now();
    drop(s);
    server_time += t.elapsed();
    (server_time, sess, reused, server_sess)
}

/// The baseline server context (OpenSSL's internal cache, as [`server_ctx`] makes it without a
/// cache of ours) that also asks every client for a cookie (`SSL_OP_COOKIE_EXCHANGE`): OpenSSL
/// doing the exchange the endpoint does, on its own. The cookie is an HMAC-SHA256 of the
/// client's address (one fixed address here: the in-memory pipe has none), as the endpoint's is.
pub fn cookie_server_ctx(pki: &Pki) -> SslContext {
    use hmac::{Hmac, Mac};
    let mut b = dtls_builder();
    b.set_certificate(&pki.server.0).unwrap();
    b.set_private_key(&pki.server.1).unwrap();
    b.set_session_cache_mode(SslSessionCacheMode::SERVER);
    b.set_options(SslOptions::NO_TICKET | SslOptions::COOKIE_EXCHANGE);
    b.set_session_id_context(DEFAULT_SESSION_ID_CONTEXT)
        .unwrap();
    let keyed = Hmac::<sha2::Sha256>::new_from_slice(&[7u8; 32]).unwrap();
    let tag = move |_: &openssl::ssl::SslRef| {
        let mut mac = keyed.clone();
        mac.update(&[4, 127, 0, 0, 1, 0x27, 0x10]);
        mac.finalize().into_bytes()
    };
    let verify = tag.clone();
    b.set_cookie_generate_cb(move |ssl, out| {
        let t = tag(ssl);
        out[..t.len()].copy_from_slice(&t);
        Ok(t.len())
    });
    b.set_cookie_verify_cb(move |ssl, cookie| {
        let t = verify(ssl);
        // Compared in constant time, as the endpoint compares its cookies.
        t.len() == cookie.len() && openssl::memcmp::eq(&t, cookie)
    });
    b.build()
}

/// What the endpoint does for a resuming client, done by OpenSSL alone on `server` (a
/// [`cookie_server_ctx`]): the first ClientHello answered with a HelloVerifyRequest, the one with
/// the cookie, the resumed handshake, the client's close_notify read and answered with the
/// server's own, the `SSL` freed. Returns the server's time and whether it resumed.
pub fn full_exchange(
    server: &SslContext,
    client: &SslContext,
    session: &SslSession,
) -> (Duration, bool) {
    use std::io::Read;
    let (mut server_time, mut c, mut s) = lockstep(server, client, Some(session));
    let reused = s.ssl().session_reused();
    // The client's close_notify; the server reads it and answers with its own.
    c.shutdown().unwrap();
    for d in c.get_mut().take_outbound() {
        s.get_mut().push(d);
    }
    let t = Instant::now();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    assert_eq!(n, 0, "the client's close_notify");
    s.shutdown().unwrap();
    drop(s);
    server_time += t.elapsed();
    (server_time, reused)
}
