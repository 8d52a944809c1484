//! The held writer: a paired socket's retransmission timeouts while the ingress gate holds its
//! segments at its peer.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_getsockopt, bpf_setsockopt},
    programs::SockOpsContext,
};
use fastpath_common::{HELD_WRITER_RTO_MAX_MS, HELD_WRITER_TIMEOUT_GRACE_MS};

use super::keys::socket_cookie;
use crate::{ingress_gate::gate_holds, maps::FP_RXQ};

const SOL_TCP: i32 = 6;
const TCP_USER_TIMEOUT: i32 = 18;
const TCP_RTO_MAX_MS: i32 = 44;

/// A retransmission timeout of a socket this program flagged. When it fires because the
/// ingress gate holds this socket's segments at its peer, TCP's backoff would double the
/// timer each time (up to 120 s): once the reader had read its redirect queue, the writer
/// would sit out the rest of a long timer before it sent again, and it would give up after
/// `tcp_retries2` (or, closed, `tcp_orphan_retries`) timeouts although its reader is alive
/// and reading, where plain TCP keeps a slow reader's writer open with window probes. So,
/// while held:
/// - the writer's timer is capped at [`HELD_WRITER_RTO_MAX_MS`] (`TCP_RTO_MAX_MS`), and it
///   resends within that time of the gate opening;
/// - its `TCP_USER_TIMEOUT` is raised to [`HELD_WRITER_TIMEOUT_GRACE_MS`] past the time it
///   has spent retransmitting, at each timeout, so it gives up only that long after its reader
///   stopped reading (the gate then lets the payload in) or went away (its entry is gone).
///
/// The user timeout is raised only once the cap holds: it counts time, and only the cap
/// bounds the time one timeout takes. A kernel without `TCP_RTO_MAX_MS` (before 6.15) keeps
/// TCP's own backoff and timeouts.
#[inline(never)]
pub(crate) fn on_retransmit_timeout(ctx: &SockOpsContext) {
    let cookie = socket_cookie(ctx);
    let Some(own) = FP_RXQ.get_ptr_mut(&cookie) else {
        return;
    };
    let peer = unsafe { core::ptr::read_volatile(&raw const (*own).peer) };
    let Some(reader) = FP_RXQ.get_ptr_mut(&peer) else {
        return;
    };
    if !gate_holds(reader) {
        return;
    }
    let mut rto_max: i32 = 0;
    if tcp_sockopt_get(ctx, TCP_RTO_MAX_MS, &mut rto_max) != 0 {
        return;
    }
    if rto_max > HELD_WRITER_RTO_MAX_MS as i32
        && tcp_sockopt_set(ctx, TCP_RTO_MAX_MS, HELD_WRITER_RTO_MAX_MS as i32) != 0
    {
        return;
    }
    // Time spent retransmitting so far: the first timer ran at most TCP's own maximum (the
    // cap comes at the first timeout), each later one at most the cap.
    const TCP_RTO_MAX_DEFAULT_MS: u64 = 120_000;
    let retransmits = ctx.arg(0) as u64;
    let wanted = HELD_WRITER_TIMEOUT_GRACE_MS
        + TCP_RTO_MAX_DEFAULT_MS
        + (retransmits + 1) * HELD_WRITER_RTO_MAX_MS;
    let wanted = if wanted > i32::MAX as u64 {
        i32::MAX
    } else {
        wanted as i32
    };
    let mut user_timeout: i32 = 0;
    if tcp_sockopt_get(ctx, TCP_USER_TIMEOUT, &mut user_timeout) == 0 && user_timeout < wanted {
        let _ = tcp_sockopt_set(ctx, TCP_USER_TIMEOUT, wanted);
    }
}

fn tcp_sockopt_get(ctx: &SockOpsContext, name: i32, value: &mut i32) -> i64 {
    unsafe {
        bpf_getsockopt(
            ctx.as_ptr(),
            SOL_TCP,
            name,
            (value as *mut i32).cast(),
            core::mem::size_of::<i32>() as i32,
        )
    }
}

fn tcp_sockopt_set(ctx: &SockOpsContext, name: i32, value: i32) -> i64 {
    let mut value = value;
    unsafe {
        bpf_setsockopt(
            ctx.as_ptr(),
            SOL_TCP,
            name,
            (&mut value as *mut i32).cast(),
            core::mem::size_of::<i32>() as i32,
        )
    }
}
