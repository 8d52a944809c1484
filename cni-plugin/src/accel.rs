//! Enrollment of a mesh pod in the accelerator's pinned maps (owned by the accelerator work).
//!
//! Called by ADD after the pod's redirection rules are in place, and by DEL. Enrollment is
//! best effort: if the accelerator is not loaded on this node, ADD still succeeds (the pod is
//! redirected, just not accelerated), and the reason is logged.
//!
//! ADD writes the pod's netns cookie into `FP_PODS` (with its opt-outs) and its IPs into
//! `FP_POD_IPS`, and a record `<run_dir>/fastpath/pods/<container-id>.json` (cookie, IPs,
//! namespace, name, pin directory). DEL works from that record, so it needs neither the netns
//! (which may be gone) nor the pod IPs, and is idempotent.
//!
//! Opt-outs (pod annotations, hostile input, validated here):
//! - `fastpath.io/accelerate: "false"`: the pod is not enrolled at all;
//! - `fastpath.io/exclude-ports: "8080,9090"`: connections to or from these ports are never
//!   accelerated (workloads that splice(2) from sockets, e.g. Go io.Copy between TCP conns).
use anyhow::{Context as _, Result, bail};
use fastpath_common::pod_record::{self, PodRecord, ip_key};
use fastpath_common::{
    ANNOTATION_ACCELERATE, ANNOTATION_EXCLUDE_PORTS, MAP_ABI_VERSION, MAX_EXCLUDED_PORTS, PodInfo,
    map_names, meta_index,
};
use std::{
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

/// Overrides the pin directory (tests; a non-default bpffs layout).
pub const PIN_DIR_ENV: &str = "FASTPATH_BPF_PIN_DIR";

/// What the plugin knows about the pod when enrolling it.
#[derive(Clone, Debug, Default)]
pub struct PodEnrollment<'a> {
    /// `CNI_NETNS` of the pod.
    pub netns_path: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub container_id: &'a str,
    /// Pod IPs from prevResult.
    pub ips: Vec<IpAddr>,
    /// Raw pod annotations, for fastpath's opt-outs (validated here, hostile input).
    pub annotations: Option<&'a serde_json::Map<String, serde_json::Value>>,
    /// `cni_agent_run_dir` from the plugin config.
    pub run_dir: &'a str,
}

/// The pod's opt-outs, from its annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OptOuts {
    pub accelerate: bool,
    pub excluded_ports: Vec<u16>,
}

/// Parses the opt-out annotations; any malformed value is an error naming it.
pub fn opt_outs(
    annotations: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<OptOuts> {
    let get = |k: &str| -> Result<Option<String>> {
        match annotations.and_then(|a| a.get(k)) {
            None => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => bail!("annotation {k} must be a string, got {other}"),
        }
    };
    let accelerate = match get(ANNOTATION_ACCELERATE)?.as_deref().map(str::trim) {
        None | Some("true") => true,
        Some("false") => false,
        Some(v) => {
            bail!("annotation {ANNOTATION_ACCELERATE}={v:?}: expected \"true\" or \"false\"")
        }
    };
    let mut excluded_ports = Vec::new();
    if let Some(v) = get(ANNOTATION_EXCLUDE_PORTS)? {
        for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let port: u16 = part.parse().ok().filter(|p| *p != 0).with_context(|| {
                format!(
                    "annotation {ANNOTATION_EXCLUDE_PORTS}={v:?}: {part:?} is not a port (1-65535)"
                )
            })?;
            if !excluded_ports.contains(&port) {
                excluded_ports.push(port);
            }
        }
        if excluded_ports.len() > MAX_EXCLUDED_PORTS {
            bail!(
                "annotation {ANNOTATION_EXCLUDE_PORTS}={v:?}: at most {MAX_EXCLUDED_PORTS} ports \
                 (use {ANNOTATION_ACCELERATE}: \"false\" to opt the whole pod out)"
            );
        }
    }
    Ok(OptOuts {
        accelerate,
        excluded_ports,
    })
}

fn record_path(run_dir: &str, container_id: &str) -> Result<PathBuf> {
    pod_record::record_path(Path::new(run_dir), container_id).map_err(anyhow::Error::msg)
}

fn default_pin_dir() -> PathBuf {
    std::env::var_os(PIN_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(fastpath_common::BPFFS_ROOT).join(fastpath_common::PIN_DIR_NAME)
        })
}

/// Enrolls the pod (pin directory from `FASTPATH_BPF_PIN_DIR`, default /sys/fs/bpf/fastpath).
pub fn enroll(pod: &PodEnrollment<'_>) -> Result<()> {
    enroll_at(pod, &default_pin_dir())
}

