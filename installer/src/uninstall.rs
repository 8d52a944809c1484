//! Taking fastpath off a node: on SIGTERM when the agent decided it is an uninstall, and in
//! the `uninstall` and `uninstall-and-wait` commands (the cleanup DaemonSet of
//! `manifests/cleanup-daemonset.yaml`). The order loses no byte and never leaves a config that
//! names a missing binary:
//! 1. the accelerator: every accelerated connection goes back to TCP and drains, then the
//!    links are detached and the pins removed ([`accel::uninstall`]);
//! 2. the plugin: its entry in every config, the kubeconfig, then the binary
//!    ([`install::cleanup_node`]).
//!
//! Then it checks what is left and says so in one line.
use std::path::Path;

use crate::{
    accel,
    config::{Config, PLUGIN_BINARY},
    install,
};

/// Removes everything; returns the process exit code (0 when nothing is left).
pub fn node(cfg: &Config, pinned_conf: Option<&Path>) -> i32 {
    let mut code = 0;
    let programs = accel::pinned_program_ids(&cfg.accel.pin_dir);
    if let Err(e) = accel::uninstall(&cfg.accel) {
        log::error!("removing the accelerator: {e:#}");
        code = 1;
    }
    if let Err(e) = install::cleanup_node(cfg, pinned_conf) {
        log::error!("removing the plugin: {e}");
        code = 1;
    }
    match leftovers(cfg, &programs) {
        left if left.is_empty() => log::info!(
            "node is clean: no istio-cni entry in {}, no kubeconfig, no plugin binary, no \
             accelerator pins, no fastpath program loaded",
            cfg.mounted_cni_net_dir.display()
        ),
        left => {
            log::warn!("left on this node: {}", left.join("; "));
            code = 1;
        }
    }
    code
}

/// What of fastpath is still on the node; `programs` are the ids it had pinned.
pub fn leftovers(cfg: &Config, programs: &[u32]) -> Vec<String> {
    let mut left = Vec::new();
    let naming = install::files_naming_plugin(&cfg.mounted_cni_net_dir);
    if !naming.is_empty() {
        left.push(format!("configs naming istio-cni: {}", naming.join(", ")));
    }
    let kubeconfig = cfg.kubeconfig_path();
    if kubeconfig.exists() {
        left.push(format!("kubeconfig {}", kubeconfig.display()));
    }
    let binary = cfg.host_bin_dir.join(PLUGIN_BINARY);
    if binary.exists() {
        left.push(format!("plugin binary {}", binary.display()));
    }
    if cfg.accel.pin_dir.exists() {
        left.push(format!("pins under {}", cfg.accel.pin_dir.display()));
    }
    let programs = accel::still_loaded_after(programs, std::time::Duration::from_secs(2));
    if !programs.is_empty() {
        left.push(format!(
            "fastpath programs still loaded (held by connections that did not drain; they \
             go when those close): {}",
            programs.join(", ")
        ));
    }
    left
}
