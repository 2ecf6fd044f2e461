//! The server's configuration: the user's TLS policy in one `SslContext`, plus what the server
//! owns (DTLS 1.2, cookies, MTU, the session cache), and the DSM limits; shared by every worker.

use std::fmt;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslMethod, SslMode, SslOptions, SslVerifyMode, SslVersion,
};
use openssl::stack::Stack;
use openssl::x509::extension::SubjectAlternativeName;
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509Name, X509Ref, X509};
use zeroize::Zeroizing;

use super::cid::{CidLayout, CidNegotiation};
use super::cookie::CookieKeys;
use crate::dsm::DsmConfig;
use crate::ex_data::ex_data_index;
use crate::{Error, FileKind, RefusedSetting, SessionCache};

/// The path MTU the server assumes (`SSL_set_mtu`, with `SSL_OP_NO_QUERY_MTU`).
pub const DEFAULT_MTU: u32 = 1400;
/// The largest datagram the endpoint accepts: a full DTLS 1.2 record (13-byte header,
/// 2^14 + 2048 bytes of ciphertext). Larger datagrams are dropped and counted.
pub const DEFAULT_MAX_DATAGRAM: usize = 13 + 16384 + 2048;
/// How often the cookie secret rotates by default.
pub const DEFAULT_COOKIE_ROTATION: Duration = Duration::from_secs(120);
/// How many datagrams may wait for [`Endpoint::poll_transmit`](crate::Endpoint::poll_transmit)
/// per peer before [`Endpoint::send`](crate::Endpoint::send) refuses more, by default.
pub const DEFAULT_SEND_QUEUE: usize = 64;
/// How long a handshake waits for a remote session lookup before going on without it.
pub const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_millis(250);
/// How many datagrams a peer whose session lookup is in flight may have waiting.
pub const DEFAULT_PARKED_DATAGRAMS: usize = 8;
/// The most application bytes one [`Endpoint::send`](crate::Endpoint::send) takes: one DTLS
/// record's plaintext (2^14). A record larger than the path MTU leaves as a fragmented IP
/// datagram; keep messages under the MTU less about 60 bytes of overhead to avoid that.
pub const MAX_RECORD_PLAINTEXT: usize = 16 * 1024;
/// The cipher suites a server offers unless its policy says otherwise: AEAD suites only, ECDHE
/// with ECDSA or RSA certificates (AES-GCM, ChaCha20-Poly1305, AES-CCM, AES-CCM8 for CoAP).
pub const DEFAULT_CIPHERS: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:\
ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:\
ECDHE-RSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-CCM:ECDHE-ECDSA-AES256-CCM:\
ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES256-CCM8";
/// The PSK suites added to [`DEFAULT_CIPHERS`] when a PSK lookup is set, AEAD only
/// (`PSK-AES128-CCM8` first, the CoAP mandatory suite).
pub const PSK_CIPHERS: &str = "PSK-AES128-CCM8:PSK-AES128-CCM:PSK-AES128-GCM-SHA256:\
PSK-AES256-GCM-SHA384:PSK-CHACHA20-POLY1305:ECDHE-PSK-CHACHA20-POLY1305:PSK-AES256-CCM:\
PSK-AES256-CCM8";

/// `SSL_OP_NO_ENCRYPT_THEN_MAC` (not named by rust-openssl 0.10).
const NO_ENCRYPT_THEN_MAC: SslOptions = SslOptions::from_bits_retain(1 << 19);

/// What the cookie callbacks know about the peer of an `Ssl` (its ex_data).
#[derive(Debug, Clone)]
pub(crate) struct PeerInfo {
    /// The peer's address, which cookies are made for.
    pub(crate) addr: SocketAddr,
    /// The cookie the endpoint already verified for the ClientHello that created this `Ssl`, so
    /// OpenSSL's own verification of the same cookie is a comparison, not a second HMAC.
    pub(crate) verified_cookie: Vec<u8>,
    /// The connection IDs of this connection (RFC 9146), as its handshake settles them.
    pub(crate) cid: CidNegotiation,
}

ex_data_index! {
    /// The `Ssl` ex_data slot holding the [`PeerInfo`], read by the cookie callbacks.
    pub(crate) fn peer_addr_index() -> Index<Ssl, PeerInfo>
}

/// Looks a PSK identity up: the key, or `None` for an unknown identity.
type PskLookup = Box<dyn Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync>;
/// A user's changes to the `SslContextBuilder`.
type Configure = Box<dyn FnOnce(&mut SslContextBuilder) -> Result<(), ErrorStack>>;

/// Every PSK identity the server accepts: the identities given one by one
/// ([`ServerConfigBuilder::psk`], a later key for the same identity replacing the earlier), then
/// each [`ServerConfigBuilder::psk_lookup`] in the order given; the first that knows an identity
/// answers.
#[derive(Default)]
struct PskKeySet {
    identities: Vec<(Vec<u8>, Zeroizing<Vec<u8>>)>,
    lookups: Vec<PskLookup>,
}

