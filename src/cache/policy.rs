//! Today's policy, applied to every session a lookup finds, whatever policy it was made under.
//!
//! A stored session outlives the configuration that made it: in a snapshot across a restart, in
//! a shared store across hosts and deployments. OpenSSL checks little on resumption (the
//! protocol version, the session id context, its own expiry), so the cache checks the rest
//! before handing a session out:
//! - its lifetime counted from its creation under today's `max_ttl` (a shorter TTL applies to
//!   sessions made under a longer one);
//! - its cipher suite is still one the connection offers (a suite removed from the server's list
//!   no longer resumes);
//! - a PSK session's identity still maps to the same key: the store keeps a keyed fingerprint of
//!   the key (never the key), and a revoked identity or a changed key no longer resumes. The keys
//!   come from [`SessionCacheBuilder::psk_keys`] or, with no extra call, from the PSK lookup of
//!   the context the connection runs on (the DTLS server's
//!   [`psk_lookup`](crate::ServerConfigBuilder::psk_lookup) registers itself there). A PSK session
//!   whose key cannot be checked does not resume, unless
//!   [`SessionCacheBuilder::resume_unchecked_psk_sessions`] says so by name;
//! - the application's own veto ([`SessionCacheBuilder::accept_session`]).
//!
//! [`SessionCacheBuilder::accept_session`]: crate::SessionCacheBuilder::accept_session
//! [`SessionCacheBuilder::psk_keys`]: crate::SessionCacheBuilder::psk_keys
//! [`SessionCacheBuilder::resume_unchecked_psk_sessions`]: crate::SessionCacheBuilder::resume_unchecked_psk_sessions

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
#[cfg(feature = "server")]
use openssl::ssl::SslContextBuilder;
use openssl::ssl::{SslContext, SslRef, SslSessionRef, SslVersion};
use openssl::x509::X509Ref;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::cache::der::PSK_FINGERPRINT_LEN;
use crate::ex_data::ex_data_index;
use crate::ffi;
use crate::store::SessionId;

/// Looks up the current key of a PSK identity (`None`: unknown or revoked).
pub(crate) type PskKeys = Arc<dyn Fn(&[u8]) -> Option<Zeroizing<Vec<u8>>> + Send + Sync>;
ex_data_index! {
    /// The `SslContext` ex_data slot holding the PSK keys of the context's own PSK callback,
    /// which the policy reads when the cache has no
    /// [`psk_keys`](crate::SessionCacheBuilder::psk_keys).
    fn context_keys_index() -> Index<SslContext, PskKeys>
}

/// Registers `keys`, the lookup behind `ctx`'s PSK server callback, as the key source the
/// session policy checks PSK sessions of connections on `ctx` against.
#[cfg(feature = "server")]
pub(crate) fn set_context_psk_keys(
    ctx: &mut SslContextBuilder,
    keys: PskKeys,
) -> Result<(), crate::Error> {
    let index = context_keys_index()?;
    ctx.set_ex_data(index, keys);
    Ok(())
}

/// The PSK keys registered on the context `ssl` runs on, if any.
fn context_psk_keys(ssl: &SslRef) -> Option<&PskKeys> {
    context_keys(ssl.ssl_context())
}

/// The PSK keys registered on `ctx`, if any.
pub(crate) fn context_keys(ctx: &openssl::ssl::SslContextRef) -> Option<&PskKeys> {
    ctx.ex_data(context_keys_index().ok()?)
}

/// The application's veto.
pub(crate) type Accept = Arc<dyn Fn(&SessionInfo<'_>) -> bool + Send + Sync>;

/// What the application's [`accept_session`](crate::SessionCacheBuilder::accept_session) veto
/// sees of a stored session about to be resumed.
#[non_exhaustive]
pub struct SessionInfo<'a> {
    /// The session id.
    pub id: &'a SessionId,
    /// The protocol version the session was made with.
    pub protocol: SslVersion,
    /// The cipher suite's OpenSSL name, e.g. `ECDHE-ECDSA-AES128-GCM-SHA256`.
    pub cipher: Option<&'a str>,
    /// The client certificate the session was authenticated with, if any.
    pub peer_certificate: Option<&'a X509Ref>,
    /// The PSK identity the session was made with, if any.
    pub psk_identity: Option<&'a [u8]>,
    /// How long ago the session was made (its full handshake).
    pub age: Duration,
}

impl fmt::Debug for SessionInfo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionInfo")
            .field("id", self.id)
            .field("protocol", &self.protocol)
            .field("cipher", &self.cipher)
            .field(
                "peer_certificate",
                &self
                    .peer_certificate
                    .map(|c| c.subject_name().entries().count()),
            )
            .field(
                "psk_identity",
                &self.psk_identity.map(String::from_utf8_lossy),
            )
            .field("age", &self.age)
            .finish()
    }
}

