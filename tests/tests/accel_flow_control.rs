//! Flow control of paired connections. Redirected bytes skip TCP's flow control, so a writer
//! faster than its reader would pile bytes up in the reader's queue until the node's TCP memory
//! ran out (then sends fail with ENOMEM). The probes bound each reader's queue: past the limit
//! the connection is demoted to TCP, in order, and its sockets leave the sockhash once their
//! queues are read. A half-close demotes too.
use fastpath_common::{RxQueue, config_index, map_names, rxq_state};
use fastpath_installer::accel::{
    AccelState, ReadFilter, refresh_read_filter, start, status_report,
};
use fastpath_tests::accel::{
    Accel, Pod, assert_same_bytes, fionread, paired_loopback_connection, pattern, read_exact_retry,
    read_like_a_proxy, read_to_end_retry,
};
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

const LIMIT: u64 = 1 << 20;

fn rx_queue(accel: &Accel, s: &TcpStream) -> Option<RxQueue> {
    let map: aya::maps::HashMap<_, u64, RxQueue> = accel.map(map_names::RXQ);
    let cookie = fastpath_installer::accel::sys::socket_cookie(s.as_fd()).unwrap();
    map.get(&cookie, 0).ok()
}

/// Waits until the sockhash holds `n` sockets.
fn wait_sockhash(accel: &Accel, n: usize, what: &str) {
    accel.wait_entries(map_names::SOCKS, n, what);
}

