//! install-cni on a full disk: the CNI conf dir, the run dir (kubeconfig) and the bin dir each
//! on a small tmpfs filled up. The agent stays up and retries at its own pace, says which file
//! it cannot write and why (`/readyz`, once in the log), never leaves a truncated or invalid
//! file (the primary config keeps its plugins, the kubeconfig its last content, no plugin
//! binary half-copied, no temp file), and repairs on its own once space is freed.
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fastpath_tests::installer::{Agent, Host, PRIMARY, other_plugins, plugin_types};
use serde_json::Value;

/// A tmpfs of `size` mounted over a directory; unmounted on drop (also when a test panics).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755")])
            .arg("fastpath-test-full")
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

const FILLER: &str = "filler.bin";

/// Fills the file system of `dir` with `dir/filler.bin` until a write fails with ENOSPC, and
/// checks that not one more byte fits.
fn fill(dir: &Path) {
    let path = dir.join(FILLER);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let chunk = [0x5au8; 4096];
    let err = loop {
        if let Err(e) = f.write_all(&chunk) {
            break e;
        }
    };
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOSPC),
        "filling {path:?}: {err}"
    );
    drop(f);
    let probe = dir.join("probe");
    let e = std::fs::write(&probe, b"x").expect_err("the file system must be full");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    let _ = std::fs::remove_file(&probe);
}

fn free(dir: &Path) {
    std::fs::remove_file(dir.join(FILLER)).unwrap();
}

/// Names in `dir` that look like a write (`<name>.tmp.<n>`).
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect()
}

/// Temp files left behind: still there 300 ms later (a retry in progress writes its own
/// temp file for a few milliseconds, then renames or removes it).
fn left_temp_files(dir: &Path) -> Vec<String> {
    let before = temp_files(dir);
    if before.is_empty() {
        return before;
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = temp_files(dir);
    before.into_iter().filter(|n| after.contains(n)).collect()
}

fn assert_no_temp_file_left(dir: &Path) {
    let left = left_temp_files(dir);
    assert!(
        left.is_empty(),
        "temp files left in {}: {left:?}",
        dir.display()
    );
}

/// CPU time (user + system) of a process so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(f.iter().sum::<u64>() * 1000 / hz)
}

fn failures(a: &Agent, result: &str) -> f64 {
    a.metric(&format!("istio_cni_installs_total{{result=\"{result}\"}}"))
        .unwrap_or(0.0)
}

