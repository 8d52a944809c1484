//! The demo: a throwaway node on this machine, no cluster.
//!
//! It makes host CNI dirs under a temp dir with a primary conflist from the reference plugins,
//! a small API server that serves the pods, runs the real `install-cni` against that node,
//! creates pods as network namespaces through the real CNI chain (with `istio-cni` chained in),
//! runs a sidecar in each mesh pod, sends traffic app → sidecar → sidecar → app with acceleration
//! off, restarts `install-cni` with it on (an upgrade: everything stays) and sends the same
//! traffic again, side by side, shows the rules, the metrics and the accelerator's per-pod
//! counters, then deletes the DaemonSet in the API and stops `install-cni`, which decides that
//! this is an uninstall and removes everything.
//!
//! Subcommands used inside the pods: `sidecar`, `echo PORT`, `ping ADDR SIZE COUNT`.
use anyhow::{Context as _, Result, bail};
use fastpath_tests::cni::{Attachment, Runtime};
use fastpath_tests::installer::{free_port, http_get};
use fastpath_tests::kube_api::{FakeKubeApi, plain_pod, sidecar_pod};
use fastpath_tests::netns::NetNs;
use fastpath_tests::sidecar;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NAMESPACE: &str = "demo";
const APP_PORT: u16 = 9080;
const APP_UID: &str = "1000";
const PROXY_UID: &str = "1337";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_default();
    match arg(0) {
        "sidecar" => Ok(sidecar::run_sidecar(15001, 15006)?),
        "echo" => Ok(sidecar::run_echo(arg(1).parse()?)?),
        "ping" => {
            let mut rtts = sidecar::ping(arg(1).parse()?, arg(2).parse()?, arg(3).parse()?)?;
            let p50 = sidecar::quantile(&mut rtts, 0.5);
            let p99 = sidecar::quantile(&mut rtts, 0.99);
            println!(
                "{}",
                json!({"p50_us": p50.as_secs_f64() * 1e6, "p99_us": p99.as_secs_f64() * 1e6})
            );
            Ok(())
        }
        "" => demo(),
        other => bail!("unknown subcommand {other:?} (run without arguments for the demo)"),
    }
}

fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

/// Everything the demo made, removed on drop in reverse order, even after a failure.
struct Node {
    root: PathBuf,
    bridge: String,
    pin_dir: PathBuf,
    agent: Option<Child>,
    processes: Vec<Child>,
    pods: Vec<Pod>,
    runtime: Runtime,
    chain: Value,
    loopback: Value,
}

struct Pod {
    name: String,
    netns: NetNs,
    ip: String,
    mesh: bool,
}

impl Node {
    fn net_dir(&self) -> PathBuf {
        self.root.join("etc/cni/net.d")
    }
    fn bin_dir(&self) -> PathBuf {
        self.root.join("opt/cni/bin")
    }
    fn run_dir(&self) -> PathBuf {
        self.root.join("var/run/istio-cni")
    }

    fn attachment(&self, pod: &str, netns: &str) -> Attachment {
        Attachment {
            container_id: format!("demo-{pod}"),
            netns: netns.to_string(),
            ifname: "eth0".into(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID=demo-{pod}"
            ),
        }
    }

    /// Runs `argv` inside a pod's netns as `uid`, in the background.
    fn spawn_in(&mut self, netns: &str, uid: &str, argv: &[&str]) -> Result<()> {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "setpriv",
                "--reuid",
                uid,
                "--regid",
                uid,
                "--clear-groups",
            ])
            .arg(std::env::current_exe()?)
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.processes.push(child);
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for p in &mut self.processes {
            let _ = p.kill();
            let _ = p.wait();
        }
        let pods: Vec<Pod> = self.pods.drain(..).rev().collect();
        for pod in pods {
            let att = self.attachment(&pod.name, &pod.netns.path());
            let _ = self.runtime.del(&self.chain, &att);
            let _ = self.runtime.del(&self.loopback, &att);
        }
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        let _ = Command::new(bin("install-cni"))
            .arg("uninstall")
            .envs(agent_env(self, 0, 0))
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A binary of this workspace, next to this one.
fn bin(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("current_exe");
    me.parent().expect("bin dir").join(name)
}

const AGENT_POD: &str = "istio-cni-node-demo1";
const DAEMONSET: &str = "/apis/apps/v1/namespaces/istio-system/daemonsets/istio-cni-node";

/// Starts install-cni as the DaemonSet's container would run, logging to install-cni.log.
fn start_agent(
    node: &Node,
    api: &FakeKubeApi,
    health: u16,
    metrics: u16,
    accelerate: bool,
) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(node.root.join("install-cni.log"))?;
    Command::new(bin("install-cni"))
        .env_clear()
        .envs(agent_env(node, health, metrics))
        .env("KUBERNETES_SERVICE_HOST", api.addr.ip().to_string())
        .env("KUBERNETES_SERVICE_PORT", api.addr.port().to_string())
        .env("POD_NAME", AGENT_POD)
        .env("NODE_NAME", "demo-node")
        .env("FASTPATH_ACCELERATION", accelerate.to_string())
        .arg("--log_output_level=info")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .context("start install-cni")
}

