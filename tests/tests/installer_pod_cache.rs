//! The node-local pod cache, end to end: install-cni watches its node's pods on the fake API
//! server (list + watch, as kube-rs does it against a real one), the installed istio-cni plugin
//! asks the agent over its socket first, and the API server sees no GET of the pod. Where the
//! agent cannot answer (it is gone, the pod is not its node's, another pod of the same name),
//! the plugin asks the API server, as Istio's does.
use fastpath_tests::cni::{Attachment, Runtime, load_conflist};
use fastpath_tests::installer::{Agent, Host};
use fastpath_tests::kube_api::{FakeKubeApi, sidecar_pod};
use fastpath_tests::netns::NetNs;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const TOKEN: &str = "pod-cache-token";
const NODE: &str = "node-a";

/// A sidecar pod bound to `node`.
fn pod_on(node: &str, ns: &str, name: &str) -> Value {
    let mut pod = sidecar_pod(ns, name, &[], &[]);
    pod["spec"]["nodeName"] = json!(node);
    pod
}

/// A host with a primary conflist, the real plugin in the image's place, and a fake API server
/// whose token is the service account's.
fn host_with_api(tag: &str) -> (Host, FakeKubeApi) {
    let host = Host::new(tag);
    let api = FakeKubeApi::start(&host.root.join("api"), TOKEN).unwrap();
    host.set_service_account(TOKEN, &api.ca_pem);
    std::fs::copy(
        fastpath_tests::bin_path("istio-cni"),
        host.src.join("istio-cni"),
    )
    .unwrap();
    host.write(
        "10-lo.conflist",
        r#"{"cniVersion": "1.0.0", "name": "fp-podcache", "plugins": [{"type": "loopback"}]}"#,
    );
    (host, api)
}

/// The agent on `host`, with the pod cache on (NODE_NAME set) and `extra` env, once ready.
fn start_agent(host: &Host, api: &FakeKubeApi, extra: &[(&str, &str)]) -> Agent {
    let port = api.addr.port().to_string();
    let mut env = vec![
        ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
        ("KUBERNETES_SERVICE_PORT", port.as_str()),
        ("NODE_NAME", NODE),
    ];
    env.extend_from_slice(extra);
    let mut agent = Agent::start(host, &env);
    agent.wait_ready();
    agent
}

/// Fields drop in order: the agent stops before its host's dirs go, or it would repair them
/// back into place after the removal.
struct Node {
    agent: Agent,
    runtime: Runtime,
    conflist: Value,
    api: FakeKubeApi,
    host: Host,
}

impl Node {
    /// An agent with the pod cache on (NODE_NAME set) and the real plugin installed, its watch
    /// established on the fake API server.
    fn start(tag: &str, bound_before: &[Value]) -> Node {
        Self::start_with(tag, bound_before, &[])
    }

    /// [`Node::start`] with more of the agent's env.
    fn start_with(tag: &str, bound_before: &[Value], env: &[(&str, &str)]) -> Node {
        let (host, api) = host_with_api(tag);
        for pod in bound_before {
            api.set_pod(pod.clone());
        }
        let mut agent = start_agent(&host, &api, env);
        let socket = fastpath_cni_plugin::pod_cache::socket_path(&host.run);
        agent.wait_until("the pod cache's socket and watch", |_| {
            socket.exists() && api.watches() >= 1
        });
        let conflist = load_conflist(&host.net_file("10-lo.conflist")).unwrap();
        let runtime = Runtime {
            cni_path: vec!["/usr/lib/cni".into(), host.bin.clone()],
            cache_dir: host.root.join("cni-cache"),
            env: vec![],
        };
        Node {
            host,
            api,
            agent,
            runtime,
            conflist,
        }
    }

