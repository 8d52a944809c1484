//! Harness for the accelerator tests: a private pinned accelerator (scratch bpffs directory,
//! uninstalled on drop), enrolled "pods" (network namespaces), and running code inside them.
use crate::netns::{NetNs, run};
use fastpath_cni_plugin::accel::{PodEnrollment, enroll_at, netns_cookie, unenroll};
use fastpath_common::PodStats;
use fastpath_installer::accel::{AccelSettings, AccelState, pod_counters, start, uninstall};
use fastpath_pins::Pins;
use std::{
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
};

/// A loaded accelerator pinned in a scratch directory. Holds the node-wide sock_ops lock.
pub struct Accel {
    pub settings: AccelSettings,
    pub run_dir: PathBuf,
    pins: Option<crate::ScratchBpffsDir>,
    _lock: std::fs::File,
}

impl Accel {
    /// Loads the accelerator and asserts the self-test passed.
    pub fn start(tag: &str) -> Self {
        let a = Self::unstarted(tag);
        let state = start(&a.settings);
        assert_eq!(state, AccelState::Active, "accelerator start");
        a
    }

    /// Loads the accelerator with settings changed by `configure`; asserts the self-test passed.
    pub fn start_configured(tag: &str, configure: impl FnOnce(&mut AccelSettings)) -> Self {
        let mut a = Self::unstarted(tag);
        configure(&mut a.settings);
        let state = start(&a.settings);
        assert_eq!(state, AccelState::Active, "accelerator start");
        a
    }

    /// The fixture without calling [`start`].
    pub fn unstarted(tag: &str) -> Self {
        let lock = crate::serial_guard("cgroup-sockops");
        crate::ensure_bpffs();
        let pins = crate::ScratchBpffsDir::new(tag);
        let run_dir = std::env::temp_dir().join(crate::unique_name(&format!("fp-{tag}-")));
        std::fs::create_dir_all(&run_dir).unwrap();
        let settings = AccelSettings {
            enabled: true,
            bpffs: PathBuf::from("/sys/fs/bpf"),
            pin_dir: pins.path().join("fastpath"),
            cgroup_root: fastpath_installer::accel::CgroupRoot::FromOwnMounts,
            run_dir: run_dir.clone(),
            max_queued_bytes: fastpath_common::DEFAULT_QUEUE_LIMIT_BYTES,
            drain_timeout: fastpath_installer::accel::drain::DRAIN_TIMEOUT,
            features_off: Default::default(),
        };
        Self {
            settings,
            run_dir,
            pins: Some(pins),
            _lock: lock,
        }
    }

    pub fn pin_dir(&self) -> &Path {
        &self.settings.pin_dir
    }

    /// Summed counters of the pod with this netns cookie (zero when none).
    pub fn stats(&self, cookie: u64) -> PodStats {
        pod_counters(&self.settings)
            .unwrap()
            .into_iter()
            .find(|c| c.netns_cookie == cookie)
            .map(|c| c.stats)
            .unwrap_or_default()
    }

    /// One of this accelerator's pinned maps, typed (`aya::maps::HashMap<MapData, K, V>`, ...).
    pub fn map<T>(&self, name: &str) -> T
    where
        T: TryFrom<aya::maps::Map>,
        T::Error: std::fmt::Debug,
    {
        pinned_map(self.pin_dir(), name)
    }

    /// This accelerator's pins.
    pub fn pins(&self) -> Pins {
        Pins::new(self.pin_dir())
    }

    /// Number of entries in a pinned map.
    pub fn map_entries(&self, name: &str) -> usize {
        self.pins().map(name).unwrap().count().unwrap()
    }

    /// Waits (up to 5 s) until a pinned map holds `n` entries; `what` names the moment.
    pub fn wait_entries(&self, name: &str, n: usize, what: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let have = self.map_entries(name);
            if have == n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {name} holds {have} entries, want {n}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Enrolls a network namespace as a pod with these IPs and annotations.
    pub fn enroll(
        &self,
        pod: &Pod,
        annotations: Option<&serde_json::Map<String, serde_json::Value>>,
    ) {
        let run_dir = self.run_dir.to_str().unwrap();
        let e = PodEnrollment {
            netns_path: &pod.path(),
            namespace: "test",
            name: &pod.ns.name,
            container_id: &pod.ns.name,
            ips: pod.ips.clone(),
            annotations,
            run_dir,
        };
        enroll_at(&e, self.pin_dir()).expect("enroll");
    }

    pub fn unenroll(&self, pod: &Pod) {
        unenroll(&pod.path(), &pod.ns.name, self.run_dir.to_str().unwrap()).expect("unenroll");
    }
}

impl Drop for Accel {
    fn drop(&mut self) {
        if self.settings.pin_dir.exists()
            && let Err(e) = uninstall(&self.settings)
        {
            eprintln!("uninstall: {e:#}");
        }
        drop(self.pins.take());
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// A pod: a network namespace with lo up and optional addresses.
pub struct Pod {
    pub ns: NetNs,
    pub ips: Vec<IpAddr>,
}

impl Pod {
    pub fn new(prefix: &str) -> Self {
        let ns = NetNs::new(&crate::unique_name(prefix)).unwrap();
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]).unwrap();
        Self {
            ns,
            ips: Vec::new(),
        }
    }

    pub fn path(&self) -> String {
        self.ns.path()
    }

    pub fn cookie(&self) -> u64 {
        netns_cookie(&self.path()).unwrap()
    }

