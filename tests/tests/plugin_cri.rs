//! The built `istio-cni` through a real container runtime: containerd's CRI plugin runs the CNI
//! chain (loopback, bridge + host-local, istio-cni) for RunPodSandbox with the `K8S_POD_*` args,
//! and DEL for StopPodSandbox / RemovePodSandbox.
//!
//! Subnets 10.248.200.0/24 and 10.248.201.0/24.
use fastpath_tests::cri::Containerd;
use fastpath_tests::kube_api::{FakeKubeApi, LogSink, Trust, plain_pod, sidecar_pod};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const TOKEN: &str = "cri-test-token";

fn sandbox_config(ns: &str, name: &str, log_dir: &Path) -> Value {
    fastpath_tests::cri::pod_sandbox_config(ns, name, log_dir)
}

fn netns_save(netns: &str, bin: &str) -> String {
    fastpath_tests::cri::in_netns_output(netns, &[bin])
}

/// A node as containerd's CRI sees it: the CNI chain loopback, bridge + host-local, istio-cni
/// (with `native_nftables` as given), the plugin's kubeconfig for the fake API server and its
/// log socket. Everything is removed on drop.
struct CriNode {
    // Field order is drop order: containerd stops before its bridge and directory go.
    ctrd: Containerd,
    api: FakeKubeApi,
    logs: LogSink,
    dir: std::path::PathBuf,
    bridge: String,
    _lock: std::fs::File,
}

impl Drop for CriNode {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl CriNode {
    fn start(subnet: &str, native_nftables: bool) -> CriNode {
        let lock = fastpath_tests::serial_guard("containerd");
        let tag = fastpath_tests::unique_name("fpcri");
        let dir = std::env::temp_dir().join(format!("fastpath-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        let (bin_dir, conf_dir, run_dir) =
            (dir.join("cni-bin"), dir.join("cni-conf"), dir.join("run"));
        for d in [&bin_dir, &conf_dir, &run_dir] {
            std::fs::create_dir_all(d).unwrap();
        }
        for p in ["loopback", "bridge", "host-local"] {
            std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(p), bin_dir.join(p)).unwrap();
        }
        std::os::unix::fs::symlink(
            fastpath_tests::bin_path("istio-cni"),
            bin_dir.join("istio-cni"),
        )
        .unwrap();
        let api = FakeKubeApi::start(&dir.join("api"), TOKEN).unwrap();
        api.write_kubeconfig(&run_dir.join("istio-cni-kubeconfig"), Trust::Ca, TOKEN)
            .unwrap();
        let logs = LogSink::start(&run_dir.join("log.sock")).unwrap();
        let bridge = tag.clone();
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "plugins": [
                {"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
                 "ipam": {"type": "host-local", "dataDir": dir.join("ipam"),
                          "ranges": [[{"subnet": subnet}]]}},
                {"type": "istio-cni", "ipam": {}, "dns": {}, "plugin_log_level": "debug",
                 "cni_agent_run_dir": run_dir, "ambient_enabled": false, "enablement_selectors": [],
                 "exclude_namespaces": ["istio-system", "kube-system"], "pod_namespace": "istio-system",
                 "native_nftables": native_nftables, "enable_ambient_detection_retry": false}
            ]
        });
        std::fs::write(
            conf_dir.join("10-k8s-pod-network.conflist"),
            conflist.to_string(),
        )
        .unwrap();
        let ctrd = Containerd::start(&dir.join("containerd"), &bin_dir, &conf_dir)
            .expect("start containerd");
        CriNode {
            ctrd,
            api,
            logs,
            dir,
            bridge,
            _lock: lock,
        }
    }
}

