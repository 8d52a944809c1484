//! What the eBPF probes, the installer and the CNI plugin must agree on.
//!
//! Everything here is `#[repr(C)]` and `no_std`: the same definitions are compiled into the
//! probes (bpfel-unknown-none) and into both userspace binaries. A change to any layout here is
//! a change to the pinned maps' ABI: bump [`MAP_ABI_VERSION`] so an upgraded installer migrates
//! or recreates the maps instead of reusing them with the wrong layout.
#![no_std]

/// Bumped when the meaning of a map's entries changes while its key and value sizes stay the
/// same. (A size change is caught by the loader's layout check on its own, and only that map
/// is recreated.)
///
/// 3: `sk_msg` honours [`config_index::DRAIN`], so an uninstall may take a paired socket whose
/// redirect queue is empty out of the sockhash. Every socket in a sockhash stamped 3 or later
/// runs such an `sk_msg`: the upgrade to 3 retired the connection maps of earlier builds.
pub const MAP_ABI_VERSION: u32 = 3;

/// The first [`MAP_ABI_VERSION`] whose `sk_msg` honours [`config_index::DRAIN`].
pub const DRAIN_ABI_VERSION: u32 = 3;

/// Directory under the bpffs mount where fastpath pins its programs, links and maps.
pub const PIN_DIR_NAME: &str = "fastpath";
/// Where bpffs is expected to be mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Map names, as declared in the probes and pinned (by name) under the pin directory.
pub mod map_names {
    /// Enrolled pods: netns cookie -> [`crate::PodInfo`].
    pub const PODS: &str = "FP_PODS";
    /// Pod IPs on this node: [`crate::IpKey`] -> netns cookie.
    pub const POD_IPS: &str = "FP_POD_IPS";
    /// The sockhash that sk_msg redirects into: socket cookie (u64) -> socket.
    pub const SOCKS: &str = "FP_SOCKS";
    /// Per-socket pairing state: [`crate::SockKey`] -> [`crate::SockState`].
    pub const PAIRS: &str = "FP_PAIRS";
    /// Enrolled clients waiting for their server: [`crate::Endpoint`] -> [`crate::ActiveConn`].
    pub const ACTIVE: &str = "FP_ACTIVE";
    /// SYNs seen by enrolled listeners: client [`crate::Endpoint`] -> [`crate::PendingSyn`].
    pub const PENDING: &str = "FP_PENDING";
    /// ABI stamp of the pinned set: index -> u64 ([`crate::meta_index`]).
    pub const META: &str = "FP_META";
    /// Per-pod counters: netns cookie -> [`crate::PodStats`] (per CPU).
    pub const STATS: &str = "FP_STATS";
    /// Runtime switches written by the installer after its kernel self-test: index -> u32.
    pub const CONFIG: &str = "FP_CONFIG";
    /// Receive side of every paired socket: socket cookie -> [`crate::RxQueue`].
    pub const RXQ: &str = "FP_RXQ";
    /// Paired sockets by kernel address (what the recvmsg tracepoint reports) -> socket cookie.
    pub const SK_COOKIES: &str = "FP_SK_COOKIES";
    /// Demoted sockets still in the sockhash: socket cookie -> 0 (the installer's sweep list).
    pub const DEMOTED: &str = "FP_DEMOTED";
    /// How many [`SK_COUNTED`] sockets fall in each slot ([`crate::sk_filter_slot`]): the
    /// recvmsg tracepoint looks a socket up in [`SK_COOKIES`] only when its slot is not zero.
    pub const SK_FILTER: &str = "FP_SK_FILTER";
    /// Paired sockets counted in [`SK_FILTER`]: kernel address -> the same. A socket listed in
    /// [`SK_COOKIES`] but not here was paired by a build without the filter.
    pub const SK_COUNTED: &str = "FP_SK_COUNTED";
}

