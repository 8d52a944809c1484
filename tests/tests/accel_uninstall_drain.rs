//! An uninstall with connections in flight. Before it detaches anything it sends every
//! accelerated connection back to TCP (a connection that writes is demoted at its next
//! message, an idle one leaves the sockhash at once) and waits for readers to read what was
//! redirected to them. Afterwards no fastpath program is loaded although every connection is
//! still open, and every byte of every connection arrived in order.
use fastpath_common::map_names;
use fastpath_installer::accel;
use fastpath_tests::accel::{Accel, Pod, pattern, read_exact_retry};
use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    time::Duration,
};

fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

/// A round trip of `n` bytes each way on a pair, checked.
fn round_trip(c: &mut TcpStream, s: &mut TcpStream, seed: u64, n: usize) {
    let there = pattern(seed, n);
    let back = pattern(seed + 1, n);
    c.write_all(&there).unwrap();
    let mut got = vec![0u8; n];
    read_exact_retry(s, &mut got, Duration::from_secs(10));
    assert!(got == there, "bytes altered on the way there");
    s.write_all(&back).unwrap();
    read_exact_retry(c, &mut got, Duration::from_secs(10));
    assert!(got == back, "bytes altered on the way back");
}

#[test]
fn an_uninstall_drains_every_connection_to_tcp_then_unloads_everything_and_loses_no_byte() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start_configured("drain", |s| s.drain_timeout = Duration::from_secs(30));
    let pod = Pod::new("fpdrain");
    accel.enroll(&pod, None);
    const BACKLOG: usize = 3 << 20;
    const STREAM_CHUNK: usize = 16 << 10;
    const STREAM_CHUNKS: usize = 2048; // 32 MiB, written across the uninstall
    pod.run(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut idle_c, mut idle_s) = pair(&l);
        let (mut back_c, mut back_s) = pair(&l);
        let (mut stream_c, mut stream_s) = pair(&l);
        accel.wait_entries(map_names::SOCKS, 6, "after pairing");
        round_trip(&mut idle_c, &mut idle_s, 1, 4096);
        // Redirected and unread when the uninstall starts.
        let backlog = pattern(7, BACKLOG);
        back_c.write_all(&backlog).unwrap();
        std::thread::scope(|t| {
            let writer = t.spawn(move || {
                for i in 0..STREAM_CHUNKS {
                    stream_c.write_all(&[i as u8; STREAM_CHUNK]).unwrap();
                    if i % 64 == 0 {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                stream_c
            });
            let reader = t.spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                let mut got = 0usize;
                while got < STREAM_CHUNK * STREAM_CHUNKS {
                    let n = match stream_s.read(&mut buf) {
                        Ok(0) => panic!("EOF after {got} bytes"),
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) => panic!("read after {got} bytes: {e}"),
                    };
                    for (k, b) in buf[..n].iter().enumerate() {
                        let at = got + k;
                        assert_eq!(
                            *b,
                            (at / STREAM_CHUNK) as u8,
                            "stream byte {at} out of order"
                        );
                    }
                    got += n;
                }
                (stream_s, got)
            });
            std::thread::sleep(Duration::from_millis(200));
            let settings = accel.settings.clone();
            let programs = accel::pinned_program_ids(accel.pin_dir());
            assert_eq!(
                programs.len(),
                4,
                "sock_ops, sk_msg, tracepoint, gate: {programs:?}"
            );
            let uninstall = t.spawn(move || accel::uninstall(&settings));
            // The backlog's reader has not read: the uninstall waits for it.
            std::thread::sleep(Duration::from_secs(1));
            assert!(
                !uninstall.is_finished(),
                "the uninstall detached with {BACKLOG} redirected bytes unread"
            );
            let mut got = vec![0u8; BACKLOG];
            read_exact_retry(&mut back_s, &mut got, Duration::from_secs(20));
            let first_bad = got.iter().zip(&backlog).position(|(a, b)| a != b);
            assert_eq!(first_bad, None, "backlog altered");
            uninstall.join().unwrap().expect("uninstall");
            assert!(!accel.pin_dir().exists(), "pins left");
            // Every connection is still open, and nothing holds a program any more.
            let loaded = accel::still_loaded_after(&programs, Duration::from_secs(2));
            assert!(
                loaded.is_empty(),
                "fastpath programs still loaded after the uninstall: {loaded:?}"
            );
            let mut stream_c = writer.join().unwrap();
            let (mut stream_s, got) = reader.join().unwrap();
            assert_eq!(got, STREAM_CHUNK * STREAM_CHUNKS);
            // Plain TCP now, both ways, on every connection.
            round_trip(&mut idle_c, &mut idle_s, 11, 1 << 20);
            round_trip(&mut back_c, &mut back_s, 13, 1 << 20);
            round_trip(&mut stream_c, &mut stream_s, 17, 1 << 20);
        });
    });
}
