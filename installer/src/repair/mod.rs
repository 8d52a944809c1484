//! Istio's repair controller (`cni/pkg/repair/` in github.com/istio/istio): it watches the pods
//! of this node and acts on those whose `istio-validation` init container found no redirection
//! (a pod that started before the plugin was in the node's CNI config, istio/istio#14327).
//!
//! This module holds the pure decisions (is a pod broken, which action, the label patch, the
//! selectors, [`selector`]), kept apart from the side effects: [`run`] (the pod watch's events,
//! delete, label, events, metrics) and [`netns`] (finding the pod's network namespace through the host's procfs and
//! applying the plugin's redirection there).
pub mod netns;
pub mod run;
pub mod selector;

use std::path::PathBuf;

use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};

pub use run::{RepairFeed, start};

/// The repair controller's settings (Istio's `REPAIR_*`, plus where the host's procfs is).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepairSettings {
    pub enabled: bool,
    pub repair_pods: bool,
    pub delete_pods: bool,
    pub label_pods: bool,
    pub label_key: String,
    pub label_value: String,
    /// `REPAIR_NODE_NAME`, or `NODE_NAME` when it is empty.
    pub node_name: String,
    pub sidecar_annotation: String,
    pub init_container_name: String,
    pub init_container_termination_message: String,
    /// 0: any exit code.
    pub init_container_exit_code: i64,
    pub label_selectors: String,
    pub field_selectors: String,
    /// The host's procfs (`FASTPATH_HOST_PROC`, `/host/proc` in the DaemonSet).
    pub host_proc: PathBuf,
    /// Repair in place with nftables (`NATIVE_NFTABLES`) rather than iptables.
    pub native_nftables: bool,
}

impl Default for RepairSettings {
    /// Istio's defaults.
    fn default() -> Self {
        Self {
            enabled: true,
            repair_pods: false,
            delete_pods: false,
            label_pods: false,
            label_key: "cni.istio.io/uninitialized".into(),
            label_value: "true".into(),
            node_name: String::new(),
            sidecar_annotation: "sidecar.istio.io/status".into(),
            init_container_name: "istio-validation".into(),
            init_container_termination_message: String::new(),
            init_container_exit_code: 126,
            label_selectors: String::new(),
            field_selectors: String::new(),
            host_proc: "/host/proc".into(),
            native_nftables: false,
        }
    }
}

/// What the controller does with a broken pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Apply the redirection in the running pod's netns.
    Repair,
    /// Delete the pod (its owner recreates it, now with the plugin in place).
    Delete,
    /// Label the pod (`REPAIR_BROKEN_POD_LABEL_KEY`), for an operator or another tool.
    Label,
}

impl Action {
    /// The `type` label of `istio_cni_repair_pods_repaired_total`.
    pub fn metric_type(self) -> &'static str {
        match self {
            Action::Repair => "repair",
            Action::Delete => "delete",
            Action::Label => "label",
        }
    }
}

/// Istio's order: repair, else delete, else label; `None` when none is switched on.
pub fn action(s: &RepairSettings) -> Option<Action> {
    if s.repair_pods {
        Some(Action::Repair)
    } else if s.delete_pods {
        Some(Action::Delete)
    } else if s.label_pods {
        Some(Action::Label)
    } else {
        None
    }
}

/// The controller's field selection, as Istio's watch has it: `REPAIR_FIELD_SELECTORS` (when
/// set) and, always, the node term. Istio adds `spec.nodeName=<REPAIR_NODE_NAME>` even when the
/// name is empty; here the name falls back to `NODE_NAME` first (see
/// [`RepairSettings::node_name`]). The node's shared pod watch selects the node term;
/// [`selector`] evaluates the rest.
pub fn field_selector(s: &RepairSettings) -> String {
    let node = format!("spec.nodeName={}", s.node_name);
    match s.field_selectors.trim() {
        "" => node,
        extra => format!("{extra},{node}"),
    }
}

/// The node the controller watches: `REPAIR_NODE_NAME`, or `NODE_NAME` when that is empty
/// (Istio's chart sets `REPAIR_NODE_NAME` from `spec.nodeName`; a deployment that sets only
/// `NODE_NAME` would otherwise select the pods with an empty node name, i.e. none).
pub fn node_name(repair_node_name: &str, node_name: &str) -> String {
    match repair_node_name {
        "" => node_name.to_string(),
        n => n.to_string(),
    }
}

/// Istio's `matchesFilter`: the pod carries the sidecar annotation, and an init container of
/// the configured name is not currently terminated successfully while its last termination
/// matches the exit code and message filters.
pub fn broken(pod: &Pod, s: &RepairSettings) -> bool {
    if !s.sidecar_annotation.is_empty() {
        let has = pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(&s.sidecar_annotation));
        if !has {
            return false;
        }
    }
    let want_message = s.init_container_termination_message.trim();
    let matches = |t: &ContainerStateTerminated| {
        let message_ok =
            want_message.is_empty() || want_message == t.message.as_deref().unwrap_or("").trim();
        let code_ok =
            s.init_container_exit_code == 0 || i64::from(t.exit_code) == s.init_container_exit_code;
        message_ok && code_ok
    };
    let statuses = pod
        .status
        .as_ref()
        .and_then(|st| st.init_container_statuses.as_deref())
        .unwrap_or_default();
    statuses.iter().any(|c| {
        if !s.init_container_name.is_empty() && c.name != s.init_container_name {
            return false;
        }
        // Never broken while the container's current run succeeded.
        if let Some(t) = c.state.as_ref().and_then(|st| st.terminated.as_ref())
            && (t.reason.as_deref() == Some("Completed") || t.exit_code == 0)
        {
            return false;
        }
        c.last_state
            .as_ref()
            .and_then(|st| st.terminated.as_ref())
            .is_some_and(matches)
    })
}