/// Program names, as in the probes' ELF sections.
pub mod prog_names {
    pub const SOCK_OPS: &str = "fastpath_sockops";
    pub const SK_MSG: &str = "fastpath_skmsg";
    /// Raw tracepoint that counts what readers take from their sockets.
    pub const RX_CONSUMED: &str = "fastpath_rx_consumed";
    /// cgroup_skb ingress program that holds TCP payload back from a socket whose redirect
    /// queue is not empty.
    pub const INGRESS_GATE: &str = "fastpath_ingress_gate";
}

/// The tracepoint [`prog_names::RX_CONSUMED`] attaches to (`sock:sock_recv_length`, Linux 6.4+).
pub const RX_CONSUMED_TRACEPOINT: &str = "sock_recv_length";

/// Address family values as the kernel reports them in `bpf_sock_ops.family`.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// An IPv4 or IPv6 address as four 32-bit words in network byte order, as sock_ops exposes them.
/// IPv4 (and IPv4-mapped IPv6) addresses use word 0 and leave words 1..3 zero, so the two
/// families of one dual-stack connection produce the same key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ip {
    pub words: [u32; 4],
}

impl Ip {
    pub const fn v4(addr_be: u32) -> Self {
        Self {
            words: [addr_be, 0, 0, 0],
        }
    }

    /// Normalises an IPv6 address in network-order words; IPv4-mapped (`::ffff:a.b.c.d`)
    /// becomes the IPv4 form.
    pub const fn v6(words_be: [u32; 4]) -> Self {
        if words_be[0] == 0 && words_be[1] == 0 && words_be[2] == 0x0000_ffffu32.to_be() {
            Self::v4(words_be[3])
        } else {
            Self { words: words_be }
        }
    }

    /// True for 127.0.0.0/8 and ::1: such addresses exist in every network namespace.
    pub const fn is_loopback(&self) -> bool {
        let w = self.words;
        let v4_loop = w[1] == 0 && w[2] == 0 && w[3] == 0 && (u32::from_be(w[0]) >> 24) == 127;
        let v6_loop = w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == 1u32.to_be();
        v4_loop || v6_loop
    }
}

/// A socket's identity as both sock_ops and sk_msg can compute it: its own tuple plus its
/// network namespace's cookie (established tuples are unique within one namespace; identical
/// loopback tuples in two pods differ by the cookie). Key of [`map_names::PAIRS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub local: Ip,
    pub remote: Ip,
    /// Host byte order.
    pub local_port: u32,
    /// Host byte order.
    pub remote_port: u32,
    pub netns: u64,
}

/// An endpoint (ip, port) as one side of a connection sees it, scoped to where it is unique.
///
/// `ns` is 0 when `ip` is a registered pod IP (unique on the node, so the two ends of a hop may
/// live in different network namespaces), and the socket's netns cookie otherwise (loopback
/// addresses such as 127.0.0.6 exist in every pod).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub ip: Ip,
    /// Host byte order.
    pub port: u32,
    pub _pad: u32,
    pub ns: u64,
}

/// Value of [`map_names::PENDING`]: a SYN from this client endpoint reached an enrolled listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingSyn {
    /// bpf_ktime_get_ns() when the listener saw the SYN.
    pub seen_ns: u64,
}

/// Value of [`map_names::ACTIVE`]: an enrolled client socket waiting for its local server.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActiveConn {
    /// The client socket's key in [`map_names::PAIRS`].
    pub client: SockKey,
    /// Socket cookie of the client socket (its key in [`map_names::SOCKS`]).
    pub cookie: u64,
    /// The client's `snd_una` and `rcv_nxt` at ACTIVE_ESTABLISHED: the server must see the
    /// mirror image (`rcv_nxt`, `snd_nxt`), which proves it is the other end of this very
    /// connection (64 bits of the two initial sequence numbers).
    pub snd_una: u32,
    pub rcv_nxt: u32,
    /// The client's [`RxQueue::backlog_room`] (only a callback of the socket itself can read
    /// its buffer sizes, and its queue entry is made by the server's callback). Read at
    /// ACTIVE_ESTABLISHED, which runs before the kernel sizes the send buffer for the path,
    /// and again at the client's first segment out (the handshake's last ACK, which the server
    /// establishes on).
    pub backlog_room: u64,
    /// The client's send buffer at ACTIVE_ESTABLISHED, before the kernel sized it.
    pub sndbuf_unsized: u32,
    /// The client's send buffer at its first segment out, once the kernel sized it for the
    /// path (0 before). The server's own is sized only after its callback: when both started
    /// equal, the server's grows as the client's did (same node, same path, same defaults).
    pub sndbuf_sized: u32,
}

