//! The plugin's config (its conflist entry, on stdin) and the Kubernetes `CNI_ARGS`.
//!
//! Keys are those of Istio's conflist entry (`cni/pkg/plugin/plugin.go` `Config`), plus a few
//! `fastpath_*` keys; unknown keys are ignored so an entry written by any Istio version works.
use crate::skel::{CniError, code};
use serde::Deserialize;
use serde_json::Value;
use std::time::Duration;

/// Istio's default run dir (`CNI_AGENT_RUN_DIR`).
pub const DEFAULT_RUN_DIR: &str = "/var/run/istio-cni";

/// Istio's pod lookup: 30 attempts, 1 s apart (`podRetrievalMaxRetries`, `podRetrievalInterval`).
pub const POD_RETRIEVAL_MAX_RETRIES: u32 = 30;
pub const POD_RETRIEVAL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct PluginConfig {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    #[serde(rename = "prevResult")]
    pub prev_result: Option<Value>,

    // Istio's keys (the plugin config of Istio's `cni/pkg/plugin/plugin.go`, `Config`).
    pub plugin_log_level: Option<String>,
    pub cni_agent_run_dir: Option<String>,
    pub ambient_enabled: bool,
    pub enablement_selectors: Option<Value>,
    pub exclude_namespaces: Option<Vec<String>>,
    pub pod_namespace: String,
    pub native_nftables: bool,
    pub enable_ambient_detection_retry: bool,

    // fastpath's own keys.
    /// Attempts of the pod lookup (default 30, at most 30).
    pub fastpath_pod_retrieval_max_retries: Option<u32>,
    /// Pause between attempts in ms (default 1000, at most 1000).
    pub fastpath_pod_retrieval_interval_ms: Option<u64>,
    /// `auto` (default: Istio's choice), `legacy` or `nft`.
    pub fastpath_iptables_backend: Option<String>,
}

/// Which iptables variant to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    Auto,
    Legacy,
    Nft,
}

impl PluginConfig {
    /// The pod's IPs from `prevResult` (none when there is no prevResult), and the address
    /// entries that are not addresses.
    pub fn pod_ips(&self) -> crate::result::PodIps {
        self.prev_result
            .as_ref()
            .map(crate::result::pod_ips)
            .unwrap_or_default()
    }

    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODING_FAILURE,
                "failed to parse the istio-cni plugin config",
                e.to_string(),
            )
        })
    }

    pub fn run_dir(&self) -> &str {
        match self.cni_agent_run_dir.as_deref() {
            Some(d) if !d.is_empty() => d,
            _ => DEFAULT_RUN_DIR,
        }
    }

    pub fn kubeconfig_path(&self) -> String {
        format!("{}/istio-cni-kubeconfig", self.run_dir())
    }

    pub fn log_socket_path(&self) -> String {
        format!("{}/log.sock", self.run_dir())
    }

    pub fn is_excluded_namespace(&self, ns: &str) -> bool {
        self.exclude_namespaces
            .as_deref()
            .is_some_and(|l| l.iter().any(|n| n == ns))
    }

    /// Pod lookup attempts and interval, bounded by Istio's 30 × 1 s.
    pub fn pod_retrieval(&self) -> (u32, Duration) {
        let retries = self
            .fastpath_pod_retrieval_max_retries
            .unwrap_or(POD_RETRIEVAL_MAX_RETRIES)
            .clamp(1, POD_RETRIEVAL_MAX_RETRIES);
        let interval = self
            .fastpath_pod_retrieval_interval_ms
            .map(Duration::from_millis)
            .unwrap_or(POD_RETRIEVAL_INTERVAL)
            .min(POD_RETRIEVAL_INTERVAL);
        (retries, interval)
    }

    pub fn backend_choice(&self) -> Result<BackendChoice, CniError> {
        match self.fastpath_iptables_backend.as_deref() {
            None | Some("") | Some("auto") => Ok(BackendChoice::Auto),
            Some("legacy") => Ok(BackendChoice::Legacy),
            Some("nft") => Ok(BackendChoice::Nft),
            Some(other) => Err(CniError::new(
                code::INVALID_NETWORK_CONFIG,
                format!(
                    "fastpath_iptables_backend must be \"auto\", \"legacy\" or \"nft\", got {other:?}"
                ),
                "",
            )),
        }
    }
}

/// The Kubernetes identity of the sandbox, from `CNI_ARGS`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct K8sArgs {
    pub pod_name: String,
    pub pod_namespace: String,
    pub infra_container_id: String,
    pub pod_uid: String,
}

