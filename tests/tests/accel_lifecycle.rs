//! Lifecycle of the pinned accelerator: the installer exits, restarts (nothing loaded twice),
//! upgrades (programs swapped in the pinned links, maps kept, live connections keep being
//! redirected), a map whose layout changed is recreated (and enrollment restored), and an
//! explicit uninstall removes everything.
use fastpath_common::{map_names, meta_index};
use fastpath_installer::accel::{
    self, AccelState, PIN_LINK_RX_CONSUMED, PIN_LINK_SKMSG, PIN_LINK_SOCKOPS, PIN_PROG_SKMSG,
    PIN_PROG_SOCKOPS, sys,
};
use fastpath_pins::Pins;
use fastpath_tests::accel::{Accel, Pod, read_exact_retry};
use std::{
    io::Write as _,
    net::{TcpListener, TcpStream},
    os::fd::AsFd as _,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    time::Duration,
};

fn map_id(dir: &Path, name: &str) -> u32 {
    Pins::new(dir).map(name).unwrap().info().unwrap().id
}

fn link(dir: &Path, name: &str) -> sys::LinkIds {
    let fd = sys::obj_get(&dir.join(name)).unwrap();
    sys::link_ids(fd.as_fd()).unwrap()
}

#[derive(Debug, PartialEq, Eq)]
struct Ids {
    maps: Vec<u32>,
    links: (u32, u32),
    progs: (u32, u32),
    rx_link: u32,
}

fn ids(dir: &Path) -> Ids {
    let so = link(dir, PIN_LINK_SOCKOPS);
    let sm = link(dir, PIN_LINK_SKMSG);
    Ids {
        maps: fastpath_common::ALL_MAPS
            .iter()
            .map(|m| map_id(dir, m))
            .collect(),
        links: (so.id, sm.id),
        progs: (so.prog_id, sm.prog_id),
        rx_link: link(dir, PIN_LINK_RX_CONSUMED).id,
    }
}

fn attached_link_ids() -> Vec<u32> {
    aya::programs::loaded_links()
        .filter_map(|l| l.ok().map(|l| l.id()))
        .collect()
}

/// A live paired connection inside `pod`, used before and after each lifecycle step.
struct Live {
    c: TcpStream,
    s: TcpStream,
    round: u8,
}

impl Live {
    fn open(pod: &Pod) -> Self {
        pod.run(|| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, _) = l.accept().unwrap();
            Self { c, s, round: 0 }
        })
    }

    /// 1000 round trips of 1 KiB, checked.
    fn exercise(&mut self) {
        self.round += 1;
        let msg = vec![self.round; 1024];
        let mut buf = vec![0u8; 1024];
        for _ in 0..1000 {
            self.c.write_all(&msg).unwrap();
            read_exact_retry(&mut self.s, &mut buf, Duration::from_secs(10));
            assert!(buf == msg);
            self.s.write_all(&buf).unwrap();
            read_exact_retry(&mut self.c, &mut buf, Duration::from_secs(10));
            assert!(buf == msg);
        }
    }
}

fn pair_new_connection(pod: &Pod) {
    let mut l = Live::open(pod);
    l.exercise();
}

/// A hash map of another layout (key 8 B, value 4 B), pinned at `path`.
/// Pins, in place of `path`, a new map of this layout (`BPF_MAP_TYPE_*`, key and value
/// sizes, max entries).
fn pin_foreign_map(path: &Path, layout: [u32; 4]) {
    let [map_type, key_size, value_size, max_entries] = layout;
    let fd = fastpath_pins::sys::map_create(map_type, key_size, value_size, max_entries)
        .unwrap_or_else(|e| panic!("BPF_MAP_CREATE: {e}"));
    std::fs::remove_file(path).unwrap();
    sys::obj_pin(fd.as_fd(), path).unwrap();
}

fn set_meta_hash(dir: &Path, hash: u64) {
    let meta = Pins::new(dir).meta().unwrap();
    meta.set(&meta_index::OBJECT_HASH, &hash).unwrap();
}

/// Forgets which paired sockets the read filter counts, as a build without the filter would
/// have left them.
fn forget_filter_counts(dir: &Path) {
    let pins = Pins::new(dir);
    let counted = pins.sk_counted().unwrap();
    for sk in counted.keys().unwrap() {
        counted.remove(&sk).unwrap();
    }
    let filter = pins.sk_filter().unwrap();
    for slot in 0..filter.map().info().unwrap().max_entries {
        filter.set(&slot, &0).unwrap();
    }
}

