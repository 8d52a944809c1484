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
//!
//! Modules: the programs are [`sock_ops`] (its pairing is in `sock_ops/pairing.rs`),
//! [`sk_msg`], [`rx_consumed`] (the raw tracepoint) and [`ingress_gate`] (the cgroup ingress
//! program); they share [`maps`], [`atomic`], [`pair_state`] (a socket's state) and
//! [`rx_queue`] (its redirect queue).
#![no_std]
#![no_main]
// The BPF target has no compare_exchange on core's atomic types; the intrinsic lowers to the
// BPF_CMPXCHG instruction (cpu v3, kernel >= 5.12).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod atomic;
mod ingress_gate;
mod maps;
mod pair_state;
mod rx_consumed;
mod rx_queue;
mod sk_msg;
mod sock_ops;

#[cfg(doc)]
use fastpath_common::RxQueue;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual BSD/GPL\0";