#[test]
fn plugin_cri_containerd_runs_the_chain_for_sandboxes() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let node = CriNode::start("10.248.200.0/24", false);
    let (ctrd, api, logs, dir) = (&node.ctrd, &node.api, &node.logs, &node.dir);

    // A mesh pod.
    api.set_pod(sidecar_pod("shop-cri", "web-0", &[], &[]));
    let id = ctrd
        .run_pod(&sandbox_config("shop-cri", "web-0", &dir.join("logs")))
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e:#}\n{}", ctrd.log()));
    assert_eq!(
        api.requests_for("shop-cri", "web-0"),
        1,
        "the plugin looked the pod up"
    );
    let status = ctrd.inspect_pod(&id).unwrap();
    assert_eq!(status["state"], "SANDBOX_READY");
    let netns = status["netnsPath"].as_str().unwrap().to_string();
    assert!(netns.starts_with("/var/run/netns/cni-"), "{status}");
    let pod_ip = status["network"]["ip"].as_str().unwrap().to_string();
    assert!(pod_ip.starts_with("10.248.200."), "{status}");
    let saved = netns_save(&netns, "iptables-nft-save");
    assert!(saved.contains(":ISTIO_OUTPUT"), "{saved}");
    assert!(
        saved.contains("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
        "{saved}"
    );
    assert!(
        saved.contains("-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"),
        "{saved}"
    );
    let applied = logs
        .wait_for_msg("sidecar redirection applied", Duration::from_secs(5))
        .expect("the plugin's log line arrived on the socket");
    // The K8S_POD_* args came from CRI.
    assert_eq!(applied["pod"], "shop-cri/web-0");
    assert_eq!(applied["containerID"], id.as_str());

    // A pod without sidecar passes through, untouched.
    api.set_pod(plain_pod("shop-cri", "plain-0"));
    let plain_id = ctrd
        .run_pod(&sandbox_config("shop-cri", "plain-0", &dir.join("logs")))
        .unwrap();
    let plain_netns = ctrd.inspect_pod(&plain_id).unwrap()["netnsPath"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!netns_save(&plain_netns, "iptables-nft-save").contains("ISTIO"));

    // A mesh pod whose annotation is not valid: RunPodSandbox fails with the plugin's error.
    api.set_pod(sidecar_pod(
        "shop-cri",
        "evil-0",
        &[("traffic.sidecar.istio.io/excludeInboundPorts", "22;reboot")],
        &[],
    ));
    let err = ctrd
        .run_pod(&sandbox_config("shop-cri", "evil-0", &dir.join("logs")))
        .expect_err("the sandbox must not start");
    let text = format!("{err:#}");
    assert!(
        text.contains("traffic.sidecar.istio.io/excludeInboundPorts") && text.contains("22;reboot"),
        "{text}"
    );

    // StopPodSandbox runs DEL through the chain (istio-cni, then bridge frees the IP).
    let ipam_file = dir.join("ipam").join("k8s-pod-network").join(&pod_ip);
    assert!(ipam_file.exists());
    ctrd.stop_pod(&id).unwrap();
    assert!(!ipam_file.exists(), "bridge/host-local DEL ran");
    let del = logs
        .wait_for(
            |l| {
                l["msg"] == "DEL: nothing to undo in the pod netns"
                    && l["containerID"] == id.as_str()
            },
            Duration::from_secs(5),
        )
        .expect("istio-cni DEL ran for the sandbox");
    assert_eq!(
        del["pod"], "shop-cri/web-0",
        "DEL got the K8S_POD_* args too"
    );
    ctrd.remove_pod(&id).unwrap();
    assert!(
        !Path::new(&netns).exists(),
        "netns removed with the sandbox"
    );
    ctrd.stop_pod(&plain_id).unwrap();
    ctrd.remove_pod(&plain_id).unwrap();
    let dels = logs
        .lines()
        .iter()
        .filter(|l| l["msg"] == "DEL: nothing to undo in the pod netns")
        .count();
    assert!(
        dels >= 3,
        "DEL for both sandboxes and for the one that failed ADD"
    );
}

