//! File operations on host directories: atomic writes (temp file in the same directory, fsync,
//! rename), stale temp cleanup, bounded reads of regular files only, and errors that say what
//! to do about them.
use std::fs;
use std::io::Read as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Largest CNI config or token we read (a bigger file is reported, not read).
pub const MAX_READ: u64 = 4 << 20;

/// Temp file prefix, as Istio's `AtomicWrite` names them: `<name>.tmp.<random>`.
fn temp_prefix(target: &Path) -> String {
    format!(
        "{}.tmp.",
        target
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    )
}

/// Whether `path` names a temp file of an atomic write (`<name>.tmp.<random>`, Istio's and
/// ours): its creation and removal change nothing that a pass would act on.
pub fn is_temp_file(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().contains(".tmp."))
}

fn temp_path(target: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!(
        "{}{}{:x}{:x}",
        temp_prefix(target),
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    );
    target.with_file_name(name)
}

/// Why an atomic write or copy did not replace the target (the target is unchanged).
#[derive(Debug, thiserror::Error)]
pub enum FileWriteError {
    /// The copy's source could not be read.
    #[error("cannot read {}: {source}", path.display())]
    ReadSource {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// Said as [`describe_write_error`] says it (read-only mounts, permissions, ...).
    #[error("{}", describe_write_error(target, source))]
    Write {
        target: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Writes `data` to `target` atomically with `mode`: readers see the old or the new file,
/// never a partial one, even if this process is killed.
pub fn atomic_write(target: &Path, data: &[u8], mode: u32) -> Result<(), FileWriteError> {
    atomic_write_from(target, &mut &data[..], mode)
}

/// [`atomic_write`] from a reader (streams: a large binary is never held in memory).
pub fn atomic_write_from(
    target: &Path,
    data: &mut dyn std::io::Read,
    mode: u32,
) -> Result<(), FileWriteError> {
    let tmp = temp_path(target);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have cleared bits of `mode`.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        std::io::copy(data, &mut f)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, target)?;
        sync_dir(target);
        Ok(())
    })();
    result.map_err(|source: std::io::Error| {
        let _ = fs::remove_file(&tmp);
        FileWriteError::Write {
            target: target.to_path_buf(),
            source,
        }
    })
}

/// Copies `src` to `target` atomically, with the source's mode.
pub fn atomic_copy(src: &Path, target: &Path) -> Result<(), FileWriteError> {
    let read_source = |source| FileWriteError::ReadSource {
        path: src.to_path_buf(),
        source,
    };
    let mut f = fs::File::open(src).map_err(read_source)?;
    let mode = f.metadata().map_err(read_source)?.permissions().mode() & 0o7777;
    atomic_write_from(target, &mut f, mode)
}

/// Whether two files have the same bytes, compared in chunks.
pub fn same_content(a: &Path, b: &Path) -> bool {
    let (Ok(fa), Ok(fb)) = (fs::File::open(a), fs::File::open(b)) else {
        return false;
    };
    let (mut ra, mut rb) = (std::io::BufReader::new(fa), std::io::BufReader::new(fb));
    let (mut ba, mut bb) = ([0u8; 8192], [0u8; 8192]);
    loop {
        let na = match read_full(&mut ra, &mut ba) {
            Ok(n) => n,
            Err(_) => return false,
        };
        let nb = match read_full(&mut rb, &mut bb) {
            Ok(n) => n,
            Err(_) => return false,
        };
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

fn read_full(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn sync_dir(target: &Path) {
    if let Some(dir) = target.parent()
        && let Ok(d) = fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
}

/// Removes `<name>.tmp.*` files left in the target's directory by an interrupted write.
pub fn remove_stale_temps(target: &Path) -> usize {
    let prefix = temp_prefix(target);
    let Some(dir) = target.parent() else { return 0 };
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix)
            && e.file_type().map(|t| t.is_file()).unwrap_or(false)
            && fs::remove_file(e.path()).is_ok()
        {
            n += 1;
        }
    }
    n
}

/// A clear message for a failed write, with what to do about a read-only mount.
pub fn describe_write_error(target: &Path, e: &std::io::Error) -> String {
    let dir = target.parent().unwrap_or(target).display();
    match e.raw_os_error() {
        Some(libc::EROFS) => format!(
            "cannot write {}: the directory {dir} is on a read-only file system; mount the host directory \
             read-write (on k3s/k3d/microk8s/GKE set the chart's global.platform, or cniConfDir/cniBinDir \
             to the node's writable CNI directories)",
            target.display()
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => {
            format!(
                "cannot write {}: permission denied in {dir} ({e}); the container needs to run as root",
                target.display()
            )
        }
        Some(libc::ENOENT) => format!(
            "cannot write {}: the directory {dir} does not exist",
            target.display()
        ),
        Some(libc::ENOSPC) => format!(
            "cannot write {}: no space left on the device of {dir}",
            target.display()
        ),
        _ => format!("cannot write {}: {e}", target.display()),
    }
}

/// What [`read_regular`] found.
#[derive(Debug)]
pub enum ReadOutcome {
    Missing,
    /// Not a regular file (directory, FIFO, socket, dangling symlink, ...), or too big.
    NotRegular(String),
    Unreadable(String),
    Data(Vec<u8>),
}

/// Reads a regular file (following symlinks), never blocking on a FIFO and never reading more
/// than [`MAX_READ`].
pub fn read_regular(path: &Path) -> ReadOutcome {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return if fs::symlink_metadata(path).is_ok() {
                ReadOutcome::NotRegular("a dangling symlink".into())
            } else {
                ReadOutcome::Missing
            };
        }
        Err(e) => return ReadOutcome::Unreadable(e.to_string()),
    };
    if !meta.is_file() {
        return ReadOutcome::NotRegular("not a regular file".into());
    }
    if meta.len() > MAX_READ {
        return ReadOutcome::NotRegular(format!("larger than {MAX_READ} bytes"));
    }
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
    let mut f = match f {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return ReadOutcome::Missing,
        Err(e) => return ReadOutcome::Unreadable(e.to_string()),
    };
    let mut buf = Vec::with_capacity(meta.len() as usize);
    match (&mut f).take(MAX_READ).read_to_end(&mut buf) {
        Ok(_) => ReadOutcome::Data(buf),
        Err(e) => ReadOutcome::Unreadable(e.to_string()),
    }
}

