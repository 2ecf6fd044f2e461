//! The compact stored form (session id and id context left out) must round-trip every kind of
//! session the cache meets, or fall back to plain DER: each kind below is made by a real
//! handshake, stored by the new-session callback, and resumed from the store with what it
//! carries intact (SNI, ALPN, client certificate, PSK identity, TLS 1.3 ticket fields, extended
//! master secret).

mod support;

use std::io::{Read, Write};
use std::sync::Arc;
use std::thread;

use openssl::ssl::{
    AlpnError, Ssl, SslContext, SslContextBuilder, SslMethod, SslRef, SslSession, SslVerifyMode,
    SslVersion,
};
use openssl_session_cache::{MemoryStore, SessionCache, SessionStore};
use support::pki;

/// What the server saw of one connection.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    reused: bool,
    sni: Option<String>,
    alpn: Option<Vec<u8>>,
    peer_cert: bool,
    psk_identity: Option<Vec<u8>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Tls12,
    Tls13,
    Dtls12,
    SniAlpn,
    ClientCert,
    Psk,
}

fn proto(kind: Kind) -> (SslMethod, SslVersion) {
    match kind {
        Kind::Tls13 => (SslMethod::tls(), SslVersion::TLS1_3),
        Kind::Dtls12 => (SslMethod::dtls(), SslVersion::DTLS1_2),
        _ => (SslMethod::tls(), SslVersion::TLS1_2),
    }
}

fn pin(b: &mut SslContextBuilder, kind: Kind) {
    let v = proto(kind).1;
    b.set_min_proto_version(Some(v)).unwrap();
    b.set_max_proto_version(Some(v)).unwrap();
}

const PSK: &[u8] = b"0123456789abcdef";

fn server(kind: Kind, cache: &SessionCache) -> SslContext {
    let mut b = SslContext::builder(proto(kind).0).unwrap();
    pin(&mut b, kind);
    if kind == Kind::Psk {
        b.set_cipher_list("PSK-AES128-GCM-SHA256").unwrap();
        b.set_psk_server_callback(|_, identity, out| {
            if identity != Some(&b"sensor-42"[..]) {
                return Ok(0);
            }
            out[..PSK.len()].copy_from_slice(PSK);
            Ok(PSK.len())
        });
    } else {
        b.set_certificate(&pki().server.cert).unwrap();
        b.set_private_key(&pki().server.key).unwrap();
    }
    if kind == Kind::ClientCert {
        let mut store = openssl::x509::store::X509StoreBuilder::new().unwrap();
        store.add_cert(pki().client.cert.clone()).unwrap();
        b.set_verify_cert_store(store.build()).unwrap();
        b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    }
    if kind == Kind::SniAlpn {
        // Accepting the name records it in the session (TLS 1.2 keeps it across resumption).
        b.set_servername_callback(|_, _| Ok(()));
        b.set_alpn_select_callback(|_, client| {
            openssl::ssl::select_next_proto(b"\x05coap2\x02h2", client).ok_or(AlpnError::NOACK)
        });
    }
    cache.install(&mut b).unwrap();
    b.build()
}

fn client(kind: Kind) -> SslContext {
    let mut b = SslContext::builder(proto(kind).0).unwrap();
    pin(&mut b, kind);
    b.set_verify(SslVerifyMode::NONE);
    match kind {
        Kind::Psk => {
            b.set_cipher_list("PSK-AES128-GCM-SHA256").unwrap();
            b.set_psk_client_callback(|_, _, id, key| {
                id[..10].copy_from_slice(b"sensor-42\0");
                key[..PSK.len()].copy_from_slice(PSK);
                Ok(PSK.len())
            });
        }
        Kind::ClientCert => {
            b.set_certificate(&pki().client.cert).unwrap();
            b.set_private_key(&pki().client.key).unwrap();
        }
        Kind::SniAlpn => b.set_alpn_protos(b"\x02h2\x05coap2").unwrap(),
        _ => {}
    }
    b.build()
}

