//! The watch behind the pod cache: a kube-rs watcher of the node's pods feeding a reflector
//! store, on a thread of its own with a current-thread tokio runtime.
//!
//! kube-rs lists, then watches from the list's resourceVersion, re-lists after a 410 (history
//! compacted) and backs off after any error (a dropped connection, 403 while RBAC is missing,
//! the API server restarting); its token file is re-read at least once a minute, so a rotated
//! service-account token is picked up. Errors are logged when they change, not at every retry.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::config::{
    AuthInfo, Cluster, Context, KubeConfigOptions, Kubeconfig, NamedAuthInfo, NamedCluster,
    NamedContext,
};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};

const SCOPE: &str = crate::logging::SCOPE_AGENT;

/// The API server and the agent's credentials (its service account's).
#[derive(Clone, Debug)]
pub struct ApiSettings {
    /// `https://host:port`.
    pub server: String,
    /// PEM of the CA to trust; `None` with `SKIP_TLS_VERIFY`.
    pub ca_pem: Option<Vec<u8>>,
    /// The service-account token file (re-read by kube-rs, so rotation is followed).
    pub token_file: PathBuf,
}

/// What the socket side reads: the store, and whether the first list is in.
pub struct WatchState {
    store: Store<Pod>,
    listed: AtomicBool,
    /// Watch events applied (for the log and tests).
    pub events: AtomicU64,
    /// The last error of the watch, if it has not recovered since.
    pub last_error: Mutex<Option<String>>,
}

impl WatchState {
    /// The pod `namespace/name` as the API serves it, if the watch has it.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<serde_json::Value> {
        let pod = self.store.get(&ObjectRef::new(name).within(namespace))?;
        serde_json::to_value(&*pod).ok()
    }

    /// Whether the first list has been applied (before it, a miss says nothing).
    pub fn listed(&self) -> bool {
        self.listed.load(Ordering::Acquire)
    }

    /// Pods in the store.
    pub fn len(&self) -> usize {
        self.store.state().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The kubeconfig kube-rs reads: the server, its CA and the token *file*.
pub(crate) fn kubeconfig(api: &ApiSettings) -> Kubeconfig {
    let cluster = Cluster {
        server: Some(api.server.clone()),
        certificate_authority_data: api
            .ca_pem
            .as_ref()
            .map(|pem| crate::kubeconfig::base64(pem)),
        insecure_skip_tls_verify: Some(api.ca_pem.is_none()),
        ..Default::default()
    };
    let auth = AuthInfo {
        token_file: Some(api.token_file.display().to_string()),
        ..Default::default()
    };
    Kubeconfig {
        clusters: vec![NamedCluster {
            name: "local".into(),
            cluster: Some(cluster),
            other: Default::default(),
        }],
        auth_infos: vec![NamedAuthInfo {
            name: "install-cni".into(),
            auth_info: Some(auth),
            other: Default::default(),
        }],
        contexts: vec![NamedContext {
            name: "install-cni".into(),
            context: Some(Context {
                cluster: "local".into(),
                user: Some("install-cni".into()),
                ..Default::default()
            }),
            other: Default::default(),
        }],
        current_context: Some("install-cni".into()),
        ..Default::default()
    }
}

/// Starts watching the pods of `node`; the state fills as the watch delivers.
pub fn start_watch(api: &ApiSettings, node: &str) -> Result<Arc<WatchState>, String> {
    let (store, writer) = reflector::store::<Pod>();
    let state = Arc::new(WatchState {
        store,
        listed: AtomicBool::new(false),
        events: AtomicU64::new(0),
        last_error: Mutex::new(None),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("pod cache: cannot start its runtime: {e}"))?;
    let (api, node, shared) = (api.clone(), node.to_string(), state.clone());
    std::thread::Builder::new()
        .name("pod-watch".into())
        .spawn(move || runtime.block_on(run_watch(api, node, writer, shared)))
        .map_err(|e| format!("pod cache: cannot start its thread: {e}"))?;
    Ok(state)
}

async fn run_watch(
    api: ApiSettings,
    node: String,
    writer: reflector::store::Writer<Pod>,
    state: Arc<WatchState>,
) {
    let config = match kube::Config::from_custom_kubeconfig(
        kubeconfig(&api),
        &KubeConfigOptions::default(),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            log::error!(target: SCOPE, "pod cache off: the API client cannot be configured: {e}");
            return;
        }
    };
    let client = match kube::Client::try_from(config) {
        Ok(c) => c,
        Err(e) => {
            log::error!(target: SCOPE, "pod cache off: the API client cannot be built: {e}");
            return;
        }
    };
    let pods: Api<Pod> = Api::all(client);
    let selector = format!("spec.nodeName={node}");
    let events = watcher(pods, watcher::Config::default().fields(&selector))
        .default_backoff()
        .reflect(writer);
    futures_util::pin_mut!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                if matches!(event, watcher::Event::InitDone)
                    && !state.listed.swap(true, Ordering::AcqRel)
                {
                    log::info!(target: SCOPE, "pod cache: watching the {} pods of node {node}", state.len());
                }
                state.events.fetch_add(1, Ordering::Relaxed);
                // Init starts a (re)list before its request is made: it proves nothing.
                if matches!(event, watcher::Event::Init) {
                    continue;
                }
                let recovered = state.last_error.lock().map(|mut e| e.take()).ok().flatten();
                if let Some(was) = recovered {
                    log::info!(target: SCOPE, "pod cache: the watch of node {node}'s pods recovered (was: {was})");
                }
            }
            Err(e) => {
                let text = e.to_string();
                if let Ok(mut last) = state.last_error.lock()
                    && last.as_deref() != Some(text.as_str())
                {
                    log::warn!(target: SCOPE, "pod cache: the watch of node {node}'s pods failed, retrying with backoff (ADDs ask the API server meanwhile): {text}");
                    *last = Some(text);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubeconfig_names_the_token_file_not_the_token() {
        let kc = kubeconfig(&ApiSettings {
            server: "https://10.0.0.1:443".into(),
            ca_pem: Some(b"-----BEGIN CERTIFICATE-----\n".to_vec()),
            token_file: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
        });
        let auth = kc.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(
            auth.token_file.as_deref(),
            Some("/var/run/secrets/kubernetes.io/serviceaccount/token")
        );
        assert!(auth.token.is_none());
        let cluster = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.insecure_skip_tls_verify, Some(false));
        assert!(cluster.certificate_authority_data.is_some());
    }
}