/// Enrolls the pod in the accelerator pinned under `pin_dir`.
pub fn enroll_at(pod: &PodEnrollment<'_>, pin_dir: &Path) -> Result<()> {
    let path = record_path(pod.run_dir, pod.container_id)?;
    let opts = opt_outs(pod.annotations).with_context(|| {
        format!(
            "pod {}/{} not accelerated: bad opt-out annotation",
            pod.namespace, pod.name
        )
    })?;
    let cookie = netns_cookie(pod.netns_path)?;
    let record = PodRecord {
        container_id: pod.container_id.to_string(),
        namespace: pod.namespace.to_string(),
        name: pod.name.to_string(),
        netns_cookie: cookie,
        ips: pod.ips.clone(),
        accelerate: opts.accelerate,
        excluded_ports: opts.excluded_ports.clone(),
        pin_dir: pin_dir.to_path_buf(),
    };
    write_record(&path, &record)?;
    if !opts.accelerate {
        log::info!(
            "pod {}/{} opted out of acceleration ({ANNOTATION_ACCELERATE}=false)",
            pod.namespace,
            pod.name
        );
        return Ok(());
    }
    let pods = match bpf::obj_get(&pin_dir.join(map_names::PODS)) {
        Ok(fd) => fd,
        Err(e) => {
            log::info!(
                "accelerator not loaded ({}: {e}); pod {}/{} is redirected without it and \
                 will be enrolled when it loads",
                pin_dir.display(),
                pod.namespace,
                pod.name
            );
            return Ok(());
        }
    };
    if let Err(why) = pinned_abi_matches(pin_dir) {
        log::info!(
            "pod {}/{} is redirected without acceleration for now: {why}; the agent enrolls it \
             from its record when it loads its own build",
            pod.namespace,
            pod.name
        );
        return Ok(());
    }
    let ips = bpf::obj_get(&pin_dir.join(map_names::POD_IPS)).context("open FP_POD_IPS")?;
    for ip in &pod.ips {
        bpf::update(&ips, &ip_key(*ip), &cookie).with_context(|| format!("register {ip}"))?;
    }
    let info = PodInfo::new(true, &opts.excluded_ports);
    bpf::update(&pods, &cookie, &info).context("enroll netns")?;
    log::info!(
        "pod {}/{} enrolled for acceleration (netns cookie {cookie})",
        pod.namespace,
        pod.name
    );
    Ok(())
}

