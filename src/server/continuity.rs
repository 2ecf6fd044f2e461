//! Associations that outlive the process: a lean peer's record state taken out of an endpoint
//! at a graceful shutdown ([`Endpoint::suspend_all`](crate::Endpoint::suspend_all)), sealed to a
//! file with the key ring ([`save_peers`]), and put back into the next process's endpoint
//! ([`take_peers`], [`Endpoint::restore`](crate::Endpoint::restore)), so that a client that kept
//! its association goes on exchanging records with no handshake.
//!
//! What is saved per peer: the record keys and IVs, the epoch, the next write sequence number,
//! the replay window, the connection IDs, what `Event::Connected` reported, the session id, when
//! the session expires, and what binds the state to this server (the SHA-256 of its certificate,
//! or for a PSK peer a keyed fingerprint of its identity's key).
//!
//! # Why no (key, nonce) pair is used twice
//! The write sequence number saved is the next one the endpoint would have used; the restored
//! peer goes on from there. A file of saved peers is read once: [`take_peers`] deletes it (and
//! makes the deletion durable) before it hands anything back, so a crash after the restart can
//! never restore the same state, and sequence numbers, a second time. A state is refused when its
//! session has expired, when the server's certificate or the identity's PSK key is not the one it
//! was made with, and when the file is sealed with another key ring.
//!
//! # Crash failover in a farm (`shared_peers`)
//! With [`shared_peers`](crate::ServerConfigBuilder::shared_peers) each lean peer's state also
//! lives in the session store (the farm's Redis), so that a host that dies without a word
//! (SIGKILL, a power cut) loses no association: the host the peer's datagrams reach next takes
//! it over.
//!
//! * **Where.** Under an id of its own namespace
//!   ([`SessionId::for_peer_state`]: 8 prefix bytes and 24 of the SHA-256 of the connection ID,
//!   or of the address for a peer without one), sealed by the store like a session (the Redis
//!   store's key ring), expiring with the session. The session cache never looks such an id
//!   up for a client, and the Redis store's memory tier never holds one.
//! * **Format.** `version u64 BE | "OSSLPSHR" | format u8 = 2 |` the saved-peer entry below, its
//!   `next_write` being the **lease end**: no write sequence number at or above it was used.
//!   A certificate-bound peer with an 8-byte connection ID takes 330 bytes once sealed (the
//!   expiry, the envelope and the Redis store's clear copy of the version included;
//!   `a_foreign_state_is_refused_and_counted` prints it).
//! * **Write leases** (`server/lease.rs`). A host seals records only below the lease end of a
//!   write the store confirmed ([`SessionStore::put_if`](crate::SessionStore::put_if); the
//!   Redis store sends its comparing `EVAL` script at once and completes on Redis's answer). The
//!   first write of a fresh association need not be waited for: no earlier state of its keys
//!   exists, so whatever of it reaches the store holds a lease above every number used. At half
//!   a block (512) before the end the lease is extended by a block (1,024), so nothing waits
//!   while the store answers within 512 records; past the end records are dropped and counted
//!   (`lease_waits`). One write per peer is in flight at a time, so what the store holds only
//!   moves forward.
//! * **Read marks.** Each write also carries the replay window; records accepted ask for a
//!   write after 64 records or 20 ms, whichever first (`MARK_RECORDS`, `MARK_DELAY`).
//! * **Takeover** (`server/endpoint/farm.rs`). A protected application-data record with an
//!   unknown connection ID (or, for a peer without one, from an unknown address) starts a
//!   lookup of the state (at most 64 in flight per endpoint, each given up after the lookup
//!   timeout; one per state). Found, it is refused if it does not decode, expired, or is bound
//!   to another certificate or PSK key ([`Binding`]); its window is set to refuse every number
//!   at or below the stored mark; it is restored only if a record of the datagram opens under
//!   it. The new host writes nothing until its own lease, one block above the stored end, is
//!   confirmed; the datagram that asked waits for that, then goes on as any record.
//! * **What unauthenticated input can do:** start one bounded lookup; it never writes.
//! * **Conditional writes.** Every write of a peer's state is a compare-and-set
//!   ([`SessionStore::put_if`](crate::SessionStore::put_if)): it stores a new random version
//!   and lands only if the store holds the version this host last read or wrote (or that of its
//!   own unconfirmed write, which the retry reuses); only a fresh peer's first write is blind.
//!   A takeover reads the version with the state and writes its first lease on it, so of two
//!   takeovers at once exactly one wins. A host whose write finds another version has lost the
//!   peer: it frees it with no close_notify and no removal
//!   ([`CloseReason::LeaseLost`](crate::CloseReason::LeaseLost), `leases_lost`); the removal
//!   at a close is conditional too ([`SessionStore::remove_if`](crate::SessionStore::remove_if)).
//!   Hence two live hosts serving one peer, or a late write of a dead host, never reuse a
//!   (key, nonce) pair nor move the stored lease end back. A peer saved at a graceful restart
//!   carries those versions in the file ([`SuspendedPeer`]'s `versions`), and its first write
//!   after the restore expects them: a host that took it over meanwhile keeps it.
//! * **What is still not guaranteed** (SECURITY.md, "Associations shared by a farm"). Replays across hosts
//!   that both hold the peer (each has its own window); efficiency when a balancer keeps
//!   splitting a peer's datagrams (the hosts take it from each other, one lease block each
//!   time); a store that loses acknowledged writes (a Redis failover to a replica behind it)
//!   bringing back an older version; a fresh peer whose first write never landed (its retry
//!   conflicts and the peer is freed).
//!
//! # File format (version 2)
//! ```text
//! "OSSLPEER" (8 bytes) | version u8 = 2 | envelope
//! ```
//! The envelope ([`KeyRing`] AES-256-GCM, its own associated-data domain) holds a count (u32 BE)
//! and the entries, each a length (u32 BE) and its bytes, then (new in version 2, which a
//! version-1 file lacks) a count u8 (at most 2) and that many u64 BE: the versions of the
//! peer's shared state this host may have left in the store, which the restored peer's first
//! write expects (so a graceful restart cannot overwrite the state of a host that took the
//! peer over meanwhile). The file is written like a snapshot:
//! an exclusively created random temporary file, synced, renamed over the target, the directory
//! synced; it is read without following links, only if regular, bounded in size.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use zeroize::{Zeroize, Zeroizing};

