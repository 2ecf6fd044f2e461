//! Session ticket keys shared by every host of a farm, rotating by themselves.
//!
//! With tickets, a TLS 1.2, TLS 1.3 or DTLS 1.2 client resumes from a ticket the server sealed
//! for it, and no store is consulted. For a farm that only works if every host opens every
//! host's tickets, and the keys must rotate, with the previous ones still opening for a while.
//! OpenSSL's own ticket keys are random per process and never rotate. See [`TicketKeys`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hkdf::Hkdf;
use openssl::ssl::{SslContextBuilder, SslOptions};
use parking_lot::{Mutex, RwLock};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::clock::{Clock, SystemClock};
use crate::error::Error;
use crate::ffi::{
    self, EpochKey, Opened, TicketKeySource, AES_KEY_LEN, HMAC_KEY_LEN, KEY_NAME_LEN,
};
use crate::stats::{add, bump};
use crate::store::KeyRing;

/// The HKDF label: ticket keys never equal store keys derived from the same secret.
const LABEL: &[u8] = b"openssl-session-cache ticket key v1";

/// Builds [`TicketKeys`].
#[must_use]
pub struct TicketKeysBuilder {
    ring: KeyRing,
    period: Duration,
    accept_for: Duration,
    lifetime: Duration,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for TicketKeysBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketKeysBuilder")
            .field("ring", &self.ring)
            .field("period", &self.period)
            .field("accept_for", &self.accept_for)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl TicketKeysBuilder {
    /// How long one key seals new tickets before the next one takes over (default 12 hours).
    pub fn period(mut self, period: Duration) -> Self {
        self.period = period;
        self
    }

    /// How long after its epoch ended a key still opens tickets (default 24 hours). Must be at
    /// least the [`session_lifetime`](Self::session_lifetime), or tickets would die before
    /// their sessions.
    pub fn accept_for(mut self, window: Duration) -> Self {
        self.accept_for = window;
        self
    }

    /// The longest a session resumes (the context's session timeout, OpenSSL's default
    /// 7200 s; and the cache's `max_ttl` if one is set). Used to check `accept_for`.
    pub fn session_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// The clock (default: the system clock); tests inject a [`ManualClock`](crate::ManualClock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Builds the key set.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] when the period is shorter than a second, or `accept_for` does not
    /// cover the session lifetime.
    pub fn build(self) -> Result<TicketKeys, Error> {
        if self.period < Duration::from_secs(1) {
            return Err(Error::setting(
                "period",
                "ticket key period must be at least one second",
            ));
        }
        if self.accept_for < self.lifetime {
            return Err(Error::setting(
                "accept_for",
                format!(
                    "ticket keys must keep opening tickets for at least the session lifetime: \
                     accept_for {:?} is shorter than the lifetime {:?}",
                    self.accept_for, self.lifetime
                ),
            ));
        }
        Ok(TicketKeys {
            inner: Arc::new(Inner {
                secrets: RwLock::new(Secrets::from_ring(&self.ring)),
                period_secs: self.period.as_secs(),
                accept_for: self.accept_for,
                clock: self.clock,
                derived: Mutex::new(BTreeMap::new()),
                counters: Counters::default(),
            }),
        })
    }
}

/// The secrets of the ring, active last (each boxed, so the list moves pointers only).
struct Secrets {
    keys: Vec<(u32, Box<Zeroizing<[u8; 32]>>)>,
}

impl Secrets {
    fn from_ring(ring: &KeyRing) -> Self {
        Self {
            keys: ring
                .key_ids()
                .into_iter()
                .filter_map(|id| {
                    ring.key(id).map(|k| {
                        let mut b = Box::new(Zeroizing::new([0u8; 32]));
                        b.copy_from_slice(k);
                        (id, b)
                    })
                })
                .collect(),
        }
    }

    fn active(&self) -> Option<&(u32, Box<Zeroizing<[u8; 32]>>)> {
        self.keys.last()
    }

    fn get(&self, id: u32) -> Option<&[u8; 32]> {
        self.keys.iter().find(|(k, _)| *k == id).map(|(_, s)| &***s)
    }
}

/// Ticket key counters, from [`TicketKeys::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TicketStats {
    /// Tickets sealed.
    pub issued: u64,
    /// Tickets opened under the current key.
    pub resumed: u64,
    /// Tickets opened under an earlier key still in its window (renewed).
    pub renewed: u64,
    /// Tickets refused: unknown key, a key removed from the ring, or past its window.
    pub refused: u64,
    /// Derived epoch keys erased because their window passed.
    pub erased: u64,
}

#[derive(Debug, Default)]
struct Counters {
    issued: AtomicU64,
    resumed: AtomicU64,
    renewed: AtomicU64,
    refused: AtomicU64,
    erased: AtomicU64,
}

