//! The map logic against the fake syscall layer.
use super::*;
use crate::fake::FakeSys;
use fastpath_common::{MAP_LAYOUTS, config_index, map_type};

const DIR: &str = "/fake/bpf/fastpath";

fn pins(cpus: usize) -> (FakeSys, Pins<FakeSys>) {
    let sys = FakeSys::new(cpus);
    sys.pin_all(Path::new(DIR));
    let pins = Pins::with_sys(DIR, sys.clone());
    pins.write_stamp(0xfeed).unwrap();
    (sys, pins)
}

fn record(cookie: u64, ips: &[&str], accelerate: bool) -> PodRecord {
    PodRecord {
        container_id: format!("c{cookie}"),
        namespace: "ns".into(),
        name: format!("pod-{cookie}"),
        netns_cookie: cookie,
        ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        accelerate,
        excluded_ports: vec![8080],
        pin_dir: DIR.into(),
    }
}

fn ip(s: &str) -> IpKey {
    ip_key(s.parse().unwrap())
}

#[test]
fn enroll_registers_the_ips_and_the_netns() {
    let (_, pins) = pins(2);
    let r = record(42, &["10.1.0.5", "fd00::5"], true);
    assert!(matches!(pins.enroll_pod(&r).unwrap(), Enrollment::Enrolled));
    let info = pins.pods().unwrap().get(&42).unwrap().unwrap();
    assert_eq!(info, PodInfo::new(true, &[8080]));
    let ips = pins.pod_ips().unwrap();
    assert_eq!(ips.get(&ip("10.1.0.5")).unwrap(), Some(42));
    assert_eq!(ips.get(&ip("fd00::5")).unwrap(), Some(42));
    assert_eq!(ips.count().unwrap(), 2);
}

