//! The few bpf(2) commands aya 0.14 does not offer (sockmap links, link update, pinning a raw
//! fd), on fastpath-pins' bpf(2) layer (which owns the map commands), bpffs mounting, and the
//! socket cookie.
use anyhow::{Context as _, Result, bail};
pub use fastpath_pins::sys::obj_get;
pub use fastpath_pins::sys::socket_cookie;
use fastpath_pins::sys::{Attr, Cmd, bpf, bpf_fd};
pub use fastpath_pins::{MapInfo, current_netns_cookie};
use std::{
    ffi::CString,
    io,
    os::fd::{BorrowedFd, OwnedFd},
    path::Path,
};

/// `enum bpf_attach_type` values used here.
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
pub const BPF_SK_SKB_STREAM_PARSER: u32 = 4;
pub const BPF_SK_SKB_STREAM_VERDICT: u32 = 5;
pub const BPF_SK_MSG_VERDICT: u32 = 7;
pub const BPF_SK_SKB_VERDICT: u32 = 38;

fn cpath(path: &Path) -> Result<CString> {
    fastpath_pins::sys::cpath(path).with_context(|| format!("bad path {}", path.display()))
}

/// Pins an object fd at `path` (which must not exist).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<()> {
    fastpath_pins::sys::obj_pin(fd, path).with_context(|| format!("pin {}", path.display()))
}

/// `BPF_LINK_CREATE` of a program on a sockmap/sockhash (kernel >= 6.10).
pub fn sockmap_link_create(
    prog: BorrowedFd<'_>,
    map: BorrowedFd<'_>,
    attach_type: u32,
) -> Result<OwnedFd> {
    let mut a = Attr::default();
    a.put_fd(0, prog).put_fd(4, map).put_u32(8, attach_type);
    bpf_fd(Cmd::LinkCreate, &mut a).context("BPF_LINK_CREATE on the sockhash (needs Linux >= 6.10)")
}

/// `BPF_PROG_ATTACH` of `prog` to a sockmap or sockhash (`map`): the attachment before
/// sockmap links (Linux 6.10). It replaces the program attached there with that type, and
/// lasts until the map's last user reference (its pin) is gone.
pub fn sockmap_prog_attach(
    prog: BorrowedFd<'_>,
    map: BorrowedFd<'_>,
    attach_type: u32,
) -> Result<()> {
    let mut a = Attr::default();
    a.put_fd(0, map).put_fd(4, prog).put_u32(8, attach_type);
    bpf(Cmd::ProgAttach, &mut a).context("BPF_PROG_ATTACH on the sockhash")?;
    Ok(())
}

/// `BPF_PROG_QUERY`: the ids of the programs attached to a cgroup or a sockmap (`target`) for
/// one attach type, whether by link or by prog attach.
pub fn prog_query(target: BorrowedFd<'_>, attach_type: u32) -> Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut a = Attr::default();
    a.put_fd(0, target)
        .put_u32(4, attach_type)
        .put_ptr(16, ids.as_mut_ptr())
        .put_u32(24, ids.len() as u32);
    bpf(Cmd::ProgQuery, &mut a).context("BPF_PROG_QUERY")?;
    let count = a.u32_at(24) as usize;
    ids.truncate(count.min(64));
    Ok(ids)
}

/// `BPF_LINK_UPDATE`: swaps the program of a link atomically.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> Result<()> {
    let mut a = Attr::default();
    a.put_fd(0, link).put_fd(4, new_prog);
    bpf(Cmd::LinkUpdate, &mut a).context("BPF_LINK_UPDATE")?;
    Ok(())
}

/// `struct bpf_link_info`'s first fields.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkIds {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
}

pub fn link_ids(link: BorrowedFd<'_>) -> Result<LinkIds> {
    let mut info = [0u8; 64];
    let mut a = Attr::default();
    a.put_fd(0, link)
        .put_u32(4, info.len() as u32)
        .put_ptr(8, info.as_mut_ptr());
    bpf(Cmd::ObjGetInfoByFd, &mut a).context("BPF_OBJ_GET_INFO_BY_FD (link)")?;
    let word = |i: usize| u32::from_ne_bytes(info[i * 4..i * 4 + 4].try_into().unwrap());
    Ok(LinkIds {
        link_type: word(0),
        id: word(1),
        prog_id: word(2),
    })
}

/// Whether `path` is a bpffs mount point.
pub fn is_bpffs(path: &Path) -> bool {
    // BPF_FS_MAGIC
    fs_magic(path) == Some(0xcafe_4a11)
}

/// Whether this process shares the host's mount namespace: compared with the host's init
/// through `/host/proc` (Istio's chart mounts it), or through `/proc/1` when this process is
/// in the host's PID namespace (its inode is the kernel's fixed `PROC_PID_INIT_INO`). `None`
/// when neither is there to compare with.
pub fn in_host_mount_namespace() -> Option<bool> {
    let link = |p: &str| std::fs::read_link(p).ok();
    let own = link("/proc/self/ns/mnt")?;
    if let Some(host) = link("/host/proc/1/ns/mnt") {
        return Some(own == host);
    }
    const INIT_PID_NS: &str = "pid:[4026531836]";
    if link("/proc/self/ns/pid").is_some_and(|p| p == Path::new(INIT_PID_NS)) {
        return link("/proc/1/ns/mnt").map(|init| init == own);
    }
    None
}

/// Whether `path` is a cgroup v2 mount (CGROUP2_SUPER_MAGIC), where sock_ops can attach.
pub fn is_cgroup2(path: &Path) -> bool {
    fs_magic(path) == Some(0x6367_7270)
}

/// The file system type (`statfs`'s `f_type`) of `path`.
fn fs_magic(path: &Path) -> Option<u64> {
    let c = cpath(path).ok()?;
    // SAFETY: statfs into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    (rc == 0).then_some(st.f_type as u64)
}

/// Mounts bpffs at `path` when it is not mounted there.
pub fn ensure_bpffs(path: &Path) -> Result<()> {
    if is_bpffs(path) {
        return Ok(());
    }
    // A bpffs mounted in a pod's own mount namespace is the pod's: the plugin, which the
    // host's runtime runs, would not see the pins, and the accelerator would report active
    // while no pod could enroll.
    if in_host_mount_namespace() == Some(false) {
        bail!(
            "{} is not a bpffs and this agent's mounts are its own (not the host's): a bpffs \
             it mounted there would not be seen by the plugin; mount the host's /sys/fs/bpf \
             into the pod (fastpath's manifest does), or mount bpffs there on the host",
            path.display()
        );
    }
    std::fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
    let target = cpath(path)?;
    let fstype = c"bpf";
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("mount -t bpf bpf {}", path.display()));
    }
    Ok(())
}
