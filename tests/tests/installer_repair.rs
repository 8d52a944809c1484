//! The repair controller, end to end: the real install-cni watches its node's pods on the fake
//! API server and acts on broken ones (their `istio-validation` init container exited 126):
//! it repairs them in place (the pod's netns, found through /proc, gets Istio's nat rules),
//! deletes them (with preconditions) or labels them, with a `Warning` event, and counts it in
//! `istio_cni_repair_pods_repaired_total`.
use fastpath_tests::installer::{Agent, Host};
use fastpath_tests::kube_api::{FakeKubeApi, sidecar_pod};
use fastpath_tests::netns::NetNs;
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "repair-token";
const NODE: &str = "node-r";

/// A sidecar pod of this node with IP `ip`, whose `istio-validation` init container is
/// crashlooping with exit code 126 (no redirection found), as Istio's repair controller sees it.
fn broken_pod(ns: &str, name: &str, ip: &str) -> Value {
    let mut pod = sidecar_pod(ns, name, &[], &[]);
    pod["spec"]["nodeName"] = json!(NODE);
    pod["status"] = json!({
        "phase": "Pending", "podIP": ip, "podIPs": [{"ip": ip}],
        "initContainerStatuses": [{
            "name": "istio-validation", "image": "proxyv2", "imageID": "", "ready": false,
            "restartCount": 2,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 126, "reason": "Error",
                "message": "Istio init container failed: no traffic redirection"}}
        }]
    });
    pod
}

/// The same pod once its init container succeeded.
fn healthy_pod(ns: &str, name: &str, ip: &str) -> Value {
    let mut pod = broken_pod(ns, name, ip);
    pod["status"]["initContainerStatuses"][0]["state"] =
        json!({"terminated": {"exitCode": 0, "reason": "Completed"}});
    pod
}

fn host_with_api(tag: &str) -> (Host, FakeKubeApi) {
    let host = Host::new(tag);
    let api = FakeKubeApi::start(&host.root.join("api"), TOKEN).unwrap();
    host.set_service_account(TOKEN, &api.ca_pem);
    host.write(
        "10-lo.conflist",
        r#"{"cniVersion": "1.0.0", "name": "fp-repair", "plugins": [{"type": "loopback"}]}"#,
    );
    (host, api)
}

/// The agent with the repair controller in `mode` (an env var set to true), once ready.
fn start_agent(host: &Host, api: &FakeKubeApi, mode: &[(&str, &str)]) -> Agent {
    let port = api.addr.port().to_string();
    let mut env = vec![
        ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
        ("KUBERNETES_SERVICE_PORT", port.as_str()),
        ("NODE_NAME", NODE),
        ("REPAIR_NODE_NAME", NODE),
        ("FASTPATH_ACCELERATION", "false"),
        ("FASTPATH_POD_CACHE", "false"),
        ("FASTPATH_HOST_PROC", "/proc"),
    ];
    env.extend_from_slice(mode);
    let mut agent = Agent::start(host, &env);
    agent.wait_ready();
    agent
}

fn metric(agent: &Agent, kind: &str, result: &str) -> f64 {
    agent
        .metric(&format!(
            "istio_cni_repair_pods_repaired_total{{type=\"{kind}\",result=\"{result}\"}}"
        ))
        .unwrap_or(0.0)
}

fn has_event(api: &FakeKubeApi, reason: &str, pod: &str) -> bool {
    api.events().iter().any(|e| {
        e["reason"] == reason
            && (e["regarding"]["name"] == pod || e["involvedObject"]["name"] == pod)
    })
}

/// A "pod sandbox": a netns whose loopback holds `ip`, and a process living in it.
struct Sandbox {
    netns: NetNs,
    pause: Child,
}