use super::record::keys::{Aead, DirectionKey, RecordKeys};
use super::record::protect::RecordState;
use super::record::replay::ReplayWindow;
use crate::error::{Error, FileKind, StoreError};
use crate::store::envelope::{KeyRing, DOMAIN_PEERS};
use crate::store::file::{self, Links, ReadError};
use crate::store::{SessionId, StoredSession};

/// The first bytes of a peer's state shared in the store (`shared_peers`).
const SHARED_MAGIC: &[u8; 8] = b"OSSLPSHR";
/// The shared state's format version.
const SHARED_VERSION: u8 = 2;
/// Key kinds of [`SessionId::for_peer_state`].
const KEY_CID: u8 = 1;
const KEY_ADDR: u8 = 2;

/// The first bytes of a file of saved peers.
const MAGIC: &[u8; 8] = b"OSSLPEER";
/// The format version this code writes (it reads 1 too: entries with no versions).
const VERSION: u8 = 2;
/// Versions of a shared state saved per peer at most.
const MAX_VERSIONS: usize = 2;
/// The envelope's context.
const CONTEXT: &[u8] = b"saved peers v1";
/// Files larger than this are refused unread.
const MAX_FILE: u64 = 1 << 30;

/// What binds a saved association to the server that made it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Binding {
    /// The SHA-256 of the server's certificate.
    Certificate([u8; 32]),
    /// The keyed fingerprint of the PSK the peer's identity had.
    Psk([u8; 8]),
}

/// What `Event::Connected` reported, kept with a lean peer.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct Reported {
    pub(crate) resumed: bool,
    pub(crate) cipher: String,
    pub(crate) psk_identity: Option<Vec<u8>>,
    /// The client's certificate (DER), kept only with
    /// [`keep_peer_certificates`](crate::ServerConfigBuilder::keep_peer_certificates).
    pub(crate) peer_certificate: Option<Vec<u8>>,
}