/// `native_nftables: true` through containerd: the sandbox gets Istio's nftables tables (no
/// iptables rule at all), programmed by the plugin over netlink, and DEL removes them.
#[test]
fn plugin_cri_containerd_programs_an_nftables_pod() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let node = CriNode::start("10.248.201.0/24", true);
    node.api.set_pod(sidecar_pod("shop-nft", "web-0", &[], &[]));
    let id = node
        .ctrd
        .run_pod(&sandbox_config("shop-nft", "web-0", &node.dir.join("logs")))
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e:#}\n{}", node.ctrd.log()));
    let status = node.ctrd.inspect_pod(&id).unwrap();
    assert_eq!(status["state"], "SANDBOX_READY");
    let netns = status["netnsPath"].as_str().unwrap().to_string();
    let out = Command::new("nsenter")
        .args([&format!("--net={netns}"), "nft", "list", "ruleset"])
        .output()
        .expect("nsenter nft");
    let ruleset = String::from_utf8_lossy(&out.stdout).into_owned();
    // REDIRECT mode: the nat table carries it all (Istio writes only the chains with rules).
    assert!(
        ruleset.contains("table inet istio-proxy-nat"),
        "no nat table:\n{ruleset}"
    );
    assert!(ruleset.contains("redirect to :15001"), "{ruleset}");
    assert!(ruleset.contains("redirect to :15006"), "{ruleset}");
    assert!(
        !netns_save(&netns, "iptables-nft-save").contains("ISTIO"),
        "iptables rules in an nftables pod"
    );
    node.logs
        .wait_for(
            |l| l["msg"] == "sidecar redirection applied" && l["backend"] == "nftables",
            Duration::from_secs(5),
        )
        .expect("the plugin's nftables line arrived on the socket");
    node.ctrd.stop_pod(&id).unwrap();
    node.ctrd.remove_pod(&id).unwrap();
}

/// A pod whose redirection is missing (its `istio-validation` init container failed, as when
/// the CNI plugin was not yet on the node at its ADD) is repaired in place by the agent's
/// repair controller: it finds the containerd sandbox's netns through the host's procfs by
/// the pod's IP and programs Istio's rules there.
#[test]
fn plugin_cri_containerd_pod_without_redirection_is_repaired_in_place() {
    use fastpath_tests::installer::{Agent, Host};
    if !fastpath_tests::require_privileges!() {
        return;
    }
    const NODE: &str = "cri-node";
    let node = CriNode::start("10.248.203.0/24", false);
    // At ADD the API holds a pod without sidecar: the plugin leaves its netns alone.
    node.api.set_pod(plain_pod("shop-rep", "web-0"));
    let id = node
        .ctrd
        .run_pod(&sandbox_config("shop-rep", "web-0", &node.dir.join("logs")))
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e:#}\n{}", node.ctrd.log()));
    let status = node.ctrd.inspect_pod(&id).unwrap();
    let netns = status["netnsPath"].as_str().unwrap().to_string();
    let ip = status["network"]["ip"].as_str().unwrap().to_string();
    assert!(!netns_save(&netns, "iptables-nft-save").contains("ISTIO"));
    // Then the pod as the kubelet reports it: a sidecar pod on this node whose validation
    // init container keeps failing.
    let mut pod = sidecar_pod("shop-rep", "web-0", &[], &[]);
    pod["spec"]["nodeName"] = json!(NODE);
    pod["status"] = json!({
        "phase": "Pending", "podIP": ip, "podIPs": [{"ip": ip}],
        "initContainerStatuses": [{
            "name": "istio-validation", "image": "proxyv2", "imageID": "", "ready": false,
            "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 126, "reason": "Error"}}
        }]
    });
    node.api.set_pod(pod);
    let host = Host::new("cri-repair");
    host.set_service_account(TOKEN, &node.api.ca_pem);
    host.write(
        "10-lo.conflist",
        r#"{"cniVersion": "1.0.0", "name": "fp-cri-repair", "plugins": [{"type": "loopback"}]}"#,
    );
    let port = node.api.addr.port().to_string();
    let mut agent = Agent::start(
        &host,
        &[
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", &port),
            ("NODE_NAME", NODE),
            ("REPAIR_NODE_NAME", NODE),
            ("FASTPATH_ACCELERATION", "false"),
            ("FASTPATH_HOST_PROC", "/proc"),
            ("REPAIR_REPAIR_PODS", "true"),
        ],
    );
    agent.wait_ready();
    let repaired = "istio_cni_repair_pods_repaired_total{type=\"repair\",result=\"success\"}";
    agent.wait_until("the containerd pod repaired in place", |a| {
        a.metric(repaired) == Some(1.0)
    });
    // Either backend (the agent picks the node's, as the plugin does).
    let saved =
        netns_save(&netns, "iptables-nft-save") + &netns_save(&netns, "iptables-legacy-save");
    assert!(
        saved.contains("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
        "no redirection in the sandbox's netns after the repair:\n{saved}\nagent log:\n{}",
        agent.log()
    );
    drop(agent);
    node.ctrd.stop_pod(&id).unwrap();
    node.ctrd.remove_pod(&id).unwrap();
}
