//! The cgroup ingress program that holds TCP payload back from a socket while its redirect
//! queue holds bytes.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use fastpath_common::{GATE_HOLD_NS, RxQueue};

use crate::{
    maps::{FP_RXQ, stats},
    rx_queue::rxq_queued,
};

/// Whether the ingress gate holds TCP payload back from the socket whose entry is `q`: its
/// redirect queue holds bytes and its reader took some within [`GATE_HOLD_NS`].
pub(crate) fn gate_holds(q: *mut RxQueue) -> bool {
    if rxq_queued(q) == 0 {
        return false;
    }
    let last_read = unsafe { core::ptr::read_volatile(&raw const (*q).last_read_ns) };
    unsafe { bpf_ktime_get_ns() }.saturating_sub(last_read) <= GATE_HOLD_NS
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