/// Session ticket keys derived per epoch from a [`KeyRing`], the same on every host.
///
/// # How the keys are made: derived per epoch from the key file
///
/// Time is cut into epochs of [`TicketKeysBuilder::period`] (default 12 h). The key for an epoch
/// is derived with HKDF-SHA256 from a 32-byte secret of the [`KeyRing`] (the same key file the
/// session store uses; the derivation uses its own label, so ticket keys and store keys never
/// coincide) and the epoch number, so every host that reads the same file computes the same key
/// for the same epoch: no coordination, no store round trip, no manual step. New tickets are
/// sealed under the ring's active key and the current epoch; a ticket opens while its epoch
/// ended less than [`accept_for`](TicketKeysBuilder::accept_for) ago (which must cover the
/// session lifetime), and OpenSSL is asked to renew tickets not sealed under the current key.
/// Keys past the window are erased (zeroized) and their tickets refused. A host whose clock runs
/// up to one epoch ahead is tolerated.
///
/// Tickets are AES-256-CBC encrypted and HMAC-SHA256 authenticated by OpenSSL
/// (`SSL_CTX_set_tlsext_ticket_key_evp_cb`); the 16-byte key name carries the key id and epoch.
///
/// # What a theft exposes
/// - **The key file**: every ticket sealed under its secrets, past and future, until the
///   secret is removed from the file (append a new line, let the old tickets' window pass, then
///   delete the old line). A ticket holds its session's master secret, so recorded traffic of
///   those sessions can be decrypted: keep the file 0600, on the hosts only.
/// - **The store** (Redis, snapshots): nothing about tickets; ticket keys never leave the
///   process. (Stored sessions are sealed with the ring's keys: see
///   [`envelope`](crate::envelope).)
/// - **One host's memory**: the secrets it holds, as for the file.
///
/// ```no_run
/// use openssl::ssl::{SslContext, SslMethod};
/// use openssl_session_cache::{KeyRing, TicketKeys};
///
/// let keys = TicketKeys::builder(KeyRing::from_file("/etc/dtls/session.keys")?).build()?;
/// let mut ctx = SslContext::builder(SslMethod::dtls())?;
/// keys.install(&mut ctx)?;
/// // Later, after the key file changed (SIGHUP):
/// keys.replace_ring(KeyRing::from_file("/etc/dtls/session.keys")?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Cheap to clone; clones share the keys. Install it on every context (and every SNI context)
/// that issues or accepts tickets.
#[derive(Clone)]
pub struct TicketKeys {
    inner: Arc<Inner>,
}

struct Inner {
    secrets: RwLock<Secrets>,
    period_secs: u64,
    accept_for: Duration,
    clock: Arc<dyn Clock>,
    /// Derived keys by (secret id, epoch).
    derived: Mutex<BTreeMap<(u32, u64), EpochKey>>,
    counters: Counters,
}

impl fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketKeys")
            .field("period_secs", &self.inner.period_secs)
            .field("accept_for", &self.inner.accept_for)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl TicketKeys {
    /// A builder deriving ticket keys from `ring`'s secrets.
    pub fn builder(ring: KeyRing) -> TicketKeysBuilder {
        TicketKeysBuilder {
            ring,
            period: Duration::from_secs(12 * 3600),
            accept_for: Duration::from_secs(24 * 3600),
            lifetime: Duration::from_secs(7200),
            clock: Arc::new(SystemClock),
        }
    }

    /// Installs the keys on a context (`SSL_CTX_set_tlsext_ticket_key_evp_cb`) and turns
    /// tickets on (clears `SSL_OP_NO_TICKET`). With a [`SessionCache`](crate::SessionCache) on
    /// the same context, build it with `.tickets(true)` (or install these keys after it).
    ///
    /// # Errors
    /// An OpenSSL error if the ex_data index or the callback cannot be set.
    pub fn install(&self, ctx: &mut SslContextBuilder) -> Result<(), Error> {
        ffi::set_ticket_key_callback(ctx, Arc::clone(&self.inner) as Arc<dyn TicketKeySource>)?;
        ctx.clear_options(SslOptions::NO_TICKET);
        Ok(())
    }

    /// Replaces the secrets (after the key file changed): tickets sealed under keys still in
    /// the new ring keep opening within their window; keys no longer in it stop opening at once
    /// and their derived keys are erased.
    pub fn replace_ring(&self, ring: KeyRing) {
        let fresh = Secrets::from_ring(&ring);
        let kept: Vec<u32> = fresh.keys.iter().map(|(id, _)| *id).collect();
        *self.inner.secrets.write() = fresh;
        let gone: Vec<EpochKey> = {
            let mut derived = self.inner.derived.lock();
            let drop_keys: Vec<(u32, u64)> = derived
                .keys()
                .filter(|(id, _)| !kept.contains(id))
                .copied()
                .collect();
            drop_keys.iter().filter_map(|k| derived.remove(k)).collect()
        };
        add(&self.inner.counters.erased, gone.len() as u64);
    }

    /// The counters.
    pub fn stats(&self) -> TicketStats {
        let c = &self.inner.counters;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TicketStats {
            issued: r(&c.issued),
            resumed: r(&c.resumed),
            renewed: r(&c.renewed),
            refused: r(&c.refused),
            erased: r(&c.erased),
        }
    }
}

