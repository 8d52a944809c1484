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
pub mod drain;
pub mod features;
pub mod foreign;
mod pindir;
mod plan;
pub mod pods;
pub mod retire;
pub mod selftest;
pub mod sys;

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuHashMap, SockHash},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, RawTracePoint, SkMsg, SockOps,
        links::FdLink,
    },
};
use fastpath_common::{
    ALL_MAPS, IpKey, MAP_ABI_VERSION, MAP_LAYOUTS, PodInfo, PodStats, RX_CONSUMED_TRACEPOINT,
    RxQueue, config_index, map_names, meta_index, prog_names, rxq_state,
};
use std::{
    os::fd::AsFd as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

pub use plan::{NodeView, cgroup2_root, host_bpffs, host_cgroup_root, object_hash};

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
    Unreachable(String),
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

/// With acceleration off, attached programs would only cost: sock_ops runs for every TCP
/// connection on the node, the tracepoint for every recvmsg. They are detached (all pins
/// removed) unless sockets are still accelerated: those finish on their programs, and the
/// next start that finds none detaches.
fn detach_if_idle(settings: &AccelSettings) {
    if !settings.pin_dir.exists() {
        return;
    }
    let live = accelerated_sockets(&settings.pin_dir)
        .and_then(|n| Ok(n + retire::accelerated_sockets_in_sets(&settings.pin_dir)?));
    match live {
        Ok(0) => match uninstall(settings) {
            Ok(()) => log::info!("acceleration off: programs detached, nothing left attached"),
            Err(e) => log::warn!("acceleration off: detaching the programs failed: {e:#}"),
        },
        Ok(n) => log::info!(
            "acceleration off: {n} sockets are still accelerated, so the programs stay attached \
             (with no new connection accelerated) until a start finds none"
        ),
        Err(e) => log::warn!(
            "acceleration off: cannot count accelerated sockets ({e:#}); the programs stay \
             attached, with no new connection accelerated"
        ),
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
    let mut demoted: HashMap<MapData, u64, u64> =
        pinned_map(pin_dir, map_names::DEMOTED)?.try_into()?;
    let cookies: Vec<u64> = demoted.keys().filter_map(Result::ok).collect();
    if cookies.is_empty() {
        return Ok(0);
    }
    let queues: HashMap<MapData, u64, RxQueue> = pinned_map(pin_dir, map_names::RXQ)?.try_into()?;
    let mut socks: SockHash<MapData, u64> = pinned_map(pin_dir, map_names::SOCKS)?.try_into()?;
    let mut released = 0;
    for cookie in cookies {
        let demoted_now = matches!(queues.get(&cookie, 0), Ok(q) if q.state == rxq_state::DEMOTED);
        if !demoted_now {
            // Left the sockhash already, or closed.
            let _ = demoted.remove(&cookie);
            continue;
        }
        let drained = matches!(queues.get(&cookie, 0), Ok(q) if q.queued as i64 <= 0);
        if drained {
            if socks.remove(&cookie).is_ok() {
                released += 1;
            }
            let _ = demoted.remove(&cookie);
        }
    }
    Ok(released)
}

/// Whether the recvmsg tracepoint trusts its read filter ([`config_index::READ_FILTER_BYPASS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFilter {
    /// Reads of sockets whose filter slot is empty are skipped without a lookup.
    InUse,
    /// Every read is looked up: `uncounted` paired sockets are missing from the filter.
    Bypassed { uncounted: usize },
}

/// Paired sockets missing from the read filter: listed in FP_SK_COOKIES, not in FP_SK_COUNTED.
/// Only a build without the filter pairs such sockets.
fn uncounted_paired_sockets(pin_dir: &Path) -> Result<usize> {
    let cookies: HashMap<MapData, u64, u64> =
        pinned_map(pin_dir, map_names::SK_COOKIES)?.try_into()?;
    let counted: HashMap<MapData, u64, u64> =
        pinned_map(pin_dir, map_names::SK_COUNTED)?.try_into()?;
    Ok(cookies
        .keys()
        .filter_map(Result::ok)
        .filter(|sk| counted.get(sk, 0).is_err())
        .count())
}

fn set_read_filter_bypass(pin_dir: &Path, on: bool) -> Result<()> {
    let mut cfg: Array<MapData, u32> = pinned_map(pin_dir, map_names::CONFIG)?.try_into()?;
    cfg.set(config_index::READ_FILTER_BYPASS, on as u32, 0)?;
    Ok(())
}

/// Whether the recvmsg tracepoint looks every read up ([`config_index::READ_FILTER_BYPASS`]).
pub fn read_filter_bypassed(pin_dir: &Path) -> Result<bool> {
    let cfg: Array<MapData, u32> = pinned_map(pin_dir, map_names::CONFIG)?.try_into()?;
    Ok(cfg.get(&config_index::READ_FILTER_BYPASS, 0)? != 0)
}

/// Puts the read filter in use when no paired socket is missing from it, bypasses it
/// otherwise, and returns its state. Sockets go missing only while a build without the filter
/// pairs them (or while an old program is still finishing as its link is swapped), so after
/// an upgrade their number only falls. Walks every paired socket: the agent calls it every few
/// seconds only while the filter is bypassed.
pub fn refresh_read_filter(pin_dir: &Path) -> Result<ReadFilter> {
    let was_bypassed = read_filter_bypassed(pin_dir)?;
    let state = match uncounted_paired_sockets(pin_dir)? {
        0 => ReadFilter::InUse,
        uncounted => ReadFilter::Bypassed { uncounted },
    };
    let bypass = state != ReadFilter::InUse;
    if bypass != was_bypassed {
        set_read_filter_bypass(pin_dir, bypass)?;
        match state {
            ReadFilter::InUse => log::info!("recvmsg tracepoint: read filter in use"),
            ReadFilter::Bypassed { uncounted } => log::info!(
                "recvmsg tracepoint: {uncounted} paired sockets are not in its read filter \
                 (paired by a previous build); every read is looked up until they close"
            ),
        }
    }
    Ok(state)
}

/// Unmarks every socket counted in the read filter (see [`load_or_reuse`]).
fn forget_counted_sockets(pin_dir: &Path) -> Result<()> {
    let mut counted: HashMap<MapData, u64, u64> =
        pinned_map(pin_dir, map_names::SK_COUNTED)?.try_into()?;
    let sockets: Vec<u64> = counted.keys().filter_map(Result::ok).collect();
    for sk in sockets {
        let _ = counted.remove(&sk);
    }
    Ok(())
}

/// The runtime switches in FP_CONFIG (empty when there is no such pin).
fn read_config(pin_dir: &Path) -> Vec<u32> {
    let Ok(cfg) = pinned_map(pin_dir, map_names::CONFIG)
        .and_then(|m| Array::<MapData, u32>::try_from(m).map_err(Into::into))
    else {
        return Vec::new();
    };
    cfg.iter().map_while(Result::ok).collect()
}

/// Writes switches read by [`read_config`] into the pinned FP_CONFIG, as far as both reach.
fn write_config(pin_dir: &Path, values: &[u32]) -> Result<()> {
    let mut cfg: Array<MapData, u32> = pinned_map(pin_dir, map_names::CONFIG)?.try_into()?;
    for (index, value) in (0..cfg.len()).zip(values) {
        cfg.set(index, *value, 0)?;
    }
    Ok(())
}

/// Sockets in the pinned sockhash (0 when there is none).
fn accelerated_sockets(pin_dir: &Path) -> Result<usize> {
    let socks = match sys::obj_get(&pin(pin_dir, map_names::SOCKS)) {
        Ok(fd) => fd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).context("open the sockhash"),
    };
    let ids = sys::map_ids(socks.as_fd())?;
    sys::map_entry_count(socks.as_fd(), ids.key_size)
}

