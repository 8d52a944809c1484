//! Repair in place: find a running pod's network namespace through the host's procfs and apply
//! the plugin's redirection there (Istio's `getPodNetNs` + `redirectRunningPod` in
//! `cni/pkg/repair/`).
//!
//! Every `<procfs>/<pid>/ns/net` is looked at once per distinct namespace (by device and inode);
//! in each, the interfaces' addresses are read on a short-lived thread that entered it. Among the
//! processes of the namespace that holds the pod's IP, the oldest (the sandbox's pause process)
//! names the path handed to the plugin's code.
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use fastpath_cni_plugin::iptables::Netns;

/// Why a pod's network namespace was not found.
#[derive(Debug, thiserror::Error)]
pub enum PodNetnsError {
    #[error("pod {key} has no IP in its status yet")]
    NoIp { key: String },
    #[error("cannot read the host's procfs at {} (FASTPATH_HOST_PROC; is the host's /proc mounted?) to find pod {key}'s network namespace: {source}", host_proc.display())]
    ProcUnreadable {
        host_proc: PathBuf,
        key: String,
        source: std::io::Error,
    },
    #[error("no process in {} has a readable ns/net (FASTPATH_HOST_PROC: is it the host's procfs, and is the agent privileged?); pod {key}'s network namespace cannot be found", host_proc.display())]
    NoNamespaces { host_proc: PathBuf, key: String },
    #[error("no network namespace under {} holds pod {key}'s IP {} ({looked_at} namespaces looked at)", host_proc.display(), ips.join(","))]
    NotFound {
        host_proc: PathBuf,
        key: String,
        ips: Vec<String>,
        looked_at: usize,
    },
}

/// Why a pod was not repaired in place.
#[derive(Debug, thiserror::Error)]
pub enum PodRepairError {
    #[error(transparent)]
    Netns(#[from] PodNetnsError),
    #[error("pod {key}: {source}")]
    Encode {
        key: String,
        source: serde_json::Error,
    },
    #[error("pod {key}: in {}: {source}", netns.display())]
    Redirect {
        key: String,
        netns: PathBuf,
        source: fastpath_cni_plugin::plugin::RunningPodRedirectError,
    },
}

/// The netns of the pod whose IPs are `ips`: `<procfs>/<pid>/ns/net` of the oldest process in
/// it. Errors name the pod (`key`) and what was looked at.
pub fn find_pod_netns(
    host_proc: &Path,
    key: &str,
    ips: &[IpAddr],
) -> Result<PathBuf, PodNetnsError> {
    if ips.is_empty() {
        return Err(PodNetnsError::NoIp {
            key: key.to_string(),
        });
    }
    let dir = std::fs::read_dir(host_proc).map_err(|source| PodNetnsError::ProcUnreadable {
        host_proc: host_proc.to_path_buf(),
        key: key.to_string(),
        source,
    })?;
    // (dev, inode) of each netns -> its processes.
    let mut namespaces: BTreeMap<(u64, u64), Vec<u32>> = BTreeMap::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(m) = std::fs::metadata(entry.path().join("ns/net")) {
            namespaces.entry((m.dev(), m.ino())).or_default().push(pid);
        }
    }
    if namespaces.is_empty() {
        return Err(PodNetnsError::NoNamespaces {
            host_proc: host_proc.to_path_buf(),
            key: key.to_string(),
        });
    }
    let wanted: HashSet<IpAddr> = ips.iter().copied().collect();
    for pids in namespaces.values() {
        // Any live process of the namespace opens it.
        let Some(netns) = pids.iter().find_map(|pid| {
            let path = host_proc.join(format!("{pid}/ns/net"));
            Netns::open(&path.to_string_lossy()).ok()
        }) else {
            continue;
        };
        let holds = netns
            .run(|| addresses().map(|a| a.iter().any(|ip| wanted.contains(ip))))
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false);
        if holds {
            let oldest = pids
                .iter()
                .filter_map(|pid| start_time(host_proc, *pid).map(|t| (t, *pid)))
                .min()
                .map(|(_, pid)| pid)
                .unwrap_or(pids[0]);
            return Ok(host_proc.join(format!("{oldest}/ns/net")));
        }
    }
    Err(PodNetnsError::NotFound {
        host_proc: host_proc.to_path_buf(),
        key: key.to_string(),
        ips: ips.iter().map(IpAddr::to_string).collect(),
        looked_at: namespaces.len(),
    })
}

/// The interface addresses of the calling thread's network namespace.
fn addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not freed yet.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr of the family it names.
            unsafe {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        out.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// A process's start time (clock ticks since boot), field 22 of `<procfs>/<pid>/stat`.
fn start_time(host_proc: &Path, pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(host_proc.join(format!("{pid}/stat"))).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a `stat` line; the command (field 2) may hold spaces and parentheses.
fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the command: field 3 (state) is the first; start time is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Repairs `pod` in place: finds its netns and applies the plugin's redirection.
/// `Ok(Some(why))` when the plugin would not redirect the pod.
pub fn repair_pod(
    host_proc: &Path,
    pod: &k8s_openapi::api::core::v1::Pod,
    native_nftables: bool,
) -> Result<Option<String>, PodRepairError> {
    let key = super::pod_key(pod);
    let ips = super::pod_ips(pod);
    let path = find_pod_netns(host_proc, &key, &ips)?;
    let json = serde_json::to_vec(pod).map_err(|source| PodRepairError::Encode {
        key: key.clone(),
        source,
    })?;
    fastpath_cni_plugin::plugin::redirect_running_pod(
        &json,
        &path.to_string_lossy(),
        &ips,
        native_nftables,
    )
    .map_err(|source| PodRepairError::Redirect {
        key,
        netns: path,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_is_field_22_whatever_the_command() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn a_missing_procfs_is_named_with_the_pod() {
        let e = find_pod_netns(
            Path::new("/nonexistent-proc"),
            "ns/web",
            &["10.1.2.3".parse().unwrap()],
        )
        .unwrap_err();
        assert!(matches!(e, PodNetnsError::ProcUnreadable { .. }), "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains("ns/web") && e.contains("/nonexistent-proc"),
            "{e}"
        );
        let e = find_pod_netns(Path::new("/proc"), "ns/web", &[]).unwrap_err();
        assert!(matches!(e, PodNetnsError::NoIp { .. }), "{e:?}");
        assert_eq!(e.to_string(), "pod ns/web has no IP in its status yet");
    }

    #[test]
    fn this_process_is_found_by_an_address_it_holds() {
        // Our own netns holds 127.0.0.1 (when loopback is up, as in any test runner).
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        if !addresses().unwrap().contains(&lo) {
            return;
        }
        let path = find_pod_netns(Path::new("/proc"), "ns/web", &[lo]).unwrap();
        assert!(path.starts_with("/proc"), "{}", path.display());
    }
}
