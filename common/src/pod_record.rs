//! The per-pod record the plugin writes on ADD (`<run_dir>/fastpath/pods/<container-id>.json`)
//! and both sides read: the plugin for DEL (the netns may be gone by then), the installer for
//! counter labels and to re-enroll pods when an upgrade had to recreate the enrollment maps.
extern crate std;

use crate::{Ip, IpKey, POD_STATE_SUBDIR, PodInfo};
use serde::{Deserialize, Serialize};
use std::{
    format,
    net::IpAddr,
    path::{Path, PathBuf},
    string::String,
    vec::Vec,
};

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
pub fn record_path(run_dir: &Path, container_id: &str) -> Result<PathBuf, String> {
    let ok = !container_id.is_empty()
        && container_id.len() <= 256
        && container_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !container_id.starts_with('.');
    if !ok {
        return Err(format!(
            "container id {container_id:?} is not usable as a file name"
        ));
    }
    Ok(state_dir(run_dir).join(format!("{container_id}.json")))
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
    fn container_ids_cannot_escape_the_directory() {
        let run = Path::new("/run/x");
        assert!(record_path(run, "abc-123_x.y").is_ok());
        for bad in ["", "../etc", "a/b", ".hidden", "a\0b"] {
            assert!(record_path(run, bad).is_err(), "{bad:?}");
        }
    }
}
