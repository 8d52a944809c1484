//! What a SIGTERM means. A DaemonSet pod is stopped for an upgrade or a restart (a new agent
//! takes the node's install over, so the plugin, its config and the accelerator's pins must
//! stay: pods created in between keep getting their redirection) or for an uninstall (nothing
//! of fastpath may stay on the node). The pod cannot tell from the signal, so it asks the API,
//! as Istio's node agent does: its own pod names the DaemonSet that owns it; the DaemonSet
//! gone, being deleted, or no longer selecting this node means uninstall; anything else is an
//! upgrade. When the API cannot answer, everything stays, and the log says how to clean up.
//!
//! [`decide`] is the pure part (what the answers mean); [`ask_api`] fetches them.
use fastpath_cni_plugin::kube::{self, FetchError, KubeAccess, Object};
use serde_json::Value;

/// `FASTPATH_KEEP_INSTALL_ON_SHUTDOWN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepInstall {
    /// Ask the API (the default).
    Auto,
    /// Always keep everything (`true`, the old knob for rolling updates).
    Always,
    /// Always remove everything (`false`).
    Never,
}

impl KeepInstall {
    /// `auto`, or a Go-style boolean (what the knob took before).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "auto" | "" => Some(KeepInstall::Auto),
            other => crate::config::parse_bool(other).map(|keep| match keep {
                true => KeepInstall::Always,
                false => KeepInstall::Never,
            }),
        }
    }
}

impl std::fmt::Display for KeepInstall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeepInstall::Auto => "auto",
            KeepInstall::Always => "true",
            KeepInstall::Never => "false",
        })
    }
}

/// What the agent does on SIGTERM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Keep the plugin, its config and kubeconfig, and the accelerator.
    Upgrade(String),
    /// Remove everything.
    Uninstall(String),
    /// The API could not tell: keep everything (the safe side: a node whose agent is gone
    /// keeps redirecting), and say how to clean up.
    Unknown(String),
}

/// Who this pod is (downward API).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub pod_namespace: String,
    pub pod_name: String,
    pub node_name: String,
}

/// The command that removes what an agent left, for the log line of [`Verdict::Unknown`].
pub const CLEANUP_HINT: &str = "to remove fastpath from this node, run `install-cni uninstall` \
    with the DaemonSet's mounts (manifests/cleanup-daemonset.yaml runs it on every node)";

/// Decides from the API's answers; `get` returns an object's JSON or why it could not.
pub fn decide(me: &Identity, get: impl Fn(Object<'_>) -> Result<Value, FetchError>) -> Verdict {
    if me.pod_name.is_empty() || me.pod_namespace.is_empty() {
        return Verdict::Unknown(
            "POD_NAME or POD_NAMESPACE is not set, so the DaemonSet cannot be found".into(),
        );
    }
    let ns = me.pod_namespace.as_str();
    let pod = get(Object::Pod {
        namespace: ns,
        name: &me.pod_name,
    });
    let (daemonset, node_name) = match &pod {
        Ok(pod) => match daemonset_owner(pod) {
            Some(name) => (name, pod_node(pod).unwrap_or(&me.node_name).to_string()),
            None => {
                return Verdict::Unknown(format!(
                    "pod {ns}/{} is not owned by a DaemonSet",
                    me.pod_name
                ));
            }
        },
        Err(e) if gone_credentials(e) => return uninstall_for(e),
        // Without its owner the DaemonSet's name would be a guess, and a guessed name that
        // is not found would uninstall a node in the middle of a rolling update.
        Err(e) => {
            return Verdict::Unknown(format!(
                "cannot read pod {ns}/{} for its DaemonSet: {}",
                me.pod_name,
                brief(e)
            ));
        }
    };
    let ds = match get(Object::DaemonSet {
        namespace: ns,
        name: &daemonset,
    }) {
        Ok(ds) => ds,
        Err(FetchError::Status(404, _)) => {
            return Verdict::Uninstall(format!("DaemonSet {ns}/{daemonset} is gone"));
        }
        Err(e) if gone_credentials(&e) => return uninstall_for(&e),
        Err(e) => {
            return Verdict::Unknown(format!(
                "cannot read DaemonSet {ns}/{daemonset}: {}",
                brief(&e)
            ));
        }
    };
    if ds["metadata"]["deletionTimestamp"].is_string() {
        return Verdict::Uninstall(format!("DaemonSet {ns}/{daemonset} is being deleted"));
    }
    if node_name.is_empty() {
        return Verdict::Upgrade(format!(
            "DaemonSet {ns}/{daemonset} is in place (the node name is unknown, so its node \
             selection was not checked)"
        ));
    }
    match get(Object::Node { name: &node_name }) {
        Ok(node) => match selects(&ds["spec"]["template"]["spec"], &node, &node_name) {
            true => Verdict::Upgrade(format!(
                "DaemonSet {ns}/{daemonset} is in place and still selects node {node_name}"
            )),
            false => Verdict::Uninstall(format!(
                "DaemonSet {ns}/{daemonset} no longer selects node {node_name} (node selector \
                 or required node affinity)"
            )),
        },
        Err(e) => Verdict::Upgrade(format!(
            "DaemonSet {ns}/{daemonset} is in place (node {node_name} could not be read to \
             check its node selection: {})",
            brief(&e)
        )),
    }
}

/// 401: the service account's token is no longer accepted, which is what an uninstall that
/// deleted the service account leaves (Istio's agent takes it the same way).
fn gone_credentials(e: &FetchError) -> bool {
    matches!(e, FetchError::Status(401, _))
}

fn uninstall_for(e: &FetchError) -> Verdict {
    Verdict::Uninstall(format!(
        "the API server no longer accepts this pod's token ({}): its service account was deleted",
        brief(e)
    ))
}

/// A one-line reason, without the plugin-oriented advice of `FetchError`'s Display.
fn brief(e: &FetchError) -> String {
    match e {
        FetchError::Status(403, m) => format!(
            "Forbidden (403): {m}; the agent's ClusterRole needs get on daemonsets.apps \
             (fastpath's manifests grant it, Istio's chart does not)"
        ),
        FetchError::Status(s, m) => format!("API server answered {s}: {m}"),
        other => other.to_string(),
    }
}

fn daemonset_owner(pod: &Value) -> Option<String> {
    pod["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|o| {
            o["kind"] == "DaemonSet"
                && o["apiVersion"]
                    .as_str()
                    .is_some_and(|v| v.starts_with("apps/"))
        })
        .and_then(|o| o["name"].as_str())
        .map(str::to_string)
}

