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
//! [`save_snapshot`] writes a temporary file next to the target, syncs it and renames it over,
//! so a crash mid-write leaves the previous snapshot intact. [`load_snapshot`] validates the
//! whole file before it inserts anything: a refused snapshot adds nothing to the store.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use openssl::sha::sha256;

use crate::error::{Error, StoreError};
use crate::store::envelope::{envelope_key_id, KeyRing, DOMAIN_SNAPSHOT, OVERHEAD};
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
/// (temporary file, sync, rename). Returns the number of sessions written.
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
    let count = u32::try_from(sessions.len())
        .map_err(|_| Error::Config("too many sessions for one snapshot".into()))?;

    let mut buf =
        Vec::with_capacity(HEADER_LEN + sessions.iter().map(|(_, s)| s.len() + 100).sum::<usize>());
    buf.extend_from_slice(SNAPSHOT_MAGIC);
    buf.push(SNAPSHOT_VERSION);
    buf.extend_from_slice(&ring.active_key_id().to_be_bytes());
    buf.extend_from_slice(&count.to_be_bytes());
    for (id, session) in &sessions {
        let env = ring.seal_session(id, session)?;
        buf.push(id.as_bytes().len() as u8);
        buf.extend_from_slice(id.as_bytes());
        let len = u32::try_from(env.len())
            .map_err(|_| Error::Config("a session is too large for a snapshot".into()))?;
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(&env);
    }
    let digest = sha256(&buf);
    let trailer = ring.seal_raw(DOMAIN_SNAPSHOT, TRAILER_CONTEXT, &digest)?;
    buf.extend_from_slice(&trailer);

    write_atomically(path, &buf)?;
    Ok(sessions.len())
}

/// Loads the snapshot at `path` into `store`, skipping sessions expired at `now`. Returns the
/// number of sessions inserted.
///
/// The whole file is checked first (magic, version, key id, structure, the authenticated
/// trailer, every entry); a truncated, corrupt or foreign snapshot is refused with an error that
/// says which, and nothing is inserted.
///
/// # Errors
/// [`Error::Io`] if the file cannot be read (`NotFound` if there is none);
/// [`Error::Store`] with [`StoreError::Corrupt`] naming the file and the problem if the snapshot
/// is refused, or the store's own error if an insert fails.
pub fn load_snapshot(
    store: &dyn SessionStoreAdmin,
    path: impl AsRef<Path>,
    ring: &KeyRing,
    now: SystemTime,
) -> Result<usize, Error> {
    let path = path.as_ref();
    let refuse = |why: String| {
        Error::Store(StoreError::Corrupt(format!(
            "snapshot {} refused: {why}",
            path.display()
        )))
    };
    let size = fs::metadata(path)?.len();
    if size > MAX_SNAPSHOT_BYTES {
        return Err(refuse(format!(
            "{size} bytes is over the {MAX_SNAPSHOT_BYTES}-byte limit"
        )));
    }
    let buf = fs::read(path)?;
    let sessions = parse(&buf, ring, now).map_err(refuse)?;
    let n = sessions.len();
    for (id, session) in sessions {
        store.put(id, session)?;
    }
    Ok(n)
}

/// Validates and opens a snapshot; returns its unexpired sessions.
fn parse(
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

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        Error::Config(format!("snapshot path {} has no file name", path.display()))
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let result = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // Make the rename itself durable (best effort: not every platform opens directories).
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok::<(), std::io::Error>(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

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
