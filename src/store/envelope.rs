//! Encryption at rest: an AES-256-GCM envelope for stored sessions, and the key ring that opens it.
//!
//! Session bytes hold the master secret, so a shared store (Redis) or a snapshot file must not
//! hold them in the clear. Every value is sealed on its own:
//!
//! ```text
//! [version u8 = 1][key_id u32 BE][nonce 12 bytes][ciphertext][tag 16 bytes]
//! ```
//!
//! - the nonce is random per value (`RAND_bytes`), so a key may seal about 2^32 values before
//!   the nonce-collision bound matters; rotate keys well before that;
//! - the associated data is `version || key_id BE || domain || context`, where the context is
//!   the session id for a stored session (domain 1), so a value copied under another id, or
//!   with its header edited, fails to open;
//! - the key id picks the key from the [`KeyRing`]: one active key seals, older keys still
//!   open, so keys rotate without dropping the sessions written under the old one.
//!
//! A stored session is sealed as `[expires_at_ms u64 BE][session bytes]`, so its expiry is
//! authenticated with it ([`KeyRing::seal_session`], [`KeyRing::open_session`]).
//!
//! Opening never panics, whatever the input: a short value is a [`StoreError::Corrupt`], an
//! unknown key a [`StoreError::UnknownKey`], a tampered or foreign one a
//! [`StoreError::Unauthentic`].

use std::fmt;
use std::fs;
use std::path::Path;

use openssl::rand::rand_bytes;
use openssl::symm::{decrypt_aead, encrypt_aead, Cipher};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, FileKind, StoreError};
use crate::store::file::{self, Links};
use crate::store::{SessionId, StoredSession};

/// The envelope format version this code writes and reads.
pub const ENVELOPE_VERSION: u8 = 1;
/// Bytes in a key (AES-256).
pub const KEY_LEN: usize = 32;
/// Bytes in the per-value random nonce.
pub const NONCE_LEN: usize = 12;
/// Bytes in the GCM authentication tag.
pub const TAG_LEN: usize = 16;
/// Bytes before the ciphertext: version, key id, nonce.
pub const HEADER_LEN: usize = 1 + 4 + NONCE_LEN;
/// Bytes an envelope adds to its plaintext.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Key files larger than this are refused without being read (a key line is 70 to 76 bytes,
/// so this holds several hundred keys and their comments).
pub const MAX_KEY_FILE_BYTES: u64 = 64 << 10;

/// Associated-data domain of a sealed session (context = the session id).
pub(crate) const DOMAIN_SESSION: u8 = 1;
/// Associated-data domain of a snapshot trailer (context = a fixed label).
pub(crate) const DOMAIN_SNAPSHOT: u8 = 2;
/// The associated-data domain of a file of saved peers (`server::continuity`).
#[cfg(feature = "server")]
pub(crate) const DOMAIN_PEERS: u8 = 3;

/// A set of AES-256-GCM keys by id: one active key seals, every key opens.
///
/// Keys are zeroized when the ring is dropped, and `Debug` prints only the key ids.
///
/// # Key file
/// [`KeyRing::from_file`] reads one key per line, `ID:HEX`, where `ID` is a decimal `u32` and
/// `HEX` is 64 hex digits (32 bytes). Blank lines and lines starting with `#` are skipped.
/// **The last key in the file is the active one**: to rotate, append a new line, roll the file
/// out to every host, and remove the old line once the sessions it sealed have expired.
///
/// ```text
/// # session store keys; the last one seals
/// 1:8f1c0d5e0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5
/// 2:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff
/// ```
///
/// ```
/// use openssl_session_cache::{KeyRing, SessionId};
///
/// let ring = KeyRing::generate()?;
/// let id = SessionId::new(b"session id")?;
/// let sealed = ring.seal(&id, b"secret session bytes")?;
/// assert_eq!(&ring.open(&id, &sealed)?[..], b"secret session bytes");
/// // The same value under another id does not open.
/// assert!(ring.open(&SessionId::new(b"other id")?, &sealed).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct KeyRing {
    /// `(id, key)`; the active key is the last one. Each key sits in a box of its own, so the
    /// list growing moves pointers, never key bytes into memory that is freed unwiped.
    keys: Vec<(u32, SecretKey)>,
}

