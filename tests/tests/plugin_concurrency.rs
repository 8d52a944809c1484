//! Many CNI calls at once through the built `istio-cni`, run as a container runtime runs it
//! (a `loopback` primary, then the plugin, each call its own processes): 100 mesh pods added
//! and deleted concurrently, and one pod added (and deleted) 100 times at once, as a runtime
//! that retries a slow sandbox may. Every pod ends with Istio's rules exactly once, and a DEL
//! leaves nothing behind.
use fastpath_tests::cni::{Attachment, RunsFailed, Runtime, ScratchNet};
use fastpath_tests::kube_api::{FakeKubeApi, Trust, sidecar_pod};
use fastpath_tests::netns::NetNs;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const TOKEN: &str = "concurrency-token";
const PODS: usize = 100;
const NS: &str = "shop";

/// A throwaway node: scratch dir (run dir with the kubeconfig, result cache), API server.
struct Node {
    scratch: ScratchNet,
    api: FakeKubeApi,
    rt: Runtime,
}

impl Node {
    fn new() -> Self {
        let scratch = ScratchNet::new("fpk").unwrap();
        std::fs::create_dir_all(scratch.dir.join("run")).unwrap();
        let api = FakeKubeApi::start(&scratch.dir.join("api"), TOKEN).unwrap();
        api.write_kubeconfig(
            &scratch.dir.join("run/istio-cni-kubeconfig"),
            Trust::Ca,
            TOKEN,
        )
        .unwrap();
        // No accelerator here: the plugin still writes and removes each pod's enrollment
        // record, and must not touch whatever accelerator the node may have loaded.
        let no_pins = scratch.dir.join("no-accelerator");
        let rt = Runtime::with_built_plugin(
            scratch.dir.join("cache"),
            vec![("FASTPATH_BPF_PIN_DIR".into(), no_pins.display().to_string())],
        );
        Node { scratch, api, rt }
    }

    fn run_dir(&self) -> PathBuf {
        self.scratch.dir.join("run")
    }

    /// `loopback` then `istio-cni` (Istio's keys), with the iptables `backend`.
    fn conflist(&self, backend: &str) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": format!("net-{}", self.scratch.bridge),
            "plugins": [
                {"type": "loopback"},
                {
                    "type": "istio-cni",
                    "plugin_log_level": "info",
                    "cni_agent_run_dir": self.run_dir(),
                    "ambient_enabled": false,
                    "enablement_selectors": [],
                    "exclude_namespaces": ["kube-system"],
                    "pod_namespace": "istio-system",
                    "native_nftables": false,
                    "fastpath_iptables_backend": backend,
                    // 100 pods ask the API at once; a few retries absorb a slow answer.
                    "fastpath_pod_retrieval_max_retries": 10,
                    "fastpath_pod_retrieval_interval_ms": 200
                }
            ]
        })
    }

    /// Enrollment records the plugin keeps (`<run dir>/fastpath/pods/<container id>.json`),
    /// temp files included.
    fn records(&self) -> Vec<String> {
        list(&self.run_dir().join("fastpath/pods"))
    }

    /// Results the runtime cached for CHECK and DEL.
    fn cached_results(&self) -> Vec<String> {
        list(&self.rt.cache_dir.join("results"))
    }
}

fn list(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(d) => d
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn attachment(netns: &NetNs, pod: &str) -> Attachment {
    Attachment {
        container_id: format!("cid-{}", netns.name),
        netns: netns.path(),
        ifname: "lo".into(),
        args: format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={NS};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID=cid-{};K8S_POD_UID=uid-{pod}",
            netns.name
        ),
    }
}

/// The rules of a netns as `<table> <line>`: chain names and `-A` lines, in save order.
fn rules(netns: &NetNs, save: &str) -> Vec<String> {
    let text = netns.exec_ok(&[save]).unwrap();
    let mut table = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_string();
        } else if let Some(chain) = line.strip_prefix(':') {
            let name = chain.split_whitespace().next().unwrap_or("");
            out.push(format!("{table} :{name}"));
        } else if line.starts_with("-A ") {
            out.push(format!("{table} {line}"));
        }
    }
    out
}

/// Only the Istio rules and the jumps into them.
fn istio_rules(all: &[String]) -> Vec<String> {
    all.iter()
        .filter(|l| l.contains("ISTIO"))
        .cloned()
        .collect()
}

