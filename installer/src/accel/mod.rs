//! The accelerator: loads the embedded probes, attaches them to the root cgroup v2 and the
//! sockhash, pins programs, links and maps under bpffs, and reuses them across restarts.
//!
//! Interface used by the rest of the installer (owned by the accelerator work; the installer
//! only calls these):
//! - [`start`]: called once at start-up; never fails the installer. Returns what happened, for
//!   the log line, the readiness detail and the `fastpath_accel_*` metrics.
//! - [`pod_counters`]: per-pod counters for /metrics.
//! - [`status_report`]: the state of the pins, for `install-cni accel-status`.
//! - [`uninstall`]: drains every connection to TCP, then detaches and unpins everything
//!   (`crate::uninstall`: on SIGTERM when the agent decided it is an uninstall, and the
//!   uninstall commands).
//!
//! Pins under `pin_dir`: the maps by name (`FP_*`), `prog_sockops`, `prog_skmsg`,
//! `prog_rx_consumed`, `link_sockops` (cgroup link on the cgroup v2 root), `link_skmsg`
//! (sockhash link) and `link_rx_consumed` (raw tracepoint `sock:sock_recv_length`, which
//! counts what readers take from their redirect queues). The pinned links keep everything
//! attached when the installer exits; a restart of the same build loads nothing; a new build
//! swaps programs in the cgroup and sockhash links with BPF_LINK_UPDATE, and replaces the
//! tracepoint link (which cannot be updated) by detaching the old one, then attaching its own.
//!
//! Files: this one holds the settings and the start; `load` the loading and attaching,
//! `read_filter` the tracepoint's read filter, `status` the counters and `accel-status`,
//! `removal` the detach and the uninstall (with `drain`), `retire` the retired connection
//! maps, `plan` the pure decisions, `features` the kernel features and their fallbacks,
//! `foreign` other accelerators, `pindir` the checks on the pin dir, `sys` the link and program
//! commands aya lacks. The maps themselves, the ABI stamp, the pod records and enrollment are
//! fastpath-pins' (`pins/`), which the plugin and the tests use too.
pub mod drain;
pub mod features;
pub mod foreign;
mod load;
mod pindir;
mod plan;
pub use plan::CONNECTION_MAPS;
pub mod pods;
mod read_filter;
mod removal;
pub mod retire;
pub mod selftest;
mod status;
pub mod sys;

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, RawTracePoint, SkMsg, SockOps,
        links::FdLink,
    },
};
use fastpath_common::{
    ALL_MAPS, MAP_ABI_VERSION, MAP_LAYOUTS, RX_CONSUMED_TRACEPOINT, config_index, map_names,
    prog_names, rxq_state,
};
use fastpath_pins::Pins;
use std::{
    os::fd::AsFd as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use load::*;
pub use plan::{NodeView, cgroup2_root, host_bpffs, host_cgroup_root, object_hash};
use read_filter::*;
pub use read_filter::{ReadFilter, read_filter_bypassed, refresh_read_filter};
use removal::*;
pub use removal::{pinned_program_ids, still_loaded, still_loaded_after, uninstall};
pub use status::{PodCounters, pod_counters, status_report};

/// Pin names of the programs and links under the pin directory.
pub const PIN_PROG_SOCKOPS: &str = "prog_sockops";
pub const PIN_PROG_SKMSG: &str = "prog_skmsg";
pub const PIN_LINK_SOCKOPS: &str = "link_sockops";
pub const PIN_LINK_SKMSG: &str = "link_skmsg";
pub const PIN_PROG_RX_CONSUMED: &str = "prog_rx_consumed";
pub const PIN_LINK_RX_CONSUMED: &str = "link_rx_consumed";
pub const PIN_PROG_INGRESS_GATE: &str = "prog_ingress_gate";
pub const PIN_LINK_INGRESS_GATE: &str = "link_ingress_gate";
/// Every pinned link, in the order uninstall detaches them: first what pairs new sockets,
/// last what keeps the queues of live ones counted and their TCP bytes behind their
/// redirected ones.
pub const PINNED_LINKS: [&str; 4] = [
    PIN_LINK_SOCKOPS,
    PIN_LINK_SKMSG,
    PIN_LINK_INGRESS_GATE,
    PIN_LINK_RX_CONSUMED,
];
const PINNED_PROGS: [&str; 4] = [
    PIN_PROG_SOCKOPS,
    PIN_PROG_SKMSG,
    PIN_PROG_INGRESS_GATE,
    PIN_PROG_RX_CONSUMED,
];

/// Where and whether to accelerate.
#[derive(Clone, Debug)]
pub struct AccelSettings {
    /// False when the operator turned acceleration off (`FASTPATH_ACCELERATION=false`).
    pub enabled: bool,
    /// The bpffs mount (`/sys/fs/bpf`).
    pub bpffs: PathBuf,
    /// Our pin directory under it (`/sys/fs/bpf/fastpath`).
    pub pin_dir: PathBuf,
    /// The cgroup v2 root to attach sock_ops to.
    pub cgroup_root: CgroupRoot,
    /// `cni_agent_run_dir` (`/var/run/istio-cni`): the plugin keeps its per-pod enrollment
    /// records under `fastpath/pods/` there (counter labels, re-enrollment after an upgrade).
    pub run_dir: PathBuf,
    /// Bytes a reader may have queued before its connection goes back to TCP
    /// (`FASTPATH_MAX_QUEUED_BYTES`).
    pub max_queued_bytes: u64,
    /// How long an uninstall waits for accelerated connections to drain to TCP
    /// ([`drain::DRAIN_TIMEOUT`]).
    pub drain_timeout: std::time::Duration,
    /// Kernel features used as if absent ([`features`]).
    pub features_off: features::FeaturesOff,
}

impl AccelSettings {
    /// The deployed defaults: enabled, `/sys/fs/bpf/fastpath`, cgroup v2 found at start.
    pub fn defaults() -> Self {
        let bpffs = PathBuf::from(fastpath_common::BPFFS_ROOT);
        Self {
            enabled: true,
            pin_dir: bpffs.join(fastpath_common::PIN_DIR_NAME),
            bpffs,
            cgroup_root: CgroupRoot::FromOwnMounts,
            run_dir: PathBuf::from("/var/run/istio-cni"),
            max_queued_bytes: fastpath_common::DEFAULT_QUEUE_LIMIT_BYTES,
            drain_timeout: drain::DRAIN_TIMEOUT,
            features_off: features::FeaturesOff::default(),
        }
    }
}

/// Where sock_ops attaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupRoot {
    /// This path (`FASTPATH_CGROUP_ROOT`, or found through the host's procfs).
    At(PathBuf),
    /// The cgroup v2 mount this process sees (`/proc/self/mounts`): on the host, or in a pod
    /// that shares the host's cgroup namespace.
    FromOwnMounts,
    /// The host's root cannot be reached; acceleration is unavailable for this reason.
    Unreachable(plan::CgroupRootError),
}