/// A key, wiped when dropped, at a fixed heap address.
type SecretKey = Box<Zeroizing<[u8; KEY_LEN]>>;

fn secret_key(key: [u8; KEY_LEN]) -> SecretKey {
    let mut boxed = Box::new(Zeroizing::new([0u8; KEY_LEN]));
    boxed.copy_from_slice(&key);
    let mut key = key;
    key.zeroize();
    boxed
}

impl KeyRing {
    /// A ring holding one key, `id`, which is active.
    pub fn new(id: u32, key: [u8; KEY_LEN]) -> Self {
        Self {
            keys: vec![(id, secret_key(key))],
        }
    }

    /// A ring holding one fresh random key with a random id.
    ///
    /// # Errors
    /// [`Error::Ssl`] if OpenSSL's random generator fails.
    pub fn generate() -> Result<Self, Error> {
        let mut key = Box::new(Zeroizing::new([0u8; KEY_LEN]));
        rand_bytes(&mut key[..])?;
        let mut id = [0u8; 4];
        rand_bytes(&mut id)?;
        Ok(Self {
            keys: vec![(u32::from_be_bytes(id), key)],
        })
    }

    /// Adds `key` as `id` and makes it the active key; the keys already in the ring keep opening
    /// what they sealed.
    ///
    /// # Errors
    /// [`Error::InvalidKeys`] if the ring already holds `id`.
    pub fn rotate(mut self, id: u32, key: [u8; KEY_LEN]) -> Result<Self, Error> {
        self.check_new_id(id)?;
        self.keys.push((id, secret_key(key)));
        Ok(self)
    }

    /// Adds `key` as `id`, for opening only; the active key stays active.
    ///
    /// # Errors
    /// [`Error::InvalidKeys`] if the ring already holds `id`.
    pub fn with_retired_key(mut self, id: u32, key: [u8; KEY_LEN]) -> Result<Self, Error> {
        self.check_new_id(id)?;
        let at = self.keys.len() - 1;
        self.keys.insert(at, (id, secret_key(key)));
        Ok(self)
    }

    fn check_new_id(&self, id: u32) -> Result<(), Error> {
        if self.key(id).is_some() {
            return Err(Error::InvalidKeys(format!(
                "key ring already holds key id {id}"
            )));
        }
        Ok(())
    }

