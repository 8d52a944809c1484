//! The pod as the API returns it (only the fields the plugin reads), and Istio's sidecar
//! decision (`cni/pkg/plugin/plugin.go` `CmdAdd`, exclusion checks in order).
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

pub const INJECT_KEY: &str = "sidecar.istio.io/inject";
pub const STATUS_KEY: &str = "sidecar.istio.io/status";
pub const ISTIO_PROXY: &str = "istio-proxy";
pub const ISTIO_INIT: &str = "istio-init";

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Pod {
    pub metadata: ObjectMeta,
    pub spec: PodSpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ObjectMeta {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// Kept as JSON values: the accelerator reads its own opt-outs from them.
    pub annotations: Map<String, Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct PodSpec {
    pub containers: Vec<Container>,
    pub init_containers: Vec<Container>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<EnvVar>,
    pub security_context: Option<SecurityContext>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct EnvVar {
    pub name: String,
    /// Absent for `valueFrom` variables, which the plugin cannot resolve (as Istio).
    pub value: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct SecurityContext {
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
}

/// A body that is not a Pod's JSON.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct PodDecodeError(pub serde_json::Error);

impl Pod {
    pub fn from_json(body: &[u8]) -> Result<Self, PodDecodeError> {
        serde_json::from_slice(body).map_err(PodDecodeError)
    }

    fn all_containers(&self) -> impl Iterator<Item = &Container> {
        self.spec
            .containers
            .iter()
            .chain(self.spec.init_containers.iter())
    }

    /// `istio-proxy`, as a container or a native-sidecar init container.
    pub fn proxy_container(&self) -> Option<&Container> {
        self.all_containers().find(|c| c.name == ISTIO_PROXY)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata.annotations.get(key).and_then(Value::as_str)
    }
}

impl Container {
    /// The literal value of an env var (the last one wins, as in Kubernetes).
    pub fn env_value(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|e| e.name == name)
            .and_then(|e| e.value.as_deref())
    }
}

/// Go's `strconv.ParseBool`.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Why a pod gets no redirection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    HasIstioInit,
    EnvoyDisabled,
    NoProxyContainer,
    NotASidecar(String),
    InjectionDisabled,
    NoSidecarStatus,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::HasIstioInit => write!(
                f,
                "pod has an istio-init container: it sets up its own iptables"
            ),
            Skip::EnvoyDisabled => write!(f, "istio-proxy has DISABLE_ENVOY set"),
            Skip::NoProxyContainer => write!(f, "pod has no istio-proxy container"),
            Skip::NotASidecar(t) => write!(f, "istio-proxy runs as {t:?}, not a sidecar"),
            Skip::InjectionDisabled => write!(f, "sidecar injection is disabled for the pod"),
            Skip::NoSidecarStatus => {
                write!(f, "pod has no sidecar.istio.io/status annotation")
            }
        }
    }
}

/// Istio's exclusion checks, in its order. `None` means: redirect this pod.
pub fn sidecar_skip_reason(pod: &Pod) -> Option<Skip> {
    if pod.all_containers().any(|c| c.name == ISTIO_INIT) {
        return Some(Skip::HasIstioInit);
    }
    let proxy = pod.proxy_container();
    if proxy
        .and_then(|p| p.env_value("DISABLE_ENVOY"))
        .and_then(parse_go_bool)
        == Some(true)
    {
        return Some(Skip::EnvoyDisabled);
    }
    let Some(proxy) = proxy else {
        return Some(Skip::NoProxyContainer);
    };
    if proxy.args.len() >= 2 && proxy.args[0] == "proxy" && proxy.args[1] != "sidecar" {
        return Some(Skip::NotASidecar(proxy.args[1].clone()));
    }
    let inject = pod
        .metadata
        .labels
        .get(INJECT_KEY)
        .map(String::as_str)
        .or_else(|| pod.annotation(INJECT_KEY));
    if inject.and_then(parse_go_bool) == Some(false) {
        return Some(Skip::InjectionDisabled);
    }
    if !pod.metadata.annotations.contains_key(STATUS_KEY) {
        return Some(Skip::NoSidecarStatus);
    }
    None
}

