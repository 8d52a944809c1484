//! What the sock_ops program knows a socket by: its tuple and netns (its FP_PAIRS key), its
//! endpoints (FP_PENDING and FP_ACTIVE keys), its cookie (the sockhash and FP_RXQ) and its
//! kernel address (what the recvmsg tracepoint is given).

use aya_ebpf::{EbpfContext as _, helpers::bpf_get_socket_cookie, programs::SockOpsContext};
use fastpath_common::{AF_INET, AF_INET6, Endpoint, Ip, IpKey, SockKey};

use crate::maps::FP_POD_IPS;

pub(crate) fn local_ip(ctx: &SockOpsContext) -> Option<Ip> {
    match ctx.family() {
        AF_INET => Some(Ip::v4(ctx.local_ip4())),
        AF_INET6 => Some(Ip::v6(ctx.local_ip6())),
        _ => None,
    }
}

pub(crate) fn remote_ip(ctx: &SockOpsContext) -> Option<Ip> {
    match ctx.family() {
        AF_INET => Some(Ip::v4(ctx.remote_ip4())),
        AF_INET6 => Some(Ip::v6(ctx.remote_ip6())),
        _ => None,
    }
}

/// `remote_port` is the network-order port shifted into the upper half of a u32.
pub(crate) fn remote_port(ctx: &SockOpsContext) -> u32 {
    u32::from_be(ctx.remote_port())
}

/// The endpoint key of `ip:port` seen from a socket in netns `netns`.
pub(crate) fn endpoint(ip: Ip, port: u32, netns: u64) -> Endpoint {
    let registered = !ip.is_loopback() && unsafe { FP_POD_IPS.get(&IpKey { ip }) }.is_some();
    Endpoint {
        ip,
        port,
        _pad: 0,
        ns: if registered { 0 } else { netns },
    }
}

pub(crate) fn sock_key(ctx: &SockOpsContext, netns: u64) -> Option<SockKey> {
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
pub(crate) fn socket_address(ctx: &SockOpsContext) -> u64 {
    unsafe { (*ctx.ops).__bindgen_anon_2.sk as u64 }
}

pub(crate) fn socket_cookie(ctx: &SockOpsContext) -> u64 {
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}
