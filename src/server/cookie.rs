//! Stateless DTLS cookies (RFC 6347 §4.2.1): an HMAC-SHA256 of the peer's address under a random
//! secret that rotates.
//!
//! A cookie proves that the sender of a ClientHello can receive datagrams at the address it claims,
//! so that the server keeps no state for (and never looks up a session for) a spoofed source.
//! Cookies made under the current or the previous secret verify, so a rotation does not break a
//! handshake that is in flight; a cookie older than two rotation periods fails.
//!
//! The secrets sit in an [`ArcSwap`] snapshot: making or verifying a cookie loads the snapshot
//! (no lock), clones the keyed HMAC state and hashes the address outside any lock; only a
//! rotation, once per period, takes a mutex to publish a new snapshot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hmac::{Hmac, Mac};
use openssl::error::ErrorStack;
use openssl::rand::rand_bytes;
use parking_lot::Mutex;
use sha2::Sha256;
use zeroize::Zeroizing;

/// Length of the cookies this module makes (a full HMAC-SHA256 tag).
pub(crate) const COOKIE_LEN: usize = 32;

/// One HMAC-SHA256 key, kept as the keyed state (the hash states after absorbing the padded key),
/// so a cookie costs a clone of that state and two short hashes.
#[derive(Clone)]
struct Secret {
    keyed: Hmac<Sha256>,
}

impl Secret {
    /// A secret of 32 random bytes.
    fn random() -> Result<Self, ErrorStack> {
        let mut key = Zeroizing::new([0u8; 32]);
        rand_bytes(&mut key[..])?;
        #[cfg(test)]
        tests::MADE.with(|made| made.borrow_mut().push(key.clone()));
        Ok(Self::from_key(&key[..]))
    }

    fn from_key(key: &[u8]) -> Self {
        Self {
            keyed: Hmac::new_from_slice(key).expect("BUG: HMAC takes keys of any length"),
        }
    }

    /// The keyed state after absorbing `peer` (family, address, port).
    fn absorb(&self, peer: SocketAddr) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        match peer {
            SocketAddr::V4(a) => {
                mac.update(&[4]);
                mac.update(&a.ip().octets());
            }
            SocketAddr::V6(a) => {
                mac.update(&[6]);
                mac.update(&a.ip().octets());
            }
        }
        mac.update(&peer.port().to_be_bytes());
        mac
    }

    fn tag(&self, peer: SocketAddr) -> [u8; COOKIE_LEN] {
        self.absorb(peer).finalize().into_bytes().into()
    }

    /// Whether `cookie` is the tag for `peer`, compared in constant time.
    fn verify(&self, peer: SocketAddr, cookie: &[u8]) -> bool {
        self.absorb(peer).verify_slice(cookie).is_ok()
    }
}

/// The secrets in force, replaced whole at each rotation.
#[derive(Clone)]
struct Keys {
    current: Secret,
    previous: Option<Secret>,
    /// When `current` is retired; set on the first `rotate_if_due` (time is injected).
    next_rotation: Option<Instant>,
}