/// The label patch (a JSON merge patch of `pods/{name}/status`), or `None` when the pod
/// already has the label key (Istio skips it then).
pub fn label_patch(pod: &Pod, s: &RepairSettings) -> Option<serde_json::Value> {
    let labelled = pod
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(&s.label_key));
    (!labelled).then(|| {
        serde_json::json!({"metadata": {"labels": {s.label_key.clone(): s.label_value.clone()}}})
    })
}

/// `namespace/name` of a pod, for logs and errors.
pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// The pod's IPs (`status.podIPs`, else `status.podIP`), those that parse.
pub fn pod_ips(pod: &Pod) -> Vec<std::net::IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let mut ips: Vec<std::net::IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    ips
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(init: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u1",
                "annotations": {"sidecar.istio.io/status": "{}"}, "labels": {"app": "web"}},
            "status": {"podIP": "10.0.0.5", "initContainerStatuses": [init]}
        }))
        .unwrap()
    }

    fn crashlooping(code: i32, message: &str) -> Pod {
        pod(json!({
            "name": "istio-validation", "image": "i", "imageID": "", "ready": false, "restartCount": 3,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": code, "reason": "Error", "message": message}}
        }))
    }

    #[test]
    fn a_crashlooping_validation_container_is_broken() {
        let s = RepairSettings::default();
        assert!(broken(&crashlooping(126, "no redirection"), &s));
        assert!(!broken(&crashlooping(1, ""), &s), "another exit code");
        let any = RepairSettings {
            init_container_exit_code: 0,
            ..s.clone()
        };
        assert!(broken(&crashlooping(1, ""), &any), "0 matches any code");
    }

    #[test]
    fn the_termination_message_is_compared_trimmed() {
        let s = RepairSettings {
            init_container_termination_message: " boom \n".into(),
            ..Default::default()
        };
        assert!(broken(&crashlooping(126, "boom\n"), &s));
        assert!(!broken(&crashlooping(126, "other"), &s));
    }

    #[test]
    fn a_completed_or_foreign_container_or_unannotated_pod_is_not_broken() {
        let s = RepairSettings::default();
        let completed = pod(json!({
            "name": "istio-validation", "image": "i", "imageID": "", "ready": true, "restartCount": 1,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
            "lastState": {"terminated": {"exitCode": 126, "reason": "Error"}}
        }));
        assert!(!broken(&completed, &s));
        let mut other = crashlooping(126, "");
        other
            .status
            .as_mut()
            .unwrap()
            .init_container_statuses
            .as_mut()
            .unwrap()[0]
            .name = "istio-init".into();
        assert!(!broken(&other, &s));
        let any_name = RepairSettings {
            init_container_name: String::new(),
            ..s.clone()
        };
        assert!(
            broken(&other, &any_name),
            "an empty name matches any container"
        );
        let mut bare = crashlooping(126, "");
        bare.metadata.annotations = None;
        assert!(!broken(&bare, &s));
        let no_annotation_filter = RepairSettings {
            sidecar_annotation: String::new(),
            ..s
        };
        assert!(broken(&bare, &no_annotation_filter));
    }

    #[test]
    fn the_first_enabled_action_wins_in_istios_order() {
        let mut s = RepairSettings::default();
        assert_eq!(action(&s), None);
        s.label_pods = true;
        assert_eq!(action(&s), Some(Action::Label));
        s.delete_pods = true;
        assert_eq!(action(&s), Some(Action::Delete));
        s.repair_pods = true;
        assert_eq!(action(&s), Some(Action::Repair));
    }

    #[test]
    fn selectors_always_name_the_node() {
        let mut s = RepairSettings {
            node_name: node_name("", "node-a"),
            ..Default::default()
        };
        assert_eq!(field_selector(&s), "spec.nodeName=node-a");
        s.field_selectors = "status.phase!=Succeeded".into();
        assert_eq!(
            field_selector(&s),
            "status.phase!=Succeeded,spec.nodeName=node-a"
        );
        assert_eq!(node_name("node-b", "node-a"), "node-b");
        assert_eq!(field_selector(&RepairSettings::default()), "spec.nodeName=");
    }

    #[test]
    fn the_label_patch_is_skipped_when_the_key_is_there() {
        let s = RepairSettings::default();
        let mut p = crashlooping(126, "");
        assert_eq!(
            label_patch(&p, &s),
            Some(json!({"metadata": {"labels": {"cni.istio.io/uninitialized": "true"}}}))
        );
        p.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("cni.istio.io/uninitialized".into(), "false".into());
        assert_eq!(label_patch(&p, &s), None);
    }

    #[test]
    fn pod_ips_prefer_the_list() {
        let mut p = crashlooping(126, "");
        assert_eq!(
            pod_ips(&p),
            vec!["10.0.0.5".parse::<std::net::IpAddr>().unwrap()]
        );
        p.status.as_mut().unwrap().pod_ips = Some(vec![k8s_openapi::api::core::v1::PodIP {
            ip: "fd00::5".into(),
        }]);
        assert_eq!(
            pod_ips(&p),
            vec!["fd00::5".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(pod_key(&p), "ns/web");
    }
}
