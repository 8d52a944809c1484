//! fastpath's eBPF programs (built for bpfel-unknown-none by the installer's build script).
//!
//! `fastpath_sockops` runs on the root cgroup v2 for every TCP socket event on the node. It does
//! nothing unless the socket's network namespace is an enrolled pod (one hash lookup).
//! `fastpath_skmsg` runs on every sendmsg of a socket in the sockhash and redirects the message
//! into the peer socket's receive queue.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_INGRESS, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, sk_action,
    },
    helpers::bpf_get_netns_cookie,
    macros::{map, sk_msg, sock_ops},
    maps::{Array, HashMap, PerCpuHashMap, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use fastpath_common::{
    AF_INET, AF_INET6, Ip, IpKey, PodInfo, PodStats, SockKey, config_index, pod_flags,
};

#[map(name = "FP_PODS")]
static FP_PODS: HashMap<u64, PodInfo> = HashMap::pinned(16384, 0);

#[map(name = "FP_POD_IPS")]
static FP_POD_IPS: HashMap<IpKey, u64> = HashMap::pinned(32768, 0);

#[map(name = "FP_SOCKS")]
static FP_SOCKS: SockHash<SockKey> = SockHash::pinned(65536, 0);

#[map(name = "FP_STATS")]
static FP_STATS: PerCpuHashMap<u64, PodStats> = PerCpuHashMap::pinned(16384, 0);

#[map(name = "FP_CONFIG")]
static FP_CONFIG: Array<u32> = Array::pinned(config_index::LEN, 0);

fn accel_enabled() -> bool {
    matches!(FP_CONFIG.get(config_index::ACCEL_ENABLED), Some(v) if *v != 0)
}

fn stats(netns: u64) -> Option<&'static mut PodStats> {
    if let Some(p) = FP_STATS.get_ptr_mut(netns) {
        return Some(unsafe { &mut *p });
    }
    let _ = FP_STATS.insert(netns, PodStats::default(), BPF_NOEXIST as u64);
    FP_STATS.get_ptr_mut(netns).map(|p| unsafe { &mut *p })
}

fn own_key(ctx: &SockOpsContext, netns: u64) -> Option<SockKey> {
    let (local, remote) = match ctx.family() {
        AF_INET => (Ip::v4(ctx.local_ip4()), Ip::v4(ctx.remote_ip4())),
        AF_INET6 => (Ip::v6(ctx.local_ip6()), Ip::v6(ctx.remote_ip6())),
        _ => return None,
    };
    Some(SockKey {
        local,
        remote,
        local_port: ctx.local_port(),
        // remote_port is in network byte order in the upper 16 bits' position of a u32.
        remote_port: u32::from_be(ctx.remote_port()),
        netns,
    })
}

#[sock_ops]
pub fn fastpath_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 0;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(pod) = (unsafe { FP_PODS.get(&netns) }) else {
        return 0;
    };
    if pod.flags & pod_flags::ACCELERATE == 0 || !accel_enabled() {
        return 0;
    }
    let Some(mut key) = own_key(&ctx, netns) else {
        return 0;
    };
    let ok = FP_SOCKS
        .update(&mut key, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64)
        .is_ok();
    if let Some(s) = stats(netns) {
        if ok {
            s.sockets_enrolled += 1;
        } else {
            s.enroll_failures += 1;
        }
    }
    let _ = &FP_POD_IPS;
    0
}

#[sk_msg]
pub fn fastpath_skmsg(ctx: SkMsgContext) -> u32 {
    let md = unsafe { &*ctx.msg };
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let family = md.family;
    let (local, remote) = if family == AF_INET {
        (Ip::v4(md.local_ip4), Ip::v4(md.remote_ip4))
    } else {
        (Ip::v6(md.local_ip6), Ip::v6(md.remote_ip6))
    };
    // The peer's key is our tuple reversed, in the same namespace.
    let mut peer = SockKey {
        local: remote,
        remote: local,
        local_port: u32::from_be(md.remote_port),
        remote_port: md.local_port,
        netns,
    };
    let size = ctx.size() as u64;
    let redirected =
        FP_SOCKS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) == sk_action::SK_PASS as i64;
    if let Some(s) = stats(netns) {
        if redirected {
            s.msgs_redirected += 1;
            s.bytes_redirected += size;
        } else {
            s.peer_misses += 1;
        }
    }
    sk_action::SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual BSD/GPL\0";
