//! `bench_plugin_add [--runs N]`: ADD latency of the built `istio-cni`, invoked as a runtime
//! invokes it (fresh process, config on stdin, a fresh pod netns per run), against the test
//! suite's HTTPS API server on loopback. Needs root.
//!
//! Cases: a pod outside the mesh (API lookup, pass-through), a pod in an excluded namespace (no
//! lookup), a mesh pod with the nft and with the legacy iptables backend, and the reference
//! `tuning` plugin's ADD as a yardstick. For mesh pods the plugin's own time is the wall time of
//! the invocation minus the `iptables-restore` child and the API call (both reported by the
//! plugin in its log line).
//!
//! As on a node, each ADD has a container id of its own and the run dir, where the plugin writes
//! its pod records, is on tmpfs.
//!
//! `--only CASE` (repeatable) runs just the named cases (the keys of the summary, e.g.
//! `non_mesh_cached`, `mesh_native_nftables_cached`), e.g. to profile one case through an
//! `$ISTIO_CNI_BIN` wrapper.
//!
//! Prints a JSON summary on stdout and a table on stderr. The binary used is
//! `target/<profile>/istio-cni` (build it first: `cargo build --release -p fastpath-cni-plugin`),
//! or `$ISTIO_CNI_BIN`.
use anyhow::{Context as _, Result, bail};
use fastpath_tests::kube_api::{FakeKubeApi, Trust, plain_pod, sidecar_pod};
use serde_json::{Value, json};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const TOKEN: &str = "bench-token";
/// The node the bench pods are bound to (the pod cache watches its pods).
const BENCH_NODE: &str = "bench-node";

/// Istio's rules for a default sidecar pod (`cni/pkg/plugin/testdata/basic.txt.golden`).
const ISTIO_DEFAULT_RULES: &str = include_str!("../../../testdata/istio/basic.txt.golden");

struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
    min: f64,
    max: f64,
}

fn stats(samples: &[f64]) -> Stats {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| s[((s.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        p50: pick(0.50),
        p99: pick(0.99),
        mean: s.iter().sum::<f64>() / s.len() as f64,
        min: s[0],
        max: s[s.len() - 1],
    }
}

fn stats_json(samples: &[f64]) -> Value {
    if samples.is_empty() {
        return Value::Null;
    }
    let s = stats(samples);
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({"p50_ms": r(s.p50), "p99_ms": r(s.p99), "mean_ms": r(s.mean), "min_ms": r(s.min), "max_ms": r(s.max), "runs": samples.len()})
}

struct Netns(String);

impl Netns {
    fn new(name: &str) -> Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let st = Command::new("ip").args(["netns", "add", name]).status()?;
        if !st.success() {
            bail!("ip netns add {name} failed");
        }
        Ok(Self(name.to_string()))
    }
    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

struct Invocation {
    wall_ms: f64,
    stdout: String,
    /// The plugin's final JSON log line (stderr), if any.
    log: Option<Value>,
}

/// Each ADD gets a container id of its own, as each sandbox does: reusing one would make every
/// ADD after the first replace the previous pod record, which a node never does.
fn next_container_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("benchcid{n}")
}

fn invoke(bin: &Path, conf: &Value, netns: &str, args: &str) -> Result<Invocation> {
    let stdin = serde_json::to_vec(conf)?;
    let cid = next_container_id();
    let args = format!("{args};K8S_POD_INFRA_CONTAINER_ID={cid}");
    let start = Instant::now();
    let mut child = Command::new(bin)
        .env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        )
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", &cid)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env("CNI_ARGS", &args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    child.stdin.take().unwrap().write_all(&stdin)?;
    let out = child.wait_with_output()?;
    let wall_ms = start.elapsed().as_secs_f64() * 1000.0;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{} ADD failed: {stdout} {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let log = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| {
            l["msg"] == "sidecar redirection applied" || l["msg"] == "no redirection for pod"
        });
    Ok(Invocation {
        wall_ms,
        stdout,
        log,
    })
}