/// Removes the pod's enrollment; idempotent, works when the netns is gone.
pub fn unenroll(_netns_path: &str, container_id: &str, run_dir: &str) -> Result<()> {
    let path = record_path(run_dir, container_id)?;
    let record: PodRecord = match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .with_context(|| format!("parse enrollment record {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    if record.accelerate
        && pinned_abi_matches(&record.pin_dir).is_ok()
        && let Ok(pods) = bpf::obj_get(&record.pin_dir.join(map_names::PODS))
    {
        bpf::delete(&pods, &record.netns_cookie).context("remove netns")?;
        if let Ok(ips) = bpf::obj_get(&record.pin_dir.join(map_names::POD_IPS)) {
            for ip in &record.ips {
                let key = ip_key(*ip);
                // The IP may already belong to a newer pod: remove only our entry.
                if bpf::lookup::<_, u64>(&ips, &key)? == Some(record.netns_cookie) {
                    bpf::delete(&ips, &key)?;
                }
            }
        }
        if let Ok(stats) = bpf::obj_get(&record.pin_dir.join(map_names::STATS)) {
            bpf::delete(&stats, &record.netns_cookie)?;
        }
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Whether the maps pinned in `pin_dir` are of the layout this plugin writes: their
/// [`MAP_ABI_VERSION`] stamp (FP_META) must be this build's. A plugin binary and an agent of
/// different builds meet during an upgrade; writing another build's maps could put entries
/// where their programs read something else.
fn pinned_abi_matches(pin_dir: &Path) -> Result<(), String> {
    let meta = bpf::obj_get(&pin_dir.join(map_names::META))
        .map_err(|e| format!("cannot open the accelerator's stamp (FP_META): {e}"))?;
    let stamp = bpf::lookup::<u32, u64>(&meta, &meta_index::ABI_VERSION)
        .map_err(|e| format!("cannot read the accelerator's stamp: {e:#}"))?;
    abi_verdict(stamp)
}

/// The decision of [`pinned_abi_matches`] on the stamp read.
fn abi_verdict(stamp: Option<u64>) -> Result<(), String> {
    match stamp {
        Some(v) if v == MAP_ABI_VERSION as u64 => Ok(()),
        Some(0) | None => Err("the accelerator's maps carry no map ABI stamp yet".into()),
        Some(v) => Err(format!(
            "the accelerator's maps have map ABI {v}, this plugin writes {MAP_ABI_VERSION}"
        )),
    }
}

fn write_record(path: &Path, record: &PodRecord) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().expect("record path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    // One temp file per writer: concurrent ADDs of one pod (a runtime's retries) must not
    // rename each other's.
    let tmp = path.with_extension(format!("json.tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    serde_json::to_writer(&mut f, record)?;
    std::io::Write::flush(&mut f)?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// The netns cookie of the namespace at `netns_path`, read with SO_NETNS_COOKIE from a socket
/// made inside it by a short-lived thread (setns affects only that thread).
pub fn netns_cookie(netns_path: &str) -> Result<u64> {
    let ns = std::fs::File::open(netns_path).with_context(|| format!("open netns {netns_path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<u64> {
            // SAFETY: setns on this thread only, with an fd we own; the thread then exits.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("setns into {netns_path}"));
            }
            // SAFETY: socket/getsockopt on a descriptor we own.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error()).context("socket in pod netns");
                }
                let fd = OwnedFd::from_raw_fd(fd);
                let mut cookie = 0u64;
                let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
                const SO_NETNS_COOKIE: libc::c_int = 71;
                if libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    SO_NETNS_COOKIE,
                    (&mut cookie as *mut u64).cast(),
                    &mut len,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error())
                        .context("getsockopt(SO_NETNS_COOKIE) (needs Linux >= 5.14)");
                }
                Ok(cookie)
            }
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns cookie thread panicked"))?
    })
}

/// The three map commands the plugin needs, as raw bpf(2) calls (keeps the plugin small).
mod bpf {
    use anyhow::{Context as _, Result};
    use std::{
        ffi::CString,
        io,
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        os::unix::ffi::OsStrExt as _,
        path::Path,
    };

    #[repr(C, align(8))]
    struct Attr([u8; 128]);

    fn call(cmd: libc::c_long, fields: &[(usize, u64)]) -> io::Result<libc::c_long> {
        let mut a = Attr([0; 128]);
        for (off, v) in fields {
            a.0[*off..*off + 8].copy_from_slice(&v.to_ne_bytes());
        }
        // SAFETY: a zero-padded bpf_attr whose pointers outlive the call.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, a.0.as_mut_ptr(), 128u32) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
        let rc = call(7, &[(0, c.as_ptr() as u64)])?;
        // SAFETY: a new fd from the kernel.
        Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
    }

    pub fn update<K, V>(map: &OwnedFd, key: &K, value: &V) -> Result<()> {
        call(
            2,
            &[
                (0, map.as_raw_fd() as u64),
                (8, key as *const K as u64),
                (16, value as *const V as u64),
            ],
        )
        .context("BPF_MAP_UPDATE_ELEM")?;
        Ok(())
    }

    pub fn delete<K>(map: &OwnedFd, key: &K) -> Result<()> {
        match call(
            3,
            &[(0, map.as_raw_fd() as u64), (8, key as *const K as u64)],
        ) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e).context("BPF_MAP_DELETE_ELEM"),
        }
    }

    pub fn lookup<K, V: Default>(map: &OwnedFd, key: &K) -> Result<Option<V>> {
        let mut v = V::default();
        match call(
            1,
            &[
                (0, map.as_raw_fd() as u64),
                (8, key as *const K as u64),
                (16, &mut v as *mut V as u64),
            ],
        ) {
            Ok(_) => Ok(Some(v)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e).context("BPF_MAP_LOOKUP_ELEM"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, serde_json::Value)]) -> serde_json::Map<String, serde_json::Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn no_annotations_means_accelerated() {
        assert_eq!(
            opt_outs(None).unwrap(),
            OptOuts {
                accelerate: true,
                excluded_ports: vec![]
            }
        );
    }

    #[test]
    fn parses_opt_outs() {
        let a = ann(&[
            (ANNOTATION_ACCELERATE, "false".into()),
            (ANNOTATION_EXCLUDE_PORTS, " 8080, 9090,8080 ".into()),
        ]);
        let o = opt_outs(Some(&a)).unwrap();
        assert!(!o.accelerate);
        assert_eq!(o.excluded_ports, vec![8080, 9090]);
    }

    #[test]
    fn hostile_values_are_named_errors() {
        for (k, v) in [
            (ANNOTATION_ACCELERATE, serde_json::Value::from("yes")),
            (ANNOTATION_ACCELERATE, serde_json::Value::from(true)),
            (ANNOTATION_EXCLUDE_PORTS, "80,70000".into()),
            (ANNOTATION_EXCLUDE_PORTS, "0".into()),
            (ANNOTATION_EXCLUDE_PORTS, "1,2,3,4,5,6,7,8,9".into()),
            (ANNOTATION_EXCLUDE_PORTS, "80;rm -rf".into()),
        ] {
            let a = ann(&[(k, v.clone())]);
            let e = format!("{:#}", opt_outs(Some(&a)).unwrap_err());
            assert!(e.contains(k), "{e}");
        }
    }

    #[test]
    fn only_maps_of_this_abi_are_written() {
        assert_eq!(abi_verdict(Some(MAP_ABI_VERSION as u64)), Ok(()));
        let older = abi_verdict(Some(MAP_ABI_VERSION as u64 - 1)).unwrap_err();
        assert!(
            older.contains(&format!("map ABI {}", MAP_ABI_VERSION - 1)),
            "{older}"
        );
        assert!(abi_verdict(Some(0)).is_err());
        assert!(abi_verdict(None).is_err());
    }

    #[test]
    fn container_ids_cannot_escape_the_state_dir() {
        assert!(record_path("/run", "abc-123_x.y").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a\0b"] {
            assert!(record_path("/run", bad).is_err(), "{bad:?}");
        }
    }
}
