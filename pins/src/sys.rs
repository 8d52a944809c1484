//! The bpf(2) system call: every command fastpath's userspace issues goes through [`bpf`] here,
//! by name ([`Cmd`]). The map commands are behind the [`Sys`] and [`MapOps`] traits, so that
//! the logic that operates the pinned maps runs against [`Kernel`] in the binaries and against
//! the in-memory fake (`crate::fake`, feature `fake`) in unit tests, without root.
use std::{
    ffi::CString,
    fmt, io,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

/// `enum bpf_cmd` values used by fastpath; `Display` is the kernel's name of the command, as
/// errors print it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i64)]
pub enum Cmd {
    MapCreate = 0,
    MapLookupElem = 1,
    MapUpdateElem = 2,
    MapDeleteElem = 3,
    MapGetNextKey = 4,
    ObjPin = 6,
    ObjGet = 7,
    ProgAttach = 8,
    ObjGetInfoByFd = 15,
    ProgQuery = 16,
    LinkCreate = 28,
    LinkUpdate = 29,
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cmd::MapCreate => "BPF_MAP_CREATE",
            Cmd::MapLookupElem => "BPF_MAP_LOOKUP_ELEM",
            Cmd::MapUpdateElem => "BPF_MAP_UPDATE_ELEM",
            Cmd::MapDeleteElem => "BPF_MAP_DELETE_ELEM",
            Cmd::MapGetNextKey => "BPF_MAP_GET_NEXT_KEY",
            Cmd::ObjPin => "BPF_OBJ_PIN",
            Cmd::ObjGet => "BPF_OBJ_GET",
            Cmd::ProgAttach => "BPF_PROG_ATTACH",
            Cmd::ObjGetInfoByFd => "BPF_OBJ_GET_INFO_BY_FD",
            Cmd::ProgQuery => "BPF_PROG_QUERY",
            Cmd::LinkCreate => "BPF_LINK_CREATE",
            Cmd::LinkUpdate => "BPF_LINK_UPDATE",
        })
    }
}

/// `union bpf_attr`, as a zeroed buffer large enough for every command used here.
#[repr(C, align(8))]
pub struct Attr(pub [u8; 128]);

impl Default for Attr {
    fn default() -> Self {
        Self([0; 128])
    }
}

impl Attr {
    pub fn put_u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn put_u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    pub fn put_ptr<T: ?Sized>(&mut self, off: usize, p: *const T) -> &mut Self {
        self.put_u64(off, p.cast::<u8>() as u64)
    }
    pub fn put_fd(&mut self, off: usize, fd: BorrowedFd<'_>) -> &mut Self {
        self.put_u32(off, fd.as_raw_fd() as u32)
    }
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().expect("4 bytes"))
    }
}

/// bpf(2). The caller keeps every buffer `attr` points to alive for the call.
pub fn bpf(cmd: Cmd, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, zero-padded bpf_attr of the size passed; its pointers are the
    // caller's live buffers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
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

/// [`bpf`] of a command that returns a new file descriptor.
pub fn bpf_fd(cmd: Cmd, attr: &mut Attr) -> io::Result<OwnedFd> {
    let rc = bpf(cmd, attr)?;
    // SAFETY: the kernel just returned this new file descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

pub fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// Opens a pinned object (map, program or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = cpath(path)?;
    bpf_fd(Cmd::ObjGet, Attr::default().put_ptr(0, c.as_ptr()))
}

/// Pins an object fd at `path` (which must not exist).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = cpath(path)?;
    bpf(
        Cmd::ObjPin,
        Attr::default().put_ptr(0, c.as_ptr()).put_fd(8, fd),
    )?;
    Ok(())
}

