//! Draining the accelerator before an uninstall. Detaching with connections still paired
//! would leave them on programs nobody looks after: their psocks keep the sk_msg program (and
//! with it the maps) alive, but nothing counts their reads any more, nothing holds their TCP
//! bytes behind redirected ones at a demotion, and no sweep takes a drained socket out of the
//! sockhash, so fastpath's programs stay loaded until the last of them closes. So every
//! connection goes back to TCP first, in order and without losing a byte, and only then are
//! the links detached and the pins removed.
//!
//! [`config_index::DRAIN`] makes `sk_msg` demote a connection at its next message, exactly as
//! the queue bound does (the reader reads its redirected bytes, then the TCP bytes the ingress
//! gate held behind them). A connection that sends nothing never runs `sk_msg`: a socket whose
//! redirect queue is empty is taken out of the sockhash here. That is safe once the flag is
//! set: a writer adds a message's size to its reader's count before it reads the flag (a full
//! barrier between), and this reads the count after it wrote the flag (a syscall between), so
//! a writer that missed the flag has its bytes counted here, and one that sees it redirects
//! nothing.
use super::{accelerated_sockets, set_enabled, sweep_demoted};
use anyhow::Result;
use fastpath_common::{DRAIN_ABI_VERSION, config_index, rxq_state};
use fastpath_pins::Pins;
use std::{
    path::Path,
    time::{Duration, Instant},
};

/// How long an uninstall waits for readers to read what was redirected to them. Istio's chart
/// gives the pod 30 s after SIGTERM; the rest of the uninstall takes well under a second.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends every connection paired in `pin_dir` back to TCP and waits, up to `within`, until
/// none is left in the sockhash. Returns how many are still there (readers that did not read
/// their redirected bytes in time: they keep the programs loaded until they close).
pub fn drain(pin_dir: &Path, within: Duration) -> Result<usize> {
    set_enabled(pin_dir, false)?;
    let pins = Pins::new(pin_dir);
    let cfg = pins.config()?;
    let stamped = pins.stamp().map(|(abi, _)| abi);
    let slots = cfg.map().info()?.max_entries;
    if config_index::DRAIN >= slots || stamped.is_none_or(|abi| abi < DRAIN_ABI_VERSION as u64) {
        // Pins of a build without the flag: its sk_msg would redirect into a socket taken out
        // here. Only the demoted ones can go.
        log::warn!(
            "acceleration: the pinned programs predate draining; connections still paired stay \
             on them until they close"
        );
        sweep_demoted(pin_dir)?;
        return accelerated_sockets(pin_dir);
    }
    cfg.set(&config_index::DRAIN, &1)?;
    // The flag's store before any count is loaded below: the syscall boundary alone is no
    // full barrier on every CPU.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + within;
    loop {
        sweep_demoted(pin_dir)?;
        release_idle(pin_dir)?;
        let left = accelerated_sockets(pin_dir)?;
        if left == 0 || Instant::now() >= deadline {
            return Ok(left);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Takes paired sockets with an empty redirect queue out of the sockhash (only while
/// [`config_index::DRAIN`] is set; see the module's comment). Returns how many.
fn release_idle(pin_dir: &Path) -> Result<usize> {
    let pins = Pins::new(pin_dir);
    let (queues, socks) = (pins.rxq()?, pins.socks()?);
    let open: Vec<u64> = queues
        .entries()?
        .into_iter()
        .filter(|(_, q)| q.state == rxq_state::OPEN)
        .map(|(cookie, _)| cookie)
        .collect();
    let mut released = 0;
    for cookie in open {
        // Read again: the count must be read after the flag was written.
        let empty = matches!(queues.get(&cookie), Ok(Some(q)) if q.queued as i64 <= 0);
        if empty && matches!(socks.remove(&cookie), Ok(true)) {
            released += 1;
        }
    }
    Ok(released)
}