/// The agent keeps failing at its own pace: at most `max` failed passes (of `result`) within
/// `window`, and it stays up. Its retries back off (0.5 s, 1 s, 2 s, ... up to 10 s); a pass
/// that wakes itself with its own temp file's events would fail hundreds of times.
fn assert_retries_back_off(a: &mut Agent, result: &str, window: Duration, max: f64) {
    let start = failures(a, result);
    let cpu = cpu_time(a.child.id());
    std::thread::sleep(window);
    let n = failures(a, result) - start;
    let cpu = cpu_time(a.child.id()) - cpu;
    eprintln!("{result}: {n} failed passes, {cpu:?} of CPU within {window:?}");
    assert!(a.is_running(), "install-cni exited:\n{}", a.log());
    assert!(
        n <= max,
        "{n} failed passes ({result}) and {cpu:?} of CPU within {window:?} on a full disk: the \
         agent retries in a loop instead of backing off; log tail:\n{}",
        tail(&a.log(), 20)
    );
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Log lines that contain `needle`.
fn log_lines(a: &Agent, needle: &str) -> usize {
    a.log().lines().filter(|l| l.contains(needle)).count()
}

/// The primary as the test (or another CNI agent) wrote it: byte for byte.
fn assert_primary_untouched(h: &Host, context: &str) {
    let text = std::fs::read_to_string(h.net_file("10-dbnet.conflist")).unwrap();
    assert_eq!(text, PRIMARY, "{context}: the primary was changed");
}

/// The primary with the istio-cni entry chained last and every other plugin as it was.
fn assert_primary_chained(h: &Host) {
    let v = h.json("10-dbnet.conflist");
    let want: Value = serde_json::from_str(PRIMARY).unwrap();
    assert_eq!(other_plugins(&v), other_plugins(&want), "{v}");
    assert_eq!(v["name"], "dbnet");
    assert_eq!(
        plugin_types(&v),
        ["bridge", "tuning", "istio-cni"],
        "one istio-cni entry, last: {v}"
    );
}

#[test]
fn full_conf_dir_at_start_is_named_retried_and_repaired_once_space_frees() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let h = Host::new("fullconf");
    let _mount = Tmpfs::mount(&h.net, "64k");
    h.write("10-dbnet.conflist", PRIMARY);
    fill(&h.net);
    let conflist = h.net_file("10-dbnet.conflist");
    let started = Instant::now();
    let mut a = Agent::start(&h, &[]);

    let (status, body) = a.wait_readyz("readyz names the full disk", |_, b| {
        b.contains("no space left")
    });
    eprintln!("full conf dir reported after {:?}", started.elapsed());
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!("cni-config: cannot write {}", conflist.display()))
            && body.contains(&format!(
                "no space left on the device of {}",
                h.net.display()
            )),
        "the reason must name the file and the full device:\n{body}"
    );
    assert_retries_back_off(
        &mut a,
        "CREATE_CNI_CONFIG_FAILURE",
        Duration::from_secs(3),
        6.0,
    );
    assert!(failures(&a, "CREATE_CNI_CONFIG_FAILURE") >= 2.0, "retried");
    assert_eq!(
        log_lines(&a, "no space left"),
        1,
        "the error is logged once, not at every retry:\n{}",
        a.log()
    );
    // Nothing written half: the primary as it was, no temp file taking the space.
    assert_primary_untouched(&h, "full conf dir");
    assert_no_temp_file_left(&h.net);
    // The parts on other file systems are in place.
    assert!(h.plugin().is_file());
    assert!(h.kubeconfig().is_file());

    // Space freed: the agent repairs on its own.
    free(&h.net);
    let freed = Instant::now();
    a.wait_ready();
    eprintln!("ready {:?} after space was freed", freed.elapsed());
    assert_primary_chained(&h);
    assert_no_temp_file_left(&h.net);
    assert!(a.is_running());
}

#[test]
fn conf_dir_filling_up_while_running_keeps_the_primary_intact_and_repairs_later() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let h = Host::new("fillconf");
    let _mount = Tmpfs::mount(&h.net, "64k");
    h.write("10-dbnet.conflist", PRIMARY);
    let mut a = Agent::start(&h, &[]);
    a.wait_ready();
    assert_primary_chained(&h);

    // Another CNI agent rewrites the primary (temp file + rename) on a disk that is full by
    // then. A second link keeps the replaced file's pages, so the rename frees no space.
    let other_tmp = h.net.join(".10-dbnet.conflist.other-agent");
    std::fs::write(&other_tmp, PRIMARY).unwrap();
    std::fs::hard_link(h.net_file("10-dbnet.conflist"), h.net.join("old.link")).unwrap();
    fill(&h.net);
    std::fs::rename(&other_tmp, h.net_file("10-dbnet.conflist")).unwrap();

    let (status, body) = a.wait_readyz("readyz names the full disk", |_, b| {
        b.contains("no space left")
    });
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&h.net_file("10-dbnet.conflist").display().to_string()),
        "{body}"
    );
    assert_retries_back_off(
        &mut a,
        "CREATE_CNI_CONFIG_FAILURE",
        Duration::from_secs(3),
        6.0,
    );
    // The other agent's file stays whole and valid; nothing half-written next to it.
    assert_primary_untouched(&h, "repair on a full disk");
    assert_no_temp_file_left(&h.net);

    free(&h.net);
    std::fs::remove_file(h.net.join("old.link")).unwrap();
    a.wait_ready();
    assert_primary_chained(&h);
    assert_no_temp_file_left(&h.net);
}

