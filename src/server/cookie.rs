//! Stateless DTLS cookies (RFC 6347 §4.2.1): an HMAC-SHA256 of the peer's address under a random
//! secret that rotates.
//!
//! A cookie proves that the sender of a ClientHello can receive datagrams at the address it claims,
//! so that the server keeps no state for (and never looks up a session for) a spoofed source.
//! Cookies made under the current or the previous secret verify, so a rotation does not break a
//! handshake that is in flight; a cookie older than two rotation periods fails.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use openssl::error::ErrorStack;
use openssl::memcmp;
use openssl::rand::rand_bytes;
use openssl::sha::Sha256;
use parking_lot::Mutex;
use zeroize::Zeroizing;

/// Length of the cookies this module makes (a full HMAC-SHA256 tag).
pub(crate) const COOKIE_LEN: usize = 32;

/// One HMAC-SHA256 key (RFC 2104), kept as the SHA-256 states after absorbing the padded key,
/// so a tag costs two short hashes and no EVP fetch (`EVP_DigestSignInit` per cookie costs
/// several times more in OpenSSL 3).
struct Secret {
    inner: Sha256,
    outer: Sha256,
}

impl Secret {
    fn random() -> Result<Self, ErrorStack> {
        let mut key = Zeroizing::new([0u8; 64]);
        rand_bytes(&mut key[..32])?;
        let mut ipad = Zeroizing::new([0x36u8; 64]);
        let mut opad = Zeroizing::new([0x5cu8; 64]);
        for i in 0..64 {
            ipad[i] ^= key[i];
            opad[i] ^= key[i];
        }
        let mut inner = Sha256::new();
        inner.update(&ipad[..]);
        let mut outer = Sha256::new();
        outer.update(&opad[..]);
        Ok(Self { inner, outer })
    }

    fn tag(&self, peer: SocketAddr) -> [u8; COOKIE_LEN] {
        let mut inner = self.inner.clone();
        match peer {
            SocketAddr::V4(a) => {
                inner.update(&[4]);
                inner.update(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                inner.update(&[6]);
                inner.update(&a.ip().octets());
            }
        }
        inner.update(&peer.port().to_be_bytes());
        let mut outer = self.outer.clone();
        outer.update(&inner.finish());
        outer.finish()
    }
}

struct Keys {
    current: Secret,
    previous: Option<Secret>,
    /// When `current` is retired; set on the first `rotate_if_due` (time is injected).
    next_rotation: Option<Instant>,
}

/// The rotating cookie secrets, shared by every worker of a server (and by the OpenSSL cookie
/// callbacks, which capture an `Arc` of it).
pub(crate) struct CookieKeys {
    keys: Mutex<Keys>,
    rotate_every: Duration,
}

impl std::fmt::Debug for CookieKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CookieKeys")
            .field("rotate_every", &self.rotate_every)
            .finish_non_exhaustive()
    }
}

impl CookieKeys {
    /// Fresh random keys, rotated every `rotate_every`.
    pub(crate) fn new(rotate_every: Duration) -> Result<Self, ErrorStack> {
        Ok(Self {
            keys: Mutex::new(Keys {
                current: Secret::random()?,
                previous: None,
                next_rotation: None,
            }),
            rotate_every,
        })
    }

    /// Retires the current secret if its period ended at `now`; returns whether it rotated.
    pub(crate) fn rotate_if_due(&self, now: Instant) -> Result<bool, ErrorStack> {
        let mut keys = self.keys.lock();
        match keys.next_rotation {
            None => {
                keys.next_rotation = Some(now + self.rotate_every);
                Ok(false)
            }
            Some(at) if now >= at => {
                let fresh = Secret::random()?;
                keys.previous = Some(std::mem::replace(&mut keys.current, fresh));
                keys.next_rotation = Some(now + self.rotate_every);
                Ok(true)
            }
            Some(_) => Ok(false),
        }
    }

    /// When the next rotation is due, once time has started.
    pub(crate) fn next_rotation(&self) -> Option<Instant> {
        self.keys.lock().next_rotation
    }

    /// The cookie for `peer` under the current secret.
    pub(crate) fn generate(&self, peer: SocketAddr) -> [u8; COOKIE_LEN] {
        self.keys.lock().current.tag(peer)
    }

    /// Whether `cookie` was made for `peer` under the current or the previous secret.
    pub(crate) fn verify(&self, peer: SocketAddr, cookie: &[u8]) -> bool {
        if cookie.len() != COOKIE_LEN {
            return false;
        }
        let keys = self.keys.lock();
        let matches = |secret: &Secret| memcmp::eq(&secret.tag(peer), cookie);
        matches(&keys.current) || keys.previous.as_ref().is_some_and(matches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cookie_verifies_for_its_address_only() {
        let keys = CookieKeys::new(Duration::from_secs(60)).unwrap();
        let a = addr("127.0.0.1:1000");
        let cookie = keys.generate(a);
        assert!(keys.verify(a, &cookie));
        assert!(!keys.verify(addr("127.0.0.1:1001"), &cookie));
        assert!(!keys.verify(addr("127.0.0.2:1000"), &cookie));
        assert!(!keys.verify(addr("[::1]:1000"), &cookie));
        assert!(!keys.verify(a, &cookie[..31]));
        let mut bad = cookie;
        bad[0] ^= 1;
        assert!(!keys.verify(a, &bad));
    }

    #[test]
    fn tag_is_rfc2104_hmac_sha256() {
        use openssl::hash::MessageDigest;
        use openssl::pkey::PKey;
        use openssl::sign::Signer;
        // Recompute with OpenSSL's own HMAC from the same key bytes.
        let mut key = [0u8; 64];
        key[..32].copy_from_slice(&[0xab; 32]);
        let mut ipad = [0x36u8; 64];
        let mut opad = [0x5cu8; 64];
        for i in 0..64 {
            ipad[i] ^= key[i];
            opad[i] ^= key[i];
        }
        let mut inner = Sha256::new();
        inner.update(&ipad);
        let mut outer = Sha256::new();
        outer.update(&opad);
        let secret = Secret { inner, outer };
        let a = addr("192.0.2.1:5684");
        let pkey = PKey::hmac(&key[..32]).unwrap();
        let mut signer = Signer::new(MessageDigest::sha256(), &pkey).unwrap();
        signer.update(&[4, 192, 0, 2, 1, 0x16, 0x34]).unwrap();
        assert_eq!(secret.tag(a).to_vec(), signer.sign_to_vec().unwrap());
    }

    #[test]
    fn previous_secret_still_verifies_then_expires() {
        let keys = CookieKeys::new(Duration::from_secs(10)).unwrap();
        let t0 = Instant::now();
        let a = addr("10.0.0.1:5684");
        assert!(!keys.rotate_if_due(t0).unwrap());
        assert_eq!(keys.next_rotation(), Some(t0 + Duration::from_secs(10)));
        let old = keys.generate(a);
        assert!(!keys.rotate_if_due(t0 + Duration::from_secs(9)).unwrap());
        assert!(keys.rotate_if_due(t0 + Duration::from_secs(10)).unwrap());
        let new = keys.generate(a);
        assert_ne!(old, new);
        assert!(keys.verify(a, &old), "previous secret accepted");
        assert!(keys.verify(a, &new));
        assert!(keys.rotate_if_due(t0 + Duration::from_secs(20)).unwrap());
        assert!(
            !keys.verify(a, &old),
            "two rotations later the old cookie fails"
        );
        assert!(keys.verify(a, &new));
    }
}
