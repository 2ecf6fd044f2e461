//! Encrypted snapshots: a store's sessions written at clean shutdown and loaded at start, so a
//! restart does not cost every client a full handshake.
//!
//! # File format (version 1)
//!
//! ```text
//! header   "OSSLSNAP" (8 bytes) | format version u8 = 1 | key id u32 BE | entry count u32 BE
//! entry    id length u8 (1..=32) | session id | envelope length u32 BE | envelope
//! trailer  envelope of SHA-256(header and all entries)
//! ```
//!
//! Each entry's envelope is [`KeyRing::seal_session`] for its id (AES-256-GCM; the id is
//! associated data, the expiry is inside). The trailer is sealed under the same key in its own
//! associated-data domain, so truncating the file, dropping, reordering or editing entries, or
//! changing the header is detected before anything is loaded. The header's key id names the key
//! that sealed everything; a ring without it refuses the file as foreign.
//!
//! Entries are written from the least to the most recently used (the order of
//! [`MemoryStore`](crate::MemoryStore)'s walk), and loading inserts them in file order, so a
//! reloaded store evicts the sessions that were cold before the restart first.
//!
//! # The file on disk
//!
//! [`save_snapshot`] writes an exclusively created (`O_EXCL`), randomly named temporary file
//! next to the target, readable by the owner only, syncs it, renames it over the target and
//! syncs the directory: a crash mid-write leaves the previous snapshot intact (and perhaps a
//! `.NAME.*.tmp` file beside it), and a file or link planted at any name is never written
//! through. [`load_snapshot`] opens without following a symbolic link and without blocking,
//! reads only a regular file, and never more than [`MAX_SNAPSHOT_BYTES`] (a FIFO, a device or a
//! link is refused at once). It validates the whole file before it inserts anything: a refused
//! snapshot adds nothing to the store.

use std::path::Path;
use std::time::SystemTime;

use openssl::sha::sha256;

use crate::error::{Error, FileKind, StoreError};
use crate::store::envelope::{envelope_key_id, KeyRing, DOMAIN_SNAPSHOT, OVERHEAD};
use crate::store::file::{self, Links};
use crate::store::{SessionId, SessionStoreAdmin, StoredSession, MAX_SESSION_ID_LEN};

/// The first bytes of a snapshot file.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"OSSLSNAP";
/// The snapshot format version this code writes and reads.
pub const SNAPSHOT_VERSION: u8 = 1;
/// Snapshots larger than this are refused without being read.
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;

const HEADER_LEN: usize = 8 + 1 + 4 + 4;
const TRAILER_CONTEXT: &[u8] = b"snapshot trailer v1";
const TRAILER_LEN: usize = OVERHEAD + 32;

/// Writes every unexpired session of `store` to an encrypted snapshot at `path`, atomically
/// (exclusive temporary file, sync, rename, directory sync), in the order of the store's
/// [`for_each`](SessionStoreAdmin::for_each). Returns the number of sessions written.
///
/// # Errors
/// [`Error::Store`] if the store cannot be walked or a session cannot be sealed; [`Error::Io`]
/// if the file cannot be written (the previous snapshot, if any, is left in place).
pub fn save_snapshot(
    store: &dyn SessionStoreAdmin,
    path: impl AsRef<Path>,
    ring: &KeyRing,
    now: SystemTime,
) -> Result<usize, Error> {
    let path = path.as_ref();
    let mut sessions: Vec<(SessionId, StoredSession)> = Vec::new();
    store.for_each(&mut |id, s| {
        if !s.is_expired(now) {
            sessions.push((*id, s.clone()));
        }
    })?;
    let buf = encode(&sessions, ring)?;
    file::write_atomically(path, &buf)?;
    Ok(sessions.len())
}

/// The snapshot file's bytes for `sessions`, sealed with `ring`.
pub(crate) fn encode(
    sessions: &[(SessionId, StoredSession)],
    ring: &KeyRing,
) -> Result<Vec<u8>, Error> {
    let count = u32::try_from(sessions.len())
        .map_err(|_| Error::setting("snapshot", "too many sessions for one snapshot"))?;

    let mut buf =
        Vec::with_capacity(HEADER_LEN + sessions.iter().map(|(_, s)| s.len() + 100).sum::<usize>());
    buf.extend_from_slice(SNAPSHOT_MAGIC);
    buf.push(SNAPSHOT_VERSION);
    buf.extend_from_slice(&ring.active_key_id().to_be_bytes());
    buf.extend_from_slice(&count.to_be_bytes());
    for (id, session) in sessions {
        let env = ring.seal_session(id, session)?;
        buf.push(id.as_bytes().len() as u8);
        buf.extend_from_slice(id.as_bytes());
        let len = u32::try_from(env.len())
            .map_err(|_| Error::setting("snapshot", "a session is too large for a snapshot"))?;
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(&env);
    }
    let digest = sha256(&buf);
    let trailer = ring.seal_raw(DOMAIN_SNAPSHOT, TRAILER_CONTEXT, &digest)?;
    buf.extend_from_slice(&trailer);

    Ok(buf)
}

