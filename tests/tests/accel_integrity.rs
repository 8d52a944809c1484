//! Data integrity through paired sockets: many concurrent echoed streams with message sizes
//! from 1 B to 1 MiB, half-close, and a peer that closes while the other side is sending.
use fastpath_common::map_names;
use fastpath_tests::accel::{Accel, Pod, pattern, read_exact_retry, read_to_end_retry};
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    time::Duration,
};

const SIZES: [usize; 12] = [
    1,
    2,
    63,
    64,
    1000,
    4096,
    16_385,
    65_536,
    100_003,
    262_144,
    524_287,
    1 << 20,
];

/// Echoes until EOF, then half-closes.
fn echo(mut s: TcpStream) {
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => s.write_all(&buf[..n]).unwrap(),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!("echo read: {e}"),
        }
    }
    s.shutdown(Shutdown::Write).unwrap();
}

#[test]
fn concurrent_echo_streams_1b_to_1mib_arrive_exact() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    // The configured queue bound out of the way (1 GiB): only the readers' backlog room
    // bounds the queues (integrity across a demotion is accel_flow_control's too).
    let accel = Accel::start_configured("integrity", |s| s.max_queued_bytes = 1 << 30);
    let pod = Pod::new("fpint");
    accel.enroll(&pod, None);
    let conns = 16u64;
    pod.run(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..conns {
                    let (sock, _) = l.accept().unwrap();
                    std::thread::spawn(move || echo(sock));
                }
            });
            for i in 0..conns {
                s.spawn(move || {
                    let c = TcpStream::connect(addr).unwrap();
                    c.set_nodelay(i % 2 == 0).unwrap();
                    // Each connection sends every size once, rotated so sizes interleave
                    // differently across connections.
                    let sizes: Vec<usize> = (0..SIZES.len())
                        .map(|k| SIZES[(k + i as usize) % SIZES.len()])
                        .collect();
                    let total: usize = sizes.iter().sum();
                    let data = pattern(i, total);
                    let mut w = c.try_clone().unwrap();
                    let wdata = data.clone();
                    let writer = std::thread::spawn(move || {
                        let mut off = 0;
                        for n in sizes {
                            w.write_all(&wdata[off..off + n]).unwrap();
                            off += n;
                        }
                        w.shutdown(Shutdown::Write).unwrap();
                    });
                    let mut r = c;
                    let got = read_to_end_retry(&mut r, Duration::from_secs(60));
                    writer.join().unwrap();
                    assert_eq!(got.len(), total, "connection {i}: length");
                    assert!(got == data, "connection {i}: bytes altered");
                });
            }
        });
    });
    let st = accel.stats(pod.cookie());
    assert_eq!(st.connections_paired, conns, "{st:?}");
    // Every client half-closes after its last write, and a half-close never demotes. What
    // demotes is the 1 MiB write, at most once per connection: the kernel cuts it into
    // messages of about 544 KiB, and two of them unread are more than a loopback server's
    // backlog room (896 KiB; docs/accelerator.md), whatever the configured bound. Every byte
    // before it went socket to socket, both ways (measured: 13.7 MB of 67 MB).
    assert!(st.queue_demotions <= conns, "{st:?}");
    let requests: u64 = conns * SIZES.iter().sum::<usize>() as u64;
    assert!(
        st.bytes_redirected >= 2 * requests / 16,
        "request and echo bytes redirected: {st:?}, {} expected",
        2 * requests / 16
    );
}

#[test]
fn peer_closing_while_sending_fails_cleanly() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start("closing");
    let pod = Pod::new("fpclose");
    accel.enroll(&pod, None);
    pod.run(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        for round in 0..10 {
            let mut c = TcpStream::connect(addr).unwrap();
            let (mut s, _) = l.accept().unwrap();
            let sender = std::thread::spawn(move || {
                let chunk = vec![round as u8; 256 * 1024];
                c.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
                // Until the peer's close surfaces as an error.
                for _ in 0..4096 {
                    if c.write_all(&chunk).is_err() {
                        return true;
                    }
                }
                false
            });
            let mut buf = vec![0u8; 300_000];
            read_exact_retry(&mut s, &mut buf, Duration::from_secs(10));
            assert!(
                buf.iter().all(|b| *b == round as u8),
                "round {round}: bytes altered"
            );
            drop(s);
            assert!(
                sender.join().unwrap(),
                "round {round}: sender never saw the close"
            );
        }
        // The listener still serves paired connections afterwards.
        let mut c = TcpStream::connect(addr).unwrap();
        let (s, _) = l.accept().unwrap();
        std::thread::spawn(move || echo(s));
        c.write_all(b"still fine").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(
            read_to_end_retry(&mut c, Duration::from_secs(10)),
            b"still fine"
        );
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(accel.map_entries(map_names::PAIRS), 0, "state left behind");
    assert_eq!(
        accel.map_entries(map_names::SOCKS),
        0,
        "sockets left behind"
    );
}