impl Sandbox {
    fn new(ip: &str) -> Sandbox {
        let netns = NetNs::new(&fastpath_tests::unique_name("fprp")).unwrap();
        netns.exec_ok(&["ip", "link", "set", "lo", "up"]).unwrap();
        // On lo: the dummy/veth modules may be missing on the test machine; any interface
        // holding the pod's IP identifies the netns.
        let host_len = if ip.contains(':') { 128 } else { 32 };
        netns
            .exec_ok(&[
                "ip",
                "addr",
                "add",
                &format!("{ip}/{host_len}"),
                "dev",
                "lo",
            ])
            .unwrap();
        let pause = Command::new("ip")
            .args(["netns", "exec", &netns.name, "sleep", "120"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Sandbox { netns, pause }
    }

    fn nat_rules(&self) -> String {
        self.netns
            .exec_ok(&["iptables-save", "-t", "nat"])
            .unwrap_or_default()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.pause.kill();
        let _ = self.pause.wait();
    }
}

/// An IP no other test of this run uses.
fn test_ip(n: u8) -> String {
    format!(
        "10.{}.{}.{n}",
        200 + (std::process::id() % 50),
        (std::process::id() >> 8) % 250
    )
}

#[test]
fn a_broken_pod_is_repaired_in_place_once() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let ip = test_ip(7);
    let sandbox = Sandbox::new(&ip);
    let (host, api) = host_with_api("repair-inplace");
    let mut agent = start_agent(&host, &api, &[("REPAIR_REPAIR_PODS", "true")]);
    // The sleeping process must be in /proc, in the netns, before the pod is seen.
    std::thread::sleep(Duration::from_millis(200));
    api.set_pod(broken_pod("shop", "web-0", &ip));
    agent.wait_until("the pod repaired", |a| {
        metric(a, "repair", "success") == 1.0
    });
    let rules = sandbox.nat_rules();
    assert!(
        rules.contains("ISTIO_REDIRECT") && rules.contains("ISTIO_INBOUND"),
        "no redirection in the pod's netns:\n{rules}"
    );
    assert!(
        agent.log().contains("pod shop/web-0 repaired"),
        "{}",
        agent.log()
    );
    // Another change of the same pod (same UID): not repaired again.
    let mut again = broken_pod("shop", "web-0", &ip);
    again["metadata"]["labels"]["touched"] = json!("yes");
    api.set_pod(again);
    agent.wait_until("the change skipped", |a| metric(a, "repair", "skip") >= 1.0);
    assert_eq!(metric(&agent, "repair", "success"), 1.0);
    assert_eq!(metric(&agent, "repair", "fail"), 0.0);

    // A broken pod whose IP no netns holds: an error naming the pod, after 5 attempts.
    api.set_pod(broken_pod("shop", "ghost", "10.254.254.254"));
    agent.wait_until("the ghost pod failed", |a| {
        metric(a, "repair", "fail") == 1.0
    });
    let log = agent.log();
    assert!(
        log.contains("no network namespace under /proc holds pod shop/ghost's IP 10.254.254.254"),
        "{log}"
    );
    assert!(agent.is_ready());
}

#[test]
fn a_broken_pod_is_deleted_with_preconditions_and_the_watch_resumes() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let (host, api) = host_with_api("repair-delete");
    let mut agent = start_agent(&host, &api, &[("REPAIR_DELETE_PODS", "true")]);
    agent.wait_until("the watch", |_| api.watches() >= 1);
    api.set_pod(broken_pod("shop", "web-1", "10.9.0.1"));
    agent.wait_until("the pod deleted", |_| api.pod("shop", "web-1").is_none());
    agent.wait_until("the DeleteBrokenPod event", |_| {
        has_event(&api, "DeleteBrokenPod", "web-1")
    });
    let deletes: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    agent.wait_until("the metric", |a| metric(a, "delete", "success") == 1.0);

    // (e) the watch breaks; it resumes, and a pod broken after that is still handled.
    let watches = api.watches();
    api.break_watches();
    agent.wait_until("the watch to resume", |_| api.watches() > watches);
    api.set_pod(broken_pod("shop", "web-2", "10.9.0.2"));
    agent.wait_until("the second pod deleted", |_| {
        api.pod("shop", "web-2").is_none()
    });
    agent.wait_until("the metric", |a| metric(a, "delete", "success") == 2.0);
}

#[test]
fn a_broken_pod_is_labelled_and_a_healthy_one_left_alone() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let (host, api) = host_with_api("repair-label");
    api.set_pod(healthy_pod("shop", "fine", "10.9.1.1"));
    let mut agent = start_agent(&host, &api, &[("REPAIR_LABEL_PODS", "true")]);
    api.set_pod(broken_pod("shop", "web-3", "10.9.1.2"));
    agent.wait_until("the label", |_| {
        api.pod("shop", "web-3")
            .is_some_and(|p| p["metadata"]["labels"]["cni.istio.io/uninitialized"] == "true")
    });
    agent.wait_until("the LabelBrokenPod event", |_| {
        has_event(&api, "LabelBrokenPod", "web-3")
    });
    assert!(
        api.requests()
            .iter()
            .any(|r| r.method == "PATCH" && r.path == "/api/v1/namespaces/shop/pods/web-3/status"),
        "the label goes through pods/status"
    );
    agent.wait_until("the metric", |a| metric(a, "label", "success") == 1.0);
    // The healthy pod (init container Completed) is left alone: no write, no event.
    let fine = api.pod("shop", "fine").unwrap();
    assert!(fine["metadata"]["labels"]["cni.istio.io/uninitialized"].is_null());
    assert!(
        !api.requests()
            .iter()
            .any(|r| r.method != "GET" && r.path.contains("/pods/fine")),
    );
    assert!(!has_event(&api, "LabelBrokenPod", "fine"));
    // Labelled already (our own patch came back as MODIFIED): skipped, not labelled twice.
    agent.wait_until("the skip", |a| metric(a, "label", "skip") >= 1.0);
    assert_eq!(metric(&agent, "label", "success"), 1.0);
}