/// Writes without blocking until the socket has accepted nothing for `quiet`.
fn write_until_stalled(s: &mut TcpStream, data: &[u8], quiet: Duration) -> usize {
    s.set_nonblocking(true).unwrap();
    let mut off = 0;
    let mut last_progress = Instant::now();
    while off < data.len() && last_progress.elapsed() < quiet {
        let end = (off + 64 * 1024).min(data.len());
        match s.write(&data[off..end]) {
            Ok(n) => {
                off += n;
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("write after {off} bytes: {e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    off
}

#[test]
fn a_reader_that_does_not_read_stops_the_writer_and_the_stream_stays_exact() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start_configured("flowctl", |s| s.max_queued_bytes = LIMIT);
    let pod = Pod::new("fpflow");
    accel.enroll(&pod, None);
    let total = 96 << 20;
    let data = pattern(0xf10c, total);
    pod.run(|| {
        let (mut c, mut s) = paired_loopback_connection(&accel);
        assert_eq!(rx_queue(&accel, &s).map(|q| q.state), Some(rxq_state::OPEN));

        // Nobody reads: the writer must stall, after about the limit plus TCP's own buffers.
        // Unbounded, every byte would be accepted at once (the queue grows without limit).
        let accepted = write_until_stalled(&mut c, &data, Duration::from_millis(300));
        eprintln!("a writer with no reader got {accepted} bytes in before it stalled");
        assert!(
            accepted as u64 >= LIMIT,
            "only {accepted} bytes accepted: the first {LIMIT} should have been redirected"
        );
        assert!(
            accepted < 32 << 20,
            "{accepted} bytes accepted with nobody reading: the reader's queue is not bounded"
        );
        let st = accel.stats(pod.cookie());
        assert_eq!(st.queue_demotions, 1, "{st:?}");
        assert!(st.msgs_redirected > 0, "{st:?}");
        let q = rx_queue(&accel, &s).expect("server queue entry");
        assert_eq!(q.state, rxq_state::DEMOTED, "{q:?}");
        assert!(
            q.queued > 0 && q.queued <= LIMIT + (64 << 10),
            "queued {} after the demotion",
            q.queued
        );

        // Now read: the redirected part, then the TCP part, in order, every byte.
        let rest = data[accepted..].to_vec();
        let writer = std::thread::spawn(move || {
            c.write_all(&rest).unwrap();
            c
        });
        let mut got = vec![0u8; total];
        read_exact_retry(&mut s, &mut got, Duration::from_secs(60));
        let mut c = writer.join().unwrap();
        let first_bad = got.iter().zip(&data).position(|(a, b)| a != b);
        assert_eq!(first_bad, None, "stream altered across the demotion");

        // Both sockets are plain TCP sockets again, and FIONREAD tells the truth.
        wait_sockhash(&accel, 0, "after the queues were read");
        assert_eq!(rx_queue(&accel, &s).map(|q| q.state), Some(rxq_state::LEFT));
        c.write_all(&[9u8; 1000]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while fionread(&s) < 1000 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(fionread(&s), 1000, "FIONREAD after the demotion");
        s.write_all(b"pong").unwrap();
        let mut pong = [0u8; 4];
        read_exact_retry(&mut c, &mut pong, Duration::from_secs(5));
        assert_eq!(&pong, b"pong");
    });
    // Closed sockets leave nothing behind.
    let deadline = Instant::now() + Duration::from_secs(5);
    while accel.map_entries(map_names::RXQ) + accel.map_entries(map_names::SK_COOKIES) > 0 {
        assert!(Instant::now() < deadline, "queue entries left after close");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `data` in writes of 256 KiB, each read before the next is written (the queue never
/// holds more than one write, however much flows), and checks that it arrives intact.
fn send_in_lockstep(c: &TcpStream, s: &mut TcpStream, data: &[u8]) {
    const CHUNK: usize = 256 << 10;
    assert_eq!(data.len() % CHUNK, 0);
    let mut w = c.try_clone().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let chunks: Vec<Vec<u8>> = data.chunks(CHUNK).map(|c| c.to_vec()).collect();
    let writer = std::thread::spawn(move || {
        for chunk in chunks {
            w.write_all(&chunk).unwrap();
            rx.recv().unwrap();
        }
    });
    let mut got = Vec::with_capacity(data.len());
    let mut buf = vec![0u8; CHUNK];
    while got.len() < data.len() {
        read_exact_retry(s, &mut buf, Duration::from_secs(10));
        got.extend_from_slice(&buf);
        let _ = tx.send(());
    }
    writer.join().unwrap();
    assert!(got == data, "stream altered");
}

/// The agent on this accelerator's pins (the same build: it reuses them).
fn start_agent(
    accel: &Accel,
    tag: &str,
) -> (
    fastpath_tests::installer::Host,
    fastpath_tests::installer::Agent,
) {
    let host = fastpath_tests::installer::Host::new(tag);
    host.write(
        "10-lo.conflist",
        &format!(
            r#"{{"cniVersion": "1.0.0", "name": "fp-{tag}", "plugins": [{{"type": "loopback"}}]}}"#
        ),
    );
    let agent = fastpath_tests::installer::Agent::start(
        &host,
        &[
            ("FASTPATH_ACCELERATION", "true"),
            ("FASTPATH_BPF_PIN_DIR", accel.pin_dir().to_str().unwrap()),
            ("FASTPATH_MAX_QUEUED_BYTES", &LIMIT.to_string()),
        ],
    );
    (host, agent)
}

#[test]
fn a_reader_that_keeps_up_is_never_demoted() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start_configured("flowok", |s| s.max_queued_bytes = LIMIT);
    let pod = Pod::new("fpflowok");
    accel.enroll(&pod, None);
    let total = 64 << 20;
    let data = pattern(0x600d, total);
    pod.run(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        send_in_lockstep(&c, &mut s, &data);
        let st = accel.stats(pod.cookie());
        assert_eq!(st.queue_demotions, 0, "{st:?}");
        assert!(st.bytes_redirected >= total as u64, "{st:?}");
        let q = rx_queue(&accel, &s).expect("server queue entry");
        assert_eq!((q.state, q.queued), (rxq_state::OPEN, 0), "{q:?}");
        drop(c);
    });
}

/// A half-close never demotes: both directions go on socket to socket, and the FIN arrives
/// after the last redirected byte and is read after it. (A demotion at the half-close raced
/// the other side's writes: bytes redirected in that window sat behind the switch to TCP,
/// which HAProxy sidecars turned into truncated streams.)
#[test]
fn a_half_close_with_bytes_queued_stays_paired_and_eof_comes_last() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start("halfqueued");
    let pod = Pod::new("fphalfq");
    accel.enroll(&pod, None);
    pod.run(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut c = TcpStream::connect(addr).unwrap();
        let (mut s, _) = l.accept().unwrap();
        // Nobody has read these when the client half-closes. (768 KiB: below the backlog
        // room of a loopback server, about 896 KiB, past which the connection is demoted.)
        c.write_all(&pattern(1, 3 << 18)).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        s.write_all(&pattern(2, 1 << 20)).unwrap();
        let got = read_to_end_retry(&mut s, Duration::from_secs(10));
        assert!(
            got == pattern(1, 3 << 18),
            "server read {} bytes",
            got.len()
        );
        s.shutdown(Shutdown::Write).unwrap();
        let back = read_to_end_retry(&mut c, Duration::from_secs(10));
        assert!(
            back == pattern(2, 1 << 20),
            "client read {} bytes",
            back.len()
        );
    });
    let st = accel.stats(pod.cookie());
    assert_eq!(st.queue_demotions, 0, "{st:?}");
    assert!(
        st.bytes_redirected >= (3 << 18) + (1 << 20),
        "both directions redirected: {st:?}"
    );
    wait_sockhash(&accel, 0, "after the connection closed");
}

/// Bytes of `s` waiting in its TCP receive queue (not its redirect queue), as the kernel's
/// socket diagnostics report them (`ss`'s Recv-Q: rcv_nxt - copied_seq).
fn tcp_receive_queue(pod: &Pod, s: &TcpStream) -> u64 {
    let (local, peer) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
    let out = pod.sh(&format!(
        "ss -Htn '( sport = :{} and dport = :{} )'",
        local.port(),
        peer.port()
    ));
    // State, Recv-Q, Send-Q, local, peer.
    out.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Recv-Q for {local} <- {peer} in {out:?}"))
}

/// What cut echoes short through HAProxy sidecars: after a demotion a reader had redirected
/// bytes and TCP bytes queued at once, a read returned the redirected ones only, and a
/// proxy that had seen the FIN took that short read as the end. The ingress gate holds the
/// writer's TCP segments back while the reader's redirect queue holds bytes (the writer
/// retransmits them), so a proxy-style reader gets every byte, as over plain TCP.
#[test]
fn a_proxy_that_takes_a_short_read_after_the_fin_as_eof_gets_every_byte_across_a_demotion() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start_configured("flowrdhup", |s| s.max_queued_bytes = LIMIT);
    let pod = Pod::new("fprdhup");
    accel.enroll(&pod, None);
    let data = pattern(0x4d48, 4 * LIMIT as usize);
    pod.run(|| {
        let (mut c, s) = paired_loopback_connection(&accel);
        std::thread::scope(|t| {
            // Nobody reads yet. The writer goes on until the connection is demoted at the
            // bound, then sends a tail that fits in the reader's TCP receive window, and its
            // FIN: unheld, both would be in before the reader reads its first byte.
            let writer = t.spawn(|| {
                // Not a multiple of the reader's buffer: its last read of redirected bytes is short.
                const CHUNK: usize = 10_000;
                let mut sent = 0;
                let mut tail = None;
                while tail.is_none_or(|end| sent < end) {
                    c.write_all(&data[sent..sent + CHUNK]).unwrap();
                    sent += CHUNK;
                    let demoted =
                        rx_queue(&accel, &s).is_some_and(|q| q.state == rxq_state::DEMOTED);
                    if demoted && tail.is_none() {
                        tail = Some(sent + 2 * CHUNK);
                    }
                }
                c.shutdown(Shutdown::Write).unwrap();
                sent
            });
            // The tail's segments are held back while the redirect queue holds bytes.
            let deadline = Instant::now() + Duration::from_secs(5);
            while accel.stats(pod.cookie()).tcp_segments_held == 0 {
                assert!(Instant::now() < deadline, "no TCP segment held back");
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(300));
            let q = rx_queue(&accel, &s).expect("reader's queue entry");
            assert!(q.queued > 0, "{q:?}");
            assert_eq!(
                tcp_receive_queue(&pod, &s),
                0,
                "TCP bytes queued beside {} redirected ones",
                q.queued
            );
            let got = read_like_a_proxy(&s);
            let sent = writer.join().unwrap();
            let first_bad = got.iter().zip(&data).position(|(a, b)| a != b);
            assert!(
                got.len() == sent && first_bad.is_none(),
                "{} of {sent} bytes, first bad offset {first_bad:?}",
                got.len()
            );
        });
    });
}

/// A writer faster than its (reading) peer: the connection is demoted once, both sockets
/// leave the sockhash while the stream goes on (plain TCP from then on: FIONREAD, splice and
/// TCP's flow control are the kernel's own again), and every byte arrives in order.
#[test]
fn a_fast_writer_to_a_reading_peer_goes_plain_after_its_demotion() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start_configured("flowfast", |s| s.max_queued_bytes = LIMIT);
    let pod = Pod::new("fpflowfast");
    accel.enroll(&pod, None);
    const CHUNK: usize = 64 << 10;
    const CHUNKS: usize = 4096; // 256 MiB
    pod.run(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 << 10];
            let mut got = 0usize;
            while got < CHUNK * CHUNKS {
                let n = match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                    Err(e) => panic!("read after {got} bytes: {e}"),
                };
                for (k, b) in buf[..n].iter().enumerate() {
                    let at = got + k;
                    assert_eq!(*b, (at / CHUNK) as u8, "byte {at} out of order");
                }
                got += n;
            }
            got
        });
        let mut left_at = None;
        for i in 0..CHUNKS {
            c.write_all(&[i as u8; CHUNK]).unwrap();
            if left_at.is_none() && i % 64 == 63 && accel.map_entries(map_names::SOCKS) == 0 {
                left_at = Some(i + 1);
            }
        }
        assert_eq!(reader.join().unwrap(), CHUNK * CHUNKS);
        let st = accel.stats(pod.cookie());
        assert_eq!(st.queue_demotions, 1, "{st:?}");
        assert!(
            left_at.is_some_and(|n| n < CHUNKS),
            "both sockets left the sockhash while the stream went on ({left_at:?} of {CHUNKS} \
             chunks written then)"
        );
    });
}

