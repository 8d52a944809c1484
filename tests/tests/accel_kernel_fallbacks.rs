//! Each kernel feature the accelerator uses above its floor, switched off on this kernel
//! (`FASTPATH_KERNEL_FEATURES_OFF`) as if it were missing, and the fallback it gets.
use fastpath_common::map_names;
use fastpath_installer::accel::{self, AccelState, PIN_LINK_SKMSG, PIN_PROG_SKMSG, sys};
use fastpath_tests::accel::{Accel, Pod, paired_loopback_connection, pattern, read_exact_retry};
use std::{io::Write as _, os::fd::AsFd as _, time::Duration};

/// A connection in `pod` that moves `n` bytes each way, checked; returns the bytes the
/// accelerator redirected for the pod meanwhile.
fn accelerated_bytes(accel: &Accel, pod: &Pod, n: usize) -> u64 {
    let before = accel.stats(pod.cookie()).bytes_redirected;
    pod.run(|| {
        let (mut c, mut s) = paired_loopback_connection(accel);
        let (there, back) = (pattern(3, n), pattern(4, n));
        c.write_all(&there).unwrap();
        let mut got = vec![0u8; n];
        read_exact_retry(&mut s, &mut got, Duration::from_secs(10));
        assert!(got == there, "bytes altered");
        s.write_all(&back).unwrap();
        read_exact_retry(&mut c, &mut got, Duration::from_secs(10));
        assert!(got == back, "bytes altered");
    });
    accel.stats(pod.cookie()).bytes_redirected - before
}

/// Before Linux 6.10 a sockhash takes no link: sk_msg is attached to the map itself.
#[test]
fn without_sockmap_links_sk_msg_is_attached_to_the_sockhash_and_survives_a_restart() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start_configured("nolink", |s| s.features_off.sockmap_link = true);
    let dir = accel.pin_dir().to_path_buf();
    assert!(
        !dir.join(PIN_LINK_SKMSG).exists(),
        "a sockmap link was pinned"
    );
    let attached = || {
        let socks = sys::obj_get(&dir.join(map_names::SOCKS)).unwrap();
        sys::prog_query(socks.as_fd(), sys::BPF_SK_MSG_VERDICT).unwrap()
    };
    let prog = aya::programs::ProgramInfo::from_pin(dir.join(PIN_PROG_SKMSG))
        .unwrap()
        .id();
    assert_eq!(attached(), [prog], "sk_msg attached to the sockhash");
    let pod = Pod::new("fpnolink");
    accel.enroll(&pod, None);
    assert!(
        accelerated_bytes(&accel, &pod, 256 << 10) >= 512 << 10,
        "the pair was not accelerated"
    );
    // A restart of the same build finds everything in place and loads nothing.
    assert_eq!(accel::start(&accel.settings), AccelState::Active);
    let again = aya::programs::ProgramInfo::from_pin(dir.join(PIN_PROG_SKMSG))
        .unwrap()
        .id();
    assert_eq!(again, prog, "the restart reloaded sk_msg");
    assert_eq!(attached(), [prog]);
    assert!(accelerated_bytes(&accel, &pod, 64 << 10) >= 128 << 10);
    // The uninstall leaves none of it loaded.
    let programs = accel::pinned_program_ids(&dir);
    assert!(programs.contains(&prog), "{programs:?}");
    accel::uninstall(&accel.settings).unwrap();
    let loaded = accel::still_loaded_after(&programs, Duration::from_secs(2));
    assert!(loaded.is_empty(), "still loaded: {loaded:?}");
}

/// Before Linux 6.4 there is no tracepoint to count reads with, so no queue could be bounded:
/// acceleration stays off, says why, and leaves nothing attached.
#[test]
fn without_the_recvmsg_tracepoint_acceleration_is_unavailable_and_says_why() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let mut accel = Accel::unstarted("notp");
    accel.settings.features_off.recvmsg_tracepoint = true;
    match accel::start(&accel.settings) {
        AccelState::Unavailable { reason } => {
            assert!(reason.contains("sock_recv_length"), "{reason}")
        }
        other => panic!("acceleration is {other:?} without the tracepoint"),
    }
    assert!(
        !accel.pin_dir().join("link_sockops").exists(),
        "sock_ops left attached"
    );
}

/// Without kernel BTF the probes load from their own BTF, and accelerate.
#[test]
fn without_kernel_btf_the_probes_load_and_accelerate() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start_configured("nobtf", |s| s.features_off.btf = true);
    let pod = Pod::new("fpnobtf");
    accel.enroll(&pod, None);
    assert!(accelerated_bytes(&accel, &pod, 256 << 10) >= 512 << 10);
}