/// Where Istio's chart mounts the host's procfs in the DaemonSet pod.
const HOST_PROC: &str = "/host/proc";

/// Fills in the bpffs, the pin directory and the cgroup v2 root that were not set explicitly,
/// from what this process sees of the node (see [`NodeView`]).
pub fn locate_host_paths(
    bpffs: Option<PathBuf>,
    pin_dir: Option<PathBuf>,
    cgroup_root: Option<PathBuf>,
) -> (PathBuf, PathBuf, CgroupRoot) {
    let host_proc = Path::new(HOST_PROC);
    let own_mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let host_mounts = std::fs::read_to_string(host_proc.join("1/mounts")).ok();
    let ns = |p: &Path| std::fs::read_link(p).ok();
    let own_ns = ns(Path::new("/proc/self/ns/cgroup"));
    let host_cgroup_ns = match ns(&host_proc.join("1/ns/cgroup")) {
        Some(host) => own_ns == Some(host),
        None => own_ns.is_some_and(|n| n == Path::new(plan::INIT_CGROUP_NS)),
    };
    let host_root = host_proc.join("1/root");
    let view = NodeView {
        own_mounts: &own_mounts,
        host_mounts: host_mounts.as_deref(),
        host_cgroup_ns,
        host_root: &host_root,
    };
    let bpffs = bpffs.unwrap_or_else(|| host_bpffs(&view));
    let pin_dir = pin_dir.unwrap_or_else(|| bpffs.join(fastpath_common::PIN_DIR_NAME));
    let cgroup_root = match cgroup_root {
        Some(p) => CgroupRoot::At(p),
        None => match host_cgroup_root(&view) {
            Ok(p) => CgroupRoot::At(p),
            Err(why) => CgroupRoot::Unreachable(why),
        },
    };
    (bpffs, pin_dir, cgroup_root)
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
    /// Another sockmap accelerator is attached on the node (Merbridge, Cilium, a second
    /// fastpath with another pin dir): fastpath stays off rather than pair the same sockets.
    Conflict {
        programs: Vec<foreign::ForeignProgram>,
    },
}

/// Loads or reuses the pinned accelerator and self-tests it; never fails the caller. Whatever
/// goes wrong leaves acceleration off (no new socket enters the sockhash) and says why.
pub fn start(settings: &AccelSettings) -> AccelState {
    start_with(settings, selftest::run)
}

