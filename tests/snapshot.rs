//! Encrypted snapshots of a store: round trip, expiry on load, refusal of bad files, recency
//! kept across a reload; and hostile files at the snapshot and key file paths (FIFOs, devices,
//! symbolic links, huge files, planted temporary files, a crash mid-write).

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openssl_session_cache::snapshot::{load_snapshot, save_snapshot};
use openssl_session_cache::{
    Error, FileKind, KeyRing, MemoryStore, SessionId, SessionStore, SessionStoreAdmin,
    StoredSession,
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
        matches!(
            err,
            Error::InvalidFile {
                kind: FileKind::Snapshot,
                ..
            } | Error::RefusedFile {
                kind: FileKind::Snapshot,
                ..
            }
        ),
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
    let mut compared = 0;
    original
        .for_each(&mut |i, s| {
            assert_eq!(restored.get(i).unwrap().as_ref(), Some(s));
            compared += 1;
        })
        .unwrap();
    assert_eq!(compared, 10);
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
        Err(Error::ReadFile {
            kind: FileKind::Snapshot,
            source,
            ..
        }) => assert_eq!(source.kind(), std::io::ErrorKind::NotFound),
        other => panic!("{other:?}"),
    }
}

/// Runs `f` on a thread of its own and waits for it at most 30 s, so that a call that blocks
/// (opening a FIFO for reading waits for a writer) fails the test instead of hanging it.
fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the call blocked for 30 s")
}

/// Bytes the calling thread has read through `read`-like system calls (`rchar`), from
/// `/proc/thread-self/io`.
fn thread_read_bytes() -> u64 {
    let io = fs::read_to_string("/proc/thread-self/io").expect("/proc/thread-self/io");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("an rchar line")
}

/// [`within`], and how many bytes `f` read (its thread's `rchar`; reading the counter itself
/// costs a few hundred).
fn within_reading<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> (T, u64) {
    within(move || {
        let before = thread_read_bytes();
        let out = f();
        (out, thread_read_bytes() - before)
    })
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

fn symlink(target: &Path, link: &Path) {
    std::os::unix::fs::symlink(target, link).unwrap();
}

/// Loads `path` on a thread of its own (see [`within`]); the load must be refused as corrupt
/// and insert nothing. Returns the message.
fn refused_quickly(path: PathBuf) -> String {
    within(move || refused(&path, &ring()))
}

#[test]
fn a_fifo_at_the_snapshot_path_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions.snap");
    mkfifo(&path);
    let msg = refused_quickly(path);
    assert!(msg.contains("not a regular file"), "{msg}");
}

#[test]
fn a_symlink_to_dev_zero_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions.snap");
    symlink(Path::new("/dev/zero"), &path);
    let msg = refused_quickly(path);
    assert!(msg.contains("symbolic link"), "{msg}");
    // The device itself, named directly: not a regular file either.
    let msg = refused_quickly(PathBuf::from("/dev/zero"));
    assert!(msg.contains("not a regular file"), "{msg}");
}

#[test]
fn a_symlink_to_a_valid_snapshot_is_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let real = save(dir.path());
    let link = dir.path().join("link.snap");
    symlink(&real, &link);
    let msg = refused_quickly(link.clone());
    assert!(msg.contains("symbolic link"), "{msg}");
    // A caller can tell the refused path from a corrupt snapshot, and knows which path.
    let store = MemoryStore::builder().build().unwrap();
    match load_snapshot(&store, &link, &ring(), t0()) {
        Err(Error::RefusedFile {
            kind: FileKind::Snapshot,
            path,
            ..
        }) => assert_eq!(path, link),
        other => panic!("{other:?}"),
    }
    // The file itself loads.
    let store = MemoryStore::builder().build().unwrap();
    assert_eq!(load_snapshot(&store, &real, &ring(), t0()).unwrap(), 10);
}

#[test]
fn a_directory_or_a_huge_sparse_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let msg = refused_quickly(dir.path().to_path_buf());
    assert!(msg.contains("not a regular file"), "{msg}");
    let huge = dir.path().join("huge.snap");
    fs::File::create(&huge)
        .unwrap()
        .set_len(openssl_session_cache::snapshot::MAX_SNAPSHOT_BYTES + 1)
        .unwrap();
    let (msg, read) = within_reading(move || refused(&huge, &ring()));
    assert!(msg.contains("over the"), "{msg}");
    assert!(
        read < 64 << 10,
        "read {read} bytes of a file it refused for its size"
    );
}

