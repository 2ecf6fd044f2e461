//! The server's configuration: one `SslContext` with certificates or PSK, cookies, the session
//! cache, and the DSM limits; shared by every worker.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::ex_data::Index;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{Ssl, SslContext, SslMethod, SslOptions, SslVersion};
use openssl::x509::extension::SubjectAlternativeName;
use openssl::x509::{X509Name, X509};
use zeroize::Zeroizing;

use super::cookie::CookieKeys;
use crate::{DsmConfig, Error, SessionCache};

/// The path MTU the server assumes (`SSL_set_mtu`, with `SSL_OP_NO_QUERY_MTU`).
pub const DEFAULT_MTU: u32 = 1400;
/// The largest datagram the endpoint accepts: a full DTLS 1.2 record (13-byte header,
/// 2^14 + 2048 bytes of ciphertext). Larger datagrams are dropped and counted.
pub const DEFAULT_MAX_DATAGRAM: usize = 13 + 16384 + 2048;
/// How often the cookie secret rotates by default.
pub const DEFAULT_COOKIE_ROTATION: Duration = Duration::from_secs(120);
/// The cipher suites offered when a PSK is configured, in order of preference.
pub const PSK_CIPHERS: &str = "PSK-AES128-CCM8:PSK-AES128-CCM:PSK-AES128-GCM-SHA256";

/// What the cookie callbacks know about the peer of an `Ssl` (its ex_data).
#[derive(Debug, Clone)]
pub(crate) struct PeerInfo {
    /// The peer's address, which cookies are made for.
    pub(crate) addr: SocketAddr,
    /// The cookie the endpoint already verified for the ClientHello that created this `Ssl`, so
    /// OpenSSL's own verification of the same cookie is a comparison, not a second HMAC.
    pub(crate) verified_cookie: Vec<u8>,
}

/// The `Ssl` ex_data slot holding the [`PeerInfo`], read by the cookie callbacks.
pub(crate) fn peer_addr_index() -> Result<Index<Ssl, PeerInfo>, Error> {
    static INDEX: OnceLock<Option<Index<Ssl, PeerInfo>>> = OnceLock::new();
    INDEX
        .get_or_init(|| Ssl::new_ex_index().ok())
        .ok_or_else(|| Error::Config("no ssl ex_data index for the peer address".into()))
}

/// A DTLS server's configuration, built once and shared (`Arc`) by its endpoints.
pub struct ServerConfig {
    pub(crate) ctx: SslContext,
    pub(crate) cookies: Arc<CookieKeys>,
    pub(crate) dsm: DsmConfig,
    pub(crate) mtu: u32,
    pub(crate) max_datagram: usize,
    pub(crate) peer_addr: Index<Ssl, PeerInfo>,
    cache: SessionCache,
    fingerprint: Option<String>,
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("dsm", &self.dsm)
            .field("mtu", &self.mtu)
            .field("max_datagram", &self.max_datagram)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl ServerConfig {
    /// Starts a configuration whose sessions live in `cache`.
    pub fn builder(cache: SessionCache) -> ServerConfigBuilder {
        ServerConfigBuilder {
            cache,
            identity: None,
            psk: None,
            dsm: DsmConfig::default(),
            mtu: DEFAULT_MTU,
            max_datagram: DEFAULT_MAX_DATAGRAM,
            cookie_rotation: DEFAULT_COOKIE_ROTATION,
        }
    }

    /// The session cache the server's context uses.
    pub fn session_cache(&self) -> &SessionCache {
        &self.cache
    }

    /// The SHA-256 fingerprint of the server certificate (`AB:CD:...`), if it has one.
    pub fn certificate_fingerprint(&self) -> Option<&str> {
        self.fingerprint.as_deref()
    }

    /// The DSM limits each endpoint gets.
    pub fn dsm_config(&self) -> &DsmConfig {
        &self.dsm
    }
}

/// Builds a [`ServerConfig`].
#[must_use]
pub struct ServerConfigBuilder {
    cache: SessionCache,
    identity: Option<(X509, PKey<Private>)>,
    psk: Option<(Vec<u8>, Zeroizing<Vec<u8>>)>,
    dsm: DsmConfig,
    mtu: u32,
    max_datagram: usize,
    cookie_rotation: Duration,
}

impl fmt::Debug for ServerConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfigBuilder")
            .field("has_certificate", &self.identity.is_some())
            .field("has_psk", &self.psk.is_some())
            .field("dsm", &self.dsm)
            .finish_non_exhaustive()
    }
}

impl ServerConfigBuilder {
    /// The server certificate and its key. Without one (and without a PSK) a self-signed ECDSA
    /// P-256 certificate is generated.
    pub fn certificate(mut self, cert: X509, key: PKey<Private>) -> Self {
        self.identity = Some((cert, key));
        self
    }

    /// Also accepts PSK handshakes (`PSK-AES128-CCM8` and friends) for `identity` with `key`.
    /// With a PSK and no certificate, the server speaks PSK only.
    pub fn psk(mut self, identity: &[u8], key: &[u8]) -> Self {
        self.psk = Some((identity.to_vec(), Zeroizing::new(key.to_vec())));
        self
    }

    /// Peer slots, handshake budget, per-source quota and timeouts, per endpoint.
    pub fn dsm(mut self, config: DsmConfig) -> Self {
        self.dsm = config;
        self
    }

