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
    net::TcpStream,
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
    const ROUNDS: usize = 30;
    let mut stalls = Vec::new();
    for round in 0..ROUNDS {
        let (end, written) = pod.run(|| {
            let (mut c, s) = paired_loopback_connection(&accel);
            // Write without a reader until the writer is stopped.
            c.set_nonblocking(true).unwrap();
            let mut written = 0;
            while written < data.len() {
                match c.write(&data[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("write after {written} bytes: {e}"),
                }
            }
            let m = socket_memory(&s);
            if round == 0 {
                eprintln!(
                    "{written} bytes written before the writer stopped; the reader holds {} \
                     bytes (receive buffer {}, send buffer {}, backlog limit {})",
                    m.receive,
                    m.rcvbuf,
                    m.sndbuf,
                    backlog_limit(&m)
                );
            }
            assert!(
                m.receive + (64 << 10) <= backlog_limit(&m),
                "the reader holds {} bytes of receive memory: a segment that meets its \
                 backlog (limit {}) is dropped",
                m.receive,
                backlog_limit(&m)
            );
            // Abort while the reader is in the middle of its long read.
            abort_on_close(&c);
            let reader = std::thread::spawn({
                let data = &data[..written];
                let data = data.to_vec();
                move || {
                    let end = read_until_end(s.try_clone().unwrap(), &data);
                    (end, socket_memory(&s).drops)
                }
            });
            std::thread::sleep(Duration::from_micros(300));
            drop(c);
            let (end, drops) = reader.join().unwrap();
            if let End::Stalled(_) = end {
                eprintln!("round {round}: stalled; the reader's socket dropped {drops} segment(s)");
            }
            (end, written)
        });
        match end {
            End::Reset(got) | End::Eof(got) => assert!(got <= written),
            End::Stalled(got) => stalls.push((round, got, written)),
        }
    }
    assert!(
        stalls.is_empty(),
        "{} of {ROUNDS} readers never saw their peer's abort (round, bytes read, bytes \
         written): {stalls:?}",
        stalls.len()
    );
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
