//! Pairing: the sock_ops callbacks of a connection's handshake that put both of its sockets in
//! the sockhash, or neither (steps 1 to 3 of the crate documentation).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_STATE_CB_FLAG},
    helpers::bpf_ktime_get_ns,
    programs::SockOpsContext,
};
use fastpath_common::{
    ActiveConn, Endpoint, PendingSyn, PodInfo, SockState, sized_sndbuf_floor, sock_role, sock_state,
};

use super::{
    PAIRED_CB_FLAGS, clear_cb_flags,
    keys::{endpoint, remote_ip, remote_port, sock_key, socket_address, socket_cookie},
    request_cb_flags,
};
use crate::{
    maps::{FP_ACTIVE, FP_PAIRS, FP_PENDING, FP_RXQ, FP_SOCKS, sockhash_delete, stats},
    pair_state::{state_cas, state_load},
    rx_consumed::{count_reads_of, stop_counting_reads_of},
    rx_queue::{own_buffers, room_of, start_queue},
};

fn port_excluded(pod: &PodInfo, port: u32) -> bool {
    let n = pod.excluded_port_count as usize;
    let mut i = 0;
    while i < fastpath_common::MAX_EXCLUDED_PORTS {
        if i < n && pod.excluded_ports[i] as u32 == port {
            return true;
        }
        i += 1;
    }
    false
}

/// A request socket of an enrolled listener: the SYN-ACK has not left yet.
#[inline(never)]
pub(crate) fn on_syn(ctx: &SockOpsContext, pod: &PodInfo, netns: u64) {
    if port_excluded(pod, ctx.local_port()) {
        return;
    }
    let Some(ip) = remote_ip(ctx) else { return };
    let client = endpoint(ip, remote_port(ctx), netns);
    let seen = PendingSyn {
        seen_ns: unsafe { bpf_ktime_get_ns() },
    };
    let _ = FP_PENDING.insert(&client, &seen, BPF_ANY as u64);
}

/// An enrolled client is about to send its SYN.
#[inline(never)]
pub(crate) fn on_connect(ctx: &SockOpsContext, pod: &PodInfo, netns: u64) {
    if port_excluded(pod, remote_port(ctx)) {
        return;
    }
    let Some(key) = sock_key(ctx, netns) else {
        return;
    };
    let st = SockState {
        state: sock_state::CONNECTING,
        role: sock_role::CLIENT,
        peer: 0,
        netns,
        connect_ns: unsafe { bpf_ktime_get_ns() },
        _pad: 0,
        endpoint: Endpoint::default(),
    };
    if FP_PAIRS.insert(&key, &st, BPF_ANY as u64).is_ok() {
        request_cb_flags(ctx, BPF_SOCK_OPS_STATE_CB_FLAG);
    }
}