/// A reader that empties its redirect queue after the last TCP segment arrived gets no
/// segment or state change that would take it out of the sockhash, where this kernel reports
/// FIONREAD = 0 over the TCP bytes waiting behind. The running agent's sweep (every 100 ms)
/// takes it out.
#[test]
fn a_drained_reader_that_gets_no_more_segments_is_swept_out_of_the_sockhash() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start_configured("flowsweep", |s| s.max_queued_bytes = LIMIT);
    let pod = Pod::new("fpflowsweep");
    accel.enroll(&pod, None);
    let data = pattern(0x5eef, 2 << 20);
    pod.run(|| {
        let (mut c, mut s) = paired_loopback_connection(&accel);
        // 16 KiB writes until the connection is demoted: the write that demoted it took TCP
        // and fits the reader's window, so the writer has nothing left to send, and no
        // zero-window probe will come either.
        let mut total = 0;
        for chunk in data.chunks(16 << 10) {
            c.write_all(chunk).unwrap();
            total += chunk.len();
            if rx_queue(&accel, &s).is_some_and(|q| q.state == rxq_state::DEMOTED) {
                break;
            }
        }
        let data = &data[..total];
        // Every segment has arrived and been acknowledged (delayed ACKs included).
        std::thread::sleep(Duration::from_millis(200));
        let q = rx_queue(&accel, &s).expect("reader's queue entry");
        assert_eq!(q.state, rxq_state::DEMOTED, "{q:?}");
        let redirected = q.queued as usize;
        assert!(redirected > 0 && redirected < total, "{q:?}");
        // Read exactly the redirected bytes: the queue is empty, the TCP bytes wait behind.
        let mut got = vec![0u8; total];
        read_exact_retry(&mut s, &mut got[..redirected], Duration::from_secs(5));
        let waiting = total - redirected;
        // The writer left at its first TCP segment; nothing took the drained reader out.
        assert_eq!(
            (accel.map_entries(map_names::SOCKS), fionread(&s)),
            (1, 0),
            "the reader stays in the sockhash, where FIONREAD hides the TCP bytes behind"
        );
        // The agent, started on these pins (same build: it reuses them), sweeps every 100 ms.
        let (_host, mut agent) = start_agent(&accel, "sweep");
        let deadline = Instant::now() + Duration::from_secs(10);
        while accel.map_entries(map_names::SOCKS) > 0 {
            assert!(
                Instant::now() < deadline,
                "the agent did not sweep the drained reader out; its log:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        agent.terminate();
        // FIONREAD is TCP's again: it counts the bytes that arrived (the rest still waits in
        // the writer's send queue for window, and flows as the reader reads).
        let after = fionread(&s);
        assert!(
            after > 0 && after <= waiting,
            "FIONREAD after the sweep: {after} (of {waiting} on the way)"
        );
        read_exact_retry(&mut s, &mut got[redirected..], Duration::from_secs(5));
        assert!(got == data, "stream altered");
        assert_eq!(
            fastpath_installer::accel::sweep_demoted(accel.pin_dir()).unwrap(),
            0
        );
        assert_eq!(
            accel.map_entries(map_names::DEMOTED),
            0,
            "sweep list emptied"
        );
    });
}

/// The filter that spares other sockets' reads a lookup: one count per paired socket, back to
/// zero when they close. A paired socket the filter misses has its reads ignored (its queue is
/// demoted for nothing), so after an upgrade from a build without the filter, the tracepoint
/// looks every read up until the sockets that build paired are gone.
#[test]
fn the_read_filter_counts_every_paired_socket_and_only_those() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    use aya::maps::{Array, HashMap, MapData};
    let accel = Accel::start_configured("flowfilter", |s| s.max_queued_bytes = LIMIT);
    let pod = Pod::new("fpflowfilter");
    accel.enroll(&pod, None);
    let filter = || -> Array<MapData, u64> { accel.map(map_names::SK_FILTER) };
    let filter_total = || filter().iter().map(Result::unwrap).sum::<u64>();
    let zero_filter = || {
        let mut f = filter();
        for slot in 0..f.len() {
            f.set(slot, 0, 0).unwrap();
        }
    };
    let wait_unpaired = |what: &str| accel.wait_entries(map_names::SK_COOKIES, 0, what);
    let data = pattern(0xf117, 4 * LIMIT as usize);
    pod.run(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let pair = || {
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, _) = l.accept().unwrap();
            (c, s)
        };
        let conns: Vec<_> = (0..8).map(|_| pair()).collect();
        wait_sockhash(&accel, 16, "eight connections paired");
        assert_eq!(filter_total(), 16, "one count per paired socket");
        let cookies: HashMap<MapData, u64, u64> = accel.map(map_names::SK_COOKIES);
        for sk in cookies.keys().map(Result::unwrap) {
            let slot = fastpath_common::sk_filter_slot(sk);
            assert_ne!(
                filter().get(&slot, 0).unwrap(),
                0,
                "slot {slot} of a paired socket"
            );
        }
        drop(conns);
        wait_unpaired("after close");
        assert_eq!(filter_total(), 0, "counts left after every socket closed");

        // Missed by the filter: the reader keeps up, but its reads are not seen.
        let (c, mut s) = pair();
        wait_sockhash(&accel, 2, "missed pair");
        zero_filter();
        send_in_lockstep(&c, &mut s, &data);
        let q = rx_queue(&accel, &s).expect("reader's queue entry");
        assert_eq!(q.state, rxq_state::DEMOTED, "unseen reads: {q:?}");
        drop((c, s));
        wait_unpaired("after the missed pair closed");

        // Paired by a build without the filter (listed, never counted), then an upgrade: the
        // new tracepoint looks every read up until those sockets are gone.
        let (c, mut s) = pair();
        wait_sockhash(&accel, 2, "pair of the previous build");
        let mut counted: HashMap<MapData, u64, u64> = accel.map(map_names::SK_COUNTED);
        for sk in counted.keys().map(Result::unwrap).collect::<Vec<_>>() {
            counted.remove(&sk).unwrap();
        }
        zero_filter();
        let mut meta: Array<MapData, u64> = accel.map(map_names::META);
        meta.set(fastpath_common::meta_index::OBJECT_HASH, 0x0bad, 0)
            .unwrap();
        assert_eq!(start(&accel.settings), AccelState::Active, "upgrade");
        assert_eq!(
            refresh_read_filter(accel.pin_dir()).unwrap(),
            ReadFilter::Bypassed { uncounted: 2 }
        );
        send_in_lockstep(&c, &mut s, &data);
        let q = rx_queue(&accel, &s).expect("reader's queue entry");
        assert_eq!(
            (q.state, q.queued),
            (rxq_state::OPEN, 0),
            "reads seen: {q:?}"
        );
        // The agent puts the filter back in use once they are gone (it checks every 5 s).
        let (_host, mut agent) = start_agent(&accel, "filter");
        let bypass = || {
            let cfg: Array<MapData, u32> = accel.map(map_names::CONFIG);
            cfg.get(&config_index::READ_FILTER_BYPASS, 0).unwrap()
        };
        // Past the agent's first check (5 s): still missing, still bypassed.
        std::thread::sleep(Duration::from_millis(5500));
        assert_eq!(bypass(), 1, "in use while sockets are missing from it");
        let status = status_report(&accel.settings).unwrap();
        assert!(
            status.contains("read filter: bypassed") && status.contains("not in it: 2;"),
            "{status}"
        );
        drop((c, s));
        wait_unpaired("after the previous build's pair closed");
        assert_eq!(
            filter_total(),
            0,
            "uncounted sockets took nothing from the filter"
        );
        let deadline = Instant::now() + Duration::from_secs(12);
        while bypass() != 0 {
            assert!(
                Instant::now() < deadline,
                "the agent left the filter bypassed; its log:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        agent.terminate();
        let (c, mut s) = pair();
        wait_sockhash(&accel, 2, "pair after the filter is back in use");
        assert_eq!(filter_total(), 2, "new pairs are counted");
        send_in_lockstep(&c, &mut s, &data);
        let q = rx_queue(&accel, &s).expect("reader's queue entry");
        assert_eq!((q.state, q.queued), (rxq_state::OPEN, 0), "{q:?}");
    });
}