fn pod_node(pod: &Value) -> Option<&str> {
    pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty())
}

/// Whether a pod template (`spec`) may run on `node`: its nodeSelector and its required node
/// affinity (`requiredDuringSchedulingIgnoredDuringExecution`), with Kubernetes' semantics:
/// every selector label must match; at least one term must match, a term matching when all
/// its expressions and fields do; a term with neither matches nothing.
pub fn selects(spec: &Value, node: &Value, node_name: &str) -> bool {
    let labels = &node["metadata"]["labels"];
    let label = |k: &str| labels[k].as_str();
    if let Some(selector) = spec["nodeSelector"].as_object()
        && !selector.iter().all(|(k, v)| label(k) == v.as_str())
    {
        return false;
    }
    let terms = &spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"];
    let Some(terms) = terms.as_array() else {
        return true;
    };
    let field = |k: &str| match k {
        "metadata.name" => Some(node_name),
        _ => None,
    };
    terms.iter().any(|term| {
        let exprs = term["matchExpressions"].as_array().map(Vec::as_slice);
        let fields = term["matchFields"].as_array().map(Vec::as_slice);
        let (exprs, fields) = (exprs.unwrap_or_default(), fields.unwrap_or_default());
        (!exprs.is_empty() || !fields.is_empty())
            && exprs.iter().all(|e| requirement_holds(e, label))
            && fields.iter().all(|e| requirement_holds(e, field))
    })
}