impl Inner {
    fn epoch_of(&self, t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / self.period_secs
    }

    /// When epoch `e` stops opening tickets.
    fn closes_at(&self, epoch: u64) -> SystemTime {
        let end = epoch
            .saturating_add(1)
            .saturating_mul(self.period_secs)
            .min(1 << 40);
        UNIX_EPOCH + Duration::from_secs(end) + self.accept_for
    }

    fn derive(&self, id: u32, secret: &[u8; 32], epoch: u64) -> EpochKey {
        let hk = Hkdf::<Sha256>::new(Some(LABEL), secret);
        let mut info = [0u8; 12];
        info[..4].copy_from_slice(&id.to_be_bytes());
        info[4..].copy_from_slice(&epoch.to_be_bytes());
        let mut okm = Zeroizing::new([0u8; 4 + AES_KEY_LEN + HMAC_KEY_LEN]);
        hk.expand(&info, &mut okm[..])
            .expect("BUG: 68 bytes is a valid HKDF-SHA256 output length");
        let mut name = [0u8; KEY_NAME_LEN];
        name[..12].copy_from_slice(&info);
        name[12..].copy_from_slice(&okm[..4]);
        let mut aes = Box::new(Zeroizing::new([0u8; AES_KEY_LEN]));
        aes.copy_from_slice(&okm[4..4 + AES_KEY_LEN]);
        let mut hmac = Box::new(Zeroizing::new([0u8; HMAC_KEY_LEN]));
        hmac.copy_from_slice(&okm[4 + AES_KEY_LEN..]);
        EpochKey { name, aes, hmac }
    }

    /// Erases (zeroizes) the derived keys whose window passed.
    fn erase_expired(&self, now: SystemTime) {
        let mut derived = self.derived.lock();
        let expired: Vec<(u32, u64)> = derived
            .keys()
            .filter(|(_, e)| self.closes_at(*e) <= now)
            .copied()
            .collect();
        for k in &expired {
            derived.remove(k);
        }
        add(&self.counters.erased, expired.len() as u64);
    }

    /// The derived key for `(id, epoch)`, derived once and kept until its window passes.
    fn key_for(&self, id: u32, epoch: u64) -> Option<EpochKey> {
        let secrets = self.secrets.read();
        let secret = secrets.get(id)?;
        let mut derived = self.derived.lock();
        let key = derived
            .entry((id, epoch))
            .or_insert_with(|| self.derive(id, secret, epoch));
        Some(key.clone())
    }
}

impl TicketKeySource for Inner {
    fn sealing_key(&self) -> Option<EpochKey> {
        let now = self.clock.now();
        self.erase_expired(now);
        let id = self.secrets.read().active()?.0;
        let key = self.key_for(id, self.epoch_of(now))?;
        bump(&self.counters.issued);
        Some(key)
    }