#[test]
fn restart_upgrade_migration_and_uninstall_with_live_connections() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let fixture = Accel::start("lifecycle");
    let dir = fixture.pin_dir().to_path_buf();
    let pod = Pod::new("fplife");
    fixture.enroll(&pod, None);

    // Root only.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
    }
    for pin in [PIN_PROG_SOCKOPS, PIN_PROG_SKMSG] {
        assert!(dir.join(pin).exists(), "{pin}");
    }

    // The "installer" (this process's start()) has returned and closed every fd: still on.
    let first = ids(&dir);
    let status = accel::status_report(&fixture.settings).unwrap();
    for want in [
        format!("link {PIN_LINK_SOCKOPS}: id {}", first.links.0),
        format!("link {PIN_LINK_SKMSG}: id {}", first.links.1),
        format!("map {}: id {} entries 1", map_names::PODS, first.maps[0]),
        format!("map ABI {}", fastpath_common::MAP_ABI_VERSION),
        "acceleration switch: on".to_string(),
    ] {
        assert!(status.contains(&want), "status lacks {want:?}:\n{status}");
    }
    let mut live = Live::open(&pod);
    live.exercise();
    let redirected = |f: &Accel| f.stats(pod.cookie()).msgs_redirected;
    let r0 = redirected(&fixture);
    assert!(r0 >= 2000, "live connection redirected: {r0}");

    // Restart of the same build: nothing loaded, same ids.
    assert_eq!(accel::start(&fixture.settings), AccelState::Active);
    assert_eq!(ids(&dir), first, "restart reused everything");
    live.exercise();
    let r1 = redirected(&fixture);
    assert!(
        r1 >= r0 + 2000,
        "still redirected after restart: {r0} -> {r1}"
    );

    // Upgrade: a different build is attached (simulated by its stamp). Programs are swapped in
    // the same links; maps are kept; the live connection stays redirected.
    // The build before kept no read filter: the live sockets are not counted in it, so the
    // new tracepoint looks every read up while they live.
    forget_filter_counts(&dir);
    set_meta_hash(&dir, 0xdead_beef);
    assert_eq!(accel::start(&fixture.settings), AccelState::Active);
    assert!(
        matches!(
            accel::refresh_read_filter(&dir).unwrap(),
            accel::ReadFilter::Bypassed { uncounted } if uncounted >= 2
        ),
        "the live pair is not in the filter"
    );
    let upgraded = ids(&dir);
    assert_eq!(upgraded.maps, first.maps, "maps reused");
    assert_eq!(upgraded.links, first.links, "links kept");
    assert_ne!(upgraded.progs.0, first.progs.0, "sock_ops program replaced");
    assert_ne!(upgraded.progs.1, first.progs.1, "sk_msg program replaced");
    // The tracepoint link cannot be updated: the old one is detached, the new one attached.
    assert_ne!(upgraded.rx_link, first.rx_link, "tracepoint link replaced");
    let attached = attached_link_ids();
    assert!(
        attached.contains(&upgraded.rx_link) && !attached.contains(&first.rx_link),
        "exactly the new tracepoint link is attached: {attached:?}"
    );
    live.exercise();
    let r2 = redirected(&fixture);
    assert!(
        r2 >= r1 + 2000,
        "still redirected after upgrade: {r1} -> {r2}"
    );
    pair_new_connection(&pod);

    // A map whose layout changed is recreated; the enrollment map is rebuilt from the
    // plugin's records.
    pin_foreign_map(&dir.join(map_names::PODS), [1, 8, 4, 4]);
    let old_pods_id = map_id(&dir, map_names::PODS);
    assert_eq!(accel::start(&fixture.settings), AccelState::Active);
    let migrated = ids(&dir);
    assert_ne!(
        map_id(&dir, map_names::PODS),
        old_pods_id,
        "FP_PODS recreated"
    );
    assert_eq!(
        migrated.maps[2], first.maps[2],
        "the sockhash was not touched"
    );
    assert_eq!(fixture.map_entries(map_names::PODS), 1, "pod re-enrolled");
    let before = fixture.stats(pod.cookie()).connections_paired;
    pair_new_connection(&pod);
    assert_eq!(fixture.stats(pod.cookie()).connections_paired, before + 1);
    live.exercise();

    // FP_CONFIG as the build before this one had it (4 switches) is recreated with its
    // values: the new programs read them from the swap on, and start() writes acceleration on
    // only after the self-test.
    pin_foreign_map(&dir.join(map_names::CONFIG), [2, 4, 4, 4]);
    let old_config = Pins::new(&dir).config().unwrap();
    old_config
        .set(&fastpath_common::config_index::ACCEL_ENABLED, &1)
        .unwrap();
    let state = accel::start_with(&fixture.settings, |pin_dir| {
        let config = Pins::new(pin_dir).config().unwrap();
        assert_eq!(
            config.map().info().unwrap().max_entries,
            fastpath_common::config_index::LEN,
            "FP_CONFIG recreated"
        );
        let enabled = config
            .get(&fastpath_common::config_index::ACCEL_ENABLED)
            .unwrap();
        assert_eq!(
            enabled,
            Some(1),
            "acceleration stayed on through the recreation"
        );
        accel::selftest::run(pin_dir)
    });
    assert_eq!(state, AccelState::Active);
    live.exercise();

    // A read filter of another capacity is recreated empty: a pair counted in the old one is
    // unmarked, so every read is looked up while it lives.
    let uncounted = |dir: &Path| match accel::refresh_read_filter(dir).unwrap() {
        accel::ReadFilter::Bypassed { uncounted } => uncounted,
        accel::ReadFilter::InUse => 0,
    };
    let mut counted_pair = Live::open(&pod);
    counted_pair.exercise();
    let before = uncounted(&dir);
    pin_foreign_map(&dir.join(map_names::SK_FILTER), [2, 4, 8, 1024]);
    assert_eq!(accel::start(&fixture.settings), AccelState::Active);
    assert_eq!(uncounted(&dir), before + 2, "the counted pair is unmarked");
    counted_pair.exercise();
    live.exercise();

    // Explicit uninstall: pins gone, links detached, programs unloaded.
    accel::uninstall(&fixture.settings).unwrap();
    assert!(!dir.exists(), "pin directory removed");
    std::thread::sleep(Duration::from_millis(100));
    let live_links = attached_link_ids();
    assert!(
        !live_links.contains(&first.links.0),
        "sock_ops link detached"
    );
    assert!(
        !live_links.contains(&migrated.rx_link),
        "tracepoint link detached"
    );
    let live_progs: Vec<u32> = aya::programs::loaded_programs()
        .filter_map(|p| p.ok().map(|p| p.id()))
        .collect();
    assert!(
        !live_progs.contains(&upgraded.progs.0),
        "sock_ops program unloaded"
    );
    // Traffic still flows (plain TCP now).
    live.exercise();
    pod.run(|| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"plain").unwrap();
        let mut b = [0u8; 5];
        read_exact_retry(&mut s, &mut b, Duration::from_secs(5));
        assert_eq!(&b, b"plain");
    });
}

