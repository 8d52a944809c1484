//! The repair controller's side effects: it takes the node's pod watch's events
//! ([`crate::pod_watch`], shared with the pod cache) on a thread of its own with a
//! current-thread tokio runtime, keeps the pods its own selectors select, and per broken pod
//! takes the action: repair in place ([`super::netns`]), delete (with preconditions) or label,
//! each followed by a `Warning` event, counted in `istio_cni_repair_pods_repaired_total`.
//!
//! The watch resumes after dropped connections and backs off after errors (a `403` while the
//! repair ClusterRole is missing): each distinct error is logged once here, and once more when
//! it recovers. An action that fails for a transient cause (no answer, 5xx, 429) is tried
//! again, at most [`ATTEMPTS`] times in all, as Istio's queue does.
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::watcher;
use kube::{Resource as _, ResourceExt as _};
use tokio::sync::mpsc;

use super::selector::PodSelector;
use super::{Action, RepairSettings, action, broken, label_patch, pod_key};
use crate::metrics::{Metrics, PodRepairResult};
use crate::pod_watch::{ApiSettings, PodEvent};

const SCOPE: &str = crate::logging::SCOPE_AGENT;

/// Attempts per action, as Istio's repair queue (`MaxAttempts(5)`).
pub const ATTEMPTS: u32 = 5;
/// The component named in the events.
pub const COMPONENT: &str = "cni-repair";

/// Where the node's pod watch sends the controller its events.
pub type RepairFeed = mpsc::UnboundedSender<PodEvent>;

/// Whether `iptables-restore` (either backend's) is on the agent's own PATH.
fn iptables_in_image() -> bool {
    [
        "iptables-restore",
        "iptables-nft-restore",
        "iptables-legacy-restore",
    ]
    .iter()
    .any(|b| fastpath_cni_plugin::iptables::find_in_path(b).is_some())
}

