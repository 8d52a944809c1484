//! Loading: makes the pinned accelerator this build's (reuses the pins of the same build,
//! swaps programs into the pinned links for a new one, retires connection maps of another
//! layout), attaches each program, and re-enrolls recorded pods into fresh maps.
use super::*;

pub(super) fn check_kernel(settings: &AccelSettings) -> Result<PathBuf> {
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
    if !sys::is_cgroup2(&cgroup) {
        bail!(
            "{} is not a cgroup v2 mount: sock_ops attaches to the host's cgroup v2 root \
             (FASTPATH_CGROUP_ROOT, or found from the host's mounts)",
            cgroup.display()
        );
    }
    sys::current_netns_cookie().context("netns cookie")?;
    Ok(cgroup)
}

/// Makes the pinned accelerator this build's: reuses it when it already is, upgrades it in
/// place otherwise.
pub(super) fn load_or_reuse(settings: &AccelSettings) -> Result<()> {
    let cgroup = check_kernel(settings)?;
    let dir = &settings.pin_dir;
    pindir::prepare(dir)?;

    // Retired connection maps whose last connection closed while no agent ran.
    if let Err(e) = retire::complete_interrupted(dir) {
        log::warn!("retired connection maps: {e:#}");
    }
    if let Err(e) = retire::sweep(dir) {
        log::warn!("retired connection maps: {e:#}");
    }
    let ours = plan::object_hash(crate::probes::OBJECT);
    let stored = Pins::new(dir).stamp();
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

    attach_sock_ops(&mut ebpf, &cgroup, dir)?;
    attach_ingress_gate(&mut ebpf, &cgroup, dir)?;
    if recreated.contains(&map_names::SK_FILTER) {
        // The counts are gone with the old filter; the sockets marked as counted are not
        // (counted in the new one, they would be skipped): unmarked, they keep the filter
        // bypassed until they close. Done after the swap, so no old program marks any more.
        forget_counted_sockets(dir)?;
    }

    attach_sk_msg(
        &mut ebpf,
        dir,
        socks_reused(&verdicts),
        &settings.features_off,
    )?;

    // The programs replaced may have paired sockets without counting them in the read filter
    // (a build without it, or one still running when its link was swapped): the new
    // tracepoint looks every read up until start() finds none left.
    set_read_filter_bypass(dir, true)?;
    attach_rx_consumed(&mut ebpf, dir)?;

    Pins::new(dir).write_stamp(ours)?;
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
pub(super) fn skmsg_prog_attached(dir: &Path) -> bool {
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
pub(super) fn attach_rx_consumed(ebpf: &mut aya::Ebpf, dir: &Path) -> Result<()> {
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
pub(super) fn attach_ingress_gate(ebpf: &mut aya::Ebpf, cgroup: &Path, dir: &Path) -> Result<()> {
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
pub(super) fn program<'a, T>(ebpf: &'a mut aya::Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("no {name} in the object"))?;
    Ok(prog.try_into()?)
}

pub(super) fn replace_program_pin(prog: std::os::fd::BorrowedFd<'_>, path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    sys::obj_pin(prog, path)
}

/// Root only: 0600 pins, 0700 directories (the retired sets'; the pin directory itself was
/// checked). Symlinks are left alone: chmod would follow them.
pub(super) fn restrict_pins(dir: &Path) -> Result<()> {
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
pub(super) fn reenroll(settings: &AccelSettings) -> Result<()> {
    let records = pods::read_all(&settings.run_dir)?;
    let n = Pins::new(&settings.pin_dir).reenroll(&records)?;
    log::info!(
        "re-enrolled {n} pods from {}",
        pods::state_dir(&settings.run_dir).display()
    );
    Ok(())
}

pub(super) fn pinned_map_ids(pin_dir: &Path, name: &str) -> Option<sys::MapInfo> {
    Pins::new(pin_dir).map(name).ok()?.info().ok()
}

/// The runtime switches in FP_CONFIG (empty when there is no such pin).
pub(super) fn read_config(pin_dir: &Path) -> Vec<u32> {
    let Ok(cfg) = Pins::new(pin_dir).config() else {
        return Vec::new();
    };
    cfg.values().unwrap_or_default()
}

/// Writes switches read by [`read_config`] into the pinned FP_CONFIG, as far as both reach.
pub(super) fn write_config(pin_dir: &Path, values: &[u32]) -> Result<()> {
    let cfg = Pins::new(pin_dir).config()?;
    for (index, value) in (0..cfg.map().info()?.max_entries).zip(values) {
        cfg.set(&index, value)?;
    }
    Ok(())
}

/// Loads sock_ops and swaps it into the pinned cgroup link, or attaches it to the cgroup v2
/// root and pins the link.
pub(super) fn attach_sock_ops(ebpf: &mut aya::Ebpf, cgroup: &Path, dir: &Path) -> Result<()> {
    let sockops: &mut SockOps = program(ebpf, prog_names::SOCK_OPS)?;
    sockops.load().context("verifier rejected sock_ops")?;
    let sockops_link_pin = pin(dir, PIN_LINK_SOCKOPS);
    if let Ok(link) = sys::obj_get(&sockops_link_pin) {
        sys::link_update(link.as_fd(), sockops.fd()?.as_fd())
            .context("swap the sock_ops program")?;
        log::info!("sock_ops: new program swapped into the pinned cgroup link");
    } else {
        let cg = std::fs::File::open(cgroup)
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
    Ok(())
}

/// Loads sk_msg and swaps it into the pinned sockhash link when the sockhash is reused, or
/// attaches it to the sockhash: by a pinned link, or with BPF_PROG_ATTACH where the kernel has
/// no sockmap links (see [`features`]).
pub(super) fn attach_sk_msg(
    ebpf: &mut aya::Ebpf,
    dir: &Path,
    socks_reused: bool,
    off: &features::FeaturesOff,
) -> Result<()> {
    let socks_fd = sys::obj_get(&pin(dir, map_names::SOCKS)).context("open the sockhash")?;
    let skmsg: &mut SkMsg = program(ebpf, prog_names::SK_MSG)?;
    skmsg.load().context("verifier rejected sk_msg")?;
    let skmsg_link_pin = pin(dir, PIN_LINK_SKMSG);
    let old_link = sys::obj_get(&skmsg_link_pin).ok();
    match old_link {
        Some(link) if socks_reused => {
            sys::link_update(link.as_fd(), skmsg.fd()?.as_fd())
                .context("swap the sk_msg program")?;
            log::info!("sk_msg: new program swapped into the pinned sockhash link");
        }
        _ => {
            let linked = match off.sockmap_link {
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
    Ok(())
}

/// Whether the sockhash pinned before is used on (its layout and map ABI are this build's).
fn socks_reused(verdicts: &[plan::MapVerdict]) -> bool {
    MAP_LAYOUTS
        .iter()
        .zip(verdicts)
        .any(|(l, v)| l.name == map_names::SOCKS && *v == plan::MapVerdict::Reuse)
}
