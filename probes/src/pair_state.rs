//! A socket's pairing state (its FP_PAIRS entry), which sock_ops and sk_msg change at the same
//! time: the compare-and-swaps that decide a race, and the loads of what a winner published.

use fastpath_common::SockState;

use crate::atomic::cas;

/// Compare-and-swap of a socket's state; `Err(current)` when it was not `from`.
pub(crate) fn state_cas(p: *mut SockState, from: u64, to: u64) -> Result<u64, u64> {
    cas(unsafe { &raw mut (*p).state }, from, to)
}

/// A plain (volatile) load: cpu v3 has no load-acquire. Callers that act on PAIRED re-check
/// the peer (see [`paired_peer`]).
pub(crate) fn state_load(p: *mut SockState) -> u64 {
    unsafe { core::ptr::read_volatile(&raw const (*p).state) }
}

/// The peer of a socket seen PAIRED. `peer` is written once, before the compare-and-swap that
/// publishes PAIRED; should a weakly ordered CPU show the old 0, a compare-and-swap (a full
/// barrier) makes the write visible.
pub(crate) fn paired_peer(p: *mut SockState) -> u64 {
    let peer = unsafe { core::ptr::read_volatile(&raw const (*p).peer) };
    if peer != 0 {
        return peer;
    }
    let _ = state_cas(p, 0, 0);
    unsafe { core::ptr::read_volatile(&raw const (*p).peer) }
}