fn pin(settings_dir: &Path, name: &str) -> PathBuf {
    settings_dir.join(name)
}

fn pinned_map(pin_dir: &Path, name: &str) -> Result<Map> {
    let path = pin(pin_dir, name);
    let data = MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

fn set_enabled(pin_dir: &Path, on: bool) -> Result<()> {
    let mut cfg: Array<MapData, u32> = pinned_map(pin_dir, map_names::CONFIG)?.try_into()?;
    cfg.set(config_index::ACCEL_ENABLED, on as u32, 0)?;
    Ok(())
}

/// Sets the queue bound, and clears a drain an uninstall left set (a start means the
/// accelerator is wanted).
fn set_queue_limit(pin_dir: &Path, bytes: u64) -> Result<()> {
    let kib = u32::try_from(bytes.div_ceil(1024))
        .with_context(|| format!("queue limit of {bytes} bytes is too large"))?;
    let mut cfg: Array<MapData, u32> = pinned_map(pin_dir, map_names::CONFIG)?.try_into()?;
    cfg.set(config_index::QUEUE_LIMIT_KIB, kib, 0)?;
    cfg.set(config_index::DRAIN, 0, 0)?;
    Ok(())
}

fn read_meta(pin_dir: &Path) -> Option<(u64, u64)> {
    let meta: Array<MapData, u64> = pinned_map(pin_dir, map_names::META).ok()?.try_into().ok()?;
    let abi = meta.get(&meta_index::ABI_VERSION, 0).ok()?;
    let hash = meta.get(&meta_index::OBJECT_HASH, 0).ok()?;
    (abi != 0).then_some((abi, hash))
}

fn write_meta(pin_dir: &Path, hash: u64) -> Result<()> {
    let mut meta: Array<MapData, u64> = pinned_map(pin_dir, map_names::META)?.try_into()?;
    meta.set(meta_index::ABI_VERSION, MAP_ABI_VERSION as u64, 0)?;
    meta.set(meta_index::OBJECT_HASH, hash, 0)?;
    Ok(())
}

fn pinned_map_ids(pin_dir: &Path, name: &str) -> Option<sys::MapIds> {
    let fd = sys::obj_get(&pin(pin_dir, name)).ok()?;
    sys::map_ids(fd.as_fd()).ok()
}

fn check_kernel(settings: &AccelSettings) -> Result<PathBuf> {
    if !crate::probes::embedded() {
        bail!("this build carries no eBPF probes (built with AYA_BUILD_SKIP)");
    }
    if settings.features_off.recvmsg_tracepoint {
        bail!(
            "the sock:{RX_CONSUMED_TRACEPOINT} tracepoint is switched off \
             (FASTPATH_KERNEL_FEATURES_OFF=recvmsg-tracepoint): without it no redirect queue can \
             be bounded"
        );
    }
    sys::ensure_bpffs(&settings.bpffs).context("bpffs")?;
    let cgroup = cgroup_root(settings)?;
    sys::current_netns_cookie().context("netns cookie")?;
    Ok(cgroup)
}

/// Makes the pinned accelerator this build's: reuses it when it already is, upgrades it in
/// place otherwise.
fn load_or_reuse(settings: &AccelSettings) -> Result<()> {
    let cgroup = check_kernel(settings)?;
    let dir = &settings.pin_dir;
    pindir::prepare(dir)?;

    // Retired connection maps whose last connection closed while no agent ran.
    if let Err(e) = retire::sweep(dir) {
        log::warn!("retired connection maps: {e:#}");
    }
    let ours = plan::object_hash(crate::probes::OBJECT);
    let stored = read_meta(dir);
    let mut verdicts: Vec<plan::MapVerdict> = MAP_LAYOUTS
        .iter()
        .map(|l| {
            plan::map_verdict(
                pinned_map_ids(dir, l.name),
                l,
                stored.map(|s| s.0),
                MAP_ABI_VERSION as u64,
            )
        })
        .collect();
    let pinned = plan::Pinned {
        sockops_link: pin(dir, PIN_LINK_SOCKOPS).exists(),
        skmsg_link: pin(dir, PIN_LINK_SKMSG).exists() || skmsg_prog_attached(dir),
        rx_consumed_link: pin(dir, PIN_LINK_RX_CONSUMED).exists(),
        ingress_gate_link: pin(dir, PIN_LINK_INGRESS_GATE).exists(),
        object_hash: stored.map(|s| s.1),
    };
    if plan::reuse_everything(&pinned, &verdicts, ours) {
        log::info!(
            "accelerator already loaded by this build: reusing the pins in {}",
            dir.display()
        );
        restrict_pins(dir)?;
        return Ok(());
    }

    let retiring = plan::must_retire(MAP_LAYOUTS.iter().map(|l| l.name).zip(&verdicts));
    if retiring {
        let set = retire::retire(dir)?;
        log::warn!(
            "connection maps of another layout are pinned: moved to {} with the programs that \
             serve the connections paired in them, which stay attached until the last of those \
             closes; new connections are paired in new maps",
            set.display()
        );
        for (layout, verdict) in MAP_LAYOUTS.iter().zip(verdicts.iter_mut()) {
            if plan::CONNECTION_MAPS.contains(&layout.name) {
                *verdict = plan::MapVerdict::Create;
            }
        }
    }

    // The runtime switches outlive a recreated FP_CONFIG: the new programs read them as soon
    // as they are swapped in, long before start() writes them again (zeros would switch
    // acceleration off and reset the queue bound for live connections in between).
    let config_kept = read_config(dir);
    let mut recreated = Vec::new();
    for (layout, verdict) in MAP_LAYOUTS.iter().zip(&verdicts) {
        if let plan::MapVerdict::Recreate(reason) = verdict {
            log::warn!("map {}: recreating it: {reason}", layout.name);
            std::fs::remove_file(pin(dir, layout.name))?;
            recreated.push(layout.name);
        }
    }
    let btf = features::kernel_btf(&settings.features_off);
    let mut ebpf = EbpfLoader::new()
        .btf(btf.as_ref())
        .default_map_pin_directory(dir)
        .load(crate::probes::OBJECT)
        .context("load the probes")?;
    if recreated.contains(&map_names::CONFIG) {
        write_config(dir, &config_kept)?;
    }

    let sockops: &mut SockOps = program(&mut ebpf, prog_names::SOCK_OPS)?;
    sockops.load().context("verifier rejected sock_ops")?;
    let sockops_link_pin = pin(dir, PIN_LINK_SOCKOPS);
    if let Ok(link) = sys::obj_get(&sockops_link_pin) {
        sys::link_update(link.as_fd(), sockops.fd()?.as_fd())
            .context("swap the sock_ops program")?;
        log::info!("sock_ops: new program swapped into the pinned cgroup link");
    } else {
        let cg = std::fs::File::open(&cgroup)
            .with_context(|| format!("open cgroup {}", cgroup.display()))?;
        // A cgroup bpf_link always coexists with other programs (multi-attach); the kernel
        // rejects the explicit BPF_F_ALLOW_MULTI flag on link creation, so pass none.
        let id = sockops
            .attach(&cg, CgroupAttachMode::Single)
            .with_context(|| format!("attach sock_ops to {}", cgroup.display()))?;
        let link: FdLink = sockops.take_link(id)?.try_into()?;
        link.pin(&sockops_link_pin)?;
        log::info!("sock_ops: attached to {} and pinned", cgroup.display());
    }
    replace_program_pin(sockops.fd()?.as_fd(), &pin(dir, PIN_PROG_SOCKOPS))?;
    attach_ingress_gate(&mut ebpf, &cgroup, dir)?;
    if recreated.contains(&map_names::SK_FILTER) {
        // The counts are gone with the old filter; the sockets marked as counted are not
        // (counted in the new one, they would be skipped): unmarked, they keep the filter
        // bypassed until they close. Done after the swap, so no old program marks any more.
        forget_counted_sockets(dir)?;
    }

    let socks_fd = sys::obj_get(&pin(dir, map_names::SOCKS)).context("open the sockhash")?;
    let skmsg: &mut SkMsg = program(&mut ebpf, prog_names::SK_MSG)?;
    skmsg.load().context("verifier rejected sk_msg")?;
    let skmsg_link_pin = pin(dir, PIN_LINK_SKMSG);
    let old_link = sys::obj_get(&skmsg_link_pin).ok();
    let socks_reused = MAP_LAYOUTS
        .iter()
        .zip(&verdicts)
        .any(|(l, v)| l.name == map_names::SOCKS && *v == plan::MapVerdict::Reuse);
    match old_link {
        Some(link) if socks_reused => {
            sys::link_update(link.as_fd(), skmsg.fd()?.as_fd())
                .context("swap the sk_msg program")?;
            log::info!("sk_msg: new program swapped into the pinned sockhash link");
        }
        _ => {
            let linked = match settings.features_off.sockmap_link {
                true => Err(anyhow!(
                    "sockmap links switched off (FASTPATH_KERNEL_FEATURES_OFF=sockmap-link)"
                )),
                false => sys::sockmap_link_create(
                    skmsg.fd()?.as_fd(),
                    socks_fd.as_fd(),
                    sys::BPF_SK_MSG_VERDICT,
                ),
            };
            let _ = std::fs::remove_file(&skmsg_link_pin);
            match linked {
                Ok(link) => {
                    sys::obj_pin(link.as_fd(), &skmsg_link_pin)?;
                    log::info!("sk_msg: attached to the sockhash and pinned");
                }
                Err(e) => {
                    // Before Linux 6.10: attached to the map itself, which keeps it as long
                    // as the sockhash is pinned (a new build's attach replaces it).
                    sys::sockmap_prog_attach(
                        skmsg.fd()?.as_fd(),
                        socks_fd.as_fd(),
                        sys::BPF_SK_MSG_VERDICT,
                    )?;
                    log::info!(
                        "sk_msg: attached to the sockhash with BPF_PROG_ATTACH ({e:#}); it stays \
                         attached while the sockhash is pinned"
                    );
                }
            }
        }
    }
    replace_program_pin(skmsg.fd()?.as_fd(), &pin(dir, PIN_PROG_SKMSG))?;

    // The programs replaced may have paired sockets without counting them in the read filter
    // (a build without it, or one still running when its link was swapped): the new
    // tracepoint looks every read up until start() finds none left.
    set_read_filter_bypass(dir, true)?;
    attach_rx_consumed(&mut ebpf, dir)?;

    write_meta(dir, ours)?;
    // Fresh enrollment maps (first start, reboot, layout change): pods recorded by the plugin
    // are enrolled again.
    let fresh = |name| {
        MAP_LAYOUTS
            .iter()
            .zip(&verdicts)
            .any(|(l, v)| l.name == name && *v != plan::MapVerdict::Reuse)
    };
    if fresh(map_names::PODS) || fresh(map_names::POD_IPS) {
        reenroll(settings)?;
    }
    restrict_pins(dir)?;
    Ok(())
}

/// Whether the pinned sk_msg program is attached to the pinned sockhash with BPF_PROG_ATTACH
/// (kernels without sockmap links; see [`features`]).
fn skmsg_prog_attached(dir: &Path) -> bool {
    let (Ok(socks), Ok(info)) = (
        sys::obj_get(&pin(dir, map_names::SOCKS)),
        aya::programs::ProgramInfo::from_pin(pin(dir, PIN_PROG_SKMSG)),
    ) else {
        return false;
    };
    sys::prog_query(socks.as_fd(), sys::BPF_SK_MSG_VERDICT)
        .is_ok_and(|ids| ids.contains(&info.id()))
}

/// Loads the raw tracepoint that counts what readers take from their redirect queues and
/// attaches it in place of the previous build's. The previous one is detached first: two
/// attached at once would count a read twice, and a queue counted emptier than it is could
/// let a demoted socket leave the sockhash with bytes still queued (they would be lost). A
/// read missed in the gap only keeps a queue counted fuller than it is, which is safe.
/// Without the tracepoint no queue is bounded, so it is required.
fn attach_rx_consumed(ebpf: &mut aya::Ebpf, dir: &Path) -> Result<()> {
    let prog: &mut RawTracePoint = program(ebpf, prog_names::RX_CONSUMED)?;
    prog.load()
        .context("verifier rejected the recvmsg tracepoint program")?;
    let link_pin = pin(dir, PIN_LINK_RX_CONSUMED);
    match std::fs::remove_file(&link_pin) {
        Ok(()) => log::info!("recvmsg tracepoint: previous build's detached"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove {}", link_pin.display())),
    }
    let id = prog.attach(RX_CONSUMED_TRACEPOINT).with_context(|| {
        format!(
            "attach to tracepoint sock:{RX_CONSUMED_TRACEPOINT} (Linux 6.4+), needed to bound \
             redirect queues"
        )
    })?;
    let link: FdLink = prog.take_link(id)?.into();
    link.pin(&link_pin)?;
    log::info!("recvmsg tracepoint: attached and pinned");
    replace_program_pin(prog.fd()?.as_fd(), &pin(dir, PIN_PROG_RX_CONSUMED))
}

/// Loads the cgroup ingress program that keeps TCP payload out of a socket until its reader
/// has read every redirected byte, and swaps it into the pinned link (or attaches it to the
/// cgroup v2 root). Required: without it a demoted connection's reader could see both queues.
fn attach_ingress_gate(ebpf: &mut aya::Ebpf, cgroup: &Path, dir: &Path) -> Result<()> {
    let prog: &mut CgroupSkb = program(ebpf, prog_names::INGRESS_GATE)?;
    prog.load()
        .context("verifier rejected the cgroup ingress program")?;
    let link_pin = pin(dir, PIN_LINK_INGRESS_GATE);
    if let Ok(link) = sys::obj_get(&link_pin) {
        sys::link_update(link.as_fd(), prog.fd()?.as_fd())
            .context("swap the cgroup ingress program")?;
        log::info!("cgroup ingress: new program swapped into the pinned link");
    } else {
        let cg = std::fs::File::open(cgroup)
            .with_context(|| format!("open cgroup {}", cgroup.display()))?;
        let id = prog
            .attach(&cg, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
            .with_context(|| format!("attach cgroup_skb ingress to {}", cgroup.display()))?;
        let link: FdLink = prog.take_link(id)?.try_into()?;
        link.pin(&link_pin)?;
        log::info!(
            "cgroup ingress: attached to {} and pinned",
            cgroup.display()
        );
    }
    replace_program_pin(prog.fd()?.as_fd(), &pin(dir, PIN_PROG_INGRESS_GATE))
}

/// The program `name` of the loaded object, as its type.
fn program<'a, T>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("no {name} in the object"))?;
    Ok(prog.try_into()?)
}

fn replace_program_pin(prog: std::os::fd::BorrowedFd<'_>, path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    sys::obj_pin(prog, path)
}

/// Root only: 0600 pins, 0700 directories (the retired sets'; the pin directory itself was
/// checked). Symlinks are left alone: chmod would follow them.
fn restrict_pins(dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(d) => d,
        // A retired set the agent's sweep removed meanwhile.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("list {}", dir.display())),
    };
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_symlink() {
            continue;
        }
        let mode = if t.is_dir() { 0o700 } else { 0o600 };
        match std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(mode)) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err).with_context(|| format!("chmod {}", e.path().display())),
        }
        if t.is_dir() {
            restrict_pins(&e.path())?;
        }
    }
    Ok(())
}

