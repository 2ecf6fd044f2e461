//! The crate's own files (snapshots, key files), read and written safely next to local users
//! who may plant things at their paths.
//!
//! Reading opens without blocking (`O_NONBLOCK`: a FIFO opens at once instead of waiting for a
//! writer), optionally without following a symbolic link at the last component (`O_NOFOLLOW`),
//! then checks what was opened, on the descriptor (`fstat`), not on the path: only a regular
//! file is read, and never more than a bound, whatever its size claimed. Writing goes through
//! an exclusively created (`O_EXCL`), randomly named temporary file in the target's directory
//! (`tempfile`'s `NamedTempFile`), which is synced, renamed over the target, and whose
//! directory is synced: a crash leaves the old file or the new one, never a mix, and a link
//! planted at any name is never written through.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::Path;

use zeroize::Zeroizing;

use crate::error::{Error, FileKind};

/// Why a file was not read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// Opening or reading failed (`NotFound` when there is no file).
    Io(io::Error),
    /// The path names something that is not to be read; the text says what.
    Refused(String),
}

impl ReadError {
    /// The crate's error for reading the `kind` file at `path`.
    pub(crate) fn into_error(self, kind: FileKind, path: &Path) -> Error {
        let path = path.to_path_buf();
        match self {
            Self::Io(source) => Error::ReadFile { kind, path, source },
            Self::Refused(reason) => Error::RefusedFile { kind, path, reason },
        }
    }
}

/// Whether a symbolic link at the last component of a path is followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Links {
    /// Followed (the file it leads to must still be a regular file).
    Follow,
    /// Refused.
    Refuse,
}

/// Reads the regular file at `path`, at most `max` bytes, into memory that is wiped when
/// dropped. Returns its bytes and its metadata (from the open descriptor).
///
/// A FIFO, socket, device or directory is refused without blocking and without reading; so is
/// a file larger than `max`, by its size before reading and by counting while reading (a file
/// that grows is never read past `max + 1` bytes).
pub(crate) fn read_regular(
    path: &Path,
    max: u64,
    links: Links,
) -> Result<(Zeroizing<Vec<u8>>, fs::Metadata), ReadError> {
    let mut opts = OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut flags = libc::O_NONBLOCK;
        if links == Links::Refuse {
            flags |= libc::O_NOFOLLOW;
        }
        opts.custom_flags(flags);
    }
    let mut file = opts.open(path).map_err(|e| {
        #[cfg(unix)]
        if links == Links::Refuse && e.raw_os_error() == Some(libc::ELOOP) {
            return ReadError::Refused("it is a symbolic link, which is not followed".into());
        }
        ReadError::Io(e)
    })?;
    let meta = file.metadata().map_err(ReadError::Io)?;
    if !meta.is_file() {
        return Err(ReadError::Refused(format!(
            "not a regular file ({})",
            describe(&meta.file_type())
        )));
    }
    let over = |size: u64| ReadError::Refused(format!("{size} bytes is over the {max}-byte limit"));
    if meta.len() > max {
        return Err(over(meta.len()));
    }
    let cap = usize::try_from(max.saturating_add(1)).unwrap_or(usize::MAX);
    // The size is a hint: start there (plus one byte, to see the end), grow if the file grew.
    let hint = usize::try_from(meta.len()).unwrap_or(usize::MAX);
    let mut buf = Zeroizing::new(vec![0u8; hint.saturating_add(1).min(cap)]);
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            if filled >= cap {
                return Err(over(filled as u64));
            }
            // Grow by copying into a new buffer: the old one is wiped when it drops.
            let mut bigger = Zeroizing::new(vec![0u8; filled.saturating_mul(2).clamp(1, cap)]);
            bigger[..filled].copy_from_slice(&buf[..filled]);
            buf = bigger;
        }
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    buf.truncate(filled);
    Ok((buf, meta))
}

fn describe(t: &fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "an unknown kind"
    }
}