/// [`start`] with the kernel self-test given by the caller (tests use it to make the self-test
/// fail on a kernel where it passes).
pub fn start_with(
    settings: &AccelSettings,
    self_test: impl FnOnce(&Path) -> Result<selftest::Report>,
) -> AccelState {
    if !settings.enabled {
        if let Err(e) = set_enabled(&settings.pin_dir, false) {
            log::debug!("acceleration disabled; no pinned accelerator to switch off ({e:#})");
        }
        log::info!("acceleration disabled by configuration");
        detach_if_idle(settings);
        return AccelState::Disabled;
    }
    match refuse_to_share(settings) {
        Ok(programs) if !programs.is_empty() => {
            let _ = set_enabled(&settings.pin_dir, false);
            // The agent logs the one line an operator reads (with the ids and names).
            log::debug!(
                "another sockmap accelerator is attached: {}",
                foreign::describe(&programs)
            );
            detach_if_idle(settings);
            return AccelState::Conflict { programs };
        }
        Ok(_) => {}
        Err(e) => log::debug!("looking for other accelerators: {e:#}"),
    }
    let outcome = load_or_reuse(settings).and_then(|()| {
        set_queue_limit(&settings.pin_dir, settings.max_queued_bytes)?;
        // Before the self-test, so that it counts reads through the filter; after it too,
        // for a socket an old program paired while its link was being swapped.
        let refresh = || {
            if let Err(e) = refresh_read_filter(&settings.pin_dir) {
                log::warn!("recvmsg tracepoint: every read stays looked up: {e:#}");
            }
        };
        refresh();
        let report = self_test(&settings.pin_dir)?;
        log::info!("accelerator self-test: {}", report.summary());
        refresh();
        match report.failure() {
            None => Ok(()),
            Some(why) => Err(anyhow!("kernel self-test failed: {why}")),
        }
    });
    match outcome.and_then(|()| set_enabled(&settings.pin_dir, true)) {
        Ok(()) => {
            log::info!(
                "accelerator active (pins under {})",
                settings.pin_dir.display()
            );
            AccelState::Active
        }
        Err(e) => {
            let _ = set_enabled(&settings.pin_dir, false);
            let reason = format!("{e:#}").replace('\n', " ");
            log::warn!("acceleration unavailable, traffic is redirected without it: {reason}");
            detach_if_idle(settings);
            AccelState::Unavailable { reason }
        }
    }
}

/// Programs of another accelerator attached where fastpath attaches (see [`foreign`]).
fn refuse_to_share(settings: &AccelSettings) -> Result<Vec<foreign::ForeignProgram>> {
    let cgroup = cgroup_root(settings)?;
    foreign::find(&cgroup, &settings.pin_dir)
}

fn cgroup_root(settings: &AccelSettings) -> Result<PathBuf> {
    match &settings.cgroup_root {
        CgroupRoot::At(p) => Ok(p.clone()),
        CgroupRoot::FromOwnMounts => {
            let mounts = std::fs::read_to_string("/proc/self/mounts").context("read mounts")?;
            plan::cgroup2_root(&mounts).ok_or_else(|| anyhow!("no cgroup v2 mount found"))
        }
        CgroupRoot::Unreachable(why) => Err(anyhow!("{why}")),
    }
}

/// Takes drained, demoted sockets out of the sockhash; returns how many. sock_ops does this
/// at a socket's next state change or segment, but a reader that empties its redirect queue
/// after the last TCP segment arrived gets neither: it would stay in the sockhash, where this
/// kernel reports FIONREAD = 0 over the TCP bytes waiting behind, until its connection ends.
/// The agent calls this every 100 ms.
///
/// The state is read before `queued`, in two lookups: a writer adds to `queued` before it reads
/// the state, so a writer that still saw the connection open has its bytes counted here.
pub fn sweep_demoted(pin_dir: &Path) -> Result<usize> {
    let pins = Pins::new(pin_dir);
    let demoted = pins.demoted()?;
    let cookies = demoted.keys()?;
    if cookies.is_empty() {
        return Ok(0);
    }
    let (queues, socks) = (pins.rxq()?, pins.socks()?);
    let mut released = 0;
    for cookie in cookies {
        let demoted_now =
            matches!(queues.get(&cookie), Ok(Some(q)) if q.state == rxq_state::DEMOTED);
        if !demoted_now {
            // Left the sockhash already, or closed.
            let _ = demoted.remove(&cookie);
            continue;
        }
        let drained = matches!(queues.get(&cookie), Ok(Some(q)) if q.queued as i64 <= 0);
        if drained {
            if matches!(socks.remove(&cookie), Ok(true)) {
                released += 1;
            }
            let _ = demoted.remove(&cookie);
        }
    }
    Ok(released)
}

/// Sockets in the pinned sockhash (0 when there is none).
fn accelerated_sockets(pin_dir: &Path) -> Result<usize> {
    match Pins::new(pin_dir).map(map_names::SOCKS) {
        Ok(socks) => Ok(socks.count()?),
        Err(e) if e.is_not_found() => Ok(0),
        Err(e) => Err(e).context("open the sockhash"),
    }
}

fn pin(settings_dir: &Path, name: &str) -> PathBuf {
    settings_dir.join(name)
}

fn set_enabled(pin_dir: &Path, on: bool) -> Result<()> {
    let cfg = Pins::new(pin_dir).config()?;
    cfg.set(&config_index::ACCEL_ENABLED, &(on as u32))?;
    Ok(())
}

/// Sets the queue bound, and clears a drain an uninstall left set (a start means the
/// accelerator is wanted).
fn set_queue_limit(pin_dir: &Path, bytes: u64) -> Result<()> {
    let kib = u32::try_from(bytes.div_ceil(1024))
        .with_context(|| format!("queue limit of {bytes} bytes is too large"))?;
    let cfg = Pins::new(pin_dir).config()?;
    cfg.set(&config_index::QUEUE_LIMIT_KIB, &kib)?;
    cfg.set(&config_index::DRAIN, &0)?;
    Ok(())
}
