//! The plugin's per-pod state files (`<run_dir>/fastpath/pods/<container-id>.json`): who an
//! enrolled netns cookie is (for counter labels), and what to re-enroll when the enrollment
//! maps had to be recreated by an upgrade.
use anyhow::{Context as _, Result};
use fastpath_common::{Ip, IpKey, POD_STATE_SUBDIR, PodInfo};
use serde::Deserialize;
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

/// One enrolled pod, as the plugin wrote it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct PodRecord {
    pub container_id: String,
    pub namespace: String,
    pub name: String,
    pub netns_cookie: u64,
    pub ips: Vec<IpAddr>,
    pub accelerate: bool,
    #[serde(default)]
    pub excluded_ports: Vec<u16>,
}

impl PodRecord {
    pub fn pod_info(&self) -> PodInfo {
        PodInfo::new(self.accelerate, &self.excluded_ports)
    }

    pub fn ip_keys(&self) -> Vec<IpKey> {
        self.ips.iter().map(|ip| ip_key(*ip)).collect()
    }
}

pub fn ip_key(ip: IpAddr) -> IpKey {
    IpKey {
        ip: match ip {
            IpAddr::V4(v4) => Ip::from_v4_octets(v4.octets()),
            IpAddr::V6(v6) => Ip::from_v6_octets(v6.octets()),
        },
    }
}

pub fn state_dir(run_dir: &Path) -> PathBuf {
    run_dir.join(POD_STATE_SUBDIR)
}

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
}
