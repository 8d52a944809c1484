//! install-cni under hostile conditions: `kill -9` at random moments, read-only host dirs.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fastpath_tests::installer::{Agent, Host, PRIMARY, XorShift, other_plugins, plugin_types};
use serde_json::Value;

/// Spins for `micros` (sleep is too coarse to land inside a few-millisecond install).
fn spin(micros: u64) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_micros(micros) {
        std::hint::spin_loop();
    }
}

const CONF_PRIMARY: &str = r#"{"cniVersion": "0.3.0", "name": "mynet", "type": "bridge", "bridge": "cni0",
    "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}}"#;

/// The conf dir holds only valid JSON and the primary's plugins, whatever moment we died at.
fn assert_primary_intact(h: &Host, conf_kind: bool, context: &str) {
    let files = h.conf_files(); // panics on invalid JSON
    if conf_kind {
        let mut original: Value = serde_json::from_str(CONF_PRIMARY).unwrap();
        let conf = files.iter().find(|(n, _)| n == "10-bridge.conf");
        let list = files.iter().find(|(n, _)| n == "10-bridge.conflist");
        match (conf, list) {
            (Some((_, v)), _) => assert_eq!(v, &original, "{context}: .conf changed"),
            (None, Some((_, v))) => {
                original.as_object_mut().unwrap().remove("cniVersion");
                assert_eq!(
                    other_plugins(v),
                    vec![original],
                    "{context}: primary plugin lost"
                );
            }
            (None, None) => panic!("{context}: the primary is gone: {files:?}"),
        }
    } else {
        let (_, v) = files
            .iter()
            .find(|(n, _)| n == "10-dbnet.conflist")
            .unwrap_or_else(|| panic!("{context}: primary gone"));
        let want: Value = serde_json::from_str(PRIMARY).unwrap();
        assert_eq!(
            other_plugins(v),
            other_plugins(&want),
            "{context}: primary plugins changed"
        );
        assert_eq!(v["name"], "dbnet");
    }
}

#[test]
fn kill_9_at_random_moments_never_leaves_a_broken_config() {
    // KILL9_SEED=<seed> replays a failed run.
    let seed = std::env::var("KILL9_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1;
    eprintln!("kill -9 test seed {seed} (KILL9_SEED={seed} replays it)");
    let mut rng = XorShift(seed);
    // 100 rounds of two kills: 200 trials.
    for round in 0..100 {
        let conf_kind = round % 3 == 2;
        let h = Host::new("kill9");
        if conf_kind {
            h.write("10-bridge.conf", CONF_PRIMARY);
        } else {
            h.write("10-dbnet.conflist", PRIMARY);
        }
        // Die somewhere in the first install (process start to ready takes a few ms).
        let mut a = Agent::start(&h, &[]);
        spin(rng.below(15_000));
        a.signal(libc::SIGKILL);
        let _ = a.child.wait();
        let context = format!("seed {seed} round {round} (first install)");
        assert_primary_intact(&h, conf_kind, &context);

        // A restart repairs whatever was left, then die in the middle of a drift repair.
        let mut b = Agent::start(&h, &[]);
        b.wait_ready();
        let name = if conf_kind {
            "10-bridge.conflist"
        } else {
            "10-dbnet.conflist"
        };
        let v = h.json(name);
        for d in [&h.net, &h.bin, &h.run] {
            for e in std::fs::read_dir(d).unwrap().flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                assert!(
                    !n.contains(".tmp."),
                    "{context}: stale temp file {n} left after restart"
                );
            }
        }
        assert_eq!(
            plugin_types(&v)
                .iter()
                .filter(|t| *t == "istio-cni")
                .count(),
            1,
            "{context}: {v}"
        );
        if conf_kind {
            h.write_by_rename("10-bridge.conf", CONF_PRIMARY);
        } else {
            h.write_by_rename("10-dbnet.conflist", PRIMARY);
        }
        spin(rng.below(3_000));
        b.signal(libc::SIGKILL);
        let _ = b.child.wait();
        assert_primary_intact(
            &h,
            conf_kind,
            &format!("seed {seed} round {round} (repair)"),
        );
    }
}

/// A directory bind-mounted read-only over itself; made writable again and unmounted on drop.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn new(dir: &Path) -> Self {
        let run = |args: &[&str]| {
            let st = std::process::Command::new("mount")
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "mount {args:?}");
        };
        let d = dir.to_str().unwrap();
        run(&["--bind", d, d]);
        let guard = ReadOnly(dir.to_path_buf());
        run(&["-o", "remount,ro,bind", d]);
        guard
    }

    fn set_writable(&self, writable: bool) {
        let opt = if writable {
            "remount,rw,bind"
        } else {
            "remount,ro,bind"
        };
        let st = std::process::Command::new("mount")
            .args(["-o", opt, self.0.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn read_only_conf_dir_is_a_clear_error_not_a_crash_loop() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let h = Host::new("rodir");
    h.write("10-dbnet.conflist", PRIMARY);
    let ro = ReadOnly::new(&h.net);
    let mut a = Agent::start(&h, &[("FASTPATH_KEEP_INSTALL_ON_SHUTDOWN", "false")]);
    a.wait_until("read-only reported", |a| {
        a.log().contains("read-only file system")
    });
    let (status, body) = a.wait_readyz("readyz reason", |_, b| b.contains("read-only"));
    assert_eq!(status, 503);
    assert!(body.contains("read-only"), "{body}");
    assert!(a.is_running(), "the agent must stay up (no crash loop)");
    assert!(
        a.metric("istio_cni_installs_total{result=\"CREATE_CNI_CONFIG_FAILURE\"}")
            .unwrap()
            >= 1.0
    );
    assert_eq!(
        std::fs::read_to_string(h.net_file("10-dbnet.conflist")).unwrap(),
        PRIMARY
    );

    // Writable again: the agent retries on its own and becomes ready.
    ro.set_writable(true);
    a.wait_ready();
    assert_eq!(
        plugin_types(&h.json("10-dbnet.conflist")).last().unwrap(),
        "istio-cni"
    );

    // Read-only at shutdown: the entry cannot be removed, so the binary must stay.
    ro.set_writable(false);
    let st = a.terminate();
    assert!(!st.success(), "an incomplete cleanup must not exit 0");
    assert_eq!(
        plugin_types(&h.json("10-dbnet.conflist")).last().unwrap(),
        "istio-cni"
    );
    assert!(
        h.plugin().exists(),
        "binary removed while a config still names it:\n{}",
        a.log()
    );
    assert!(a.log().contains("kept the plugin binary"));
}

#[test]
fn read_only_bin_dir_is_reported_and_retried() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let h = Host::new("robin");
    h.write("10-dbnet.conflist", PRIMARY);
    let ro = ReadOnly::new(&h.bin);
    let mut a = Agent::start(&h, &[]);
    a.wait_until("copy failure counted", |a| {
        a.metric("istio_cni_installs_total{result=\"COPY_BINARIES_FAILURE\"}")
            .unwrap_or(0.0)
            >= 1.0
    });
    let (status, body) = a.wait_readyz("readyz reason", |_, b| {
        b.contains("binary") && b.contains("read-only")
    });
    assert_eq!(status, 503);
    assert!(
        body.contains("binary") && body.contains("read-only"),
        "{body}"
    );
    // The config must not name a plugin that is not installed.
    assert_eq!(
        std::fs::read_to_string(h.net_file("10-dbnet.conflist")).unwrap(),
        PRIMARY
    );
    ro.set_writable(true);
    a.wait_ready();
    assert!(h.plugin().exists());
}
