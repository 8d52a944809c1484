//! The one watch of this node's pods on the API server, shared by the pod cache
//! ([`crate::pod_cache`]) and the repair controller ([`crate::repair`]): Istio's agent holds one
//! watch per node, and so does this one, whichever of the two is on.
//!
//! A kube-rs watcher over `spec.nodeName=<node>` runs on a thread of its own with a
//! current-thread tokio runtime. kube-rs lists, then watches from the list's resourceVersion,
//! re-lists after a 410 (history compacted) and backs off after any error (a dropped
//! connection, a 403 while RBAC is missing, the API server restarting); its token file is re-read
//! at least once a minute, so a rotated service-account token is picked up. Each event, and each
//! error, goes to every consumer: the cache applies it to its store on this thread (cheap), the
//! repair controller receives it over a channel and acts on its own thread, so a slow repair
//! never holds the cache back. Each consumer logs the watch's errors in its own words, once per
//! distinct error, as each did with a watch of its own.
use std::path::PathBuf;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::config::{
    AuthInfo, Cluster, Context, KubeConfigOptions, Kubeconfig, NamedAuthInfo, NamedCluster,
    NamedContext,
};
use kube::runtime::{WatchStreamExt as _, watcher};

use crate::pod_cache::CacheFeed;
use crate::repair::RepairFeed;

const SCOPE: &str = crate::logging::SCOPE_AGENT;

/// One event of the watch as its consumers get it (errors as their text).
pub type PodEvent = Result<watcher::Event<Pod>, WatchError>;

/// An error of the watch (kube-rs retries after it), as text: each consumer gets a copy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WatchError(pub String);

/// Why the agent has no API client.
#[derive(Debug, thiserror::Error)]
pub enum ApiClientError {
    #[error("the API client cannot be configured: {0}")]
    Configure(#[source] kube::config::KubeconfigError),
    #[error("the API client cannot be built: {0}")]
    Build(#[source] kube::Error),
}

/// Why the watch of a node's pods did not start (`consumers`: who it was for).
#[derive(Debug, thiserror::Error)]
pub enum WatchStartError {
    #[error("{consumers}: cannot start its runtime: {source}")]
    Runtime {
        consumers: &'static str,
        source: std::io::Error,
    },
    #[error("{consumers}: cannot start the pod watch's thread: {source}")]
    Thread {
        consumers: &'static str,
        source: std::io::Error,
    },
}

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

/// Who gets the watch's events; at least one.
#[derive(Default)]
pub struct Consumers {
    pub cache: Option<CacheFeed>,
    pub repair: Option<RepairFeed>,
}

impl Consumers {
    /// For log lines: "pod cache", "repair controller" or both.
    fn names(&self) -> &'static str {
        match (self.cache.is_some(), self.repair.is_some()) {
            (true, true) => "pod cache and repair controller",
            (true, false) => "pod cache",
            (false, _) => "repair controller",
        }
    }

    fn is_empty(&self) -> bool {
        self.cache.is_none() && self.repair.is_none()
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

/// An API client with the agent's credentials (call inside a tokio runtime).
pub(crate) async fn client(api: &ApiSettings) -> Result<kube::Client, ApiClientError> {
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig(api), &KubeConfigOptions::default())
            .await
            .map_err(ApiClientError::Configure)?;
    kube::Client::try_from(config).map_err(ApiClientError::Build)
}

/// Starts the watch of `node`'s pods for `consumers`, on its own thread.
pub fn start(api: &ApiSettings, node: &str, consumers: Consumers) -> Result<(), WatchStartError> {
    if consumers.is_empty() {
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| WatchStartError::Runtime {
            consumers: consumers.names(),
            source,
        })?;
    let (api, node, names) = (api.clone(), node.to_string(), consumers.names());
    std::thread::Builder::new()
        .name("pod-watch".into())
        .spawn(move || runtime.block_on(run(api, node, consumers)))
        .map_err(|source| WatchStartError::Thread {
            consumers: names,
            source,
        })?;
    Ok(())
}

async fn run(api: ApiSettings, node: String, mut consumers: Consumers) {
    let client = match client(&api).await {
        Ok(c) => c,
        Err(e) => {
            log::error!(target: SCOPE, "{} off: {e}", consumers.names());
            return;
        }
    };
    let pods: Api<Pod> = Api::all(client);
    let selector = format!("spec.nodeName={node}");
    let events = watcher(pods, watcher::Config::default().fields(&selector)).default_backoff();
    futures_util::pin_mut!(events);
    while let Some(event) = events.next().await {
        let event: PodEvent = event.map_err(|e| WatchError(e.to_string()));
        if let Some(cache) = &mut consumers.cache {
            cache.observe(&node, &event);
        }
        if let Some(repair) = &consumers.repair
            && repair.send(event).is_err()
        {
            // The controller's thread is gone (it logged why); the cache may still need us.
            consumers.repair = None;
        }
        if consumers.is_empty() {
            return;
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
