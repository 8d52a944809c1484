//! fastpath's eBPF programs (built for bpfel-unknown-none by the installer's build script).
//!
//! `fastpath_sockops` runs on the root cgroup v2 for TCP socket events on the whole node. For a
//! socket outside an enrolled pod it costs one netns-cookie hash lookup and returns.
//! `fastpath_skmsg` runs on every sendmsg of a socket in the sockhash and redirects the message
//! into the peer socket's receive queue.
//!
//! Pairing (docs/accelerator.md has the long form). A socket enters the sockhash only when its
//! peer is known to be a local enrolled socket that will pair with it, and a client that wrote a
//! single byte over TCP is never redirected afterwards:
//! 1. An enrolled listener receives a SYN: its request socket triggers RWND_INIT before the
//!    SYN-ACK leaves. Record PENDING[client endpoint].
//! 2. An enrolled client connects (TCP_CONNECT_CB, before its SYN leaves): state CONNECTING
//!    with the time. At ACTIVE_ESTABLISHED (before its ACK leaves and before connect()
//!    returns), a PENDING entry newer than its connect means the SYN reached a local enrolled
//!    server: claim it, enter the sockhash, state PENDING, publish ACTIVE[own endpoint].
//! 3. The server at PASSIVE_ESTABLISHED (before accept() can return it) finds ACTIVE[remote
//!    endpoint], checks both initial sequence numbers match, enters the sockhash, and moves the
//!    client PENDING -> PAIRED with compare-and-swap. If the client was TAINTED it removes both
//!    sockets from the sockhash instead: nobody stays there without a peer.
//! 4. sk_msg on a PENDING client moves it PENDING -> TAINTED with compare-and-swap before its
//!    bytes take TCP. Exactly one of 3 and 4 wins.
//!
//! Flow control. Redirected bytes skip TCP's flow control: the writer's memory is released as
//! soon as they sit in the reader's queue. Every paired socket has an [`RxQueue`] (keyed by its
//! cookie) counting the bytes queued for it: sk_msg adds before it redirects, a raw tracepoint
//! on the reader's recvmsg subtracts. A message that would take a reader's queue past the
//! limit *demotes* the connection: from then on both directions take TCP (order holds: the
//! reader drains its queue before its TCP receive queue, and a cgroup ingress program holds
//! TCP payload back until the queue is empty, so a reader never sees both at once). A
//! half-close never demotes: the FIN travels after the last redirected byte and is read after
//! it (a demotion racing the other side's writes left bytes queued behind it, which HAProxy
//! sidecars turned into truncated streams). A demoted socket leaves
//! the sockhash as soon as its queue is read empty, so FIONREAD and readiness are plain TCP's
//! again (sock_ops sees every state change and every segment of a paired socket, which is
//! where it checks). docs/accelerator.md lists the invariants and the code that holds each.
//!
//! Keys: the sockhash is keyed by socket cookie (unique per socket for the life of the kernel).
//! The per-socket state is keyed by the socket's own tuple plus its netns cookie (sk_msg cannot
//! read the socket cookie on 6.18, but can read both), so pods with identical loopback tuples
//! never collide. Endpoints carry the netns cookie unless the address is a registered pod IP.
#![no_std]
#![no_main]
// The BPF target has no compare_exchange on core's atomic types; the intrinsic lowers to the
// BPF_CMPXCHG instruction (cpu v3, kernel >= 5.12).
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xsub};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG,
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB,
        BPF_SOCK_OPS_RTO_CB_FLAG, BPF_SOCK_OPS_RWND_INIT, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, sk_action,
    },
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_getsockopt, bpf_ktime_get_ns,
        bpf_map_delete_elem, bpf_setsockopt,
    },
    macros::{cgroup_skb, map, raw_tracepoint, sk_msg, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuHashMap, SockHash},
    programs::{RawTracePointContext, SkBuffContext, SkMsgContext, SockOpsContext},
};
use fastpath_common::{
    AF_INET, AF_INET6, ActiveConn, DEFAULT_QUEUE_LIMIT_BYTES, Endpoint, GATE_HOLD_NS,
    HELD_WRITER_RTO_MAX_MS, HELD_WRITER_TIMEOUT_GRACE_MS, Ip, IpKey, PendingSyn, PodInfo, PodStats,
    RxQueue, SockKey, SockState, config_index, map_capacity, pod_flags, rxq_state, sk_filter_slot,
    sock_role, sock_state,
};