/// The client's SYN-ACK arrived; its ACK and connect()'s return come after this.
#[inline(never)]
pub(crate) fn on_active_established(ctx: &SockOpsContext, netns: u64) {
    let Some(key) = sock_key(ctx, netns) else {
        return;
    };
    let Some(st) = FP_PAIRS.get_ptr_mut(&key) else {
        return;
    };
    let give_up = |ctx: &SockOpsContext| {
        let _ = FP_PAIRS.remove(&key);
        clear_cb_flags(ctx, BPF_SOCK_OPS_STATE_CB_FLAG);
    };
    let cookie = socket_cookie(ctx);
    let me = endpoint(key.local, key.local_port, netns);
    // Bytes sent before establishment (TCP Fast Open data in the SYN) took TCP: such a
    // connection stays on TCP. (With TFO the server also establishes before the client, so it
    // could never pair; it must not enter the sockhash.)
    let ops = unsafe { &*ctx.ops };
    if ops.bytes_acked > 1 || ops.data_segs_out != 0 {
        give_up(ctx);
        return;
    }
    let connect_ns = unsafe { (*st).connect_ns };
    // The listener must have seen a SYN from this endpoint after this socket began to connect:
    // then it was this socket's SYN, and the server is a local enrolled socket.
    let fresh = matches!(unsafe { FP_PENDING.get(&me) }, Some(p) if p.seen_ns >= connect_ns);
    // Claim the PENDING entry (a delete succeeds once), so a twin socket bound to the same
    // endpoint cannot claim it too.
    if !fresh || FP_PENDING.remove(&me).is_err() {
        give_up(ctx);
        return;
    }
    let buffers = own_buffers(ctx);
    let active = ActiveConn {
        client: key,
        cookie,
        snd_una: ops.snd_una,
        rcv_nxt: ops.rcv_nxt,
        backlog_room: room_of(buffers, 0),
        sndbuf_unsized: buffers.map_or(0, |(_, sndbuf)| sndbuf as u32),
        sndbuf_sized: 0,
    };
    unsafe {
        (*st).endpoint = me;
        (*st).state = sock_state::PENDING;
    }
    let mut sock = cookie;
    if FP_SOCKS
        .update(&mut sock, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64)
        .is_err()
    {
        if let Some(s) = stats(netns) {
            s.enroll_failures += 1;
        }
        give_up(ctx);
        return;
    }
    let address = socket_address(ctx);
    if !count_reads_of(address, cookie) {
        sockhash_delete(&cookie);
        give_up(ctx);
        return;
    }
    if FP_ACTIVE.insert(&me, &active, BPF_NOEXIST as u64).is_err() {
        stop_counting_reads_of(address);
        sockhash_delete(&cookie);
        give_up(ctx);
        return;
    }
    request_cb_flags(ctx, PAIRED_CB_FLAGS);
    if let Some(s) = stats(netns) {
        s.sockets_enrolled += 1;
    }
}

/// The server's handshake completed; accept() cannot have returned this socket yet.
#[inline(never)]
pub(crate) fn on_passive_established(ctx: &SockOpsContext, pod: &PodInfo, netns: u64) {
    let Some((client, active, ours)) = waiting_client(ctx, netns) else {
        return;
    };
    if port_excluded(pod, ctx.local_port()) {
        return;
    }
    if !ours {
        // The SYN record of this endpoint was claimed by another socket bound to the same
        // endpoint (SO_REUSEADDR twins): that socket's server is not us, and no local server
        // will pair it. Take it out of the sockhash, on TCP for good.
        let stranded = match FP_PAIRS.get_ptr_mut(&active.client) {
            Some(p) => {
                state_cas(p, sock_state::PENDING, sock_state::TAINTED).is_ok()
                    || state_load(p) == sock_state::TAINTED
            }
            None => true,
        };
        if stranded && FP_ACTIVE.remove(&client).is_ok() {
            sockhash_delete(&active.cookie);
        }
        return;
    }
    if FP_ACTIVE.remove(&client).is_err() {
        return;
    }
    let Some(cs) = FP_PAIRS.get_ptr_mut(&active.client) else {
        return;
    };
    let Some(own_key) = sock_key(ctx, netns) else {
        return;
    };
    let own = socket_cookie(ctx);
    let mut sock = own;
    let me = SockState {
        state: sock_state::PAIRED,
        role: sock_role::SERVER,
        peer: active.cookie,
        netns,
        connect_ns: 0,
        _pad: 0,
        endpoint: Endpoint::default(),
    };
    let inserted = FP_SOCKS
        .update(&mut sock, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64)
        .is_ok();
    let own_address = socket_address(ctx);
    if inserted
        && count_reads_of(own_address, own)
        && start_queue(own, active.cookie, netns, server_backlog_room(ctx, &active))
        && start_queue(active.cookie, own, active.client.netns, active.backlog_room)
        && FP_PAIRS.insert(&own_key, &me, BPF_ANY as u64).is_ok()
    {
        unsafe { (*cs).peer = own };
        if state_cas(cs, sock_state::PENDING, sock_state::PAIRED).is_ok() {
            request_cb_flags(ctx, PAIRED_CB_FLAGS);
            if let Some(s) = stats(netns) {
                s.sockets_enrolled += 1;
                s.connections_paired += 1;
            }
            return;
        }
        let _ = FP_PAIRS.remove(&own_key);
    }
    let _ = FP_RXQ.remove(&own);
    let _ = FP_RXQ.remove(&active.cookie);
    stop_counting_reads_of(own_address);
    // Not paired: the client wrote over TCP already, or an insert failed. Neither socket may
    // stay in the sockhash without a peer, and the client must never be redirected.
    if inserted {
        sockhash_delete(&own);
    } else if let Some(s) = stats(netns) {
        s.enroll_failures += 1;
    }
    taint_client(&active);
}