/// States of a socket in [`map_names::PAIRS`] ([`SockState::state`]).
pub mod sock_state {
    /// A connecting client of an enrolled pod (between TCP_CONNECT_CB and ACTIVE_ESTABLISHED).
    pub const CONNECTING: u64 = 1;
    /// A client in the sockhash whose local server has not established yet.
    pub const PENDING: u64 = 2;
    /// Paired: every message is redirected to `peer`.
    pub const PAIRED: u64 = 3;
    /// The client sent bytes over TCP before it was paired: it must never be redirected
    /// (redirected bytes would overtake them).
    pub const TAINTED: u64 = 4;
}

/// Socket roles in [`SockState::role`].
pub mod sock_role {
    pub const CLIENT: u32 = 1;
    pub const SERVER: u32 = 2;
}

/// Value of [`map_names::PAIRS`]: per-socket state, keyed by the socket's [`SockKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// One of [`sock_state`]; changed with compare-and-swap by the probes (64-bit because
    /// the BPF target has 64-bit atomics only).
    pub state: u64,
    /// Socket cookie of the peer (valid when `state` is PAIRED).
    pub peer: u64,
    /// Netns cookie of the pod this socket belongs to (for counters).
    pub netns: u64,
    /// bpf_ktime_get_ns() at TCP_CONNECT_CB (clients).
    pub connect_ns: u64,
    /// One of [`sock_role`].
    pub role: u32,
    pub _pad: u32,
    /// The client's endpoint key in [`map_names::ACTIVE`], for clean-up on close.
    pub endpoint: Endpoint,
}

/// Value of [`map_names::RXQ`]: the receive side of one paired socket, keyed by its socket
/// cookie. It bounds what a fast writer can pile up in a slow reader's queue: redirected bytes
/// bypass TCP's flow control (the writer's memory is released as soon as the bytes are
/// queued at the reader), so without a bound the queue grows until the node's TCP memory limit
/// and sends fail with ENOMEM.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxQueue {
    /// Bytes redirected into this socket and not yet read: the peer's sk_msg adds before it
    /// redirects, the recvmsg tracepoint subtracts what the reader took (wrapping arithmetic).
    pub queued: u64,
    /// Socket cookie of the peer.
    pub peer: u64,
    /// One of [`rxq_state`].
    pub state: u64,
    /// Netns cookie of the pod this socket belongs to (for counters).
    pub netns: u64,
    /// When the reader last took bytes out (`bpf_ktime_get_ns`; the pairing time before its
    /// first read). The ingress gate holds TCP payload back only while the reader makes
    /// progress: a count that stays high without any read for [`GATE_HOLD_NS`] means a reader
    /// that paused (TCP would queue the bytes for it too) or a count that is off (a read the
    /// tracepoint missed, as across an upgrade's detach and attach), and holding on would
    /// stall the connection for good.
    pub last_read_ns: u64,
    /// The most this queue may hold, whatever the configured bound: the socket's backlog
    /// limit less the 64 KiB the kernel adds for segments ([`backlog_room`]). The kernel
    /// charges the redirect queue to the socket's receive memory, and a segment that arrives
    /// while the reader holds the socket lock is dropped when that memory is above the backlog
    /// limit; a dropped FIN is retransmitted, a dropped RST is not, and the reader would never
    /// learn of its peer's abort.
    pub backlog_room: u64,
}

