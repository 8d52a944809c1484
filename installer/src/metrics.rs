//! Prometheus metrics, encoded by prometheus-client (OpenMetrics text). Istio's names
//! (`istio_cni_install_ready`, `istio_cni_installs_total{result}`) plus fastpath's own
//! (`fastpath_*`). Every value is read when scraped: the agent's counters, and the per-pod
//! counters of the pinned eBPF maps.
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::accel::{AccelState, PodCounters};

/// `istio_cni_installs_total` results, Istio's label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstallResult {
    Success = 0,
    CopyBinariesFailure = 1,
    CreateKubeconfigFailure = 2,
    CreateCniConfigFailure = 3,
}

const RESULT_LABELS: [&str; 4] = [
    "SUCCESS",
    "COPY_BINARIES_FAILURE",
    "CREATE_KUBECONFIG_FAILURE",
    "CREATE_CNI_CONFIG_FAILURE",
];

/// What was repaired after drift.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    Binary = 0,
    Kubeconfig = 1,
    CniConfig = 2,
}

const REPAIR_LABELS: [&str; 3] = ["binary", "kubeconfig", "cni_config"];

/// `type` of `istio_cni_repair_pods_repaired_total` (Istio's repair controller), in
/// [`crate::repair::Action`]'s order.
const POD_REPAIR_TYPES: [&str; 3] = ["repair", "delete", "label"];
/// `result` of `istio_cni_repair_pods_repaired_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodRepairResult {
    Success = 0,
    Skip = 1,
    Fail = 2,
}
const POD_REPAIR_RESULTS: [&str; 3] = ["success", "skip", "fail"];

#[derive(Default)]
pub struct Metrics {
    installs: [AtomicU64; 4],
    repairs: [AtomicU64; 3],
    fights: AtomicU64,
    plugin_log_lines: AtomicU64,
    plugin_log_rejected: AtomicU64,
    reconciles: AtomicU64,
    pods_repaired: [[AtomicU64; 3]; 3],
}

impl Metrics {
    /// One outcome of the repair controller's `action` on a broken pod.
    pub fn pod_repaired(&self, action: crate::repair::Action, r: PodRepairResult) {
        self.pods_repaired[action as usize][r as usize].fetch_add(1, Relaxed);
    }
    pub fn pods_repaired(&self, action: crate::repair::Action, r: PodRepairResult) -> u64 {
        self.pods_repaired[action as usize][r as usize].load(Relaxed)
    }
    pub fn install(&self, r: InstallResult) {
        self.installs[r as usize].fetch_add(1, Relaxed);
    }
    pub fn installs(&self, r: InstallResult) -> u64 {
        self.installs[r as usize].load(Relaxed)
    }
    pub fn repair(&self, r: Repair) {
        self.repairs[r as usize].fetch_add(1, Relaxed);
    }
    pub fn fight(&self) {
        self.fights.fetch_add(1, Relaxed);
    }
    pub fn plugin_log_line(&self) {
        self.plugin_log_lines.fetch_add(1, Relaxed);
    }
    pub fn plugin_log_rejected(&self) {
        self.plugin_log_rejected.fetch_add(1, Relaxed);
    }
    pub fn reconcile(&self) {
        self.reconciles.fetch_add(1, Relaxed);
    }