/// Replaces the file at `path` with `bytes`, atomically and durably, readable by the owner
/// only (see the module docs). An error leaves the old file in place and no temporary file
/// behind.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomically_with(path, |f| io::Write::write_all(f, bytes))
}

/// [`write_atomically`], with the contents written by `write`.
pub(crate) fn write_atomically_with(
    path: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no file name", path.display()),
        )
    })?;
    let prefix = format!(".{}.", name.to_string_lossy());
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(fs::Permissions::from_mode(0o600));
    }
    // Created with O_CREAT | O_EXCL under a random name: a planted file or link makes the
    // creation fail (and retry under another name), never writes through. Dropped on error,
    // which deletes it.
    let mut tmp = builder.tempfile_in(dir)?;
    write(tmp.as_file_mut())?;
    tmp.as_file().sync_all()?;
    // rename(2): replaces a link at `path` itself, never follows it.
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
}

/// Deletes the file at `path` and makes the deletion durable (the directory synced), so that it
/// cannot come back after a crash.
#[cfg(feature = "server")]
pub(crate) fn remove_durably(path: &Path) -> io::Result<()> {
    fs::remove_file(path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    sync_dir(dir)
}

/// Makes a rename in `dir` durable. A file system that cannot sync directories says so with
/// `EINVAL`; the rename stands then, as durable as that file system makes it.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        match File::open(dir).and_then(|d| d.sync_all()) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            other => other,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn reads_a_regular_file_up_to_the_bound_and_refuses_one_byte_more() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, [7u8; 100]).unwrap();
        let (bytes, meta) = read_regular(&p, 100, Links::Refuse).unwrap();
        assert_eq!(&bytes[..], &[7u8; 100][..]);
        assert_eq!(meta.len(), 100);
        match read_regular(&p, 99, Links::Follow) {
            Err(ReadError::Refused(why)) => assert!(why.contains("100 bytes"), "{why}"),
            other => panic!("{other:?}"),
        }
        fs::write(&p, b"").unwrap();
        assert!(read_regular(&p, 0, Links::Refuse).unwrap().0.is_empty());
        match read_regular(&dir.path().join("none"), 10, Links::Refuse) {
            Err(ReadError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::NotFound),
            other => panic!("{other:?}"),
        }
    }

    /// `/proc` files claim a size of 0 and have more: the read is bounded by counting.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_file_longer_than_its_size_says_is_read_only_to_the_bound() {
        let p = Path::new("/proc/self/status");
        let (all, meta) = read_regular(p, 1 << 20, Links::Follow).unwrap();
        assert_eq!(meta.len(), 0);
        assert!(all.len() > 100, "{}", all.len());
        match read_regular(p, 50, Links::Follow) {
            Err(ReadError::Refused(why)) => assert!(why.contains("51 bytes"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[cfg(unix)]
    #[test]
    fn links_are_refused_or_followed_as_asked() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::write(&real, b"data").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(
            &read_regular(&link, 10, Links::Follow).unwrap().0[..],
            b"data"
        );
        match read_regular(&link, 10, Links::Refuse) {
            Err(ReadError::Refused(why)) => assert!(why.contains("symbolic link"), "{why}"),
            other => panic!("{other:?}"),
        }
        std::os::unix::fs::symlink("/dev/null", dir.path().join("null")).unwrap();
        match read_regular(&dir.path().join("null"), 10, Links::Follow) {
            Err(ReadError::Refused(why)) => assert!(why.contains("character device"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_write_that_fails_midway_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("snap");
        write_atomically(&p, b"old contents").unwrap();
        let err = write_atomically_with(&p, |f| {
            f.write_all(b"new con")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "disk full");
        assert_eq!(fs::read(&p).unwrap(), b"old contents");
        assert_eq!(names(dir.path()), ["snap"]);
        write_atomically(&p, b"new contents").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new contents");
        assert_eq!(names(dir.path()), ["snap"]);
    }

    #[test]
    fn a_path_without_a_file_name_is_an_error() {
        assert_eq!(
            write_atomically(Path::new("/"), b"x").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
