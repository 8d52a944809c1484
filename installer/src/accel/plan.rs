//! Pure decisions of the loader: where cgroup v2 is, whether a pinned map can be reused, and
//! whether a pinned installation can be reused as a whole.
use super::sys::MapInfo as MapIds;
use fastpath_common::{MapLayout, map_names};
use std::path::{Path, PathBuf};

/// The cgroup v2 mount from /proc/self/mounts text: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid hosts, else the first cgroup2 mount.
pub fn cgroup2_root(mounts: &str) -> Option<PathBuf> {
    let found: Vec<&str> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then_some(dir)
        })
        .collect();
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .find(|p| found.contains(p))
        .or(found.first().copied())
        .map(PathBuf::from)
}

/// What this process can see of the node, for finding the host's bpffs and cgroup v2 root.
///
/// In the DaemonSet pod, the container has its own mount and cgroup namespaces: its
/// `/sys/fs/cgroup` is the pod's own cgroup (attaching there would accelerate nothing), and its
/// `/sys/fs/bpf` is the host's only when mounted from the host. Istio's chart mounts the host's
/// `/proc` at `/host/proc`, and through `/host/proc/1/root` the host's filesystem is reachable
/// with the capabilities the chart grants, so swapping the image is enough.
#[derive(Clone, Copy, Debug)]
pub struct NodeView<'a> {
    /// `/proc/self/mounts`.
    pub own_mounts: &'a str,
    /// `/host/proc/1/mounts`, when the host's procfs is mounted there.
    pub host_mounts: Option<&'a str>,
    /// Whether this process shares the host's cgroup namespace (`/proc/self/ns/cgroup` is
    /// `/host/proc/1/ns/cgroup`, or, without the host's procfs, the initial namespace).
    pub host_cgroup_ns: bool,
    /// The host's root as reachable from here (`/host/proc/1/root`).
    pub host_root: &'a Path,
}

fn mounted_at<'m>(mounts: &'m str, fstype: &str) -> impl Iterator<Item = &'m str> {
    mounts.lines().filter_map(move |l| {
        let mut f = l.split_whitespace();
        let (_, dir, ty) = (f.next()?, f.next()?, f.next()?);
        (ty == fstype).then_some(dir)
    })
}

/// The host's bpffs, as a path this process can pin under: its own `/sys/fs/bpf` when that is
/// a bpffs mount (on the host, or a hostPath mount), else the host's through `host_root`, else
/// `/sys/fs/bpf` to be mounted here (private to this pod: pins would not outlive it).
pub fn host_bpffs(view: &NodeView<'_>) -> PathBuf {
    let bpf = Path::new(fastpath_common::BPFFS_ROOT);
    if mounted_at(view.own_mounts, "bpf").any(|d| Path::new(d) == bpf) {
        return bpf.to_path_buf();
    }
    match view.host_mounts {
        Some(host) if mounted_at(host, "bpf").any(|d| Path::new(d) == bpf) => {
            view.host_root.join(bpf.strip_prefix("/").unwrap_or(bpf))
        }
        _ => bpf.to_path_buf(),
    }
}

/// The host's cgroup v2 root, as a path this process can open, or why it cannot be reached.
/// A pod in a cgroup namespace of its own sees only its own subtree at its cgroup mount:
/// attached there, sock_ops would accelerate nothing but this pod, so without the host's
/// procfs to reach the host's root through there is no root to use.
pub fn host_cgroup_root(view: &NodeView<'_>) -> Result<PathBuf, CgroupRootError> {
    match view.host_mounts {
        Some(host) if !view.host_cgroup_ns => {
            let root = cgroup2_root(host).ok_or(CgroupRootError::NoneOnTheHost)?;
            Ok(view.host_root.join(root.strip_prefix("/").unwrap_or(&root)))
        }
        None if !view.host_cgroup_ns => Err(CgroupRootError::OwnNamespaceWithoutHostProc),
        // In the host's cgroup namespace, either mount table names the same hierarchy: the
        // pod's own when a cgroup v2 is mounted in it, else the host's through `host_root` (a
        // hybrid host under a runtime that mounts only the v1 controllers into the pod).
        _ => cgroup2_root(view.own_mounts)
            .or_else(|| {
                let root = cgroup2_root(view.host_mounts?)?;
                Some(view.host_root.join(root.strip_prefix("/").unwrap_or(&root)))
            })
            .ok_or(CgroupRootError::NoneFound),
    }
}

