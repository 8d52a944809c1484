//! install-cni end to end: the built binary against throwaway host dirs, with real inotify
//! events. One test per behaviour.
use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fastpath_tests::installer::{Agent, Host, PRIMARY, other_plugins, plugin_types, unix_post};
use serde_json::Value;

fn primary_value() -> Value {
    serde_json::from_str(PRIMARY).unwrap()
}

fn has_entry(h: &Host, name: &str) -> bool {
    std::fs::read_to_string(h.net_file(name))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| plugin_types(&v).last().map(String::as_str) == Some("istio-cni"))
}

#[test]
fn chained_install_writes_entry_kubeconfig_and_binary() {
    let h = Host::new("chained");
    h.write("10-dbnet.conflist", PRIMARY);
    std::fs::set_permissions(
        h.net_file("10-dbnet.conflist"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let mut a = Agent::start(&h, &[]);
    a.wait_ready();

    let v = h.json("10-dbnet.conflist");
    assert_eq!(plugin_types(&v), ["bridge", "tuning", "istio-cni"]);
    assert_eq!(
        other_plugins(&v),
        other_plugins(&primary_value()),
        "primary plugins changed"
    );
    assert_eq!(v["cniVersion"], "0.4.0");
    let entry = &v["plugins"][2];
    assert_eq!(entry["cni_agent_run_dir"], h.run.display().to_string());
    assert_eq!(
        entry["exclude_namespaces"],
        serde_json::json!(["kube-system", "istio-system"])
    );
    assert_eq!(entry["pod_namespace"], "istio-system");
    assert_eq!(entry["plugin_log_level"], "debug");
    assert!(entry.get("cniVersion").is_none());
    // Go's MarshalIndent shape: sorted keys, two spaces, trailing newline.
    let text = std::fs::read_to_string(h.net_file("10-dbnet.conflist")).unwrap();
    assert!(text.starts_with("{\n  \"cniVersion\": \"0.4.0\",\n  \"name\": \"dbnet\",\n  \"plugins\": [\n    {\n      \"args\": {"), "{text}");
    assert!(text.ends_with("}\n"));
    let mode = std::fs::metadata(h.net_file("10-dbnet.conflist"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o644, "the primary's mode must be kept");

    assert_eq!(std::fs::read(h.plugin()).unwrap(), h.plugin_bytes());
    assert_eq!(
        std::fs::metadata(h.plugin()).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let kc = std::fs::read_to_string(h.kubeconfig()).unwrap();
    assert!(kc.contains("    server: https://10.96.0.1:443\n"), "{kc}");
    assert!(kc.contains("    token: token-0\n"), "{kc}");
    assert!(kc.contains("certificate-authority-data: "), "{kc}");
    assert_eq!(
        std::fs::metadata(h.kubeconfig())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(a.metric("istio_cni_install_ready"), Some(1.0));
    assert!(
        a.metric("istio_cni_installs_total{result=\"SUCCESS\"}")
            .unwrap()
            >= 1.0
    );
    // Acceleration state (off in these tests) is exported, and does not affect readiness.
    a.wait_until("accel state exported", |a| {
        a.metric("fastpath_accel_state{state=\"disabled\"}") == Some(1.0)
    });
    assert_eq!(a.metric("fastpath_accel_enabled"), Some(0.0));
    let (status, body) = a.readyz().unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("acceleration: disabled"), "{body}");
    // No temp files left anywhere.
    for d in [&h.net, &h.bin, &h.run] {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            assert!(
                !e.file_name().to_string_lossy().contains(".tmp."),
                "temp file left: {:?}",
                e.path()
            );
        }
    }
}

#[test]
fn another_process_rewrites_the_primary_and_the_entry_comes_back() {
    let h = Host::new("rewrite");
    h.write("10-dbnet.conflist", PRIMARY);
    let mut a = Agent::start(&h, &[]);
    a.wait_ready();
    // In place (truncate + write), then by rename, as different daemons do.
    let mut changed = primary_value();
    changed["plugins"][1]["sysctl"]["net.core.somaxconn"] = "1024".into();
    let changed_text = serde_json::to_string(&changed).unwrap();
    h.write("10-dbnet.conflist", &changed_text);
    a.wait_until("entry re-inserted after an in-place rewrite", |_| {
        has_entry(&h, "10-dbnet.conflist")
    });
    let v = h.json("10-dbnet.conflist");
    assert_eq!(
        other_plugins(&v),
        other_plugins(&changed),
        "the other agent's new config must be kept"
    );
    h.write_by_rename("10-dbnet.conflist", PRIMARY);
    a.wait_until("entry re-inserted after a rename", |_| {
        has_entry(&h, "10-dbnet.conflist")
    });
    assert_eq!(
        other_plugins(&h.json("10-dbnet.conflist")),
        other_plugins(&primary_value())
    );
    a.wait_until("repairs counted", |a| {
        a.metric("fastpath_cni_repairs_total{kind=\"cni_config\"}")
            .unwrap_or(0.0)
            >= 2.0
    });
    assert!(a.is_ready());
    assert_eq!(
        plugin_types(&h.json("10-dbnet.conflist"))
            .iter()
            .filter(|t| *t == "istio-cni")
            .count(),
        1
    );
    assert!(
        a.log()
            .contains("was rewritten without the istio-cni entry")
    );
}

#[test]
fn deleted_or_changed_binary_is_copied_again() {
    let h = Host::new("binary");
    h.write("10-dbnet.conflist", PRIMARY);
    let mut a = Agent::start(&h, &[]);
    a.wait_ready();
    std::fs::remove_file(h.plugin()).unwrap();
    a.wait_until("binary restored after delete", |_| {
        std::fs::read(h.plugin()).ok() == Some(h.plugin_bytes())
    });
    std::fs::write(h.plugin(), b"corrupted").unwrap();
    a.wait_until("binary restored after change", |_| {
        std::fs::read(h.plugin()).ok() == Some(h.plugin_bytes())
    });
    assert_eq!(
        std::fs::metadata(h.plugin()).unwrap().permissions().mode() & 0o777,
        0o755
    );
    a.wait_until("repairs counted", |a| {
        a.metric("fastpath_cni_repairs_total{kind=\"binary\"}")
            .unwrap_or(0.0)
            >= 2.0
    });
    assert!(a.is_ready());
}

#[test]
fn unchanged_binary_is_not_rewritten_on_restart() {
    let h = Host::new("samebin");
    h.write("10-dbnet.conflist", PRIMARY);
    let mut a = Agent::start(&h, &[("FASTPATH_KEEP_INSTALL_ON_SHUTDOWN", "true")]);
    a.wait_ready();
    assert!(a.terminate().success());
    use std::os::unix::fs::MetadataExt as _;
    let before = std::fs::metadata(h.plugin()).unwrap();
    let conf_before = std::fs::metadata(h.net_file("10-dbnet.conflist")).unwrap();
    let mut b = Agent::start(&h, &[]);
    b.wait_ready();
    let after = std::fs::metadata(h.plugin()).unwrap();
    assert_eq!(
        (before.ino(), before.mtime_nsec()),
        (after.ino(), after.mtime_nsec()),
        "binary rewritten"
    );
    let conf_after = std::fs::metadata(h.net_file("10-dbnet.conflist")).unwrap();
    assert_eq!(
        conf_before.ino(),
        conf_after.ino(),
        "an up-to-date config was rewritten"
    );
}

#[test]
fn token_rotation_rewrites_kubeconfig_and_readiness_does_not_flap() {
    let h = Host::new("token");
    h.write("10-dbnet.conflist", PRIMARY);
    let mut a = Agent::start(&h, &[]);
    a.wait_ready();
    // Watch readiness the whole time the tokens rotate.
    let stop = Arc::new(AtomicBool::new(false));
    let port = a.health_port;
    let poller = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut not_ready = Vec::new();
            let mut polls = 0;
            while !stop.load(Ordering::Relaxed) {
                match fastpath_tests::installer::http_get(port, "/readyz") {
                    Some((200, _)) => {}
                    other => not_ready.push(other),
                }
                polls += 1;
            }
            (polls, not_ready)
        })
    };
    for i in 1..=5 {
        let token = format!("token-{i}");
        h.rotate_token(&token);
        a.wait_until("kubeconfig has the new token", |_| {
            std::fs::read_to_string(h.kubeconfig())
                .is_ok_and(|k| k.contains(&format!("    token: {token}\n")))
        });
    }
    stop.store(true, Ordering::Relaxed);
    let (polls, not_ready) = poller.join().unwrap();
    assert!(polls > 0);
    assert!(
        not_ready.is_empty(),
        "readiness flapped during token rotation: {not_ready:?}"
    );
    a.wait_until("kubeconfig rewrites counted", |a| {
        a.metric("fastpath_cni_repairs_total{kind=\"kubeconfig\"}")
            .unwrap_or(0.0)
            >= 5.0
    });
}