    /// Reads a ring from a key file (the format is in the type's docs).
    ///
    /// The file is opened without blocking and must be a regular file of at most
    /// [`MAX_KEY_FILE_BYTES`]: a FIFO, a device (`/dev/zero`), a directory or a larger file is
    /// refused at once, without being read. A symbolic link is followed (secret volumes and
    /// configuration tools deliver key files through links); what it leads to is checked the
    /// same way. The bytes read are wiped when parsed.
    ///
    /// # Errors
    /// [`Error::ReadFile`] if the file cannot be opened or read (`NotFound` if there is none);
    /// [`Error::RefusedFile`] if it is not a regular file or too large; [`Error::InvalidFile`]
    /// if it is not UTF-8, or a line is malformed (naming the line), an id repeats, or the file
    /// holds no key.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let in_file = |reason: String| Error::InvalidFile {
            kind: FileKind::KeyFile,
            path: path.to_path_buf(),
            reason,
        };
        let (bytes, meta) = file::read_regular(path, MAX_KEY_FILE_BYTES, Links::Follow)
            .map_err(|e| e.into_error(FileKind::KeyFile, path))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format_args!("{:o}", mode & 0o777),
                    "session key file is readable by group or others; chmod 600 it"
                );
            }
        }
        #[cfg(not(unix))]
        let _ = meta;
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            in_file(format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.valid_up_to()
            ))
        })?;
        Self::parse(text).map_err(|e| match e {
            Error::InvalidKeys(msg) => in_file(msg),
            other => other,
        })
    }

    /// Parses the key file format (see the type's docs).
    ///
    /// # Errors
    /// [`Error::InvalidKeys`] naming the line if a line is malformed, an id repeats, or there is
    /// no key.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut keys: Vec<(u32, SecretKey)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let lineno = n + 1;
            let (id, hex) = line.split_once(':').ok_or_else(|| {
                Error::InvalidKeys(format!("line {lineno}: expected ID:HEX (64 hex digits)"))
            })?;
            let id: u32 = id.trim().parse().map_err(|_| {
                Error::InvalidKeys(format!(
                    "line {lineno}: key id is not a decimal number from 0 to 4294967295"
                ))
            })?;
            let key = parse_key_hex(hex.trim()).ok_or_else(|| {
                Error::InvalidKeys(format!(
                    "line {lineno}: key {id} is not 64 hex digits (32 bytes)"
                ))
            })?;
            if keys.iter().any(|(k, _)| *k == id) {
                return Err(Error::InvalidKeys(format!(
                    "line {lineno}: key id {id} appears twice"
                )));
            }
            keys.push((id, Box::new(key)));
        }
        if keys.is_empty() {
            return Err(Error::InvalidKeys(
                "no key (expected lines of ID:HEX)".into(),
            ));
        }
        Ok(Self { keys })
    }

    /// The ring in the key file format, active key last. The text holds the keys: keep it secret.
    pub fn to_file_string(&self) -> Zeroizing<String> {
        use fmt::Write;
        let mut s = Zeroizing::new(String::with_capacity(self.keys.len() * 76));
        for (id, key) in &self.keys {
            let _ = write!(s, "{id}:");
            for b in key.iter() {
                let _ = write!(s, "{b:02x}");
            }
            s.push('\n');
        }
        s
    }

    /// Writes the ring to `path` in the key file format, readable by the owner only (on Unix).
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be written (an existing file is not replaced).
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        use std::io::Write;
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path)?;
        f.write_all(self.to_file_string().as_bytes())?;
        f.sync_all()?;
        Ok(())
    }

    /// The id of the key that seals.
    pub fn active_key_id(&self) -> u32 {
        self.active().0
    }

    /// The ids of all keys, active last.
    pub fn key_ids(&self) -> Vec<u32> {
        self.keys.iter().map(|(id, _)| *id).collect()
    }

    fn active(&self) -> &(u32, SecretKey) {
        self.keys
            .last()
            .expect("BUG: a key ring always holds a key")
    }

    pub(crate) fn key(&self, id: u32) -> Option<&[u8; KEY_LEN]> {
        self.keys
            .iter()
            .find(|(k, _)| *k == id)
            .map(|(_, key)| &***key)
    }

    /// Seals `plaintext` for the session `id` under the active key.
    ///
    /// # Errors
    /// [`StoreError::Seal`] if OpenSSL fails (no randomness, cipher unavailable).
    pub fn seal(&self, id: &SessionId, plaintext: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.seal_raw(DOMAIN_SESSION, id.as_bytes(), plaintext)
    }

    /// Opens an envelope sealed for the session `id`.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if the envelope is short or has another version,
    /// [`StoreError::UnknownKey`] if it names a key the ring does not hold,
    /// [`StoreError::Unauthentic`] if it fails authentication (tampered, sealed for another id,
    /// other key).
    pub fn open(&self, id: &SessionId, envelope: &[u8]) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        self.open_raw(DOMAIN_SESSION, id.as_bytes(), envelope)
    }

    /// Seals a stored session (its expiry and bytes) for `id`.
    ///
    /// # Errors
    /// As [`seal`](Self::seal).
    pub fn seal_session(
        &self,
        id: &SessionId,
        session: &StoredSession,
    ) -> Result<Vec<u8>, StoreError> {
        let plain = encode_session(session);
        self.seal(id, &plain)
    }

    /// Opens what [`seal_session`](Self::seal_session) sealed.
    ///
    /// # Errors
    /// As [`open`](Self::open), and [`StoreError::Corrupt`] if the plaintext is too short.
    pub fn open_session(
        &self,
        id: &SessionId,
        envelope: &[u8],
    ) -> Result<StoredSession, StoreError> {
        let plain = self.open(id, envelope)?;
        decode_session(&plain)
    }

    pub(crate) fn seal_raw(
        &self,
        domain: u8,
        context: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let (key_id, key) = self.active();
        let mut nonce = [0u8; NONCE_LEN];
        rand_bytes(&mut nonce).map_err(StoreError::Seal)?;
        let aad = aad(*key_id, domain, context);
        let mut tag = [0u8; TAG_LEN];
        let ct = encrypt_aead(
            Cipher::aes_256_gcm(),
            &key[..],
            Some(&nonce),
            &aad,
            plaintext,
            &mut tag,
        )
        .map_err(StoreError::Seal)?;
        let mut out = Vec::with_capacity(OVERHEAD + ct.len());
        out.push(ENVELOPE_VERSION);
        out.extend_from_slice(&key_id.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out.extend_from_slice(&tag);
        Ok(out)
    }

    pub(crate) fn open_raw(
        &self,
        domain: u8,
        context: &[u8],
        envelope: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        if envelope.len() < OVERHEAD {
            return Err(StoreError::Corrupt(format!(
                "envelope of {} bytes is shorter than the {OVERHEAD}-byte minimum",
                envelope.len()
            )));
        }
        let version = envelope[0];
        if version != ENVELOPE_VERSION {
            return Err(StoreError::Corrupt(format!(
                "envelope version {version} (expected {ENVELOPE_VERSION})"
            )));
        }
        let key_id = u32::from_be_bytes([envelope[1], envelope[2], envelope[3], envelope[4]]);
        let key = self.key(key_id).ok_or(StoreError::UnknownKey { key_id })?;
        let nonce = &envelope[5..HEADER_LEN];
        let (ct, tag) = envelope[HEADER_LEN..].split_at(envelope.len() - OVERHEAD);
        let aad = aad(key_id, domain, context);
        decrypt_aead(Cipher::aes_256_gcm(), key, Some(nonce), &aad, ct, tag)
            .map(Zeroizing::new)
            .map_err(|_| StoreError::Unauthentic { key_id })
    }
}

