//! Other sockmap accelerators on the node. Two of them would both pair the same sockets: each
//! redirects what it paired, and a socket that one of them put in its sockmap without a peer
//! breaks FIONREAD and readiness for the other's connections. fastpath refuses to share: when
//! anything else is attached where it attaches, acceleration stays off and says what it found.
//!
//! What counts as another accelerator: a `sock_ops` program attached to the cgroup v2 root
//! that is not the one in fastpath's pinned link (Merbridge, Cilium's old sockops, a second
//! fastpath with another pin dir), and any program attached to a sockmap or sockhash other
//! than fastpath's own `FP_SOCKS` (sk_msg, sk_skb parser or verdict).
use super::sys;
use anyhow::{Context as _, Result};
use std::{collections::HashMap, os::fd::AsFd as _, path::Path};

/// A program of another accelerator, as the log line, `/readyz` and `accel-status` name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignProgram {
    pub id: u32,
    /// The program's name as the kernel keeps it (the first 15 bytes).
    pub name: String,
    /// Where it is attached: `sock_ops on <cgroup>` or `<attach type> on map <id> (<name>)`.
    pub attached_to: String,
}

impl std::fmt::Display for ForeignProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "prog {} {:?} ({})", self.id, self.name, self.attached_to)
    }
}

/// One line for the log and `/readyz`: every program, comma-separated.
pub fn describe(programs: &[ForeignProgram]) -> String {
    let list: Vec<String> = programs.iter().map(ToString::to_string).collect();
    list.join(", ")
}

/// The programs found attached where fastpath attaches, minus fastpath's own.
pub fn find(cgroup_root: &Path, pin_dir: &Path) -> Result<Vec<ForeignProgram>> {
    let names = program_names();
    let own_sockops = sys::obj_get(&pin_dir.join(super::PIN_LINK_SOCKOPS))
        .ok()
        .and_then(|l| sys::link_ids(l.as_fd()).ok())
        .map(|l| l.prog_id);
    let own_sockhash = fastpath_pins::Pins::new(pin_dir)
        .map(fastpath_common::map_names::SOCKS)
        .ok()
        .and_then(|m| m.info().ok())
        .map(|m| m.id);

    let cgroup = std::fs::File::open(cgroup_root)
        .with_context(|| format!("open cgroup {}", cgroup_root.display()))?;
    let sockops = sys::prog_query(cgroup.as_fd(), sys::BPF_CGROUP_SOCK_OPS)
        .with_context(|| format!("query sock_ops programs on {}", cgroup_root.display()))?;
    let mut sockmap_attachments = Vec::new();
    for info in aya::maps::loaded_maps().flatten() {
        let Ok(kind) = info.map_type() else { continue };
        if !matches!(
            kind,
            aya::maps::MapType::SockMap | aya::maps::MapType::SockHash
        ) || Some(info.id()) == own_sockhash
        {
            continue;
        }
        let Ok(fd) = info.fd() else { continue };
        for (attach, label) in SOCKMAP_ATTACH_TYPES {
            // A kernel that cannot query one attach type still answers the others.
            for id in sys::prog_query(fd.as_fd(), attach).unwrap_or_default() {
                sockmap_attachments.push(SockmapAttachment {
                    prog_id: id,
                    attach: label,
                    map_id: info.id(),
                    map_name: info.name_as_str().unwrap_or("").to_string(),
                });
            }
        }
    }
    Ok(foreign_programs(
        &sockops,
        own_sockops,
        &cgroup_root.display().to_string(),
        &sockmap_attachments,
        &names,
    ))
}

const SOCKMAP_ATTACH_TYPES: [(u32, &str); 4] = [
    (sys::BPF_SK_MSG_VERDICT, "sk_msg"),
    (sys::BPF_SK_SKB_STREAM_PARSER, "sk_skb parser"),
    (sys::BPF_SK_SKB_STREAM_VERDICT, "sk_skb verdict"),
    (sys::BPF_SK_SKB_VERDICT, "sk_skb verdict"),
];

/// A program attached to a sockmap or sockhash that is not fastpath's.
#[derive(Clone, Debug)]
pub struct SockmapAttachment {
    pub prog_id: u32,
    pub attach: &'static str,
    pub map_id: u32,
    pub map_name: String,
}

/// The decision, apart from the syscalls that gather its input: every sock_ops program on
/// the cgroup root but fastpath's own, and every program on another sockmap.
pub fn foreign_programs(
    sockops_on_root: &[u32],
    own_sockops: Option<u32>,
    cgroup: &str,
    sockmap_attachments: &[SockmapAttachment],
    names: &HashMap<u32, String>,
) -> Vec<ForeignProgram> {
    let name = |id: u32| names.get(&id).cloned().unwrap_or_default();
    let mut out: Vec<ForeignProgram> = sockops_on_root
        .iter()
        .filter(|id| Some(**id) != own_sockops)
        .map(|&id| ForeignProgram {
            id,
            name: name(id),
            attached_to: format!("sock_ops on {cgroup}"),
        })
        .collect();
    out.extend(sockmap_attachments.iter().map(|a| ForeignProgram {
        id: a.prog_id,
        name: name(a.prog_id),
        attached_to: format!("{} on map {} ({})", a.attach, a.map_id, a.map_name),
    }));
    out
}

fn program_names() -> HashMap<u32, String> {
    aya::programs::loaded_programs()
        .flatten()
        .map(|p| (p.id(), p.name_as_str().unwrap_or("").to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_programs_that_are_not_ours_are_foreign() {
        let names = HashMap::from([
            (10, "fastpath_sockop".to_string()),
            (11, "mb_sockops".to_string()),
            (12, "mb_msg_redir".to_string()),
        ]);
        let attached = [SockmapAttachment {
            prog_id: 12,
            attach: "sk_msg",
            map_id: 7,
            map_name: "sock_pair_map".into(),
        }];
        let found = foreign_programs(&[10, 11], Some(10), "/sys/fs/cgroup", &attached, &names);
        assert_eq!(
            found,
            vec![
                ForeignProgram {
                    id: 11,
                    name: "mb_sockops".into(),
                    attached_to: "sock_ops on /sys/fs/cgroup".into(),
                },
                ForeignProgram {
                    id: 12,
                    name: "mb_msg_redir".into(),
                    attached_to: "sk_msg on map 7 (sock_pair_map)".into(),
                },
            ]
        );
        assert_eq!(
            describe(&found),
            "prog 11 \"mb_sockops\" (sock_ops on /sys/fs/cgroup), \
             prog 12 \"mb_msg_redir\" (sk_msg on map 7 (sock_pair_map))"
        );
    }

    #[test]
    fn our_own_sock_ops_alone_is_no_conflict() {
        let found = foreign_programs(&[10], Some(10), "/cg", &[], &HashMap::new());
        assert!(found.is_empty());
        // Before our link exists (first start), anything on the root is someone else's.
        let found = foreign_programs(&[10], None, "/cg", &[], &HashMap::new());
        assert_eq!(found.len(), 1);
    }
}
