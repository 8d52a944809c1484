//! Retired connection maps. A build whose connection maps differ from the pinned ones (another
//! layout or map ABI, [`plan::CONNECTION_MAPS`]) pairs new connections in maps of its own. The
//! connections already paired cannot move: their sockets keep the old `sk_msg` program, which
//! uses the old maps. They stay correct only while the old recvmsg tracepoint counts their
//! reads and the old ingress gate holds their TCP bytes behind their redirected ones (the new
//! programs do not know them, so a demotion would let a reader see two queues at once, and a
//! proxy would take its short read as the end of the stream).
//!
//! So the old maps and those two links move to `retired/<n>/` under the pin dir and stay
//! attached beside the new ones. Each socket is in one set only, so nothing is counted twice.
//! The agent's sweep serves a retired set as it serves the current one (drained demoted sockets
//! leave its sockhash) and removes it, which detaches its programs, once its sockhash is empty:
//! the last of those connections has closed.
use super::{
    PIN_LINK_INGRESS_GATE, PIN_LINK_RX_CONSUMED, accelerated_sockets, plan, sweep_demoted,
};
use anyhow::{Context as _, Result};
use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

/// The directory under the pin dir that holds the retired sets.
pub const RETIRED_DIR: &str = "retired";

/// The links that serve a set of connection maps after its sk_msg program's sockets are
/// paired: what counts their reads and what holds their TCP bytes back.
const SERVING_LINKS: [&str; 2] = [PIN_LINK_RX_CONSUMED, PIN_LINK_INGRESS_GATE];

/// Prefix of a set being filled (bpffs allows no dot in a name): [`sets`] does not list it, so a sweep running meanwhile (the
/// agent's, or a terminating agent's during an upgrade) cannot take it for a set whose last
/// connection closed and remove it half-filled. It was: a sweep removed a new set's empty
/// directory, the moves that followed failed with "not found" and were taken for pins that did
/// not exist, and the new build then reused the old sockhash (its sk_msg attach failed with
/// EBUSY and acceleration went off).
const FILLING_PREFIX: &str = "filling-";

/// Moves the pinned connection maps and the links that serve them into a new retired set;
/// returns its directory. What is not pinned is skipped.
pub fn retire(pin_dir: &Path) -> Result<PathBuf> {
    retire_observed(pin_dir, || {})
}

/// [`retire`], calling `after_each_move` after each pin it moved (tests run a sweep there).
#[doc(hidden)]
pub fn retire_observed(pin_dir: &Path, mut after_each_move: impl FnMut()) -> Result<PathBuf> {
    let base = pin_dir.join(RETIRED_DIR);
    std::fs::create_dir_all(&base).with_context(|| format!("create {}", base.display()))?;
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let name = now.as_nanos().to_string();
    let filling = base.join(format!("{FILLING_PREFIX}{name}"));
    std::fs::create_dir(&filling).with_context(|| format!("create {}", filling.display()))?;
    for pin in plan::CONNECTION_MAPS.iter().chain(&SERVING_LINKS) {
        let from = pin_dir.join(pin);
        match std::fs::rename(&from, filling.join(pin)) {
            Ok(()) => after_each_move(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !from.exists() => {}
            Err(e) => return Err(e).with_context(|| format!("move {}", from.display())),
        }
    }
    let set = base.join(name);
    std::fs::rename(&filling, &set)
        .with_context(|| format!("rename {} to {}", filling.display(), set.display()))?;
    Ok(set)
}

/// Completes the sets a start left half-filled when it was killed: their pins hold
/// connections like any other set's.
pub fn complete_interrupted(pin_dir: &Path) -> Result<()> {
    let base = pin_dir.join(RETIRED_DIR);
    let Ok(entries) = std::fs::read_dir(&base) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(set) = name.strip_prefix(FILLING_PREFIX) {
            std::fs::rename(e.path(), base.join(set))
                .with_context(|| format!("complete {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// The retired sets under `pin_dir`, oldest first.
pub fn sets(pin_dir: &Path) -> Vec<PathBuf> {
    let mut sets: Vec<PathBuf> = std::fs::read_dir(pin_dir.join(RETIRED_DIR))
        .map(|d| {
            d.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with(FILLING_PREFIX))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    sets.sort();
    sets
}

/// Sockets still in the retired sets' sockhashes.
pub fn accelerated_sockets_in_sets(pin_dir: &Path) -> Result<usize> {
    sets(pin_dir).iter().map(|s| accelerated_sockets(s)).sum()
}

/// Serves every retired set: drained demoted sockets leave its sockhash, and a set whose
/// sockhash is empty is removed (its programs detach). Returns how many sets remain.
pub fn sweep(pin_dir: &Path) -> Result<usize> {
    let mut remaining = 0;
    for set in sets(pin_dir) {
        if accelerated_sockets(&set)? == 0 {
            remove(&set)?;
            log::info!(
                "retired connection maps {}: their last connection closed; detached and removed",
                set.display()
            );
        } else {
            sweep_demoted(&set)?;
            remaining += 1;
        }
    }
    Ok(remaining)
}

/// Removes one retired set: its pins (which detaches its links) and its directory. Another
/// sweep (a start's, the agent's) may be removing it at the same time: what is gone is fine.
fn remove(set: &Path) -> Result<()> {
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let entries = match std::fs::read_dir(set) {
        Ok(d) => d,
        Err(e) if gone(&e) => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("list {}", set.display())),
    };
    for e in entries.flatten() {
        match std::fs::remove_file(e.path()) {
            Err(err) if !gone(&err) => {
                return Err(err).with_context(|| format!("remove {}", e.path().display()));
            }
            _ => {}
        }
    }
    match std::fs::remove_dir(set) {
        Err(e) if !gone(&e) => Err(e).with_context(|| format!("remove {}", set.display())),
        _ => Ok(()),
    }
}

/// Removes every retired set, live connections or not (uninstall).
pub fn remove_all(pin_dir: &Path) -> Result<()> {
    complete_interrupted(pin_dir)?;
    for set in sets(pin_dir) {
        remove(&set)?;
        log::info!("removed {}", set.display());
    }
    match std::fs::remove_dir(pin_dir.join(RETIRED_DIR)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}/{RETIRED_DIR}", pin_dir.display()))
        }
        _ => Ok(()),
    }
}