#[test]
fn disabled_or_unusable_kernel_leaves_traffic_alone() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let mut fixture = Accel::unstarted("states");
    fixture.settings.enabled = false;
    assert_eq!(accel::start(&fixture.settings), AccelState::Disabled);
    assert!(!fixture.pin_dir().exists(), "disabled: nothing loaded");

    fixture.settings.enabled = true;
    fixture.settings.cgroup_root =
        fastpath_installer::accel::CgroupRoot::At("/nonexistent/cgroup".into());
    match accel::start(&fixture.settings) {
        AccelState::Unavailable { reason } => {
            assert!(reason.contains("/nonexistent/cgroup"), "{reason}");
            assert!(!reason.contains('\n'), "one line: {reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // Whatever got pinned before the failure is detached again: nothing of ours runs.
    assert!(
        !fixture.pin_dir().exists(),
        "unavailable: nothing left pinned"
    );
}

#[test]
fn a_failed_self_test_leaves_acceleration_off_until_one_passes() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let fixture = Accel::unstarted("selftest");
    // The real self-test passes on this kernel; make it report a corrupted paired transfer.
    let state = accel::start_with(&fixture.settings, |_| {
        Ok(accel::selftest::Report {
            paired: Some("checksum mismatch after 4096 bytes".into()),
            ..Default::default()
        })
    });
    match &state {
        AccelState::Unavailable { reason } => {
            assert!(reason.contains("checksum mismatch"), "{reason}");
            assert!(!reason.contains('\n'), "one line: {reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // Nothing was accelerated yet, so nothing stays attached: the programs would only cost
    // every connection and every read on the node.
    assert!(
        !fixture.pin_dir().exists(),
        "failed self-test: nothing left pinned"
    );

    // A later start whose self-test passes turns it on for new connections.
    assert_eq!(accel::start(&fixture.settings), AccelState::Active);
    let pod = Pod::new("fpselftest");
    fixture.enroll(&pod, None);
    pair_new_connection(&pod);
    let paired = fixture.stats(pod.cookie()).connections_paired;
    assert!(paired > 0);

    // A self-test that fails while connections are accelerated (an upgrade to a kernel or
    // build that fails it): those finish on their programs, new ones are not accelerated.
    let mut live = Live::open(&pod);
    let failing = |_: &Path| {
        Ok(accel::selftest::Report {
            paired: Some("checksum mismatch after 4096 bytes".into()),
            ..Default::default()
        })
    };
    assert!(matches!(
        accel::start_with(&fixture.settings, failing),
        AccelState::Unavailable { .. }
    ));
    assert!(fixture.pin_dir().exists(), "live pairs keep their programs");
    let before = fixture.stats(pod.cookie());
    live.exercise();
    pair_new_connection(&pod);
    let after = fixture.stats(pod.cookie());
    assert!(
        after.msgs_redirected > before.msgs_redirected,
        "the live pair is still redirected"
    );
    assert_eq!(
        after.connections_paired, before.connections_paired,
        "no new pair"
    );

    // Once they are closed, the next start that is off detaches everything.
    drop(live);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fixture.map_entries(fastpath_common::map_names::SOCKS) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "live pair left the sockhash on close"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(matches!(
        accel::start_with(&fixture.settings, failing),
        AccelState::Unavailable { .. }
    ));
    assert!(
        !fixture.pin_dir().exists(),
        "idle again: nothing left pinned"
    );
}
