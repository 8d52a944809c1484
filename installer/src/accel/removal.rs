//! Taking the accelerator off the node: detaching when acceleration is switched off and
//! nothing is accelerated, and the uninstall (drain, then unpin everything).
use super::*;

/// With acceleration off, attached programs would only cost: sock_ops runs for every TCP
/// connection on the node, the tracepoint for every recvmsg. They are detached (all pins
/// removed) unless sockets are still accelerated: those finish on their programs, and the
/// next start that finds none detaches.
pub(super) fn detach_if_idle(settings: &AccelSettings) {
    if !settings.pin_dir.exists() {
        return;
    }
    let live = accelerated_sockets(&settings.pin_dir)
        .and_then(|n| Ok(n + retire::accelerated_sockets_in_sets(&settings.pin_dir)?));
    match live {
        Ok(0) => {
            let ids = pinned_program_ids(&settings.pin_dir);
            match uninstall(settings) {
                // The kernel frees a detached program and its sockhash later (after an RCU
                // grace period, on a workqueue). Until then a start would find our own
                // sk_msg on a sockhash outside our pins and take it for another
                // accelerator's, so this returns once they are gone.
                Ok(()) => match still_loaded_after(&ids, std::time::Duration::from_secs(2)) {
                    gone if gone.is_empty() => {
                        log::info!("acceleration off: programs detached, nothing left attached")
                    }
                    left => log::warn!(
                        "acceleration off: programs detached, but still loaded after 2 s: {}",
                        left.join(", ")
                    ),
                },
                Err(e) => log::warn!("acceleration off: detaching the programs failed: {e:#}"),
            }
        }
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

/// The programs of `ids` still loaded after waiting up to `within` for them to go: the kernel
/// frees a program whose last reference is gone after an RCU grace period, not at once.
pub fn still_loaded_after(ids: &[u32], within: std::time::Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let loaded = still_loaded(ids);
        if loaded.is_empty() || std::time::Instant::now() >= deadline {
            return loaded;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
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