fn main() -> Result<()> {
    let mut runs = 200usize;
    let mut only: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().context("--runs N")?.parse()?,
            "--only" => only.push(args.next().context("--only CASE")?),
            other => bail!(
                "unknown argument {other:?} (usage: bench_plugin_add [--runs N] [--only CASE]...)"
            ),
        }
    }
    let want = |case: &str| only.is_empty() || only.iter().any(|o| o == case);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench_plugin_add needs root (netns, iptables)");
    }
    let bin = match std::env::var_os("ISTIO_CNI_BIN") {
        Some(p) => PathBuf::from(p),
        // next to this binary: target/<profile>/istio-cni
        None => std::env::current_exe()?
            .parent()
            .context("exe dir")?
            .join("istio-cni"),
    };
    let tag = fastpath_tests::unique_name("fpb");
    let dir = std::env::temp_dir().join(format!("fastpath-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("run"))?;
    struct DirGuard(PathBuf);
    impl Drop for DirGuard {
        fn drop(&mut self) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.0.join("run"))
                .status();
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _guard = DirGuard(dir.clone());
    // The run dir (`/var/run/istio-cni` on a node) is on tmpfs there, as `/run` is on systemd
    // hosts; the pod records the plugin writes into it must not be timed on this VM's disk.
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m,mode=0755", "fastpath-bench"])
        .arg(dir.join("run"))
        .status()?;
    if !mounted.success() {
        bail!("mount tmpfs on {}: {mounted}", dir.join("run").display());
    }
    let api = FakeKubeApi::start(&dir.join("api"), TOKEN)?;
    api.write_kubeconfig(&dir.join("run/istio-cni-kubeconfig"), Trust::Ca, TOKEN)?;
    api.set_pod(plain_pod("bench", "plain-0"));
    api.set_pod(sidecar_pod("bench", "mesh-0", &[], &[]));

    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/var/run/netns/x"}],
        "ips": [{"interface": 0, "address": "10.248.250.2/24", "gateway": "10.248.250.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    });
    let conf = |backend: &str| {
        json!({
            "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni",
            "ipam": {}, "dns": {}, "plugin_log_level": "info",
            "cni_agent_run_dir": dir.join("run"),
            "ambient_enabled": false, "enablement_selectors": [],
            "exclude_namespaces": ["kube-system"], "pod_namespace": "istio-system",
            "native_nftables": false, "enable_ambient_detection_retry": false,
            "fastpath_iptables_backend": backend,
            "prevResult": prev
        })
    };
    let args = |ns: &str, name: &str| {
        format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID=uid-{name}")
    };

    let mut summary = serde_json::Map::new();
    // Pods outside the mesh: one netns is enough (nothing is written into it).
    let ns = Netns::new(&format!("{tag}n"))?;
    for (case, pod_ns, name) in [
        ("non_mesh", "bench", "plain-0"),
        ("excluded_namespace", "kube-system", "dns-0"),
    ] {
        if !want(case) {
            continue;
        }
        let mut wall = Vec::new();
        let mut api_ms = Vec::new();
        let mut own = Vec::new();
        for _ in 0..runs {
            let inv = invoke(&bin, &conf("auto"), &ns.path(), &args(pod_ns, name))?;
            if serde_json::from_str::<Value>(inv.stdout.trim())? != prev {
                bail!("{case}: prevResult not passed through: {}", inv.stdout);
            }
            wall.push(inv.wall_ms);
            let a = inv
                .log
                .as_ref()
                .and_then(|l| l["api_ms"].as_f64())
                .context("pass-through ADD printed no api_ms")?;
            api_ms.push(a);
            own.push(inv.wall_ms - a);
        }
        summary.insert(
            case.into(),
            json!({"total": stats_json(&wall), "api_call": stats_json(&api_ms), "plugin_own": stats_json(&own)}),
        );
    }
    drop(ns);

    for backend in ["nft", "legacy"] {
        if !want(&format!("mesh_{backend}")) {
            continue;
        }
        let mut wall = Vec::new();
        let mut restore = Vec::new();
        let mut api_ms = Vec::new();
        let mut own = Vec::new();
        for i in 0..runs {
            let ns = Netns::new(&format!("{tag}m{i}"))?;
            let inv = invoke(&bin, &conf(backend), &ns.path(), &args("bench", "mesh-0"))?;
            let log = inv
                .log
                .context("mesh ADD printed no 'sidecar redirection applied' line")?;
            if log["backend"] != backend {
                bail!("asked for {backend}, plugin used {}", log["backend"]);
            }
            let r = log["restore_v4_ms"].as_f64().context("restore_v4_ms")?;
            let a = log["api_ms"].as_f64().context("api_ms")?;
            wall.push(inv.wall_ms);
            restore.push(r);
            api_ms.push(a);
            own.push(inv.wall_ms - r - a);
        }
        summary.insert(
            format!("mesh_{backend}"),
            json!({
                "total": stats_json(&wall),
                "iptables_restore": stats_json(&restore),
                "api_call": stats_json(&api_ms),
                "plugin_own": stats_json(&own),
            }),
        );
    }

    // The restore alone, without the plugin: `iptables-<v>-restore --noflush` of Istio's default
    // rules, forked straight into a fresh netns (no sandbox), per backend.
    for backend in ["nft", "legacy"] {
        if !want(&format!("restore_direct_{backend}")) {
            continue;
        }
        let mut wall = Vec::new();
        for i in 0..runs {
            let ns = Netns::new(&format!("{tag}r{i}"))?;
            let f = std::fs::File::open(ns.path())?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
            let mut cmd = Command::new(format!("iptables-{backend}-restore"));
            cmd.arg("--noflush")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            // SAFETY: setns between fork and exec on an fd we hold open.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let start = Instant::now();
            let mut child = cmd.spawn()?;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(ISTIO_DEFAULT_RULES.as_bytes())?;
            let out = child.wait_with_output()?;
            wall.push(start.elapsed().as_secs_f64() * 1000.0);
            if !out.status.success() {
                bail!(
                    "iptables-{backend}-restore: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        summary.insert(
            format!("restore_direct_{backend}"),
            json!({"total": stats_json(&wall)}),
        );
    }

    // Native nftables (`native_nftables: true`): the rules in one netlink batch, no child
    // process. Own time is the wall time less the pod lookup.
    let mesh_case = |summary: &mut serde_json::Map<String, Value>,
                     case: &str,
                     conf: &Value,
                     tag_suffix: &str|
     -> Result<()> {
        if !want(case) {
            return Ok(());
        }
        let (mut wall, mut lookup, mut own) = (Vec::new(), Vec::new(), Vec::new());
        let gets_before = api.pod_gets("bench", "mesh-0");
        for i in 0..runs {
            let ns = Netns::new(&format!("{tag}{tag_suffix}{i}"))?;
            let inv = invoke(&bin, conf, &ns.path(), &args("bench", "mesh-0"))?;
            let log = inv
                .log
                .with_context(|| format!("{case}: no 'sidecar redirection applied' line"))?;
            let a = log["api_ms"].as_f64().context("api_ms")?;
            wall.push(inv.wall_ms);
            lookup.push(a);
            own.push(inv.wall_ms - a);
        }
        let gets = (api.pod_gets("bench", "mesh-0") - gets_before) as f64 / runs as f64;
        summary.insert(
            case.into(),
            json!({"total": stats_json(&wall), "pod_lookup": stats_json(&lookup),
                   "plugin_own": stats_json(&own), "api_gets_per_add": gets}),
        );
        Ok(())
    };
    let mut nftables_conf = conf("auto");
    nftables_conf["native_nftables"] = json!(true);
    mesh_case(&mut summary, "mesh_native_nftables", &nftables_conf, "f")?;

    // The node's pod cache, as install-cni runs it (its watch on the API server, its socket in
    // the run dir): the same ADDs again, the pod from the cache.
    for mut pod in [
        plain_pod("bench", "plain-0"),
        sidecar_pod("bench", "mesh-0", &[], &[]),
    ] {
        pod["spec"]["nodeName"] = json!(BENCH_NODE);
        api.set_pod(pod);
    }
    std::fs::write(dir.join("token"), TOKEN)?;
    let socket = fastpath_cni_plugin::pod_cache::socket_path(&dir.join("run"));
    let cache =
        fastpath_installer::pod_cache::start(&fastpath_installer::pod_cache::PodCacheSettings {
            api: fastpath_installer::pod_watch::ApiSettings {
                server: api.url(),
                ca_pem: Some(api.ca_pem.clone().into_bytes()),
                token_file: dir.join("token"),
            },
            node_name: BENCH_NODE.into(),
            socket,
        })
        .map_err(anyhow::Error::msg)?;
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while cache.pod("bench", "mesh-0").is_none() || cache.pod("bench", "plain-0").is_none() {
        if Instant::now() > deadline {
            bail!("the pod cache did not get the bench pods");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    if want("non_mesh_cached") {
        let ns = Netns::new(&format!("{tag}c"))?;
        let (mut wall, mut lookup, mut own) = (Vec::new(), Vec::new(), Vec::new());
        let gets_before = api.pod_gets("bench", "plain-0");
        for _ in 0..runs {
            let inv = invoke(&bin, &conf("auto"), &ns.path(), &args("bench", "plain-0"))?;
            let a = inv
                .log
                .as_ref()
                .and_then(|l| l["api_ms"].as_f64())
                .context("pass-through ADD printed no api_ms")?;
            wall.push(inv.wall_ms);
            lookup.push(a);
            own.push(inv.wall_ms - a);
        }
        let gets = (api.pod_gets("bench", "plain-0") - gets_before) as f64 / runs as f64;
        summary.insert(
            "non_mesh_cached".into(),
            json!({"total": stats_json(&wall), "pod_lookup": stats_json(&lookup),
                   "plugin_own": stats_json(&own), "api_gets_per_add": gets}),
        );
    }
    mesh_case(&mut summary, "mesh_nft_cached", &conf("nft"), "k")?;
    mesh_case(
        &mut summary,
        "mesh_native_nftables_cached",
        &nftables_conf,
        "g",
    )?;

    // Yardstick: the reference tuning plugin's ADD (one per-netns sysctl) in a fresh netns.
    let tuning = PathBuf::from("/usr/lib/cni/tuning");
    let mut wall = Vec::new();
    for i in (0..runs).filter(|_| want("tuning_reference")) {
        let ns = Netns::new(&format!("{tag}t{i}"))?;
        let c = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tuning",
                       "sysctl": {"net.core.somaxconn": "1024"}, "prevResult": prev});
        let inv = invoke(&tuning, &c, &ns.path(), "IgnoreUnknown=1")?;
        wall.push(inv.wall_ms);
    }
    if !wall.is_empty() {
        summary.insert(
            "tuning_reference".into(),
            json!({"total": stats_json(&wall)}),
        );
    }

    // Floor: spawning a process that does nothing (`/bin/true`), with the same stdin/pipes.
    let mut wall = Vec::new();
    for _ in (0..runs).filter(|_| want("spawn_floor_bin_true")) {
        let start = Instant::now();
        let mut child = Command::new("/bin/true")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        drop(child.stdin.take());
        child.wait_with_output()?;
        wall.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    if !wall.is_empty() {
        summary.insert(
            "spawn_floor_bin_true".into(),
            json!({"total": stats_json(&wall)}),
        );
    }

    let out = json!({
        "bench": "plugin_add",
        "runs": runs,
        "binary": bin,
        "unit": "ms",
        "results": summary,
        "goals": {"non_mesh_total_p50_ms": 2.0, "mesh_plugin_own_p50_ms": 3.0},
    });
    println!("{}", serde_json::to_string_pretty(&out)?);

    let mut table = String::new();
    table.push_str(&format!(
        "{:<34} {:>9} {:>9} {:>9}\n",
        "istio-cni ADD (ms)", "p50", "p99", "mean"
    ));
    for (case, v) in &summary {
        for (part, s) in v.as_object().unwrap() {
            if !s.is_object() {
                continue;
            }
            table.push_str(&format!(
                "{:<34} {:>9.3} {:>9.3} {:>9.3}\n",
                format!("{case}.{part}"),
                s["p50_ms"].as_f64().unwrap(),
                s["p99_ms"].as_f64().unwrap(),
                s["mean_ms"].as_f64().unwrap()
            ));
        }
    }
    eprint!("{table}");
    Ok(())
}