/// Starts the controller on its own thread, waiting for the events of the watch of
/// `settings.node_name`'s pods on the returned feed. `Ok(None)` when no action is switched on
/// (nothing to watch for); errors name what is missing or wrong.
/// Why the repair controller did not start.
#[derive(Debug, thiserror::Error)]
pub enum RepairStartError {
    #[error(
        "neither REPAIR_NODE_NAME nor NODE_NAME is set, so the pods of this node cannot be watched"
    )]
    NoNodeName,
    #[error(transparent)]
    Selector(#[from] super::selector::SelectorError),
    #[error("repair controller: cannot start its runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("repair controller: cannot start its thread: {0}")]
    Thread(#[source] std::io::Error),
}

pub fn start(
    api: &ApiSettings,
    settings: &RepairSettings,
    metrics: Arc<Metrics>,
) -> Result<Option<(Action, RepairFeed)>, RepairStartError> {
    let Some(act) = action(settings) else {
        return Ok(None);
    };
    if settings.node_name.is_empty() {
        return Err(RepairStartError::NoNodeName);
    }
    let selector = PodSelector::parse(&settings.label_selectors, &settings.field_selectors)?;
    let mut settings = settings.clone();
    if act == Action::Repair && !settings.native_nftables && !iptables_in_image() {
        // The image is FROM scratch: no iptables-restore to run. Istio's nftables ruleset is
        // the same redirection, programmed over netlink by this process.
        log::info!(target: SCOPE, "repair controller: no iptables-restore in this image, so pods are repaired with Istio's nftables ruleset (the same redirection; see docs/repair.md)");
        settings.native_nftables = true;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RepairStartError::Runtime)?;
    let api = api.clone();
    let (feed, events) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("repair".into())
        .spawn(move || runtime.block_on(run(api, settings, selector, act, metrics, events)))
        .map_err(RepairStartError::Thread)?;
    Ok(Some((act, feed)))
}

struct Controller {
    client: kube::Client,
    settings: RepairSettings,
    action: Action,
    metrics: Arc<Metrics>,
    /// UIDs of the pods repaired in place: each is repaired once (the pod recovers only when
    /// its init container runs again, and every status change in between is an event).
    repaired: HashSet<String>,
}

async fn run(
    api: ApiSettings,
    settings: RepairSettings,
    selector: PodSelector,
    act: Action,
    metrics: Arc<Metrics>,
    mut events: mpsc::UnboundedReceiver<PodEvent>,
) {
    // For the writes (delete, label, events); the watch has its own.
    let client = match crate::pod_watch::client(&api).await {
        Ok(c) => c,
        Err(e) => {
            log::error!(target: SCOPE, "repair controller off: {e}");
            return;
        }
    };
    let node = settings.node_name.clone();
    let mut controller = Controller {
        client,
        settings,
        action: act,
        metrics,
        repaired: HashSet::new(),
    };
    let mut last_error: Option<String> = None;
    let mut listed = false;
    while let Some(event) = events.recv().await {
        let pod = match event {
            Ok(watcher::Event::Init) => continue,
            Ok(watcher::Event::InitDone) => {
                if !listed {
                    listed = true;
                    log::info!(target: SCOPE, "repair controller: watching the pods of node {node} for broken ones ({})", act.metric_type());
                }
                recovered(&mut last_error, &node);
                continue;
            }
            Ok(watcher::Event::Delete(pod)) => {
                controller.repaired.remove(&pod.uid().unwrap_or_default());
                continue;
            }
            Ok(watcher::Event::InitApply(pod) | watcher::Event::Apply(pod)) => pod,
            Err(crate::pod_watch::WatchError(text)) => {
                if last_error.as_deref() != Some(text.as_str()) {
                    log::warn!(target: SCOPE, "repair controller: the watch of node {node}'s pods failed, retrying with backoff (broken pods are not handled meanwhile): {text}");
                    last_error = Some(text);
                }
                continue;
            }
        };
        recovered(&mut last_error, &node);
        if !selector.matches(&pod) {
            // Out of the controller's selection: what a watch with these selectors would see
            // as the pod's deletion.
            controller.repaired.remove(&pod.uid().unwrap_or_default());
            continue;
        }
        if broken(&pod, &controller.settings) {
            controller.handle(&pod).await;
        }
    }
}

fn recovered(last_error: &mut Option<String>, node: &str) {
    if let Some(was) = last_error.take() {
        log::info!(target: SCOPE, "repair controller: the watch of node {node}'s pods recovered (was: {was})");
    }
}

/// Whether an API error may go away by itself (worth another attempt).
fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code >= 500 || s.code == 429,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// The outcome of one attempt.
enum Attempt {
    Done(PodRepairResult),
    Retry(String),
    Failed(String),
}

impl Controller {
    async fn handle(&mut self, pod: &Pod) {
        let key = pod_key(pod);
        let kind = self.action.metric_type();
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=ATTEMPTS {
            let outcome = match self.action {
                Action::Repair => self.repair(pod, &key),
                Action::Delete => self.delete(pod, &key).await,
                Action::Label => self.label(pod, &key).await,
            };
            match outcome {
                Attempt::Done(r) => {
                    self.metrics.pod_repaired(self.action, r);
                    return;
                }
                Attempt::Failed(e) => {
                    log::error!(target: SCOPE, "repair controller: {kind} of broken pod {key} failed: {e}");
                    self.metrics
                        .pod_repaired(self.action, PodRepairResult::Fail);
                    return;
                }
                Attempt::Retry(e) if attempt == ATTEMPTS => {
                    log::error!(target: SCOPE, "repair controller: {kind} of broken pod {key} failed after {ATTEMPTS} attempts: {e}");
                    self.metrics
                        .pod_repaired(self.action, PodRepairResult::Fail);
                    return;
                }
                Attempt::Retry(e) => {
                    log::debug!(target: SCOPE, "repair controller: {kind} of broken pod {key}, attempt {attempt}: {e}");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
    }

    fn repair(&mut self, pod: &Pod, key: &str) -> Attempt {
        let uid = pod.uid().unwrap_or_default();
        if self.repaired.contains(&uid) {
            log::debug!(target: SCOPE, "repair controller: pod {key} (uid {uid}) already repaired; skipped");
            return Attempt::Done(PodRepairResult::Skip);
        }
        log::info!(target: SCOPE, "repair controller: pod {key} is broken (its {} init container found no redirection); repairing it in place", self.settings.init_container_name);
        match super::netns::repair_pod(&self.settings.host_proc, pod, self.settings.native_nftables)
        {
            Ok(None) => {
                self.repaired.insert(uid);
                log::info!(target: SCOPE, "repair controller: pod {key} repaired: its network namespace has the sidecar redirection ({})", if self.settings.native_nftables { "nftables" } else { "iptables" });
                Attempt::Done(PodRepairResult::Success)
            }
            Ok(Some(why)) => {
                self.repaired.insert(uid);
                log::info!(target: SCOPE, "repair controller: pod {key} not repaired: the plugin does not redirect it ({why})");
                Attempt::Done(PodRepairResult::Skip)
            }
            // The netns may not be there yet (the sandbox restarting): worth another look.
            Err(e) => Attempt::Retry(e.to_string()),
        }
    }

    async fn delete(&self, pod: &Pod, key: &str) -> Attempt {
        let (Some(ns), Some(name)) = (pod.namespace(), pod.metadata.name.clone()) else {
            return Attempt::Done(PodRepairResult::Skip);
        };
        log::info!(target: SCOPE, "repair controller: pod {key} is broken (its {} init container found no redirection); deleting it", self.settings.init_container_name);
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: pod.metadata.uid.clone(),
                resource_version: pod.metadata.resource_version.clone(),
            }),
            ..Default::default()
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        match pods.delete(&name, &params).await {
            Ok(_) => {
                log::info!(target: SCOPE, "repair controller: broken pod {key} deleted");
                self.event(pod, "DeleteBrokenPod", format!("pod {key} deleted by the CNI repair controller: its {} init container found no traffic redirection", self.settings.init_container_name)).await;
                Attempt::Done(PodRepairResult::Success)
            }
            // Gone or changed meanwhile: a newer version comes through the watch.
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {
                log::info!(target: SCOPE, "repair controller: broken pod {key} not deleted, it is gone or changed meanwhile ({})", s.message);
                Attempt::Done(PodRepairResult::Skip)
            }
            Err(e) if transient(&e) => Attempt::Retry(format!("deleting pod {key}: {e}")),
            Err(e) => Attempt::Failed(format!("deleting pod {key}: {e}")),
        }
    }

    async fn label(&self, pod: &Pod, key: &str) -> Attempt {
        let (Some(ns), Some(name)) = (pod.namespace(), pod.metadata.name.clone()) else {
            return Attempt::Done(PodRepairResult::Skip);
        };
        let Some(patch) = label_patch(pod, &self.settings) else {
            log::debug!(target: SCOPE, "repair controller: broken pod {key} already has label {}; skipped", self.settings.label_key);
            return Attempt::Done(PodRepairResult::Skip);
        };
        let label = format!("{}={}", self.settings.label_key, self.settings.label_value);
        log::info!(target: SCOPE, "repair controller: pod {key} is broken (its {} init container found no redirection); labelling it {label}", self.settings.init_container_name);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        // pods/status: it may change the labels too, and needs less privilege than pods.
        match pods
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.event(pod, "LabelBrokenPod", format!("pod {key} labelled {label} by the CNI repair controller: its {} init container found no traffic redirection", self.settings.init_container_name)).await;
                Attempt::Done(PodRepairResult::Success)
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Attempt::Done(PodRepairResult::Skip),
            Err(e) if transient(&e) => Attempt::Retry(format!("labelling pod {key} {label}: {e}")),
            Err(e) => Attempt::Failed(format!("labelling pod {key} {label}: {e}")),
        }
    }

    /// A `Warning` event about `pod` (core/v1, with the fields client-go's recorder sets; Istio's
    /// chart grants `events` in the core group only). A failure is logged, never retried (the
    /// action is done).
    async fn event(&self, pod: &Pod, reason: &str, note: String) {
        use k8s_openapi::api::core::v1::{Event, EventSource};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
        let ns = pod.namespace().unwrap_or_default();
        let now = k8s_openapi::jiff::Timestamp::now();
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", pod.name_any())),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: pod.object_ref(&()),
            type_: Some("Warning".into()),
            reason: Some(reason.into()),
            message: Some(note),
            source: Some(EventSource {
                component: Some(COMPONENT.into()),
                host: Some(self.settings.node_name.clone()),
            }),
            reporting_component: Some(COMPONENT.into()),
            reporting_instance: Some(self.settings.node_name.clone()),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            count: Some(1),
            ..Default::default()
        };
        let events: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        if let Err(e) = events.create(&PostParams::default(), &event).await {
            log::warn!(target: SCOPE, "repair controller: event {reason} about pod {} not recorded: {e}", pod_key(pod));
        }
    }
}