impl K8sArgs {
    /// Parses `K=V;K=V`. Unknown keys are ignored; a pair without `=` is an error (as libcni's
    /// `LoadArgs`).
    pub fn parse(args: &str) -> Result<Self, CniError> {
        let mut out = Self::default();
        for pair in args.split(';').filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(CniError::new(
                    code::INVALID_ENVIRONMENT_VARIABLES,
                    format!("ARGS: invalid pair {pair:?}"),
                    "",
                ));
            };
            match k {
                "K8S_POD_NAME" => out.pod_name = v.to_string(),
                "K8S_POD_NAMESPACE" => out.pod_namespace = v.to_string(),
                "K8S_POD_INFRA_CONTAINER_ID" => out.infra_container_id = v.to_string(),
                "K8S_POD_UID" => out.pod_uid = v.to_string(),
                _ => {}
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_golden_entry_parses() {
        // cni/test/testdata/expected/YYY-istio-cni.conf plus a prevResult and unknown keys.
        let c = PluginConfig::parse(
            br#"{
  "cniVersion": "0.3.1", "name": "istio-cni", "type": "istio-cni", "ipam": {}, "dns": {},
  "plugin_log_level": "debug", "cni_agent_run_dir": "/tmp", "ambient_enabled": false,
  "enablement_selectors": [], "exclude_namespaces": ["istio-system"], "pod_namespace": "",
  "native_nftables": false, "enable_ambient_detection_retry": false,
  "someone_elses_key": {"x": 1}, "prevResult": {"cniVersion": "0.3.1", "ips": []}
}"#,
        )
        .unwrap();
        assert_eq!(c.plugin_log_level.as_deref(), Some("debug"));
        assert_eq!(c.run_dir(), "/tmp");
        assert_eq!(c.kubeconfig_path(), "/tmp/istio-cni-kubeconfig");
        assert!(c.is_excluded_namespace("istio-system"));
        assert!(!c.is_excluded_namespace("default"));
        assert!(c.prev_result.is_some());
        assert_eq!(c.pod_retrieval(), (30, Duration::from_secs(1)));
        assert_eq!(c.backend_choice().unwrap(), BackendChoice::Auto);
    }

    #[test]
    fn defaults_and_null_exclusions() {
        let c = PluginConfig::parse(br#"{"name":"n","exclude_namespaces":null}"#).unwrap();
        assert_eq!(c.run_dir(), DEFAULT_RUN_DIR);
        assert_eq!(c.log_socket_path(), "/var/run/istio-cni/log.sock");
        assert!(!c.is_excluded_namespace(""));
    }

    #[test]
    fn wrong_types_are_decoding_errors() {
        let e = PluginConfig::parse(br#"{"name":"n","ambient_enabled":"yes"}"#).unwrap_err();
        assert_eq!(e.code, 6);
        assert!(e.details.contains("invalid type"), "{e:?}");
    }

    #[test]
    fn retrieval_is_bounded_by_istios() {
        let c = PluginConfig::parse(
            br#"{"name":"n","fastpath_pod_retrieval_max_retries":500,"fastpath_pod_retrieval_interval_ms":60000}"#,
        )
        .unwrap();
        assert_eq!(c.pod_retrieval(), (30, Duration::from_secs(1)));
        let c = PluginConfig::parse(
            br#"{"name":"n","fastpath_pod_retrieval_max_retries":2,"fastpath_pod_retrieval_interval_ms":10}"#,
        )
        .unwrap();
        assert_eq!(c.pod_retrieval(), (2, Duration::from_millis(10)));
    }

    #[test]
    fn backend_choice_is_validated() {
        let c = PluginConfig::parse(br#"{"name":"n","fastpath_iptables_backend":"nft"}"#).unwrap();
        assert_eq!(c.backend_choice().unwrap(), BackendChoice::Nft);
        let c = PluginConfig::parse(br#"{"name":"n","fastpath_iptables_backend":"x"}"#).unwrap();
        assert_eq!(c.backend_choice().unwrap_err().code, 7);
    }

    #[test]
    fn k8s_args() {
        let a = K8sArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1;FOO=bar",
        )
        .unwrap();
        assert_eq!(
            a,
            K8sArgs {
                pod_name: "web-0".into(),
                pod_namespace: "ns1".into(),
                infra_container_id: "abc".into(),
                pod_uid: "u-1".into()
            }
        );
        assert_eq!(K8sArgs::parse("").unwrap(), K8sArgs::default());
        assert_eq!(K8sArgs::parse("K8S_POD_NAME").unwrap_err().code, 4);
    }
}