/// The enrolled client whose handshake the server of this callback just completed, as its
/// FP_ACTIVE record has it (its PENDING record is removed first: a client that was not
/// enrolled never claimed it). `ours` is false when the record's sequence numbers are not this
/// connection's: another socket bound to the same endpoint claimed the record.
// Inlined: as a call of its own its frame would stack on the callback's, past the verifier's
// 512 bytes.
#[inline(always)]
fn waiting_client(ctx: &SockOpsContext, netns: u64) -> Option<(Endpoint, ActiveConn, bool)> {
    let ip = remote_ip(ctx)?;
    let client = endpoint(ip, remote_port(ctx), netns);
    let _ = FP_PENDING.remove(&client);
    let active = (unsafe { FP_ACTIVE.get(&client) }).copied()?;
    let ops = unsafe { &*ctx.ops };
    let ours = ops.rcv_nxt == active.snd_una && ops.snd_nxt == active.rcv_nxt;
    Some((client, active, ours))
}

/// Takes a waiting client off the fast path for good: TAINTED (its writes take TCP) and out
/// of the sockhash (no socket stays there without a peer).
#[inline(always)]
fn taint_client(active: &ActiveConn) {
    if let Some(cs) = FP_PAIRS.get_ptr_mut(&active.client) {
        let _ = state_cas(cs, sock_state::PENDING, sock_state::TAINTED);
    }
    sockhash_delete(&active.cookie);
}

/// The server's handshake completed, but it will not pair: acceleration was switched off (or
/// its pod opted out) after its SYN was seen. Its client, if it is waiting in the sockhash,
/// must not stay there without a peer.
#[inline(never)]
pub(crate) fn release_waiting_client(ctx: &SockOpsContext, netns: u64) {
    if let Some((client, active, true)) = waiting_client(ctx, netns) {
        if FP_ACTIVE.remove(&client).is_ok() {
            taint_client(&active);
        }
    }
}

/// The server's [`fastpath_common::RxQueue::backlog_room`]. Its callback runs before the kernel
/// sizes its send buffer; when it started where its client's did (neither application set
/// one), it grows as the client's did, which the client's first segment out recorded, but
/// never past what the kernel gives the server's own MSS ([`sized_sndbuf_floor`]): the client
/// may have been sized for another MSS (a connection redirected from a pod route to loopback).
#[inline(never)]
fn server_backlog_room(ctx: &SockOpsContext, client: &ActiveConn) -> u64 {
    let buffers = own_buffers(ctx);
    let grows_like_the_client =
        matches!(buffers, Some((_, own)) if own == client.sndbuf_unsized as u64);
    let sized = if grows_like_the_client {
        let floor = sized_sndbuf_floor(unsafe { (*ctx.ops).mss_cache } as u64);
        let client_sized = client.sndbuf_sized as u64;
        if client_sized < floor {
            client_sized
        } else {
            floor
        }
    } else {
        0
    };
    room_of(buffers, sized)
}

/// A waiting client's segment out or in: its first one out is the handshake's last ACK, sent
/// once the kernel sized its send buffer for the path. Its backlog room is read again, for the
/// server to take at pairing.
#[inline(never)]
pub(crate) fn resize_waiting_client(ctx: &SockOpsContext, endpoint: &Endpoint) {
    let Some(a) = FP_ACTIVE.get_ptr_mut(endpoint) else {
        return;
    };
    if unsafe { (*a).cookie } != socket_cookie(ctx) {
        return;
    }
    let buffers = own_buffers(ctx);
    if let Some((_, sndbuf)) = buffers {
        unsafe {
            (*a).sndbuf_sized = sndbuf as u32;
            (*a).backlog_room = room_of(buffers, 0);
        }
    }
}
