//! Pairing on the three sidecar paths, keys across network namespaces, IPv6, and the rule that
//! a socket whose peer is not accelerated never enters the sockhash.
use fastpath_common::map_names;
use fastpath_tests::accel::{Accel, Pod, fionread, link_pods, pattern};
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

/// One request/response over a fresh connection made by `connect`; the server side is
/// accepted on `listener`. Returns the accepted socket's view of the peer address.
fn exchange(listener: &TcpListener, connect: impl FnOnce() -> TcpStream, len: usize) -> SocketAddr {
    let mut c = connect();
    let (mut s, peer) = listener.accept().unwrap();
    for sock in [&c, &s] {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
    }
    let req = pattern(len as u64, len);
    c.write_all(&req).unwrap();
    let mut got = vec![0; len];
    s.read_exact(&mut got).unwrap();
    assert!(got == req, "request altered");
    let resp = pattern(len as u64 + 1, len);
    s.write_all(&resp).unwrap();
    let mut got = vec![0; len];
    c.read_exact(&mut got).unwrap();
    assert!(got == resp, "response altered");
    peer
}

fn bind_connect(local: &str, remote: SocketAddr) -> TcpStream {
    let local: SocketAddr = local.parse().unwrap();
    let domain = if local.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&local.into()).unwrap();
    s.connect(&remote.into()).unwrap();
    s.into()
}

#[test]
fn loopback_connection_is_paired_redirected_and_cleaned_up() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start("pair-lo");
    let pod = Pod::new("fplo");
    accel.enroll(&pod, None);
    let cookie = pod.cookie();
    pod.run(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        for len in [1, 64, 4096, 300_000] {
            exchange(&l, || TcpStream::connect(addr).unwrap(), len);
        }
    });
    let st = accel.stats(cookie);
    assert_eq!(st.connections_paired, 4, "{st:?}");
    assert!(st.msgs_redirected >= 8, "{st:?}");
    assert!(
        st.bytes_redirected >= 2 * (1 + 64 + 4096 + 300_000),
        "{st:?}"
    );
    // Every socket closed: nothing left behind in any per-socket map.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(accel.map_entries(map_names::SOCKS), 0);
    assert_eq!(accel.map_entries(map_names::PAIRS), 0);
    assert_eq!(accel.map_entries(map_names::ACTIVE), 0);
}

#[test]
fn ipv6_loopback_and_v4_mapped_are_paired() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start("pair-v6");
    let pod = Pod::new("fpv6");
    accel.enroll(&pod, None);
    pod.run(|| {
        let l = TcpListener::bind("[::1]:0").unwrap();
        let addr = l.local_addr().unwrap();
        exchange(&l, || TcpStream::connect(addr).unwrap(), 1000);
        // Dual-stack listener, IPv4 client: the server sees a v4-mapped peer.
        let l = TcpListener::bind("[::]:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let peer = exchange(
            &l,
            || TcpStream::connect(("127.0.0.1", port)).unwrap(),
            1000,
        );
        assert!(peer.is_ipv6(), "expected a v4-mapped peer, got {peer}");
    });
    let st = accel.stats(pod.cookie());
    assert_eq!(st.connections_paired, 2, "{st:?}");
}

#[test]
fn identical_tuples_in_two_pods_never_cross() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start("pair-twins");
    let pods = [Pod::new("fptwa"), Pod::new("fptwb")];
    for p in &pods {
        accel.enroll(p, None);
    }
    for round in 0..20u16 {
        let server: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let client = format!("127.0.0.1:{}", 41000 + round);
        std::thread::scope(|s| {
            for (i, pod) in pods.iter().enumerate() {
                let client = client.clone();
                s.spawn(move || {
                    pod.run(|| {
                        let l = fastpath_tests::accel::reuse_listener(server);
                        let mut c = bind_connect(&client, server);
                        let (mut a, _) = l.accept().unwrap();
                        a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        let tag = format!("pod-{i}-round-{round}-").repeat(50);
                        for _ in 0..20 {
                            c.write_all(tag.as_bytes()).unwrap();
                            let mut got = vec![0; tag.len()];
                            a.read_exact(&mut got).unwrap();
                            assert_eq!(got, tag.as_bytes(), "a byte crossed pods");
                            a.write_all(&got).unwrap();
                            c.read_exact(&mut got).unwrap();
                            assert_eq!(got, tag.as_bytes(), "a byte crossed pods");
                        }
                    })
                });
            }
        });
    }
    for p in &pods {
        let st = accel.stats(p.cookie());
        assert_eq!(st.connections_paired, 20, "{st:?}");
        assert!(st.msgs_redirected >= 20 * 40, "{st:?}");
    }
}