/// Istio's own agent pod (`istio-cni-node-*` in `pod_namespace`) is never redirected.
pub fn is_agent_pod(pod_name: &str, pod_namespace: &str, agent_namespace: &str) -> bool {
    pod_name.starts_with("istio-cni-node-") && pod_namespace == agent_namespace
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use serde_json::json;

    /// A pod as the injector leaves it with CNI enabled (istio-validation, no istio-init).
    pub fn injected_pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-0", "namespace": "shop", "uid": "1234",
                "labels": {"app": "web", "security.istio.io/tlsMode": "istio"},
                "annotations": {
                    "sidecar.istio.io/status": "{\"initContainers\":[\"istio-validation\"],\"containers\":[\"istio-proxy\"]}",
                    "kubectl.kubernetes.io/default-container": "web"
                }
            },
            "spec": {
                "initContainers": [{"name": "istio-validation", "image": "proxyv2", "args": ["istio-iptables", "--run-validation", "--skip-rule-apply"]}],
                "containers": [
                    {"name": "web", "image": "nginx", "ports": [{"containerPort": 80}]},
                    {"name": "istio-proxy", "image": "proxyv2", "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local"],
                     "env": [{"name": "ISTIO_META_POD_PORTS", "value": "[]"}, {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                     "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}
                ]
            },
            "status": {"phase": "Pending"}
        })
    }

    fn pod(v: &Value) -> Pod {
        Pod::from_json(v.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn injected_pod_is_redirected() {
        assert_eq!(sidecar_skip_reason(&pod(&injected_pod())), None);
    }

    #[test]
    fn each_exclusion_in_order() {
        let mut v = injected_pod();
        v["spec"]["initContainers"][0]["name"] = json!("istio-init");
        assert_eq!(sidecar_skip_reason(&pod(&v)), Some(Skip::HasIstioInit));

        let mut v = injected_pod();
        v["spec"]["containers"][1]["env"] = json!([{"name": "DISABLE_ENVOY", "value": "true"}]);
        assert_eq!(sidecar_skip_reason(&pod(&v)), Some(Skip::EnvoyDisabled));
        v["spec"]["containers"][1]["env"] = json!([{"name": "DISABLE_ENVOY", "value": "nonsense"}]);
        assert_eq!(sidecar_skip_reason(&pod(&v)), None);

        let mut v = injected_pod();
        v["spec"]["containers"][1]["name"] = json!("sidecar");
        assert_eq!(sidecar_skip_reason(&pod(&v)), Some(Skip::NoProxyContainer));

        let mut v = injected_pod();
        v["spec"]["containers"][1]["args"] = json!(["proxy", "router"]);
        assert_eq!(
            sidecar_skip_reason(&pod(&v)),
            Some(Skip::NotASidecar("router".into()))
        );

        let mut v = injected_pod();
        v["metadata"]["annotations"][INJECT_KEY] = json!("false");
        assert_eq!(sidecar_skip_reason(&pod(&v)), Some(Skip::InjectionDisabled));
        // the label wins over the annotation
        v["metadata"]["labels"][INJECT_KEY] = json!("true");
        assert_eq!(sidecar_skip_reason(&pod(&v)), None);

        let mut v = injected_pod();
        v["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove(STATUS_KEY);
        assert_eq!(sidecar_skip_reason(&pod(&v)), Some(Skip::NoSidecarStatus));
    }

    #[test]
    fn native_sidecar_counts_as_proxy() {
        let mut v = injected_pod();
        let proxy = v["spec"]["containers"][1].clone();
        v["spec"]["containers"].as_array_mut().unwrap().pop();
        v["spec"]["initContainers"]
            .as_array_mut()
            .unwrap()
            .push(proxy);
        assert_eq!(sidecar_skip_reason(&pod(&v)), None);
    }

    #[test]
    fn plain_pod_has_no_proxy() {
        let p = pod(&json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "app"}]}}));
        assert_eq!(sidecar_skip_reason(&p), Some(Skip::NoProxyContainer));
    }

    #[test]
    fn agent_pod() {
        assert!(is_agent_pod(
            "istio-cni-node-abcde",
            "istio-system",
            "istio-system"
        ));
        assert!(!is_agent_pod(
            "istio-cni-node-abcde",
            "default",
            "istio-system"
        ));
        assert!(!is_agent_pod("web", "istio-system", "istio-system"));
    }

    #[test]
    fn go_bools() {
        assert_eq!(parse_go_bool("True"), Some(true));
        assert_eq!(parse_go_bool("0"), Some(false));
        assert_eq!(parse_go_bool("yes"), None);
    }
}
