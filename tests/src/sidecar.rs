//! A minimal L4 sidecar, an echo app and a ping client, for the demo and the tests: enough of
//! Envoy's behaviour on Istio's ports to exercise every hop of the sidecar path.
//! - outbound listener (15001): connects to the connection's `SO_ORIGINAL_DST` (what the app
//!   dialled before iptables REDIRECT);
//! - inbound listener (15006): connects to the original destination (pod IP:port) from
//!   127.0.0.6, as Envoy's inbound passthrough does, so Istio's rules let it through.
use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

/// `SO_ORIGINAL_DST` of a redirected IPv4 connection.
pub fn original_dst(s: &TcpStream) -> io::Result<SocketAddrV4> {
    // SAFETY: getsockopt into a sockaddr_in of the right size.
    unsafe {
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            80, // SO_ORIGINAL_DST
            &mut addr as *mut _ as *mut libc::c_void,
            &mut len,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
            u16::from_be(addr.sin_port),
        ))
    }
}

/// Connects to `dst` from `src` (port chosen by the kernel).
fn connect_from(src: Ipv4Addr, dst: SocketAddrV4) -> io::Result<TcpStream> {
    // SAFETY: plain socket calls on a descriptor we own; converted into a TcpStream on success.
    unsafe {
        use std::os::fd::FromRawFd as _;
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let sa = |a: SocketAddrV4| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = sa(SocketAddrV4::new(src, 0));
        if libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(io::Error::last_os_error());
        }
        let remote = sa(dst);
        if libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// Copies both ways until both sides are done, propagating half-close.
fn relay(a: TcpStream, b: TcpStream) {
    let (a2, b2) = match (a.try_clone(), b.try_clone()) {
        (Ok(a2), Ok(b2)) => (a2, b2),
        _ => return,
    };
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let one_way = |mut from: TcpStream, mut to: TcpStream| {
        let _ = io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Write);
    };
    let t = std::thread::spawn(move || one_way(a, b));
    one_way(b2, a2);
    let _ = t.join();
}

/// Runs the sidecar's two listeners until the process is killed.
pub fn run_sidecar(outbound_port: u16, inbound_port: u16) -> io::Result<()> {
    let outbound = TcpListener::bind(("0.0.0.0", outbound_port))?;
    let inbound = TcpListener::bind(("0.0.0.0", inbound_port))?;
    let serve = |listener: TcpListener, from: Option<Ipv4Addr>| {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(dst) = original_dst(&conn) else { return };
                let upstream = match from {
                    Some(src) => connect_from(src, dst),
                    None => TcpStream::connect(dst),
                };
                if let Ok(up) = upstream {
                    relay(conn, up);
                }
            });
        }
    };
    let t = std::thread::spawn(move || serve(outbound, None));
    serve(inbound, Some(Ipv4Addr::new(127, 0, 0, 6)));
    let _ = t.join();
    Ok(())
}

/// An echo server: writes back every byte it reads.
pub fn run_echo(port: u16) -> io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            let mut r = conn.try_clone().expect("clone");
            let mut w = conn;
            let _ = io::copy(&mut r, &mut w);
        });
    }
    Ok(())
}

/// Round trips of `size`-byte messages to an echo server; returns each round trip's duration.
/// Every reply is checked byte for byte.
pub fn ping(dst: SocketAddr, size: usize, count: usize) -> io::Result<Vec<Duration>> {
    let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut out = vec![0u8; size];
    let mut back = vec![0u8; size];
    let mut rtts = Vec::with_capacity(count);
    for i in 0..count {
        for (j, b) in out.iter_mut().enumerate() {
            *b = (i.wrapping_mul(31) ^ j) as u8;
        }
        let start = Instant::now();
        s.write_all(&out)?;
        s.read_exact(&mut back)?;
        rtts.push(start.elapsed());
        if back != out {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("echo {i} came back different"),
            ));
        }
    }
    Ok(rtts)
}

/// The `q`-quantile (0..=1) of `samples`, sorted in place.
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort_unstable();
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let i = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[i]
}