/// An established association taken out of an endpoint, to be restored by another (after a
/// restart). Opaque; it holds secrets (record keys, zeroized when dropped) and its `Debug`
/// shows none.
pub struct SuspendedPeer {
    pub(crate) addr: SocketAddr,
    pub(crate) keys: RecordKeys,
    pub(crate) epoch: u16,
    pub(crate) next_write: u64,
    pub(crate) window: ReplayWindow,
    pub(crate) cid_in: Option<Vec<u8>>,
    pub(crate) cid_out: Option<Vec<u8>>,
    pub(crate) session: Option<SessionId>,
    pub(crate) reported: Reported,
    /// When the session expires (seconds since the epoch).
    pub(crate) expires_at: u64,
    pub(crate) binding: Binding,
    /// The versions of its shared state (`shared_peers`) this host may have in the store (at
    /// most two: the last it wrote, and one in flight or unconfirmed); empty when not shared.
    /// Saved in the file, not in the shared state: the restored peer's first write expects
    /// them, so it fails if another host took the peer over meanwhile.
    pub(crate) versions: Vec<u64>,
}

impl fmt::Debug for SuspendedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SuspendedPeer")
            .field("addr", &self.addr)
            .field("aead", &self.keys.aead)
            .field("next_write", &self.next_write)
            .field("connection_id", &self.cid_in.as_ref().map(hex::encode))
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl SuspendedPeer {
    /// The peer's address when it was suspended.
    pub fn peer(&self) -> SocketAddr {
        self.addr
    }

    /// The connection ID its records carry, if it has one.
    pub fn connection_id(&self) -> Option<&[u8]> {
        self.cid_in.as_deref()
    }

    /// Whether its session's lifetime ended by `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        unix_secs(now) >= self.expires_at
    }

    /// The record state to go on with.
    pub(crate) fn record_state(&self) -> RecordState {
        RecordState::new(self.keys.clone(), self.epoch, self.next_write, self.window)
            .with_cids(self.cid_in.as_deref(), self.cid_out.as_deref())
    }

    /// The id its state is shared under in the store: by its connection ID, or by its address
    /// for a peer without one.
    pub(crate) fn store_id(&self) -> SessionId {
        store_id(self.cid_in.as_deref(), self.addr)
    }

    /// The state as the store keeps it (`shared_peers`): `next_write` is then the lease's end
    /// (no write sequence number at or above it was used; a host taking the peer over starts
    /// there) and the window the read mark. Expires with the session. A versioned value
    /// ([`SessionStore::put_if`](crate::SessionStore::put_if)): it starts with `version`.
    pub(crate) fn to_shared(&self, version: u64) -> StoredSession {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(SHARED_MAGIC);
        out.push(SHARED_VERSION);
        self.encode(&mut out);
        StoredSession::from_millis(out, self.expires_at.saturating_mul(1000))
    }

    /// What [`to_shared`](Self::to_shared) stored, and its version; `None` for anything else.
    pub(crate) fn from_shared(stored: &StoredSession) -> Option<(Self, u64)> {
        let data = stored.data();
        let version = crate::store::version_of(data)?;
        let body = data[8..].strip_prefix(SHARED_MAGIC.as_slice())?;
        let (&format, body) = body.split_first()?;
        if format != SHARED_VERSION {
            return None;
        }
        Some((Self::decode(body)?, version))
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self.addr.ip() {
            IpAddr::V4(ip) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.push(6);
                out.extend_from_slice(&ip.octets());
            }
        }
        out.extend_from_slice(&self.addr.port().to_be_bytes());
        let aead = self.keys.aead;
        out.push(Aead::ALL.iter().position(|a| *a == aead).unwrap_or(0) as u8);
        for k in [&self.keys.client, &self.keys.server] {
            out.extend_from_slice(k.key(32));
            out.extend_from_slice(k.iv(12));
        }
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.next_write.to_be_bytes());
        let (max, bits) = self.window.to_parts();
        out.extend_from_slice(&max.to_be_bytes());
        out.extend_from_slice(&bits.to_be_bytes());
        put_opt(out, self.cid_in.as_deref());
        put_opt(out, self.cid_out.as_deref());
        put_opt(out, self.session.as_ref().map(SessionId::as_bytes));
        out.push(u8::from(self.reported.resumed));
        put_opt(out, Some(self.reported.cipher.as_bytes()));
        put_opt(out, self.reported.psk_identity.as_deref());
        put_opt(out, self.reported.peer_certificate.as_deref());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        match &self.binding {
            Binding::Certificate(fp) => {
                out.push(1);
                out.extend_from_slice(fp);
            }
            Binding::Psk(fp) => {
                out.push(2);
                out.extend_from_slice(fp);
            }
        }
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let mut r = Reader(bytes);
        let ip = match r.u8()? {
            4 => IpAddr::from(<[u8; 4]>::try_from(r.take(4)?).ok()?),
            6 => IpAddr::from(<[u8; 16]>::try_from(r.take(16)?).ok()?),
            _ => return None,
        };
        let addr = SocketAddr::new(ip, r.u16()?);
        let aead = *Aead::ALL.get(usize::from(r.u8()?))?;
        let mut dir = || -> Option<DirectionKey> {
            let key = r.take(32)?;
            let iv = r.take(12)?;
            Some(DirectionKey::new(
                &key[..aead.key_len()],
                &iv[..aead.fixed_iv_len()],
            ))
        };
        let client = dir()?;
        let server = dir()?;
        let epoch = r.u16()?;
        let next_write = r.u64()?;
        let window = ReplayWindow::from_parts(r.u64()?, r.u64()?);
        let cid_in = r.opt()?.map(<[u8]>::to_vec);
        let cid_out = r.opt()?.map(<[u8]>::to_vec);
        let session = match r.opt()? {
            Some(id) => Some(SessionId::new(id).ok()?),
            None => None,
        };
        let resumed = r.u8()? != 0;
        let cipher = String::from_utf8(r.opt()?.unwrap_or_default().to_vec()).ok()?;
        let psk_identity = r.opt()?.map(<[u8]>::to_vec);
        let peer_certificate = r.opt()?.map(<[u8]>::to_vec);
        let expires_at = r.u64()?;
        let binding = match r.u8()? {
            1 => Binding::Certificate(r.take(32)?.try_into().ok()?),
            2 => Binding::Psk(r.take(8)?.try_into().ok()?),
            _ => return None,
        };
        if !r.0.is_empty() || epoch == 0 {
            return None;
        }
        Some(Self {
            addr,
            keys: RecordKeys {
                aead,
                client,
                server,
            },
            epoch,
            next_write,
            window,
            cid_in,
            cid_out,
            session,
            reported: Reported {
                resumed,
                cipher,
                psk_identity,
                peer_certificate,
            },
            expires_at,
            binding,
            versions: Vec::new(),
        })
    }
}

