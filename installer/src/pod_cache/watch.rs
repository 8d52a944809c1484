//! The pod cache's side of the node's pod watch ([`crate::pod_watch`]): a reflector store the
//! watch's events are applied to, and whether the first list is in. The watch itself (list,
//! resume, backoff, token rotation) is shared with the repair controller.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;

use crate::pod_watch::PodEvent;

const SCOPE: &str = crate::logging::SCOPE_AGENT;

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

/// What the watch feeds: the store's writer and the state the socket side reads.
pub struct CacheFeed {
    writer: reflector::store::Writer<Pod>,
    state: Arc<WatchState>,
}

/// An empty store, and the feed that fills it.
pub fn feed() -> (CacheFeed, Arc<WatchState>) {
    let (store, writer) = reflector::store::<Pod>();
    let state = Arc::new(WatchState {
        store,
        listed: AtomicBool::new(false),
        events: AtomicU64::new(0),
        last_error: Mutex::new(None),
    });
    (
        CacheFeed {
            writer,
            state: state.clone(),
        },
        state,
    )
}

impl CacheFeed {
    /// Applies one event of the watch of `node`'s pods; errors are logged when they change,
    /// not at every retry.
    pub fn observe(&mut self, node: &str, event: &PodEvent) {
        let state = &self.state;
        match event {
            Ok(event) => {
                self.writer.apply_watcher_event(event);
                if matches!(event, watcher::Event::InitDone)
                    && !state.listed.swap(true, Ordering::AcqRel)
                {
                    log::info!(target: SCOPE, "pod cache: watching the {} pods of node {node}", state.len());
                }
                state.events.fetch_add(1, Ordering::Relaxed);
                // Init starts a (re)list before its request is made: it proves nothing.
                if matches!(event, watcher::Event::Init) {
                    return;
                }
                let recovered = state.last_error.lock().map(|mut e| e.take()).ok().flatten();
                if let Some(was) = recovered {
                    log::info!(target: SCOPE, "pod cache: the watch of node {node}'s pods recovered (was: {was})");
                }
            }
            Err(crate::pod_watch::WatchError(text)) => {
                if let Ok(mut last) = state.last_error.lock()
                    && last.as_deref() != Some(text.as_str())
                {
                    log::warn!(target: SCOPE, "pod cache: the watch of node {node}'s pods failed, retrying with backoff (ADDs ask the API server meanwhile): {text}");
                    *last = Some(text.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": name}})).unwrap()
    }

    #[test]
    fn a_miss_before_the_first_list_says_nothing_and_the_list_replaces_the_store() {
        let (mut feed, state) = feed();
        feed.observe("n", &Ok(watcher::Event::Init));
        feed.observe("n", &Ok(watcher::Event::InitApply(pod("a"))));
        assert!(!state.listed());
        assert!(
            state.pod("ns", "a").is_none(),
            "not before the list is done"
        );
        feed.observe("n", &Ok(watcher::Event::InitDone));
        assert!(state.listed());
        assert!(state.pod("ns", "a").is_some());
        feed.observe("n", &Ok(watcher::Event::Apply(pod("b"))));
        feed.observe("n", &Ok(watcher::Event::Delete(pod("a"))));
        assert!(state.pod("ns", "a").is_none());
        assert_eq!(state.len(), 1);
        // An error is kept until the watch works again.
        feed.observe(
            "n",
            &Err(crate::pod_watch::WatchError("403 forbidden".into())),
        );
        assert_eq!(
            state.last_error.lock().unwrap().as_deref(),
            Some("403 forbidden")
        );
        feed.observe("n", &Ok(watcher::Event::Init));
        assert!(
            state.last_error.lock().unwrap().is_some(),
            "Init proves nothing"
        );
        feed.observe("n", &Ok(watcher::Event::InitDone));
        assert!(state.last_error.lock().unwrap().is_none());
        assert_eq!(
            state.len(),
            0,
            "a re-list without the pods empties the store"
        );
    }
}
