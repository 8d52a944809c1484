//! The sk_msg program: every sendmsg of a socket in the sockhash, redirected into its peer.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_INGRESS, sk_action},
    helpers::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
};
use fastpath_common::{AF_INET, Ip, SockKey, config_index, rxq_state, sock_state};

use crate::{
    atomic::{atomic_add, atomic_sub},
    maps::{FP_META, FP_PAIRS, FP_RXQ, FP_SOCKS, config, stats},
    pair_state::{paired_peer, state_cas, state_load},
    rx_queue::{demote, over_bound, rxq_state},
};

#[sk_msg]
pub fn fastpath_skmsg(ctx: SkMsgContext) -> u32 {
    let md = unsafe { &*ctx.msg };
    let (local, remote) = if md.family == AF_INET {
        (Ip::v4(md.local_ip4), Ip::v4(md.remote_ip4))
    } else {
        (Ip::v6(md.local_ip6), Ip::v6(md.remote_ip6))
    };
    let key = SockKey {
        local,
        remote,
        local_port: md.local_port,
        remote_port: u32::from_be(md.remote_port),
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
    };
    let Some(st) = FP_PAIRS.get_ptr_mut(&key) else {
        return sk_action::SK_PASS;
    };
    let netns = unsafe { (*st).netns };
    let size = ctx.size() as u64;
    let mut peer = match state_load(st) {
        sock_state::PAIRED => paired_peer(st),
        sock_state::PENDING => match state_cas(st, sock_state::PENDING, sock_state::TAINTED) {
            Ok(_) => {
                // First bytes before the server established: they take TCP, and so will
                // every later byte of this connection.
                if let Some(s) = stats(netns) {
                    s.early_data_fallbacks += 1;
                    s.peer_misses += 1;
                }
                return sk_action::SK_PASS;
            }
            Err(sock_state::PAIRED) => paired_peer(st),
            Err(_) => 0,
        },
        _ => 0,
    };
    if peer == 0 {
        if let Some(s) = stats(netns) {
            s.peer_misses += 1;
        }
        return sk_action::SK_PASS;
    }
    // Count the bytes into the reader's queue before looking at its state (see
    // `leave_if_drained`). Pairs made by a build without queues have no entry: unbounded.
    let rxq = FP_RXQ.get_ptr_mut(&peer);
    if let Some(q) = rxq {
        let queued = unsafe { &raw mut (*q).queued };
        atomic_add(queued, size);
        if rxq_state(q) != rxq_state::OPEN {
            atomic_sub(queued, size);
            return sk_action::SK_PASS;
        }
        // An uninstall is draining the accelerator: this connection goes to TCP as at the
        // queue bound. Read after the state's full barrier, so the installer, which reads the
        // count after it set the flag, sees this message counted or this program sees the flag.
        if config(config_index::DRAIN) != 0 {
            atomic_sub(queued, size);
            demote(q, peer);
            return sk_action::SK_PASS;
        }
        // The bound need not be exact: a plain read (the ordered one was the state's,
        // above). The backlog room has no slack; the configured limit keeps the 64 KiB the
        // kernel adds to it for segments.
        let total = unsafe { core::ptr::read_volatile(queued) } as i64;
        let total = if total > 0 { total as u64 } else { 0 };
        if over_bound(q, total, size) {
            atomic_sub(queued, size);
            if demote(q, peer) {
                if let Some(s) = stats(netns) {
                    s.queue_demotions += 1;
                }
            }
            return sk_action::SK_PASS;
        }
    }
    let redirected =
        FP_SOCKS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) == sk_action::SK_PASS as i64;
    if !redirected {
        if let Some(q) = rxq {
            atomic_sub(unsafe { &raw mut (*q).queued }, size);
        }
    }
    if let Some(s) = stats(netns) {
        if redirected {
            s.msgs_redirected += 1;
            s.bytes_redirected += size;
        } else {
            s.peer_misses += 1;
        }
    }
    let _ = &FP_META;
    sk_action::SK_PASS
}
