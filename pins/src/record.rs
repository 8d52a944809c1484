//! The per-pod record the plugin writes on ADD (`<run_dir>/fastpath/pods/<container-id>.json`)
//! and both sides read: the plugin for DEL (the netns may be gone by then), the installer for
//! counter labels and to re-enroll pods when an upgrade had to recreate the enrollment maps.
use fastpath_common::{Ip, IpKey, POD_STATE_SUBDIR, PodInfo};
use serde::{Deserialize, Serialize};
use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

/// A record file that cannot be read, parsed or written; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("container id {0:?} is not usable as a file name")]
    BadContainerId(String),
    #[error("{what} {}: {error}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("parse enrollment record {}: {error}", path.display())]
    Parse {
        path: PathBuf,
        error: serde_json::Error,
    },
}

impl RecordError {
    /// What went wrong, without the file's name.
    pub fn detail(&self) -> String {
        match self {
            RecordError::BadContainerId(_) => self.to_string(),
            RecordError::Io { error, .. } => error.to_string(),
            RecordError::Parse { error, .. } => error.to_string(),
        }
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RecordError {
    let path = path.to_path_buf();
    move |error| RecordError::Io { what, path, error }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodRecord {
    pub container_id: String,
    pub namespace: String,
    pub name: String,
    pub netns_cookie: u64,
    pub ips: Vec<IpAddr>,
    pub accelerate: bool,
    #[serde(default)]
    pub excluded_ports: Vec<u16>,
    /// The pin directory the pod was enrolled in (the plugin's view).
    #[serde(default)]
    pub pin_dir: PathBuf,
}

impl PodRecord {
    pub fn pod_info(&self) -> PodInfo {
        PodInfo::new(self.accelerate, &self.excluded_ports)
    }

    pub fn ip_keys(&self) -> Vec<IpKey> {
        self.ips.iter().map(|ip| ip_key(*ip)).collect()
    }
}

/// The key of a pod IP in `FP_POD_IPS`.
pub fn ip_key(ip: IpAddr) -> IpKey {
    IpKey {
        ip: match ip {
            IpAddr::V4(v4) => Ip::from_v4_octets(v4.octets()),
            IpAddr::V6(v6) => Ip::from_v6_octets(v6.octets()),
        },
    }
}

/// The directory of the records under `cni_agent_run_dir`.
pub fn state_dir(run_dir: &Path) -> PathBuf {
    run_dir.join(POD_STATE_SUBDIR)
}

/// A pod's record file. The container id comes from the runtime and becomes a file name:
/// anything that could leave the directory is refused.
pub fn record_path(run_dir: &Path, container_id: &str) -> Result<PathBuf, RecordError> {
    let ok = !container_id.is_empty()
        && container_id.len() <= 256
        && container_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !container_id.starts_with('.');
    if !ok {
        return Err(RecordError::BadContainerId(container_id.to_string()));
    }
    Ok(state_dir(run_dir).join(format!("{container_id}.json")))
}

/// Writes a record atomically (0600).
pub fn write(path: &Path, record: &PodRecord) -> Result<(), RecordError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().expect("record path has a parent");
    std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    // One temp file per writer: concurrent ADDs of one pod (a runtime's retries) must not
    // rename each other's.
    let tmp = path.with_extension(format!("json.tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    // Serialized first and written at once: straight into the file, serde_json makes one
    // write(2) per token (about 60 per record, on every pod ADD).
    let bytes = serde_json::to_vec(record).map_err(|e| io_err("write", &tmp)(e.into()))?;
    std::io::Write::write_all(&mut f, &bytes).map_err(io_err("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("write", path))
}

/// The record at `path`; `None` when there is none.
pub fn read(path: &Path) -> Result<Option<PodRecord>, RecordError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|error| RecordError::Parse {
                path: path.to_path_buf(),
                error,
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// Removes the record at `path`, if any.
pub fn remove(path: &Path) -> Result<(), RecordError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", path)(e)),
        _ => Ok(()),
    }
}

/// All readable records under `run_dir`; unreadable files are skipped with a warning (they
/// are the plugin's).
pub fn read_all(run_dir: &Path) -> Result<Vec<PodRecord>, RecordError> {
    let dir = state_dir(run_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("read", &dir)(e)),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        match read(&path) {
            Ok(Some(r)) => out.push(r),
            Ok(None) => {}
            Err(err) => log::warn!(
                "skipping pod state file {}: {}",
                path.display(),
                err.detail()
            ),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_parses_and_builds_map_values() {
        let r: PodRecord = serde_json::from_str(
            r#"{"container_id":"c1","namespace":"ns","name":"p","netns_cookie":42,
                "ips":["10.1.2.3","fd00::1"],"accelerate":true,"excluded_ports":[8080]}"#,
        )
        .unwrap();
        assert_eq!(r.pod_info().excluded_port_count, 1);
        let keys = r.ip_keys();
        assert_eq!(keys[0].ip, Ip::from_v4_octets([10, 1, 2, 3]));
        assert_ne!(keys[1].ip.words[1..], [0, 0, 0]);
    }

    #[test]
    fn records_round_trip_through_files() {
        let run = std::env::temp_dir().join(format!("fp-pins-record-{}", std::process::id()));
        let path = record_path(&run, "c1").unwrap();
        assert_eq!(read(&path).unwrap(), None);
        let r = PodRecord {
            container_id: "c1".into(),
            namespace: "ns".into(),
            name: "p".into(),
            netns_cookie: 7,
            ips: vec!["10.0.0.7".parse().unwrap()],
            accelerate: true,
            excluded_ports: vec![8080],
            pin_dir: "/sys/fs/bpf/fastpath".into(),
        };
        write(&path, &r).unwrap();
        std::fs::write(state_dir(&run).join("junk.json"), "{").unwrap();
        assert_eq!(read(&path).unwrap().as_ref(), Some(&r));
        assert_eq!(read_all(&run).unwrap(), vec![r]);
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert!(read_all(&run).unwrap().is_empty());
        std::fs::remove_dir_all(&run).unwrap();
    }

    #[test]
    fn container_ids_cannot_escape_the_directory() {
        let run = Path::new("/run/x");
        assert!(record_path(run, "abc-123_x.y").is_ok());
        for bad in ["", "../etc", "a/b", ".hidden", "a\0b"] {
            assert!(record_path(run, bad).is_err(), "{bad:?}");
        }
    }
}