impl PskKeySet {
    fn is_empty(&self) -> bool {
        self.identities.is_empty() && self.lookups.is_empty()
    }

    fn key(&self, identity: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if let Some((_, key)) = self.identities.iter().find(|(id, _)| id == identity) {
            return Some(key.clone());
        }
        self.lookups
            .iter()
            .find_map(|lookup| lookup(identity))
            .map(Zeroizing::new)
    }
}

/// A DTLS server's configuration, built once and shared (`Arc`) by its endpoints.
pub struct ServerConfig {
    pub(crate) ctx: SslContext,
    pub(crate) cookies: Arc<CookieKeys>,
    pub(crate) dsm: DsmConfig,
    pub(crate) mtu: u32,
    pub(crate) max_datagram: usize,
    pub(crate) send_queue: usize,
    pub(crate) lookup_timeout: Duration,
    pub(crate) parked_datagrams: usize,
    pub(crate) lean_peers: bool,
    /// How the server's connection IDs are made, if it offers them.
    pub(crate) connection_id: Option<CidLayout>,
    /// Lean peers keep the client's certificate (for a peer carried across a restart).
    pub(crate) keep_peer_certificates: bool,
    /// Lean peers' record state lives in the session store too, under sequence-number leases.
    pub(crate) shared_peers: bool,
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
            .field("send_queue", &self.send_queue)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl ServerConfig {
    /// Starts a configuration whose sessions live in `cache`.
    pub fn builder(cache: SessionCache) -> ServerConfigBuilder {
        ServerConfigBuilder {
            cache,
            context: None,
            configure: Vec::new(),
            ciphers: None,
            identity: None,
            psk: PskKeySet::default(),
            client_cas: Vec::new(),
            client_ca_files: Vec::new(),
            require_client_certificate: false,
            dsm: DsmConfig::default(),
            mtu: DEFAULT_MTU,
            max_datagram: DEFAULT_MAX_DATAGRAM,
            cookie_rotation: DEFAULT_COOKIE_ROTATION,
            send_queue: DEFAULT_SEND_QUEUE,
            lookup_timeout: DEFAULT_LOOKUP_TIMEOUT,
            parked_datagrams: DEFAULT_PARKED_DATAGRAMS,
            lean_peers: true,
            connection_id: true,
            connection_id_host: Vec::new(),
            keep_peer_certificates: false,
            shared_peers: false,
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

    /// The `SslContext` every peer's `Ssl` is made from.
    pub fn context(&self) -> &SslContext {
        &self.ctx
    }

    /// The length of the server's connection IDs (0 when it offers none).
    pub(crate) fn cid_len(&self) -> usize {
        self.connection_id.as_ref().map_or(0, CidLayout::len)
    }
}

/// Builds a [`ServerConfig`] from the user's TLS policy and the server's own settings.
///
/// # The TLS policy is yours
/// Bring your own `SslContextBuilder` with [`context`](Self::context) (made with
/// `SslMethod::dtls_server()` or `SslMethod::dtls()`), or change the one the server makes with
/// [`configure`](Self::configure): client-certificate verification (mutual DTLS), cipher suites,
/// groups, a keylog callback, your own PSK callback. Without either, the server's builder offers
/// [`DEFAULT_CIPHERS`] (plus [`PSK_CIPHERS`] with a [`psk_lookup`](Self::psk_lookup)) and the
/// certificate from [`certificate`](Self::certificate), or a generated self-signed ECDSA P-256
/// one when neither that nor a PSK nor `configure` gives it one.
///
/// # What the server sets on top
/// [`build`](Self::build) then sets, overriding the policy where it set the same thing:
/// - DTLS 1.2 as the minimum and maximum version;
/// - `SSL_OP_COOKIE_EXCHANGE` with the server's cookie callbacks, `SSL_OP_NO_QUERY_MTU` (the MTU
///   is set per peer);
/// - `SSL_OP_NO_ENCRYPT_THEN_MAC`: with encrypt-then-MAC, which OpenSSL negotiates for CBC
///   suites, OpenSSL 3.0 fails a DTLS connection on any record with a bad MAC, so one spoofed
///   datagram from a peer's address would close it (RFC 6347 §4.1.2.7 says to discard such
///   records silently, which OpenSSL does with MAC-then-encrypt and with AEAD suites). It changes
///   nothing for AEAD suites, the default;
/// - the session cache ([`SessionCache::install`]: its callbacks, the cache mode without
///   OpenSSL's internal store, no tickets, the session id context);
/// - on OpenSSL 3.2 and later, [`rate_ccm8_by_key_size`]: the AES-CCM-8 suites (RFC 7925's
///   mandatory `PSK-AES128-CCM8` and `ECDHE-ECDSA-AES128-CCM8`) pass the security level by their
///   key size, as on OpenSSL 3.0, instead of being refused at every level above 0 for their
///   8-byte tag. A [`ciphers`](Self::ciphers) list without them turns them off;
/// - on OpenSSL 3.2 and later, `SSL_MODE_RELEASE_BUFFERS`, which there releases DTLS record
///   buffers once they are drained (on 3.0 it does nothing for DTLS): an idle peer keeps no
///   write buffer for the ChangeCipherSpec of its last flight either.
///
/// It refuses ([`RefusedSetting`]) what would break the server: a context that is not DTLS, a
/// maximum version other than DTLS 1.2, a [`ciphers`](Self::ciphers) list that enables nothing.
#[must_use]
pub struct ServerConfigBuilder {
    cache: SessionCache,
    context: Option<SslContextBuilder>,
    configure: Vec<Configure>,
    ciphers: Option<String>,
    identity: Option<(X509, PKey<Private>)>,
    psk: PskKeySet,
    client_cas: Vec<X509>,
    client_ca_files: Vec<PathBuf>,
    require_client_certificate: bool,
    dsm: DsmConfig,
    mtu: u32,
    max_datagram: usize,
    cookie_rotation: Duration,
    send_queue: usize,
    lookup_timeout: Duration,
    parked_datagrams: usize,
    lean_peers: bool,
    connection_id: bool,
    connection_id_host: Vec<u8>,
    keep_peer_certificates: bool,
    shared_peers: bool,
}

impl fmt::Debug for ServerConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfigBuilder")
            .field("own_context", &self.context.is_some())
            .field("configure", &self.configure.len())
            .field("ciphers", &self.ciphers)
            .field("has_certificate", &self.identity.is_some())
            .field("psk_identities", &self.psk.identities.len())
            .field("psk_lookups", &self.psk.lookups.len())
            .field("client_cas", &self.client_cas.len())
            .field("client_ca_files", &self.client_ca_files)
            .field(
                "require_client_certificate",
                &self.require_client_certificate,
            )
            .field("dsm", &self.dsm)
            .finish_non_exhaustive()
    }
}

impl ServerConfigBuilder {
    /// Uses `builder`, your own TLS policy, instead of the server's defaults. It must be a DTLS
    /// context (`SslMethod::dtls_server()` or `SslMethod::dtls()`); no certificate is generated
    /// for it.
    pub fn context(mut self, builder: SslContextBuilder) -> Self {
        self.context = Some(builder);
        self
    }

