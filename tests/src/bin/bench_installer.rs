//! Benchmark of install-cni (not a test): start to ready with a primary present, drift to
//! repair latency over many rewrites, idle RSS. JSON summary on stdout, a table on stderr.
//!
//! Build both first, in release: `cargo build --release -p fastpath-installer -p fastpath-tests`
//! then run `target/release/bench_installer [--starts N] [--rewrites N]`. The `install-cni`
//! binary is taken from next to this one, or from `FASTPATH_INSTALL_CNI_BIN`.
//! Acceleration is off (FASTPATH_ACCELERATION=false) so the benchmark never touches the node's
//! cgroup; pass `--with-accel` to measure with the accelerator loaded (root: it attaches to the
//! root cgroup under the `cgroup-sockops` lock, pins in a scratch bpffs dir, and removes them).
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fastpath_tests::installer::{Host, PRIMARY, free_port, http_get, plugin_types};

const GOAL_READY_MS: f64 = 250.0;
const GOAL_REPAIR_P99_MS: f64 = 50.0;
const GOAL_RSS_KIB: u64 = 10 * 1024;

fn install_cni() -> PathBuf {
    if let Ok(p) = std::env::var("FASTPATH_INSTALL_CNI_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let p = exe.parent().expect("dir").join("install-cni");
    assert!(
        p.is_file(),
        "{} not built: run `cargo build --release -p fastpath-installer -p fastpath-tests`",
        p.display()
    );
    p
}

struct Running {
    child: std::process::Child,
    health_port: u16,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real plugin binary next to install-cni (so the copy is realistic), if built.
fn use_real_plugin(bin: &std::path::Path, h: &Host) -> Option<u64> {
    let plugin = bin.parent()?.join("istio-cni");
    let len = std::fs::metadata(&plugin).ok()?.len();
    std::fs::copy(&plugin, h.src.join("istio-cni")).ok()?;
    Some(len)
}

/// With acceleration: pins in a scratch bpffs directory (removed by the accelerator's uninstall).
fn accel_pin_dir(accel: bool) -> Option<PathBuf> {
    accel.then(|| PathBuf::from(format!("/sys/fs/bpf/fastpath-bench-{}", std::process::id())))
}

fn spawn(bin: &PathBuf, h: &Host, accel: bool) -> Running {
    let health_port = free_port();
    let child = Command::new(bin)
        .env_clear()
        .envs(h.env())
        .env("FASTPATH_HEALTH_PORT", health_port.to_string())
        .env("MONITORING_PORT", free_port().to_string())
        .env("FASTPATH_ACCELERATION", accel.to_string())
        .envs(accel_pin_dir(accel).map(|d| ("FASTPATH_BPF_PIN_DIR", d.display().to_string())))
        // Rewrites at benchmark speed would otherwise (rightly) be treated as a fight.
        .env("FASTPATH_FIGHT_THRESHOLD", "0")
        .env("FASTPATH_KEEP_INSTALL_ON_SHUTDOWN", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn install-cni");
    Running { child, health_port }
}

fn wait_ready(r: &mut Running) {
    let start = Instant::now();
    while !matches!(http_get(r.health_port, "/readyz"), Some((200, _))) {
        if let Ok(Some(st)) = r.child.try_wait() {
            panic!("install-cni exited: {st}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not ready after 30 s"
        );
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn has_entry(h: &Host) -> bool {
    std::fs::read_to_string(h.net_file("10-dbnet.conflist"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| plugin_types(&v).last().map(String::as_str) == Some("istio-cni"))
}

/// Pods bound to the node in the pod cache measurement: the kubelet's default `maxPods`.
const NODE_PODS: usize = 110;
const GOAL_POD_CACHE_RSS_KIB: u64 = 16 * 1024;

/// (RSS, peak, threads) of an idle agent whose pod cache holds [`NODE_PODS`] pods.
fn pod_cache_rss(bin: &PathBuf) -> (u64, u64, usize) {
    use fastpath_tests::kube_api::{FakeKubeApi, sidecar_pod};
    let h = Host::new("bench-cache");
    use_real_plugin(bin, &h);
    h.write("10-dbnet.conflist", PRIMARY);
    let api = FakeKubeApi::start(&h.root.join("api"), "bench-token").expect("fake API server");
    h.set_service_account("bench-token", &api.ca_pem);
    for i in 0..NODE_PODS * 2 {
        let node = if i % 2 == 0 {
            "bench-node"
        } else {
            "other-node"
        };
        let mut pod = sidecar_pod("bench", &format!("app-{i}"), &[], &[]);
        pod["spec"]["nodeName"] = serde_json::json!(node);
        api.set_pod(pod);
    }
    let health_port = free_port();
    let child = Command::new(bin)
        .env_clear()
        .envs(h.env())
        .env("FASTPATH_HEALTH_PORT", health_port.to_string())
        .env("MONITORING_PORT", free_port().to_string())
        .env("FASTPATH_ACCELERATION", "false")
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", api.addr.port().to_string())
        .env("NODE_NAME", "bench-node")
        .env("FASTPATH_KEEP_INSTALL_ON_SHUTDOWN", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn install-cni");
    let mut r = Running { child, health_port };
    wait_ready(&mut r);
    let start = Instant::now();
    while api.watches() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no watch after 30 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(3));
    let pid = r.child.id();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss_kib(pid, "VmRSS:"), rss_kib(pid, "VmHWM:"), threads)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let starts = arg("--starts", 30);
    let rewrites = arg("--rewrites", 200).max(100);
    let accel = args.iter().any(|a| a == "--with-accel");
    let _lock = accel.then(|| {
        fastpath_tests::ensure_bpffs();
        fastpath_tests::serial_guard("cgroup-sockops")
    });
    let bin = install_cni();

    // 1. Start to ready, with a primary present.
    let mut ready_ms = Vec::new();
    for _ in 0..starts {
        let h = Host::new("bench-start");
        use_real_plugin(&bin, &h);
        h.write("10-dbnet.conflist", PRIMARY);
        let t0 = Instant::now();
        let mut r = spawn(&bin, &h, accel);
        wait_ready(&mut r);
        ready_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        assert!(has_entry(&h), "ready without the entry in place");
    }
    ready_ms.sort_by(f64::total_cmp);

    // 2. Drift to repair: another agent replaces the primary (rename), we time until the
    //    entry is back.
    let h = Host::new("bench-repair");
    let plugin_size = use_real_plugin(&bin, &h);
    h.write("10-dbnet.conflist", PRIMARY);
    let mut r = spawn(&bin, &h, accel);
    wait_ready(&mut r);
    let mut repair_ms = Vec::new();
    for _ in 0..rewrites {
        let t0 = Instant::now();
        h.write_by_rename("10-dbnet.conflist", PRIMARY);
        while !has_entry(&h) {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no repair after 30 s"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        repair_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(10));
    }
    repair_ms.sort_by(f64::total_cmp);

    // 3. Idle RSS: after the repairs, nothing happening for a while.
    std::thread::sleep(Duration::from_secs(3));
    let pid = r.child.id();
    let rss = rss_kib(pid, "VmRSS:");
    let hwm = rss_kib(pid, "VmHWM:");
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0);
    drop(r);
    let accel_state = accel_pin_dir(accel).map(|pin_dir| {
        // The agent's own settings for this pin dir (as `install-cni uninstall` would build them).
        let pin = pin_dir.display().to_string();
        let raw = fastpath_installer::config::RawConfig::read(Vec::new(), |k| {
            (k == "FASTPATH_BPF_PIN_DIR").then(|| pin.clone())
        })
        .expect("settings");
        let settings = fastpath_installer::config::Config::build(&raw, |_| Ok(String::new()))
            .expect("settings")
            .accel;
        let report = fastpath_installer::accel::status_report(&settings).map_err(|e| e.to_string());
        if let Err(e) = fastpath_installer::accel::uninstall(&settings) {
            eprintln!(
                "removing the benchmark's pins under {}: {e:#}",
                settings.pin_dir.display()
            );
        }
        report
    });

    // 4. Idle RSS with the pod cache watching a full node: the kubelet's default maximum of
    //    110 pods bound to this node (and as many elsewhere, which the watch's selector leaves
    //    out), on the test suite's API server.
    let cache = pod_cache_rss(&bin);

    let ready_p50 = percentile(&ready_ms, 50.0);
    let ready_max = *ready_ms.last().unwrap();
    let repair_p50 = percentile(&repair_ms, 50.0);
    let repair_p99 = percentile(&repair_ms, 99.0);
    let repair_max = *repair_ms.last().unwrap();
    let binary_kib = std::fs::metadata(&bin).map(|m| m.len() / 1024).unwrap_or(0);
    let summary = serde_json::json!({
        "benchmark": "installer",
        "binary": bin.display().to_string(),
        "binary_size_kib": binary_kib,
        "acceleration": accel,
        "accel_status": accel_state.map(|r| r.unwrap_or_else(|e| e)),
        "plugin_binary_copied_kib": plugin_size.map(|s| s / 1024),
        "start_to_ready_ms": {"runs": starts, "p50": ready_p50, "p99": percentile(&ready_ms, 99.0), "max": ready_max, "goal": GOAL_READY_MS, "met": ready_p50 <= GOAL_READY_MS && ready_max <= GOAL_READY_MS},
        "drift_to_repair_ms": {"rewrites": rewrites, "p50": repair_p50, "p99": repair_p99, "max": repair_max, "goal_p99": GOAL_REPAIR_P99_MS, "met": repair_p99 <= GOAL_REPAIR_P99_MS},
        "idle_rss_kib": {"rss": rss, "peak": hwm, "threads": threads, "goal": GOAL_RSS_KIB, "met": rss <= GOAL_RSS_KIB},
        "idle_rss_with_pod_cache_kib": {"pods_on_node": NODE_PODS, "rss": cache.0, "peak": cache.1, "threads": cache.2, "goal": GOAL_POD_CACHE_RSS_KIB, "met": cache.0 <= GOAL_POD_CACHE_RSS_KIB},
    });
    println!("{}", serde_json::to_string_pretty(&summary).unwrap());
    let ok = |b: bool| if b { "met" } else { "MISSED" };
    eprintln!(
        "install-cni benchmark ({}; acceleration {})",
        bin.display(),
        if accel { "on" } else { "off" }
    );
    eprintln!(
        "{:<28} {:>10} {:>10} {:>10} {:>10}",
        "measure", "p50", "p99", "max", "goal"
    );
    eprintln!(
        "{:<28} {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>8.0}ms  {}",
        format!("start -> ready (n={starts})"),
        ready_p50,
        percentile(&ready_ms, 99.0),
        ready_max,
        GOAL_READY_MS,
        ok(ready_max <= GOAL_READY_MS)
    );
    eprintln!(
        "{:<28} {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>8.0}ms  {} (p99)",
        format!("drift -> repair (n={rewrites})"),
        repair_p50,
        repair_p99,
        repair_max,
        GOAL_REPAIR_P99_MS,
        ok(repair_p99 <= GOAL_REPAIR_P99_MS)
    );
    eprintln!(
        "{:<28} {:>8}KiB {:>10} {:>7}KiB {:>7}KiB  {} (peak = VmHWM, {} threads)",
        format!("idle RSS, pod cache ({NODE_PODS} pods)"),
        cache.0,
        "",
        cache.1,
        GOAL_POD_CACHE_RSS_KIB,
        ok(cache.0 <= GOAL_POD_CACHE_RSS_KIB),
        cache.2
    );
    eprintln!(
        "{:<28} {:>8}KiB {:>10} {:>7}KiB {:>7}KiB  {} (peak = VmHWM, {threads} threads)",
        "idle RSS",
        rss,
        "",
        hwm,
        GOAL_RSS_KIB,
        ok(rss <= GOAL_RSS_KIB)
    );
}