    /// Runs `f` on a thread inside this pod's network namespace. Sockets made there stay in
    /// the pod when used elsewhere.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.path(), f)
    }

    pub fn sh(&self, cmd: &str) -> String {
        self.ns.exec_ok(&["sh", "-c", cmd]).unwrap()
    }
}

/// A map pinned in `dir`, typed.
pub fn pinned_map<T>(dir: &Path, name: &str) -> T
where
    T: TryFrom<aya::maps::Map>,
    T::Error: std::fmt::Debug,
{
    let data = aya::maps::MapData::from_pin(dir.join(name)).unwrap();
    aya::maps::Map::from_map_data(data)
        .unwrap()
        .try_into()
        .unwrap()
}

/// Connects two pods with a veth pair: `a` gets 10.247.`subnet`.1/24, `b` .2/24.
pub fn link_pods(a: &mut Pod, b: &mut Pod, subnet: u8) {
    let va = crate::unique_name("fpa");
    let vb = crate::unique_name("fpb");
    run(Command::new("ip").args([
        "link", "add", &va, "netns", &a.ns.name, "type", "veth", "peer", "name", &vb, "netns",
        &b.ns.name,
    ]))
    .unwrap();
    for (pod, dev, host) in [(&mut *a, &va, 1u8), (&mut *b, &vb, 2u8)] {
        let addr = format!("10.247.{subnet}.{host}");
        pod.sh(&format!(
            "ip addr add {addr}/24 dev {dev} && ip link set {dev} up && \
             ip -6 addr add fd00:247:{subnet}::{host}/64 dev {dev} nodad"
        ));
        pod.ips.push(addr.parse().unwrap());
        pod.ips
            .push(format!("fd00:247:{subnet}::{host}").parse().unwrap());
    }
}

/// Runs `f` on a fresh thread that has entered the network namespace at `path`.
pub fn in_netns<T: Send>(path: &str, f: impl FnOnce() -> T + Send) -> T {
    let ns = std::fs::File::open(path).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}");
            f()
        })
        .join()
        .unwrap()
    })
}

/// FIONREAD of a socket.
pub fn fionread(fd: &impl std::os::fd::AsRawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD into an int we own.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0);
    n as usize
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A listener with SO_REUSEADDR (rebinding a port whose last connections are in TIME_WAIT).
pub fn reuse_listener(addr: std::net::SocketAddr) -> std::net::TcpListener {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&addr.into()).unwrap();
    s.listen(1024).unwrap();
    s.into()
}

/// A loopback connection in the current network namespace (call it inside [`Pod::run`] of an
/// enrolled pod), once both its sockets are in `accel`'s sockhash: (client, server).
pub fn paired_loopback_connection(accel: &Accel) -> (std::net::TcpStream, std::net::TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    accel.wait_entries(fastpath_common::map_names::SOCKS, 2, "after pairing");
    (c, s)
}

/// Makes `close()` of `s` abortive (SO_LINGER 0): it sends a RST, as an application that
/// aborts its connection does.
pub fn abort_on_close(s: &std::net::TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a linger struct we own.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

/// Asserts that a stream read back is the one written: as long, and every byte equal (the
/// first one that is not is named).
pub fn assert_same_bytes(got: &[u8], want: &[u8]) {
    let first_bad = got.iter().zip(want).position(|(a, b)| a != b);
    assert!(
        got.len() == want.len() && first_bad.is_none(),
        "{} of {} bytes, first bad offset {first_bad:?}",
        got.len(),
        want.len()
    );
}

/// Blocking reads on a paired socket can fail with EAGAIN when a wakeup carries no data (a
/// 6.18 tcp_bpf_recvmsg defect, see docs/accelerator.md): retry those until `timeout`.
pub fn read_exact_retry(s: &mut impl std::io::Read, buf: &mut [u8], timeout: std::time::Duration) {
    let deadline = std::time::Instant::now() + timeout;
    let mut off = 0;
    while off < buf.len() {
        match s.read(&mut buf[off..]) {
            Ok(0) => panic!("EOF after {off} of {} bytes", buf.len()),
            Ok(n) => off += n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && std::time::Instant::now() < deadline => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read after {off} of {} bytes: {e}", buf.len()),
        }
    }
}

/// Reads to EOF, retrying spurious EAGAIN (see [`read_exact_retry`]).
pub fn read_to_end_retry(s: &mut impl std::io::Read, timeout: std::time::Duration) -> Vec<u8> {
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && std::time::Instant::now() < deadline => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read after {} bytes: {e}", out.len()),
        }
    }
}

/// Reads as HAProxy does (`raw_sock_to_buf`) and Envoy alike: a non-blocking read into a
/// 16 KiB buffer, and a read that returns less than the buffer after poll reported the peer's
/// FIN (POLLRDHUP) is taken as the end of the stream, without another read. Plain TCP makes
/// that true: once the FIN is in, every byte before it is in the one receive queue.
pub fn read_like_a_proxy(s: &std::net::TcpStream) -> Vec<u8> {
    use std::os::fd::AsRawFd as _;
    const BUF: usize = 16 << 10;
    s.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; BUF];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "stalled after {} bytes",
            got.len()
        );
        let mut pfd = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one pollfd we own.
        unsafe { libc::poll(&mut pfd, 1, 1000) };
        let rdhup = pfd.revents & libc::POLLRDHUP != 0;
        match std::io::Read::read(&mut &*s, &mut buf) {
            Ok(0) => return got,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if n < BUF && rdhup {
                    return got;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("read after {} bytes: {e}", got.len()),
        }
    }
}