/// The kernel's TCP backlog limit without its 64 KiB headroom, for a socket whose receive and
/// send buffers are `rcvbuf` and `sndbuf` (`tcp_add_backlog` in net/ipv4/tcp_ipv4.c:
/// `2 * rcvbuf + sndbuf / 2 + 64 KiB` in current kernels, 6.18 among them, and
/// `rcvbuf + sndbuf + 64 KiB` in older ones; the smaller of the two holds on both). A segment is dropped at the backlog when the socket's
/// receive memory plus its backlog is above the limit, so a redirect queue kept within this
/// room leaves the 64 KiB for the segments that arrive while the reader holds the lock.
pub const fn backlog_room(rcvbuf: u64, sndbuf: u64) -> u64 {
    let before_6_8 = rcvbuf + sndbuf;
    let since_6_8 = 2 * rcvbuf + sndbuf / 2;
    if before_6_8 < since_6_8 {
        before_6_8
    } else {
        since_6_8
    }
}

/// A floor under the send buffer the kernel gives a socket whose MSS is `mss` when its
/// connection establishes (`tcp_sndbuf_expand` in net/ipv4/tcp_input.c: at least 2 × 10
/// segments, each `roundup_pow_of_two(mss + MAX_TCP_HEADER + shared info) + sk_buff` bytes,
/// `MAX_TCP_HEADER` being at least 128 bytes), unless the application set `SO_SNDBUF` or the
/// node's `tcp_wmem[2]` is lower.
///
/// A server's own callback runs before the kernel sizes its send buffer, so its room takes
/// its client's sized buffer, which its client read; but the two are sized for different
/// MSSes when the client's route differs from the server's. A connection an application
/// makes to another pod's address and iptables redirects to its sidecar on loopback is one:
/// the client sizes its buffer for the sidecar's 64 KiB MSS (3.76 MiB), the sidecar for the
/// client's 1448 bytes (67.5 KiB). Taking the smaller of the client's buffer and this floor
/// for the server's MSS keeps the room within the server's real limit.
pub const fn sized_sndbuf_floor(mss: u64) -> u64 {
    const MAX_TCP_HEADER_FLOOR: u64 = 128;
    const INITIAL_SEGMENTS: u64 = 10;
    2 * INITIAL_SEGMENTS * (mss + MAX_TCP_HEADER_FLOOR).next_power_of_two()
}

/// [`RxQueue::backlog_room`] when a socket's buffer sizes cannot be read (`bpf_getsockopt`
/// of `SO_RCVBUF`/`SO_SNDBUF` needs Linux 6.1): the room of the kernel's default buffers
/// (`tcp_rmem[1]` 128 KiB, the smallest send buffer, 4 KiB).
pub const FALLBACK_BACKLOG_ROOM: u64 = backlog_room(128 << 10, 4 << 10);

/// How long the ingress gate holds a socket's TCP payload back without seeing its reader take
/// any byte (see [`RxQueue::last_read_ns`]).
pub const GATE_HOLD_NS: u64 = 2_000_000_000;

/// The longest retransmission timer of a writer whose segments the ingress gate holds
/// (`TCP_RTO_MAX_MS`, whose floor is 1 s): once its reader has read the redirected bytes, the
/// writer sends again within this time, where TCP's backoff could have it wait up to 120 s.
pub const HELD_WRITER_RTO_MAX_MS: u64 = 1_000;

/// How long a held writer goes on retransmitting after its reader stopped reading or went away
/// before it gives up (`ETIMEDOUT`): its `TCP_USER_TIMEOUT` is kept this far ahead of the time
/// it has spent retransmitting. 15 minutes is about what plain TCP takes with the default
/// `tcp_retries2` (924.6 s).
pub const HELD_WRITER_TIMEOUT_GRACE_MS: u64 = 15 * 60 * 1_000;

/// States of an [`RxQueue`] ([`RxQueue::state`]).
pub mod rxq_state {
    /// Redirected bytes may arrive.
    pub const OPEN: u64 = 0;
    /// The connection left the fast path (a reader's queue passed the limit):
    /// no byte is redirected into this socket any more; it leaves the sockhash once its queue
    /// is read empty.
    pub const DEMOTED: u64 = 1;
    /// Demoted and out of the sockhash: a plain TCP socket again.
    pub const LEFT: u64 = 2;
}

