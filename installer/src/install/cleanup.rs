//! Taking the plugin off the node: its entry in every config, then the kubeconfig, then the
//! binary, which stays while any config still names it.
use super::*;

/// Why a file of the plugin's (an entry's config, the standalone config, the kubeconfig or a
/// binary) was not taken off the node. Said as [`fsutil::describe_write_error`] says it.
#[derive(Debug, thiserror::Error)]
pub enum RemovalError {
    /// The config without the entry could not be written (the file is unchanged).
    #[error(transparent)]
    Rewrite(#[from] fsutil::FileWriteError),
    #[error("{}", fsutil::describe_write_error(path, source))]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl RemovalError {
    fn remove(path: &Path, source: std::io::Error) -> Self {
        RemovalError::Remove {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What [`cleanup_node`] could not do.
#[derive(Debug, thiserror::Error)]
pub enum CleanupFailure {
    #[error(transparent)]
    Removal(#[from] RemovalError),
    /// The binary stays: configs (`files`) still name the plugin.
    #[error(
        "kept the plugin binary in {}: {} still name istio-cni (removing the binary would break pod \
             creation and deletion on this node)",
        dir.display(),
        files.join(", ")
    )]
    BinaryKept { dir: PathBuf, files: Vec<String> },
}

/// Everything [`cleanup_node`] could not do, said in one line (`; `-separated).
#[derive(Debug, thiserror::Error)]
#[error("{}", .failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct CleanupError {
    pub failures: Vec<CleanupFailure>,
}

/// Removes every `istio-cni` entry from one config file, keeping its mode. Missing or invalid
/// files are left alone.
pub(super) fn remove_entry_from_file(path: &Path) -> Result<bool, RemovalError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ReadOutcome::Data(bytes) = fsutil::read_regular(path) else {
        return Ok(false);
    };
    let Ok(conf) = conflist::parse_net_conf(&name, &bytes) else {
        return Ok(false);
    };
    if conf.single {
        return Ok(false);
    }
    let (out, removed) = conflist::remove_entry(&conf.value);
    if !removed {
        return Ok(false);
    }
    let mode = fsutil::mode_of(path).unwrap_or(0o600);
    let has_plugins = out
        .get("plugins")
        .and_then(Value::as_array)
        .is_some_and(|l| !l.is_empty());
    if has_plugins {
        fsutil::atomic_write(
            path,
            conflist::to_go_json(&Value::Object(out), true).as_bytes(),
            mode,
        )?;
    } else {
        // The list held only our entry: an empty list is not a valid config; remove it.
        std::fs::remove_file(path).map_err(|e| RemovalError::remove(path, e))?;
    }
    log::info!(target: SCOPE, "removed the istio-cni entry from {}", path.display());
    Ok(true)
}

/// Files in the conf dir that still name the plugin (entries in lists, or a standalone file).
pub fn files_naming_plugin(dir: &Path) -> Vec<String> {
    let Ok(scan) = scan_conf_dir(dir) else {
        return Vec::new();
    };
    scan.valid
        .iter()
        .filter(|c| {
            c.conf
                .plugin_types()
                .iter()
                .any(|t| t == conflist::PLUGIN_TYPE)
        })
        .map(|c| c.name.clone())
        .collect()
}

/// Removes the plugin from the node: entries (from `pinned` and from every other config in the
/// dir), the standalone file, then the kubeconfig, then the binary, which stays if any config
/// still names it.
pub fn cleanup_node(cfg: &Config, pinned: Option<&Path>) -> Result<(), CleanupError> {
    let dir = &cfg.mounted_cni_net_dir;
    let mut errors: Vec<CleanupFailure> = Vec::new();
    if let Some(p) = pinned
        && let Err(e) = remove_entry_from_file(p)
    {
        errors.push(e.into());
    }
    if let Ok(scan) = scan_conf_dir(dir) {
        for c in &scan.valid {
            let path = dir.join(&c.name);
            let ours_only = c.conf.single && c.conf.plugin_types() == [conflist::PLUGIN_TYPE];
            if ours_only {
                match std::fs::remove_file(&path) {
                    Ok(()) => log::info!(target: SCOPE, "removed {}", path.display()),
                    Err(e) => errors.push(RemovalError::remove(&path, e).into()),
                }
            } else if let Err(e) = remove_entry_from_file(&path) {
                errors.push(e.into());
            }
        }
    }
    let remaining = files_naming_plugin(dir);
    let kubeconfig = cfg.kubeconfig_path();
    match std::fs::remove_file(&kubeconfig) {
        Ok(()) => log::info!(target: SCOPE, "removed {}", kubeconfig.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(RemovalError::remove(&kubeconfig, e).into()),
    }
    if remaining.is_empty() {
        let names =
            list_binaries(&cfg.bin_source_dir).unwrap_or_else(|_| vec![PLUGIN_BINARY.to_string()]);
        for n in names {
            let p = cfg.host_bin_dir.join(&n);
            match std::fs::remove_file(&p) {
                Ok(()) => log::info!(target: SCOPE, "removed {}", p.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => errors.push(RemovalError::remove(&p, e).into()),
            }
        }
    } else {
        errors.push(CleanupFailure::BinaryKept {
            dir: cfg.host_bin_dir.clone(),
            files: remaining,
        });
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CleanupError { failures: errors })
    }
}