/// The key id an envelope names, if it is long enough to have one and of a known version.
pub fn envelope_key_id(envelope: &[u8]) -> Option<u32> {
    if envelope.len() < OVERHEAD || envelope[0] != ENVELOPE_VERSION {
        return None;
    }
    Some(u32::from_be_bytes([
        envelope[1],
        envelope[2],
        envelope[3],
        envelope[4],
    ]))
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("active_key_id", &self.active_key_id())
            .field("key_ids", &self.key_ids())
            .finish_non_exhaustive()
    }
}

fn aad(key_id: u32, domain: u8, context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(6 + context.len());
    aad.push(ENVELOPE_VERSION);
    aad.extend_from_slice(&key_id.to_be_bytes());
    aad.push(domain);
    aad.extend_from_slice(context);
    aad
}

/// `[expires_at_ms u64 BE][bytes]`, zeroized on drop.
pub(crate) fn encode_session(session: &StoredSession) -> Zeroizing<Vec<u8>> {
    let mut plain = Zeroizing::new(Vec::with_capacity(8 + session.len()));
    plain.extend_from_slice(&session.expires_at_millis().to_be_bytes());
    plain.extend_from_slice(session.data());
    plain
}

/// The inverse of [`encode_session`].
pub(crate) fn decode_session(plain: &[u8]) -> Result<StoredSession, StoreError> {
    if plain.len() < 8 {
        return Err(StoreError::Corrupt(format!(
            "sealed session of {} bytes has no expiry",
            plain.len()
        )));
    }
    let (exp, data) = plain.split_at(8);
    let mut e = [0u8; 8];
    e.copy_from_slice(exp);
    Ok(StoredSession::from_millis(
        data.to_vec(),
        u64::from_be_bytes(e),
    ))
}