#[map(name = "FP_PODS")]
static FP_PODS: HashMap<u64, PodInfo> = HashMap::pinned(map_capacity::PODS, 0);

#[map(name = "FP_POD_IPS")]
static FP_POD_IPS: HashMap<IpKey, u64> = HashMap::pinned(map_capacity::POD_IPS, 0);

#[map(name = "FP_SOCKS")]
static FP_SOCKS: SockHash<u64> = SockHash::pinned(map_capacity::SOCKS, 0);

// Not LRU: evicting a live socket's state would strand it in the sockhash.
#[map(name = "FP_PAIRS")]
static FP_PAIRS: HashMap<SockKey, SockState> = HashMap::pinned(map_capacity::PAIRS, 0);

// Not LRU either: an evicted entry would leave its client in the sockhash without a peer.
#[map(name = "FP_ACTIVE")]
static FP_ACTIVE: HashMap<Endpoint, ActiveConn> = HashMap::pinned(map_capacity::ACTIVE, 0);

// LRU: a SYN whose handshake never completes leaves an entry nobody removes.
#[map(name = "FP_PENDING")]
static FP_PENDING: LruHashMap<Endpoint, PendingSyn> = LruHashMap::pinned(map_capacity::PENDING, 0);

#[map(name = "FP_STATS")]
static FP_STATS: PerCpuHashMap<u64, PodStats> = PerCpuHashMap::pinned(map_capacity::STATS, 0);

#[map(name = "FP_CONFIG")]
static FP_CONFIG: Array<u32> = Array::pinned(config_index::LEN, 0);

#[map(name = "FP_META")]
static FP_META: Array<u64> = Array::pinned(fastpath_common::meta_index::LEN, 0);

#[map(name = "FP_RXQ")]
static FP_RXQ: HashMap<u64, RxQueue> = HashMap::pinned(map_capacity::RXQ, 0);

// Demoted sockets (keys only): what the installer sweeps.
#[map(name = "FP_DEMOTED")]
static FP_DEMOTED: HashMap<u64, u64> = HashMap::pinned(map_capacity::RXQ, 0);

// The tracepoint knows a socket by its kernel address only.
#[map(name = "FP_SK_COOKIES")]
static FP_SK_COOKIES: HashMap<u64, u64> = HashMap::pinned(map_capacity::RXQ, 0);

// How many FP_SK_COOKIES entries each slot holds: what spares other sockets' reads a lookup.
#[map(name = "FP_SK_FILTER")]
static FP_SK_FILTER: Array<u64> = Array::pinned(map_capacity::SK_FILTER, 0);

// The sockets counted in FP_SK_FILTER: kernel address -> the same address. As a map value it
// is a number; the verifier allows no arithmetic on the pointer sock_ops gives.
#[map(name = "FP_SK_COUNTED")]
static FP_SK_COUNTED: HashMap<u64, u64> = HashMap::pinned(map_capacity::RXQ, 0);

const TCP_CLOSE: u32 = 7;
const MSG_PEEK: i32 = 2;
/// Reads of the error queue (timestamps) return no stream bytes.
const MSG_ERRQUEUE: i32 = 0x2000;

/// The callbacks a paired socket asks for: state changes, and every segment in or out (none
/// flow while it is paired; after a demotion they are the moments to leave the sockhash), and
/// its retransmission timeouts (the ingress gate's hold is the only loss a node-local
/// connection sees; see [`on_retransmit_timeout`]).
const PAIRED_CB_FLAGS: u32 = BPF_SOCK_OPS_STATE_CB_FLAG
    | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG
    | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG
    | BPF_SOCK_OPS_RTO_CB_FLAG;
const SOL_TCP: i32 = 6;
const TCP_USER_TIMEOUT: i32 = 18;
const TCP_RTO_MAX_MS: i32 = 44;