    /// Runs `f` on the context builder (yours from [`context`](Self::context), or the server's
    /// with its defaults) before the server adds its own settings: choose cipher suites and
    /// groups, set a keylog callback, anything the named calls do not cover. Calls add up: each
    /// closure runs, in the order given, after the named settings
    /// ([`trust_client_cas`](Self::trust_client_cas),
    /// [`require_client_certificate`](Self::require_client_certificate)), so a later call never
    /// undoes an earlier one by being given. An error from `f` fails [`build`](Self::build).
    ///
    /// ```
    /// use openssl::ssl::SslVerifyMode;
    /// # use openssl_session_cache::{ServerConfig, SessionCache};
    /// let config = ServerConfig::builder(SessionCache::builder().build()?)
    ///     .configure(|b| b.set_groups_list("P-256:X25519"))
    ///     .configure(|b| {
    ///         b.set_keylog_callback(|_ssl, _line| { /* write it somewhere safe */ });
    ///         Ok(())
    ///     })
    ///     .build()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn configure(
        mut self,
        f: impl FnOnce(&mut SslContextBuilder) -> Result<(), ErrorStack> + 'static,
    ) -> Self {
        self.configure.push(Box::new(f));
        self
    }

    /// Trusts `cas` to issue client certificates (mutual DTLS): clients are asked for a
    /// certificate, which must chain to one of these (`SSL_CTX_set_verify` with
    /// `SSL_VERIFY_PEER`, the CAs in the verify store and in the CertificateRequest's list). A
    /// client that sends none is still accepted unless
    /// [`require_client_certificate`](Self::require_client_certificate) is on. Calls add up.
    ///
    /// ```
    /// # use openssl_session_cache::{ServerConfig, SessionCache};
    /// # let ca = openssl_session_cache::self_signed_certificate()?.0;
    /// let config = ServerConfig::builder(SessionCache::builder().build()?)
    ///     .trust_client_cas([ca])
    ///     .require_client_certificate()
    ///     .build()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn trust_client_cas(mut self, cas: impl IntoIterator<Item = X509>) -> Self {
        self.client_cas.extend(cas);
        self
    }

    /// Trusts the CA certificates in the PEM file at `path` to issue client certificates, as
    /// [`trust_client_cas`](Self::trust_client_cas) does. The file is read by
    /// [`build`](Self::build), which fails if it cannot be read or holds no certificate. Calls
    /// add up.
    pub fn client_ca_file(mut self, path: impl AsRef<Path>) -> Self {
        self.client_ca_files.push(path.as_ref().to_owned());
        self
    }

    /// Refuses clients without a certificate from a trusted CA (`SSL_VERIFY_PEER |
    /// SSL_VERIFY_FAIL_IF_NO_PEER_CERT`). [`build`](Self::build) fails if no CA is trusted
    /// ([`trust_client_cas`](Self::trust_client_cas), [`client_ca_file`](Self::client_ca_file)).
    pub fn require_client_certificate(mut self) -> Self {
        self.require_client_certificate = true;
        self
    }

    /// The cipher list (OpenSSL's syntax, `SSL_CTX_set_cipher_list`), set after
    /// [`configure`](Self::configure). A list that enables no suite is refused
    /// ([`RefusedSetting::NoCiphers`]). CBC suites are run MAC-then-encrypt (see the type's
    /// docs).
    pub fn ciphers(mut self, list: &str) -> Self {
        self.ciphers = Some(list.to_owned());
        self
    }

    /// The server certificate and its key.
    pub fn certificate(mut self, cert: X509, key: PKey<Private>) -> Self {
        self.identity = Some((cert, key));
        self
    }

    /// Accepts PSK handshakes, looking each identity up with `lookup` (which returns the key, or
    /// `None` for an unknown identity: the handshake then fails). It runs inside OpenSSL's PSK
    /// callback (`SSL_CTX_set_psk_server_callback`) on the worker thread, so it must be quick; a
    /// panic in it is caught and counts as an unknown identity. Keys longer than OpenSSL's
    /// maximum (256 bytes) are refused the same way. With a PSK lookup and no certificate, the
    /// server speaks PSK only.
    ///
    /// The same lookup is the session cache's key source for this server: a PSK session resumes
    /// only while its identity still maps to the key it was made with, so an identity the lookup
    /// no longer knows (revoked) or a changed key cannot resume an old session, from a snapshot
    /// or another host either.
    ///
    /// Calls add up: identities given with [`psk`](Self::psk) are asked first, then each lookup in
    /// the order given; the first that knows the identity answers.
    pub fn psk_lookup(
        mut self,
        lookup: impl Fn(&[u8]) -> Option<Vec<u8>> + Send + Sync + 'static,
    ) -> Self {
        self.psk.lookups.push(Box::new(lookup));
        self
    }

    /// Accepts PSK handshakes for `identity` with `key`. Calls add up: each identity is accepted
    /// with its key (a second call for the same identity replaces its key), beside any
    /// [`psk_lookup`](Self::psk_lookup).
    pub fn psk(mut self, identity: &[u8], key: &[u8]) -> Self {
        let key = Zeroizing::new(key.to_vec());
        match self
            .psk
            .identities
            .iter_mut()
            .find(|(id, _)| id == identity)
        {
            Some((_, old)) => *old = key,
            None => self.psk.identities.push((identity.to_vec(), key)),
        }
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

    /// How many datagrams may wait for [`Endpoint::poll_transmit`](crate::Endpoint::poll_transmit)
    /// per peer before [`Endpoint::send`](crate::Endpoint::send) answers
    /// [`SendError::QueueFull`](crate::SendError::QueueFull) (default [`DEFAULT_SEND_QUEUE`], at
    /// least 1). Handshake flights and close_notify count too, but are never refused.
    pub fn send_queue(mut self, datagrams: usize) -> Self {
        self.send_queue = datagrams;
        self
    }

    /// The longest a handshake waits for a remote store's session lookup (default
    /// [`DEFAULT_LOOKUP_TIMEOUT`]). The store completes every lookup within its own deadline; this
    /// bound is the endpoint's backstop: past it the lookup is abandoned and the handshake goes on
    /// as a full one.
    pub fn lookup_timeout(mut self, timeout: Duration) -> Self {
        self.lookup_timeout = timeout;
        self
    }

    /// How many datagrams a peer whose lookup is in flight may have waiting (default
    /// [`DEFAULT_PARKED_DATAGRAMS`], at least 1); more are dropped and counted.
    pub fn parked_datagrams(mut self, n: usize) -> Self {
        self.parked_datagrams = n;
        self
    }

    /// Whether an established peer gives its `Ssl` up (default: on). Once OpenSSL finished a
    /// handshake with an AEAD suite (AES-GCM, AES-CCM, AES-CCM8, ChaCha20-Poly1305: every
    /// default and PSK suite), the endpoint derives the record keys through OpenSSL's TLS1-PRF,
    /// frees the `Ssl` and protects and opens the peer's records itself on OpenSSL's EVP AEAD: a
    /// few hundred bytes per idle peer instead of an OpenSSL connection. Peers of other suites
    /// (CBC) keep their `Ssl` either way; the application sees no difference. Off, every peer
    /// keeps its `Ssl`.
    pub fn lean_peers(mut self, on: bool) -> Self {
        self.lean_peers = on;
        self
    }

    /// Whether the server offers DTLS 1.2 connection IDs (RFC 9146) to clients that ask for them
    /// (default: on). An association with a connection ID survives a change of the client's
    /// address or port (a NAT rebinding, a device moving between networks): its records carry
    /// the server's connection ID, the endpoint finds the peer by it from whatever address they
    /// come, and the peer moves to a new address only on a record that authenticated and is
    /// newer than every one before. Clients that do not ask see no difference. Connection IDs
    /// need [`lean_peers`](Self::lean_peers) (the endpoint frames those records itself) and an
    /// AEAD suite; otherwise the server does not offer them.
    pub fn connection_id(mut self, on: bool) -> Self {
        self.connection_id = on;
        self
    }

    /// A host id (at most 8 bytes, default none) that every connection ID of this server
    /// carries after the worker index, so that a load balancer in front of a farm can route a
    /// `tls12_cid` datagram to its host: see the layout in the crate's connection ID docs
    /// (`[worker][host id][6 random bytes]`, starting at byte 11 of the datagram).
    pub fn connection_id_host(mut self, host: &[u8]) -> Self {
        self.connection_id_host = host.to_vec();
        self
    }

    /// Whether a lean peer keeps the client's certificate after its handshake (default: off).
    /// [`Event::Connected`](crate::Event::Connected) always reports it; kept, it also comes back
    /// with a peer restored after a restart ([`Endpoint::restore`](crate::Endpoint::restore)),
    /// at the cost of the certificate's bytes per peer. Off, a restored peer reports none.
    pub fn keep_peer_certificates(mut self, on: bool) -> Self {
        self.keep_peer_certificates = on;
        self
    }

    /// Whether each established lean peer's record state lives in the session store too
    /// (default: off), so that another host of a farm sharing the store takes the association
    /// over when this one dies: a record with an unknown connection ID (or, for a peer without
    /// one, from an unknown address) makes the endpoint look the state up and go on with no
    /// handshake. The state is sealed like sessions (by a store that seals: the Redis store),
    /// bound to the server's identity, and expires with the session; the write sequence
    /// numbers are leased in blocks through conditional writes the store confirmed
    /// ([`SessionStore::put_if`](crate::SessionStore::put_if), which a custom store must
    /// implement atomically), so no (key, nonce) pair is used twice whenever a host died, nor
    /// when two live hosts serve one peer. See the `continuity` section of
    /// SECURITY.md for what it guarantees and what not.
    pub fn shared_peers(mut self, on: bool) -> Self {
        self.shared_peers = on;
        self
    }

    /// Builds the `SslContext`: the policy, then what the server owns (see the type's docs).
    pub fn build(self) -> Result<Arc<ServerConfig>, Error> {
        if self.mtu < 256 {
            return Err(Error::setting("mtu", format!("mtu {} below 256", self.mtu)));
        }
        if self.cookie_rotation.is_zero() {
            return Err(Error::setting(
                "cookie_rotation",
                "cookie rotation period is zero",
            ));
        }
        if self.send_queue == 0 {
            return Err(Error::setting("send_queue", "send queue of 0 datagrams"));
        }
        for (setting, zero) in [
            ("lookup_timeout", self.lookup_timeout.is_zero()),
            ("parked_datagrams", self.parked_datagrams == 0),
        ] {
            if zero {
                return Err(Error::setting(
                    setting,
                    "lookup timeout and parked datagrams must be above zero",
                ));
            }
        }
        let peer_addr = peer_addr_index()?;
        let cookies = Arc::new(CookieKeys::new(self.cookie_rotation)?);

        let own_context = self.context.is_some();
        let mut ctx = match self.context {
            Some(ctx) => ctx,
            None => {
                let mut ctx = SslContext::builder(SslMethod::dtls_server())?;
                let ciphers = if self.psk.is_empty() {
                    DEFAULT_CIPHERS.to_owned()
                } else {
                    format!("{DEFAULT_CIPHERS}:{PSK_CIPHERS}")
                };
                ctx.set_cipher_list(&ciphers)?;
                ctx
            }
        };
        trust_client_cas(
            &mut ctx,
            self.client_cas,
            &self.client_ca_files,
            self.require_client_certificate,
        )?;
        for configure in self.configure {
            configure(&mut ctx)?;
        }
        if let Some(list) = &self.ciphers {
            if list.trim().is_empty() || ctx.set_cipher_list(list).is_err() {
                return Err(RefusedSetting::NoCiphers(list.clone()).into());
            }
        }
        if let Some((cert, key)) = &self.identity {
            ctx.set_certificate(cert)?;
            ctx.set_private_key(key)?;
            ctx.check_private_key()?;
        } else if !own_context && self.psk.is_empty() && ctx.check_private_key().is_err() {
            let (cert, key) = self_signed_certificate()?;
            ctx.set_certificate(&cert)?;
            ctx.set_private_key(&key)?;
        }
        if !self.psk.is_empty() {
            let keys = Arc::new(self.psk);
            let lookup = Arc::clone(&keys);
            ctx.set_psk_server_callback(move |_ssl, identity, out| {
                Ok(psk_answer(|id| lookup.key(id), identity, out))
            });
            // The cache checks this server's PSK sessions against the same keys.
            crate::cache::policy::set_context_psk_keys(
                &mut ctx,
                Arc::new(move |identity: &[u8]| {
                    catch_unwind(AssertUnwindSafe(|| keys.key(identity))).unwrap_or(None)
                }),
            )?;
        }
        pin_dtls12(&mut ctx)?;
        rate_ccm8_by_key_size(&mut ctx);
        if crate::ffi::release_buffers_mode_covers_dtls(openssl::version::number()) {
            // The epoch-0 write layer a finished handshake keeps frees its buffer too.
            ctx.set_mode(SslMode::RELEASE_BUFFERS);
        }
        ctx.set_options(
            SslOptions::COOKIE_EXCHANGE | SslOptions::NO_QUERY_MTU | NO_ENCRYPT_THEN_MAC,
        );

        // OpenSSL only generates a cookie for the reconstructed first ClientHello the endpoint
        // feeds a new `Ssl` (its HelloVerifyRequest is discarded): real cookieless hellos are
        // answered by the endpoint without an `Ssl`. It is still a real cookie.
        let gen_keys = Arc::clone(&cookies);
        ctx.set_cookie_generate_cb(move |ssl, out| {
            let info = ssl.ex_data(peer_addr).ok_or_else(ErrorStack::get)?;
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
        let connection_id = if self.connection_id && self.lean_peers {
            let layout = CidLayout::new(&self.connection_id_host)?;
            super::cid::install(&mut ctx, peer_addr, layout.clone())?;
            Some(layout)
        } else {
            None
        };

        let ctx = ctx.build();
        let fingerprint = ctx.certificate().map(certificate_fingerprint).transpose()?;
        Ok(Arc::new(ServerConfig {
            ctx,
            cookies,
            dsm: self.dsm,
            mtu: self.mtu,
            max_datagram: self.max_datagram,
            send_queue: self.send_queue,
            lookup_timeout: self.lookup_timeout,
            parked_datagrams: self.parked_datagrams,
            lean_peers: self.lean_peers,
            connection_id,
            keep_peer_certificates: self.keep_peer_certificates,
            shared_peers: self.shared_peers && self.lean_peers,
            peer_addr,
            cache: self.cache,
            fingerprint,
        }))
    }
}

/// Pins `ctx` to DTLS 1.2, refusing a context that is not DTLS or whose policy set a maximum
/// version other than DTLS 1.2.
fn pin_dtls12(ctx: &mut SslContextBuilder) -> Result<(), Error> {
    let asked_max = ctx.max_proto_version();
    // On a TLS context OpenSSL accepts a DTLS bound but ignores it, so read it back.
    let pinned = ctx.set_min_proto_version(Some(SslVersion::DTLS1_2)).is_ok()
        && ctx.set_max_proto_version(Some(SslVersion::DTLS1_2)).is_ok()
        && ctx.min_proto_version() == Some(SslVersion::DTLS1_2)
        && ctx.max_proto_version() == Some(SslVersion::DTLS1_2);
    if !pinned {
        // Leave no half-reported failure on the thread's OpenSSL error queue.
        let _ = ErrorStack::get();
        return Err(RefusedSetting::NotDtls.into());
    }
    match asked_max {
        Some(v) if v != SslVersion::DTLS1_2 => {
            Err(RefusedSetting::MaxVersion(version_name(v)).into())
        }
        _ => Ok(()),
    }
}

fn version_name(v: SslVersion) -> String {
    let known = [
        (SslVersion::DTLS1, "DTLS 1.0"),
        (SslVersion::DTLS1_2, "DTLS 1.2"),
        (SslVersion::SSL3, "SSL 3.0"),
        (SslVersion::TLS1, "TLS 1.0"),
        (SslVersion::TLS1_1, "TLS 1.1"),
        (SslVersion::TLS1_2, "TLS 1.2"),
        (SslVersion::TLS1_3, "TLS 1.3"),
    ];
    known
        .iter()
        .find(|(k, _)| *k == v)
        .map_or_else(|| format!("{v:?}"), |(_, name)| (*name).to_owned())
}

/// Sets up client-certificate verification (mutual DTLS) from the CAs given to the builder, if
/// any: the verify store, the CA names sent in the CertificateRequest, the verify mode.
fn trust_client_cas(
    ctx: &mut SslContextBuilder,
    mut cas: Vec<X509>,
    files: &[PathBuf],
    require: bool,
) -> Result<(), Error> {
    for path in files {
        let pem = std::fs::read(path).map_err(|source| Error::ReadFile {
            kind: FileKind::ClientCa,
            path: path.clone(),
            source,
        })?;
        let certs = X509::stack_from_pem(&pem).map_err(|source| Error::InvalidPem {
            kind: FileKind::ClientCa,
            path: path.clone(),
            source,
        })?;
        if certs.is_empty() {
            return Err(Error::InvalidFile {
                kind: FileKind::ClientCa,
                path: path.clone(),
                reason: "holds no certificate".into(),
            });
        }
        cas.extend(certs);
    }
    if cas.is_empty() {
        if require {
            return Err(Error::setting(
                "require_client_certificate",
                "require_client_certificate without a trusted client ca",
            ));
        }
        return Ok(());
    }
    let mut store = X509StoreBuilder::new()?;
    let mut names = Stack::new()?;
    for ca in &cas {
        store.add_cert(ca.clone())?;
        names.push(ca.subject_name().to_owned()?)?;
    }
    ctx.set_verify_cert_store(store.build())?;
    ctx.set_client_ca_list(names);
    let mut mode = SslVerifyMode::PEER;
    if require {
        mode |= SslVerifyMode::FAIL_IF_NO_PEER_CERT;
    }
    ctx.set_verify(mode);
    Ok(())
}

/// The PSK callback's answer: the key's length after copying it to `out`, or 0 (unknown
/// identity, a key too long, a lookup that panicked). Never panics.
fn psk_answer(
    lookup: impl Fn(&[u8]) -> Option<Zeroizing<Vec<u8>>>,
    identity: Option<&[u8]>,
    out: &mut [u8],
) -> usize {
    let Some(identity) = identity else {
        return 0;
    };
    let key = match catch_unwind(AssertUnwindSafe(|| lookup(identity))) {
        Ok(Some(key)) => key,
        Ok(None) => {
            tracing::debug!("psk identity unknown");
            return 0;
        }
        Err(_) => {
            tracing::error!("the psk lookup panicked; the identity counts as unknown");
            return 0;
        }
    };
    if key.is_empty() || key.len() > out.len() {
        tracing::warn!(len = key.len(), "psk key of an unusable length refused");
        return 0;
    }
    out[..key.len()].copy_from_slice(&key);
    key.len()
}

/// Makes `ctx`'s security level judge the AES-CCM-8 cipher suites by their key size (128 or 256
/// bits), as OpenSSL 3.0 does, instead of by their 8-byte authentication tag.
///
/// OpenSSL 3.2 and later rate every CCM8 suite at 64 bits of security (`ssl/s3_lib.c`: "CCM8
/// uses a short tag"), which every security level above 0 refuses, and make level 2 the default:
/// a server or client on such a release silently drops `PSK-AES128-CCM8` and
/// `ECDHE-ECDSA-AES128-CCM8`, the suites RFC 7925 makes mandatory for constrained devices, from
/// its list, and a peer offering only those fails the handshake. The 64 bits are the chance of
/// one forged record passing, each forgery costing the attacker a datagram; a DTLS receiver
/// drops records that fail (RFC 6347 §4.1.2.7), so IoT profiles accept it. Lowering the whole
/// security level to 0 would also accept weak certificate keys and signatures; this changes
/// the verdict on the CCM8 suites only, and leaves every other question to the context's own
/// callback.
///
/// [`ServerConfigBuilder::build`] does this on the server's context; call it on a client context
/// (or a TLS server of your own) that must offer CCM8 on OpenSSL 3.2+. Returns whether it
/// installed anything: `false` on OpenSSL 3.0 (nothing to do) and on a context whose security
/// callback C code replaced with one carrying its own data (left alone).
pub fn rate_ccm8_by_key_size(ctx: &mut SslContextBuilder) -> bool {
    crate::ffi::rate_ccm8_by_key_size(ctx)
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

/// The SHA-256 fingerprint of `cert` as colon-separated upper-case hex (`AB:CD:...`).
pub fn certificate_fingerprint(cert: &X509Ref) -> Result<String, Error> {
    let digest = cert.digest(MessageDigest::sha256())?;
    let hex = hex::encode_upper(&*digest);
    let pairs: Vec<&str> = (0..hex.len()).step_by(2).map(|i| &hex[i..i + 2]).collect();
    Ok(pairs.join(":"))
}

#[cfg(test)]
mod tests {
    use openssl::ssl::SslVerifyMode;

    use super::*;

    fn builder() -> ServerConfigBuilder {
        ServerConfig::builder(SessionCache::builder().build().unwrap())
    }

    fn refused(b: ServerConfigBuilder) -> RefusedSetting {
        match b.build() {
            Err(Error::RefusedSetting(r)) => r,
            other => panic!("expected a refused setting, got {other:?}"),
        }
    }

    #[test]
    fn dtls_record_buffers_are_released_when_drained_from_openssl_3_2_on() {
        let config = builder().build().unwrap();
        let ssl = openssl::ssl::Ssl::new(config.context()).unwrap();
        assert_eq!(
            crate::ffi::ssl_mode(&ssl).contains(SslMode::RELEASE_BUFFERS),
            openssl::version::number() >= 0x3020_0000
        );
    }

    #[test]
    fn a_tls_context_is_refused() {
        let tls = SslContext::builder(SslMethod::tls_server()).unwrap();
        assert_eq!(refused(builder().context(tls)), RefusedSetting::NotDtls);
        // The error queue is left clean for the next OpenSSL call on this thread.
        assert!(ErrorStack::get().errors().is_empty());
    }

    #[test]
    fn a_maximum_version_other_than_dtls12_is_refused() {
        let mut ctx = SslContext::builder(SslMethod::dtls_server()).unwrap();
        ctx.set_max_proto_version(Some(SslVersion::DTLS1)).unwrap();
        assert_eq!(
            refused(builder().context(ctx)),
            RefusedSetting::MaxVersion("DTLS 1.0".into())
        );
        let r = refused(builder().configure(|b| b.set_max_proto_version(Some(SslVersion::DTLS1))));
        assert_eq!(r, RefusedSetting::MaxVersion("DTLS 1.0".into()));
        // A maximum of DTLS 1.2 is what the server sets anyway.
        builder()
            .configure(|b| b.set_max_proto_version(Some(SslVersion::DTLS1_2)))
            .build()
            .unwrap();
    }

    #[test]
    fn a_cipher_list_enabling_nothing_is_refused() {
        for list in ["", "  ", "NO-SUCH-CIPHER", "eNULL:!eNULL"] {
            assert_eq!(
                refused(builder().ciphers(list)),
                RefusedSetting::NoCiphers(list.into()),
                "{list:?}"
            );
        }
        builder()
            .ciphers("ECDHE-ECDSA-AES128-SHA256")
            .build()
            .unwrap();
    }

    #[test]
    fn the_server_owns_versions_cookies_mtu_and_encrypt_then_mac() {
        let config = builder()
            .configure(|b| {
                b.set_min_proto_version(Some(SslVersion::DTLS1))?;
                b.clear_options(SslOptions::COOKIE_EXCHANGE);
                b.set_verify(SslVerifyMode::PEER);
                Ok(())
            })
            .build()
            .unwrap();
        let ctx = config.context();
        // Cookies and encrypt-then-MAC are checked by the endpoint's handshake tests (a
        // HelloVerifyRequest, spoofed CBC records); the versions by a DTLS 1.0 client here.
        // The policy's verify mode stays.
        assert_eq!(ctx.verify_mode(), SslVerifyMode::PEER);
        assert!(ctx.certificate().is_some(), "a certificate was generated");
        let mut old = SslContext::builder(SslMethod::dtls_client()).unwrap();
        old.set_max_proto_version(Some(SslVersion::DTLS1)).unwrap();
        let mut client = Ssl::new(&old.build()).unwrap();
        client.set_connect_state();
        let mut client =
            openssl::ssl::SslStream::new(client, super::super::pipe::DatagramPipe::new()).unwrap();
        let _ = client.do_handshake();
        let mut server = Ssl::new(ctx).unwrap();
        server.set_accept_state();
        let mut server =
            openssl::ssl::SslStream::new(server, super::super::pipe::DatagramPipe::new()).unwrap();
        for d in client.get_mut().take_outbound() {
            server.get_mut().push(d);
        }
        let e = server.do_handshake().unwrap_err();
        assert!(
            e.to_string().contains("version") || e.ssl_error().is_some(),
            "a DTLS 1.0 hello is refused: {e}"
        );
        assert_eq!(e.code(), openssl::ssl::ErrorCode::SSL);
    }

    #[test]
    fn certificates_come_from_the_policy_or_are_generated() {
        let generated = builder().build().unwrap();
        assert!(generated.certificate_fingerprint().is_some());
        // PSK only: no certificate.
        let psk = builder().psk(b"id", &[1; 16]).build().unwrap();
        assert!(psk.context().certificate().is_none());
        // A certificate set in `configure` is kept, not replaced.
        let (cert, key) = self_signed_certificate().unwrap();
        let expected = certificate_fingerprint(&cert).unwrap();
        let own = builder()
            .configure(move |b| {
                b.set_certificate(&cert)?;
                b.set_private_key(&key)
            })
            .build()
            .unwrap();
        assert_eq!(own.certificate_fingerprint(), Some(expected.as_str()));
        // A context of one's own gets no generated certificate.
        let ctx = SslContext::builder(SslMethod::dtls_server()).unwrap();
        let bare = builder().context(ctx).psk(b"id", &[1; 16]).build().unwrap();
        assert!(bare.certificate_fingerprint().is_none());
    }

    #[test]
    fn psk_answers_known_identities_only_and_survives_a_panicking_lookup() {
        let lookup = |id: &[u8]| {
            match id {
                b"known" => Some(vec![7; 16]),
                b"huge" => Some(vec![7; 300]),
                b"empty" => Some(Vec::new()),
                b"boom" => panic!("lookup failed"),
                _ => None,
            }
            .map(Zeroizing::new)
        };
        let mut out = [0u8; 256];
        assert_eq!(psk_answer(lookup, Some(b"known"), &mut out), 16);
        assert_eq!(&out[..16], &[7; 16]);
        for id in [&b"unknown"[..], b"huge", b"empty", b"boom"] {
            assert_eq!(psk_answer(lookup, Some(id), &mut out), 0, "{id:?}");
        }
        assert_eq!(psk_answer(lookup, None, &mut out), 0);
    }

    #[test]
    fn fingerprint_is_colon_separated_upper_hex() {
        let (cert, _) = self_signed_certificate().unwrap();
        let fp = certificate_fingerprint(&cert).unwrap();
        let digest = cert.digest(MessageDigest::sha256()).unwrap();
        assert_eq!(fp.len(), 32 * 3 - 1);
        assert_eq!(fp.replace(':', ""), hex::encode_upper(&*digest));
        assert!(fp.split(':').all(|p| p.len() == 2));
    }
}