fn put_opt(out: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
        Some(b) => {
            out.extend_from_slice(&(b.len() as u32).to_be_bytes());
            out.extend_from_slice(b);
        }
    }
}

/// Reads what [`SuspendedPeer::encode`] wrote; `None` past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
    }
    fn opt(&mut self) -> Option<Option<&'a [u8]>> {
        match self.u32()? {
            u32::MAX => Some(None),
            n => self.take(usize::try_from(n).ok()?).map(Some),
        }
    }
}

/// The id the state of the peer with connection ID `cid` (or, without one, at `addr`) is
/// shared under.
pub(crate) fn store_id(cid: Option<&[u8]>, addr: SocketAddr) -> SessionId {
    match cid {
        Some(cid) => SessionId::for_peer_state(KEY_CID, cid),
        None => SessionId::for_peer_state(KEY_ADDR, addr.to_string().as_bytes()),
    }
}

pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The bytes of a file of `peers`, sealed with `ring`.
pub(crate) fn encode(peers: &[SuspendedPeer], ring: &KeyRing) -> Result<Vec<u8>, Error> {
    let mut body = Zeroizing::new(Vec::new());
    body.extend_from_slice(&(peers.len() as u32).to_be_bytes());
    let mut entry = Zeroizing::new(Vec::new());
    for p in peers {
        entry.clear();
        p.encode(&mut entry);
        body.extend_from_slice(&(entry.len() as u32).to_be_bytes());
        body.extend_from_slice(&entry);
        let versions = &p.versions[..p.versions.len().min(MAX_VERSIONS)];
        body.push(versions.len() as u8);
        for v in versions {
            body.extend_from_slice(&v.to_be_bytes());
        }
    }
    let envelope = ring.seal_raw(DOMAIN_PEERS, CONTEXT, &body)?;
    let mut out = Vec::with_capacity(MAGIC.len() + 1 + envelope.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&envelope);
    Ok(out)
}