/// Writes every recorded pod back into freshly created enrollment maps.
fn reenroll(settings: &AccelSettings) -> Result<()> {
    let dir = &settings.pin_dir;
    let mut pods_map: HashMap<MapData, u64, PodInfo> =
        pinned_map(dir, map_names::PODS)?.try_into()?;
    let mut ips_map: HashMap<MapData, IpKey, u64> =
        pinned_map(dir, map_names::POD_IPS)?.try_into()?;
    let records: Vec<_> = pods::read_all(&settings.run_dir)?
        .into_iter()
        .filter(|r| r.accelerate)
        .collect();
    for r in &records {
        for k in r.ip_keys() {
            ips_map.insert(k, r.netns_cookie, 0)?;
        }
        pods_map.insert(r.netns_cookie, r.pod_info(), 0)?;
    }
    log::info!(
        "re-enrolled {} pods from {}",
        records.len(),
        pods::state_dir(&settings.run_dir).display()
    );
    Ok(())
}

/// One enrolled pod's counters, summed over CPUs, with the pod's identity when known.
#[derive(Clone, Debug, Default)]
pub struct PodCounters {
    pub netns_cookie: u64,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub stats: fastpath_common::PodStats,
}

fn add(into: &mut PodStats, s: &PodStats) {
    into.sockets_enrolled += s.sockets_enrolled;
    into.enroll_failures += s.enroll_failures;
    into.msgs_redirected += s.msgs_redirected;
    into.bytes_redirected += s.bytes_redirected;
    into.peer_misses += s.peer_misses;
    into.connections_paired += s.connections_paired;
    into.early_data_fallbacks += s.early_data_fallbacks;
    into.queue_demotions += s.queue_demotions;
    into.tcp_segments_held += s.tcp_segments_held;
}