/// Identity of a file's current content as the file system sees it (no read needed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
    pub mtime_ns: i128,
    pub mode: u32,
}

pub fn stamp(path: &Path) -> Option<FileStamp> {
    let m = fs::symlink_metadata(path).ok()?;
    Some(FileStamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        mode: m.mode(),
    })
}

/// The file's permission bits, if it exists.
pub fn mode_of(path: &Path) -> Option<u32> {
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// A 64-bit FNV-1a digest, to recognise content we wrote without keeping it.
pub fn digest(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fastpath-fsutil-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn atomic_write_sets_mode_and_leaves_no_temp() {
        let d = scratch("write");
        let f = d.join("a.conflist");
        atomic_write(&f, b"{}", 0o640).unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"{}");
        assert_eq!(mode_of(&f), Some(0o640));
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1);
        let g = d.join("b");
        fs::write(&g, vec![7u8; 20000]).unwrap();
        atomic_copy(&g, &d.join("c")).unwrap();
        assert!(same_content(&g, &d.join("c")));
        assert!(!same_content(&g, &f));
        fs::remove_file(d.join("c")).unwrap();
        fs::remove_file(&g).unwrap();
        fs::write(d.join("a.conflist.tmp.123"), b"x").unwrap();
        assert_eq!(remove_stale_temps(&f), 1);
        assert!(f.exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn read_regular_refuses_fifos_and_dirs() {
        let d = scratch("read");
        let fifo = d.join("x.conflist");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(read_regular(&fifo), ReadOutcome::NotRegular(_)));
        fs::create_dir(d.join("y.conf")).unwrap();
        assert!(matches!(
            read_regular(&d.join("y.conf")),
            ReadOutcome::NotRegular(_)
        ));
        std::os::unix::fs::symlink(d.join("nowhere"), d.join("z.conf")).unwrap();
        assert!(matches!(
            read_regular(&d.join("z.conf")),
            ReadOutcome::NotRegular(_)
        ));
        assert!(matches!(
            read_regular(&d.join("none")),
            ReadOutcome::Missing
        ));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn write_error_names_read_only() {
        let e = std::io::Error::from_raw_os_error(libc::EROFS);
        let m = describe_write_error(Path::new("/host/etc/cni/net.d/10-x.conflist"), &e);
        assert!(
            m.contains("read-only") && m.contains("/host/etc/cni/net.d"),
            "{m}"
        );
    }

    #[test]
    fn a_failed_write_keeps_its_cause_and_its_wording() {
        let d = scratch("werr");
        let target = d.join("missing-dir/x.conflist");
        let e = atomic_write(&target, b"{}", 0o600).unwrap_err();
        let FileWriteError::Write { target: t, source } = &e else {
            panic!("{e:?}");
        };
        assert_eq!(t, &target);
        assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(e.to_string(), describe_write_error(&target, source));
        let e = atomic_copy(&d.join("no-such-source"), &d.join("y")).unwrap_err();
        assert!(matches!(e, FileWriteError::ReadSource { .. }), "{e:?}");
        assert!(e.to_string().starts_with("cannot read "), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }
}