    fn opening_key(&self, name: &[u8; KEY_NAME_LEN]) -> Opened {
        let now = self.clock.now();
        let id = u32::from_be_bytes([name[0], name[1], name[2], name[3]]);
        let mut e = [0u8; 8];
        e.copy_from_slice(&name[4..12]);
        let epoch = u64::from_be_bytes(e);
        let current = self.epoch_of(now);
        self.erase_expired(now);
        // Past its window, or more than one epoch ahead of this host's clock.
        if self.closes_at(epoch) <= now || epoch > current.saturating_add(1) {
            bump(&self.counters.refused);
            return Opened::Refused;
        }
        let Some(key) = self.key_for(id, epoch) else {
            bump(&self.counters.refused);
            return Opened::Refused;
        };
        // The name's last 4 bytes come from the key itself: a forged name is refused here.
        if !openssl::memcmp::eq(&key.name, name) {
            bump(&self.counters.refused);
            return Opened::Refused;
        }
        let active = self.secrets.read().active().map(|(a, _)| *a);
        if active == Some(id) && epoch >= current {
            bump(&self.counters.resumed);
            Opened::Current(key)
        } else {
            bump(&self.counters.renewed);
            Opened::Renew(key)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;

    fn keys(ring: KeyRing, clock: &Arc<ManualClock>) -> TicketKeys {
        TicketKeys::builder(ring)
            .period(Duration::from_secs(3600))
            .accept_for(Duration::from_secs(7200))
            .clock(clock.clone())
            .build()
            .unwrap()
    }

    fn name_of(k: &TicketKeys) -> [u8; KEY_NAME_LEN] {
        k.inner.sealing_key().unwrap().name
    }

    #[test]
    fn two_hosts_with_the_same_file_derive_the_same_keys() {
        let clock = Arc::new(ManualClock::new(
            UNIX_EPOCH + Duration::from_secs(100 * 3600),
        ));
        let ring = KeyRing::new(7, [9; 32]);
        let (a, b) = (keys(ring.clone(), &clock), keys(ring, &clock));
        let ka = a.inner.sealing_key().unwrap();
        let kb = b.inner.sealing_key().unwrap();
        assert_eq!(
            (ka.name, **ka.aes, **ka.hmac),
            (kb.name, **kb.aes, **kb.hmac)
        );
        assert!(matches!(b.inner.opening_key(&ka.name), Opened::Current(_)));
        // Another file: another key.
        let c = keys(KeyRing::new(7, [8; 32]), &clock);
        assert!(matches!(c.inner.opening_key(&ka.name), Opened::Refused));
        // The store key of the same secret is not the ticket key.
        assert_ne!(**ka.aes, [9; 32]);
    }

    #[test]
    fn keys_rotate_by_epoch_renew_within_the_window_and_are_refused_after() {
        let clock = Arc::new(ManualClock::new(
            UNIX_EPOCH + Duration::from_secs(100 * 3600),
        ));
        let k = keys(KeyRing::new(1, [1; 32]), &clock);
        let old = name_of(&k);
        clock.advance(Duration::from_secs(3600));
        let new = name_of(&k);
        assert_ne!(old, new, "a new epoch seals with a new key");
        assert!(matches!(k.inner.opening_key(&new), Opened::Current(_)));
        assert!(matches!(k.inner.opening_key(&old), Opened::Renew(_)));
        // Epoch 100 ended at 101 h; it opens until 101 h + 2 h.
        clock.set(UNIX_EPOCH + Duration::from_secs(103 * 3600 - 1));
        assert!(matches!(k.inner.opening_key(&old), Opened::Renew(_)));
        clock.set(UNIX_EPOCH + Duration::from_secs(103 * 3600));
        assert!(matches!(k.inner.opening_key(&old), Opened::Refused));
        assert!(k.stats().erased >= 1, "{:?}", k.stats());
    }

    #[test]
    fn a_rotated_ring_renews_old_tickets_and_a_removed_key_refuses_them() {
        let clock = Arc::new(ManualClock::new(
            UNIX_EPOCH + Duration::from_secs(100 * 3600),
        ));
        let ring = KeyRing::new(1, [1; 32]);
        let k = keys(ring.clone(), &clock);
        let old = name_of(&k);
        k.replace_ring(ring.rotate(2, [2; 32]).unwrap());
        let new = name_of(&k);
        assert_eq!(u32::from_be_bytes(new[..4].try_into().unwrap()), 2);
        assert!(matches!(k.inner.opening_key(&old), Opened::Renew(_)));
        k.replace_ring(KeyRing::new(2, [2; 32]));
        assert!(matches!(k.inner.opening_key(&old), Opened::Refused));
        assert!(matches!(k.inner.opening_key(&new), Opened::Current(_)));
    }

    #[test]
    fn forged_or_future_names_are_refused() {
        let clock = Arc::new(ManualClock::new(
            UNIX_EPOCH + Duration::from_secs(100 * 3600),
        ));
        let k = keys(KeyRing::new(1, [1; 32]), &clock);
        let mut forged = name_of(&k);
        forged[15] ^= 1;
        assert!(matches!(k.inner.opening_key(&forged), Opened::Refused));
        // One epoch ahead (another host's clock) opens; two ahead does not.
        clock.advance(Duration::from_secs(3600));
        let ahead = name_of(&k);
        clock.set(UNIX_EPOCH + Duration::from_secs(100 * 3600));
        assert!(matches!(k.inner.opening_key(&ahead), Opened::Current(_)));
        clock.advance(Duration::from_secs(7200));
        let far = name_of(&k);
        clock.set(UNIX_EPOCH + Duration::from_secs(100 * 3600));
        assert!(matches!(k.inner.opening_key(&far), Opened::Refused));
        assert!(matches!(k.inner.opening_key(&[0; 16]), Opened::Refused));
    }

    #[test]
    fn a_window_shorter_than_the_session_lifetime_is_refused() {
        let err = TicketKeys::builder(KeyRing::new(1, [1; 32]))
            .accept_for(Duration::from_secs(3600))
            .session_lifetime(Duration::from_secs(7200))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("session lifetime"), "{err}");
        assert!(TicketKeys::builder(KeyRing::new(1, [1; 32]))
            .period(Duration::ZERO)
            .build()
            .is_err());
    }
}