/// The peers in a file's bytes; refused whole if anything is wrong.
pub(crate) fn parse(bytes: &[u8], ring: &KeyRing) -> Result<Vec<SuspendedPeer>, Error> {
    let corrupt = |why: &str| Error::Store(StoreError::Corrupt(format!("saved peers: {why}")));
    if bytes.len() < MAGIC.len() + 1 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(corrupt("not a file of saved peers"));
    }
    let version = bytes[MAGIC.len()];
    if version != VERSION && version != 1 {
        return Err(corrupt("unknown version"));
    }
    let mut body = ring.open_raw(DOMAIN_PEERS, CONTEXT, &bytes[MAGIC.len() + 1..])?;
    let mut r = Reader(&body);
    let count = r.u32().ok_or_else(|| corrupt("truncated"))?;
    let mut peers = Vec::new();
    for _ in 0..count {
        let len = r.u32().ok_or_else(|| corrupt("truncated"))?;
        let entry = r
            .take(len as usize)
            .ok_or_else(|| corrupt("truncated entry"))?;
        let mut peer = SuspendedPeer::decode(entry).ok_or_else(|| corrupt("malformed entry"))?;
        if version >= 2 {
            let n = r.u8().ok_or_else(|| corrupt("truncated"))?;
            if usize::from(n) > MAX_VERSIONS {
                return Err(corrupt("malformed entry"));
            }
            for _ in 0..n {
                peer.versions
                    .push(r.u64().ok_or_else(|| corrupt("truncated"))?);
            }
        }
        peers.push(peer);
    }
    let rest = r.0.len();
    body.zeroize();
    if rest != 0 {
        return Err(corrupt("trailing bytes"));
    }
    Ok(peers)
}

/// Writes `peers` to `path`, sealed with `ring`, atomically (see the module docs); returns how
/// many.
///
/// # Errors
/// [`Error::Store`] if sealing fails, [`Error::Io`] if the file cannot be written.
pub fn save_peers(
    path: impl AsRef<Path>,
    peers: &[SuspendedPeer],
    ring: &KeyRing,
) -> Result<usize, Error> {
    let bytes = Zeroizing::new(encode(peers, ring)?);
    file::write_atomically(path.as_ref(), &bytes)?;
    Ok(peers.len())
}

/// Reads the peers saved at `path` and deletes the file, durably, before returning them, so
/// that they can be restored once only; peers whose session expired by `now` are left out. No
/// file: no peers.
///
/// # Errors
/// [`Error::ReadFile`] if the file cannot be read, [`Error::Io`] if it cannot be deleted (then
/// nothing is returned: restoring state that could be restored again later would risk reusing
/// sequence numbers); [`Error::RefusedFile`] if the path is not a regular file, a symbolic link
/// or too large; [`Error::InvalidFile`] for a file that is corrupt, truncated, or sealed under
/// another key ring.
pub fn take_peers(
    path: impl AsRef<Path>,
    ring: &KeyRing,
    now: SystemTime,
) -> Result<Vec<SuspendedPeer>, Error> {
    let path = path.as_ref();
    let bytes = match file::read_regular(path, MAX_FILE, Links::Refuse) {
        Ok((b, _)) => b,
        Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into_error(FileKind::SavedPeers, path)),
    };
    file::remove_durably(path)?;
    let mut peers = parse(&bytes, ring).map_err(|e| match e {
        Error::Store(e) => Error::InvalidFile {
            kind: FileKind::SavedPeers,
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
        e => e,
    })?;
    peers.retain(|p| !p.is_expired(now));
    Ok(peers)
}

