//! A paired socket's redirect queue (its FP_RXQ entry, keyed by its cookie): the bytes
//! redirected into it and not read yet, and whether the connection is still on the fast path.

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_ANY,
    helpers::{bpf_getsockopt, bpf_ktime_get_ns},
    programs::SockOpsContext,
};
use fastpath_common::{
    DEFAULT_QUEUE_LIMIT_BYTES, FALLBACK_BACKLOG_ROOM, RxQueue, backlog_room, config_index,
    rxq_state,
};

const SO_SNDBUF: i32 = 7;
const SO_RCVBUF: i32 = 8;

use crate::{
    atomic::{atomic_read, cas},
    maps::{FP_DEMOTED, FP_RXQ, config},
};

pub(crate) fn rxq_cas(q: *mut RxQueue, from: u64, to: u64) -> bool {
    cas(unsafe { &raw mut (*q).state }, from, to).is_ok()
}

pub(crate) fn rxq_state(q: *mut RxQueue) -> u64 {
    atomic_read(unsafe { &raw mut (*q).state })
}

/// Bytes queued for the reader. The counter wraps; below zero reads as empty, which is true:
/// it goes below zero only once a demoted socket reads TCP bytes, and a reader takes TCP bytes
/// only when its redirect queue is empty.
pub(crate) fn rxq_queued(q: *mut RxQueue) -> u64 {
    let n = atomic_read(unsafe { &raw mut (*q).queued }) as i64;
    if n > 0 { n as u64 } else { 0 }
}

/// Whether `total` queued bytes, `size` of them this message's, are past the queue's bound:
/// the configured limit, unless this message alone is over it (it goes into an empty queue),
/// or, without exception, the socket's [`RxQueue::backlog_room`].
pub(crate) fn over_bound(q: *mut RxQueue, total: u64, size: u64) -> bool {
    let room = unsafe { core::ptr::read_volatile(&raw const (*q).backlog_room) };
    (total > size && total > queue_limit()) || total > room
}

/// The receive and send buffer sizes of the socket of this sock_ops callback (`None` where
/// `bpf_getsockopt` cannot read them, before Linux 6.1).
#[inline(never)]
pub(crate) fn own_buffers(ctx: &SockOpsContext) -> Option<(u64, u64)> {
    Some((
        socket_buffer(ctx, SO_RCVBUF)?,
        socket_buffer(ctx, SO_SNDBUF)?,
    ))
}

/// The [`RxQueue::backlog_room`] of a socket whose buffers are `buffers` ([`own_buffers`]),
/// its send buffer taken as `sndbuf` when that is larger.
pub(crate) fn room_of(buffers: Option<(u64, u64)>, sndbuf: u64) -> u64 {
    match buffers {
        Some((rcvbuf, own)) => backlog_room(rcvbuf, if sndbuf > own { sndbuf } else { own }),
        None => FALLBACK_BACKLOG_ROOM,
    }
}

fn socket_buffer(ctx: &SockOpsContext, name: i32) -> Option<u64> {
    const SOL_SOCKET: i32 = 1;
    let mut value: i32 = 0;
    let rc = unsafe {
        bpf_getsockopt(
            ctx.as_ptr(),
            SOL_SOCKET,
            name,
            (&mut value as *mut i32).cast(),
            core::mem::size_of::<i32>() as i32,
        )
    };
    if rc == 0 && value > 0 {
        Some(value as u64)
    } else {
        None
    }
}

pub(crate) fn queue_limit() -> u64 {
    match config(config_index::QUEUE_LIMIT_KIB) {
        0 => DEFAULT_QUEUE_LIMIT_BYTES,
        kib => (kib as u64) << 10,
    }
}

/// Takes both sides of a connection off the fast path (`q` is the entry of socket `cookie`).
/// True for the caller that demoted it. Both sockets are listed in FP_DEMOTED, where the
/// installer looks for drained ones that no segment came to take out of the sockhash.
pub(crate) fn demote(q: *mut RxQueue, cookie: u64) -> bool {
    let won = rxq_cas(q, rxq_state::OPEN, rxq_state::DEMOTED);
    if won {
        let _ = FP_DEMOTED.insert(&cookie, &0, BPF_ANY as u64);
    }
    let peer = unsafe { core::ptr::read_volatile(&raw const (*q).peer) };
    if let Some(p) = FP_RXQ.get_ptr_mut(&peer) {
        if rxq_cas(p, rxq_state::OPEN, rxq_state::DEMOTED) {
            let _ = FP_DEMOTED.insert(&peer, &0, BPF_ANY as u64);
        }
    }
    won
}

/// The receive-side entry of a socket about to be paired (its peer, its pod). A call of its
/// own: its frame does not stack on the pairing callback's (the verifier allows 512 bytes).
#[inline(never)]
pub(crate) fn start_queue(cookie: u64, peer: u64, netns: u64, backlog_room: u64) -> bool {
    let q = RxQueue {
        queued: 0,
        peer,
        state: rxq_state::OPEN,
        netns,
        last_read_ns: unsafe { bpf_ktime_get_ns() },
        backlog_room,
    };
    FP_RXQ.insert(&cookie, &q, BPF_ANY as u64).is_ok()
}
