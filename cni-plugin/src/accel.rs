//! Enrollment of a mesh pod in the accelerator's pinned maps (owned by the accelerator work).
//!
//! Called by ADD after the pod's redirection rules are in place, and by DEL. Enrollment is
//! best effort: if the accelerator is not loaded on this node, ADD still succeeds (the pod is
//! redirected, just not accelerated), and the reason is logged.
//!
//! ADD writes the pod's netns cookie into `FP_PODS` (with its opt-outs) and its IPs into
//! `FP_POD_IPS`, and a record `<run_dir>/fastpath/pods/<container-id>.json` (cookie, IPs,
//! namespace, name, pin directory). DEL works from that record, so it needs neither the netns
//! (which may be gone) nor the pod IPs, and is idempotent. The record, the maps and the map
//! ABI stamp check are fastpath-pins' (shared with the agent's re-enrollment).
//!
//! Opt-outs (pod annotations, hostile input, validated here):
//! - `fastpath.io/accelerate: "false"`: the pod is not enrolled at all;
//! - `fastpath.io/exclude-ports: "8080,9090"`: connections to or from these ports are never
//!   accelerated (workloads that splice(2) from sockets, e.g. Go io.Copy between TCP conns).
use crate::iptables::Netns;
use anyhow::{Context as _, Result, bail};
use fastpath_common::{ANNOTATION_ACCELERATE, ANNOTATION_EXCLUDE_PORTS, MAX_EXCLUDED_PORTS};
use fastpath_pins::{Enrollment, Pins, PodRecord, current_netns_cookie, record};
use std::{
    net::IpAddr,
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
    Ok(record::record_path(Path::new(run_dir), container_id)?)
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

/// [`enroll`] with the pod's netns cookie already read (e.g. while the rules were applied in
/// the netns); `None` reads it here.
pub fn enroll_with_cookie(pod: &PodEnrollment<'_>, cookie: Option<u64>) -> Result<()> {
    enroll_inner(pod, &default_pin_dir(), cookie)
}

/// Enrolls the pod in the accelerator pinned under `pin_dir`.
pub fn enroll_at(pod: &PodEnrollment<'_>, pin_dir: &Path) -> Result<()> {
    enroll_inner(pod, pin_dir, None)
}

fn enroll_inner(pod: &PodEnrollment<'_>, pin_dir: &Path, cookie: Option<u64>) -> Result<()> {
    let path = record_path(pod.run_dir, pod.container_id)?;
    let opts = opt_outs(pod.annotations).with_context(|| {
        format!(
            "pod {}/{} not accelerated: bad opt-out annotation",
            pod.namespace, pod.name
        )
    })?;
    let cookie = match cookie {
        Some(c) => c,
        None => netns_cookie(pod.netns_path)?,
    };
    let record = PodRecord {
        container_id: pod.container_id.to_string(),
        namespace: pod.namespace.to_string(),
        name: pod.name.to_string(),
        netns_cookie: cookie,
        ips: pod.ips.clone(),
        accelerate: opts.accelerate,
        excluded_ports: opts.excluded_ports,
        pin_dir: pin_dir.to_path_buf(),
    };
    record::write(&path, &record)?;
    if !record.accelerate {
        log::info!(
            "pod {}/{} opted out of acceleration ({ANNOTATION_ACCELERATE}=false)",
            pod.namespace,
            pod.name
        );
        return Ok(());
    }
    match Pins::new(pin_dir).enroll_pod(&record)? {
        Enrollment::Enrolled => log::info!(
            "pod {}/{} enrolled for acceleration (netns cookie {cookie})",
            pod.namespace,
            pod.name
        ),
        Enrollment::NotLoaded(e) => log::info!(
            "accelerator not loaded ({}: {}); pod {}/{} is redirected without it and will be \
             enrolled when it loads",
            pin_dir.display(),
            e.os_error(),
            pod.namespace,
            pod.name
        ),
        Enrollment::OtherAbi(why) => log::info!(
            "pod {}/{} is redirected without acceleration for now: {why}; the agent enrolls it \
             from its record when it loads its own build",
            pod.namespace,
            pod.name
        ),
    }
    Ok(())
}

/// Removes the pod's enrollment; idempotent, works when the netns is gone.
pub fn unenroll(_netns_path: &str, container_id: &str, run_dir: &str) -> Result<()> {
    let path = record_path(run_dir, container_id)?;
    let Some(record) = record::read(&path)? else {
        return Ok(());
    };
    Pins::new(&record.pin_dir).unenroll(&record)?;
    record::remove(&path)?;
    Ok(())
}

/// The netns cookie of the namespace at `netns_path`, read with SO_NETNS_COOKIE from a socket
/// made inside it by a short-lived thread (setns affects only that thread).
pub fn netns_cookie(netns_path: &str) -> Result<u64> {
    let ns = Netns::open(netns_path).with_context(|| format!("open netns {netns_path}"))?;
    let cookie = ns
        .run(current_netns_cookie)
        .with_context(|| format!("setns into {netns_path}"))?;
    Ok(cookie?)
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
    fn container_ids_cannot_escape_the_state_dir() {
        assert!(record_path("/run", "abc-123_x.y").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a\0b"] {
            assert!(record_path("/run", bad).is_err(), "{bad:?}");
        }
    }
}