/// `struct bpf_map_info`'s layout fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapInfo {
    pub map_type: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD` of a map.
pub fn map_info(map: BorrowedFd<'_>) -> io::Result<MapInfo> {
    let mut info = [0u8; 96];
    let mut a = Attr::default();
    a.put_fd(0, map)
        .put_u32(4, info.len() as u32)
        .put_ptr(8, info.as_mut_ptr());
    bpf(Cmd::ObjGetInfoByFd, &mut a)?;
    let word = |i: usize| u32::from_ne_bytes(info[i * 4..i * 4 + 4].try_into().expect("4"));
    Ok(MapInfo {
        map_type: word(0),
        id: word(1),
        key_size: word(2),
        value_size: word(3),
        max_entries: word(4),
    })
}

/// `BPF_MAP_CREATE` of an unnamed map of this layout (tests pin maps of other layouts).
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<OwnedFd> {
    let mut a = Attr::default();
    a.put_u32(0, map_type)
        .put_u32(4, key_size)
        .put_u32(8, value_size)
        .put_u32(12, max_entries);
    bpf_fd(Cmd::MapCreate, &mut a)
}

/// What the map logic needs of the system: opening pinned maps, and the CPU count per-CPU
/// maps are sized by.
pub trait Sys {
    type Map: MapOps;
    /// `BPF_OBJ_GET` of a pinned map.
    fn obj_get(&self, path: &Path) -> io::Result<Self::Map>;
    /// Possible CPUs: the number of values a per-CPU map holds per key.
    fn possible_cpus(&self) -> io::Result<usize>;
}

/// The map commands on an open map, on raw key and value bytes. "Not found" (`ENOENT`) is an
/// answer, not an error: `Ok(false)`.
pub trait MapOps {
    fn lookup(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool>;
    fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()>;
    fn delete(&self, key: &[u8]) -> io::Result<bool>;
    /// The key after `key` (the first with `None`) into `next`; false past the last.
    fn next_key(&self, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool>;
    fn info(&self) -> io::Result<MapInfo>;
}

/// The running kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct Kernel;

impl Sys for Kernel {
    type Map = OwnedFd;

    fn obj_get(&self, path: &Path) -> io::Result<OwnedFd> {
        obj_get(path)
    }

    fn possible_cpus(&self) -> io::Result<usize> {
        let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
        parse_cpu_list(&text)
            .ok_or_else(|| io::Error::other(format!("cannot parse possible CPUs {text:?}")))
    }
}

/// The number of CPUs in a kernel CPU list (`0-3,8`).
pub fn parse_cpu_list(text: &str) -> Option<usize> {
    let mut n = 0;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().ok()? + 1 - a.parse::<usize>().ok()?,
            None => part.parse::<usize>().map(|_| 1).ok()?,
        };
    }
    Some(n)
}

/// `ENOENT` as `Ok(false)`.
fn found(r: io::Result<libc::c_long>) -> io::Result<bool> {
    match r {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

impl MapOps for OwnedFd {
    fn lookup(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        let mut a = Attr::default();
        a.put_fd(0, self.as_fd())
            .put_ptr(8, key.as_ptr())
            .put_ptr(16, value.as_mut_ptr());
        found(bpf(Cmd::MapLookupElem, &mut a))
    }

    fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        let mut a = Attr::default();
        a.put_fd(0, self.as_fd())
            .put_ptr(8, key.as_ptr())
            .put_ptr(16, value.as_ptr());
        bpf(Cmd::MapUpdateElem, &mut a).map(drop)
    }

    fn delete(&self, key: &[u8]) -> io::Result<bool> {
        let mut a = Attr::default();
        a.put_fd(0, self.as_fd()).put_ptr(8, key.as_ptr());
        found(bpf(Cmd::MapDeleteElem, &mut a))
    }

    fn next_key(&self, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
        let mut a = Attr::default();
        a.put_fd(0, self.as_fd())
            .put_u64(8, key.map_or(0, |k| k.as_ptr() as u64))
            .put_ptr(16, next.as_mut_ptr());
        found(bpf(Cmd::MapGetNextKey, &mut a))
    }

    fn info(&self) -> io::Result<MapInfo> {
        map_info(self.as_fd())
    }
}

/// `SO_NETNS_COOKIE` (Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The netns cookie of the calling thread's network namespace: a pod's key in the pinned
/// maps. (Run it on a thread that entered the pod's namespace.)
pub fn current_netns_cookie() -> io::Result<u64> {
    // SAFETY: a new socket we own.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new file descriptor to us.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    sockopt_u64(
        s.as_fd(),
        SO_NETNS_COOKIE,
        "getsockopt(SO_NETNS_COOKIE) (needs Linux >= 5.14)",
    )
}

/// The socket cookie of a socket (`SO_COOKIE`): its key in the sockhash and in `FP_RXQ`.
pub fn socket_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    sockopt_u64(socket, libc::SO_COOKIE, "getsockopt(SO_COOKIE)")
}

/// A u64 socket option of `SOL_SOCKET`; an error says `what` failed.
fn sockopt_u64(socket: BorrowedFd<'_>, option: libc::c_int, what: &str) -> io::Result<u64> {
    let mut value = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 we own, with its size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0\n"), Some(1));
        assert_eq!(parse_cpu_list("0-3\n"), Some(4));
        assert_eq!(parse_cpu_list("0-1,4,6-7"), Some(5));
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn commands_print_the_kernel_names() {
        assert_eq!(Cmd::MapUpdateElem.to_string(), "BPF_MAP_UPDATE_ELEM");
        assert_eq!(Cmd::ObjGet as i64, 7);
        assert_eq!(Cmd::LinkUpdate as i64, 29);
    }
}
