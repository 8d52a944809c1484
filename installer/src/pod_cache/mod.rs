//! The node-local pod cache: install-cni watches the pods bound to its node (a kube-rs
//! reflector over `spec.nodeName=<node>`) and answers the plugin's question "which pod is this?"
//! on a root-only unix socket in its run directory (`fastpath_cni_plugin::pod_cache` has the
//! protocol and the plugin's client). A pod ADD then makes no API call; the API server sees one
//! watch per node instead of one GET per pod creation, and pods keep getting their rules when
//! the plugin's own token has expired.
//!
//! The cache only ever answers with the very pod asked for (namespace, name and, when the
//! runtime passes it, UID). Whatever it cannot answer within
//! [`fastpath_cni_plugin::pod_cache::AGENT_WAIT`] the plugin asks the API server, so a node
//! whose agent is down, slow or still listing behaves exactly as without the cache.
mod serve;
mod watch;

pub use serve::{answer, serve};
pub(crate) use watch::kubeconfig;
pub use watch::{ApiSettings, WatchState, start_watch};

use std::path::PathBuf;

/// What the cache needs: where the API server is, which node, where to listen.
#[derive(Clone, Debug)]
pub struct PodCacheSettings {
    pub api: ApiSettings,
    pub node_name: String,
    pub socket: PathBuf,
}

/// Starts the watch and the socket. Errors name what is missing; the agent logs them and runs
/// without the cache (the plugin then asks the API server, as Istio's does).
pub fn start(settings: &PodCacheSettings) -> Result<std::sync::Arc<WatchState>, String> {
    if settings.node_name.is_empty() {
        return Err("NODE_NAME is not set, so the pods of this node cannot be watched".into());
    }
    let state = start_watch(&settings.api, &settings.node_name)?;
    serve(&settings.socket, state.clone())?;
    Ok(state)
}