#[test]
fn nothing_pinned_is_not_loaded() {
    let pins = Pins::with_sys(DIR, FakeSys::new(1));
    match pins.enroll_pod(&record(1, &["10.0.0.1"], true)).unwrap() {
        Enrollment::NotLoaded(e) => {
            assert!(e.is_not_found(), "{e}");
            assert_eq!(
                e.to_string(),
                format!("bpf(BPF_OBJ_GET) on {DIR}/FP_PODS: {}", e.os_error())
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn maps_of_another_abi_are_not_written() {
    let (_, pins) = pins(1);
    let meta = pins.meta().unwrap();
    for (stamp, says) in [
        (MAP_ABI_VERSION as u64 + 1, "have map ABI"),
        (0, "carry no map ABI stamp yet"),
    ] {
        meta.set(&meta_index::ABI_VERSION, &stamp).unwrap();
        match pins.enroll_pod(&record(7, &["10.0.0.7"], true)).unwrap() {
            Enrollment::OtherAbi(why) => assert!(why.to_string().contains(says), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(pins.pods().unwrap().count().unwrap(), 0);
        assert_eq!(pins.pod_ips().unwrap().count().unwrap(), 0);
    }
}

#[test]
fn a_missing_stamp_map_is_named() {
    let (sys, pins) = pins(1);
    sys.unpin(&pins.pin(map_names::META));
    let why = pins.check_abi().unwrap_err();
    assert!(
        why.to_string()
            .starts_with("cannot open the accelerator's stamp (FP_META): "),
        "{why}"
    );
    assert!(matches!(
        pins.enroll_pod(&record(1, &[], true)).unwrap(),
        Enrollment::OtherAbi(_)
    ));
}

#[test]
fn abi_verdicts() {
    assert!(abi_verdict(Some(MAP_ABI_VERSION as u64)).is_ok());
    let older = abi_verdict(Some(MAP_ABI_VERSION as u64 - 1)).unwrap_err();
    assert_eq!(
        older.to_string(),
        format!(
            "the accelerator's maps have map ABI {}, this plugin writes {MAP_ABI_VERSION}",
            MAP_ABI_VERSION - 1
        )
    );
    assert!(matches!(abi_verdict(Some(0)), Err(StampError::Missing)));
    assert!(matches!(abi_verdict(None), Err(StampError::Missing)));
}

#[test]
fn stamp_round_trips() {
    let (_, pins) = pins(1);
    assert_eq!(pins.stamp(), Some((MAP_ABI_VERSION as u64, 0xfeed)));
    pins.meta()
        .unwrap()
        .set(&meta_index::ABI_VERSION, &0)
        .unwrap();
    assert_eq!(pins.stamp(), None);
}

#[test]
fn unenroll_removes_only_what_is_the_pods() {
    let (sys, pins) = pins(2);
    let old = record(1, &["10.0.0.1", "10.0.0.2"], true);
    pins.enroll_pod(&old).unwrap();
    // 10.0.0.2 moved to a newer pod meanwhile.
    pins.enroll_pod(&record(2, &["10.0.0.2"], true)).unwrap();
    sys.map(&pins.pin(map_names::STATS))
        .put_raw(&1u64.to_ne_bytes(), &[0; 72 * 2]);

    pins.unenroll(&old).unwrap();
    assert_eq!(pins.pods().unwrap().keys().unwrap(), vec![2]);
    let ips = pins.pod_ips().unwrap();
    assert_eq!(ips.get(&ip("10.0.0.1")).unwrap(), None);
    assert_eq!(ips.get(&ip("10.0.0.2")).unwrap(), Some(2));
    assert!(pins.stats().unwrap().keys().unwrap().is_empty());
    // Idempotent.
    pins.unenroll(&old).unwrap();
}

#[test]
fn unenroll_leaves_other_abis_and_opted_out_pods_alone() {
    let (_, pins) = pins(1);
    let r = record(3, &["10.0.0.3"], true);
    pins.enroll_pod(&r).unwrap();
    pins.unenroll(&PodRecord {
        accelerate: false,
        ..r.clone()
    })
    .unwrap();
    assert_eq!(pins.pods().unwrap().count().unwrap(), 1);
    pins.meta()
        .unwrap()
        .set(&meta_index::ABI_VERSION, &(MAP_ABI_VERSION as u64 + 1))
        .unwrap();
    pins.unenroll(&r).unwrap();
    assert_eq!(pins.pods().unwrap().count().unwrap(), 1);
}

#[test]
fn reenroll_writes_back_accelerated_records() {
    let (_, pins) = pins(1);
    let records = [
        record(10, &["10.0.1.10"], true),
        record(11, &["10.0.1.11"], false),
        record(12, &["10.0.1.12", "fd00::12"], true),
    ];
    assert_eq!(pins.reenroll(&records).unwrap(), 2);
    assert_eq!(pins.pods().unwrap().keys().unwrap().len(), 2);
    assert_eq!(pins.pod_ips().unwrap().count().unwrap(), 3);
    assert_eq!(pins.pods().unwrap().get(&11).unwrap(), None);
}

#[test]
fn a_failed_write_names_the_step_the_command_and_the_map() {
    let (sys, pins) = pins(1);
    sys.map(&pins.pin(map_names::POD_IPS))
        .fail_updates(Some(libc::ENOSPC));
    let e = pins
        .enroll_pod(&record(5, &["10.0.0.5"], true))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "register 10.0.0.5: bpf(BPF_MAP_UPDATE_ELEM) on {DIR}/FP_POD_IPS: {}",
            io::Error::from_raw_os_error(libc::ENOSPC)
        )
    );
    assert_eq!(e.os_error().raw_os_error(), Some(libc::ENOSPC));
}

#[test]
fn a_full_hash_map_refuses_new_keys() {
    let sys = FakeSys::new(1);
    let layout = fastpath_common::MapLayout {
        max_entries: 1,
        ..MAP_LAYOUTS[0]
    };
    sys.pin(&Path::new(DIR).join(map_names::PODS), &layout);
    let pods = Pins::with_sys(DIR, sys).pods().unwrap();
    pods.set(&1, &PodInfo::default()).unwrap();
    pods.set(&1, &PodInfo::new(true, &[])).unwrap();
    let e = pods.set(&2, &PodInfo::default()).unwrap_err();
    assert_eq!(e.os_error().raw_os_error(), Some(libc::E2BIG));
}

#[test]
fn counters_are_summed_over_cpus() {
    let (sys, pins) = pins(3);
    let stats = sys.map(&pins.pin(map_names::STATS));
    let per_cpu = |msgs: [u64; 3]| {
        let mut raw = Vec::new();
        for m in msgs {
            let s = PodStats {
                msgs_redirected: m,
                bytes_redirected: m * 100,
                ..PodStats::default()
            };
            // SAFETY: PodStats is plain data of 72 bytes, a multiple of 8.
            raw.extend_from_slice(unsafe {
                std::slice::from_raw_parts((&raw const s).cast::<u8>(), size_of::<PodStats>())
            });
        }
        raw
    };
    stats.put_raw(&9u64.to_ne_bytes(), &per_cpu([1, 2, 3]));
    stats.put_raw(&4u64.to_ne_bytes(), &per_cpu([0, 0, 5]));
    let counters = pins.pod_counters().unwrap();
    assert_eq!(counters.len(), 2);
    assert_eq!(counters[0].0, 4);
    assert_eq!(counters[0].1.msgs_redirected, 5);
    assert_eq!(counters[1].0, 9);
    assert_eq!(counters[1].1.msgs_redirected, 6);
    assert_eq!(counters[1].1.bytes_redirected, 600);
}

#[test]
fn arrays_hold_every_index() {
    let (_, pins) = pins(1);
    let cfg = pins.config().unwrap();
    cfg.set(&config_index::DRAIN, &1).unwrap();
    let values = cfg.values().unwrap();
    assert_eq!(values.len(), config_index::LEN as usize);
    assert_eq!(values[config_index::DRAIN as usize], 1);
    assert!(cfg.set(&config_index::LEN, &1).is_err());
    assert!(cfg.remove(&0).is_err());
    let info = pins.map(map_names::CONFIG).unwrap().info().unwrap();
    assert_eq!(info.map_type, map_type::ARRAY);
}