/// Bytes a reader may have queued before its connection is demoted, when the installer set
/// no other limit ([`config_index::QUEUE_LIMIT_KIB`]). Each reader's
/// [`RxQueue::backlog_room`] bounds it further (about 2.1 MiB for a loopback socket with the
/// kernel's default buffers). A demotion is the emergency brake for
/// a reader that falls far behind, not a routine step: a connection that goes to TCP while
/// its reader still has redirected bytes queued is the one transition where sidecar proxies
/// were seen to end a stream early (docs/accelerator.md, "HAProxy 2.6 ends streams early by itself"), so the bound
/// sits well above what request/response traffic and most transfers ever queue. Its costs:
/// memory (at most this much per lagging reader, charged to the node's TCP memory), and a
/// demoted stream ran up to 20% slower than plain TCP at this size (the kernel grows the
/// reader's receive buffer to about the backlog it had).
pub const DEFAULT_QUEUE_LIMIT_BYTES: u64 = 16 << 20;

/// Key of a pod IP in [`map_names::POD_IPS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpKey {
    pub ip: Ip,
}

/// Pod flags in [`PodInfo::flags`].
pub mod pod_flags {
    /// The pod is enrolled for acceleration.
    pub const ACCELERATE: u32 = 1 << 0;
}

/// Maximum number of per-pod excluded ports (the splice opt-out).
pub const MAX_EXCLUDED_PORTS: usize = 8;

/// Value of [`map_names::PODS`], written by the plugin on ADD and removed on DEL.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub flags: u32,
    /// Number of valid entries in `excluded_ports`.
    pub excluded_port_count: u32,
    /// Ports (host byte order) whose connections are never accelerated in this pod.
    pub excluded_ports: [u16; MAX_EXCLUDED_PORTS],
}

/// Per-pod counters in [`map_names::STATS`], one copy per CPU, summed by the installer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodStats {
    /// Sockets inserted into the sockhash.
    pub sockets_enrolled: u64,
    /// Sockhash inserts the kernel refused.
    pub enroll_failures: u64,
    /// Messages redirected socket to socket.
    pub msgs_redirected: u64,
    /// Bytes redirected socket to socket.
    pub bytes_redirected: u64,
    /// Messages of enrolled sockets that found no peer and took the TCP path.
    pub peer_misses: u64,
    /// Connections paired (counted on the server side).
    pub connections_paired: u64,
    /// Clients that wrote before their server established: the connection stays on TCP.
    pub early_data_fallbacks: u64,
    /// Paired connections that left the fast path because a reader's queue passed the limit
    /// (counted by the writer's pod).
    pub queue_demotions: u64,
    /// TCP segments with payload held back (dropped, to be retransmitted) because the
    /// receiving socket still had redirected bytes unread.
    pub tcp_segments_held: u64,
}

/// All map names, for pinning, status and uninstall.
pub const ALL_MAPS: [&str; 14] = [
    map_names::PODS,
    map_names::POD_IPS,
    map_names::SOCKS,
    map_names::PAIRS,
    map_names::ACTIVE,
    map_names::PENDING,
    map_names::STATS,
    map_names::CONFIG,
    map_names::META,
    map_names::RXQ,
    map_names::SK_COOKIES,
    map_names::DEMOTED,
    map_names::SK_FILTER,
    map_names::SK_COUNTED,
];

/// Indexes into [`map_names::META`].
pub mod meta_index {
    /// [`crate::MAP_ABI_VERSION`] of the maps pinned.
    pub const ABI_VERSION: u32 = 0;
    /// Hash of the probe object whose programs are attached.
    pub const OBJECT_HASH: u32 = 1;
    pub const LEN: u32 = 4;
}