/// A writer's retransmission timer as `TCP_INFO` reports it (`tcpi_rto`, µs), and its
/// `TCP_USER_TIMEOUT` (ms).
fn retransmission_settings(s: &TcpStream) -> (u32, u32) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: getsockopt into owned buffers of the sizes given.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        let mut user_timeout: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let rc = libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&mut user_timeout as *mut libc::c_int).cast(),
            &mut len,
        );
        assert_eq!(
            rc,
            0,
            "TCP_USER_TIMEOUT: {}",
            std::io::Error::last_os_error()
        );
        (info.tcpi_rto, user_timeout as u32)
    }
}

/// A send buffer that takes everything the tests write past the bound at once, whatever
/// `net.core.wmem_max` says (root only), so that a writer can close with its tail unsent.
fn force_send_buffer(s: &TcpStream, bytes: usize) {
    use std::os::fd::AsRawFd as _;
    let v = bytes as libc::c_int;
    // SAFETY: setsockopt with an int we own.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_SNDBUFFORCE: {}", std::io::Error::last_os_error());
}

/// Reads `slice` bytes every `pause` until the socket's redirect queue is empty: a reader that
/// keeps reading, too slowly for its writer. Calls `sample` after every read.
fn read_slowly_until_drained(
    accel: &Accel,
    s: &mut TcpStream,
    got: &mut Vec<u8>,
    mut sample: impl FnMut(),
) {
    const SLICE: usize = 16 << 10;
    let mut buf = vec![0u8; SLICE];
    let deadline = Instant::now() + Duration::from_secs(60);
    while rx_queue(accel, s).is_some_and(|q| (q.queued as i64) > 0) {
        assert!(Instant::now() < deadline, "redirect queue not drained");
        match s.read(&mut buf) {
            Ok(0) => panic!("EOF after {} bytes with redirected bytes queued", got.len()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("read after {} bytes: {e}", got.len()),
        }
        sample();
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// While the ingress gate holds a writer's segments, the writer retransmits into a closed
/// gate, and TCP's backoff doubles its timer each time: after 8 s of holding, the next resend
/// would be 6 s away, and after a minute, a minute away, long after its reader caught up.
/// The timer of a held writer is capped at 1 s, and its user timeout raised so that the cap
/// does not make it give up sooner.
#[test]
fn a_writer_held_at_the_gate_keeps_a_short_retransmission_timer_and_resumes_once_its_reader_caught_up()
 {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start_configured("flowheld", |s| s.max_queued_bytes = LIMIT);
    let pod = Pod::new("fpflowheld");
    accel.enroll(&pod, None);
    let data = pattern(0x4e4c, LIMIT as usize + (512 << 10));
    pod.run(|| {
        let (mut c, mut s) = paired_loopback_connection(&accel);
        force_send_buffer(&c, 4 << 20);
        let writer_view = c.try_clone().unwrap();
        let writer = std::thread::spawn({
            let data = data.clone();
            move || {
                for chunk in data.chunks(64 << 10) {
                    c.write_all(chunk).unwrap();
                }
                c
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while rx_queue(&accel, &s).is_none_or(|q| q.state != rxq_state::DEMOTED) {
            assert!(Instant::now() < deadline, "not demoted at the bound");
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut got = Vec::new();
        let (mut longest_rto_us, mut user_timeout_ms) = (0, 0);
        read_slowly_until_drained(&accel, &mut s, &mut got, || {
            let (rto, ut) = retransmission_settings(&writer_view);
            longest_rto_us = longest_rto_us.max(rto);
            user_timeout_ms = user_timeout_ms.max(ut);
        });
        let drained = Instant::now();
        let held = accel.stats(pod.cookie()).tcp_segments_held;
        let c = writer.join().unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        got.extend(read_to_end_retry(&mut s, Duration::from_secs(30)));
        eprintln!(
            "held {held} segments; the writer's timer reached {longest_rto_us} µs, its user \
             timeout {user_timeout_ms} ms; the rest arrived {:?} after the reader caught up",
            drained.elapsed()
        );
        assert!(held > 0, "the gate held nothing: the test did not test");
        assert_same_bytes(&got, &data);
        let cap_us = fastpath_common::HELD_WRITER_RTO_MAX_MS as u32 * 1000;
        assert!(
            longest_rto_us <= cap_us,
            "a held writer's retransmission timer reached {longest_rto_us} µs (cap {cap_us} µs)"
        );
        assert!(
            u64::from(user_timeout_ms) >= fastpath_common::HELD_WRITER_TIMEOUT_GRACE_MS,
            "a held writer's user timeout stayed at {user_timeout_ms} ms"
        );
    });
}

/// A writer that closes with its tail unsent is an orphan: TCP gives it `tcp_orphan_retries`
/// retransmission timeouts (8 by default, about 100 s), then drops it and its bytes without a
/// word to the peer. Held at the gate while its reader drains the redirect queue, it would be
/// dropped after those timeouts although the reader reads on; plain TCP keeps it while the
/// reader answers its window probes. Here the pod's `tcp_orphan_retries` is 1 (about 0.6 s)
/// and the reader takes several seconds: every byte and the EOF must still arrive.
#[test]
fn a_closed_writer_held_at_the_gate_is_not_dropped_while_its_reader_reads() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start_configured("floworphan", |s| s.max_queued_bytes = LIMIT);
    let pod = Pod::new("fpfloworphan");
    pod.sh("sysctl -qw net.ipv4.tcp_orphan_retries=1");
    accel.enroll(&pod, None);
    let data = pattern(0x4f52, LIMIT as usize + (512 << 10));
    pod.run(|| {
        let (mut c, mut s) = paired_loopback_connection(&accel);
        force_send_buffer(&c, 4 << 20);
        for chunk in data.chunks(64 << 10) {
            c.write_all(chunk).unwrap();
        }
        let q = rx_queue(&accel, &s).expect("reader's queue entry");
        assert_eq!(q.state, rxq_state::DEMOTED, "{q:?}");
        drop(c);
        let mut got = Vec::new();
        read_slowly_until_drained(&accel, &mut s, &mut got, || {});
        let held = accel.stats(pod.cookie()).tcp_segments_held;
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        got.extend(read_to_end_retry(&mut s, Duration::from_secs(30)));
        assert!(held > 0, "the gate held nothing: the test did not test");
        assert_same_bytes(&got, &data);
    });
}
