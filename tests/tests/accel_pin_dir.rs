//! The pin directory is used only when it is fastpath's own: a real directory on bpffs, owned
//! by root, mode 0700. Before, chmod followed a symlink and uninstall removed every entry of
//! the directory, fastpath's or not.
use fastpath_installer::accel::{self, AccelState};
use fastpath_tests::accel::Accel;
use std::os::unix::fs::PermissionsExt as _;

fn reason(state: AccelState) -> String {
    match state {
        AccelState::Unavailable { reason } => reason,
        other => panic!("expected acceleration unavailable, got {other:?}"),
    }
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_pin_dir_that_is_not_fastpaths_own_is_refused_and_left_alone() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let a = Accel::unstarted("pindir");
    let scratch = a.settings.pin_dir.parent().unwrap().to_path_buf();

    // A symlink to another directory: refused, and the target is not chmod-ed.
    let elsewhere = scratch.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &a.settings.pin_dir).unwrap();
    let why = reason(accel::start(&a.settings));
    assert!(why.contains("is a symlink"), "{why}");
    assert_eq!(mode(&elsewhere), 0o755, "the symlink's target was changed");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    std::fs::remove_file(&a.settings.pin_dir).unwrap();

    // A directory with another mode: refused, named.
    std::fs::create_dir(&a.settings.pin_dir).unwrap();
    std::fs::set_permissions(&a.settings.pin_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let why = reason(accel::start(&a.settings));
    assert!(why.contains("has mode 0755, not 0700"), "{why}");
    std::fs::remove_dir(&a.settings.pin_dir).unwrap();

    // Not on bpffs.
    let tmp = std::env::temp_dir().join(fastpath_tests::unique_name("fp-pins-not-bpffs-"));
    let on_tmp = accel::AccelSettings {
        pin_dir: tmp.clone(),
        ..a.settings.clone()
    };
    let why = reason(accel::start(&on_tmp));
    assert!(why.contains("is not on bpffs"), "{why}");
    let _ = std::fs::remove_dir(&tmp);

    // fastpath's own directory: loaded. Uninstall removes fastpath's pins and leaves what is
    // not fastpath's.
    assert_eq!(accel::start(&a.settings), AccelState::Active);
    // (bpffs holds pins, directories and symlinks, no plain files.)
    let other = a.settings.pin_dir.join("someone-elses-pin");
    std::fs::create_dir(&other).unwrap();
    accel::uninstall(&a.settings).unwrap();
    let left: Vec<_> = std::fs::read_dir(&a.settings.pin_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("someone-elses-pin")]);
    std::fs::remove_dir(&other).unwrap();
}