/// Indexes into [`map_names::CONFIG`].
pub mod config_index {
    /// Non-zero: new connections of enrolled pods are paired. Zero (self-test failed or
    /// acceleration disabled): no socket enters the sockhash; existing pairs run to their end.
    pub const ACCEL_ENABLED: u32 = 0;
    /// Low and high 32 bits of the netns cookie of the installer's self-test namespace, which
    /// is paired even while ACCEL_ENABLED is zero (0 = none).
    pub const SELFTEST_NETNS_LO: u32 = 1;
    pub const SELFTEST_NETNS_HI: u32 = 2;
    /// The queue bound of [`crate::RxQueue`] in KiB (0 = [`crate::DEFAULT_QUEUE_LIMIT_BYTES`]).
    pub const QUEUE_LIMIT_KIB: u32 = 3;
    /// Non-zero: the recvmsg tracepoint looks every socket up, past the read filter. Set by
    /// the installer whenever it attaches new programs, and cleared once no paired socket is
    /// missing from the filter (those a build without it paired are gone).
    pub const READ_FILTER_BYPASS: u32 = 4;
    /// Non-zero (set by an uninstall): `sk_msg` demotes a paired connection at its next message,
    /// as the queue bound does, and the installer may take a paired socket whose redirect
    /// queue is empty out of the sockhash (`installer/src/accel/drain.rs`). A start clears it.
    pub const DRAIN: u32 = 5;
    pub const LEN: u32 = 6;
}

/// Capacities of the maps (max_entries), shared by the probes and the loader's layout check.
pub mod map_capacity {
    pub const PODS: u32 = 16384;
    pub const POD_IPS: u32 = 32768;
    pub const SOCKS: u32 = 131072;
    pub const PAIRS: u32 = 262144;
    pub const ACTIVE: u32 = 65536;
    pub const PENDING: u32 = 65536;
    pub const STATS: u32 = 16384;
    /// One entry per socket in the sockhash.
    pub const RXQ: u32 = SOCKS;
    /// Slots of the recvmsg prefilter: at a few thousand paired sockets, most slots are empty.
    pub const SK_FILTER: u32 = 1 << 16;
}

/// The slot of a socket's kernel address in [`map_names::SK_FILTER`]. Socket objects sit a
/// fixed stride apart in their slab; the golden-ratio multiply spreads such a stride over all
/// slots, and the top bits are the best mixed.
pub const fn sk_filter_slot(sk_address: u64) -> u32 {
    (sk_address.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        >> (64 - map_capacity::SK_FILTER.trailing_zeros())) as u32
}

/// Kernel map types used (`enum bpf_map_type`).
pub mod map_type {
    pub const HASH: u32 = 1;
    pub const ARRAY: u32 = 2;
    pub const PERCPU_HASH: u32 = 5;
    pub const LRU_HASH: u32 = 9;
    pub const SOCKHASH: u32 = 18;
}

/// What a pinned map must look like to be reused by this build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub name: &'static str,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

const fn layout<K, V>(name: &'static str, map_type: u32, max_entries: u32) -> MapLayout {
    MapLayout {
        name,
        map_type,
        key_size: core::mem::size_of::<K>() as u32,
        value_size: core::mem::size_of::<V>() as u32,
        max_entries,
    }
}

/// The layout of every map of this build, in [`ALL_MAPS`] order.
pub const MAP_LAYOUTS: [MapLayout; 14] = [
    layout::<u64, PodInfo>(map_names::PODS, map_type::HASH, map_capacity::PODS),
    layout::<IpKey, u64>(map_names::POD_IPS, map_type::HASH, map_capacity::POD_IPS),
    // aya-ebpf declares sockhash values as u32 (a socket fd from userspace).
    layout::<u64, u32>(map_names::SOCKS, map_type::SOCKHASH, map_capacity::SOCKS),
    layout::<SockKey, SockState>(map_names::PAIRS, map_type::HASH, map_capacity::PAIRS),
    layout::<Endpoint, ActiveConn>(map_names::ACTIVE, map_type::HASH, map_capacity::ACTIVE),
    layout::<Endpoint, PendingSyn>(
        map_names::PENDING,
        map_type::LRU_HASH,
        map_capacity::PENDING,
    ),
    layout::<u64, PodStats>(map_names::STATS, map_type::PERCPU_HASH, map_capacity::STATS),
    layout::<u32, u32>(map_names::CONFIG, map_type::ARRAY, config_index::LEN),
    layout::<u32, u64>(map_names::META, map_type::ARRAY, meta_index::LEN),
    layout::<u64, RxQueue>(map_names::RXQ, map_type::HASH, map_capacity::RXQ),
    layout::<u64, u64>(map_names::SK_COOKIES, map_type::HASH, map_capacity::RXQ),
    layout::<u64, u64>(map_names::DEMOTED, map_type::HASH, map_capacity::RXQ),
    layout::<u32, u64>(
        map_names::SK_FILTER,
        map_type::ARRAY,
        map_capacity::SK_FILTER,
    ),
    layout::<u64, u64>(map_names::SK_COUNTED, map_type::HASH, map_capacity::RXQ),
];