/// Per-pod counters for /metrics. Empty when the accelerator is not pinned.
pub fn pod_counters(settings: &AccelSettings) -> Result<Vec<PodCounters>> {
    if !pin(&settings.pin_dir, map_names::STATS).exists() {
        return Ok(Vec::new());
    }
    let stats: PerCpuHashMap<MapData, u64, PodStats> =
        pinned_map(&settings.pin_dir, map_names::STATS)?.try_into()?;
    let records = pods::read_all(&settings.run_dir).unwrap_or_default();
    let mut out = Vec::new();
    for cookie in stats.keys() {
        let cookie = cookie?;
        let Ok(per_cpu) = stats.get(&cookie, 0) else {
            continue;
        };
        let mut sum = PodStats::default();
        for s in per_cpu.iter() {
            add(&mut sum, s);
        }
        let who = records.iter().find(|r| r.netns_cookie == cookie);
        out.push(PodCounters {
            netns_cookie: cookie,
            namespace: who.map(|r| r.namespace.clone()),
            name: who.map(|r| r.name.clone()),
            stats: sum,
        });
    }
    out.sort_by_key(|c| c.netns_cookie);
    Ok(out)
}

/// Human-readable state of the pins, for `install-cni accel-status`.
pub fn status_report(settings: &AccelSettings) -> Result<String> {
    use std::fmt::Write as _;
    let dir = &settings.pin_dir;
    let others = match refuse_to_share(settings) {
        Ok(p) if p.is_empty() => "other sockmap accelerators: none".to_string(),
        Ok(p) => format!(
            "other sockmap accelerators: {} (acceleration stays off while they are attached)",
            foreign::describe(&p)
        ),
        Err(e) => format!("other sockmap accelerators: unknown ({e:#})"),
    };
    if !dir.exists() {
        return Ok(format!(
            "no accelerator pins under {}\n{others}",
            dir.display()
        ));
    }
    let mut s = String::new();
    writeln!(s, "pin directory: {}", dir.display())?;
    writeln!(s, "{others}")?;
    match read_meta(dir) {
        Some((abi, hash)) => writeln!(s, "ABI stamp: map ABI {abi}, object {hash:016x}")?,
        None => writeln!(s, "ABI stamp: missing")?,
    }
    writeln!(
        s,
        "this build: map ABI {MAP_ABI_VERSION}, object {:016x}",
        plan::object_hash(crate::probes::OBJECT)
    )?;
    let retired = retire::sets(dir);
    if !retired.is_empty() {
        let sockets = retire::accelerated_sockets_in_sets(dir)
            .map(|n| n.to_string())
            .unwrap_or_else(|e| format!("? ({e:#})"));
        writeln!(
            s,
            "retired connection maps: {} set(s) with {sockets} socket(s), removed when their \
             last connection closes",
            retired.len()
        )?;
    }
    for link in PINNED_LINKS {
        match sys::obj_get(&pin(dir, link)).map_err(anyhow::Error::from) {
            Ok(fd) => {
                let ids = sys::link_ids(fd.as_fd())?;
                writeln!(
                    s,
                    "link {link}: id {} type {} program id {}",
                    ids.id, ids.link_type, ids.prog_id
                )?;
            }
            Err(e) => writeln!(s, "link {link}: not pinned ({e})")?,
        }
    }
    for prog in PINNED_PROGS {
        match aya::programs::ProgramInfo::from_pin(pin(dir, prog)) {
            Ok(info) => writeln!(
                s,
                "program {prog}: id {} name {}",
                info.id(),
                info.name_as_str().unwrap_or("?")
            )?,
            Err(e) => writeln!(s, "program {prog}: not pinned ({e})")?,
        }
    }
    for name in ALL_MAPS {
        match sys::obj_get(&pin(dir, name)) {
            Ok(fd) => {
                let ids = sys::map_ids(fd.as_fd())?;
                let entries = sys::map_entry_count(fd.as_fd(), ids.key_size)
                    .map(|n| n.to_string())
                    .unwrap_or_else(|e| format!("? ({e})"));
                writeln!(
                    s,
                    "map {name}: id {} entries {entries} (max {})",
                    ids.id, ids.max_entries
                )?;
            }
            Err(e) => writeln!(s, "map {name}: not pinned ({e})")?,
        }
    }
    if let Ok(cfg) = pinned_map(dir, map_names::CONFIG)
        .and_then(|m| Array::<MapData, u32>::try_from(m).map_err(Into::into))
    {
        let on = cfg.get(&config_index::ACCEL_ENABLED, 0).unwrap_or(0);
        writeln!(
            s,
            "acceleration switch: {}",
            if on != 0 { "on" } else { "off" }
        )?;
        let kib = cfg.get(&config_index::QUEUE_LIMIT_KIB, 0).unwrap_or(0);
        let limit = match kib {
            0 => fastpath_common::DEFAULT_QUEUE_LIMIT_BYTES,
            k => u64::from(k) << 10,
        };
        writeln!(s, "redirect queue limit: {limit} bytes per reader")?;
    }
    if let Ok(filter) = pinned_map(dir, map_names::SK_FILTER)
        .and_then(|m| Array::<MapData, u64>::try_from(m).map_err(Into::into))
    {
        let used = filter
            .iter()
            .filter(|v| matches!(v, Ok(n) if *n != 0))
            .count();
        let state = match read_filter_bypassed(dir) {
            Ok(false) => "in use",
            Ok(true) => "bypassed (every read is looked up)",
            Err(_) => "unknown",
        };
        let missing = uncounted_paired_sockets(dir)
            .map(|n| n.to_string())
            .unwrap_or_else(|e| format!("? ({e:#})"));
        writeln!(
            s,
            "recvmsg read filter: {state}; paired sockets not in it: {missing}; {used} of {} \
             slots hold paired sockets",
            filter.len()
        )?;
    }
    Ok(s)
}

