//! An abort must reach a paired reader that is busy reading a long redirect queue.
//!
//! The kernel charges a socket's redirect queue to its receive memory, and a segment that
//! arrives while the reader holds the socket lock goes to the backlog, which drops it when
//! that memory is above the backlog limit (2 × receive buffer + send buffer / 2 + 64 KiB on
//! 6.18). A dropped FIN is retransmitted; a dropped RST is not, and the reader would wait
//! for the end of its stream for good. The probes keep each redirect queue within the
//! backlog limit less its 64 KiB of headroom (`RxQueue::backlog_room`).
use fastpath_tests::accel::{Accel, Pod, abort_on_close, paired_loopback_connection, pattern};
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

/// A socket's memory as the kernel accounts it (`SO_MEMINFO`, as `ss -m` shows it).
struct SocketMemory {
    receive: u64,
    rcvbuf: u64,
    sndbuf: u64,
    drops: u64,
}

fn socket_memory(s: &TcpStream) -> SocketMemory {
    const SO_MEMINFO: libc::c_int = 55;
    let mut info = [0u32; 9];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: getsockopt into an array we own, its size passed.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "SO_MEMINFO");
    // SK_MEMINFO_RMEM_ALLOC, _RCVBUF, _WMEM_ALLOC, _SNDBUF, ..., _DROPS (index 8).
    SocketMemory {
        receive: info[0] as u64,
        rcvbuf: info[1] as u64,
        sndbuf: info[3] as u64,
        drops: info[8] as u64,
    }
}

/// The kernel's backlog limit (net/ipv4/tcp_ipv4.c, `tcp_add_backlog`), as 6.18 computes it.
fn backlog_limit(m: &SocketMemory) -> u64 {
    2 * m.rcvbuf + m.sndbuf / 2 + (64 << 10)
}

/// What the reader got: the prefix it read, and how its stream ended.
enum End {
    Reset(usize),
    Eof(usize),
    Stalled(usize),
}

fn read_until_end(mut s: TcpStream, data: &[u8]) -> End {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = vec![0u8; 16 << 20];
    let mut got = 0;
    let mut last_progress = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return End::Eof(got),
            Ok(n) => {
                assert!(got + n <= data.len(), "more bytes than were written");
                assert!(buf[..n] == data[got..got + n], "bytes altered at {got}");
                got += n;
                last_progress = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                if last_progress.elapsed() > Duration::from_secs(3) {
                    return End::Stalled(got);
                }
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return End::Reset(got),
            Err(e) => panic!("read after {got} bytes: {e}"),
        }
    }
}

/// One round: `c` writes `data` with nobody reading until it is stopped, then aborts while
/// `s` reads its long queue. The reader's memory is taken when the writer stopped.
struct Round {
    end: End,
    written: usize,
    reader: SocketMemory,
}

fn fill_then_abort(mut c: TcpStream, s: TcpStream, data: &[u8]) -> Round {
    c.set_nonblocking(true).unwrap();
    let mut written = 0;
    while written < data.len() {
        match c.write(&data[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("write after {written} bytes: {e}"),
        }
    }
    let reader = socket_memory(&s);
    abort_on_close(&c);
    let data = data[..written].to_vec();
    let reading = std::thread::spawn(move || {
        let end = read_until_end(s.try_clone().unwrap(), &data);
        if let End::Stalled(_) = end {
            eprintln!(
                "stalled; the reader's socket dropped {} segment(s)",
                socket_memory(&s).drops
            );
        }
        end
    });
    // Abort while the reader is in the middle of its long read.
    std::thread::sleep(Duration::from_micros(300));
    drop(c);
    Round {
        end: reading.join().unwrap(),
        written,
        reader,
    }
}

/// Runs `rounds` rounds on connections from `connect` (inside `pod`); asserts that every
/// reader's receive memory left the backlog its 64 KiB and that every reader saw the abort.
fn every_abort_arrives(
    pod: &Pod,
    rounds: usize,
    data: &[u8],
    connect: impl Fn() -> (TcpStream, TcpStream) + Send + Sync,
) {
    let mut stalls = Vec::new();
    for round in 0..rounds {
        let r = pod.run(|| {
            let (c, s) = connect();
            fill_then_abort(c, s, data)
        });
        let m = &r.reader;
        if round == 0 {
            eprintln!(
                "{} bytes written before the writer stopped; the reader holds {} bytes \
                 (receive buffer {}, send buffer {}, backlog limit {})",
                r.written,
                m.receive,
                m.rcvbuf,
                m.sndbuf,
                backlog_limit(m)
            );
        }
        assert!(
            m.receive + (64 << 10) <= backlog_limit(m),
            "round {round}: the reader holds {} bytes of receive memory: a segment that meets \
             its backlog (limit {}) is dropped",
            m.receive,
            backlog_limit(m)
        );
        match r.end {
            End::Reset(got) | End::Eof(got) => assert!(got <= r.written),
            End::Stalled(got) => stalls.push((round, got, r.written)),
        }
    }
    assert!(
        stalls.is_empty(),
        "{} of {rounds} readers never saw their peer's abort (round, bytes read, bytes \
         written): {stalls:?}",
        stalls.len()
    );
}

#[test]
fn an_abort_reaches_a_reader_that_is_busy_reading_a_long_redirect_queue() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    // The configured bound is the default 16 MiB, far above the backlog limit of a loopback
    // socket (about 2.2 MiB with the default buffers).
    let accel = Accel::start("rstbl");
    let pod = Pod::new("fprst");
    accel.enroll(&pod, None);
    let data = pattern(0x2e5e7, 12 << 20);
    every_abort_arrives(&pod, 30, &data, || paired_loopback_connection(&accel));
}