/// SIGTERM to install-cni, and its exit.
fn stop_agent(node: &mut Node) -> Result<std::process::ExitStatus> {
    let mut agent = node.agent.take().context("install-cni is not running")?;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    Ok(agent.wait()?)
}

/// p50 and p99 (µs) of 5000 echoes of 64 B from the app of `client_ns` to `ip`.
fn ping(client_ns: &str, ip: &str) -> Result<(f64, f64)> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            client_ns,
            "setpriv",
            "--reuid",
            APP_UID,
            "--regid",
            APP_UID,
            "--clear-groups",
        ])
        .arg(std::env::current_exe()?)
        .args(["ping", &format!("{ip}:{APP_PORT}"), "64", "5000"])
        .output()?;
    if !out.status.success() {
        bail!(
            "ping to {ip} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let r: Value = serde_json::from_slice(&out.stdout)?;
    Ok((
        r["p50_us"].as_f64().unwrap_or_default(),
        r["p99_us"].as_f64().unwrap_or_default(),
    ))
}

/// Whether the primary config chains istio-cni.
fn chained(primary: &Path) -> Result<bool> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(primary)?)?;
    Ok(v["plugins"]
        .as_array()
        .is_some_and(|a| a.iter().any(|p| p["type"] == "istio-cni")))
}