    /// Runs ADD then DEL of the installed chain for pod `ns/name` (CNI_ARGS' UID `uid`) in a
    /// fresh netns; the ADD's result.
    fn add(&self, ns: &str, name: &str, uid: &str) -> Result<(), String> {
        let netns = NetNs::new(&fastpath_tests::unique_name("fppc")).unwrap();
        let att = Attachment {
            container_id: format!("cid-{}", netns.name),
            netns: netns.path(),
            ifname: "lo".into(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_UID={uid}"
            ),
        };
        let added = self.runtime.add(&self.conflist, &att);
        let _ = self.runtime.del(&self.conflist, &att);
        match added {
            Ok((_, runs))
                if runs
                    .iter()
                    .any(|r| r.plugin_type == "istio-cni" && r.status == 0) =>
            {
                let rules = netns
                    .exec_ok(&["iptables-save", "-t", "nat"])
                    .unwrap_or_default();
                if rules.contains("ISTIO_REDIRECT") {
                    Ok(())
                } else {
                    Err(format!("no redirection in the pod:\n{rules}"))
                }
            }
            Ok((_, runs)) => Err(format!("istio-cni did not run: {runs:?}")),
            Err(e) => Err(format!("{e:#}\nagent log:\n{}", self.agent.log())),
        }
    }
}

#[test]
fn a_pod_add_takes_the_pod_from_the_agents_watch_with_no_api_call() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    // Bound before the agent started: it comes with the first list.
    let node = Node::start("pc-hit", &[pod_on(NODE, "shop", "web-early")]);
    node.add("shop", "web-early", "uid-web-early").unwrap();
    // Bound after the watch started: it comes as a watch event.
    node.api.set_pod(pod_on(NODE, "shop", "web-late"));
    node.add("shop", "web-late", "uid-web-late").unwrap();
    assert_eq!(
        node.api.pod_gets("shop", "web-early"),
        0,
        "a GET for a cached pod"
    );
    assert_eq!(
        node.api.pod_gets("shop", "web-late"),
        0,
        "a GET for a cached pod"
    );

    // The plugin's own token no longer works for GETs (expired, istio#38077): the pod still
    // gets its rules from the agent's watch.
    node.api.set_pod(pod_on(NODE, "shop", "web-expired"));
    node.api
        .force_status("shop", "web-expired", 401, "Unauthorized: token expired");
    node.add("shop", "web-expired", "uid-web-expired").unwrap();
    assert_eq!(node.api.pod_gets("shop", "web-expired"), 0);
    let log = node.agent.log();
    assert!(log.contains("pod cache: watching the"), "{log}");
}

#[test]
fn what_the_agent_cannot_answer_is_asked_of_the_api_server() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let mut node = Node::start("pc-miss", &[]);
    // Another node's pod is never in this node's cache: after the agent's bounded wait, the
    // plugin asks the API server.
    node.api.set_pod(pod_on("node-b", "shop", "web-b"));
    let t = Instant::now();
    node.add("shop", "web-b", "uid-web-b").unwrap();
    assert_eq!(node.api.pod_gets("shop", "web-b"), 1);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "a miss took {:?}",
        t.elapsed()
    );
    // A pod of the same name but another UID (recreated; the runtime asks for the new one):
    // the cached one is not an answer.
    node.api.set_pod(pod_on(NODE, "shop", "web-0"));
    node.add("shop", "web-0", "uid-web-0").unwrap();
    assert_eq!(node.api.pod_gets("shop", "web-0"), 0, "web-0 is not cached");
    node.add("shop", "web-0", "uid-of-a-newer-web-0").unwrap();
    assert_eq!(node.api.pod_gets("shop", "web-0"), 1);

    // The agent is gone: the plugin asks the API server at once.
    node.agent.terminate();
    node.api.set_pod(pod_on(NODE, "shop", "web-after"));
    let t = Instant::now();
    node.add("shop", "web-after", "uid-web-after").unwrap();
    assert_eq!(node.api.pod_gets("shop", "web-after"), 1);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    drop(node.host);
}

#[test]
fn the_watch_resumes_after_the_api_server_drops_it_and_after_its_history_is_compacted() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let mut node = Node::start("pc-resume", &[]);
    for round in 0..2 {
        let watches = node.api.watches();
        if round == 0 {
            node.api.break_watches();
        } else {
            // Compacted: the resumed watch gets 410 Gone and lists again.
            node.api.compact_history();
            node.api.break_watches();
        }
        node.agent
            .wait_until("the watch to resume", |_| node.api.watches() > watches);
        let name = format!("web-resumed-{round}");
        node.api.set_pod(pod_on(NODE, "shop", &name));
        let deadline = Instant::now() + Duration::from_secs(10);
        // The pod reaches the cache through the new watch; until then a miss asks the API.
        loop {
            let before = node.api.pod_gets("shop", &name);
            node.add("shop", &name, &format!("uid-{name}")).unwrap();
            if node.api.pod_gets("shop", &name) == before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: the pod never came from the cache; agent log:\n{}",
                node.agent.log()
            );
        }
    }
}