/// Why the host's cgroup v2 root cannot be reached ([`host_cgroup_root`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CgroupRootError {
    #[error("no cgroup v2 mount in the host's /host/proc/1/mounts")]
    NoneOnTheHost,
    #[error(
        "this pod has a cgroup namespace of its own and /host/proc is not mounted, so the \
         host's cgroup v2 root cannot be reached (mount the host's /proc at /host/proc, as \
         Istio's chart does with repair.repairPods=true, or set FASTPATH_CGROUP_ROOT)"
    )]
    OwnNamespaceWithoutHostProc,
    #[error(
        "no cgroup v2 mount in this pod's mounts nor in the host's /host/proc/1/mounts (a \
         cgroup v1 host; on a hybrid host, mount the host's cgroup v2 hierarchy or set \
         FASTPATH_CGROUP_ROOT)"
    )]
    NoneFound,
}

/// The inode of the initial cgroup namespace (`PROC_CGROUP_INIT_INO`, fixed by the kernel):
/// `/proc/self/ns/cgroup` reads `cgroup:[4026531835]` in the host's namespace.
pub const INIT_CGROUP_NS: &str = "cgroup:[4026531835]";

/// FNV-1a over the probe object: identifies the build whose programs are attached.
pub fn object_hash(object: &[u8]) -> u64 {
    object.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What to do with one map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapVerdict {
    /// Not pinned: create and pin.
    Create,
    /// Pinned with this build's layout: reuse (same map id, entries kept).
    Reuse,
    /// Pinned with another layout or ABI: unpin and create anew, for this reason.
    Recreate(String),
}

/// Decides about one map from what is pinned (`found`), what this build declares, and the ABI
/// version stored in the pinned set (`stored_abi`, `None` when there is no stamp).
pub fn map_verdict(
    found: Option<MapIds>,
    want: &MapLayout,
    stored_abi: Option<u64>,
    our_abi: u64,
) -> MapVerdict {
    let Some(f) = found else {
        return MapVerdict::Create;
    };
    let have = (f.map_type, f.key_size, f.value_size, f.max_entries);
    let need = (
        want.map_type,
        want.key_size,
        want.value_size,
        want.max_entries,
    );
    if have != need {
        return MapVerdict::Recreate(format!(
            "layout changed: pinned (type {}, key {} B, value {} B, {} entries), this build \
             (type {}, key {} B, value {} B, {} entries)",
            have.0, have.1, have.2, have.3, need.0, need.1, need.2, need.3
        ));
    }
    match stored_abi {
        Some(a) if a != our_abi => MapVerdict::Recreate(format!(
            "map ABI version {a} pinned, this build has {our_abi}"
        )),
        _ => MapVerdict::Reuse,
    }
}

/// Maps that hold live connections' state: the sockhash, pairing, queues and their read
/// counting. A build that changes one of them cannot take over the connections that live on
/// the old ones, so the old set is retired whole, with the programs that serve it (`retire`).
pub const CONNECTION_MAPS: [&str; 9] = [
    map_names::SOCKS,
    map_names::PAIRS,
    map_names::ACTIVE,
    map_names::PENDING,
    map_names::RXQ,
    map_names::SK_COOKIES,
    map_names::DEMOTED,
    map_names::SK_FILTER,
    map_names::SK_COUNTED,
];

/// Whether the connection maps must be retired: one of them is pinned with another layout or
/// map ABI. The read filter alone does not count: losing its counts costs lookups, not bytes
/// (the start unmarks the sockets it counted).
pub fn must_retire<'a>(verdicts: impl IntoIterator<Item = (&'a str, &'a MapVerdict)>) -> bool {
    verdicts.into_iter().any(|(name, v)| {
        matches!(v, MapVerdict::Recreate(_))
            && name != map_names::SK_FILTER
            && CONNECTION_MAPS.contains(&name)
    })
}

