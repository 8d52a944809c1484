//! Early data: bytes written right after connect(), possibly before the server socket is
//! paired, and the bytes after them, must arrive exactly in order. Every connection ends up
//! either paired (all bytes redirected) or on TCP for good (a "fallback"), never both.
use fastpath_common::map_names;
use fastpath_tests::accel::{
    Accel, Pod, fionread, link_pods, pattern, read_exact_retry, read_to_end_retry,
};
use std::{
    io::Write as _,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

/// Write sizes for connection `i`: tiny and large, starting immediately.
fn write_sizes(i: u64) -> Vec<usize> {
    let mut x = i.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
    (0..24)
        .map(|k| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match k % 4 {
                0 => 1 + (x % 16) as usize,
                1 => 1 + (x % 1500) as usize,
                2 => 1 + (x % 65536) as usize,
                _ => 1 + (x % 300_000) as usize,
            }
        })
        .collect()
}

fn pin_cpu(cpu: usize) {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: sched_setaffinity of the calling thread with a set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % n, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// `n` connections on `threads` client threads, each writing right after connect(); the
/// server checks every byte, then answers with a checksum-verified reply.
fn hammer(addr: SocketAddr, listener: &TcpListener, n: u64, threads: u64) {
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut servers = Vec::new();
            for _ in 0..n {
                let (mut sock, _) = listener.accept().unwrap();
                servers.push(std::thread::spawn(move || {
                    pin_cpu(servers_cpu(&sock));
                    sock.set_read_timeout(Some(Duration::from_secs(30)))
                        .unwrap();
                    let mut id = [0u8; 8];
                    read_exact_retry(&mut sock, &mut id, Duration::from_secs(30));
                    let i = u64::from_le_bytes(id);
                    let total: usize = write_sizes(i).iter().sum();
                    let got = read_to_end_retry(&mut sock, Duration::from_secs(30));
                    let want = pattern(i, total);
                    if got != want {
                        let first = got.iter().zip(&want).position(|(a, b)| a != b);
                        panic!(
                            "connection {i}: {} of {} bytes, first difference at {first:?}",
                            got.len(),
                            total
                        );
                    }
                    sock.write_all(&pattern(i + 7, 10_000)).unwrap();
                }));
            }
            for t in servers {
                t.join().unwrap();
            }
        });
        for t in 0..threads {
            s.spawn(move || {
                // Clients and servers on different CPUs where possible: the handshake's last
                // step then races the client's first write across CPUs.
                pin_cpu(t as usize);
                for i in (t..n).step_by(threads as usize) {
                    let mut c = TcpStream::connect(addr).unwrap();
                    c.set_nodelay(i % 2 == 0).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    c.write_all(&i.to_le_bytes()).unwrap();
                    let data = pattern(i, write_sizes(i).iter().sum());
                    let mut off = 0;
                    for len in write_sizes(i) {
                        c.write_all(&data[off..off + len]).unwrap();
                        off += len;
                    }
                    c.shutdown(Shutdown::Write).unwrap();
                    let reply = read_to_end_retry(&mut c, Duration::from_secs(30));
                    assert!(reply == pattern(i + 7, 10_000), "reply {i} altered");
                }
            });
        }
    });
}

/// A server thread's CPU: the one its connection's client thread does not use.
fn servers_cpu(sock: &TcpStream) -> usize {
    sock.peer_addr().map_or(0, |a| a.port() as usize + 1)
}

#[test]
fn writes_right_after_connect_arrive_in_order() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start("early");
    let pod = Pod::new("fpearly");
    accel.enroll(&pod, None);
    let n = 240;
    pod.run(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        hammer(addr, &l, n, 6);
    });
    let st = accel.stats(pod.cookie());
    eprintln!("early data, natural races: {st:?}");
    assert_eq!(
        st.connections_paired + st.early_data_fallbacks,
        n,
        "every connection is either paired or on TCP: {st:?}"
    );
    assert!(st.connections_paired > 0, "{st:?}");
}

#[test]
fn client_that_wrote_before_its_server_established_stays_on_tcp() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start("early-forced");
    let pod = Pod::new("fpforce");
    accel.enroll(&pod, None);
    // Drop each connection's handshake ACK: the server completes the handshake only with the
    // client's first data segment, after the client's sk_msg already ran.
    pod.sh(
        "iptables -A INPUT -p tcp --dport 7300 --tcp-flags ALL ACK -m connbytes \
         --connbytes 2:2 --connbytes-dir original --connbytes-mode packets -j DROP",
    );
    let n = 40;
    pod.run(|| {
        let l = TcpListener::bind("127.0.0.1:7300").unwrap();
        hammer("127.0.0.1:7300".parse().unwrap(), &l, n, 4);

        // And no socket of such a connection stays in the sockhash: FIONREAD is right.
        let c = TcpStream::connect("127.0.0.1:7300").unwrap();
        (&c).write_all(b"early").unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut b = [0u8; 5];
        read_exact_retry(&mut s, &mut b, Duration::from_secs(10));
        assert_eq!(
            accel.map_entries(map_names::SOCKS),
            0,
            "left in the sockhash"
        );
        s.write_all(&[3u8; 50_000]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let mut buf = vec![0u8; 50_000];
        let peeked = c.peek(&mut buf).unwrap();
        assert_eq!(fionread(&c), peeked);
        read_exact_retry(&mut (&c), &mut buf, Duration::from_secs(10));

        // The client asked for per-segment callbacks (for a demotion) before it knew it would
        // not pair; its first segment turns them off, so an unpaired connection does not run
        // sock_ops on every segment.
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).unwrap();
        let prog = accel.pin_dir().join("prog_sockops");
        let runs = || {
            aya::programs::ProgramInfo::from_pin(&prog)
                .unwrap()
                .run_count()
        };
        c.set_nodelay(true).unwrap();
        s.set_nodelay(true).unwrap();
        let before = runs();
        let round_trips = 2000;
        for _ in 0..round_trips {
            (&c).write_all(&[1]).unwrap();
            read_exact_retry(&mut s, &mut b[..1], Duration::from_secs(10));
            s.write_all(&[2]).unwrap();
            read_exact_retry(&mut (&c), &mut b[..1], Duration::from_secs(10));
        }
        let ran = runs() - before;
        assert!(
            ran < round_trips / 2,
            "sock_ops ran {ran} times during {round_trips} round trips of an unpaired connection"
        );
    });
    let st = accel.stats(pod.cookie());
    eprintln!("early data, forced: {st:?}");
    assert_eq!(st.early_data_fallbacks, n + 1, "{st:?}");
    assert_eq!(st.connections_paired, 0, "{st:?}");
}

#[test]
fn writes_right_after_connect_across_pods_arrive_in_order() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start("early-xpod");
    let mut a = Pod::new("fpxa");
    let mut b = Pod::new("fpxb");
    link_pods(&mut a, &mut b, 4);
    accel.enroll(&a, None);
    accel.enroll(&b, None);
    let n = 160;
    let l = b.run(|| TcpListener::bind("10.247.4.2:0").unwrap());
    let addr = l.local_addr().unwrap();
    a.run(|| hammer(addr, &l, n, 6));
    let (sa, sb) = (accel.stats(a.cookie()), accel.stats(b.cookie()));
    eprintln!("early data across pods: client pod {sa:?}, server pod {sb:?}");
    assert_eq!(
        sb.connections_paired + sa.early_data_fallbacks,
        n,
        "every connection is either paired or on TCP"
    );
    assert!(sb.connections_paired > 0);
}
