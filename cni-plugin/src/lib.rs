//! istio-cni: the chained CNI plugin (drop-in for Istio's, sidecar mode).
//!
//! Pure parts (protocol, config, decision, redirect parsing, rule text) are separate from the
//! side effects (API call, netns, iptables), so each is unit-tested on its own.
pub mod accel;
pub mod arena;
pub mod config;
pub mod iptables;
pub mod kube;
pub mod log;
pub mod netlink;
pub mod nftables;
pub mod plugin;
pub mod pod;
pub mod pod_cache;
pub mod redirect;
pub mod result;
pub mod routing;
pub mod rules;
pub mod skel;
pub mod timestamp;
pub mod tls;
pub mod version;

/// The `about` text printed when run without `CNI_COMMAND`.
pub const ABOUT: &str = concat!(
    "CNI plugin istio-cni (fastpath) v",
    env!("CARGO_PKG_VERSION")
);