/// One `NodeSelectorRequirement` against a lookup of the node's labels or fields.
fn requirement_holds<'a>(req: &Value, value_of: impl Fn(&str) -> Option<&'a str>) -> bool {
    let Some(key) = req["key"].as_str() else {
        return false;
    };
    let have = value_of(key);
    let values: Vec<&str> = req["values"]
        .as_array()
        .map(|v| v.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let number = |s: Option<&str>| s.and_then(|s| s.trim().parse::<i64>().ok());
    match req["operator"].as_str() {
        Some("In") => have.is_some_and(|h| values.contains(&h)),
        Some("NotIn") => !have.is_some_and(|h| values.contains(&h)),
        Some("Exists") => have.is_some(),
        Some("DoesNotExist") => have.is_none(),
        Some("Gt") => {
            matches!((number(have), number(values.first().copied())), (Some(h), Some(v)) if h > v)
        }
        Some("Lt") => {
            matches!((number(have), number(values.first().copied())), (Some(h), Some(v)) if h < v)
        }
        _ => false,
    }
}

/// Answers [`decide`]'s questions from the API, retrying what may pass (no answer, 429, 5xx)
/// twice, a second apart: a SIGTERM leaves the pod its grace period (30 s in Istio's chart).
pub fn ask_api(access: &KubeAccess, object: Object<'_>) -> Result<Value, FetchError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let got = kube::get(access, object).and_then(|body| {
            serde_json::from_slice(&body).map_err(|e| FetchError::Decode(e.to_string()))
        });
        let transient = matches!(&got, Err(FetchError::Transport(_)))
            || matches!(&got, Err(FetchError::Status(s, _)) if *s == 429 || *s >= 500);
        if !transient || attempt == 3 {
            return got;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    fn me() -> Identity {
        Identity {
            pod_namespace: "istio-system".into(),
            pod_name: "istio-cni-node-abcde".into(),
            node_name: "node-1".into(),
        }
    }

    fn pod() -> Value {
        json!({"metadata": {"name": "istio-cni-node-abcde", "namespace": "istio-system",
               "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                    "name": "fastpath-cni", "uid": "u1"}]},
               "spec": {"nodeName": "node-1"}})
    }

    fn daemonset(template_spec: Value) -> Value {
        json!({"metadata": {"name": "fastpath-cni", "namespace": "istio-system"},
               "spec": {"template": {"spec": template_spec}}})
    }

    fn node(labels: Value) -> Value {
        json!({"metadata": {"name": "node-1", "labels": labels}})
    }

    /// An API with these objects (by path); everything else is 404, unless `forced`.
    fn api(
        objects: Vec<(&str, Value)>,
        forced: Vec<(&str, FetchError)>,
    ) -> impl Fn(Object<'_>) -> Result<Value, FetchError> {
        let objects: HashMap<String, Value> = objects
            .into_iter()
            .map(|(p, v)| (p.to_string(), v))
            .collect();
        let forced: HashMap<String, FetchError> = forced
            .into_iter()
            .map(|(p, e)| (p.to_string(), e))
            .collect();
        move |o| {
            let path = o.path()?;
            if let Some(e) = forced.get(&path) {
                return Err(e.clone());
            }
            objects
                .get(&path)
                .cloned()
                .ok_or_else(|| FetchError::Status(404, format!("{path} not found")))
        }
    }

    const POD: &str = "/api/v1/namespaces/istio-system/pods/istio-cni-node-abcde";
    const DS: &str = "/apis/apps/v1/namespaces/istio-system/daemonsets/fastpath-cni";
    const NODE: &str = "/api/v1/nodes/node-1";

    fn verdict(objects: Vec<(&str, Value)>, forced: Vec<(&str, FetchError)>) -> Verdict {
        decide(&me(), api(objects, forced))
    }

    #[test]
    fn the_daemonset_in_place_and_selecting_the_node_is_an_upgrade() {
        let ds = daemonset(json!({"nodeSelector": {"kubernetes.io/os": "linux"}}));
        let v = verdict(
            vec![
                (POD, pod()),
                (DS, ds),
                (NODE, node(json!({"kubernetes.io/os": "linux"}))),
            ],
            vec![],
        );
        assert!(
            matches!(v, Verdict::Upgrade(ref m) if m.contains("still selects node node-1")),
            "{v:?}"
        );
    }

    #[test]
    fn the_daemonset_gone_or_being_deleted_is_an_uninstall() {
        let v = verdict(vec![(POD, pod())], vec![]);
        assert_eq!(
            v,
            Verdict::Uninstall("DaemonSet istio-system/fastpath-cni is gone".into())
        );
        let mut ds = daemonset(json!({}));
        ds["metadata"]["deletionTimestamp"] = json!("2026-12-05T10:00:00Z");
        let v = verdict(
            vec![(POD, pod()), (DS, ds), (NODE, node(json!({})))],
            vec![],
        );
        assert!(
            matches!(v, Verdict::Uninstall(ref m) if m.contains("being deleted")),
            "{v:?}"
        );
    }

    #[test]
    fn a_node_the_daemonset_no_longer_selects_is_uninstalled() {
        let by_selector = daemonset(json!({"nodeSelector": {"mesh": "on"}}));
        let v = verdict(
            vec![
                (POD, pod()),
                (DS, by_selector),
                (NODE, node(json!({"mesh": "off"}))),
            ],
            vec![],
        );
        assert!(
            matches!(v, Verdict::Uninstall(ref m) if m.contains("no longer selects")),
            "{v:?}"
        );
        let by_affinity = daemonset(json!({"affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["mesh"]}]}]}}}}));
        let v = verdict(
            vec![
                (POD, pod()),
                (DS, by_affinity),
                (NODE, node(json!({"pool": "batch"}))),
            ],
            vec![],
        );
        assert!(matches!(v, Verdict::Uninstall(_)), "{v:?}");
    }

    #[test]
    fn a_rejected_token_is_an_uninstall_and_a_forbidden_daemonset_keeps_everything() {
        let v = verdict(
            vec![],
            vec![(POD, FetchError::Status(401, "Unauthorized".into()))],
        );
        assert!(
            matches!(v, Verdict::Uninstall(ref m) if m.contains("service account")),
            "{v:?}"
        );
        // Istio's chart grants no get on daemonsets: the agent cannot tell, and keeps all.
        let v = verdict(
            vec![(POD, pod())],
            vec![(
                DS,
                FetchError::Status(403, "daemonsets.apps is forbidden".into()),
            )],
        );
        assert!(
            matches!(v, Verdict::Unknown(ref m) if m.contains("get on daemonsets.apps") && m.contains("fastpath-cni")),
            "{v:?}"
        );
    }

    #[test]
    fn without_its_pod_the_daemonset_is_not_guessed() {
        let v = verdict(
            vec![],
            vec![(POD, FetchError::Transport("connection refused".into()))],
        );
        assert!(
            matches!(v, Verdict::Unknown(ref m) if m.contains("connection refused")),
            "{v:?}"
        );
        let v = verdict(vec![], vec![]);
        assert!(
            matches!(v, Verdict::Unknown(ref m) if m.contains("404")),
            "{v:?}"
        );
    }

    #[test]
    fn unknown_identity_or_owner_keeps_everything() {
        let v = decide(&Identity::default(), api(vec![], vec![]));
        assert!(
            matches!(v, Verdict::Unknown(ref m) if m.contains("POD_NAME")),
            "{v:?}"
        );
        let mut orphan = pod();
        orphan["metadata"]["ownerReferences"] =
            json!([{"apiVersion": "v1", "kind": "Node", "name": "x"}]);
        let v = verdict(vec![(POD, orphan)], vec![]);
        assert!(
            matches!(v, Verdict::Unknown(ref m) if m.contains("not owned by a DaemonSet")),
            "{v:?}"
        );
    }

    #[test]
    fn node_selection_follows_kubernetes_semantics() {
        let n = node(json!({"zone": "a", "gen": "7"}));
        let term = |exprs: Value| {
            json!({"affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [exprs]}}}})
        };
        let cases = [
            (json!({}), true),
            (json!({"nodeSelector": {"zone": "a"}}), true),
            (json!({"nodeSelector": {"zone": "a", "ssd": "yes"}}), false),
            (
                term(
                    json!({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["b"]}]}),
                ),
                true,
            ),
            (
                term(
                    json!({"matchExpressions": [{"key": "ssd", "operator": "NotIn", "values": ["yes"]}]}),
                ),
                true,
            ),
            (
                term(json!({"matchExpressions": [{"key": "zone", "operator": "Exists"}]})),
                true,
            ),
            (
                term(json!({"matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]})),
                false,
            ),
            (
                term(
                    json!({"matchExpressions": [{"key": "gen", "operator": "Gt", "values": ["6"]}]}),
                ),
                true,
            ),
            (
                term(
                    json!({"matchExpressions": [{"key": "gen", "operator": "Lt", "values": ["6"]}]}),
                ),
                false,
            ),
            (
                term(
                    json!({"matchExpressions": [{"key": "zone", "operator": "Gt", "values": ["1"]}]}),
                ),
                false,
            ),
            (
                term(
                    json!({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-1"]}]}),
                ),
                true,
            ),
            (
                term(
                    json!({"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-2"]}]}),
                ),
                false,
            ),
            (
                term(json!({"matchExpressions": [{"key": "zone", "operator": "Sideways"}]})),
                false,
            ),
            // An empty term matches nothing.
            (term(json!({})), false),
        ];
        for (spec, want) in cases {
            assert_eq!(selects(&spec, &n, "node-1"), want, "{spec}");
        }
        // Terms are ORed.
        let two = json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
            {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]},
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}});
        assert!(selects(&two, &n, "node-1"));
    }

    #[test]
    fn the_knob_takes_auto_and_booleans() {
        assert_eq!(KeepInstall::parse("auto"), Some(KeepInstall::Auto));
        assert_eq!(KeepInstall::parse(""), Some(KeepInstall::Auto));
        assert_eq!(KeepInstall::parse("true"), Some(KeepInstall::Always));
        assert_eq!(KeepInstall::parse("0"), Some(KeepInstall::Never));
        assert_eq!(KeepInstall::parse("sometimes"), None);
    }
}