/// An application's connection to another pod's address that iptables redirects to its
/// sidecar on loopback, as Istio's rules do: the client's route has a 1500-byte MTU, the
/// sidecar's socket is on loopback. The kernel sizes the client's send buffer for the
/// sidecar's 64 KiB MSS and the sidecar's for the client's 1448 bytes, so the sidecar's
/// backlog limit is a sixth of what its client's buffers suggest. (Soak 7's one stall: the
/// probes took the client's sizing for the server's, the queue grew to 2 MB against a
/// 362 KB limit, and the client's reset was dropped at the sidecar's backlog.)
#[test]
fn an_abort_reaches_a_sidecar_whose_buffers_were_sized_for_another_mss_than_its_clients() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start("rstmss");
    let pod = Pod::new("fprsm");
    accel.enroll(&pod, None);
    pod.sh(
        "ip link add fprma type veth peer name fprmb && ip link set fprma up && \
         ip link set fprmb up && ip addr add 10.251.7.1/24 dev fprma && \
         iptables -t nat -A OUTPUT -p tcp -d 10.251.7.2 -j REDIRECT --to-ports 15001",
    );
    let listener = pod.run(|| TcpListener::bind("0.0.0.0:15001").unwrap());
    let connect = || {
        let c = TcpStream::connect("10.251.7.2:80").unwrap();
        let (s, _) = listener.accept().unwrap();
        accel.wait_entries(fastpath_common::map_names::SOCKS, 2, "after pairing");
        (c, s)
    };
    // The case this test is for: the two ends' send buffers sized for different MSSes.
    let (client, server) = pod.run(|| {
        let (c, s) = connect();
        (socket_memory(&c).sndbuf, socket_memory(&s).sndbuf)
    });
    assert!(
        client >= 4 * server,
        "the client's send buffer ({client}) and the sidecar's ({server}) were sized alike: \
         this is not the redirected path this test is for"
    );
    let data = pattern(0x3a55e, 12 << 20);
    every_abort_arrives(&pod, 20, &data, connect);
}

/// A reader that pauses longer than the ingress gate holds TCP payload back (2 s) gets its TCP
/// receive queue filled behind its redirect queue, and both count in its receive memory. The
/// reset must still find room at the backlog after the pause. (Measured: the kernel grows
/// such a reader's receive buffer to what it holds, about 2.2 MiB, which raises the backlog
/// limit to about 6.3 MiB, so this holds without taking the TCP window out of the redirect
/// queue's room.)
#[test]
fn a_reader_that_paused_past_the_gate_hold_still_has_room_for_a_reset() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start("rstpause");
    let pod = Pod::new("fprsp");
    accel.enroll(&pod, None);
    let data = pattern(0x9a05e, 12 << 20);
    let (end, written, m) = pod.run(|| {
        let (mut c, s) = paired_loopback_connection(&accel);
        c.set_nonblocking(true).unwrap();
        let mut written = 0;
        let deadline = Instant::now() + Duration::from_secs(6);
        // Keep writing through the pause: once the gate lets payload in, TCP takes what
        // the reader's window allows.
        while Instant::now() < deadline && written < data.len() {
            match c.write(&data[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("write after {written} bytes: {e}"),
            }
        }
        let m = socket_memory(&s);
        abort_on_close(&c);
        let data = data[..written].to_vec();
        let reader = std::thread::spawn(move || read_until_end(s, &data));
        std::thread::sleep(Duration::from_micros(300));
        drop(c);
        (reader.join().unwrap(), written, m)
    });
    eprintln!(
        "{written} bytes written; after the pause the reader held {} bytes (receive buffer {}, \
         send buffer {}, backlog limit {})",
        m.receive,
        m.rcvbuf,
        m.sndbuf,
        backlog_limit(&m)
    );
    assert!(
        m.receive + (64 << 10) <= backlog_limit(&m),
        "after the pause the reader holds {} bytes of receive memory, redirect queue and TCP \
         window together: a segment that meets its backlog (limit {}) is dropped",
        m.receive,
        backlog_limit(&m)
    );
    assert!(
        !matches!(end, End::Stalled(_)),
        "the reader never saw its peer's abort"
    );
}