#[test]
fn outbound_inbound_and_sidecar_to_sidecar_hops_are_paired() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start("pair-hops");
    let mut a = Pod::new("fpha");
    let mut b = Pod::new("fphb");
    link_pods(&mut a, &mut b, 1);
    // Istio-like REDIRECTs: A's outbound to B:8080 goes to A's 15001; B's inbound to 8080
    // arriving from outside goes to B's 15006.
    a.sh("iptables -t nat -A OUTPUT -p tcp -d 10.247.1.2 --dport 8080 -m owner ! --uid-owner 1337 -j REDIRECT --to-ports 15001");
    b.sh("iptables -t nat -A PREROUTING -p tcp --dport 8080 -j REDIRECT --to-ports 15006");
    accel.enroll(&a, None);
    accel.enroll(&b, None);
    let target: SocketAddr = "10.247.1.2:8080".parse().unwrap();

    // Hop 1: app in A -> 10.247.1.2:8080, NATed to A's 127.0.0.1:15001.
    let before = accel.stats(a.cookie());
    a.run(|| {
        let l = TcpListener::bind("127.0.0.1:15001").unwrap();
        let peer = exchange(&l, || TcpStream::connect(target).unwrap(), 5000);
        assert_eq!(
            peer.ip().to_string(),
            "10.247.1.1",
            "hop 1 went through the REDIRECT"
        );
    });
    let after = accel.stats(a.cookie());
    assert_eq!(
        after.connections_paired - before.connections_paired,
        1,
        "hop 1: {after:?}"
    );

    // Hop 2: A's sidecar -> B:8080 (a sidecar's own traffic is exempt from A's OUTPUT rule;
    // here the rule is simply removed), NATed to B's 15006 in another netns.
    a.sh("iptables -t nat -F OUTPUT");
    let before = accel.stats(b.cookie());
    let l = b.run(|| TcpListener::bind("0.0.0.0:15006").unwrap());
    let c = a.run(|| TcpStream::connect(target).unwrap());
    let mut c = Some(c);
    let peer = exchange(&l, || c.take().unwrap(), 5000);
    assert_eq!(peer.ip().to_string(), "10.247.1.1");
    let after = accel.stats(b.cookie());
    assert_eq!(
        after.connections_paired - before.connections_paired,
        1,
        "hop 2: {after:?}"
    );

    // Hop 3: B's sidecar from 127.0.0.6 -> B's pod IP:8080 (the app).
    let before = accel.stats(b.cookie());
    b.run(|| {
        let l = TcpListener::bind("10.247.1.2:9080").unwrap();
        let peer = exchange(
            &l,
            || bind_connect("127.0.0.6:0", "10.247.1.2:9080".parse().unwrap()),
            5000,
        );
        assert_eq!(peer.ip().to_string(), "127.0.0.6");
    });
    let after = accel.stats(b.cookie());
    assert_eq!(
        after.connections_paired - before.connections_paired,
        1,
        "hop 3: {after:?}"
    );
}

