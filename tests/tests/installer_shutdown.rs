//! What install-cni does on SIGTERM with `FASTPATH_KEEP_INSTALL_ON_SHUTDOWN=auto` (the
//! default): it asks the API (the project's fake server) whether its DaemonSet is still there
//! and still selects this node. An upgrade keeps everything for the next agent; an uninstall
//! removes everything; an API that cannot tell keeps everything and says how to clean up.
use fastpath_tests::installer::{Agent, Host, PRIMARY, plugin_types};
use fastpath_tests::kube_api::FakeKubeApi;
use serde_json::{Value, json};

const TOKEN: &str = "shutdown-token";
const POD: &str = "istio-cni-node-x7k2p";
const DS_PATH: &str = "/apis/apps/v1/namespaces/istio-system/daemonsets/istio-cni-node";
const NODE_PATH: &str = "/api/v1/nodes/node-a";

fn own_pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": POD, "namespace": "istio-system",
                        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                             "name": "istio-cni-node", "uid": "ds-uid",
                                             "controller": true}]},
           "spec": {"nodeName": "node-a"}})
}

fn daemonset() -> Value {
    json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
           "metadata": {"name": "istio-cni-node", "namespace": "istio-system", "uid": "ds-uid"},
           "spec": {"template": {"spec": {"nodeSelector": {"kubernetes.io/os": "linux"}}}}})
}

fn node(labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": labels}})
}

/// A node with an installed agent that knows its pod and node names, and an API that serves
/// its pod, its DaemonSet and its node.
///
/// Fields drop in order: the agent stops before its host's dirs go.
struct Cluster {
    agent: Agent,
    api: FakeKubeApi,
    host: Host,
}

impl Cluster {
    fn start(tag: &str) -> Cluster {
        let host = Host::new(tag);
        let api = FakeKubeApi::start(&host.root.join("api"), TOKEN).unwrap();
        host.set_service_account(TOKEN, &api.ca_pem);
        host.write("10-dbnet.conflist", PRIMARY);
        api.set_pod(own_pod());
        api.set_object(DS_PATH, daemonset());
        api.set_object(NODE_PATH, node(json!({"kubernetes.io/os": "linux"})));
        let port = api.addr.port().to_string();
        let mut agent = Agent::start(
            &host,
            &[
                ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
                ("KUBERNETES_SERVICE_PORT", &port),
                ("POD_NAME", POD),
                ("NODE_NAME", "node-a"),
            ],
        );
        agent.wait_ready();
        Cluster { host, api, agent }
    }

    fn terminate(&mut self) -> String {
        let st = self.agent.terminate();
        let log = self.agent.log();
        assert!(st.success(), "{st}; log:\n{log}");
        log
    }

    fn installed(&self) -> (bool, bool, bool) {
        let entry = plugin_types(&self.host.json("10-dbnet.conflist"))
            .last()
            .is_some_and(|t| t == "istio-cni");
        (
            entry,
            self.host.kubeconfig().exists(),
            self.host.plugin().exists(),
        )
    }
}

#[test]
fn sigterm_while_the_daemonset_still_selects_the_node_keeps_everything_for_the_next_agent() {
    let mut c = Cluster::start("sd-upgrade");
    let log = c.terminate();
    assert_eq!(c.installed(), (true, true, true), "log:\n{log}");
    assert!(log.contains("upgrade or restart"), "{log}");
    let asked: Vec<String> = c.api.requests().into_iter().map(|r| r.path).collect();
    for path in [
        format!("/api/v1/namespaces/istio-system/pods/{POD}"),
        DS_PATH.to_string(),
        NODE_PATH.to_string(),
    ] {
        assert!(asked.contains(&path), "{path} not asked: {asked:?}");
    }
}

#[test]
fn sigterm_after_the_daemonset_was_deleted_removes_everything() {
    let mut c = Cluster::start("sd-gone");
    c.api.remove_object(DS_PATH);
    let log = c.terminate();
    assert_eq!(c.installed(), (false, false, false), "log:\n{log}");
    assert!(
        log.contains("DaemonSet istio-system/istio-cni-node is gone"),
        "{log}"
    );
}

#[test]
fn sigterm_while_the_daemonset_is_being_deleted_removes_everything() {
    let mut c = Cluster::start("sd-deleting");
    let mut ds = daemonset();
    ds["metadata"]["deletionTimestamp"] = json!("2026-12-05T12:00:00Z");
    c.api.set_object(DS_PATH, ds);
    let log = c.terminate();
    assert_eq!(c.installed(), (false, false, false), "log:\n{log}");
    assert!(log.contains("is being deleted"), "{log}");
}

#[test]
fn sigterm_on_a_node_the_daemonset_no_longer_selects_removes_everything() {
    let mut c = Cluster::start("sd-unselected");
    let mut ds = daemonset();
    ds["spec"]["template"]["spec"]["affinity"] = json!({"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "mesh", "operator": "In", "values": ["sidecar"]}]}]}}});
    c.api.set_object(DS_PATH, ds);
    let log = c.terminate();
    assert_eq!(c.installed(), (false, false, false), "log:\n{log}");
    assert!(log.contains("no longer selects node node-a"), "{log}");
}

#[test]
fn sigterm_with_the_service_account_gone_removes_everything() {
    let mut c = Cluster::start("sd-token");
    let pod_path = format!("/api/v1/namespaces/istio-system/pods/{POD}");
    c.api.force_path_status(&pod_path, 401, "Unauthorized");
    let log = c.terminate();
    assert_eq!(c.installed(), (false, false, false), "log:\n{log}");
    assert!(log.contains("service account was deleted"), "{log}");
}

/// Istio's chart grants no get on DaemonSets: the agent cannot tell, keeps everything, and
/// says in one line why and how to clean up.
#[test]
fn sigterm_without_the_right_to_read_the_daemonset_keeps_everything_and_says_how_to_clean_up() {
    let mut c = Cluster::start("sd-forbidden");
    c.api.force_path_status(
        DS_PATH,
        403,
        "daemonsets.apps \"istio-cni-node\" is forbidden: User \"system:serviceaccount:istio-system:istio-cni\" cannot get resource \"daemonsets\"",
    );
    let log = c.terminate();
    assert_eq!(c.installed(), (true, true, true), "log:\n{log}");
    let line = log
        .lines()
        .find(|l| l.contains("cannot tell an upgrade from an uninstall"))
        .unwrap_or_else(|| panic!("no line says why everything stays:\n{log}"));
    assert!(
        line.contains("get on daemonsets.apps") && line.contains("install-cni uninstall"),
        "{line}"
    );
}

#[test]
fn the_knob_overrides_the_api() {
    let mut c = Cluster::start("sd-knob");
    c.api.remove_object(DS_PATH);
    c.agent.signal(libc::SIGKILL);
    let port = c.api.addr.port().to_string();
    let env = [
        ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
        ("KUBERNETES_SERVICE_PORT", port.as_str()),
        ("POD_NAME", POD),
        ("NODE_NAME", "node-a"),
        ("FASTPATH_KEEP_INSTALL_ON_SHUTDOWN", "true"),
    ];
    c.agent = Agent::start(&c.host, &env);
    c.agent.wait_ready();
    let log = c.terminate();
    assert_eq!(c.installed(), (true, true, true), "log:\n{log}");
    assert!(
        log.contains("FASTPATH_KEEP_INSTALL_ON_SHUTDOWN=true"),
        "{log}"
    );
}