/// Why a stored session is not handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Older than today's lifetime allows.
    Expired,
    /// Its cipher suite is no longer offered, or its PSK identity no longer has the same key.
    Stale,
    /// The application said no.
    Vetoed,
}

/// The configured policy.
#[derive(Clone, Default)]
pub(crate) struct Policy {
    pub(crate) psk_keys: Option<PskKeys>,
    pub(crate) accept: Option<Accept>,
    /// PSK sessions whose key cannot be checked (no key source) resume anyway.
    pub(crate) unchecked_psk: bool,
}

impl Policy {
    /// Where the current PSK keys come from for a connection: the cache's own
    /// [`psk_keys`](crate::SessionCacheBuilder::psk_keys), else the lookup registered on the
    /// connection's context (the DTLS server's PSK lookup), if either.
    pub(crate) fn key_source<'a>(&'a self, ssl: Option<&'a SslRef>) -> Option<&'a PskKeys> {
        self.psk_keys
            .as_ref()
            .or_else(|| ssl.and_then(context_psk_keys))
    }

    /// The fingerprint to store with a PSK session made with `identity` on `ssl` (`None`: a
    /// session inserted by hand), if a key is known.
    pub(crate) fn fingerprint_for(
        &self,
        ssl: Option<&SslRef>,
        identity: &[u8],
    ) -> Option<[u8; PSK_FINGERPRINT_LEN]> {
        let keys = self.key_source(ssl)?;
        let key = keys(identity)?;
        Some(psk_fingerprint(identity, &key))
    }

    /// Checks `session` (found under `id`, made `age` ago, recorded with PSK fingerprint
    /// `psk_fp` and identity `psk_identity`) for a connection `ssl`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn check(
        &self,
        ssl: &SslRef,
        id: &SessionId,
        session: &SslSessionRef,
        age: Duration,
        max_ttl: Duration,
        psk_identity: Option<&[u8]>,
        psk_fp: Option<[u8; PSK_FINGERPRINT_LEN]>,
    ) -> Result<(), Refusal> {
        if age >= max_ttl {
            return Err(Refusal::Expired);
        }
        let cipher = ffi::session_cipher(session);
        if let Some(c) = cipher {
            if !ffi::offers_cipher(ssl, ffi::cipher_id(c)) {
                return Err(Refusal::Stale);
            }
        }
        if let Some(identity) = psk_identity {
            match self.key_source(Some(ssl)) {
                Some(keys) => {
                    // No fingerprint stored (made before keys were known): it cannot be shown
                    // to match.
                    let current = keys(identity).map(|key| psk_fingerprint(identity, &key));
                    match (current, psk_fp) {
                        (Some(now), Some(then)) if openssl::memcmp::eq(&now, &then) => {}
                        _ => return Err(Refusal::Stale),
                    }
                }
                // Nothing to check the key against: a revoked identity would resume.
                None if !self.unchecked_psk => return Err(Refusal::Stale),
                None => {}
            }
        }
        if let Some(accept) = &self.accept {
            let info = SessionInfo {
                id,
                protocol: session.protocol_version(),
                cipher: cipher.map(|c| c.name()),
                peer_certificate: ffi::session_peer(session),
                psk_identity,
                age,
            };
            if !accept(&info) {
                return Err(Refusal::Vetoed);
            }
        }
        Ok(())
    }
}

/// A keyed fingerprint of a PSK: HMAC-SHA256 keyed with the PSK itself over a label and the
/// identity, truncated. It reveals nothing about the key to whoever reads the store (the session
/// there already holds a master secret derived from it), is the same on every host and after a
/// restart, and changes when the key does.
pub(crate) fn psk_fingerprint(identity: &[u8], key: &[u8]) -> [u8; PSK_FINGERPRINT_LEN] {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("BUG: HMAC accepts keys of any length");
    mac.update(b"openssl-session-cache psk fingerprint v1\0");
    mac.update(identity);
    let tag = mac.finalize().into_bytes();
    let mut fp = [0u8; PSK_FINGERPRINT_LEN];
    fp.copy_from_slice(&tag[..PSK_FINGERPRINT_LEN]);
    fp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_depend_on_key_and_identity() {
        let a = psk_fingerprint(b"dev-1", b"key one");
        assert_eq!(a, psk_fingerprint(b"dev-1", b"key one"));
        assert_ne!(a, psk_fingerprint(b"dev-1", b"key two"));
        assert_ne!(a, psk_fingerprint(b"dev-2", b"key one"));
        assert_ne!(psk_fingerprint(b"", b""), [0; PSK_FINGERPRINT_LEN]);
    }
}