/// Before, the temporary file was `.NAME.tmp-PID`, opened with `O_CREAT|O_TRUNC` through
/// symbolic links: a link planted there made the save overwrite the link's target.
#[test]
fn a_planted_symlink_is_never_written_through() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    let path = dir.path().join("sessions.snap");
    let predictable = dir
        .path()
        .join(format!(".sessions.snap.tmp-{}", std::process::id()));
    symlink(&victim, &predictable);
    assert_eq!(save_snapshot(&filled(), &path, &ring(), t0()).unwrap(), 10);
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    assert!(fs::symlink_metadata(&predictable)
        .unwrap()
        .file_type()
        .is_symlink());
    let store = MemoryStore::builder().build().unwrap();
    assert_eq!(load_snapshot(&store, &path, &ring(), t0()).unwrap(), 10);

    // A link at the snapshot path itself is replaced by the new snapshot, not written through.
    fs::remove_file(&path).unwrap();
    symlink(&victim, &path);
    assert_eq!(save_snapshot(&filled(), &path, &ring(), t0()).unwrap(), 10);
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    assert!(fs::symlink_metadata(&path).unwrap().file_type().is_file());
    let store = MemoryStore::builder().build().unwrap();
    assert_eq!(load_snapshot(&store, &path, &ring(), t0()).unwrap(), 10);
}

/// One system call of a save, from strace's record of the saving thread.
#[derive(Debug)]
enum Call {
    Open {
        path: String,
        flags: String,
        mode: Option<String>,
    },
    Sync {
        path: String,
    },
    Rename {
        from: String,
        to: String,
    },
}

/// The quoted strings of an strace line, in order.
fn quoted(line: &str) -> Vec<String> {
    line.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The calls of one thread's strace record (`strace -ff`: one file per thread, so no line is
/// split by another thread's), with each descriptor resolved to the path it was opened at.
fn calls(trace: &str) -> Vec<Call> {
    let mut fds: std::collections::HashMap<String, String> = Default::default();
    let mut out = Vec::new();
    for line in trace.lines() {
        let result = line.rsplit_once(" = ").map(|(_, r)| r.trim().to_owned());
        let ok = result.as_deref().is_some_and(|r| !r.starts_with('-'));
        let args = line
            .split_once('(')
            .and_then(|(_, a)| a.rsplit_once(')'))
            .map(|(a, _)| a)
            .unwrap_or("");
        if line.starts_with("openat(") && ok {
            let path = quoted(line).remove(0);
            let parts: Vec<&str> = args.rsplitn(3, ", ").collect();
            let (flags, mode) = if parts[0].starts_with('0') {
                (parts[1].to_owned(), Some(parts[0].to_owned()))
            } else {
                (parts[0].to_owned(), None)
            };
            fds.insert(result.unwrap(), path.clone());
            out.push(Call::Open { path, flags, mode });
        } else if (line.starts_with("fsync(") || line.starts_with("fdatasync(")) && ok {
            if let Some(path) = fds.get(args.trim()) {
                out.push(Call::Sync { path: path.clone() });
            }
        } else if line.starts_with("close(") {
            fds.remove(args.trim());
        } else if line.starts_with("rename") && ok {
            let q = quoted(line);
            out.push(Call::Rename {
                from: q[0].clone(),
                to: q[1].clone(),
            });
        }
    }
    out
}

/// Runs the child under strace and checks each of its two saves: the temporary file is
/// created exclusively (`O_CREAT|O_EXCL`), mode 0600, beside the target under a random name
/// (`.NAME.XXXXXX.tmp`, another one each time, no PID in it), synced before it is renamed over
/// the target, and the directory is synced after the rename.
fn saves_under_strace(name: &str) {
    let traces = tempfile::tempdir().unwrap();
    let prefix = traces.path().join("trace");
    let prefix = prefix.to_str().unwrap();
    let run = support::child::run_child(
        name,
        &[
            "strace",
            "-ff",
            "-qq",
            "-s",
            "4096",
            "-e",
            "trace=openat,fsync,fdatasync,close,rename,renameat,renameat2",
            "-o",
            prefix,
        ],
        support::child::CHILD_LIMIT,
    );
    assert!(
        !run.stderr.contains("strace: ") || run.status.success(),
        "strace could not run the child (strace is needed: `apt-get install strace`):\n{}",
        run.stderr
    );
    support::child::assert_ran_one(name, &run);
    let dir = run
        .stdout
        .lines()
        .find_map(|l| l.split_once("snapshot dir: ").map(|(_, d)| d))
        .expect("the child names its directory")
        .to_owned();
    let pid = run
        .stdout
        .lines()
        .find_map(|l| l.split_once("snapshot pid: ").map(|(_, p)| p))
        .expect("the child prints its pid")
        .to_owned();
    let target = format!("{dir}/sessions.snap");
    let saving: Vec<Call> = fs::read_dir(traces.path())
        .unwrap()
        .map(|e| fs::read_to_string(e.unwrap().path()).unwrap())
        .filter(|t| t.contains(&target))
        .flat_map(|t| calls(&t))
        .collect();
    let temporaries: Vec<usize> = saving
        .iter()
        .enumerate()
        .filter(|(_, c)| matches!(c, Call::Open { path, .. } if path.starts_with(&format!("{dir}/.sessions.snap."))))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        temporaries.len(),
        2,
        "two saves, two temporaries: {saving:#?}"
    );
    let mut names = Vec::new();
    for &at in &temporaries {
        let Call::Open { path, flags, mode } = &saving[at] else {
            unreachable!()
        };
        assert!(
            flags.contains("O_CREAT") && flags.contains("O_EXCL"),
            "{path} opened with {flags}"
        );
        assert_eq!(mode.as_deref(), Some("0600"), "{path}");
        let random = path
            .strip_prefix(&format!("{dir}/.sessions.snap."))
            .and_then(|r| r.strip_suffix(".tmp"))
            .unwrap_or_else(|| panic!("{path} is not .sessions.snap.XXXXXX.tmp"));
        assert!(
            random.len() >= 6 && random.chars().all(|c| c.is_ascii_alphanumeric()),
            "{path}: no random part"
        );
        assert!(!random.contains(&pid), "{path} holds the process id {pid}");
        let rest = &saving[at + 1..];
        let renamed = rest
            .iter()
            .position(|c| matches!(c, Call::Rename { from, to } if from == path && *to == target))
            .unwrap_or_else(|| panic!("{path} was never renamed over {target}: {rest:#?}"));
        assert!(
            rest[..renamed]
                .iter()
                .any(|c| matches!(c, Call::Sync { path: p } if p == path)),
            "{path} was not synced before its rename: {rest:#?}"
        );
        assert!(
            rest[renamed..]
                .iter()
                .any(|c| matches!(c, Call::Sync { path: p } if *p == dir)),
            "the directory was not synced after the rename of {path}: {rest:#?}"
        );
        names.push(path.clone());
    }
    assert_ne!(names[0], names[1], "two saves used the same temporary name");
}