#[test]
fn forbidden_to_list_pods_the_agent_keeps_running_and_adds_ask_the_api_server() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let (host, api) = host_with_api("pc-rbac");
    api.force_path_status(
        "/api/v1/pods",
        403,
        "pods is forbidden: User \"system:serviceaccount:istio-system:istio-cni\" cannot list resource \"pods\"",
    );
    let mut agent = start_agent(&host, &api, &[]);
    agent.wait_until("the forbidden list in the log", |a| {
        a.log().contains("pod cache: the watch of node") && a.log().contains("forbidden")
    });
    // Retried with backoff, logged once, and the agent stays up and ready.
    std::thread::sleep(Duration::from_secs(2));
    assert!(agent.is_running(), "the agent exited:\n{}", agent.log());
    assert!(agent.is_ready());
    let log = agent.log();
    assert_eq!(
        log.matches("pod cache: the watch of node").count(),
        1,
        "the same error logged at every retry:\n{log}"
    );
    assert!(
        api.lists() >= 2,
        "the list was not retried: {}",
        api.lists()
    );
}

/// A pod of this node whose `istio-validation` init container crashloops with exit code 126:
/// what the repair controller acts on.
fn broken_pod(ns: &str, name: &str) -> Value {
    let mut pod = pod_on(NODE, ns, name);
    pod["status"] = json!({
        "phase": "Pending",
        "initContainerStatuses": [{
            "name": "istio-validation", "image": "proxyv2", "imageID": "", "ready": false,
            "restartCount": 2, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 126, "reason": "Error"}}
        }]
    });
    pod
}

/// With the pod cache and the repair controller both on, the API server sees one list and one
/// watch of the node's pods (as with Istio's agent), not one per feature; both are served from
/// it, also after the watch was dropped and resumed.
#[test]
fn with_the_repair_controller_on_too_the_node_holds_one_pod_watch() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let mut node = Node::start_with(
        "pc-one-watch",
        &[pod_on(NODE, "shop", "web-0")],
        &[("REPAIR_DELETE_PODS", "true"), ("REPAIR_NODE_NAME", NODE)],
    );
    node.agent.wait_until("both on the watch", |a| {
        a.log().contains("pod cache: watching the")
            && a.log()
                .contains("repair controller: watching the pods of node")
    });
    let steady = |what: &str| {
        // Sampled for a while: a second watch would be open by now.
        for _ in 0..20 {
            assert_eq!(node.api.open_watches(), 1, "{what}: pod watches open");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    steady("started");
    assert_eq!(node.api.lists(), 1, "pod lists");
    assert_eq!(node.api.watches(), 1, "pod watches");
    node.add("shop", "web-0", "uid-web-0").unwrap();
    assert_eq!(
        node.api.pod_gets("shop", "web-0"),
        0,
        "a GET for a cached pod"
    );
    node.api.set_pod(broken_pod("shop", "broken-0"));
    node.agent.wait_until("the broken pod deleted", |_| {
        node.api.pod("shop", "broken-0").is_none()
    });

    let watches = node.api.watches();
    node.api.break_watches();
    node.agent
        .wait_until("the watch to resume", |_| node.api.watches() > watches);
    steady("resumed");
    assert_eq!(node.api.watches(), watches + 1, "one watch resumed");
    node.api.set_pod(pod_on(NODE, "shop", "web-1"));
    node.api.set_pod(broken_pod("shop", "broken-1"));
    node.agent.wait_until("the second broken pod deleted", |_| {
        node.api.pod("shop", "broken-1").is_none()
    });
    node.add("shop", "web-1", "uid-web-1").unwrap();
    assert_eq!(
        node.api.pod_gets("shop", "web-1"),
        0,
        "a GET for a cached pod"
    );
}
