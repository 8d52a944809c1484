//! The raw tracepoint that counts what readers take out of paired sockets' queues, and the
//! bookkeeping that lets it find a socket by the kernel address it is given.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use fastpath_common::{config_index, sk_filter_slot};

#[cfg(doc)]
use crate::sock_ops::keys::socket_address;
use crate::{
    atomic::{atomic_add, atomic_read, atomic_sub, cas},
    maps::{FP_RXQ, FP_SK_COOKIES, FP_SK_COUNTED, FP_SK_FILTER, config},
};

const MSG_PEEK: i32 = 2;
/// Reads of the error queue (timestamps) return no stream bytes.
const MSG_ERRQUEUE: i32 = 0x2000;

/// A reader took `ret` bytes out of a socket (`sock:sock_recv_length`, fired by every
/// recvmsg on the node). Only paired sockets have an entry; the reads of other sockets stop
/// at their filter slot, an array load, when it is empty (most are: a shared slot costs the
/// lookup). While paired, a socket only receives redirected bytes; once demoted, it reads TCP
/// bytes only when its redirect queue is empty, and those take the count below zero, which
/// reads as empty, which is then true.
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn fastpath_rx_consumed(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct sock *sk, int ret, int flags)
    let copied = ctx.arg::<u64>(1) as i32;
    let flags = ctx.arg::<u64>(2) as i32;
    if copied <= 0 || flags & (MSG_PEEK | MSG_ERRQUEUE) != 0 {
        return 0;
    }
    let sk = ctx.arg::<u64>(0);
    if config(config_index::READ_FILTER_BYPASS) == 0 {
        match FP_SK_FILTER.get(sk_filter_slot(sk)) {
            Some(n) if *n != 0 => {}
            _ => return 0,
        }
    }
    let Some(cookie) = (unsafe { FP_SK_COOKIES.get(&sk) }) else {
        return 0;
    };
    if let Some(q) = FP_RXQ.get_ptr_mut(cookie) {
        atomic_sub(unsafe { &raw mut (*q).queued }, copied as u64);
        unsafe { core::ptr::write_volatile(&raw mut (*q).last_read_ns, bpf_ktime_get_ns()) };
    }
    0
}

/// The filter slot of a socket listed in FP_SK_COUNTED.
fn counted_slot(sk: u64) -> Option<*mut u64> {
    let address = unsafe { FP_SK_COUNTED.get(&sk) }?;
    FP_SK_FILTER.get_ptr_mut(sk_filter_slot(*address))
}

/// Lets the recvmsg tracepoint count this socket's reads (`sk` = [`socket_address`]): its
/// address and cookie, and one more in its filter slot. Called before the pair is published,
/// so no redirected byte can be read uncounted. False: the socket must not be paired.
pub(crate) fn count_reads_of(sk: u64, cookie: u64) -> bool {
    if FP_SK_COOKIES.insert(&sk, &cookie, BPF_ANY as u64).is_err() {
        return false;
    }
    if unsafe { FP_SK_COUNTED.get(&sk) }.is_some() {
        // Left by a socket freed at this address without a close callback (or by a build that
        // did not keep the two in step): its count is this socket's now. Should the slot read
        // zero, one more keeps it open; too high only costs other sockets a lookup.
        if let Some(n) = counted_slot(sk) {
            if atomic_read(n) == 0 {
                atomic_add(n, 1);
            }
        }
        return true;
    }
    if FP_SK_COUNTED.insert(&sk, &sk, BPF_NOEXIST as u64).is_ok() {
        if let Some(n) = counted_slot(sk) {
            atomic_add(n, 1);
            return true;
        }
        let _ = FP_SK_COUNTED.remove(&sk);
    }
    let _ = FP_SK_COOKIES.remove(&sk);
    false
}

/// Undoes [`count_reads_of`]. A socket that a build without the filter paired was never
/// counted, and takes nothing from its slot.
pub(crate) fn stop_counting_reads_of(sk: u64) {
    let _ = FP_SK_COOKIES.remove(&sk);
    let Some(n) = counted_slot(sk) else {
        return;
    };
    if FP_SK_COUNTED.remove(&sk).is_err() {
        return;
    }
    // Exact counts never go below zero; should one ever read zero here, it stays there.
    let mut seen = atomic_read(n);
    for _ in 0..4 {
        if seen == 0 {
            return;
        }
        match cas(n, seen, seen - 1) {
            Ok(_) => return,
            Err(now) => seen = now,
        }
    }
}
