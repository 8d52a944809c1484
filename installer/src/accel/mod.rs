//! The accelerator: loads the embedded probes, attaches them to the root cgroup v2 and the
//! sockhash, pins programs, links and maps under bpffs, and reuses them across restarts.
//!
//! Interface used by the rest of the installer (owned by the accelerator work; the installer
//! only calls these):
//! - [`start`]: called once at start-up; never fails the installer. Returns what happened, for
//!   the log line, the readiness detail and the `fastpath_accel_*` metrics.
//! - [`pod_counters`]: per-pod counters for /metrics.
//! - [`uninstall`]: the explicit uninstall command (never called on SIGTERM).
use std::path::PathBuf;

/// Where and whether to accelerate.
#[derive(Clone, Debug)]
pub struct AccelSettings {
    /// False when the operator turned acceleration off (`FASTPATH_ACCELERATION=false`).
    pub enabled: bool,
    /// The bpffs mount (`/sys/fs/bpf`).
    pub bpffs: PathBuf,
    /// Our pin directory under it (`/sys/fs/bpf/fastpath`).
    pub pin_dir: PathBuf,
    /// The cgroup v2 root to attach sock_ops to; `None` = find it from /proc/self/mounts.
    pub cgroup_root: Option<PathBuf>,
}

/// The outcome of [`start`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccelState {
    /// Programs attached and self-test passed.
    Active,
    /// Turned off by configuration.
    Disabled,
    /// The kernel lacks something, or a self-test failed: redirection works without acceleration.
    Unavailable { reason: String },
}

/// Loads or reuses the pinned accelerator. Stub until the accelerator lands.
pub fn start(settings: &AccelSettings) -> AccelState {
    if !settings.enabled {
        return AccelState::Disabled;
    }
    AccelState::Unavailable {
        reason: "accelerator not built yet".into(),
    }
}

/// One enrolled pod's counters, summed over CPUs, with the pod's identity when known.
#[derive(Clone, Debug, Default)]
pub struct PodCounters {
    pub netns_cookie: u64,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub stats: fastpath_common::PodStats,
}

/// Per-pod counters for /metrics. Stub until the accelerator lands.
pub fn pod_counters(_settings: &AccelSettings) -> anyhow::Result<Vec<PodCounters>> {
    Ok(Vec::new())
}

/// Human-readable state of the pins, for `install-cni accel-status`. Stub.
pub fn status_report(settings: &AccelSettings) -> anyhow::Result<String> {
    Ok(format!(
        "no accelerator pins under {}",
        settings.pin_dir.display()
    ))
}

/// Removes every pin and detaches everything. Stub until the accelerator lands.
pub fn uninstall(_settings: &AccelSettings) -> anyhow::Result<()> {
    Ok(())
}