fn config(index: u32) -> u32 {
    FP_CONFIG.get(index).copied().unwrap_or(0)
}

/// Pairing is on for everyone, or for the installer's self-test namespace only.
fn accel_enabled(netns: u64) -> bool {
    if config(config_index::ACCEL_ENABLED) != 0 {
        return true;
    }
    let selftest = (config(config_index::SELFTEST_NETNS_HI) as u64) << 32
        | config(config_index::SELFTEST_NETNS_LO) as u64;
    selftest != 0 && selftest == netns
}

fn stats(netns: u64) -> Option<&'static mut PodStats> {
    if let Some(p) = FP_STATS.get_ptr_mut(netns) {
        return Some(unsafe { &mut *p });
    }
    let _ = FP_STATS.insert(netns, PodStats::default(), BPF_NOEXIST as u64);
    FP_STATS.get_ptr_mut(netns).map(|p| unsafe { &mut *p })
}

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

fn local_ip(ctx: &SockOpsContext) -> Option<Ip> {
    match ctx.family() {
        AF_INET => Some(Ip::v4(ctx.local_ip4())),
        AF_INET6 => Some(Ip::v6(ctx.local_ip6())),
        _ => None,
    }
}

fn remote_ip(ctx: &SockOpsContext) -> Option<Ip> {
    match ctx.family() {
        AF_INET => Some(Ip::v4(ctx.remote_ip4())),
        AF_INET6 => Some(Ip::v6(ctx.remote_ip6())),
        _ => None,
    }
}

/// `remote_port` is the network-order port shifted into the upper half of a u32.
fn remote_port(ctx: &SockOpsContext) -> u32 {
    u32::from_be(ctx.remote_port())
}

/// The endpoint key of `ip:port` seen from a socket in netns `netns`.
fn endpoint(ip: Ip, port: u32, netns: u64) -> Endpoint {
    let registered = !ip.is_loopback() && unsafe { FP_POD_IPS.get(&IpKey { ip }) }.is_some();
    Endpoint {
        ip,
        port,
        _pad: 0,
        ns: if registered { 0 } else { netns },
    }
}

fn sock_key(ctx: &SockOpsContext, netns: u64) -> Option<SockKey> {
    Some(SockKey {
        local: local_ip(ctx)?,
        remote: remote_ip(ctx)?,
        local_port: ctx.local_port(),
        remote_port: remote_port(ctx),
        netns,
    })
}

/// The socket's kernel address (what `sock:sock_recv_length` reports). Reading it as a number
/// needs CAP_PERFMON, which the agent has.
fn socket_address(ctx: &SockOpsContext) -> u64 {
    unsafe { (*ctx.ops).__bindgen_anon_2.sk as u64 }
}

fn socket_cookie(ctx: &SockOpsContext) -> u64 {
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

fn sockhash_delete(cookie: &u64) {
    unsafe {
        bpf_map_delete_elem(
            &FP_SOCKS as *const SockHash<u64> as *mut _,
            cookie as *const u64 as *const _,
        );
    }
}

/// Compare-and-swap (BPF_CMPXCHG, a full barrier): `Ok(from)` when `*p` was `from` and is
/// now `to`, else `Err` with what `*p` holds.
fn cas(p: *mut u64, from: u64, to: u64) -> Result<u64, u64> {
    let (prev, ok) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, from, to)
    };
    if ok { Ok(prev) } else { Err(prev) }
}

/// Compare-and-swap of a socket's state; `Err(current)` when it was not `from`.
fn state_cas(p: *mut SockState, from: u64, to: u64) -> Result<u64, u64> {
    cas(unsafe { &raw mut (*p).state }, from, to)
}

/// A plain (volatile) load: cpu v3 has no load-acquire. Callers that act on PAIRED re-check
/// the peer (see [`paired_peer`]).
fn state_load(p: *mut SockState) -> u64 {
    unsafe { core::ptr::read_volatile(&raw const (*p).state) }
}

