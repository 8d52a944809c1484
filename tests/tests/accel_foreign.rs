//! Another sockmap accelerator on the node: a second fastpath attached from another pin dir
//! stands in for Merbridge or Cilium's sockops (the same attach points). The one started
//! second must refuse, say what it found, and leave the first one's connections intact.
use fastpath_installer::accel::{AccelSettings, AccelState, start, status_report};
use fastpath_tests::accel::{Accel, Pod, pattern, read_to_end_retry};
use std::{
    io::Write as _,
    net::{Shutdown, TcpListener, TcpStream},
    time::Duration,
};

#[test]
fn a_second_accelerator_refuses_and_the_first_keeps_every_byte() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let first = Accel::start("foreign1");
    let pod = Pod::new("fpfor");
    first.enroll(&pod, None);
    let first_sockops = aya::programs::loaded_programs()
        .flatten()
        .find(|p| {
            p.name_as_str() == Some("fastpath_sockop")
                || p.name_as_str() == Some("fastpath_sockops")
        })
        .map(|p| p.id())
        .expect("the first accelerator's sock_ops program is loaded");

    let second_pins = fastpath_tests::ScratchBpffsDir::new("foreign2");
    let second = AccelSettings {
        pin_dir: second_pins.path().join("fastpath"),
        run_dir: first.run_dir.join("second"),
        ..first.settings.clone()
    };
    let state = start(&second);
    let AccelState::Conflict { programs } = &state else {
        panic!("the second accelerator must refuse, got {state:?}");
    };
    assert!(
        programs
            .iter()
            .any(|p| p.id == first_sockops && p.attached_to.starts_with("sock_ops on ")),
        "the conflict names the first one's sock_ops program {first_sockops}: {programs:?}"
    );
    assert!(
        !second.pin_dir.exists(),
        "the refused accelerator leaves nothing attached"
    );
    let report = status_report(&second).unwrap();
    assert!(
        report.contains(&format!("prog {first_sockops} ")),
        "accel-status names it: {report}"
    );
    // The first one sees nothing foreign: its own programs do not count.
    let own = status_report(&first.settings).unwrap();
    assert!(own.contains("other sockmap accelerators: none"), "{own}");

    // The first one's connections stay accelerated and intact (8 MiB echoes).
    pod.run(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let (mut s, _) = l.accept().unwrap();
                let got = read_to_end_retry(&mut s, Duration::from_secs(30));
                s.write_all(&got).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
            }
        });
        for i in 0..2u64 {
            let mut c = TcpStream::connect(addr).unwrap();
            let data = pattern(i, 8 << 20);
            c.write_all(&data).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let back = read_to_end_retry(&mut c, Duration::from_secs(30));
            assert!(
                back == data,
                "echo {i}: {} bytes back of {}",
                back.len(),
                data.len()
            );
        }
        server.join().unwrap();
    });
    let st = first.stats(pod.cookie());
    assert_eq!(st.connections_paired, 2, "{st:?}");
    // Each echo redirects until its reader lags past the queue bound (a loopback server's
    // backlog room, 896 KiB): at least its first message, half a MiB, of each.
    assert!(st.bytes_redirected >= 2 << 19, "{st:?}");
}
