//! What is pinned and counted: per-pod counters for /metrics, and `install-cni accel-status`.
use super::*;

/// One enrolled pod's counters, summed over CPUs, with the pod's identity when known.
#[derive(Clone, Debug, Default)]
pub struct PodCounters {
    pub netns_cookie: u64,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub stats: fastpath_common::PodStats,
}

/// Per-pod counters for /metrics. Empty when the accelerator is not pinned.
pub fn pod_counters(settings: &AccelSettings) -> Result<Vec<PodCounters>> {
    if !pin(&settings.pin_dir, map_names::STATS).exists() {
        return Ok(Vec::new());
    }
    let counters = Pins::new(&settings.pin_dir).pod_counters()?;
    let records = pods::read_all(&settings.run_dir).unwrap_or_default();
    let mut out = Vec::new();
    for (cookie, stats) in counters {
        let who = records.iter().find(|r| r.netns_cookie == cookie);
        out.push(PodCounters {
            netns_cookie: cookie,
            namespace: who.map(|r| r.namespace.clone()),
            name: who.map(|r| r.name.clone()),
            stats,
        });
    }
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
    match Pins::new(dir).stamp() {
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
    write_pins(&mut s, dir)?;
    write_switches(&mut s, dir)?;
    Ok(s)
}

/// The pinned links, programs and maps, with their ids and sizes.
fn write_pins(s: &mut String, dir: &Path) -> Result<()> {
    use std::fmt::Write as _;
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
            Err(_) if link == PIN_LINK_SKMSG && skmsg_prog_attached(dir) => writeln!(
                s,
                "link {link}: none; sk_msg is attached to the sockhash with BPF_PROG_ATTACH \
                 (a kernel without sockmap links, or FASTPATH_KERNEL_FEATURES_OFF=sockmap-link)"
            )?,
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
    let pins = Pins::new(dir);
    for name in ALL_MAPS {
        match pins.map(name) {
            Ok(map) => {
                let ids = map.info()?;
                let entries = map
                    .count()
                    .map(|n| n.to_string())
                    .unwrap_or_else(|e| format!("? ({e})"));
                writeln!(
                    s,
                    "map {name}: id {} entries {entries} (max {})",
                    ids.id, ids.max_entries
                )?;
            }
            Err(e) => writeln!(s, "map {name}: not pinned ({})", e.os_error())?,
        }
    }
    Ok(())
}

/// The runtime switches and the read filter's state.
fn write_switches(s: &mut String, dir: &Path) -> Result<()> {
    use std::fmt::Write as _;
    let pins = Pins::new(dir);
    if let Ok(cfg) = pins.config() {
        let switch = |index| cfg.get(&index).ok().flatten().unwrap_or(0);
        let on = switch(config_index::ACCEL_ENABLED);
        writeln!(
            s,
            "acceleration switch: {}",
            if on != 0 { "on" } else { "off" }
        )?;
        let kib = switch(config_index::QUEUE_LIMIT_KIB);
        let limit = match kib {
            0 => fastpath_common::DEFAULT_QUEUE_LIMIT_BYTES,
            k => u64::from(k) << 10,
        };
        writeln!(s, "redirect queue limit: {limit} bytes per reader")?;
        if switch(config_index::DRAIN) != 0 {
            writeln!(
                s,
                "draining: every connection is being sent back to TCP (an uninstall)"
            )?;
        }
    }
    if let Ok(filter) = pins.sk_filter() {
        let slots = filter.values().unwrap_or_default();
        let used = slots.iter().filter(|n| **n != 0).count();
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
            slots.len()
        )?;
    }
    Ok(())
}