/// The authenticated trailer the snapshot `body` (everything before it) ends with.
#[cfg(feature = "__fuzzing")]
pub(crate) fn trailer(ring: &KeyRing, body: &[u8]) -> Result<Vec<u8>, Error> {
    Ok(ring.seal_raw(DOMAIN_SNAPSHOT, TRAILER_CONTEXT, &sha256(body))?)
}

/// Loads the snapshot at `path` into `store`, skipping sessions expired at `now`, in file
/// order (so the last saved is the most recently used). Returns the number of sessions
/// inserted.
///
/// The file must be a regular file, not reached through a symbolic link, of at most
/// [`MAX_SNAPSHOT_BYTES`]; anything else is refused without blocking and without reading. The
/// whole file is checked first (magic, version, key id, structure, the authenticated trailer,
/// every entry); a truncated, corrupt or foreign snapshot is refused with an error that says
/// which, and nothing is inserted. A session larger than the store's byte bound
/// ([`StoreError::TooLarge`]) is skipped.
///
/// # Errors
/// [`Error::ReadFile`] if the file cannot be read (`NotFound` if there is none);
/// [`Error::RefusedFile`] if the path is not a regular file, a symbolic link, or too large;
/// [`Error::InvalidFile`] naming the problem if the snapshot is malformed, truncated or sealed
/// under a key the ring does not hold; [`Error::Store`] with the store's own error if an
/// insert fails.
pub fn load_snapshot(
    store: &dyn SessionStoreAdmin,
    path: impl AsRef<Path>,
    ring: &KeyRing,
    now: SystemTime,
) -> Result<usize, Error> {
    let path = path.as_ref();
    let buf = match file::read_regular(path, MAX_SNAPSHOT_BYTES, Links::Refuse) {
        Ok((buf, _)) => buf,
        Err(e) => return Err(e.into_error(FileKind::Snapshot, path)),
    };
    let sessions = parse(&buf, ring, now).map_err(|reason| Error::InvalidFile {
        kind: FileKind::Snapshot,
        path: path.to_path_buf(),
        reason,
    })?;
    let mut inserted = 0;
    for (id, session) in sessions {
        match store.put(id, session) {
            Ok(()) => inserted += 1,
            // The store could never hold it (a smaller byte bound than the saving store's).
            Err(StoreError::TooLarge { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(inserted)
}

/// Validates and opens a snapshot; returns its unexpired sessions.
pub(crate) fn parse(
    buf: &[u8],
    ring: &KeyRing,
    now: SystemTime,
) -> Result<Vec<(SessionId, StoredSession)>, String> {
    if buf.len() < 8 || &buf[..8] != SNAPSHOT_MAGIC {
        return Err("not a session snapshot (bad magic)".into());
    }
    if buf.len() < HEADER_LEN {
        return Err(format!(
            "truncated: {} bytes, shorter than the header",
            buf.len()
        ));
    }
    if buf[8] != SNAPSHOT_VERSION {
        return Err(format!(
            "format version {} (this build reads {SNAPSHOT_VERSION})",
            buf[8]
        ));
    }
    let key_id = u32::from_be_bytes([buf[9], buf[10], buf[11], buf[12]]);
    if !ring.key_ids().contains(&key_id) {
        return Err(format!(
            "sealed with key id {key_id}, which the key ring does not hold (a foreign snapshot, or the wrong key file)"
        ));
    }
    let count = u32::from_be_bytes([buf[13], buf[14], buf[15], buf[16]]) as usize;

    // Structure: `count` entries, then exactly one trailer.
    let mut pos = HEADER_LEN;
    let mut entries: Vec<(SessionId, &[u8])> = Vec::with_capacity(count.min(buf.len() / 40));
    for i in 0..count {
        let truncated = || format!("truncated in entry {} of {count}", i + 1);
        let id_len = usize::from(*buf.get(pos).ok_or_else(truncated)?);
        if id_len == 0 || id_len > MAX_SESSION_ID_LEN {
            return Err(format!(
                "entry {} has a session id of {id_len} bytes",
                i + 1
            ));
        }
        let id_bytes = buf.get(pos + 1..pos + 1 + id_len).ok_or_else(truncated)?;
        pos += 1 + id_len;
        let len_bytes = buf.get(pos..pos + 4).ok_or_else(truncated)?;
        let env_len =
            u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
        pos += 4;
        let env = buf
            .get(pos..pos.checked_add(env_len).ok_or_else(truncated)?)
            .ok_or_else(truncated)?;
        pos += env_len;
        let id = SessionId::new(id_bytes).map_err(|e| e.to_string())?;
        entries.push((id, env));
    }
    let body_end = pos;
    match buf.len() - body_end {
        0 => {
            return Err(format!(
                "truncated: the trailer after {count} entries is missing"
            ))
        }
        n if n < TRAILER_LEN => return Err("truncated in the trailer".into()),
        n if n > TRAILER_LEN => {
            return Err(format!(
                "{} unexpected bytes after the trailer",
                n - TRAILER_LEN
            ))
        }
        _ => {}
    }
    let trailer = &buf[body_end..];
    if envelope_key_id(trailer) != Some(key_id) {
        return Err("the trailer is not sealed with the header's key".into());
    }
    let digest = ring
        .open_raw(DOMAIN_SNAPSHOT, TRAILER_CONTEXT, trailer)
        .map_err(|_| {
            "the trailer failed authentication (corrupt, or sealed with another key)".to_string()
        })?;
    if digest[..] != sha256(&buf[..body_end])[..] {
        return Err("corrupt: contents do not match the authenticated digest".into());
    }

    let mut out = Vec::with_capacity(entries.len());
    for (i, (id, env)) in entries.into_iter().enumerate() {
        let session = ring
            .open_session(&id, env)
            .map_err(|e| format!("entry {} of {count}: {e}", i + 1))?;
        if !session.is_expired(now) {
            out.push((id, session));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use std::fs;

    use super::*;
    use crate::store::SessionStore;

    #[test]
    fn parse_refuses_garbage_without_panicking() {
        let ring = KeyRing::new(1, [1; 32]);
        let now = UNIX_EPOCH;
        for bytes in [
            &b""[..],
            b"OSSL",
            b"OSSLSNAP",
            b"OSSLSNAP\x01\0\0\0\x01",
            b"OSSLSNAP\x02\0\0\0\x01\0\0\0\0",
            b"OSSLSNAP\x01\0\0\0\x01\xff\xff\xff\xff",
            b"OSSLSNAP\x01\0\0\0\x01\0\0\0\x01\x21",
            b"OSSLSNAP\x01\0\0\0\x01\0\0\0\x01\x01a\xff\xff\xff\xff",
            b"OSSLSNAP\x01\0\0\0\x01\0\0\0\0",
        ] {
            assert!(parse(bytes, &ring, now).is_err(), "{bytes:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn random_files_never_panic(mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), magic in proptest::prelude::any::<bool>()) {
            if magic && bytes.len() >= 17 {
                bytes[..8].copy_from_slice(SNAPSHOT_MAGIC);
                bytes[8] = SNAPSHOT_VERSION;
                bytes[9..13].copy_from_slice(&1u32.to_be_bytes());
            }
            let ring = KeyRing::new(1, [1; 32]);
            proptest::prop_assert!(parse(&bytes, &ring, UNIX_EPOCH).is_err());
        }
    }

    #[test]
    fn round_trip_through_parse() {
        let ring = KeyRing::new(4, [4; 32]);
        let store = crate::store::MemoryStore::builder().build().unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(1_000);
        store
            .put(
                SessionId::new(b"a").unwrap(),
                StoredSession::new(vec![1; 10], t + Duration::from_secs(5)),
            )
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("snap");
        assert_eq!(save_snapshot(&store, &p, &ring, t).unwrap(), 1);
        let buf = fs::read(&p).unwrap();
        assert_eq!(&buf[..8], SNAPSHOT_MAGIC);
        assert_eq!(parse(&buf, &ring, t).unwrap().len(), 1);
        assert_eq!(
            parse(&buf, &ring, t + Duration::from_secs(5))
                .unwrap()
                .len(),
            0
        );
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
