//! The plugin binary: copied from the image into the host's CNI bin dir when it differs.
use super::*;

/// Why the plugin binary is not in place on the host (the `binary` readiness reason).
#[derive(Debug, thiserror::Error)]
pub enum BinaryInstallError {
    /// The image's binary directory (`FASTPATH_CNI_BIN_SOURCE_DIR`) cannot be listed.
    #[error("cannot read the plugin binary directory {}: {source}", dir.display())]
    SourceDirUnreadable {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// The image's binary directory holds no file.
    #[error("no plugin binary in {} (expected {})", dir.display(), PLUGIN_BINARY)]
    NoBinary { dir: PathBuf },
    /// The copy into the host's bin dir failed (the target is unchanged).
    #[error(transparent)]
    Copy(#[from] fsutil::FileWriteError),
}

impl Installer {
    pub(super) fn ensure_binaries(&mut self, wrote: &mut bool) -> Result<(), BinaryInstallError> {
        let names = match &self.binaries {
            Some(n) => n.clone(),
            None => {
                let names = list_binaries(&self.cfg.bin_source_dir)?;
                for n in &names {
                    fsutil::remove_stale_temps(&self.cfg.host_bin_dir.join(n));
                }
                self.binaries = Some(names.clone());
                names
            }
        };
        for name in names {
            let src = self.cfg.bin_source_dir.join(&name);
            let dst = self.cfg.host_bin_dir.join(&name);
            let now_stamp = fsutil::stamp(&dst);
            if now_stamp.is_some() && now_stamp == self.bin_ok.get(&name).copied() {
                continue;
            }
            if let Some(stamp) = now_stamp
                && same_file_content(&src, &dst)
            {
                // Same bytes and mode (e.g. after a restart, or a touch): no rewrite.
                self.bin_ok.insert(name, stamp);
                continue;
            }
            fsutil::atomic_copy(&src, &dst)?;
            *wrote = true;
            if self.bin_ok.remove(&name).is_some() {
                self.metrics.repair(Repair::Binary);
                let what = if now_stamp.is_some() {
                    "changed"
                } else {
                    "deleted"
                };
                log::info!(target: SCOPE, "{} was {what}: copied {} again", dst.display(), src.display());
            } else {
                log::info!(target: SCOPE, "copied {} to {}", src.display(), dst.display());
            }
            if let Some(s) = fsutil::stamp(&dst) {
                self.bin_ok.insert(name, s);
            }
        }
        Ok(())
    }
}

pub(super) fn list_binaries(dir: &Path) -> Result<Vec<String>, BinaryInstallError> {
    let mut names = Vec::new();
    let entries =
        std::fs::read_dir(dir).map_err(|source| BinaryInstallError::SourceDirUnreadable {
            dir: dir.to_path_buf(),
            source,
        })?;
    for e in entries.flatten() {
        if std::fs::metadata(e.path())
            .map(|m| m.is_file())
            .unwrap_or(false)
        {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    if names.is_empty() {
        return Err(BinaryInstallError::NoBinary {
            dir: dir.to_path_buf(),
        });
    }
    Ok(names)
}

pub(super) fn same_file_content(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::symlink_metadata(b)) else {
        return false;
    };
    use std::os::unix::fs::PermissionsExt as _;
    if !mb.is_file() || ma.len() != mb.len() || ma.permissions().mode() != mb.permissions().mode() {
        return false;
    }
    fsutil::same_content(a, b)
}