/// The peer of a socket seen PAIRED. `peer` is written once, before the compare-and-swap that
/// publishes PAIRED; should a weakly ordered CPU show the old 0, a compare-and-swap (a full
/// barrier) makes the write visible.
fn paired_peer(p: *mut SockState) -> u64 {
    let peer = unsafe { core::ptr::read_volatile(&raw const (*p).peer) };
    if peer != 0 {
        return peer;
    }
    let _ = state_cas(p, 0, 0);
    unsafe { core::ptr::read_volatile(&raw const (*p).peer) }
}

// cpu v1 (what aya-build asks bpf-linker for) has atomic add without a fetched result; a
// compare-and-swap that changes nothing is the fully ordered read.
fn atomic_add(p: *mut u64, v: u64) {
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, v) };
}

fn atomic_sub(p: *mut u64, v: u64) {
    unsafe { atomic_xsub::<u64, u64, { AtomicOrdering::SeqCst }>(p, v) };
}

fn atomic_read(p: *mut u64) -> u64 {
    match cas(p, 0, 0) {
        Ok(v) | Err(v) => v,
    }
}

fn rxq_cas(q: *mut RxQueue, from: u64, to: u64) -> bool {
    cas(unsafe { &raw mut (*q).state }, from, to).is_ok()
}

fn rxq_state(q: *mut RxQueue) -> u64 {
    atomic_read(unsafe { &raw mut (*q).state })
}

/// Bytes queued for the reader. The counter wraps; below zero reads as empty, which is true:
/// it goes below zero only once a demoted socket reads TCP bytes, and a reader takes TCP bytes
/// only when its redirect queue is empty.
fn rxq_queued(q: *mut RxQueue) -> u64 {
    let n = atomic_read(unsafe { &raw mut (*q).queued }) as i64;
    if n > 0 { n as u64 } else { 0 }
}

fn queue_limit() -> u64 {
    match config(config_index::QUEUE_LIMIT_KIB) {
        0 => DEFAULT_QUEUE_LIMIT_BYTES,
        kib => (kib as u64) << 10,
    }
}