fn agent_env(node: &Node, health: u16, metrics: u16) -> Vec<(String, String)> {
    let p = |p: PathBuf| p.display().to_string();
    vec![
        ("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        ("MOUNTED_CNI_NET_DIR".into(), p(node.net_dir())),
        ("FASTPATH_HOST_CNI_BIN_DIR".into(), p(node.bin_dir())),
        (
            "FASTPATH_CNI_BIN_SOURCE_DIR".into(),
            p(node.root.join("image/opt/cni/bin")),
        ),
        ("CNI_AGENT_RUN_DIR".into(), p(node.run_dir())),
        (
            "FASTPATH_SERVICE_ACCOUNT_DIR".into(),
            p(node.root.join("serviceaccount")),
        ),
        ("FASTPATH_BPF_PIN_DIR".into(), p(node.pin_dir.clone())),
        ("POD_NAMESPACE".into(), "istio-system".into()),
        (
            "EXCLUDE_NAMESPACES".into(),
            "kube-system,istio-system".into(),
        ),
    ]
    .into_iter()
    .chain(
        // Subcommands (uninstall, accel-status) serve nothing: pass ports only to the agent.
        [
            ("FASTPATH_HEALTH_PORT", health),
            ("MONITORING_PORT", metrics),
        ]
        .into_iter()
        .filter(|(_, port)| *port != 0)
        .map(|(k, port)| (k.to_string(), port.to_string())),
    )
    .collect()
}

fn demo() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo needs root (network namespaces, iptables, eBPF)");
    }
    let tag = std::process::id() % 10000;
    let root = std::env::temp_dir().join(format!("fastpath-demo-{tag}"));
    let _ = std::fs::remove_dir_all(&root);
    let mut node = Node {
        bridge: format!("fpdemo{tag}"),
        pin_dir: PathBuf::from(format!("/sys/fs/bpf/fastpath-demo-{tag}")),
        agent: None,
        processes: Vec::new(),
        pods: Vec::new(),
        runtime: Runtime {
            cni_path: vec![root.join("opt/cni/bin")],
            cache_dir: root.join("cni-cache"),
            env: vec![],
        },
        chain: Value::Null,
        loopback: json!({"cniVersion": "1.0.0", "name": "cni-loopback", "plugins": [{"type": "loopback"}]}),
        root,
    };
    node.runtime.env.push((
        "FASTPATH_BPF_PIN_DIR".into(),
        node.pin_dir.display().to_string(),
    ));

    step("A throwaway node");
    for d in [
        "etc/cni/net.d",
        "opt/cni/bin",
        "image/opt/cni/bin",
        "var/run/istio-cni",
    ] {
        std::fs::create_dir_all(node.root.join(d))?;
    }
    for p in ["bridge", "host-local", "loopback", "tuning"] {
        std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(p), node.bin_dir().join(p))?;
    }
    // The image's copy of the plugin, which install-cni puts on the "host".
    std::fs::copy(
        bin("istio-cni"),
        node.root.join("image/opt/cni/bin/istio-cni"),
    )?;
    let primary = json!({
        "cniVersion": "1.0.0",
        "name": "demo-pod-network",
        "plugins": [
            {"type": "bridge", "bridge": node.bridge, "isGateway": true, "ipMasq": false,
             "ipam": {"type": "host-local", "dataDir": node.root.join("ipam"),
                      "ranges": [[{"subnet": format!("10.245.{}.0/24", tag % 250)}]]}},
            {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.rp_filter": "0"}}
        ]
    });
    let primary_path = node.net_dir().join("10-demo.conflist");
    std::fs::write(&primary_path, serde_json::to_string_pretty(&primary)?)?;
    println!("node root:       {}", node.root.display());
    println!(
        "primary config:  {} (bridge + host-local, tuning)",
        primary_path.display()
    );

    step("A Kubernetes API server for the plugin's pod lookups");
    let api = FakeKubeApi::start(&node.root.join("api"), "demo-token")?;
    api.set_pod(sidecar_pod(NAMESPACE, "productpage-v1", &[], &[]));
    api.set_pod(sidecar_pod(NAMESPACE, "reviews-v1", &[], &[]));
    api.set_pod(plain_pod(NAMESPACE, "legacy-db"));
    // A kubelet-style service-account volume with the API's CA and a token.
    let sa = node.root.join("serviceaccount");
    std::fs::create_dir_all(&sa)?;
    std::fs::write(sa.join("token"), "demo-token")?;
    std::fs::write(sa.join("ca.crt"), &api.ca_pem)?;
    // What install-cni asks on SIGTERM: its own pod, the DaemonSet that owns it, its node.
    api.set_pod(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": AGENT_POD, "namespace": "istio-system",
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                          "name": "istio-cni-node", "uid": "demo", "controller": true}]},
        "spec": {"nodeName": "demo-node"}}));
    api.set_object(
        DAEMONSET,
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "istio-cni-node", "namespace": "istio-system", "uid": "demo"},
        "spec": {"template": {"spec": {"nodeSelector": {"kubernetes.io/os": "linux"}}}}}),
    );
    api.set_object(
        "/api/v1/nodes/demo-node",
        json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "demo-node", "labels": {"kubernetes.io/os": "linux"}}}),
    );
    println!(
        "serving 3 pods, the DaemonSet istio-system/istio-cni-node and its pod, at {}",
        api.url()
    );

    step("install-cni starts (the DaemonSet's container), acceleration off for now");
    let (health, metrics) = (free_port(), free_port());
    let started = Instant::now();
    node.agent = Some(start_agent(&node, &api, health, metrics, false)?);
    let readyz = wait_for(Duration::from_secs(30), || {
        match http_get(health, "/readyz") {
            Some((200, body)) => Some(body),
            _ => None,
        }
    })
    .context("install-cni did not become ready in 30 s; see install-cni.log")?;
    println!(
        "ready after {:.0} ms: /readyz says {}",
        started.elapsed().as_secs_f64() * 1e3,
        readyz.trim()
    );
    let merged: Value = serde_json::from_str(&std::fs::read_to_string(&primary_path)?)?;
    println!(
        "primary config now chains istio-cni last:\n{}",
        serde_json::to_string_pretty(&merged)?
    );
    println!(
        "plugin installed at {}",
        node.bin_dir().join("istio-cni").display()
    );
    node.chain = merged;

    step("Pods are created through the CNI chain (as containerd's CRI does)");
    for (name, mesh) in [
        ("productpage-v1", true),
        ("reviews-v1", true),
        ("legacy-db", false),
    ] {
        let netns = NetNs::new(&format!("fpdemo{tag}-{}", &name[..4]))?;
        let att = node.attachment(name, &netns.path());
        node.runtime.add(&node.loopback, &att)?;
        let started = Instant::now();
        let (result, _) = node
            .runtime
            .add(&node.chain, &att)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let ip = result["ips"][0]["address"]
            .as_str()
            .unwrap_or_default()
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let rules = netns
            .exec_ok(&["iptables-save", "-t", "nat"])
            .unwrap_or_default();
        let istio_rules = rules
            .lines()
            .filter(|l| l.starts_with("-A") && l.contains("ISTIO"))
            .count();
        println!(
            "{name:<15} {ip:<12} ADD {:>5.1} ms   {} Istio nat rules",
            started.elapsed().as_secs_f64() * 1e3,
            istio_rules
        );
        node.pods.push(Pod {
            name: name.into(),
            netns,
            ip,
            mesh,
        });
    }
    let mesh_rules = node.pods[0]
        .netns
        .exec_ok(&["iptables-save", "-t", "nat"])?;
    println!("\nrules in productpage-v1 (Istio's, from its pod spec):");
    for l in mesh_rules.lines().filter(|l| l.contains("ISTIO")) {
        println!("  {l}");
    }

    step("Sidecars (uid 1337) in the mesh pods, apps (uid 1000) behind them");
    let pods: Vec<(String, String, bool)> = node
        .pods
        .iter()
        .map(|p| (p.netns.name.clone(), p.ip.clone(), p.mesh))
        .collect();
    for (ns, _, mesh) in &pods {
        if *mesh {
            node.spawn_in(ns, PROXY_UID, &["sidecar"])?;
        }
        node.spawn_in(ns, APP_UID, &["echo", &APP_PORT.to_string()])?;
    }
    std::thread::sleep(Duration::from_millis(300));

    step("Traffic: productpage-v1 app → its sidecar → reviews-v1 sidecar → reviews-v1 app");
    let client_ns = pods[0].0.clone();
    let targets = [
        ("reviews-v1 (mesh)", pods[1].1.clone()),
        ("legacy-db (no sidecar)", pods[2].1.clone()),
    ];
    let mut off = Vec::new();
    for (target, ip) in &targets {
        let (p50, p99) = ping(&client_ns, ip)?;
        println!(
            "acceleration off: to {target:<24} 5000 × 64 B echoed intact   p50 {p50:>6.1} µs   p99 {p99:>6.1} µs"
        );
        off.push((p50, p99));
    }

    step(
        "install-cni restarts with acceleration on (SIGTERM: the DaemonSet is there, so an upgrade)",
    );
    stop_agent(&mut node)?;
    let log = std::fs::read_to_string(node.root.join("install-cni.log"))?;
    for l in log.lines().filter(|l| l.contains("SIGTERM")) {
        println!("  {l}");
    }
    println!(
        "after it stopped: istio-cni still chained: {}, plugin binary present: {}",
        chained(&primary_path)?,
        node.bin_dir().join("istio-cni").exists()
    );
    node.agent = Some(start_agent(&node, &api, health, metrics, true)?);
    wait_for(Duration::from_secs(60), || {
        http_get(metrics, "/metrics")
            .and_then(|(_, t)| t.contains("fastpath_accel_enabled 1").then_some(()))
    })
    .context("acceleration did not come on in 60 s; see install-cni.log")?;
    println!(
        "acceleration active (eBPF sock_ops, sk_msg, a recvmsg tracepoint and an ingress gate)"
    );

    step("The same traffic, accelerated, side by side");
    println!(
        "{:<24} {:>12} {:>12} {:>12} {:>12} {:>8}",
        "to", "off p50 µs", "on p50 µs", "off p99 µs", "on p99 µs", "p50 ×"
    );
    for ((target, ip), (off50, off99)) in targets.iter().zip(off) {
        let (on50, on99) = ping(&client_ns, ip)?;
        println!(
            "{target:<24} {off50:>12.1} {on50:>12.1} {off99:>12.1} {on99:>12.1} {:>8.2}",
            off50 / on50
        );
    }
    println!("(the no-sidecar pod is not enrolled: its path is plain TCP both times)");

    step("install-cni's metrics (Istio's names, then fastpath's per-pod counters)");
    let (_, text) = http_get(metrics, "/metrics").context("GET /metrics")?;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        if l.starts_with("istio_cni_install") || (l.starts_with("fastpath_") && !l.ends_with(" 0"))
        {
            println!("  {l}");
        }
    }

    step("The accelerator's pins");
    let status = Command::new(bin("install-cni"))
        .arg("accel-status")
        .envs(agent_env(&node, 0, 0))
        .output()?;
    print!(
        "{}{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );

    step("Pods deleted; the DaemonSet is deleted (helm uninstall); install-cni gets SIGTERM");
    for p in &mut node.processes {
        let _ = p.kill();
        let _ = p.wait();
    }
    node.processes.clear();
    let pods: Vec<Pod> = node.pods.drain(..).rev().collect();
    for pod in pods {
        let att = node.attachment(&pod.name, &pod.netns.path());
        node.runtime
            .del(&node.chain, &att)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        node.runtime
            .del(&node.loopback, &att)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        println!("{:<15} DEL ok", pod.name);
    }
    api.remove_object(DAEMONSET);
    let before = std::fs::read_to_string(node.root.join("install-cni.log"))?.len();
    let status = stop_agent(&mut node)?;
    println!("install-cni exited: {status}");
    let log = std::fs::read_to_string(node.root.join("install-cni.log"))?;
    for l in log[before..].lines() {
        println!("  {l}");
    }
    println!(
        "primary config chains istio-cni: {}; plugin binary present: {}; pins present: {}",
        chained(&primary_path)?,
        node.bin_dir().join("istio-cni").exists(),
        node.pin_dir.exists()
    );
    println!(
        "\nlog of install-cni: {} (removed with the node)",
        node.root.join("install-cni.log").display()
    );
    drop(node);
    println!("cleaned up");
    Ok(())
}

fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}