/// The rotating cookie secrets, shared by every worker of a server (and by the OpenSSL cookie
/// callbacks, which capture an `Arc` of it).
pub(crate) struct CookieKeys {
    keys: ArcSwap<Keys>,
    /// Taken by rotations only, so two workers never both rotate.
    rotating: Mutex<()>,
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
            keys: ArcSwap::from_pointee(Keys {
                current: Secret::random()?,
                previous: None,
                next_rotation: None,
            }),
            rotating: Mutex::new(()),
            rotate_every,
        })
    }

    /// Retires the current secret if its period ended at `now`; returns whether it rotated.
    ///
    /// Periods keep to the schedule the first call starts, however late a call comes: a
    /// secret is current for one period and previous for the next, so a cookie never verifies
    /// two periods after its secret became current. A call that comes after both periods of
    /// the current secret ended (nothing called for a whole period) replaces both secrets.
    pub(crate) fn rotate_if_due(&self, now: Instant) -> Result<bool, ErrorStack> {
        let due = |keys: &Keys| keys.next_rotation.is_none_or(|at| now >= at);
        if !due(&self.keys.load()) {
            return Ok(false);
        }
        let _rotating = self.rotating.lock();
        let keys = self.keys.load_full();
        if !due(&keys) {
            return Ok(false); // another worker rotated meanwhile
        }
        let mut next = Keys::clone(&keys);
        let Some(at) = keys.next_rotation else {
            // Time starts: the first period ends one period from now.
            next.next_rotation = Some(now + self.rotate_every);
            self.keys.store(Arc::new(next));
            return Ok(false);
        };
        // The first boundary of the schedule after `now`.
        let period = self.rotate_every.max(Duration::from_nanos(1));
        let behind = (now - at).as_nanos() / period.as_nanos();
        next.next_rotation = Some(
            u64::try_from((behind + 1) * period.as_nanos())
                .ok()
                .and_then(|n| at.checked_add(Duration::from_nanos(n)))
                .filter(|t| *t > now)
                .unwrap_or(now + period),
        );
        if behind == 0 {
            next.previous = Some(std::mem::replace(&mut next.current, Secret::random()?));
        } else {
            // The current secret's second period ended too: neither may verify any more.
            next.current = Secret::random()?;
            next.previous = None;
        }
        self.keys.store(Arc::new(next));
        Ok(true)
    }

    /// When the next rotation is due, once time has started.
    pub(crate) fn next_rotation(&self) -> Option<Instant> {
        self.keys.load().next_rotation
    }

    /// The cookie for `peer` under the current secret.
    pub(crate) fn generate(&self, peer: SocketAddr) -> [u8; COOKIE_LEN] {
        self.keys.load().current.tag(peer)
    }

    /// Whether `cookie` was made for `peer` under the current or the previous secret.
    pub(crate) fn verify(&self, peer: SocketAddr, cookie: &[u8]) -> bool {
        if cookie.len() != COOKIE_LEN {
            return false;
        }
        let keys = self.keys.load();
        keys.current.verify(peer, cookie)
            || keys
                .previous
                .as_ref()
                .is_some_and(|s| s.verify(peer, cookie))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Every secret [`Secret::random`] made on this thread (for the tests to look for).
        pub(super) static MADE: std::cell::RefCell<Vec<Zeroizing<[u8; 32]>>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Every form in which 8 bytes of `secret` in a row could be written out: raw, hex (lower,
    /// upper), `Debug` lists of bytes.
    fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
        let inner = |l: String| l.as_bytes()[1..l.len() - 1].to_vec();
        secret
            .windows(8)
            .flat_map(|w| {
                [
                    w.to_vec(),
                    hex::encode(w).into_bytes(),
                    hex::encode_upper(w).into_bytes(),
                    inner(format!("{w:?}")),
                    inner(format!("{w:x?}")),
                    inner(format!("{w:X?}")),
                    inner(format!("{w:02x?}")),
                ]
            })
            .collect()
    }

    fn shows(text: &[u8], secret: &[u8]) -> bool {
        forms(secret)
            .iter()
            .any(|f| text.windows(f.len()).any(|w| w == &f[..]))
    }

    /// Captures what is logged on this thread, every level.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A server's cookie secrets (the first, and those of two rotations) show in no log line at
    /// any level, and in no `Debug` output of the keys, the configuration or the endpoint:
    /// handshakes through the cookie exchange, stale and forged cookies, garbage.
    #[test]
    fn cookie_secrets_show_in_no_log_line_and_no_debug_output() {
        use crate::{DatagramPipe, Endpoint, ServerConfig, SessionCache};
        use openssl::ssl::{Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVerifyMode};

        MADE.with(|m| m.borrow_mut().clear());
        let log = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer({
                let log = log.clone();
                move || log.clone()
            })
            .finish();
        let mut debug = Vec::new();
        tracing::subscriber::with_default(subscriber, || {
            let config = ServerConfig::builder(SessionCache::builder().build().unwrap())
                .cookie_rotation(Duration::from_secs(10))
                .build()
                .unwrap();
            let mut ep = Endpoint::new(config.clone()).unwrap();
            let mut client = SslContext::builder(SslMethod::dtls_client()).unwrap();
            client.set_verify(SslVerifyMode::NONE);
            client.set_options(SslOptions::NO_QUERY_MTU);
            let client = client.build();
            let t0 = Instant::now();
            for (n, at) in [0u64, 11, 22].into_iter().enumerate() {
                let now = t0 + Duration::from_secs(at);
                ep.handle_timeout(now); // rotates the secret when due
                let from: SocketAddr = ([192, 0, 2, n as u8 + 1], 5684).into();
                let mut ssl = Ssl::new(&client).unwrap();
                ssl.set_mtu(1400).unwrap();
                ssl.set_connect_state();
                let mut c = SslStream::new(ssl, DatagramPipe::new()).unwrap();
                for _ in 0..10 {
                    let _ = c.do_handshake();
                    for d in c.get_mut().take_outbound() {
                        ep.handle(now, from, &d);
                    }
                    while let Some(t) = ep.poll_transmit() {
                        c.get_mut().push(t.payload);
                    }
                }
                assert!(ep.is_connected(from), "handshake {n}");
                // Garbage and a ClientHello with a forged cookie from another address.
                ep.handle(now, ([198, 51, 100, 9], 1).into(), &[22, 0xfe, 0xfd, 0, 0]);
                while ep.poll_event().is_some() {}
            }
            tracing::trace!("capture at trace");
            debug.push(format!("{:?} {:#?}", config.cookies, config.cookies));
            debug.push(format!("{config:?} {config:#?}"));
            debug.push(format!("{ep:?} {ep:#?}"));
        });
        let made: Vec<Zeroizing<[u8; 32]>> = MADE.with(|m| m.borrow().clone());
        assert_eq!(made.len(), 3, "the first secret and two rotations");
        let logged = log.0.lock().clone();
        assert!(
            String::from_utf8_lossy(&logged).contains("capture at trace"),
            "the capture saw no TRACE line: {}",
            String::from_utf8_lossy(&logged)
        );
        for (i, secret) in made.iter().enumerate() {
            assert!(
                !shows(&logged, &secret[..]),
                "cookie secret {i} in the log:\n{}",
                String::from_utf8_lossy(&logged)
            );
            for d in &debug {
                assert!(
                    !shows(d.as_bytes(), &secret[..]),
                    "cookie secret {i} in {d}"
                );
            }
        }
        // The search finds a secret written out.
        assert!(shows(
            format!("x {} y", hex::encode(&made[1][5..15])).as_bytes(),
            &made[1][..]
        ));
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
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let secret = Secret::from_key(b"Jefe");
        let mut mac = secret.keyed.clone();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // And a cookie is that HMAC over family, address and port, as OpenSSL computes it.
        use openssl::hash::MessageDigest;
        use openssl::pkey::PKey;
        use openssl::sign::Signer;
        let key = [0xab; 32];
        let pkey = PKey::hmac(&key).unwrap();
        let mut signer = Signer::new(MessageDigest::sha256(), &pkey).unwrap();
        signer.update(&[4, 192, 0, 2, 1, 0x16, 0x34]).unwrap();
        let a = addr("192.0.2.1:5684");
        assert_eq!(
            Secret::from_key(&key).tag(a).to_vec(),
            signer.sign_to_vec().unwrap()
        );
    }

    #[test]
    fn random_secrets_are_distinct_and_verify_their_own_cookies_only() {
        let secrets: Vec<Secret> = (0..8).map(|_| Secret::random().unwrap()).collect();
        let a = addr("198.51.100.7:5684");
        let tags: Vec<_> = secrets.iter().map(|s| s.tag(a)).collect();
        for (i, s) in secrets.iter().enumerate() {
            for (j, tag) in tags.iter().enumerate() {
                assert_eq!(s.verify(a, tag), i == j, "secret {i} on the cookie of {j}");
                if i != j {
                    assert_ne!(tags[i], *tag, "secrets {i} and {j} are the same");
                }
            }
        }
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

    #[test]
    fn a_late_rotation_keeps_to_the_schedule_and_a_cookie_dies_two_periods_after_its_secret() {
        let keys = CookieKeys::new(Duration::from_secs(10)).unwrap();
        let t0 = Instant::now();
        let a = addr("10.0.0.1:5684");
        keys.rotate_if_due(t0).unwrap();
        let first = keys.generate(a);
        // Nothing calls until 5 s after the first period ended: one rotation, and the next
        // boundary stays on the schedule (t0 + 20), not a period from the late call.
        assert!(keys.rotate_if_due(t0 + Duration::from_secs(15)).unwrap());
        assert_eq!(keys.next_rotation(), Some(t0 + Duration::from_secs(20)));
        assert!(keys.verify(a, &first), "the previous secret still verifies");
        let second = keys.generate(a);
        assert!(keys.rotate_if_due(t0 + Duration::from_secs(20)).unwrap());
        assert!(
            !keys.verify(a, &first),
            "two periods after its secret became current"
        );
        assert!(keys.verify(a, &second));
        // Nothing calls for more than a whole period: both secrets go.
        assert!(keys.rotate_if_due(t0 + Duration::from_secs(47)).unwrap());
        assert_eq!(keys.next_rotation(), Some(t0 + Duration::from_secs(50)));
        assert!(
            !keys.verify(a, &second),
            "its secret's second period ended at t0 + 40"
        );
        assert!(keys.verify(a, &keys.generate(a)));
    }

    #[test]
    fn concurrent_rotations_rotate_once() {
        let keys = Arc::new(CookieKeys::new(Duration::from_secs(10)).unwrap());
        let t0 = Instant::now();
        keys.rotate_if_due(t0).unwrap();
        let a = addr("10.0.0.1:5684");
        let old = keys.generate(a);
        let rotated: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let keys = &keys;
                    s.spawn(move || {
                        usize::from(keys.rotate_if_due(t0 + Duration::from_secs(10)).unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(rotated, 1);
        assert!(keys.verify(a, &old), "one rotation keeps the old secret");
    }
}
