//! The node-local pod cache: install-cni watches the pods bound to its node (a kube-rs
//! reflector store fed by the node's one pod watch, [`crate::pod_watch`], over
//! `spec.nodeName=<node>`) and answers the plugin's question "which pod is this?"
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

pub use serve::{PodCacheError, answer, serve};
pub use watch::{CacheFeed, WatchState, feed};

use crate::pod_watch::ApiSettings;

use std::path::PathBuf;
use std::sync::Arc;

/// What the cache needs: where the API server is, which node, where to listen.
#[derive(Clone, Debug)]
pub struct PodCacheSettings {
    pub api: ApiSettings,
    pub node_name: String,
    pub socket: PathBuf,
}

/// The store and its socket, and the feed the node's pod watch fills the store with. Errors
/// name what is missing; the agent logs them and runs without the cache (the plugin then asks
/// the API server, as Istio's does).
pub fn prepare(settings: &PodCacheSettings) -> Result<(CacheFeed, Arc<WatchState>), PodCacheError> {
    if settings.node_name.is_empty() {
        return Err(PodCacheError::NoNodeName);
    }
    let (feed, state) = feed();
    serve(&settings.socket, state.clone())?;
    Ok((feed, state))
}

/// The cache alone, with a watch of its own (the agent shares its watch with the repair
/// controller instead, see [`crate::agent`]).
pub fn start(settings: &PodCacheSettings) -> Result<Arc<WatchState>, PodCacheError> {
    let (feed, state) = prepare(settings)?;
    let consumers = crate::pod_watch::Consumers {
        cache: Some(feed),
        repair: None,
    };
    crate::pod_watch::start(&settings.api, &settings.node_name, consumers)?;
    Ok(state)
}
