//! The plugin's per-pod state files (`<run_dir>/fastpath/pods/<container-id>.json`): who an
//! enrolled netns cookie is (for counter labels), and what to re-enroll when the enrollment
//! maps had to be recreated by an upgrade.
use anyhow::{Context as _, Result};
use std::path::Path;

pub use fastpath_common::pod_record::{PodRecord, ip_key, state_dir};

/// All readable records; unreadable files are skipped with a warning (they are the plugin's).
pub fn read_all(run_dir: &Path) -> Result<Vec<PodRecord>> {
    let dir = state_dir(run_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("read {}", dir.display())),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        match std::fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|b| serde_json::from_slice::<PodRecord>(&b).map_err(Into::into))
        {
            Ok(r) => out.push(r),
            Err(err) => log::warn!("skipping pod state file {}: {err:#}", path.display()),
        }
    }
    Ok(out)
}