#[test]
fn conf_primary_is_converted_to_conflist() {
    let h = Host::new("conf");
    let conf = r#"{"cniVersion": "0.3.0", "name": "mynet", "type": "bridge", "bridge": "cni0",
        "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}}"#;
    h.write("10-bridge.conf", conf);
    std::fs::set_permissions(
        h.net_file("10-bridge.conf"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let mut a = Agent::start(&h, &[]);
    a.wait_ready();
    assert!(
        !h.net_file("10-bridge.conf").exists(),
        "the .conf must be replaced by the .conflist"
    );
    let v = h.json("10-bridge.conflist");
    assert_eq!(v["cniVersion"], "0.3.1");
    assert_eq!(v["name"], "k8s-pod-network");
    let mut original: Value = serde_json::from_str(conf).unwrap();
    original.as_object_mut().unwrap().remove("cniVersion");
    assert_eq!(v["plugins"][0], original);
    assert_eq!(plugin_types(&v), ["bridge", "istio-cni"]);
    assert_eq!(
        std::fs::metadata(h.net_file("10-bridge.conflist"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o640
    );
}

#[test]
fn standalone_mode_writes_its_own_file_and_leaves_the_primary() {
    let h = Host::new("standalone");
    h.write("10-dbnet.conflist", PRIMARY);
    let mut a = Agent::start(
        &h,
        &[
            ("CHAINED_CNI_PLUGIN", "false"),
            ("FASTPATH_KEEP_INSTALL_ON_SHUTDOWN", "false"),
        ],
    );
    a.wait_ready();
    assert_eq!(
        std::fs::read_to_string(h.net_file("10-dbnet.conflist")).unwrap(),
        PRIMARY
    );
    let text = std::fs::read_to_string(h.net_file("YYY-istio-cni.conf")).unwrap();
    assert!(text.starts_with("{\n  \"cniVersion\": \"0.3.1\",\n  \"name\": \"istio-cni\",\n  \"type\": \"istio-cni\",\n  \"ipam\": {},\n  \"dns\": {},\n"), "{text}");
    assert_eq!(
        std::fs::metadata(h.net_file("YYY-istio-cni.conf"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    std::fs::remove_file(h.net_file("YYY-istio-cni.conf")).unwrap();
    a.wait_until("standalone file restored", |_| {
        h.net_file("YYY-istio-cni.conf").exists()
    });
    assert!(a.terminate().success());
    assert!(
        !h.net_file("YYY-istio-cni.conf").exists(),
        "standalone file left after SIGTERM"
    );
    assert_eq!(
        std::fs::read_to_string(h.net_file("10-dbnet.conflist")).unwrap(),
        PRIMARY
    );
}

#[test]
fn waits_not_ready_until_a_primary_appears() {
    let h = Host::new("wait");
    let mut a = Agent::start(&h, &[]);
    a.wait_until("health server up", |a| a.readyz().is_some());
    a.wait_until("waiting reported", |a| {
        a.log().contains("cannot find existing CNI network config")
    });
    let (status, body) = a.wait_readyz("readyz reason", |_, b| b.contains("no primary CNI config"));
    assert_eq!(status, 503);
    assert!(body.contains("no primary CNI config"), "{body}");
    assert_eq!(a.metric("istio_cni_install_ready"), Some(0.0));
    h.write_by_rename("10-dbnet.conflist", PRIMARY);
    a.wait_ready();
    assert!(has_entry(&h, "10-dbnet.conflist"));
}

#[test]
fn sigterm_removes_entry_then_kubeconfig_then_binary() {
    let h = Host::new("shutdown");
    h.write("10-dbnet.conflist", PRIMARY);
    let mut a = Agent::start(&h, &[("FASTPATH_KEEP_INSTALL_ON_SHUTDOWN", "false")]);
    a.wait_ready();
    let st = a.terminate();
    assert!(st.success(), "{st}; log:\n{}", a.log());
    let v = h.json("10-dbnet.conflist");
    assert_eq!(plugin_types(&v), ["bridge", "tuning"]);
    assert_eq!(other_plugins(&v), other_plugins(&primary_value()));
    assert!(!h.kubeconfig().exists());
    assert!(!h.plugin().exists());
    let log = a.log();
    let pos = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not logged:\n{log}"))
    };
    let entry = pos("removed the istio-cni entry from");
    let kc = pos(&format!("removed {}", h.kubeconfig().display()));
    let bin = pos(&format!("removed {}", h.plugin().display()));
    assert!(entry < kc && kc < bin, "wrong cleanup order:\n{log}");
}

#[test]
fn keep_install_on_shutdown_leaves_everything_for_the_next_pod() {
    let h = Host::new("keep");
    h.write("10-dbnet.conflist", PRIMARY);
    let mut a = Agent::start(&h, &[("FASTPATH_KEEP_INSTALL_ON_SHUTDOWN", "true")]);
    a.wait_ready();
    assert!(a.terminate().success());
    assert!(has_entry(&h, "10-dbnet.conflist"));
    assert!(h.kubeconfig().exists());
    assert!(h.plugin().exists());
}

#[test]
fn fight_is_detected_backed_off_and_recovers() {
    let h = Host::new("fight");
    let original = PRIMARY.replace("dbnet", "cilium");
    h.write("05-cilium.conflist", &original);
    let mut a = Agent::start(&h, &[]);
    a.wait_ready();
    // A Cilium-like agent with cni.exclusive=true: puts its own file back whenever it changes.
    let stop = Arc::new(AtomicBool::new(false));
    let fighter = {
        let (stop, path, original) = (
            stop.clone(),
            h.net_file("05-cilium.conflist"),
            original.clone(),
        );
        std::thread::spawn(move || {
            let mut rewrites = 0;
            while !stop.load(Ordering::Relaxed) {
                if std::fs::read_to_string(&path)
                    .map(|t| t != original)
                    .unwrap_or(true)
                {
                    let tmp = path.with_extension("cilium-tmp");
                    std::fs::write(&tmp, &original).unwrap();
                    std::fs::rename(&tmp, &path).unwrap();
                    rewrites += 1;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            rewrites
        })
    };
    a.wait_until("fight detected", |a| {
        a.metric("fastpath_cni_config_fights_total").unwrap_or(0.0) >= 1.0
    });
    a.wait_until("fight logged", |a| a.log().contains("Likely cause"));
    let (status, body) = a.wait_readyz("readyz reason", |_, b| {
        b.contains("another agent keeps rewriting")
    });
    assert_eq!(status, 503, "must not be ready while fighting: {body}");
    assert!(body.contains("another agent keeps rewriting"), "{body}");
    let log = a.log();
    let fight_lines: Vec<&str> = log.lines().filter(|l| l.contains("Likely cause")).collect();
    assert_eq!(fight_lines.len(), 1, "one clear line expected:\n{log}");
    assert!(
        fight_lines[0].contains("05-cilium.conflist")
            && fight_lines[0].contains("cni.exclusive=false"),
        "{}",
        fight_lines[0]
    );
    stop.store(true, Ordering::Relaxed);
    assert!(fighter.join().unwrap() >= 5);
    a.wait_ready();
    assert!(has_entry(&h, "05-cilium.conflist"));
    assert_eq!(
        other_plugins(&h.json("05-cilium.conflist")),
        other_plugins(&serde_json::from_str(&original).unwrap())
    );
}

#[test]
fn malformed_files_are_skipped_and_left_untouched() {
    let h = Host::new("bad");
    h.write("00-empty.conflist", "");
    h.write("01-invalid.conflist", "{\"name\": \"x\", \"plugins\": [");
    h.write(
        "02-notype.conf",
        r#"{"name": "x", "plugins": [{"type": "bridge"}]}"#,
    );
    h.write("03-noplugins.conflist", r#"{"name": "x", "plugins": []}"#);
    std::fs::create_dir(h.net_file("04-dir.conflist")).unwrap();
    std::os::unix::fs::symlink(h.root.join("nowhere"), h.net_file("05-dangling.conflist")).unwrap();
    let fifo = std::ffi::CString::new(h.net_file("06-fifo.conflist").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    h.write("07-array.conflist", "[1, 2]");
    h.write("README.md", "not a config");
    h.write("10-dbnet.conflist", PRIMARY);
    let snapshot = |name: &str| std::fs::read(h.net_file(name)).ok();
    let before: Vec<_> = [
        "00-empty.conflist",
        "01-invalid.conflist",
        "02-notype.conf",
        "03-noplugins.conflist",
        "07-array.conflist",
        "README.md",
    ]
    .iter()
    .map(|n| (n.to_string(), snapshot(n)))
    .collect();
    let mut a = Agent::start(&h, &[]);
    a.wait_ready();
    assert!(has_entry(&h, "10-dbnet.conflist"));
    assert_eq!(
        other_plugins(&h.json("10-dbnet.conflist")),
        other_plugins(&primary_value())
    );
    for (n, content) in before {
        assert_eq!(snapshot(&n), content, "{n} was changed");
    }
    assert!(h.net_file("04-dir.conflist").is_dir());
    assert!(
        std::fs::symlink_metadata(h.net_file("05-dangling.conflist"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let log = a.log();
    for n in [
        "00-empty.conflist",
        "01-invalid.conflist",
        "02-notype.conf",
        "06-fifo.conflist",
    ] {
        assert!(
            log.contains(&format!("skipping {}", h.net_file(n).display())),
            "{n} not reported:\n{log}"
        );
    }
}

#[test]
fn symlinked_primary_is_reported_not_replaced() {
    let h = Host::new("symlink");
    let real = h.root.join("real.conflist");
    std::fs::write(&real, PRIMARY).unwrap();
    std::os::unix::fs::symlink(&real, h.net_file("10-dbnet.conflist")).unwrap();
    let mut a = Agent::start(&h, &[]);
    a.wait_until("symlink reported", |a| a.log().contains("is a symlink"));
    let (status, body) = a.wait_readyz("readyz reason", |_, b| b.contains("symlink"));
    assert_eq!(status, 503);
    assert!(body.contains("symlink"), "{body}");
    assert!(
        std::fs::symlink_metadata(h.net_file("10-dbnet.conflist"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read_to_string(&real).unwrap(), PRIMARY);
    assert!(a.is_running());
}

#[test]
fn plugin_log_lines_appear_with_the_pod_name() {
    let h = Host::new("logsock");
    h.write("10-dbnet.conflist", PRIMARY);
    let mut a = Agent::start(&h, &[]);
    a.wait_ready();
    let lines = vec![
        r#"{"level":"info","time":"2026-11-26T00:00:00.000000Z","msg":"set up redirection","pod":"shop/web-7f9c","containerID":"abc"}"#,
        r#"{"level":"debug","time":"2026-11-26T00:00:00.100000Z","msg":"iptables-restore ok","pod":"shop/web-7f9c"}"#,
    ];
    let body = serde_json::to_vec(&lines).unwrap();
    let status = unix_post(&h.run.join("log.sock"), "/log", &body).unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        unix_post(&h.run.join("log.sock"), "/log", b"not json").unwrap(),
        400
    );
    a.wait_until("plugin lines logged", |a| {
        a.log().contains("iptables-restore ok")
    });
    let log = a.log();
    let line = log
        .lines()
        .find(|l| l.contains("set up redirection"))
        .unwrap();
    assert!(
        line.contains("\tcni-plugin\t") && line.contains("pod=shop/web-7f9c"),
        "{line}"
    );
    let mode = std::fs::metadata(h.run.join("log.sock"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "log.sock is root-only");
    assert!(a.metric("fastpath_plugin_log_lines_total").unwrap() >= 2.0);
}

#[test]
fn json_logs_and_scope_levels() {
    let h = Host::new("jsonlog");
    h.write("10-dbnet.conflist", PRIMARY);
    let mut a = Agent::start_with_args(
        &h,
        &[],
        &[
            "--log_as_json",
            "--log_output_level=cni-agent:info,cni-plugin:warn",
        ],
    );
    a.wait_ready();
    let body = serde_json::to_vec(&vec![
        r#"{"level":"info","msg":"hidden at warn","pod":"a/b"}"#,
        r#"{"level":"warn","msg":"shown at warn","pod":"a/b"}"#,
    ])
    .unwrap();
    assert_eq!(
        unix_post(&h.run.join("log.sock"), "/log", &body).unwrap(),
        200
    );
    a.wait_until("warn line logged", |a| a.log().contains("shown at warn"));
    let log = a.log();
    assert!(!log.contains("hidden at warn"));
    for l in log.lines() {
        let v: Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
        assert!(
            v["time"].is_string() && v["level"].is_string() && v["msg"].is_string(),
            "{l}"
        );
    }
    let entry = h.json("10-dbnet.conflist")["plugins"][2].clone();
    assert_eq!(entry["plugin_log_level"], "warn");
}

#[test]
fn network_config_template_is_used() {
    let h = Host::new("template");
    h.write("10-dbnet.conflist", PRIMARY);
    let template = r#"{"cniVersion": "0.3.1", "name": "istio-cni", "type": "istio-cni",
        "log_level": "__LOG_LEVEL__", "kubernetes": {"kubeconfig": "__KUBECONFIG_FILEPATH__",
        "exclude_namespaces": [ "__EXCLUDE_NAMESPACES__" ]},
        "cni_agent_run_dir": {{ cni_agent_run_dir | json_encode }}, "custom": "{{ pod_namespace }}-x"}"#;
    let mut a = Agent::start(
        &h,
        &[("CNI_NETWORK_CONFIG", template), ("LOG_LEVEL", "error")],
    );
    a.wait_ready();
    let entry = h.json("10-dbnet.conflist")["plugins"][2].clone();
    assert_eq!(entry["log_level"], "error");
    assert_eq!(
        entry["kubernetes"]["kubeconfig"],
        h.kubeconfig().display().to_string()
    );
    assert_eq!(
        entry["kubernetes"]["exclude_namespaces"],
        serde_json::json!(["kube-system", "istio-system"])
    );
    assert_eq!(entry["custom"], "istio-system-x");
    assert_eq!(entry["cni_agent_run_dir"], h.run.display().to_string());
}

#[test]
fn bad_values_stop_startup_with_one_message() {
    let h = Host::new("badvalue");
    for (k, v, expect) in [
        (
            "CHAINED_CNI_PLUGIN",
            "maybe",
            "invalid CHAINED_CNI_PLUGIN=\"maybe\"",
        ),
        ("KUBECONFIG_MODE", "rw", "invalid KUBECONFIG_MODE=\"rw\""),
        ("CNI_NETWORK_CONFIG", "{{ nope", "CNI_NETWORK_CONFIG"),
        (
            "FASTPATH_HEALTH_PORT",
            "70000",
            "invalid FASTPATH_HEALTH_PORT=\"70000\"",
        ),
    ] {
        let out = std::process::Command::new(fastpath_tests::bin_path("install-cni"))
            .env_clear()
            .envs(h.env())
            .env(k, v)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{k}={v} accepted");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(text.contains(expect), "{k}={v}: {text}");
        if k != "CNI_NETWORK_CONFIG" {
            assert_eq!(lines.len(), 1, "{k}={v}: one message expected:\n{text}");
        }
    }
    let out = std::process::Command::new(fastpath_tests::bin_path("install-cni"))
        .env_clear()
        .envs(h.env())
        .arg("--monitoring-port=x")
        .env("MONITORING_PORT", "15014")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("invalid --monitoring-port=\"x\""),
        "{err}"
    );
}

#[test]
fn uninstall_and_accel_status_commands() {
    let h = Host::new("uninstall");
    h.write("10-dbnet.conflist", PRIMARY);
    let mut a = Agent::start(&h, &[]);
    a.wait_ready();
    // kill -9: nothing cleaned up, as after a crash.
    a.signal(libc::SIGKILL);
    let _ = a.child.wait();
    assert!(has_entry(&h, "10-dbnet.conflist") && h.plugin().exists() && h.kubeconfig().exists());
    let run = |cmd: &str| {
        std::process::Command::new(fastpath_tests::bin_path("install-cni"))
            .env_clear()
            .envs(h.env())
            .arg(cmd)
            .output()
            .unwrap()
    };
    let out = run("accel-status");
    assert!(out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    let out = run("uninstall");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        plugin_types(&h.json("10-dbnet.conflist")),
        ["bridge", "tuning"]
    );
    assert!(!h.plugin().exists());
    assert!(!h.kubeconfig().exists());
}

#[test]
fn own_writes_cause_no_further_writes() {
    use std::os::unix::fs::MetadataExt as _;
    let h = Host::new("ownwrites");
    h.write("10-dbnet.conflist", PRIMARY);
    let mut a = Agent::start(&h, &[]);
    a.wait_ready();
    let stamp = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.ino(), m.mtime_nsec())
    };
    let before = [
        stamp(&h.net_file("10-dbnet.conflist")),
        stamp(&h.kubeconfig()),
        stamp(&h.plugin()),
    ];
    let passes = a.metric("fastpath_cni_reconciles_total").unwrap();
    // Let every event of the agent's own writes (and reads) arrive and be handled. A feedback
    // loop would make hundreds of passes here; the last install's events may make a few.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let after = [
        stamp(&h.net_file("10-dbnet.conflist")),
        stamp(&h.kubeconfig()),
        stamp(&h.plugin()),
    ];
    assert_eq!(
        before, after,
        "the agent rewrote a file nobody else touched"
    );
    let passes_after = a.metric("fastpath_cni_reconciles_total").unwrap();
    assert!(
        passes_after - passes <= 3.0,
        "the agent keeps reacting to itself: {passes} -> {passes_after} passes"
    );
    // An unrelated file in the conf dir: a pass, but no write.
    h.write("README", "unrelated");
    a.wait_until("the unrelated event handled", |a| {
        a.metric("fastpath_cni_reconciles_total").unwrap() > passes_after
    });
    assert_eq!(stamp(&h.net_file("10-dbnet.conflist")), before[0]);
    assert!(a.is_ready());
}

#[test]
fn entry_follows_a_new_higher_priority_primary() {
    let h = Host::new("moves");
    h.write("20-second.conflist", &PRIMARY.replace("dbnet", "second"));
    let mut a = Agent::start(&h, &[]);
    a.wait_ready();
    assert!(has_entry(&h, "20-second.conflist"));
    h.write_by_rename("10-first.conflist", &PRIMARY.replace("dbnet", "first"));
    a.wait_until("entry moved to the new primary", |_| {
        has_entry(&h, "10-first.conflist") && !has_entry(&h, "20-second.conflist")
    });
    assert_eq!(
        plugin_types(&h.json("20-second.conflist")),
        ["bridge", "tuning"]
    );
    assert!(a.is_ready());
}

#[test]
fn cni_conf_name_pins_the_file() {
    let h = Host::new("confname");
    h.write("10-first.conflist", &PRIMARY.replace("dbnet", "first"));
    h.write(
        "20-chosen.conf",
        r#"{"cniVersion": "0.3.1", "name": "chosen", "type": "bridge"}"#,
    );
    // Named as .conflist while only the .conf exists: the sibling is used (as Istio does).
    let mut a = Agent::start(&h, &[("CNI_CONF_NAME", "20-chosen.conflist")]);
    a.wait_ready();
    assert!(has_entry(&h, "20-chosen.conflist"));
    assert!(!h.net_file("20-chosen.conf").exists());
    assert_eq!(
        std::fs::read_to_string(h.net_file("10-first.conflist")).unwrap(),
        PRIMARY.replace("dbnet", "first")
    );
}

#[test]
fn conf_dir_replaced_is_watched_again() {
    let h = Host::new("dirswap");
    h.write("10-dbnet.conflist", PRIMARY);
    let mut a = Agent::start(&h, &[]);
    a.wait_ready();
    std::fs::remove_dir_all(&h.net).unwrap();
    std::fs::create_dir(&h.net).unwrap();
    h.write_by_rename("10-dbnet.conflist", PRIMARY);
    a.wait_until("entry inserted into the new directory", |_| {
        has_entry(&h, "10-dbnet.conflist")
    });
    a.wait_ready();
    // The new directory is watched: a rewrite there is repaired too.
    h.write_by_rename("10-dbnet.conflist", PRIMARY);
    a.wait_until("entry re-inserted", |_| has_entry(&h, "10-dbnet.conflist"));
    assert_eq!(
        other_plugins(&h.json("10-dbnet.conflist")),
        other_plugins(&primary_value())
    );
}

#[test]
fn metrics_port_zero_disables_metrics() {
    let h = Host::new("nometrics");
    h.write("10-dbnet.conflist", PRIMARY);
    let mut a = Agent::start(&h, &[("MONITORING_PORT", "0")]);
    a.wait_ready();
    assert!(a.log().contains("monitoring_port=disabled"));
    assert!(a.metrics().is_empty());
}

/// Istio's chart without `/host/proc` (`repair.repairPods=false`) and a runtime that gives the
/// pod a cgroup namespace of its own: the cgroup mount the agent sees is its own subtree, and
/// sock_ops attached there would accelerate nothing but the agent. Acceleration must be
/// unavailable, and say which mount is missing; redirection goes on.
#[test]
fn in_its_own_cgroup_namespace_without_the_host_procfs_acceleration_is_unavailable_and_says_why() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    assert!(
        !std::path::Path::new("/host/proc").exists(),
        "this test needs a machine without /host/proc"
    );
    let h = Host::new("cgroupns");
    h.write("10-dbnet.conflist", PRIMARY);
    let mut a = Agent::start_under(
        &h,
        &[("FASTPATH_ACCELERATION", "true")],
        &[],
        &["unshare", "--cgroup", "--"],
    );
    a.wait_ready();
    a.wait_until("acceleration decided", |a| {
        a.metric("fastpath_accel_state{state=\"unavailable\"}") == Some(1.0)
    });
    assert_eq!(a.metric("fastpath_accel_enabled"), Some(0.0));
    let (_, body) = a.readyz().expect("readyz");
    assert!(
        body.contains("/host/proc is not mounted"),
        "readyz does not name the missing mount: {body}"
    );
    assert!(
        a.log().contains("/host/proc is not mounted"),
        "log:\n{}",
        a.log()
    );
    assert!(has_entry(&h, "10-dbnet.conflist"), "redirection installed");
}
