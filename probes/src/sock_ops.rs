//! The sock_ops program: TCP events of every socket on the node. It pairs enrolled sockets
//! ([`pairing`]), and follows a paired socket's state changes and segments (a demoted one
//! leaves the sockhash once drained), its retransmission timeouts ([`retransmit_timeout`]) and
//! its close.

pub(crate) mod keys;
mod pairing;
mod retransmit_timeout;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG, BPF_SOCK_OPS_PARSE_HDR_OPT_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_RTO_CB_FLAG,
        BPF_SOCK_OPS_RWND_INIT, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
    },
    helpers::bpf_get_netns_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use fastpath_common::{pod_flags, rxq_state, sock_role, sock_state};

use keys::{sock_key, socket_address, socket_cookie};
use pairing::{
    on_active_established, on_connect, on_passive_established, on_syn, release_waiting_client,
    resize_waiting_client,
};
use retransmit_timeout::on_retransmit_timeout;

use crate::{
    maps::{FP_ACTIVE, FP_DEMOTED, FP_PAIRS, FP_PODS, FP_RXQ, accel_enabled, sockhash_delete},
    rx_consumed::stop_counting_reads_of,
    rx_queue::{rxq_cas, rxq_queued, rxq_state},
};

const TCP_CLOSE: u32 = 7;

/// The callbacks a paired socket asks for: state changes, and every segment in or out (none
/// flow while it is paired; after a demotion they are the moments to leave the sockhash), and
/// its retransmission timeouts (the ingress gate's hold is the only loss a node-local
/// connection sees; see [`on_retransmit_timeout`]).
const PAIRED_CB_FLAGS: u32 = BPF_SOCK_OPS_STATE_CB_FLAG
    | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG
    | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG
    | BPF_SOCK_OPS_RTO_CB_FLAG;

#[sock_ops]
pub fn fastpath_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_STATE_CB {
        // Only sockets this program flagged get here.
        match ctx.arg(1) {
            TCP_CLOSE => on_close(&ctx),
            _ => leave_if_drained(&ctx),
        }
        return 1;
    }
    if op == BPF_SOCK_OPS_PARSE_HDR_OPT_CB || op == BPF_SOCK_OPS_HDR_OPT_LEN_CB {
        // A segment in or out of a paired socket (flagged by this program).
        leave_if_drained(&ctx);
        return 1;
    }
    if op == BPF_SOCK_OPS_RTO_CB {
        // Flagged by this program too.
        on_retransmit_timeout(&ctx);
        return 1;
    }
    if op != BPF_SOCK_OPS_RWND_INIT
        && op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
    {
        return 1;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(pod) = (unsafe { FP_PODS.get(&netns) }) else {
        return 1;
    };
    if pod.flags & pod_flags::ACCELERATE == 0 || !accel_enabled(netns) {
        if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
            release_waiting_client(&ctx, netns);
        }
        return 1;
    }
    let is_fullsock = unsafe { (*ctx.ops).is_fullsock } != 0;
    match op {
        BPF_SOCK_OPS_RWND_INIT if !is_fullsock => on_syn(&ctx, pod, netns),
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx, pod, netns),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_active_established(&ctx, netns),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(&ctx, pod, netns),
        _ => {}
    }
    1
}

/// A demoted socket whose queue is read empty leaves the sockhash. Nothing can be redirected
/// into it any more: a writer adds to `queued` before it reads the state, and this reads
/// `queued` after it saw the state DEMOTED (both with full barriers).
#[inline(never)]
fn leave_if_drained(ctx: &SockOpsContext) {
    let cookie = socket_cookie(ctx);
    let Some(q) = FP_RXQ.get_ptr_mut(&cookie) else {
        stop_watching_unless_pending(ctx);
        return;
    };
    if rxq_state(q) != rxq_state::DEMOTED || rxq_queued(q) != 0 {
        return;
    }
    if rxq_cas(q, rxq_state::DEMOTED, rxq_state::LEFT) {
        sockhash_delete(&cookie);
        let _ = FP_DEMOTED.remove(&cookie);
        clear_cb_flags(
            ctx,
            BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
        );
    }
}

/// A client asks for the per-segment callbacks at ACTIVE_ESTABLISHED, before it knows whether
/// it will pair. One that did not (it wrote first, or a twin claimed its server) would run
/// this program on every segment for the rest of its life: stop that, unless it still waits
/// for its server.
#[inline(never)]
fn stop_watching_unless_pending(ctx: &SockOpsContext) {
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(key) = sock_key(ctx, netns) else {
        return;
    };
    let pending = match unsafe { FP_PAIRS.get(&key) } {
        Some(st) if st.state == sock_state::PENDING => Some(st.endpoint),
        _ => None,
    };
    if let Some(endpoint) = pending {
        resize_waiting_client(ctx, &endpoint);
    } else {
        clear_cb_flags(
            ctx,
            BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG,
        );
    }
}

fn request_cb_flags(ctx: &SockOpsContext, flags: u32) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() | flags) as i32);
}

fn clear_cb_flags(ctx: &SockOpsContext, flags: u32) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() & !flags) as i32);
}

#[inline(never)]
fn on_close(ctx: &SockOpsContext) {
    let cookie = socket_cookie(ctx);
    let _ = FP_RXQ.remove(&cookie);
    let _ = FP_DEMOTED.remove(&cookie);
    stop_counting_reads_of(socket_address(ctx));
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(key) = sock_key(ctx, netns) else {
        return;
    };
    let Some(st) = (unsafe { FP_PAIRS.get(&key) }).copied() else {
        return;
    };
    if st.role == sock_role::CLIENT {
        if let Some(a) = unsafe { FP_ACTIVE.get(&st.endpoint) } {
            if a.client == key {
                let _ = FP_ACTIVE.remove(&st.endpoint);
            }
        }
    }
    let _ = FP_PAIRS.remove(&key);
}