#[test]
fn full_run_dir_fails_the_kubeconfig_by_name_and_leaves_the_config_alone() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let h = Host::new("fullrun");
    let _mount = Tmpfs::mount(&h.run, "64k");
    h.write("10-dbnet.conflist", PRIMARY);
    fill(&h.run);
    let kubeconfig = h.kubeconfig();
    let mut a = Agent::start(&h, &[]);

    let (status, body) = a.wait_readyz("readyz names the full disk", |_, b| {
        b.contains("no space left")
    });
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!(
            "kubeconfig: cannot write {}",
            kubeconfig.display()
        )) && body.contains(&format!(
            "no space left on the device of {}",
            h.run.display()
        )),
        "{body}"
    );
    assert_retries_back_off(
        &mut a,
        "CREATE_KUBECONFIG_FAILURE",
        Duration::from_secs(3),
        6.0,
    );
    assert_eq!(log_lines(&a, "no space left"), 1, "{}", a.log());
    // No kubeconfig, not even an empty one, and so no config entry naming it.
    assert!(!kubeconfig.exists(), "a kubeconfig was left on a full disk");
    assert_no_temp_file_left(&h.run);
    assert_primary_untouched(&h, "full run dir");

    free(&h.run);
    a.wait_ready();
    assert_primary_chained(&h);
    let written = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(written.contains("token-0"), "{written}");

    // Full again when the token rotates: the old kubeconfig stays whole until the new one fits.
    fill(&h.run);
    h.rotate_token("token-1");
    let (status, body) = a.wait_readyz("the rewrite fails on the full disk", |_, b| {
        b.contains("no space left")
    });
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&kubeconfig.display().to_string()), "{body}");
    assert_eq!(std::fs::read_to_string(&kubeconfig).unwrap(), written);
    assert_no_temp_file_left(&h.run);
    assert_primary_chained(&h);
    free(&h.run);
    a.wait_until("the kubeconfig rewritten with the new token", |a| {
        a.is_ready()
            && std::fs::read_to_string(&kubeconfig)
                .is_ok_and(|k| k.contains("token-1") && !k.contains("token-0"))
    });
}

#[test]
fn full_bin_dir_never_leaves_a_truncated_plugin_binary() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let h = Host::new("fullbin");
    // The real plugin (several MiB) as the image's: a copy that runs out of space half-way.
    let real = fastpath_tests::bin_path("istio-cni");
    std::fs::copy(&real, h.src.join("istio-cni")).unwrap();
    let size = std::fs::metadata(&real).unwrap().len();
    let _mount = Tmpfs::mount(&h.bin, &format!("{}k", size / 1024 + 512));
    // Leaves about half the binary's size free.
    std::fs::write(
        h.bin.join(FILLER),
        vec![0u8; (size / 2) as usize + 512 * 1024],
    )
    .unwrap();
    h.write("10-dbnet.conflist", PRIMARY);
    let mut a = Agent::start(&h, &[]);

    let (status, body) = a.wait_readyz("readyz names the full disk", |_, b| {
        b.contains("no space left")
    });
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!("binary: cannot write {}", h.plugin().display())),
        "{body}"
    );
    assert_retries_back_off(&mut a, "COPY_BINARIES_FAILURE", Duration::from_secs(3), 6.0);
    assert!(!h.plugin().exists(), "a partial plugin binary was left");
    assert_no_temp_file_left(&h.bin);
    // The config never names a plugin that is not installed.
    assert_primary_untouched(&h, "full bin dir");

    free(&h.bin);
    a.wait_ready();
    assert_eq!(
        std::fs::read(h.plugin()).unwrap(),
        std::fs::read(&real).unwrap(),
        "the installed plugin is the image's, whole"
    );
    assert_primary_chained(&h);
}
