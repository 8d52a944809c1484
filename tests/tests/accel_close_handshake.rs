//! Unread bytes through the TCP close handshake. A socket that reaches TCP_CLOSE (its own FIN
//! acknowledged and the peer's received, or the peer's reset) is unhashed, which takes it out
//! of every sockmap and frees its psock with whatever still waits in it. Plain TCP keeps the
//! receive queue readable. Each case runs plain and accelerated, and both must read the same.
use fastpath_tests::accel::{Accel, Pod, pattern, read_to_end_retry};
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    time::Duration,
};

const SIZE: usize = 1 << 20;

/// What the reader got: the bytes, and the error that ended the read, if any.
fn read_all(s: &mut TcpStream) -> (Vec<u8>, Option<std::io::ErrorKind>) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (out, Some(e.kind())),
        }
    }
}

/// The reader half-closes first, without reading; the writer sends `SIZE`, reads the EOF and
/// half-closes: the reader's socket goes FIN_WAIT2 -> TIME_WAIT with everything unread.
fn reader_closes_first(l: &TcpListener) -> (Vec<u8>, Option<std::io::ErrorKind>) {
    let addr = l.local_addr().unwrap();
    let mut c = TcpStream::connect(addr).unwrap();
    let (mut s, _) = l.accept().unwrap();
    let data = pattern(7, SIZE);
    s.write_all(&data).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let got = read_to_end_retry(&mut s, Duration::from_secs(10));
    assert!(got.is_empty());
    s.shutdown(Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    read_all(&mut c)
}

/// The writer sends `SIZE` and half-closes; the reader half-closes without reading: its socket
/// goes CLOSE_WAIT -> LAST_ACK -> CLOSE with everything unread.
fn reader_closes_last(l: &TcpListener) -> (Vec<u8>, Option<std::io::ErrorKind>) {
    let addr = l.local_addr().unwrap();
    let mut c = TcpStream::connect(addr).unwrap();
    let (mut s, _) = l.accept().unwrap();
    let data = pattern(8, SIZE);
    s.write_all(&data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    c.shutdown(Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    read_all(&mut c)
}

fn run_case(
    case: fn(&TcpListener) -> (Vec<u8>, Option<std::io::ErrorKind>),
    seed: u64,
    accelerated: bool,
) -> (usize, bool, Option<std::io::ErrorKind>) {
    let pod = Pod::new("fpclh");
    let accel = accelerated.then(|| {
        let a = Accel::start_configured("closeh", |s| s.max_queued_bytes = 1 << 30);
        a.enroll(&pod, None);
        a
    });
    let (got, err) = pod.run(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        case(&l)
    });
    if let Some(a) = &accel {
        let st = a.stats(pod.cookie());
        eprintln!("{st:?}");
        assert_eq!(st.connections_paired, 1, "{st:?}");
        assert!(st.bytes_redirected >= SIZE as u64, "{st:?}");
    }
    drop(accel);
    (got.len(), got == pattern(seed, SIZE), err)
}

#[test]
fn unread_bytes_survive_fin_wait2_to_time_wait() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let plain = run_case(reader_closes_first, 7, false);
    let accel = run_case(reader_closes_first, 7, true);
    assert_eq!(plain, (SIZE, true, None), "plain TCP");
    assert_eq!(accel, plain, "accelerated vs plain");
}

#[test]
fn unread_bytes_survive_last_ack_to_close() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let plain = run_case(reader_closes_last, 8, false);
    let accel = run_case(reader_closes_last, 8, true);
    assert_eq!(plain, (SIZE, true, None), "plain TCP");
    assert_eq!(accel, plain, "accelerated vs plain");
}