/// Ids of the programs fastpath has pinned under `pin_dir`, directly or through its links, in
/// the current set and the retired ones: what an uninstall must leave unloaded.
pub fn pinned_program_ids(pin_dir: &Path) -> Vec<u32> {
    let mut dirs = vec![pin_dir.to_path_buf()];
    dirs.extend(retire::sets(pin_dir));
    let mut ids = Vec::new();
    for dir in &dirs {
        for name in PINNED_PROGS {
            if let Ok(info) = aya::programs::ProgramInfo::from_pin(pin(dir, name)) {
                ids.push(info.id());
            }
        }
        for name in PINNED_LINKS {
            if let Ok(fd) = sys::obj_get(&pin(dir, name))
                && let Ok(link) = sys::link_ids(fd.as_fd())
            {
                ids.push(link.prog_id);
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The programs of `ids` that are still loaded, as `name (id N)`.
pub fn still_loaded(ids: &[u32]) -> Vec<String> {
    aya::programs::loaded_programs()
        .flatten()
        .filter(|p| ids.contains(&p.id()))
        .map(|p| format!("{} (id {})", p.name_as_str().unwrap_or("?"), p.id()))
        .collect()
}

/// Removes every pin and detaches everything: unpinning the links detaches the programs;
/// the maps go when the last program using them is gone.
pub fn uninstall(settings: &AccelSettings) -> Result<()> {
    let dir = &settings.pin_dir;
    if !dir.exists() {
        log::info!("nothing to uninstall under {}", dir.display());
        return Ok(());
    }
    pindir::check(dir)?;
    match drain::drain(dir, settings.drain_timeout) {
        Ok(0) => log::info!("acceleration: every connection is back on TCP"),
        Ok(left) => log::warn!(
            "acceleration: {left} sockets still accelerated after {:?} (their readers did not \
             read what was sent to them); they keep fastpath's programs loaded until they close",
            settings.drain_timeout
        ),
        Err(e) => log::warn!("acceleration: draining connections to TCP: {e:#}"),
    }
    let _ = set_enabled(dir, false);
    retire::remove_all(dir)?;
    let mut names: Vec<PathBuf> = PINNED_LINKS.iter().map(|n| pin(dir, n)).collect();
    let mut foreign = Vec::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let own = e.file_name().to_str().is_some_and(pindir::is_own);
        if !own {
            foreign.push(e.path().display().to_string());
        } else if !names.contains(&e.path()) {
            names.push(e.path());
        }
    }
    for p in names {
        match std::fs::remove_file(&p) {
            Ok(()) => log::info!("removed {}", p.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", p.display())),
        }
    }
    if !foreign.is_empty() {
        log::warn!(
            "left in {}: {} (not fastpath's pins)",
            dir.display(),
            foreign.join(", ")
        );
        return Ok(());
    }
    std::fs::remove_dir(dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(())
}