fn seen(ssl: &SslRef) -> Seen {
    Seen {
        reused: ssl.session_reused(),
        sni: ssl
            .servername(openssl::ssl::NameType::HOST_NAME)
            .map(str::to_owned),
        alpn: ssl.selected_alpn_protocol().map(<[u8]>::to_vec),
        peer_cert: ssl.peer_certificate().is_some(),
        psk_identity: ssl.psk_identity().map(<[u8]>::to_vec),
    }
}

trait Io: Read + Write + Send + std::fmt::Debug + 'static {}
impl<T: Read + Write + Send + std::fmt::Debug + 'static> Io for T {}

fn pair(kind: Kind) -> (Box<dyn Io>, Box<dyn Io>) {
    if kind == Kind::Dtls12 {
        let (a, b) = support::datagram_pair();
        (Box::new(a), Box::new(b))
    } else {
        let (a, b) = support::stream_pair();
        (Box::new(a), Box::new(b))
    }
}

fn connect(
    kind: Kind,
    server: &SslContext,
    client: &SslContext,
    offer: Option<&SslSession>,
) -> (Seen, SslSession) {
    let (s_io, c_io) = pair(kind);
    let server = server.clone();
    let srv = thread::spawn(move || {
        let mut ssl = Ssl::new(&server).unwrap();
        if kind == Kind::Dtls12 {
            ssl.set_mtu(1400).unwrap();
        }
        let mut s = ssl.accept(s_io).unwrap();
        let saw = seen(s.ssl());
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        let _ = s.read(&mut buf);
        let _ = s.shutdown();
        saw
    });
    let mut ssl = Ssl::new(client).unwrap();
    if kind == Kind::Dtls12 {
        ssl.set_mtu(1400).unwrap();
    }
    if kind == Kind::SniAlpn {
        ssl.set_hostname("gateway.example").unwrap();
    }
    if let Some(s) = offer {
        // SAFETY: the client contexts keep no internal session cache.
        #[allow(unsafe_code)]
        unsafe {
            ssl.set_session(s).unwrap()
        };
    }
    let mut c = ssl.connect(c_io).unwrap();
    c.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).unwrap();
    let session = c.ssl().session().unwrap().to_owned();
    let _ = c.shutdown();
    (srv.join().unwrap(), session)
}

#[test]
fn every_kind_of_session_round_trips_through_the_store() {
    for kind in [
        Kind::Tls12,
        Kind::Tls13,
        Kind::Dtls12,
        Kind::SniAlpn,
        Kind::ClientCert,
        Kind::Psk,
    ] {
        let store = Arc::new(MemoryStore::builder().build().unwrap());
        // No decoded tier: every resumption decodes what the store holds. The PSK kind's key
        // is known to the cache, which resumes only PSK sessions whose key it can check.
        let cache = SessionCache::builder()
            .store(store.clone())
            .decoded_entries(0)
            .psk_keys(|identity| {
                (identity == b"sensor-42").then(|| zeroize::Zeroizing::new(PSK.to_vec()))
            })
            .build()
            .unwrap();
        let (server, client) = (server(kind, &cache), client(kind));
        let (full, session) = connect(kind, &server, &client, None);
        assert!(!full.reused, "{kind:?}");
        match kind {
            Kind::SniAlpn => {
                assert_eq!(full.sni.as_deref(), Some("gateway.example"));
                assert_eq!(full.alpn.as_deref(), Some(&b"coap2"[..]));
            }
            Kind::ClientCert => assert!(full.peer_cert),
            Kind::Psk => assert_eq!(full.psk_identity.as_deref(), Some(&b"sensor-42"[..])),
            _ => {}
        }
        assert!(store.usage().entries >= 1, "{kind:?}: nothing stored");
        let (resumed, _) = connect(kind, &server, &client, Some(&session));
        assert!(resumed.reused, "{kind:?} did not resume from the store");
        // What the session carries survives the stored form.
        let expected = Seen {
            reused: true,
            ..full
        };
        assert_eq!(resumed, expected, "{kind:?}");
        let s = cache.stats();
        assert_eq!((s.hits, s.decode_errors), (1, 0), "{kind:?}: {s:?}");
    }
}