#[test]
fn peer_not_accelerated_means_not_in_sockhash() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start("pair-none");
    let mut a = Pod::new("fpna");
    let mut c = Pod::new("fpnc");
    link_pods(&mut a, &mut c, 2);
    accel.enroll(&a, None); // c stays unenrolled: "off the mesh"
    let l = c.run(|| TcpListener::bind("10.247.2.2:7000").unwrap());
    let (cl, _) = a.run(|| {
        let cl = TcpStream::connect("10.247.2.2:7000").unwrap();
        (cl, ())
    });
    let (mut s, _) = l.accept().unwrap();
    assert_eq!(
        accel.map_entries(map_names::SOCKS),
        0,
        "client entered the sockhash"
    );
    s.write_all(&[1u8; 65536]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut buf = vec![0; 65536];
    let peeked = cl.peek(&mut buf).unwrap();
    assert!(peeked > 0);
    assert_eq!(
        fionread(&cl),
        peeked,
        "FIONREAD must match the queued bytes"
    );
    // And the other way: an enrolled server, a client off the mesh.
    let l = a.run(|| TcpListener::bind("10.247.2.1:7001").unwrap());
    let cl = c.run(|| TcpStream::connect("10.247.2.1:7001").unwrap());
    let (s, _) = l.accept().unwrap();
    assert_eq!(
        accel.map_entries(map_names::SOCKS),
        0,
        "server entered the sockhash"
    );
    (&cl).write_all(&[2u8; 4096]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(fionread(&s), 4096);
    assert_eq!(accel.stats(a.cookie()).connections_paired, 0);
}

#[test]
fn opt_outs_leave_connections_alone() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start("pair-optout");
    let ports = Pod::new("fpop");
    let whole = Pod::new("fpow");
    let ann = |k: &str, v: &str| {
        let mut m = serde_json::Map::new();
        m.insert(k.into(), v.into());
        m
    };
    accel.enroll(
        &ports,
        Some(&ann(fastpath_common::ANNOTATION_EXCLUDE_PORTS, "7100")),
    );
    accel.enroll(
        &whole,
        Some(&ann(fastpath_common::ANNOTATION_ACCELERATE, "false")),
    );
    ports.run(|| {
        let l = TcpListener::bind("127.0.0.1:7100").unwrap();
        exchange(&l, || TcpStream::connect("127.0.0.1:7100").unwrap(), 100);
        let l = TcpListener::bind("127.0.0.1:7101").unwrap();
        exchange(&l, || TcpStream::connect("127.0.0.1:7101").unwrap(), 100);
    });
    whole.run(|| {
        let l = TcpListener::bind("127.0.0.1:7100").unwrap();
        exchange(&l, || TcpStream::connect("127.0.0.1:7100").unwrap(), 100);
    });
    assert_eq!(
        accel.stats(ports.cookie()).connections_paired,
        1,
        "only 7101"
    );
    assert_eq!(accel.stats(whole.cookie()).connections_paired, 0);
    // DEL: the pod is gone from the maps, and DEL again is fine.
    accel.unenroll(&ports);
    accel.unenroll(&ports);
    accel.unenroll(&whole);
    assert_eq!(accel.map_entries(map_names::PODS), 0);
    assert_eq!(accel.map_entries(map_names::STATS), 0);
}

#[test]
fn tcp_fast_open_connections_never_sit_unpaired() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    let accel = Accel::start("pair-tfo");
    let pod = Pod::new("fptfo");
    pod.sh("sysctl -qw net.ipv4.tcp_fastopen=3");
    accel.enroll(&pod, None);
    pod.run(|| {
        let l = TcpListener::bind("127.0.0.1:7200").unwrap();
        let qlen: libc::c_int = 16;
        // SAFETY: setsockopt on our listener.
        let rc = unsafe {
            libc::setsockopt(
                l.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_FASTOPEN,
                (&qlen as *const libc::c_int).cast(),
                4,
            )
        };
        assert_eq!(rc, 0);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 7200u16.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
            },
            sin_zero: [0; 8],
        };
        // The first connection fetches the cookie; the next ones carry data in the SYN.
        for round in 0..4u8 {
            let req = vec![round; 1000];
            // SAFETY: a new socket, sendto with MSG_FASTOPEN to a valid address.
            let c = unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                assert!(fd >= 0);
                let n = libc::sendto(
                    fd,
                    req.as_ptr().cast(),
                    req.len(),
                    libc::MSG_FASTOPEN,
                    (&addr as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                );
                assert_eq!(n, req.len() as isize, "{}", std::io::Error::last_os_error());
                TcpStream::from_raw_fd(fd)
            };
            let (mut s, _) = l.accept().unwrap();
            let mut got = vec![0u8; req.len()];
            fastpath_tests::accel::read_exact_retry(&mut s, &mut got, Duration::from_secs(5));
            assert_eq!(got, req);
            let socks = accel.map_entries(map_names::SOCKS);
            assert!(
                socks == 0 || socks == 2,
                "round {round}: {socks} sockets in the sockhash"
            );
            s.write_all(&[round; 50_000]).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            let mut buf = vec![0u8; 50_000];
            let peeked = c.peek(&mut buf).unwrap();
            assert_eq!(fionread(&c), peeked, "round {round}: FIONREAD");
        }
        // Data really went in the SYN (the test would prove nothing otherwise).
        let netstat = std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap();
        let mut lines = netstat.lines();
        let (keys, values) = (lines.next().unwrap(), lines.next().unwrap());
        let passive: u64 = keys
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(k, _)| *k == "TCPFastOpenPassive")
            .map(|(_, v)| v.parse().unwrap())
            .unwrap();
        assert!(passive >= 3, "TCP Fast Open was used: {passive}");
    });
}

