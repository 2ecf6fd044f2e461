//! The server builder cannot surprise: hook calls add up instead of replacing each other
//! (`configure`, `psk`, `psk_lookup`), and mutual DTLS has named calls (trusted client CAs,
//! a required client certificate). Real DTLS handshakes over loopback UDP against `UdpServer`.
#![cfg(feature = "server")]

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslStream, SslVerifyMode,
};
use openssl::x509::store::X509StoreBuilder;
use openssl_session_cache::dsm::DsmConfig;
use openssl_session_cache::{Error, Event, FileKind, ServerConfig, SessionCache};
use support::server::{echo, recording, Recorded, TestServer, UdpIo};

/// A DTLS client context `tweak` adds to (a PSK, a certificate).
fn client(tweak: impl FnOnce(&mut SslContextBuilder)) -> SslContext {
    let mut ctx = SslContext::builder(SslMethod::dtls_client()).unwrap();
    ctx.set_verify(SslVerifyMode::NONE);
    ctx.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET);
    tweak(&mut ctx);
    ctx.build()
}

/// Runs a handshake with `server` (bounded: 5 s); the error OpenSSL reported if it failed.
fn connect(server: SocketAddr, ctx: &SslContext) -> Result<SslStream<UdpIo>, String> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(server).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut ssl = Ssl::new(ctx).unwrap();
    ssl.set_mtu(1400).unwrap();
    ssl.set_connect_state();
    let mut stream = SslStream::new(ssl, UdpIo(sock)).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match stream.do_handshake() {
            Ok(()) => return Ok(stream),
            Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < end => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// A client offering only `PSK-AES128-CCM8`, which OpenSSL 3.2+ refuses at its default security
/// level unless the context rates it by its key size (`rate_ccm8_by_key_size`).
fn psk_client(identity: &'static [u8], key: &'static [u8]) -> SslContext {
    client(|ctx| {
        openssl_session_cache::rate_ccm8_by_key_size(ctx);
        psk_ccm8_only(ctx, identity, key);
    })
}

fn psk_ccm8_only(ctx: &mut SslContextBuilder, identity: &'static [u8], key: &'static [u8]) {
    ctx.set_cipher_list("PSK-AES128-CCM8").unwrap();
    ctx.set_psk_client_callback(move |_ssl, _hint, id_out, key_out| {
        id_out[..identity.len()].copy_from_slice(identity);
        id_out[identity.len()] = 0;
        key_out[..key.len()].copy_from_slice(key);
        Ok(key.len())
    });
}

fn cert_client() -> SslContext {
    let pki = support::pki();
    client(|ctx| {
        ctx.set_certificate(&pki.client.cert).unwrap();
        ctx.set_private_key(&pki.client.key).unwrap();
    })
}

fn peer_certificates(log: &Recorded) -> Vec<Option<openssl::x509::X509>> {
    log.lock()
        .iter()
        .filter_map(|e| match e {
            Event::Connected { info, .. } => Some(info.peer_certificate.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_second_configure_call_adds_to_the_first_and_keeps_client_certificates_required() {
    let keylog_lines = Arc::new(AtomicUsize::new(0));
    let lines = Arc::clone(&keylog_lines);
    let server = TestServer::start(DsmConfig::new(16), move |b| {
        b.configure(|ctx| {
            let mut roots = X509StoreBuilder::new()?;
            roots.add_cert(support::pki().client.cert.clone())?;
            ctx.set_verify_cert_store(roots.build())?;
            ctx.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
            Ok(())
        })
        // Adding a keylog callback afterwards used to replace the closure above.
        .configure(move |ctx| {
            ctx.set_keylog_callback(move |_ssl, _line| {
                lines.fetch_add(1, Ordering::Relaxed);
            });
            Ok(())
        })
    });
    assert_eq!(
        server.config.context().verify_mode(),
        SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT
    );
    assert!(
        connect(server.addr(), &client(|_| {})).is_err(),
        "a client without a certificate was accepted"
    );
    let mut stream = connect(server.addr(), &cert_client()).expect("a client with one");
    assert_eq!(echo(&mut stream, b"hello"), b"hello");
    assert!(
        keylog_lines.load(Ordering::Relaxed) > 0,
        "the second closure ran too"
    );
}

#[test]
fn psk_identities_and_lookups_add_up() {
    let server = TestServer::start(DsmConfig::new(16), |b| {
        b.psk(b"dev-a", b"key of device a.")
            .psk(b"dev-b", b"an older b key..")
            // A second key for the same identity replaces its first.
            .psk(b"dev-b", b"key of device b.")
            .psk_lookup(|id| (id == b"dev-c").then(|| b"key of device c.".to_vec()))
            .psk_lookup(|id| (id == b"dev-d").then(|| b"key of device d.".to_vec()))
    });
    for (identity, key) in [
        (&b"dev-a"[..], &b"key of device a."[..]),
        (b"dev-b", b"key of device b."),
        (b"dev-c", b"key of device c."),
        (b"dev-d", b"key of device d."),
    ] {
        let identity: &'static [u8] = identity.to_vec().leak();
        let key: &'static [u8] = key.to_vec().leak();
        let mut stream = connect(server.addr(), &psk_client(identity, key))
            .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(identity)));
        assert_eq!(echo(&mut stream, identity), identity);
    }
    // An unknown identity is refused with an alert; a replaced key's Finished does not decrypt
    // and is discarded (RFC 6347 4.1.2.7), so that client waits out its bound.
    assert!(connect(server.addr(), &psk_client(b"dev-e", b"key of device e.")).is_err());
    assert!(connect(server.addr(), &psk_client(b"dev-b", b"an older b key..")).is_err());
    assert_eq!(server.server.stats().handshakes, 4);
}

/// OpenSSL 3.2 and later rate the AES-CCM-8 suites at 64 bits (`ssl/s3_lib.c`) and refuse them
/// at every security level above 0; the server rates them by key size as 3.0 does, and leaves
/// every other verdict of the level alone.
#[test]
fn ccm8_suites_pass_the_default_security_level_and_nothing_else_changes() {
    let version = openssl::version::number();
    let rated_low = version >= 0x3020_0000;
    let server = TestServer::start(DsmConfig::new(16), |b| b.psk(b"dev", b"a sixteen b key."));
    // A client that rates CCM8 by key size handshakes with it on every version.
    let mut stream = connect(server.addr(), &psk_client(b"dev", b"a sixteen b key."))
        .expect("a CCM8-only client handshakes with the server");
    assert_eq!(
        stream.ssl().current_cipher().unwrap().name(),
        "PSK-AES128-CCM8"
    );
    assert_eq!(echo(&mut stream, b"ccm8"), b"ccm8");
    // Without it, a 3.2+ client has no cipher to offer (the cause of the failure on 3.6/4.0).
    let plain = client(|ctx| psk_ccm8_only(ctx, b"dev", b"a sixteen b key."));
    assert_eq!(
        connect(server.addr(), &plain).is_err(),
        rated_low,
        "OpenSSL {version:#x}"
    );
    // It is installed where needed only, and the level still judges everything else: a
    // 1024-bit RSA certificate (80 bits) stays refused at level 2.
    let mut ctx = SslContext::builder(SslMethod::dtls()).unwrap();
    ctx.set_security_level(2);
    assert_eq!(
        openssl_session_cache::rate_ccm8_by_key_size(&mut ctx),
        version >= 0x3010_0000
    );
    let (cert, key) = rsa_1024_certificate();
    assert!(
        ctx.set_certificate(&cert).is_err(),
        "a weak key stays refused"
    );
    ctx.set_security_level(0);
    ctx.set_certificate(&cert).unwrap();
    ctx.set_private_key(&key).unwrap();
}

fn rsa_1024_certificate() -> (
    openssl::x509::X509,
    openssl::pkey::PKey<openssl::pkey::Private>,
) {
    use openssl::{asn1::Asn1Time, hash::MessageDigest, pkey::PKey, rsa::Rsa, x509};
    let key = PKey::from_rsa(Rsa::generate(1024).unwrap()).unwrap();
    let mut name = x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", "weak").unwrap();
    let name = name.build();
    let mut b = x509::X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(&name).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    (b.build(), key)
}

#[test]
fn mutual_dtls_from_named_calls_requires_a_trusted_client_certificate() {
    let log = Recorded::default();
    let server = TestServer::start_with(
        DsmConfig::new(16),
        |b| {
            b.trust_client_cas([support::pki().client.cert.clone()])
                .require_client_certificate()
        },
        || recording(&log, support::server::echo_app),
    );
    assert!(connect(server.addr(), &client(|_| {})).is_err());
    // A certificate the server does not trust.
    let stranger = support::self_signed("stranger.test");
    let untrusted = client(|ctx| {
        ctx.set_certificate(&stranger.cert).unwrap();
        ctx.set_private_key(&stranger.key).unwrap();
    });
    assert!(connect(server.addr(), &untrusted).is_err());
    let mut stream = connect(server.addr(), &cert_client()).expect("the trusted client");
    assert_eq!(echo(&mut stream, b"mutual"), b"mutual");
    assert_eq!(
        peer_certificates(&log),
        vec![Some(support::pki().client.cert.clone())]
    );
}

#[test]
fn trusted_client_cas_without_a_requirement_take_clients_with_or_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("clients.pem");
    std::fs::write(&ca_file, support::pki().client.cert.to_pem().unwrap()).unwrap();
    let log = Recorded::default();
    let server = TestServer::start_with(
        DsmConfig::new(16),
        |b| b.client_ca_file(&ca_file),
        || recording(&log, support::server::echo_app),
    );
    assert_eq!(server.config.context().verify_mode(), SslVerifyMode::PEER);
    let mut anonymous = connect(server.addr(), &client(|_| {})).expect("no certificate");
    assert_eq!(echo(&mut anonymous, b"a"), b"a");
    let mut named = connect(server.addr(), &cert_client()).expect("a trusted certificate");
    assert_eq!(echo(&mut named, b"b"), b"b");
    assert_eq!(
        peer_certificates(&log),
        vec![None, Some(support::pki().client.cert.clone())]
    );
}

#[test]
fn client_ca_settings_that_cannot_work_fail_the_build() {
    let builder = || ServerConfig::builder(SessionCache::builder().build().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, b"no certificate here\n").unwrap();
    for (what, result) in [
        ("missing file", builder().client_ca_file(&missing).build()),
        ("no certificate", builder().client_ca_file(&empty).build()),
        (
            "required without a ca",
            builder().require_client_certificate().build(),
        ),
    ] {
        match result {
            Err(
                e @ (Error::InvalidSetting { .. }
                | Error::ReadFile { .. }
                | Error::InvalidFile { .. }
                | Error::InvalidPem { .. }),
            ) => assert!(!e.to_string().is_empty(), "{what}"),
            other => panic!("{what}: expected a configuration error, got {other:?}"),
        }
    }
}

#[test]
fn a_missing_client_ca_file_is_a_read_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let result = ServerConfig::builder(SessionCache::builder().build().unwrap())
        .client_ca_file(&missing)
        .build();
    match result {
        Err(Error::ReadFile {
            kind: FileKind::ClientCa,
            path,
            source,
        }) => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected a read error, got {other:?}"),
    }
    let err = ServerConfig::builder(SessionCache::builder().build().unwrap())
        .client_ca_file(&missing)
        .build()
        .unwrap_err();
    // The io::Error is the source, and the message names the file.
    let source = std::error::Error::source(&err).expect("a source");
    assert!(source.downcast_ref::<std::io::Error>().is_some());
    assert!(err.to_string().contains("missing.pem"), "{err}");
}