/// Checks that a reference rule set is Istio's, each rule once; returns it.
fn reference(node: &Node, save: &str, backend: &str) -> Vec<String> {
    let pod = format!("ref-{backend}");
    node.api.set_pod(sidecar_pod(NS, &pod, &[], &[]));
    let netns = NetNs::new(&fastpath_tests::unique_name("fpkr")).unwrap();
    let att = attachment(&netns, &pod);
    let list = node.conflist(backend);
    node.rt.add(&list, &att).unwrap();
    let r = istio_rules(&rules(&netns, save));
    for want in [
        "nat :ISTIO_INBOUND",
        "nat :ISTIO_IN_REDIRECT",
        "nat :ISTIO_OUTPUT",
        "nat :ISTIO_REDIRECT",
        "nat -A OUTPUT -j ISTIO_OUTPUT",
        "nat -A PREROUTING -p tcp -j ISTIO_INBOUND",
    ] {
        assert!(
            r.iter().any(|l| l == want),
            "{backend}: no {want:?} in {r:#?}"
        );
    }
    let mut sorted = r.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), r.len(), "{backend}: a rule twice: {r:#?}");
    node.rt.del(&list, &att).unwrap();
    r
}

/// Runs `f(i)` for i in 0..n on n threads released at once; returns each result and how long
/// the whole took.
fn all_at_once<T: Send + 'static>(
    n: usize,
    f: impl Fn(usize) -> T + Send + Sync + 'static,
) -> (Vec<T>, Duration) {
    let f = Arc::new(f);
    let barrier = Arc::new(Barrier::new(n + 1));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (f, barrier) = (f.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                f(i)
            })
        })
        .collect();
    let start = Instant::now();
    barrier.wait();
    let out = threads.into_iter().map(|t| t.join().unwrap()).collect();
    (out, start.elapsed())
}

/// What a failed chain call printed, plugin by plugin.
fn explain(e: &anyhow::Error) -> String {
    match e.downcast_ref::<RunsFailed>() {
        Some(runs) => format!("{e:#}\n{runs}"),
        None => format!("{e:#}"),
    }
}

fn slowest(times: &[Duration]) -> Duration {
    times.iter().max().copied().unwrap_or_default()
}

/// Backend, its save command, and the other backend's (which must hold nothing).
const BACKENDS: [(&str, &str, &str); 2] = [
    ("auto", "iptables-nft-save", "iptables-legacy-save"),
    // Legacy iptables takes a lock per netns and waits for it (`--wait`).
    ("legacy", "iptables-legacy-save", "iptables-nft-save"),
];

#[test]
fn plugin_concurrency_100_mesh_pods_added_and_deleted_at_once() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let node = Arc::new(Node::new());
    for (backend, save, other_save) in BACKENDS {
        many_pods_at_once(&node, backend, save, other_save);
    }
}