/// Two sockets bound to the same endpoint (SO_REUSEADDR) connect at once, one to a local
/// enrolled server and one to a server off the mesh, and the wrong one claims the SYN record:
/// the local server sees the sequence numbers do not match and takes it out of the sockhash,
/// so it never sits there without a peer.
#[test]
fn twin_sockets_on_one_endpoint_never_sit_unpaired() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start("pair-twin-ep");
    let mut a = Pod::new("fptea");
    let mut c = Pod::new("fptec");
    link_pods(&mut a, &mut c, 5);
    accel.enroll(&a, None); // c is off the mesh
    // Every first SYN-ACK is dropped: both handshakes complete on the client's SYN
    // retransmission, about one second later, in connect order.
    let drop_first_synack = "iptables -A OUTPUT -p tcp --tcp-flags SYN,ACK SYN,ACK -m connbytes \
         --connbytes 1:1 --connbytes-dir reply --connbytes-mode packets -j DROP";
    a.sh(drop_first_synack);
    c.sh(drop_first_synack);
    let local = a.run(|| TcpListener::bind("10.247.5.1:7400").unwrap());
    let off_mesh = c.run(|| TcpListener::bind("10.247.5.2:7401").unwrap());
    let endpoint = "10.247.5.1:45000";
    let (wrong, right) = std::thread::scope(|s| {
        let wrong =
            s.spawn(|| a.run(|| bind_connect(endpoint, "10.247.5.2:7401".parse().unwrap())));
        std::thread::sleep(Duration::from_millis(100));
        let right =
            s.spawn(|| a.run(|| bind_connect(endpoint, "10.247.5.1:7400".parse().unwrap())));
        (wrong.join().unwrap(), right.join().unwrap())
    });
    let (mut s_wrong, _) = off_mesh.accept().unwrap();
    let (_s_right, _) = local.accept().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let st = accel.stats(a.cookie());
    assert_eq!(
        st.sockets_enrolled, 1,
        "the wrong twin claimed the record: {st:?}"
    );
    assert_eq!(st.connections_paired, 0, "{st:?}");
    assert_eq!(
        accel.map_entries(map_names::SOCKS),
        0,
        "a socket sits in the sockhash"
    );
    s_wrong.write_all(&[5u8; 4096]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut buf = vec![0u8; 4096];
    assert_eq!(wrong.peek(&mut buf).unwrap(), 4096);
    assert_eq!(
        fionread(&wrong),
        4096,
        "FIONREAD of the socket that claimed the record"
    );
    drop(right);
}

/// Acceleration is switched off between the client's half of a handshake and the server's:
/// the client already sits in the sockhash waiting for its peer, and the server will not pair
/// it. It must leave the sockhash when the server establishes, or FIONREAD would read 0 over
/// every byte the server sends it over TCP.
#[test]
fn a_client_whose_server_will_not_pair_leaves_the_sockhash() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    use aya::maps::{Array, MapData};
    let accel = Accel::start("stranded");
    let pod = Pod::new("fpstrand");
    accel.enroll(&pod, None);
    pod.run(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        // The server's half waits: the handshake's final ACK (a bare ACK) is dropped.
        let rule =
            format!("INPUT -p tcp --dport {port} --tcp-flags SYN,ACK,FIN,RST,PSH ACK -j DROP");
        pod.sh(&format!("iptables -I {rule}"));
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        accel.wait_entries(map_names::SOCKS, 1, "the client waits in the sockhash");
        let mut config: Array<MapData, u32> = accel.map(map_names::CONFIG);
        config
            .set(fastpath_common::config_index::ACCEL_ENABLED, 0, 0)
            .unwrap();
        pod.sh(&format!("iptables -D {rule}"));
        // The server's SYN-ACK is sent again after about a second; the client's answer
        // completes the server's handshake.
        let (mut s, _) = l.accept().unwrap();
        // (After the retransmitted SYN-ACK, about a second, which accept() waited for.)
        accel.wait_entries(
            map_names::SOCKS,
            0,
            "the client stays in the sockhash without a peer",
        );
        s.write_all(&pattern(7, 1000)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(fionread(&c), 1000, "FIONREAD sees the server's bytes");
        let mut got = vec![0; 1000];
        c.read_exact(&mut got).unwrap();
        assert!(got == pattern(7, 1000));
    });
}
