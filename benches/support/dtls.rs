//! In-process DTLS 1.2 handshakes in lockstep over in-memory datagram queues, shared by benches.
#![allow(dead_code, unreachable_pub)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::rc::Rc;
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
use openssl_session_cache::{SessionCache, DEFAULT_SESSION_ID_CONTEXT};

type Queue = Rc<RefCell<VecDeque<Vec<u8>>>>;

/// One end of an in-memory datagram link: reads one whole datagram or WouldBlock.
#[derive(Debug)]
pub struct End {
    rx: Queue,
    tx: Queue,
}

impl Read for End {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.rx.borrow_mut().pop_front() {
            Some(d) => {
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                Ok(n)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for End {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx.borrow_mut().push_back(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn link() -> (End, End) {
    let a: Queue = Rc::default();
    let b: Queue = Rc::default();
    (
        End {
            rx: a.clone(),
            tx: b.clone(),
        },
        End { rx: b, tx: a },
    )
}

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
    Mid(MidHandshakeSslStream<End>),
    Done(SslStream<End>),
}

fn step(r: Result<SslStream<End>, HandshakeError<End>>) -> Side {
    match r {
        Ok(s) => Side::Done(s),
        Err(HandshakeError::WouldBlock(m)) => Side::Mid(m),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// One handshake in lockstep; returns (server time, client session, reused, server session).
pub fn handshake(
    server: &SslContext,
    client: &SslContext,
    session: Option<&SslSession>,
) -> (Duration, SslSession, bool, SslSession) {
    let (s_end, c_end) = link();
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
    let mut c = step(c_ssl.connect(c_end));
    let t = Instant::now();
    let mut s_ssl = Ssl::new(server).unwrap();
    s_ssl.set_mtu(1400).unwrap();
    let mut s = step(s_ssl.accept(s_end));
    server_time += t.elapsed();
    loop {
        if let Side::Mid(m) = c {
            c = step(m.handshake());
        }
        if let Side::Mid(m) = s {
            let t = Instant::now();
            s = step(m.handshake());
            server_time += t.elapsed();
        }
        if let (Side::Done(_), Side::Done(_)) = (&c, &s) {
            break;
        }
    }
    let (Side::Done(mut c), Side::Done(mut s)) = (c, s) else {
        unreachable!()
    };
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
