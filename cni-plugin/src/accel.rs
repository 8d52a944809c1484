//! Enrollment of a mesh pod in the accelerator's pinned maps (owned by the accelerator work).
//!
//! Called by ADD after the pod's redirection rules are in place, and by DEL. Enrollment is
//! best effort: if the accelerator is not loaded on this node, ADD still succeeds (the pod is
//! redirected, just not accelerated), and the reason is logged.
use std::net::IpAddr;

/// What the plugin knows about the pod when enrolling it.
#[derive(Clone, Debug, Default)]
pub struct PodEnrollment<'a> {
    /// `CNI_NETNS` of the pod.
    pub netns_path: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub container_id: &'a str,
    /// Pod IPs from prevResult.
    pub ips: Vec<IpAddr>,
    /// Raw pod annotations, for fastpath's opt-outs (validated here, hostile input).
    pub annotations: Option<&'a serde_json::Map<String, serde_json::Value>>,
    /// `cni_agent_run_dir` from the plugin config.
    pub run_dir: &'a str,
}

/// Enrolls the pod. Stub until the accelerator lands: does nothing.
pub fn enroll(_pod: &PodEnrollment<'_>) -> anyhow::Result<()> {
    Ok(())
}

/// Removes the pod's enrollment; idempotent, works when the netns is gone. Stub.
pub fn unenroll(_netns_path: &str, _container_id: &str, _run_dir: &str) -> anyhow::Result<()> {
    Ok(())
}