    /// The `/metrics` body (OpenMetrics text, as prometheus-client encodes it). `accel` is
    /// `None` while the accelerator is still starting.
    pub fn render(&self, ready: bool, accel: Option<&AccelState>, pods: &[PodCounters]) -> String {
        let load = |a: &[AtomicU64]| a.iter().map(|v| v.load(Relaxed)).collect::<Vec<_>>();
        let snapshot = Snapshot {
            ready,
            installs: load(&self.installs),
            repairs: load(&self.repairs),
            fights: self.fights.load(Relaxed),
            reconciles: self.reconciles.load(Relaxed),
            pods_repaired: self.pods_repaired.iter().map(|a| load(a)).collect(),
            plugin_log_lines: self.plugin_log_lines.load(Relaxed),
            plugin_log_rejected: self.plugin_log_rejected.load(Relaxed),
            accel_state: accel.map(accel_state_name),
            foreign_programs: match accel {
                Some(AccelState::Conflict { programs }) => programs.len(),
                _ => 0,
            },
            pods: pods.to_vec(),
        };
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(snapshot));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// The content type of [`Metrics::render`]'s body.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What one scrape reports, read at that moment.
#[derive(Debug)]
struct Snapshot {
    ready: bool,
    installs: Vec<u64>,
    repairs: Vec<u64>,
    fights: u64,
    reconciles: u64,
    /// By type, then result.
    pods_repaired: Vec<Vec<u64>>,
    plugin_log_lines: u64,
    plugin_log_rejected: u64,
    accel_state: Option<&'static str>,
    foreign_programs: usize,
    pods: Vec<PodCounters>,
}

type PodField = (
    &'static str,
    &'static str,
    fn(&fastpath_common::PodStats) -> u64,
);

/// The per-pod counters (`<name>_total{namespace, pod, netns_cookie}`).
const POD_FIELDS: [PodField; 7] = [
    (
        "fastpath_pod_sockets_enrolled",
        "Sockets of the pod enrolled for acceleration.",
        |p| p.sockets_enrolled,
    ),
    (
        "fastpath_pod_enroll_failures",
        "Sockets of the pod the kernel refused to enrol.",
        |p| p.enroll_failures,
    ),
    (
        "fastpath_pod_messages_redirected",
        "Messages redirected socket to socket, bypassing the TCP stack.",
        |p| p.msgs_redirected,
    ),
    (
        "fastpath_pod_bytes_redirected",
        "Bytes redirected socket to socket, bypassing the TCP stack.",
        |p| p.bytes_redirected,
    ),
    (
        "fastpath_pod_peer_misses",
        "Messages of enrolled sockets that found no local peer and took the TCP path.",
        |p| p.peer_misses,
    ),
    (
        "fastpath_pod_queue_demotions",
        "Accelerated connections of the pod that went back to TCP because the reader's queue passed the limit (FASTPATH_MAX_QUEUED_BYTES).",
        |p| p.queue_demotions,
    ),
    (
        "fastpath_pod_tcp_segments_held",
        "TCP segments held back from the pod's sockets until their reader had read every redirected byte (the sender retransmits them).",
        |p| p.tcp_segments_held,
    ),
];

/// One metric family: its series as (labels, value). Counters are named without `_total`,
/// which the encoder appends.
fn family<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (L, u64)>,
) -> std::fmt::Result {
    let mut metric = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in series {
        let m = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value).encode(m)?,
            _ => ConstGauge::new(value as i64).encode(m)?,
        }
    }
    Ok(())
}

/// A family of one series without labels.
fn single(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    value: u64,
) -> std::fmt::Result {
    let no_labels: [(&str, &str); 0] = [];
    family(enc, name, help, kind, [(no_labels, value)])
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        use MetricType::{Counter, Gauge};
        single(
            &mut enc,
            "istio_cni_install_ready",
            "Whether the CNI plugin is installed and its config is in place (1) or not (0).",
            Gauge,
            u64::from(self.ready),
        )?;
        family(
            &mut enc,
            "istio_cni_installs",
            "Installs of the CNI plugin, by result.",
            Counter,
            RESULT_LABELS
                .iter()
                .zip(&self.installs)
                .map(|(l, v)| ([("result", *l)], *v)),
        )?;
        family(
            &mut enc,
            "fastpath_cni_repairs",
            "Repairs after drift (someone changed or removed what the agent installed), by what was repaired.",
            Counter,
            REPAIR_LABELS
                .iter()
                .zip(&self.repairs)
                .map(|(l, v)| ([("kind", *l)], *v)),
        )?;
        family(
            &mut enc,
            "istio_cni_repair_pods_repaired",
            "Broken pods (their istio-validation init container found no redirection) the repair controller acted on, by action type and result.",
            Counter,
            POD_REPAIR_TYPES
                .iter()
                .zip(&self.pods_repaired)
                .flat_map(|(t, by_result)| {
                    POD_REPAIR_RESULTS
                        .iter()
                        .zip(by_result)
                        .map(move |(r, v)| ([("type", *t), ("result", *r)], *v))
                }),
        )?;
        single(
            &mut enc,
            "fastpath_cni_config_fights",
            "Times another agent was found rewriting the CNI config again and again (the agent backs off and is not ready).",
            Counter,
            self.fights,
        )?;
        single(
            &mut enc,
            "fastpath_cni_reconciles",
            "Passes of the reconcile loop (start, file events, timers).",
            Counter,
            self.reconciles,
        )?;
        single(
            &mut enc,
            "fastpath_plugin_log_lines",
            "Log lines received from the CNI plugin on the log socket.",
            Counter,
            self.plugin_log_lines,
        )?;
        single(
            &mut enc,
            "fastpath_plugin_log_rejected",
            "Malformed requests or lines received on the plugin log socket.",
            Counter,
            self.plugin_log_rejected,
        )?;
        single(
            &mut enc,
            "fastpath_accel_enabled",
            "Whether same-node sidecar traffic is accelerated with eBPF sockmap (1) or not (0).",
            Gauge,
            u64::from(self.accel_state == Some("active")),
        )?;
        family(
            &mut enc,
            "fastpath_accel_state",
            "The accelerator's state: active, disabled, unavailable or conflict (another sockmap accelerator is attached); the series with value 1, all 0 while it starts.",
            Gauge,
            ["active", "disabled", "unavailable", "conflict"]
                .map(|st| ([("state", st)], u64::from(self.accel_state == Some(st)))),
        )?;
        single(
            &mut enc,
            "fastpath_accel_foreign_programs",
            "Programs of another sockmap accelerator found attached on the node at start (sock_ops on the cgroup v2 root, or on another sockmap); acceleration stays off while there are any.",
            Gauge,
            self.foreign_programs as u64,
        )?;
        for (name, help, get) in POD_FIELDS {
            family(
                &mut enc,
                name,
                help,
                Counter,
                self.pods.iter().map(|p| {
                    let labels = vec![
                        ("namespace", p.namespace.clone().unwrap_or_default()),
                        ("pod", p.name.clone().unwrap_or_default()),
                        ("netns_cookie", p.netns_cookie.to_string()),
                    ];
                    (labels, get(&p.stats))
                }),
            )?;
        }
        Ok(())
    }
}