isolated_test! {
    parent: saves_under_strace;
    /// What `saves_under_strace` checks, from outside: the child saves twice.
    fn the_temporary_file_is_random_exclusive_private_and_synced_with_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        println!("snapshot dir: {}", dir.path().display());
        println!("snapshot pid: {}", std::process::id());
        let path = dir.path().join("sessions.snap");
        for _ in 0..2 {
            assert_eq!(save_snapshot(&filled(), &path, &ring(), t0()).unwrap(), 10);
        }
        let store = MemoryStore::builder().build().unwrap();
        assert_eq!(load_snapshot(&store, &path, &ring(), t0()).unwrap(), 10);
    }
}

/// A crash mid-write leaves a partial temporary file beside the snapshot (a process killed
/// before its rename), never a partial snapshot: the previous one still loads, and the next
/// save works around the leftover.
#[test]
fn a_crash_mid_write_leaves_the_previous_snapshot_loadable() {
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path());
    let previous = fs::read(&path).unwrap();
    let half = &previous[..previous.len() / 2];
    for name in [".sessions.snap.a1b2c3.tmp", ".sessions.snap.tmp-1"] {
        fs::write(dir.path().join(name), half).unwrap();
    }
    let store = MemoryStore::builder().build().unwrap();
    assert_eq!(load_snapshot(&store, &path, &ring(), t0()).unwrap(), 10);
    // The next save replaces the snapshot and leaves the leftovers alone.
    let empty = MemoryStore::builder().build().unwrap();
    assert_eq!(save_snapshot(&empty, &path, &ring(), t0()).unwrap(), 0);
    let store = MemoryStore::builder().build().unwrap();
    assert_eq!(load_snapshot(&store, &path, &ring(), t0()).unwrap(), 0);
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3);
    // A snapshot cut short (a copy interrupted by hand) is refused, not half loaded.
    fs::write(&path, half).unwrap();
    assert!(refused(&path, &ring()).contains("truncated"));
}

#[test]
fn the_snapshot_is_private_and_in_a_new_inode() {
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path());
    use std::os::unix::fs::MetadataExt;
    let before = fs::metadata(&path).unwrap();
    assert_eq!(before.mode() & 0o777, 0o600);
    save(dir.path());
    let after = fs::metadata(&path).unwrap();
    assert_ne!(
        before.ino(),
        after.ino(),
        "replaced by rename, not rewritten in place"
    );
    assert_eq!(after.mode() & 0o777, 0o600);
}