/// Takes both sides of a connection off the fast path (`q` is the entry of socket `cookie`).
/// True for the caller that demoted it. Both sockets are listed in FP_DEMOTED, where the
/// installer looks for drained ones that no segment came to take out of the sockhash.
fn demote(q: *mut RxQueue, cookie: u64) -> bool {
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

/// The filter slot of a socket listed in FP_SK_COUNTED.
fn counted_slot(sk: u64) -> Option<*mut u64> {
    let address = unsafe { FP_SK_COUNTED.get(&sk) }?;
    FP_SK_FILTER.get_ptr_mut(sk_filter_slot(*address))
}

/// Lets the recvmsg tracepoint count this socket's reads (`sk` = [`socket_address`]): its
/// address and cookie, and one more in its filter slot. Called before the pair is published,
/// so no redirected byte can be read uncounted. False: the socket must not be paired.
fn count_reads_of(sk: u64, cookie: u64) -> bool {
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
fn stop_counting_reads_of(sk: u64) {
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
    let pending =
        matches!(unsafe { FP_PAIRS.get(&key) }, Some(st) if st.state == sock_state::PENDING);
    if !pending {
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

/// A request socket of an enrolled listener: the SYN-ACK has not left yet.
#[inline(never)]
fn on_syn(ctx: &SockOpsContext, pod: &PodInfo, netns: u64) {
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
fn on_connect(ctx: &SockOpsContext, pod: &PodInfo, netns: u64) {
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
fn on_active_established(ctx: &SockOpsContext, netns: u64) {
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
    let active = ActiveConn {
        client: key,
        cookie,
        snd_una: ops.snd_una,
        rcv_nxt: ops.rcv_nxt,
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
fn on_passive_established(ctx: &SockOpsContext, pod: &PodInfo, netns: u64) {
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
        && start_queue(own, active.cookie, netns)
        && start_queue(active.cookie, own, active.client.netns)
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

/// The receive-side entry of a socket about to be paired (its peer, its pod). A call of its
/// own: its frame does not stack on the pairing callback's (the verifier allows 512 bytes).
#[inline(never)]
fn start_queue(cookie: u64, peer: u64, netns: u64) -> bool {
    let q = RxQueue {
        queued: 0,
        peer,
        state: rxq_state::OPEN,
        netns,
        last_read_ns: unsafe { bpf_ktime_get_ns() },
    };
    FP_RXQ.insert(&cookie, &q, BPF_ANY as u64).is_ok()
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
fn release_waiting_client(ctx: &SockOpsContext, netns: u64) {
    if let Some((client, active, true)) = waiting_client(ctx, netns) {
        if FP_ACTIVE.remove(&client).is_ok() {
            taint_client(&active);
        }
    }
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
        // Over the limit, unless this message alone is (it goes into an empty queue). The
        // bound need not be exact: a plain read (the ordered one was the state's, above).
        let total = unsafe { core::ptr::read_volatile(queued) } as i64;
        let total = if total > 0 { total as u64 } else { 0 };
        if total > size && total > queue_limit() {
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

/// Whether the ingress gate holds TCP payload back from the socket whose entry is `q`: its
/// redirect queue holds bytes and its reader took some within [`GATE_HOLD_NS`].
fn gate_holds(q: *mut RxQueue) -> bool {
    if rxq_queued(q) == 0 {
        return false;
    }
    let last_read = unsafe { core::ptr::read_volatile(&raw const (*q).last_read_ns) };
    unsafe { bpf_ktime_get_ns() }.saturating_sub(last_read) <= GATE_HOLD_NS
}

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
fn on_retransmit_timeout(ctx: &SockOpsContext) {
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

/// Bytes of TCP payload in a segment (`ctx` starts at the IP header), or `None` when it is not
/// TCP over IPv4 or IPv6 without extension headers.
fn tcp_payload_len(ctx: &SkBuffContext) -> Option<u32> {
    const ETH_P_IP: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86dd;
    const IPPROTO_TCP: u8 = 6;
    let proto = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    let ip_header = if proto == ETH_P_IP {
        if ctx.load::<u8>(9).ok()? != IPPROTO_TCP {
            return None;
        }
        ((ctx.load::<u8>(0).ok()? & 0x0f) as u32) * 4
    } else if proto == ETH_P_IPV6 {
        if ctx.load::<u8>(6).ok()? != IPPROTO_TCP {
            return None;
        }
        40
    } else {
        return None;
    };
    let data_offset: u8 = ctx.load(ip_header as usize + 12).ok()?;
    // The packet's own length, not the IP header's: a BIG TCP packet says 0 there.
    ctx.len()
        .checked_sub(ip_header + ((data_offset >> 4) as u32) * 4)
}

/// Every TCP segment on its way into a socket of the node (cgroup v2 root, ingress). A paired
/// socket whose redirect queue still holds bytes takes no TCP payload: its reader would see
/// two queues at once, and a read returns the redirected bytes only, short of what is there
/// (HAProxy and Envoy take a short read as "drained", and with the peer's FIN seen, as the
/// end of the stream). The segment is dropped, as a full receive buffer drops it; the sender
/// retransmits it, and by then the reader has read every redirected byte and reads the TCP
/// bytes behind them, in order. Segments without payload (ACKs, window probes, FIN, RST)
/// always pass: a FIN behind held payload waits out of order inside TCP until the payload
/// is in. The hold lasts only while the reader keeps reading ([`GATE_HOLD_NS`] without a read
/// lets the payload in): a count that is off must not stall a connection for good. For the
/// sockets the accelerator never paired this costs one hash lookup per segment that carries
/// payload.
#[cgroup_skb(ingress)]
pub fn fastpath_ingress_gate(ctx: SkBuffContext) -> i32 {
    const PASS: i32 = 1;
    const DROP: i32 = 0;
    match tcp_payload_len(&ctx) {
        Some(n) if n > 0 => {}
        _ => return PASS,
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(q) = FP_RXQ.get_ptr_mut(&cookie) else {
        return PASS;
    };
    if !gate_holds(q) {
        return PASS;
    }
    if let Some(s) = stats(unsafe { (*q).netns }) {
        s.tcp_segments_held += 1;
    }
    DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual BSD/GPL\0";
