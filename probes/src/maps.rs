//! The maps (pinned; the installer and the CNI plugin find them by name) and the helpers that
//! read them on every program's behalf.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_map_delete_elem,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuHashMap, SockHash},
};
use fastpath_common::{
    ActiveConn, Endpoint, IpKey, PendingSyn, PodInfo, PodStats, RxQueue, SockKey, SockState,
    config_index, map_capacity,
};

#[map(name = "FP_PODS")]
pub(crate) static FP_PODS: HashMap<u64, PodInfo> = HashMap::pinned(map_capacity::PODS, 0);

#[map(name = "FP_POD_IPS")]
pub(crate) static FP_POD_IPS: HashMap<IpKey, u64> = HashMap::pinned(map_capacity::POD_IPS, 0);

#[map(name = "FP_SOCKS")]
pub(crate) static FP_SOCKS: SockHash<u64> = SockHash::pinned(map_capacity::SOCKS, 0);

// Not LRU: evicting a live socket's state would strand it in the sockhash.
#[map(name = "FP_PAIRS")]
pub(crate) static FP_PAIRS: HashMap<SockKey, SockState> = HashMap::pinned(map_capacity::PAIRS, 0);

// Not LRU either: an evicted entry would leave its client in the sockhash without a peer.
#[map(name = "FP_ACTIVE")]
pub(crate) static FP_ACTIVE: HashMap<Endpoint, ActiveConn> =
    HashMap::pinned(map_capacity::ACTIVE, 0);

// LRU: a SYN whose handshake never completes leaves an entry nobody removes.
#[map(name = "FP_PENDING")]
pub(crate) static FP_PENDING: LruHashMap<Endpoint, PendingSyn> =
    LruHashMap::pinned(map_capacity::PENDING, 0);

#[map(name = "FP_STATS")]
static FP_STATS: PerCpuHashMap<u64, PodStats> = PerCpuHashMap::pinned(map_capacity::STATS, 0);

#[map(name = "FP_CONFIG")]
static FP_CONFIG: Array<u32> = Array::pinned(config_index::LEN, 0);

#[map(name = "FP_META")]
pub(crate) static FP_META: Array<u64> = Array::pinned(fastpath_common::meta_index::LEN, 0);

#[map(name = "FP_RXQ")]
pub(crate) static FP_RXQ: HashMap<u64, RxQueue> = HashMap::pinned(map_capacity::RXQ, 0);

// Demoted sockets (keys only): what the installer sweeps.
#[map(name = "FP_DEMOTED")]
pub(crate) static FP_DEMOTED: HashMap<u64, u64> = HashMap::pinned(map_capacity::RXQ, 0);

// The tracepoint knows a socket by its kernel address only.
#[map(name = "FP_SK_COOKIES")]
pub(crate) static FP_SK_COOKIES: HashMap<u64, u64> = HashMap::pinned(map_capacity::RXQ, 0);

// How many FP_SK_COOKIES entries each slot holds: what spares other sockets' reads a lookup.
#[map(name = "FP_SK_FILTER")]
pub(crate) static FP_SK_FILTER: Array<u64> = Array::pinned(map_capacity::SK_FILTER, 0);

// The sockets counted in FP_SK_FILTER: kernel address -> the same address. As a map value it
// is a number; the verifier allows no arithmetic on the pointer sock_ops gives.
#[map(name = "FP_SK_COUNTED")]
pub(crate) static FP_SK_COUNTED: HashMap<u64, u64> = HashMap::pinned(map_capacity::RXQ, 0);

pub(crate) fn config(index: u32) -> u32 {
    FP_CONFIG.get(index).copied().unwrap_or(0)
}

/// Pairing is on for everyone, or for the installer's self-test namespace only.
pub(crate) fn accel_enabled(netns: u64) -> bool {
    if config(config_index::ACCEL_ENABLED) != 0 {
        return true;
    }
    let selftest = (config(config_index::SELFTEST_NETNS_HI) as u64) << 32
        | config(config_index::SELFTEST_NETNS_LO) as u64;
    selftest != 0 && selftest == netns
}

pub(crate) fn stats(netns: u64) -> Option<&'static mut PodStats> {
    if let Some(p) = FP_STATS.get_ptr_mut(netns) {
        return Some(unsafe { &mut *p });
    }
    let _ = FP_STATS.insert(netns, PodStats::default(), BPF_NOEXIST as u64);
    FP_STATS.get_ptr_mut(netns).map(|p| unsafe { &mut *p })
}

pub(crate) fn sockhash_delete(cookie: &u64) {
    unsafe {
        bpf_map_delete_elem(
            &FP_SOCKS as *const SockHash<u64> as *mut _,
            cookie as *const u64 as *const _,
        );
    }
}
