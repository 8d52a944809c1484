//! The few bpf(2) commands aya 0.14 does not offer (sockmap links, link update, pinning a raw
//! fd, map entry counting), bpffs mounting, and the netns cookie.
use anyhow::{Context as _, Result, bail};
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_PROG_QUERY: libc::c_long = 16;
/// `enum bpf_attach_type` values used here.
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
pub const BPF_SK_SKB_STREAM_PARSER: u32 = 4;
pub const BPF_SK_SKB_STREAM_VERDICT: u32 = 5;
pub const BPF_SK_MSG_VERDICT: u32 = 7;
pub const BPF_SK_SKB_VERDICT: u32 = 38;
/// `SO_NETNS_COOKIE` (Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// `union bpf_attr`, as a zeroed buffer large enough for every command used here.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn put_u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn put_u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, zero-padded bpf_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd_from(rc: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this new file descriptor to us.
    unsafe { OwnedFd::from_raw_fd(rc as RawFd) }
}

fn cpath(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("bad path {}", path.display()))
}

/// Opens a pinned object (map, program or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = cpath(path).map_err(io::Error::other)?;
    let mut a = Attr::new();
    a.put_u64(0, c.as_ptr() as u64);
    bpf(BPF_OBJ_GET, &mut a).map(fd_from)
}

/// Pins an object fd at `path` (which must not exist).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<()> {
    let c = cpath(path)?;
    let mut a = Attr::new();
    a.put_u64(0, c.as_ptr() as u64)
        .put_u32(8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut a).with_context(|| format!("pin {}", path.display()))?;
    Ok(())
}

/// `BPF_LINK_CREATE` of a program on a sockmap/sockhash (kernel >= 6.10).
pub fn sockmap_link_create(
    prog: BorrowedFd<'_>,
    map: BorrowedFd<'_>,
    attach_type: u32,
) -> Result<OwnedFd> {
    let mut a = Attr::new();
    a.put_u32(0, prog.as_raw_fd() as u32)
        .put_u32(4, map.as_raw_fd() as u32)
        .put_u32(8, attach_type);
    let rc = bpf(BPF_LINK_CREATE, &mut a)
        .context("BPF_LINK_CREATE on the sockhash (needs Linux >= 6.10)")?;
    Ok(fd_from(rc))
}

/// `BPF_PROG_ATTACH` of `prog` to a sockmap or sockhash (`map`): the attachment before
/// sockmap links (Linux 6.10). It replaces the program attached there with that type, and
/// lasts until the map's last user reference (its pin) is gone.
pub fn sockmap_prog_attach(
    prog: BorrowedFd<'_>,
    map: BorrowedFd<'_>,
    attach_type: u32,
) -> Result<()> {
    let mut a = Attr::new();
    a.put_u32(0, map.as_raw_fd() as u32)
        .put_u32(4, prog.as_raw_fd() as u32)
        .put_u32(8, attach_type);
    bpf(BPF_PROG_ATTACH, &mut a).context("BPF_PROG_ATTACH on the sockhash")?;
    Ok(())
}

/// `BPF_PROG_QUERY`: the ids of the programs attached to a cgroup or a sockmap (`target`) for
/// one attach type, whether by link or by prog attach.
pub fn prog_query(target: BorrowedFd<'_>, attach_type: u32) -> Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut a = Attr::new();
    a.put_u32(0, target.as_raw_fd() as u32)
        .put_u32(4, attach_type)
        .put_u64(16, ids.as_mut_ptr() as u64)
        .put_u32(24, ids.len() as u32);
    bpf(BPF_PROG_QUERY, &mut a).context("BPF_PROG_QUERY")?;
    let count = u32::from_ne_bytes(a.0[24..28].try_into().unwrap()) as usize;
    ids.truncate(count.min(64));
    Ok(ids)
}

/// `BPF_LINK_UPDATE`: swaps the program of a link atomically.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> Result<()> {
    let mut a = Attr::new();
    a.put_u32(0, link.as_raw_fd() as u32)
        .put_u32(4, new_prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut a).context("BPF_LINK_UPDATE")?;
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
    let mut a = Attr::new();
    a.put_u32(0, link.as_raw_fd() as u32)
        .put_u32(4, info.len() as u32)
        .put_u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).context("BPF_OBJ_GET_INFO_BY_FD (link)")?;
    let word = |i: usize| u32::from_ne_bytes(info[i * 4..i * 4 + 4].try_into().unwrap());
    Ok(LinkIds {
        link_type: word(0),
        id: word(1),
        prog_id: word(2),
    })
}

/// `struct bpf_map_info`'s layout fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapIds {
    pub map_type: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

pub fn map_ids(map: BorrowedFd<'_>) -> Result<MapIds> {
    let mut info = [0u8; 96];
    let mut a = Attr::new();
    a.put_u32(0, map.as_raw_fd() as u32)
        .put_u32(4, info.len() as u32)
        .put_u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).context("BPF_OBJ_GET_INFO_BY_FD (map)")?;
    let word = |i: usize| u32::from_ne_bytes(info[i * 4..i * 4 + 4].try_into().unwrap());
    Ok(MapIds {
        map_type: word(0),
        id: word(1),
        key_size: word(2),
        value_size: word(3),
        max_entries: word(4),
    })
}

/// Number of keys in a map (walks it with `BPF_MAP_GET_NEXT_KEY`).
pub fn map_entry_count(map: BorrowedFd<'_>, key_size: u32) -> Result<usize> {
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut n = 0usize;
    let mut first = true;
    loop {
        let mut a = Attr::new();
        a.put_u32(0, map.as_raw_fd() as u32)
            .put_u64(8, if first { 0 } else { key.as_ptr() as u64 })
            .put_u64(16, next.as_mut_ptr() as u64);
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut a) {
            Ok(_) => {
                n += 1;
                std::mem::swap(&mut key, &mut next);
                first = false;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
            Err(e) => return Err(e).context("BPF_MAP_GET_NEXT_KEY"),
        }
        if n > 10_000_000 {
            bail!("map iteration does not end");
        }
    }
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

/// The socket cookie of a socket (`SO_COOKIE`): its key in the sockhash and in `FP_RXQ`.
pub fn socket_cookie(socket: BorrowedFd<'_>) -> Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 we own, with its size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("getsockopt(SO_COOKIE)");
    }
    Ok(cookie)
}

/// The netns cookie of the calling thread's network namespace.
pub fn current_netns_cookie() -> Result<u64> {
    // SAFETY: plain socket/getsockopt/close on a descriptor we own.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(io::Error::last_os_error()).context("socket");
        }
        let s = OwnedFd::from_raw_fd(s);
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error())
                .context("getsockopt(SO_NETNS_COOKIE) (needs Linux >= 5.14)");
        }
        Ok(cookie)
    }
}