/// [`PODS`] mesh pods, each in its netns: ADDs all at once, then DELs all at once.
fn many_pods_at_once(node: &Arc<Node>, backend: &str, save: &str, other_save: &str) {
    let want = reference(node, save, backend);
    let t = Instant::now();
    let pods: Vec<(NetNs, String)> = (0..PODS)
        .map(|i| {
            let name = format!("web-{backend}-{i}");
            node.api.set_pod(sidecar_pod(NS, &name, &[], &[]));
            let netns = NetNs::new(&fastpath_tests::unique_name("fpkc")).unwrap();
            (netns, name)
        })
        .collect();
    eprintln!("{backend}: {PODS} netns made in {:?}", t.elapsed());
    let atts: Arc<Vec<Attachment>> =
        Arc::new(pods.iter().map(|(ns, name)| attachment(ns, name)).collect());
    let list = Arc::new(node.conflist(backend));

    let (adds, took) = {
        let (node, atts, list) = (node.clone(), atts.clone(), list.clone());
        all_at_once(PODS, move |i| {
            let t = Instant::now();
            (node.rt.add(&list, &atts[i]).map(|_| ()), t.elapsed())
        })
    };
    let times: Vec<Duration> = adds.iter().map(|(_, t)| *t).collect();
    eprintln!(
        "{backend}: {PODS} concurrent ADDs of distinct pods: {took:?} in all, slowest {:?}",
        slowest(&times)
    );
    let failed: Vec<String> = adds
        .iter()
        .zip(&pods)
        .filter_map(|((r, _), (_, name))| {
            r.as_ref().err().map(|e| format!("{name}: {}", explain(e)))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{backend}: {} of {PODS} ADDs failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    for (netns, name) in &pods {
        let have = istio_rules(&rules(netns, save));
        assert_eq!(
            have, want,
            "{backend}: {name}: not Istio's rules exactly once"
        );
        assert!(
            !rules(netns, other_save).iter().any(|l| l.contains("ISTIO")),
            "{backend}: {name}: rules in both backends"
        );
    }
    assert_eq!(node.records().len(), PODS, "{:?}", node.records());

    let (dels, took) = {
        let (node, atts, list) = (node.clone(), atts.clone(), list.clone());
        all_at_once(PODS, move |i| {
            let t = Instant::now();
            (node.rt.del(&list, &atts[i]).map(|_| ()), t.elapsed())
        })
    };
    let times: Vec<Duration> = dels.iter().map(|(_, t)| *t).collect();
    eprintln!(
        "{backend}: {PODS} concurrent DELs of distinct pods: {took:?} in all, slowest {:?}",
        slowest(&times)
    );
    for ((r, _), (_, name)) in dels.iter().zip(&pods) {
        if let Err(e) = r {
            panic!("{backend}: DEL of {name} failed: {}", explain(e));
        }
    }
    assert_eq!(
        node.records(),
        Vec::<String>::new(),
        "{backend}: records left by DEL"
    );
    assert_eq!(node.cached_results(), Vec::<String>::new());
}

/// One sandbox, `n` ADDs of it at once, then CHECK, then `n` DELs at once.
/// Returns the warnings and errors the plugin logged in the ADDs (as JSON lines).
fn same_pod_many_times(node: &Arc<Node>, backend: &str, save: &str, n: usize) -> Vec<String> {
    let want = reference(node, save, backend);
    let pod = format!("same-{backend}");
    node.api.set_pod(sidecar_pod(NS, &pod, &[], &[]));
    let netns = NetNs::new(&fastpath_tests::unique_name("fpks")).unwrap();
    let att = Arc::new(attachment(&netns, &pod));
    let list = Arc::new(node.conflist(backend));

    let (adds, took) = {
        let (node, att, list) = (node.clone(), att.clone(), list.clone());
        all_at_once(n, move |_| {
            let t = Instant::now();
            let r = node.rt.add(&list, &att).map(|(_, runs)| {
                let plugin = runs.iter().find(|r| r.plugin_type == "istio-cni");
                let stderr = plugin.map(|r| r.stderr.as_str()).unwrap_or("");
                let warnings: Vec<String> = stderr
                    .lines()
                    .filter(|l| l.contains(r#""level":"warn""#) || l.contains(r#""level":"error""#))
                    .map(str::to_string)
                    .collect();
                (stderr.contains("already in place"), warnings)
            });
            (r, t.elapsed())
        })
    };
    let times: Vec<Duration> = adds.iter().map(|(_, t)| *t).collect();
    let failed: Vec<String> = adds
        .iter()
        .filter_map(|(r, _)| r.as_ref().err().map(explain))
        .collect();
    let in_place = adds
        .iter()
        .filter(|(r, _)| matches!(r, Ok((true, _))))
        .count();
    let warnings: Vec<String> = adds
        .iter()
        .filter_map(|(r, _)| r.as_ref().ok())
        .flat_map(|(_, w)| w.iter().cloned())
        .collect();
    eprintln!(
        "{backend}: {n} concurrent ADDs of one pod: {took:?} in all, slowest {:?}; {} applied \
         the rules, {in_place} found them in place, {} failed, {} warnings logged",
        slowest(&times),
        n - in_place - failed.len(),
        failed.len(),
        warnings.len()
    );
    assert!(
        failed.is_empty(),
        "{backend}: {} of {n} concurrent ADDs of the same pod failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert_eq!(
        istio_rules(&rules(&netns, save)),
        want,
        "{backend}: concurrent ADDs of one pod must leave Istio's rules exactly once"
    );
    node.rt
        .check(&list, &att)
        .unwrap_or_else(|e| panic!("{backend}: CHECK: {}", explain(&e)));
    let record = format!("{}.json", att.container_id);
    assert_eq!(
        node.records(),
        vec![record.clone()],
        "{backend}: one record"
    );
    let path = node.run_dir().join("fastpath/pods").join(&record);
    let saved: Value = serde_json::from_slice(&std::fs::read(&path).unwrap())
        .unwrap_or_else(|e| panic!("{backend}: {} is not whole: {e}", path.display()));
    assert_eq!(saved["container_id"], att.container_id.as_str(), "{saved}");
    assert_eq!(saved["name"], pod.as_str(), "{saved}");

    let (dels, took) = {
        let (node, att, list) = (node.clone(), att.clone(), list.clone());
        all_at_once(n, move |_| node.rt.del(&list, &att).map(|_| ()))
    };
    eprintln!("{backend}: {n} concurrent DELs of one pod: {took:?}");
    for r in &dels {
        if let Err(e) = r {
            panic!("{backend}: DEL: {}", explain(e));
        }
    }
    assert_eq!(
        node.records(),
        Vec::<String>::new(),
        "{backend}: records left"
    );
    assert_eq!(node.cached_results(), Vec::<String>::new());
    warnings
}

#[test]
fn plugin_concurrency_one_pod_added_100_times_at_once_has_its_rules_once() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let node = Arc::new(Node::new());
    for (backend, save, _) in BACKENDS {
        same_pod_many_times(&node, backend, save, PODS);
    }
}

/// A repeated ADD of a pod is a success and warns of nothing: each says the rules are in
/// place, none that the pod is not accelerated because its enrollment record could not be
/// written (concurrent ADDs of one container id must not trip over each other's temp file).
#[test]
fn plugin_concurrency_one_pod_added_100_times_at_once_logs_no_warning() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let node = Arc::new(Node::new());
    let warnings = same_pod_many_times(&node, "auto", "iptables-nft-save", PODS);
    assert!(
        warnings.is_empty(),
        "{} of {PODS} concurrent ADDs of one pod logged a warning or an error:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
}