/// How long after `now` a session of `timeout_secs` made at `created_secs` lives, capped by
/// `max_ttl` (seconds since the epoch).
pub(crate) fn expiry_secs(created_secs: i64, timeout_secs: i64, max_ttl: Duration) -> u64 {
    let created = u64::try_from(created_secs).unwrap_or(0);
    let timeout = u64::try_from(timeout_secs)
        .unwrap_or(0)
        .min(max_ttl.as_secs());
    created.saturating_add(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(next_write: u64) -> SuspendedPeer {
        let keys = RecordKeys::from_master_secret(
            Aead::Aes128Ccm8,
            openssl::hash::MessageDigest::sha256(),
            &[3; 48],
            &[1; 32],
            &[2; 32],
        )
        .unwrap();
        let mut window = ReplayWindow::default();
        window.accept(41);
        window.accept(40);
        SuspendedPeer {
            addr: "[2001:db8::7]:5684".parse().unwrap(),
            keys,
            epoch: 1,
            next_write,
            window,
            cid_in: Some(vec![0, 1, 2, 3, 4, 5, 6]),
            cid_out: Some(Vec::new()),
            session: Some(SessionId::new(&[9; 32]).unwrap()),
            reported: Reported {
                resumed: true,
                cipher: "PSK-AES128-CCM8".into(),
                psk_identity: Some(b"sensor-17".to_vec()),
                peer_certificate: None,
            },
            expires_at: 2_000_000_000,
            binding: Binding::Psk([7; 8]),
            versions: vec![3, 4],
        }
    }

    #[test]
    fn saved_peers_round_trip_and_the_file_is_read_once() {
        let ring = KeyRing::new(1, [4; 32]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers");
        assert_eq!(
            save_peers(&path, &[sample(7), sample(9)], &ring).unwrap(),
            2
        );
        let now = UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        let back = take_peers(&path, &ring, now).unwrap();
        assert_eq!(back.len(), 2);
        let (a, b) = (&back[0], &sample(7));
        assert_eq!(a.addr, b.addr);
        assert_eq!(a.next_write, 7);
        assert_eq!(back[1].next_write, 9);
        assert_eq!(a.window, b.window);
        assert_eq!(a.cid_in, b.cid_in);
        assert_eq!(a.cid_out, b.cid_out);
        assert_eq!(a.session, b.session);
        assert!(a.reported == b.reported && a.binding == b.binding);
        assert_eq!(a.keys.client.key(16), b.keys.client.key(16));
        assert_eq!(a.keys.server.iv(4), b.keys.server.iv(4));
        assert_eq!(a.versions, vec![3, 4], "the shared state's versions");
        assert!(!path.exists(), "read once: the file is gone");
        assert!(take_peers(&path, &ring, now).unwrap().is_empty());
        // Expired sessions are left out.
        save_peers(&path, &[sample(7)], &ring).unwrap();
        let later = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        assert!(take_peers(&path, &ring, later).unwrap().is_empty());
    }

    #[test]
    fn a_foreign_or_tampered_file_restores_nothing() {
        let ring = KeyRing::new(1, [4; 32]);
        let other = KeyRing::new(2, [5; 32]);
        let bytes = encode(&[sample(7)], &ring).unwrap();
        assert!(matches!(parse(&bytes, &other), Err(Error::Store(_))));
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 1;
            assert!(parse(&t, &ring).is_err(), "byte {i}");
        }
        for n in 0..bytes.len() {
            assert!(parse(&bytes[..n], &ring).is_err(), "prefix {n}");
        }
        assert_eq!(parse(&bytes, &ring).unwrap().len(), 1);
    }

    #[test]
    fn a_shared_state_round_trips_and_nothing_else_parses_as_one() {
        let p = sample(2048);
        let stored = p.to_shared(0x0123_4567_89ab_cdef);
        assert_eq!(stored.expires_at_millis(), 2_000_000_000_000);
        let (back, version) = SuspendedPeer::from_shared(&stored).unwrap();
        assert_eq!(version, 0x0123_4567_89ab_cdef);
        assert_eq!(back.next_write, 2048, "the lease's end");
        assert_eq!(back.window, p.window);
        assert_eq!(back.cid_in, p.cid_in);
        assert_eq!(back.store_id(), p.store_id());
        assert!(p.store_id().is_peer_state());
        // Another address without a CID, or another CID: another id.
        let mut q = sample(1);
        q.cid_in = None;
        assert_ne!(q.store_id(), p.store_id());
        assert_eq!(q.store_id(), store_id(None, q.addr));
        let data = stored.data().to_vec();
        for n in 0..data.len() {
            let cut = StoredSession::from_millis(data[..n].to_vec(), 0);
            assert!(SuspendedPeer::from_shared(&cut).is_none(), "prefix {n}");
        }
        let mut other = data.clone();
        other[16] = 1;
        assert!(SuspendedPeer::from_shared(&StoredSession::from_millis(other, 0)).is_none());
        let mut long = data;
        long.push(0);
        assert!(SuspendedPeer::from_shared(&StoredSession::from_millis(long, 0)).is_none());
    }

    #[test]
    fn debug_shows_no_key() {
        let p = sample(7);
        let shown = format!("{p:?}");
        assert!(!shown.contains(&hex::encode(p.keys.client.key(16))));
        assert!(shown.contains("SuspendedPeer"));
    }
}