/// What is pinned, as the start-up decision needs it.
#[derive(Clone, Debug, Default)]
pub struct Pinned {
    pub sockops_link: bool,
    pub skmsg_link: bool,
    pub rx_consumed_link: bool,
    pub ingress_gate_link: bool,
    pub object_hash: Option<u64>,
}

/// True when the pinned installation is exactly this build and complete: nothing to load.
pub fn reuse_everything(pinned: &Pinned, verdicts: &[MapVerdict], our_hash: u64) -> bool {
    pinned.sockops_link
        && pinned.skmsg_link
        && pinned.rx_consumed_link
        && pinned.ingress_gate_link
        && pinned.object_hash == Some(our_hash)
        && verdicts.iter().all(|v| *v == MapVerdict::Reuse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastpath_common::MAP_LAYOUTS;

    #[test]
    fn a_changed_connection_map_retires_the_set_and_other_changes_do_not() {
        let changed = MapVerdict::Recreate("layout changed".into());
        let reuse = MapVerdict::Reuse;
        for name in CONNECTION_MAPS {
            let want = name != map_names::SK_FILTER;
            assert_eq!(
                must_retire([(map_names::PODS, &reuse), (name, &changed)]),
                want,
                "{name}"
            );
        }
        for name in [
            map_names::PODS,
            map_names::POD_IPS,
            map_names::STATS,
            map_names::CONFIG,
        ] {
            assert!(!must_retire([(name, &changed)]), "{name}");
        }
        assert!(!must_retire([(map_names::SOCKS, &MapVerdict::Create)]));
        assert!(!must_retire([(map_names::RXQ, &reuse)]));
    }

    const POD_MOUNTS: &str = "overlay / overlay rw 0 0\n\
                              cgroup /sys/fs/cgroup cgroup2 ro,nsdelegate 0 0\n";
    const HOST_MOUNTS: &str = "/dev/vda / ext4 rw 0 0\n\
                               cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n\
                               bpf /sys/fs/bpf bpf rw 0 0\n";

    #[test]
    fn in_a_pod_the_host_is_reached_through_host_proc() {
        let view = NodeView {
            own_mounts: POD_MOUNTS,
            host_mounts: Some(HOST_MOUNTS),
            host_cgroup_ns: false,
            host_root: Path::new("/host/proc/1/root"),
        };
        assert_eq!(
            host_bpffs(&view),
            PathBuf::from("/host/proc/1/root/sys/fs/bpf")
        );
        assert_eq!(
            host_cgroup_root(&view),
            Ok(PathBuf::from("/host/proc/1/root/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn a_hostpath_bpffs_and_a_shared_cgroup_ns_are_used_directly() {
        let own = format!("{POD_MOUNTS}bpf /sys/fs/bpf bpf rw 0 0\n");
        let view = NodeView {
            own_mounts: &own,
            host_mounts: Some(HOST_MOUNTS),
            host_cgroup_ns: true,
            host_root: Path::new("/host/proc/1/root"),
        };
        assert_eq!(host_bpffs(&view), PathBuf::from("/sys/fs/bpf"));
        assert_eq!(host_cgroup_root(&view), Ok(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn on_the_host_itself_everything_is_local() {
        let view = NodeView {
            own_mounts: HOST_MOUNTS,
            host_mounts: None,
            host_cgroup_ns: true,
            host_root: Path::new("/host/proc/1/root"),
        };
        assert_eq!(host_bpffs(&view), PathBuf::from("/sys/fs/bpf"));
        assert_eq!(
            host_cgroup_root(&view),
            Ok(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // No bpffs anywhere: mount one here.
        let bare = NodeView {
            own_mounts: POD_MOUNTS,
            host_mounts: None,
            ..view
        };
        assert_eq!(host_bpffs(&bare), PathBuf::from("/sys/fs/bpf"));
    }

    /// A hybrid host whose runtime mounts only the v1 controllers into the pod (containerd in
    /// cgroup v1 mode, sharing the host's cgroup namespace): the host's cgroup v2 is reached
    /// through /host/proc. Without /host/proc the error names what to do.
    #[test]
    fn in_the_hosts_cgroup_namespace_without_cgroup2_in_the_pod_the_hosts_is_used() {
        let v1_only = "tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
                       cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n";
        let view = NodeView {
            own_mounts: v1_only,
            host_mounts: Some(HOST_MOUNTS),
            host_cgroup_ns: true,
            host_root: Path::new("/host/proc/1/root"),
        };
        assert_eq!(
            host_cgroup_root(&view),
            Ok(PathBuf::from("/host/proc/1/root/sys/fs/cgroup/unified"))
        );
        let e = host_cgroup_root(&NodeView {
            host_mounts: None,
            ..view
        })
        .unwrap_err();
        assert_eq!(e, CgroupRootError::NoneFound);
        assert!(e.to_string().contains("FASTPATH_CGROUP_ROOT"), "{e}");
    }

    /// Istio's chart with repair.repairPods=false mounts no /host/proc: a pod in a cgroup
    /// namespace of its own must not take its own cgroup mount for the host's root.
    #[test]
    fn without_the_host_procfs_a_private_cgroup_namespace_has_no_root() {
        let view = NodeView {
            own_mounts: POD_MOUNTS,
            host_mounts: None,
            host_cgroup_ns: false,
            host_root: Path::new("/host/proc/1/root"),
        };
        let e = host_cgroup_root(&view).unwrap_err();
        assert_eq!(e, CgroupRootError::OwnNamespaceWithoutHostProc);
        assert!(e.to_string().contains("/host/proc is not mounted"), "{e}");
    }

    #[test]
    fn finds_unified_or_hybrid_cgroup2() {
        let hybrid = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n\
                      tmpfs /sys/fs/cgroup tmpfs rw 0 0\n";
        assert_eq!(
            cgroup2_root(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_root(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let other = "cgroup2 /run/cg cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_root(other), Some(PathBuf::from("/run/cg")));
        assert_eq!(cgroup2_root("proc /proc proc rw 0 0\n"), None);
    }

    fn ids(l: &MapLayout) -> MapIds {
        MapIds {
            map_type: l.map_type,
            id: 7,
            key_size: l.key_size,
            value_size: l.value_size,
            max_entries: l.max_entries,
        }
    }

    #[test]
    fn same_layout_is_reused_changed_layout_recreated() {
        let l = &MAP_LAYOUTS[0];
        assert_eq!(map_verdict(None, l, None, 2), MapVerdict::Create);
        assert_eq!(map_verdict(Some(ids(l)), l, Some(2), 2), MapVerdict::Reuse);
        let mut bigger = ids(l);
        bigger.value_size += 8;
        assert!(matches!(
            map_verdict(Some(bigger), l, Some(2), 2),
            MapVerdict::Recreate(r) if r.contains("layout changed")
        ));
        assert!(matches!(
            map_verdict(Some(ids(l)), l, Some(1), 2),
            MapVerdict::Recreate(r) if r.contains("ABI version 1")
        ));
    }

    #[test]
    fn reuse_everything_needs_links_hash_and_maps() {
        let p = Pinned {
            sockops_link: true,
            skmsg_link: true,
            rx_consumed_link: true,
            ingress_gate_link: true,
            object_hash: Some(5),
        };
        assert!(reuse_everything(&p, &[MapVerdict::Reuse], 5));
        assert!(!reuse_everything(&p, &[MapVerdict::Reuse], 6));
        assert!(!reuse_everything(&p, &[MapVerdict::Create], 5));
        let no_link = Pinned {
            skmsg_link: false,
            ..p
        };
        assert!(!reuse_everything(&no_link, &[MapVerdict::Reuse], 5));
        // A build from before flow control pinned no tracepoint link: load, do not reuse.
        let no_tracepoint = Pinned {
            rx_consumed_link: false,
            ..p
        };
        assert!(!reuse_everything(&no_tracepoint, &[MapVerdict::Reuse], 5));
        // Nor did one from before the ingress gate pin its link.
        let no_gate = Pinned {
            ingress_gate_link: false,
            ..p
        };
        assert!(!reuse_everything(&no_gate, &[MapVerdict::Reuse], 5));
    }

    #[test]
    fn object_hash_differs_by_content() {
        assert_ne!(object_hash(b"a"), object_hash(b"b"));
        assert_eq!(object_hash(b"abc"), object_hash(b"abc"));
    }
}