#[test]
fn a_forbidden_pod_list_is_logged_once_and_the_agent_stays_ready() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let (host, api) = host_with_api("repair-403");
    api.force_path_status(
        "/api/v1/pods",
        403,
        "pods is forbidden: User \"system:serviceaccount:istio-system:istio-cni\" cannot list resource \"pods\"",
    );
    let mut agent = start_agent(&host, &api, &[("REPAIR_DELETE_PODS", "true")]);
    agent.wait_until("the 403 logged", |a| {
        a.log().contains("repair controller: the watch")
    });
    // Retried with backoff meanwhile, logged once.
    let t = Instant::now();
    agent.wait_until("retries", |_| {
        api.lists() >= 3 || t.elapsed() > Duration::from_secs(20)
    });
    assert!(api.lists() >= 2, "not retried: {} lists", api.lists());
    let log = agent.log();
    assert_eq!(
        log.matches("repair controller: the watch of node node-r's pods failed")
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains("403") || log.contains("forbidden"), "{log}");
    assert!(agent.is_running());
    assert!(agent.is_ready());
}

/// An agent repairing pods in place with nothing on its PATH, as in the `FROM scratch` image
/// (no iptables-restore, no ip), its watch established.
fn agent_as_in_the_scratch_image(tag: &str) -> (Host, FakeKubeApi, Agent) {
    let (host, api) = host_with_api(tag);
    let empty_path = host.root.join("empty-path");
    std::fs::create_dir_all(&empty_path).unwrap();
    let agent = start_agent(
        &host,
        &api,
        &[
            ("REPAIR_REPAIR_PODS", "true"),
            ("PATH", empty_path.to_str().unwrap()),
        ],
    );
    std::thread::sleep(Duration::from_millis(200));
    (host, api, agent)
}

/// The image is `FROM scratch`: no iptables-restore on the agent's PATH. Repair in place then
/// programs Istio's nftables ruleset over netlink, and says so once.
#[test]
fn without_iptables_in_the_image_a_pod_is_repaired_with_nftables() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let ip = test_ip(9);
    let sandbox = Sandbox::new(&ip);
    let (_host, api, mut agent) = agent_as_in_the_scratch_image("repair-scratch");
    api.set_pod(broken_pod("shop", "web-n", &ip));
    agent.wait_until("the pod repaired", |a| {
        metric(a, "repair", "success") == 1.0
    });
    let ruleset = sandbox
        .netns
        .exec_ok(&["nft", "list", "ruleset"])
        .unwrap_or_default();
    assert!(
        ruleset.contains("table inet istio-proxy-nat") && ruleset.contains("redirect to :15001"),
        "no nftables redirection in the pod's netns:\n{ruleset}"
    );
    assert!(!sandbox.nat_rules().contains("ISTIO_REDIRECT"));
    let log = agent.log();
    assert_eq!(
        log.matches("no iptables-restore in this image").count(),
        1,
        "{log}"
    );
}

/// The scratch image has no `ip` either: a TPROXY pod's policy routing and an IPv6 pod's
/// passthrough address are programmed over rtnetlink, so such a pod is repaired in place too.
#[test]
fn without_ip_or_iptables_in_the_image_a_tproxy_ipv6_pod_is_repaired() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let ip = format!("fd00:{:x}::7", std::process::id() % 0xffff);
    let sandbox = Sandbox::new(&ip);
    let (_host, api, mut agent) = agent_as_in_the_scratch_image("repair-tproxy6");
    let mut pod = broken_pod("shop", "web-t6", &ip);
    pod["metadata"]["annotations"]["sidecar.istio.io/interceptionMode"] = json!("TPROXY");
    api.set_pod(pod);
    agent.wait_until("the pod repaired", |a| {
        metric(a, "repair", "success") == 1.0 || metric(a, "repair", "fail") == 1.0
    });
    assert_eq!(metric(&agent, "repair", "success"), 1.0, "{}", agent.log());
    let show = |argv: &[&str]| sandbox.netns.exec_ok(argv).unwrap_or_default();
    for fam in ["-4", "-6"] {
        let rules = show(&["ip", fam, "rule", "show"]);
        assert!(rules.contains("fwmark 0x539 lookup 133"), "{fam}: {rules}");
        let routes = show(&["ip", fam, "route", "show", "table", "133"]);
        assert!(routes.contains("local default dev lo"), "{fam}: {routes}");
    }
    let lo = show(&["ip", "-6", "addr", "show", "dev", "lo"]);
    assert!(lo.contains("::6/128"), "{lo}");
    let ruleset = show(&["nft", "list", "ruleset"]);
    assert!(
        ruleset.contains("table inet istio-proxy-mangle") && ruleset.contains("tproxy ip6"),
        "no TPROXY redirection in the pod's netns:\n{ruleset}"
    );
}
