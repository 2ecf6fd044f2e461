//! Encrypted snapshots of a store: round trip, expiry on load, and refusal of bad files.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openssl_session_cache::{
    load_snapshot, save_snapshot, Error, KeyRing, MemoryStore, SessionId, SessionStore,
    SessionStoreAdmin, StoreError, StoredSession,
};

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn id(i: u32) -> SessionId {
    SessionId::new(&i.to_be_bytes()).unwrap()
}

/// A store with 10 sessions: even ones live for an hour, odd ones for 10 seconds.
fn filled() -> MemoryStore {
    let store = MemoryStore::builder().build().unwrap();
    for i in 0..10u32 {
        let ttl = if i % 2 == 0 { 3600 } else { 10 };
        let data = vec![i as u8; 100 + i as usize];
        store
            .put(
                id(i),
                StoredSession::new(data, t0() + Duration::from_secs(ttl)),
            )
            .unwrap();
    }
    store
}

fn ring() -> KeyRing {
    KeyRing::new(1, [0x42; 32])
}

fn save(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("sessions.snap");
    assert_eq!(save_snapshot(&filled(), &path, &ring(), t0()).unwrap(), 10);
    path
}

fn refused(path: &Path, ring: &KeyRing) -> String {
    let store = MemoryStore::builder().build().unwrap();
    let err = load_snapshot(&store, path, ring, t0()).unwrap_err();
    assert!(
        matches!(err, Error::Store(StoreError::Corrupt(_))),
        "{err:?}"
    );
    assert_eq!(store.len().unwrap(), 0, "a refused snapshot loads nothing");
    err.to_string()
}

#[test]
fn round_trip_restores_every_session() {
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path());
    let original = filled();
    let restored = MemoryStore::builder().build().unwrap();
    assert_eq!(load_snapshot(&restored, &path, &ring(), t0()).unwrap(), 10);
    original
        .for_each(&mut |i, s| assert_eq!(restored.get(i).unwrap().as_ref(), Some(s)))
        .unwrap();
    // The file holds no session bytes in the clear and is private.
    let bytes = fs::read(&path).unwrap();
    assert!(!bytes.windows(100).any(|w| w.iter().all(|b| *b == 4)));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o077, 0);
    }
}

#[test]
fn expired_sessions_are_not_saved_and_dropped_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path());
    let later = t0() + Duration::from_secs(60);
    let restored = MemoryStore::builder().build().unwrap();
    assert_eq!(load_snapshot(&restored, &path, &ring(), later).unwrap(), 5);
    for i in 0..10 {
        assert_eq!(
            restored.get(&id(i)).unwrap().is_some(),
            i % 2 == 0,
            "id {i}"
        );
    }
    // Saving at `later` skips the expired ones.
    let p2 = dir.path().join("later.snap");
    assert_eq!(save_snapshot(&filled(), &p2, &ring(), later).unwrap(), 5);
}

#[test]
fn saving_replaces_the_old_snapshot_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path());
    let empty = MemoryStore::builder().build().unwrap();
    assert_eq!(save_snapshot(&empty, &path, &ring(), t0()).unwrap(), 0);
    let restored = MemoryStore::builder().build().unwrap();
    assert_eq!(load_snapshot(&restored, &path, &ring(), t0()).unwrap(), 0);
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    // A directory that does not exist: an error, not a panic.
    assert!(matches!(
        save_snapshot(&empty, dir.path().join("no/such/dir/x"), &ring(), t0()),
        Err(Error::Io(_))
    ));
}

#[test]
fn truncated_snapshots_are_refused_at_every_length() {
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path());
    let full = fs::read(&path).unwrap();
    let cut = dir.path().join("cut.snap");
    for len in (0..full.len()).step_by(7).chain([full.len() - 1]) {
        fs::write(&cut, &full[..len]).unwrap();
        let msg = refused(&cut, &ring());
        assert!(msg.contains("cut.snap") && msg.contains("refused"), "{msg}");
    }
    fs::write(&cut, &full[..full.len() - 10]).unwrap();
    assert!(refused(&cut, &ring()).contains("truncated"));
    // Extra bytes after the trailer are refused too.
    let mut long = full.clone();
    long.extend_from_slice(b"x");
    fs::write(&cut, &long).unwrap();
    refused(&cut, &ring());
}

#[test]
fn corrupt_snapshots_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path());
    let full = fs::read(&path).unwrap();
    let bad = dir.path().join("bad.snap");
    for i in (0..full.len()).step_by(13) {
        let mut b = full.clone();
        b[i] ^= 0x01;
        fs::write(&bad, &b).unwrap();
        refused(&bad, &ring());
    }
    fs::write(&bad, b"this is not a snapshot at all").unwrap();
    assert!(refused(&bad, &ring()).contains("not a session snapshot"));
}

#[test]
fn foreign_snapshots_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path());
    // Another key id.
    let msg = refused(&path, &KeyRing::new(2, [0x42; 32]));
    assert!(msg.contains("key id 1") && msg.contains("foreign"), "{msg}");
    // Same key id, another key.
    let msg = refused(&path, &KeyRing::new(1, [0x43; 32]));
    assert!(msg.contains("authentication"), "{msg}");
    // After a rotation the old snapshot still loads.
    let rotated = ring().rotate(2, [0x99; 32]).unwrap();
    let store = MemoryStore::builder().build().unwrap();
    assert_eq!(load_snapshot(&store, &path, &rotated, t0()).unwrap(), 10);
}

#[test]
fn a_missing_snapshot_is_an_io_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryStore::builder().build().unwrap();
    match load_snapshot(&store, dir.path().join("none"), &ring(), t0()) {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
        other => panic!("{other:?}"),
    }
}