    /// The MTU assumed for every peer (default [`DEFAULT_MTU`]).
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = mtu;
        self
    }

    /// Datagrams larger than this are dropped (default [`DEFAULT_MAX_DATAGRAM`]).
    pub fn max_datagram_size(mut self, bytes: usize) -> Self {
        self.max_datagram = bytes;
        self
    }

    /// How often the cookie secret changes (default [`DEFAULT_COOKIE_ROTATION`]); a cookie
    /// stays valid for one to two periods.
    pub fn cookie_rotation(mut self, every: Duration) -> Self {
        self.cookie_rotation = every;
        self
    }

    /// Builds the `SslContext`: DTLS 1.2 only, cookie exchange, `NO_QUERY_MTU`, the session
    /// cache installed (session ids, no tickets).
    pub fn build(self) -> Result<Arc<ServerConfig>, Error> {
        if self.mtu < 256 {
            return Err(Error::Config(format!("mtu {} below 256", self.mtu)));
        }
        if self.cookie_rotation.is_zero() {
            return Err(Error::Config("cookie rotation period is zero".into()));
        }
        let peer_addr = peer_addr_index()?;
        let cookies = Arc::new(CookieKeys::new(self.cookie_rotation)?);
        let mut ctx = SslContext::builder(SslMethod::dtls_server())?;
        ctx.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
        ctx.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
        ctx.set_options(SslOptions::COOKIE_EXCHANGE | SslOptions::NO_QUERY_MTU);

        let identity = match (self.identity, &self.psk) {
            (Some(id), _) => Some(id),
            (None, None) => Some(self_signed_certificate()?),
            (None, Some(_)) => None,
        };
        let mut fingerprint = None;
        if let Some((cert, key)) = &identity {
            ctx.set_certificate(cert)?;
            ctx.set_private_key(key)?;
            ctx.check_private_key()?;
            fingerprint = Some(certificate_fingerprint(cert)?);
        }
        if let Some((identity_expected, key)) = self.psk {
            let ciphers = if fingerprint.is_some() {
                format!("DEFAULT:{PSK_CIPHERS}")
            } else {
                PSK_CIPHERS.to_owned()
            };
            ctx.set_cipher_list(&ciphers)?;
            ctx.set_psk_server_callback(move |_ssl, identity, out| {
                if identity != Some(identity_expected.as_slice()) || key.len() > out.len() {
                    tracing::debug!("psk identity unknown");
                    return Ok(0);
                }
                out[..key.len()].copy_from_slice(&key);
                Ok(key.len())
            });
        }

        // OpenSSL only generates a cookie for the reconstructed first ClientHello the endpoint
        // feeds a new `Ssl` (its HelloVerifyRequest is discarded): real cookieless hellos are
        // answered by the endpoint without an `Ssl`. It is still a real cookie.
        let gen_keys = Arc::clone(&cookies);
        ctx.set_cookie_generate_cb(move |ssl, out| {
            let info = ssl
                .ex_data(peer_addr)
                .ok_or_else(openssl::error::ErrorStack::get)?;
            let cookie = gen_keys.generate(info.addr);
            out[..cookie.len()].copy_from_slice(&cookie);
            Ok(cookie.len())
        });
        let verify_keys = Arc::clone(&cookies);
        ctx.set_cookie_verify_cb(move |ssl, cookie| {
            ssl.ex_data(peer_addr).is_some_and(|info| {
                (!info.verified_cookie.is_empty()
                    && info.verified_cookie.len() == cookie.len()
                    && openssl::memcmp::eq(&info.verified_cookie, cookie))
                    || verify_keys.verify(info.addr, cookie)
            })
        });
        self.cache.install(&mut ctx)?;

        Ok(Arc::new(ServerConfig {
            ctx: ctx.build(),
            cookies,
            dsm: self.dsm,
            mtu: self.mtu,
            max_datagram: self.max_datagram,
            peer_addr,
            cache: self.cache,
            fingerprint,
        }))
    }
}

/// Generates a self-signed ECDSA P-256 certificate for `localhost`, valid for a year.
pub fn self_signed_certificate() -> Result<(X509, PKey<Private>), Error> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let key = PKey::from_ec_key(EcKey::generate(&group)?)?;
    let mut name = X509Name::builder()?;
    name.append_entry_by_nid(Nid::COMMONNAME, "localhost")?;
    let name = name.build();
    let mut cert = X509::builder()?;
    cert.set_version(2)?;
    let mut serial = BigNum::new()?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false)?;
    let serial = serial.to_asn1_integer()?;
    cert.set_serial_number(&serial)?;
    cert.set_subject_name(&name)?;
    cert.set_issuer_name(&name)?;
    cert.set_pubkey(&key)?;
    let not_before = Asn1Time::days_from_now(0)?;
    let not_after = Asn1Time::days_from_now(365)?;
    cert.set_not_before(&not_before)?;
    cert.set_not_after(&not_after)?;
    let san = SubjectAlternativeName::new()
        .dns("localhost")
        .ip("127.0.0.1")
        .build(&cert.x509v3_context(None, None))?;
    cert.append_extension(san)?;
    cert.sign(&key, MessageDigest::sha256())?;
    Ok((cert.build(), key))
}

/// The SHA-256 fingerprint of `cert` as colon-separated upper-case hex.
pub fn certificate_fingerprint(cert: &X509) -> Result<String, Error> {
    let digest = cert.digest(MessageDigest::sha256())?;
    Ok(digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":"))
}