/// Where the plugin keeps one JSON file per enrolled pod, under `cni_agent_run_dir`
/// (`<run_dir>/fastpath/pods/<container-id>.json`).
pub const POD_STATE_SUBDIR: &str = "fastpath/pods";

/// Pod annotation: `"false"` turns acceleration off for the pod (e.g. it splices).
pub const ANNOTATION_ACCELERATE: &str = "fastpath.io/accelerate";
/// Pod annotation: comma-separated TCP ports whose connections are never accelerated (the
/// pod's own listening ports, or destination ports it connects to). At most
/// [`MAX_EXCLUDED_PORTS`].
pub const ANNOTATION_EXCLUDE_PORTS: &str = "fastpath.io/exclude-ports";

impl PodInfo {
    /// The enrollment of a pod; `ports` beyond [`MAX_EXCLUDED_PORTS`] are the caller's error.
    pub fn new(accelerate: bool, ports: &[u16]) -> Self {
        let mut info = Self {
            flags: if accelerate { pod_flags::ACCELERATE } else { 0 },
            ..Self::default()
        };
        for (slot, p) in info.excluded_ports.iter_mut().zip(ports) {
            *slot = *p;
            info.excluded_port_count += 1;
        }
        info
    }
}

impl Ip {
    /// From an IPv4 address's octets.
    pub const fn from_v4_octets(o: [u8; 4]) -> Self {
        Self::v4(u32::from_ne_bytes(o))
    }

    /// From an IPv6 address's octets (IPv4-mapped become IPv4).
    pub const fn from_v6_octets(o: [u8; 16]) -> Self {
        Self::v6([
            u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
            u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
            u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
            u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
        ])
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are repr(C) plain-old-data with no padding-dependent invariants.
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::PendingSyn {}
    unsafe impl aya::Pod for super::ActiveConn {}
    unsafe impl aya::Pod for super::SockState {}
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::PodInfo {}
    unsafe impl aya::Pod for super::PodStats {}
    unsafe impl aya::Pod for super::RxQueue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_room_is_the_smaller_of_both_kernel_formulas() {
        // Loopback defaults on 6.18: 128 KiB receive buffer, 3.76 MiB send buffer (expanded
        // for a 64 KiB MSS): the newer formula is the smaller.
        assert_eq!(
            backlog_room(131_072, 3_939_840),
            2 * 131_072 + 3_939_840 / 2
        );
        // A receive buffer grown past the send buffer: the older formula is the smaller.
        assert_eq!(backlog_room(6 << 20, 16 << 10), (6 << 20) + (16 << 10));
        assert!(FALLBACK_BACKLOG_ROOM <= backlog_room(131_072, 4608));
    }

    #[test]
    fn the_send_buffer_floor_stays_under_what_the_kernel_sized() {
        // Measured on 6.18 (`ss -m`, BBR, whose factor is 3 where others take 2): a socket
        // with a 1448-byte MSS gets 69 120 bytes, one with a 64 KiB MSS 3 939 840.
        assert!(sized_sndbuf_floor(1448) <= 69_120);
        assert!(sized_sndbuf_floor(65_483) <= 3_939_840);
        assert!(sized_sndbuf_floor(32_768) <= 3_939_840);
        // It follows the MSS: a floor for a small MSS is no room for a large queue.
        assert_eq!(sized_sndbuf_floor(1448), 2 * 10 * 2048);
        assert_eq!(sized_sndbuf_floor(65_483), 2 * 10 * 131_072);
        // The asymmetric connection that lost a reset: a client sized for 64 KiB segments,
        // a server for 1448-byte ones; the server's room must be under its own limit.
        let server_limit_less_headroom = 2 * 131_072 + 69_120 / 2;
        let room = backlog_room(131_072, min(3_939_840, sized_sndbuf_floor(1448)));
        assert!(room <= server_limit_less_headroom, "{room}");
    }

    const fn min(a: u64, b: u64) -> u64 {
        if a < b { a } else { b }
    }

    #[test]
    fn v4_mapped_v6_normalises_to_v4() {
        let v4 = Ip::v4(u32::from_be_bytes([10, 1, 2, 3]).to_be());
        let mapped = Ip::v6([
            0,
            0,
            0x0000_ffffu32.to_be(),
            u32::from_be_bytes([10, 1, 2, 3]).to_be(),
        ]);
        assert_eq!(v4, mapped);
    }

    #[test]
    fn octets_match_network_order_words() {
        assert_eq!(
            Ip::from_v4_octets([10, 1, 2, 3]),
            Ip::v4(u32::from_be_bytes([10, 1, 2, 3]).to_be())
        );
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&[10, 1, 2, 3]);
        assert_eq!(
            Ip::from_v6_octets(mapped),
            Ip::from_v4_octets([10, 1, 2, 3])
        );
    }

