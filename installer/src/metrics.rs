//! Prometheus metrics, text exposition format. Istio's names (`istio_cni_install_ready`,
//! `istio_cni_installs_total{result}`) plus fastpath's own (`fastpath_*`).
use std::fmt::Write as _;
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

#[derive(Default)]
pub struct Metrics {
    installs: [AtomicU64; 4],
    repairs: [AtomicU64; 3],
    fights: AtomicU64,
    plugin_log_lines: AtomicU64,
    plugin_log_rejected: AtomicU64,
    reconciles: AtomicU64,
}

impl Metrics {
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

    /// The `/metrics` body.
    /// `accel` is `None` while the accelerator is still starting.
    pub fn render(&self, ready: bool, accel: Option<&AccelState>, pods: &[PodCounters]) -> String {
        let mut s = String::new();
        header(
            &mut s,
            "istio_cni_install_ready",
            "gauge",
            "Whether the CNI plugin is installed and its config is in place (1) or not (0).",
        );
        let _ = writeln!(s, "istio_cni_install_ready {}", u8::from(ready));
        header(
            &mut s,
            "istio_cni_installs_total",
            "counter",
            "Installs of the CNI plugin, by result.",
        );
        for (i, l) in RESULT_LABELS.iter().enumerate() {
            let _ = writeln!(
                s,
                "istio_cni_installs_total{{result=\"{l}\"}} {}",
                self.installs[i].load(Relaxed)
            );
        }
        header(
            &mut s,
            "fastpath_cni_repairs_total",
            "counter",
            "Repairs after drift (someone changed or removed what the agent installed), by what was repaired.",
        );
        for (i, l) in REPAIR_LABELS.iter().enumerate() {
            let _ = writeln!(
                s,
                "fastpath_cni_repairs_total{{kind=\"{l}\"}} {}",
                self.repairs[i].load(Relaxed)
            );
        }
        header(
            &mut s,
            "fastpath_cni_config_fights_total",
            "counter",
            "Times another agent was found rewriting the CNI config again and again (the agent backs off and is not ready).",
        );
        let _ = writeln!(
            s,
            "fastpath_cni_config_fights_total {}",
            self.fights.load(Relaxed)
        );
        header(
            &mut s,
            "fastpath_cni_reconciles_total",
            "counter",
            "Passes of the reconcile loop (start, file events, timers).",
        );
        let _ = writeln!(
            s,
            "fastpath_cni_reconciles_total {}",
            self.reconciles.load(Relaxed)
        );
        header(
            &mut s,
            "fastpath_plugin_log_lines_total",
            "counter",
            "Log lines received from the CNI plugin on the log socket.",
        );
        let _ = writeln!(
            s,
            "fastpath_plugin_log_lines_total {}",
            self.plugin_log_lines.load(Relaxed)
        );
        header(
            &mut s,
            "fastpath_plugin_log_rejected_total",
            "counter",
            "Malformed requests or lines received on the plugin log socket.",
        );
        let _ = writeln!(
            s,
            "fastpath_plugin_log_rejected_total {}",
            self.plugin_log_rejected.load(Relaxed)
        );
        header(
            &mut s,
            "fastpath_accel_enabled",
            "gauge",
            "Whether same-node sidecar traffic is accelerated with eBPF sockmap (1) or not (0).",
        );
        let _ = writeln!(
            s,
            "fastpath_accel_enabled {}",
            u8::from(accel == Some(&AccelState::Active))
        );
        header(
            &mut s,
            "fastpath_accel_state",
            "gauge",
            "The accelerator's state: active, disabled, unavailable or conflict (another sockmap accelerator is attached); the series with value 1, all 0 while it starts.",
        );
        for st in ["active", "disabled", "unavailable", "conflict"] {
            let _ = writeln!(
                s,
                "fastpath_accel_state{{state=\"{st}\"}} {}",
                u8::from(accel.map(accel_state_name) == Some(st))
            );
        }
        header(
            &mut s,
            "fastpath_accel_foreign_programs",
            "gauge",
            "Programs of another sockmap accelerator found attached on the node at start (sock_ops on the cgroup v2 root, or on another sockmap); acceleration stays off while there are any.",
        );
        let foreign = match accel {
            Some(AccelState::Conflict { programs }) => programs.len(),
            _ => 0,
        };
        let _ = writeln!(s, "fastpath_accel_foreign_programs {foreign}");
        type Field = (
            &'static str,
            &'static str,
            fn(&fastpath_common::PodStats) -> u64,
        );
        let fields: [Field; 7] = [
            (
                "fastpath_pod_sockets_enrolled_total",
                "Sockets of the pod enrolled for acceleration.",
                |p| p.sockets_enrolled,
            ),
            (
                "fastpath_pod_enroll_failures_total",
                "Sockets of the pod the kernel refused to enrol.",
                |p| p.enroll_failures,
            ),
            (
                "fastpath_pod_messages_redirected_total",
                "Messages redirected socket to socket, bypassing the TCP stack.",
                |p| p.msgs_redirected,
            ),
            (
                "fastpath_pod_bytes_redirected_total",
                "Bytes redirected socket to socket, bypassing the TCP stack.",
                |p| p.bytes_redirected,
            ),
            (
                "fastpath_pod_peer_misses_total",
                "Messages of enrolled sockets that found no local peer and took the TCP path.",
                |p| p.peer_misses,
            ),
            (
                "fastpath_pod_queue_demotions_total",
                "Accelerated connections of the pod that went back to TCP because the reader's queue passed the limit (FASTPATH_MAX_QUEUED_BYTES).",
                |p| p.queue_demotions,
            ),
            (
                "fastpath_pod_tcp_segments_held_total",
                "TCP segments held back from the pod's sockets until their reader had read every redirected byte (the sender retransmits them).",
                |p| p.tcp_segments_held,
            ),
        ];
        for (name, help, get) in fields {
            header(&mut s, name, "counter", help);
            for p in pods {
                let _ = writeln!(
                    s,
                    "{name}{{namespace=\"{}\",pod=\"{}\",netns_cookie=\"{}\"}} {}",
                    escape_label(p.namespace.as_deref().unwrap_or("")),
                    escape_label(p.name.as_deref().unwrap_or("")),
                    p.netns_cookie,
                    get(&p.stats)
                );
            }
        }
        s
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

fn header(s: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(s, "# HELP {name} {help}");
    let _ = writeln!(s, "# TYPE {name} {kind}");
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
        assert!(t.contains("fastpath_accel_enabled 0\n"));
        assert!(t.contains("fastpath_accel_state{state=\"unavailable\"} 1\n"));
        assert!(t.contains(
            "fastpath_pod_bytes_redirected_total{namespace=\"default\",pod=\"web\\\"1\",netns_cookie=\"7\"} 42\n"
        ));
    }
}
