//! The pin directory holds root's programs and maps, and the agent changes and removes what is
//! in it. Before it does anything there, the directory must be fastpath's own: a real
//! directory (not a symlink, which chmod and removal would follow elsewhere) on bpffs, owned
//! by root, mode 0700. Removal touches only fastpath's own pin names.
use super::{PINNED_LINKS, PINNED_PROGS, retire};
use anyhow::{Result, bail};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::Path;

const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// Creates the pin directory (mode 0700) when it is missing, then [`check`]s it.
pub fn prepare(dir: &Path) -> Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => bail!("cannot create the pin directory {}: {e}", dir.display()),
    }
    check(dir)
}

/// Whether `dir` may be used as fastpath's pin directory; the error names what is wrong.
pub fn check(dir: &Path) -> Result<()> {
    let d = dir.display();
    let m = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) => bail!("pin directory {d}: {e}"),
    };
    if m.file_type().is_symlink() {
        let to = std::fs::read_link(dir)
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        bail!("pin directory {d} is a symlink (to {to:?}): refusing to use it");
    }
    if !m.is_dir() {
        bail!("pin directory {d} is not a directory");
    }
    let magic = fs_magic(dir)?;
    if magic != BPF_FS_MAGIC {
        bail!("pin directory {d} is not on bpffs (filesystem magic {magic:#x})");
    }
    if m.uid() != 0 {
        bail!("pin directory {d} is owned by uid {}, not root", m.uid());
    }
    let mode = m.mode() & 0o7777;
    if mode != 0o700 {
        bail!(
            "pin directory {d} has mode {mode:04o}, not 0700 (if it is fastpath's, chmod 700 it or \
             remove it)"
        );
    }
    Ok(())
}

fn fs_magic(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: statfs into a zeroed struct we own, with a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        bail!(
            "statfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(st.f_type as u64)
}

/// Whether `name` is a pin fastpath makes: a map, a program, a link, or the retired sets.
pub fn is_own(name: &str) -> bool {
    fastpath_common::ALL_MAPS.contains(&name)
        || PINNED_LINKS.contains(&name)
        || PINNED_PROGS.contains(&name)
        || name == retire::RETIRED_DIR
}