    #[test]
    fn pod_info_keeps_ports() {
        let p = PodInfo::new(true, &[80, 443]);
        assert_eq!(p.flags, pod_flags::ACCELERATE);
        assert_eq!(p.excluded_port_count, 2);
        assert_eq!(&p.excluded_ports[..2], &[80, 443]);
    }

    #[test]
    fn layouts_cover_all_maps_in_order() {
        for (l, n) in MAP_LAYOUTS.iter().zip(ALL_MAPS) {
            assert_eq!(l.name, n);
        }
    }

    #[test]
    fn loopback_detection() {
        assert!(Ip::v4(u32::from_be_bytes([127, 0, 0, 6]).to_be()).is_loopback());
        assert!(!Ip::v4(u32::from_be_bytes([10, 0, 0, 6]).to_be()).is_loopback());
        assert!(Ip::v6([0, 0, 0, 1u32.to_be()]).is_loopback());
    }

    /// Sockets of one slab, a fixed stride apart (TCP and TCPv6 objects), must land in about
    /// as many distinct slots as random addresses would (4096 in 65536: ~3970 distinct), or
    /// the tracepoint would look up bystanders whose slot a paired socket shares.
    #[test]
    fn filter_slots_spread_slab_strides() {
        for stride in [2432u64, 2560, 4096] {
            let mut used = [false; map_capacity::SK_FILTER as usize];
            let mut distinct = 0;
            for i in 0..4096u64 {
                let slot = sk_filter_slot(0xffff_8881_0000_0000 + i * stride) as usize;
                if !used[slot] {
                    used[slot] = true;
                    distinct += 1;
                }
            }
            assert!(
                distinct >= 3900,
                "stride {stride}: {distinct} distinct slots of 4096"
            );
        }
        assert!(sk_filter_slot(u64::MAX) < map_capacity::SK_FILTER);
    }

    #[test]
    fn layouts_are_stable() {
        assert_eq!(core::mem::size_of::<Ip>(), 16);
        assert_eq!(core::mem::size_of::<Endpoint>(), 32);
        assert_eq!(core::mem::size_of::<SockKey>(), 48);
        assert_eq!(core::mem::size_of::<ActiveConn>(), 80);
        assert_eq!(core::mem::size_of::<SockState>(), 72);
        assert_eq!(core::mem::size_of::<PodInfo>(), 24);
        assert_eq!(core::mem::size_of::<PodStats>(), 72);
        assert_eq!(core::mem::size_of::<RxQueue>(), 48);
    }
}