pub fn accel_state_name(a: &AccelState) -> &'static str {
    match a {
        AccelState::Active => "active",
        AccelState::Disabled => "disabled",
        AccelState::Unavailable { .. } => "unavailable",
        AccelState::Conflict { .. } => "conflict",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_istio_names_and_pod_labels() {
        let m = Metrics::default();
        m.install(InstallResult::Success);
        m.install(InstallResult::CreateCniConfigFailure);
        m.fight();
        m.pod_repaired(crate::repair::Action::Delete, PodRepairResult::Success);
        let pods = vec![PodCounters {
            netns_cookie: 7,
            namespace: Some("default".into()),
            name: Some("web\"1".into()),
            stats: fastpath_common::PodStats {
                bytes_redirected: 42,
                ..Default::default()
            },
        }];
        let t = m.render(
            true,
            Some(&AccelState::Unavailable { reason: "x".into() }),
            &pods,
        );
        assert!(t.contains("\nistio_cni_install_ready 1\n"));
        assert!(t.contains("istio_cni_installs_total{result=\"SUCCESS\"} 1\n"));
        assert!(t.contains("istio_cni_installs_total{result=\"CREATE_CNI_CONFIG_FAILURE\"} 1\n"));
        assert!(t.contains("fastpath_cni_config_fights_total 1\n"));
        assert!(t.contains(
            "istio_cni_repair_pods_repaired_total{type=\"delete\",result=\"success\"} 1\n"
        ));
        assert!(
            t.contains("istio_cni_repair_pods_repaired_total{type=\"repair\",result=\"fail\"} 0\n")
        );
        assert!(t.contains("fastpath_accel_enabled 0\n"));
        assert!(t.contains("fastpath_accel_state{state=\"unavailable\"} 1\n"));
        assert!(t.contains(
            "fastpath_pod_bytes_redirected_total{namespace=\"default\",pod=\"web\\\"1\",netns_cookie=\"7\"} 42\n"
        ));
    }
}

#[cfg(test)]
mod encoding_tests {
    use super::*;

    #[test]
    fn the_body_is_openmetrics_with_help_type_and_eof() {
        let t = Metrics::default().render(false, None, &[]);
        assert!(t.contains("# TYPE istio_cni_installs counter\n"), "{t}");
        assert!(t.contains("# HELP istio_cni_install_ready Whether"), "{t}");
        assert!(
            t.contains("\nfastpath_accel_state{state=\"active\"} 0\n"),
            "{t}"
        );
        assert!(t.ends_with("# EOF\n"), "{t}");
    }
}