/// The recently used sessions are saved last, so a reload into a smaller store, or a reload
/// followed by new sessions, evicts the cold ones first.
#[test]
fn a_reload_keeps_the_recency_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions.snap");
    let store = MemoryStore::builder().shards(1).build().unwrap();
    for i in 0..10 {
        store
            .put(
                id(i),
                StoredSession::new(vec![1; 50], t0() + Duration::from_secs(60)),
            )
            .unwrap();
    }
    // Hot: 0, 1, 2 (touched most recently, in that order).
    for i in 0..3 {
        assert!(store.get(&id(i)).unwrap().is_some());
    }
    assert_eq!(save_snapshot(&store, &path, &ring(), t0()).unwrap(), 10);

    let small = MemoryStore::builder()
        .max_entries(4)
        .shards(1)
        .build()
        .unwrap();
    assert_eq!(load_snapshot(&small, &path, &ring(), t0()).unwrap(), 10);
    let kept: Vec<u32> = (0..10).filter(|&i| small.contains(&id(i))).collect();
    assert_eq!(kept, [0, 1, 2, 9]);

    let same = MemoryStore::builder()
        .max_entries(10)
        .shards(1)
        .build()
        .unwrap();
    load_snapshot(&same, &path, &ring(), t0()).unwrap();
    for i in 100..107 {
        same.put(
            id(i),
            StoredSession::new(vec![1; 50], t0() + Duration::from_secs(60)),
        )
        .unwrap();
    }
    let kept: Vec<u32> = (0..10).filter(|&i| same.contains(&id(i))).collect();
    assert_eq!(kept, [0, 1, 2]);
}

/// With many shards the order is kept per shard and interleaved in proportion: the hot tenth
/// of a large store all survives a reload into a store a quarter of its size.
#[test]
fn a_reload_of_a_sharded_store_keeps_the_hot_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions.snap");
    let store = MemoryStore::builder().max_entries(40_000).build().unwrap();
    assert!(store.shard_count() > 1);
    let exp = t0() + Duration::from_secs(60);
    for i in 0..20_000 {
        store
            .put(id(i), StoredSession::new(vec![1; 20], exp))
            .unwrap();
    }
    let hot: Vec<u32> = (0..20_000).step_by(10).collect();
    for &i in &hot {
        assert!(store.get(&id(i)).unwrap().is_some());
    }
    assert_eq!(save_snapshot(&store, &path, &ring(), t0()).unwrap(), 20_000);
    let small = MemoryStore::builder().max_entries(5_000).build().unwrap();
    assert!(small.shard_count() > 1);
    load_snapshot(&small, &path, &ring(), t0()).unwrap();
    let lost = hot.iter().filter(|&&i| !small.contains(&id(i))).count();
    assert_eq!(lost, 0, "hot sessions evicted on reload");
}

/// A session larger than the target store's byte bound is skipped; the rest load.
#[test]
fn a_reload_skips_sessions_too_large_for_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = save(dir.path());
    let small = MemoryStore::builder().max_bytes(105).build().unwrap();
    // Sessions 0..=5 are 100..=105 bytes: each fits alone, and each evicts the one before.
    assert_eq!(load_snapshot(&small, &path, &ring(), t0()).unwrap(), 6);
    assert_eq!(small.len().unwrap(), 1);
}

#[test]
fn a_key_file_that_is_a_fifo_or_a_device_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("session.keys");
    mkfifo(&fifo);
    let err = within(move || KeyRing::from_file(fifo).unwrap_err().to_string());
    assert!(
        err.contains("session.keys") && err.contains("not a regular file"),
        "{err}"
    );
    for path in [PathBuf::from("/dev/zero"), dir.path().join("zero.keys")] {
        if path.starts_with(dir.path()) {
            symlink(Path::new("/dev/zero"), &path);
        }
        let err = within(move || KeyRing::from_file(path).unwrap_err().to_string());
        assert!(err.contains("not a regular file"), "{err}");
    }
}

#[test]
fn a_huge_key_file_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let huge = dir.path().join("session.keys");
    let f = fs::File::create(&huge).unwrap();
    f.set_len(1 << 30).unwrap();
    let (err, read) = within_reading(move || KeyRing::from_file(huge).unwrap_err().to_string());
    assert!(
        err.contains("session.keys") && err.contains("over the"),
        "{err}"
    );
    assert!(
        read < 64 << 10,
        "read {read} bytes of a key file it refused for its size"
    );
}

/// A key file reached through a symbolic link (a Kubernetes secret volume, an `alternatives`
/// link) is read: the link is followed, and what it leads to must be a regular file.
#[test]
fn a_key_file_behind_a_symlink_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.keys");
    ring().write_file(&real).unwrap();
    let link = dir.path().join("session.keys");
    symlink(&real, &link);
    assert_eq!(KeyRing::from_file(&link).unwrap().key_ids(), vec![1]);
}