fn parse_key_hex(hex: &str) -> Option<Zeroizing<[u8; KEY_LEN]>> {
    let hex = hex.as_bytes();
    if hex.len() != KEY_LEN * 2 {
        return None;
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        key[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
    }
    Some(key)
}

pub(crate) fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use proptest::prelude::*;

    use super::*;

    fn sid(b: &[u8]) -> SessionId {
        SessionId::new(b).unwrap()
    }

    #[test]
    fn seal_then_open_round_trips_and_layout_is_as_documented() {
        let ring = KeyRing::new(7, [0x11; 32]);
        let id = sid(b"abc");
        let env = ring.seal(&id, b"hello").unwrap();
        assert_eq!(env.len(), OVERHEAD + 5);
        assert_eq!(env[0], ENVELOPE_VERSION);
        assert_eq!(&env[1..5], &7u32.to_be_bytes());
        assert_eq!(envelope_key_id(&env), Some(7));
        assert_eq!(&ring.open(&id, &env).unwrap()[..], b"hello");
    }

    #[test]
    fn nonces_differ_per_value() {
        let ring = KeyRing::new(1, [0x22; 32]);
        let id = sid(b"x");
        let a = ring.seal(&id, b"same").unwrap();
        let b = ring.seal(&id, b"same").unwrap();
        assert_ne!(a[5..HEADER_LEN], b[5..HEADER_LEN]);
        assert_ne!(a, b);
    }

    #[test]
    fn every_single_byte_change_fails_to_open() {
        let ring = KeyRing::new(3, [0x33; 32]);
        let id = sid(b"id-1");
        let env = ring.seal(&id, b"session der bytes").unwrap();
        for i in 0..env.len() {
            let mut bad = env.clone();
            bad[i] ^= 0x01;
            let err = ring.open(&id, &bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::Corrupt(_)
                        | StoreError::UnknownKey { .. }
                        | StoreError::Unauthentic { .. }
                ),
                "byte {i}: {err:?}"
            );
        }
        for cut in 0..env.len() {
            assert!(ring.open(&id, &env[..cut]).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn moved_value_other_key_and_unknown_key_fail() {
        let ring = KeyRing::new(3, [0x33; 32]);
        let env = ring.seal(&sid(b"one"), b"data").unwrap();
        assert!(ring.open(&sid(b"two"), &env).is_err());
        // Same id, other key bytes.
        let other = KeyRing::new(3, [0x34; 32]);
        assert!(other.open(&sid(b"one"), &env).is_err());
        // Unknown key id.
        let unknown = KeyRing::new(4, [0x33; 32]);
        let err = unknown.open(&sid(b"one"), &env).unwrap_err();
        assert!(err.to_string().contains("unknown key id 3"), "{err}");
        // A snapshot trailer context is not a session context.
        let t = ring.seal_raw(DOMAIN_SNAPSHOT, b"one", b"data").unwrap();
        assert!(ring.open(&sid(b"one"), &t).is_err());
    }

    #[test]
    fn rotation_keeps_old_keys_opening_and_seals_with_the_new_one() {
        let old = KeyRing::new(1, [1; 32]);
        let id = sid(b"s");
        let before = old.seal(&id, b"old").unwrap();
        let ring = old.rotate(2, [2; 32]).unwrap();
        assert_eq!(ring.active_key_id(), 2);
        assert_eq!(&ring.open(&id, &before).unwrap()[..], b"old");
        let after = ring.seal(&id, b"new").unwrap();
        assert_eq!(envelope_key_id(&after), Some(2));
        assert!(ring.clone().rotate(1, [9; 32]).is_err());
        let ring = ring.with_retired_key(0, [0; 32]).unwrap();
        assert_eq!(ring.key_ids(), vec![1, 0, 2]);
        assert_eq!(ring.active_key_id(), 2);
    }

    #[test]
    fn session_round_trip_keeps_expiry() {
        let ring = KeyRing::generate().unwrap();
        let id = sid(&[9; 32]);
        let s = StoredSession::new(
            vec![5; 300],
            UNIX_EPOCH + Duration::from_millis(123_456_789),
        );
        let env = ring.seal_session(&id, &s).unwrap();
        assert_eq!(ring.open_session(&id, &env).unwrap(), s);
        let short = ring.seal(&id, b"1234567").unwrap();
        assert!(matches!(
            ring.open_session(&id, &short),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn key_file_parses_and_last_key_is_active() {
        let text = format!(
            "# keys\n\n1:{}\n 2 : {} \n",
            "ab".repeat(32),
            "CD".repeat(32)
        );
        let ring = KeyRing::parse(&text).unwrap();
        assert_eq!(ring.key_ids(), vec![1, 2]);
        assert_eq!(ring.active_key_id(), 2);
        let again = KeyRing::parse(&ring.to_file_string()).unwrap();
        let id = sid(b"q");
        assert_eq!(
            &again.open(&id, &ring.seal(&id, b"z").unwrap()).unwrap()[..],
            b"z"
        );
    }

    #[test]
    fn bad_key_files_are_refused_with_the_line() {
        let cases = [
            ("", "no key"),
            ("# only a comment\n", "no key"),
            ("1\n", "line 1: expected ID:HEX"),
            (&format!("x:{}", "00".repeat(32)), "line 1: key id"),
            (&format!("-1:{}", "00".repeat(32)), "line 1: key id"),
            ("1:abcd\n", "line 1: key 1 is not 64 hex digits"),
            (&format!("1:{}zz", "00".repeat(31)), "not 64 hex digits"),
            (
                &format!("1:{}\n1:{}\n", "00".repeat(32), "11".repeat(32)),
                "line 2: key id 1 appears twice",
            ),
        ];
        for (text, want) in cases {
            let err = KeyRing::parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn key_file_errors_name_the_file_and_write_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.keys");
        fs::write(&bad, "1:00\n").unwrap();
        let err = KeyRing::from_file(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.keys") && err.contains("line 1"), "{err}");
        assert!(matches!(
            KeyRing::from_file(dir.path().join("missing")),
            Err(Error::ReadFile {
                kind: FileKind::KeyFile,
                ..
            })
        ));
        let ring = KeyRing::generate().unwrap().rotate(5, [5; 32]).unwrap();
        let good = dir.path().join("good.keys");
        ring.write_file(&good).unwrap();
        let read = KeyRing::from_file(&good).unwrap();
        assert_eq!(read.key_ids(), ring.key_ids());
        assert!(
            ring.write_file(&good).is_err(),
            "an existing file is not replaced"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&good).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}");
        }
    }

    #[test]
    fn debug_never_prints_keys() {
        let ring = KeyRing::new(42, [0xab; 32]);
        let dbg = format!("{ring:?}");
        assert!(dbg.contains("42"), "{dbg}");
        assert!(!dbg.to_lowercase().contains("abab"), "{dbg}");
        assert!(!dbg.contains("171"), "{dbg}");
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_and_never_open(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let ring = KeyRing::new(1, [7; 32]);
            let id = sid(b"p");
            prop_assert!(ring.open(&id, &bytes).is_err());
            prop_assert!(ring.open_session(&id, &bytes).is_err());
            let named = (bytes.len() >= OVERHEAD && bytes[0] == ENVELOPE_VERSION)
                .then(|| u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]));
            prop_assert_eq!(envelope_key_id(&bytes), named);
        }

        #[test]
        fn random_header_with_valid_version_and_key_never_opens(
            body in proptest::collection::vec(any::<u8>(), 0..100)
        ) {
            let ring = KeyRing::new(1, [7; 32]);
            let mut env = vec![ENVELOPE_VERSION, 0, 0, 0, 1];
            env.extend_from_slice(&body);
            prop_assert!(ring.open(&sid(b"p"), &env).is_err());
        }

        #[test]
        fn any_flipped_bit_fails(plain in proptest::collection::vec(any::<u8>(), 0..64), pos in any::<usize>(), bit in 0u8..8) {
            let ring = KeyRing::new(9, [3; 32]);
            let id = sid(b"flip");
            let mut env = ring.seal(&id, &plain).unwrap();
            let i = pos % env.len();
            env[i] ^= 1 << bit;
            prop_assert!(ring.open(&id, &env).is_err());
        }
    }
}
