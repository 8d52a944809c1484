//! An upgrade to a build whose connection maps have another layout, with a connection in
//! flight. The new build cannot take that connection over: its sockets keep the old sk_msg
//! program and maps. Before the old maps were retired with the programs that serve them, the
//! new ingress gate did not know the old connection: after its demotion its reader saw two
//! queues at once, and a proxy-style reader lost the end (1 047 200 of 1 088 576 bytes).
use fastpath_common::map_names;
use fastpath_installer::accel::{self, AccelState, retire};
use fastpath_tests::{
    accel::{Accel, Pod, assert_same_bytes, pattern, read_like_a_proxy},
    stress::stamp_another_map_abi,
};
use std::{
    io::Write as _,
    net::{Shutdown, TcpListener, TcpStream},
    time::{Duration, Instant},
};

const LIMIT: u64 = 1 << 20;

#[test]
fn an_upgrade_that_recreates_the_connection_maps_loses_no_byte_of_live_connections() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start_configured("layoutup", |s| s.max_queued_bytes = LIMIT);
    let dir = accel.pin_dir().to_path_buf();
    let pod = Pod::new("fplayout");
    accel.enroll(&pod, None);
    // Past the bound by a tail that fits in the reader's TCP receive window: unheld, the tail
    // and the FIN would be in before the reader reads.
    let data = pattern(0x1a70, LIMIT as usize + 40_000);
    let before_upgrade = 300 << 10;
    pod.run(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut c = TcpStream::connect(addr).unwrap();
        let (s, _) = l.accept().unwrap();
        accel.wait_entries(map_names::SOCKS, 2, "after pairing");
        c.write_all(&data[..before_upgrade]).unwrap();

        stamp_another_map_abi(&dir).unwrap();
        assert_eq!(accel::start(&accel.settings), AccelState::Active);
        let sets = retire::sets(&dir);
        assert_eq!(sets.len(), 1, "one retired set: {sets:?}");
        assert_eq!(retire::accelerated_sockets_in_sets(&dir).unwrap(), 2);
        assert_eq!(accel.map_entries(map_names::SOCKS), 0, "new sockhash");

        // A new connection pairs in the new maps.
        let c2 = TcpStream::connect(addr).unwrap();
        let (s2, _) = l.accept().unwrap();
        accel.wait_entries(map_names::SOCKS, 2, "new connection paired in the new maps");

        // The old connection goes on past the bound while nobody reads, then half-closes;
        // its reader reads like a proxy.
        let rest = data[before_upgrade..].to_vec();
        let writer = std::thread::spawn(move || {
            // Not a multiple of the reader's buffer: its last read of redirected bytes is short.
            for chunk in rest.chunks(10_000) {
                c.write_all(chunk).unwrap();
            }
            c.shutdown(Shutdown::Write).unwrap();
            c
        });
        std::thread::sleep(Duration::from_millis(500));
        let got = read_like_a_proxy(&s);
        let c = writer.join().unwrap();
        assert_same_bytes(&got, &data);

        // Once the old connection is closed, the agent's sweep removes the retired set (its
        // programs detach); the new connection is untouched.
        drop((c, s));
        let deadline = Instant::now() + Duration::from_secs(5);
        while retire::sweep(&dir).unwrap() > 0 {
            assert!(Instant::now() < deadline, "retired set not removed");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(retire::sets(&dir).is_empty());
        assert_eq!(accel.map_entries(map_names::SOCKS), 2);
        drop((c2, s2));
    });
}

#[test]
fn uninstall_removes_retired_connection_maps_too() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start("layoutrm");
    let dir = accel.pin_dir().to_path_buf();
    let pod = Pod::new("fplayoutrm");
    accel.enroll(&pod, None);
    pod.run(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _s = l.accept().unwrap();
        accel.wait_entries(map_names::SOCKS, 2, "after pairing");
        stamp_another_map_abi(&dir).unwrap();
        assert_eq!(accel::start(&accel.settings), AccelState::Active);
        assert_eq!(retire::sets(&dir).len(), 1);
        let report = accel::status_report(&accel.settings).unwrap();
        assert!(
            report.contains("retired connection maps: 1 set(s) with 2 socket(s)"),
            "{report}"
        );
        accel::uninstall(&accel.settings).unwrap();
        assert!(!dir.exists(), "pin dir left after uninstall");
    });
}

/// The agent sweeps retired sets every second, and during an upgrade the terminating agent's
/// sweep runs while the new one retires: a sweep must never see a set half-filled. It did: it
/// took the new set's directory for a set whose last connection closed and removed it, the
/// moves after that failed with "not found" and were skipped as pins that did not exist, and
/// the new build reused the old sockhash (its sk_msg attach failed with EBUSY; acceleration
/// went off). Here a sweep runs after every single move.
#[test]
fn a_sweep_during_a_retirement_leaves_every_connection_map_in_the_new_set() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start("retiresweep");
    let dir = accel.pin_dir().to_path_buf();
    let mut sweeps = 0;
    let set = retire::retire_observed(&dir, || {
        retire::sweep(&dir).unwrap();
        sweeps += 1;
    })
    .unwrap();
    assert!(
        sweeps > 1,
        "{sweeps} sweeps: fewer pins moved than expected"
    );
    for name in fastpath_installer::accel::CONNECTION_MAPS {
        assert!(
            !dir.join(name).exists(),
            "{name} is still pinned in {}: the retirement skipped it",
            dir.display()
        );
        assert!(
            set.join(name).exists(),
            "{name} is not in the retired set {}",
            set.display()
        );
    }
    assert_eq!(retire::sets(&dir), vec![set.clone()]);
    // The set has no connection: the next sweep removes it, whole.
    assert_eq!(retire::sweep(&dir).unwrap(), 0);
    assert!(!set.exists());
}
