//! Kernel features the accelerator uses above its floor, found by trying them at start rather
//! than read off the version (distribution kernels backport), each with a fallback:
//! - **sockmap links** (`BPF_LINK_CREATE` on a sockhash, Linux 6.10): without them `sk_msg` is
//!   attached to the sockhash with `BPF_PROG_ATTACH`, which lasts as long as the pinned
//!   sockhash, so restarts and upgrades keep it as they keep a link;
//! - **the `sock:sock_recv_length` tracepoint** (Linux 6.4): it counts what readers take from
//!   their redirect queues, and without it no queue can be bounded, so acceleration stays off
//!   and says why (an unbounded queue can exhaust the node's TCP memory);
//! - **kernel BTF** (`/sys/kernel/btf/vmlinux`): the probes carry their own BTF and read no
//!   kernel type through CO-RE, so they load without it.
//!
//! `FASTPATH_KERNEL_FEATURES_OFF` switches features off as if the kernel lacked them: an
//! escape hatch for a kernel where one misbehaves, and how the tests force each fallback.

/// Features switched off (`FASTPATH_KERNEL_FEATURES_OFF`, a comma-separated list).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeaturesOff {
    pub sockmap_link: bool,
    pub recvmsg_tracepoint: bool,
    pub btf: bool,
}

/// The names `FASTPATH_KERNEL_FEATURES_OFF` takes.
pub const NAMES: [&str; 3] = ["sockmap-link", "recvmsg-tracepoint", "btf"];

/// A name `FASTPATH_KERNEL_FEATURES_OFF` does not know.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown kernel feature {name:?} (known: {})", NAMES.join(", "))]
pub struct UnknownFeature {
    pub name: String,
}

impl FeaturesOff {
    /// Parses the list; an unknown name is an error that names it and the known ones.
    pub fn parse(list: &str) -> Result<Self, UnknownFeature> {
        let mut off = FeaturesOff::default();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "sockmap-link" => off.sockmap_link = true,
                "recvmsg-tracepoint" => off.recvmsg_tracepoint = true,
                "btf" => off.btf = true,
                other => {
                    return Err(UnknownFeature {
                        name: other.to_string(),
                    });
                }
            }
        }
        Ok(off)
    }
}

/// The kernel's BTF, unless switched off or absent (then the probes load without it).
pub fn kernel_btf(off: &FeaturesOff) -> Option<aya::Btf> {
    if off.btf {
        log::info!("kernel BTF: not used (FASTPATH_KERNEL_FEATURES_OFF=btf)");
        return None;
    }
    match aya::Btf::from_sys_fs() {
        Ok(btf) => Some(btf),
        Err(e) => {
            log::info!("kernel BTF: not available ({e}); the probes load without it");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_names_features_and_refuses_others() {
        assert_eq!(FeaturesOff::parse(""), Ok(FeaturesOff::default()));
        assert_eq!(
            FeaturesOff::parse(" sockmap-link, btf "),
            Ok(FeaturesOff {
                sockmap_link: true,
                recvmsg_tracepoint: false,
                btf: true
            })
        );
        let e = FeaturesOff::parse("sockmap-link,kprobes").unwrap_err();
        assert_eq!(e.name, "kprobes");
        let e = e.to_string();
        assert!(
            e.contains("\"kprobes\"") && e.contains("recvmsg-tracepoint"),
            "{e}"
        );
    }
}
