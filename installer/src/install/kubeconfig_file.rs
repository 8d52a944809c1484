//! The plugin's kubeconfig, written from the service account's token and CA, and the same
//! credentials for the agent's own API calls.
use super::*;

impl Installer {
    /// The service account's API access (what the plugin's kubeconfig holds).
    pub fn api_access(&self) -> Result<fastpath_cni_plugin::kube::KubeAccess, String> {
        self.kubeconfig_inputs().map(|i| i.access())
    }

    pub(super) fn kubeconfig_inputs(&self) -> Result<KubeconfigInputs, String> {
        let token_path = self.cfg.token_path();
        let token = match fsutil::read_regular(&token_path) {
            ReadOutcome::Data(d) => String::from_utf8(d).map_err(|_| {
                format!(
                    "the service-account token {} is not UTF-8",
                    token_path.display()
                )
            })?,
            ReadOutcome::Missing => {
                return Err(format!(
                    "the service-account token {} does not exist",
                    token_path.display()
                ));
            }
            ReadOutcome::NotRegular(w) | ReadOutcome::Unreadable(w) => {
                return Err(format!(
                    "cannot read the service-account token {}: {w}",
                    token_path.display()
                ));
            }
        };
        let ca_pem = if self.cfg.skip_tls_verify {
            None
        } else {
            match fsutil::read_regular(&self.cfg.kube_ca_file) {
                ReadOutcome::Data(d) => Some(d),
                ReadOutcome::Missing => {
                    return Err(format!(
                        "the CA file {} (KUBE_CA_FILE) does not exist",
                        self.cfg.kube_ca_file.display()
                    ));
                }
                ReadOutcome::NotRegular(w) | ReadOutcome::Unreadable(w) => {
                    return Err(format!(
                        "cannot read the CA file {} (KUBE_CA_FILE): {w}",
                        self.cfg.kube_ca_file.display()
                    ));
                }
            }
        };
        Ok(KubeconfigInputs {
            protocol: self.cfg.kubernetes_service_protocol.clone(),
            host: self.cfg.kubernetes_service_host.clone(),
            port: self.cfg.kubernetes_service_port.clone(),
            ca_pem,
            token,
        })
    }

    pub(super) fn ensure_kubeconfig(&mut self, wrote: &mut bool) -> Result<(), String> {
        let inputs = self.kubeconfig_inputs()?;
        let text = kubeconfig::render(&inputs);
        let path = self.cfg.kubeconfig_path();
        if !self.kubeconfig_written {
            fsutil::remove_stale_temps(&path);
        }
        let mode = self.cfg.kubeconfig_mode;
        let current = match fsutil::read_regular(&path) {
            ReadOutcome::Data(d) => Some(d),
            _ => None,
        };
        if current.as_deref() == Some(text.as_bytes()) && fsutil::mode_of(&path) == Some(mode) {
            self.kubeconfig_written = true;
            return Ok(());
        }
        std::fs::create_dir_all(&self.cfg.cni_agent_run_dir).map_err(|e| {
            format!(
                "cannot create the run directory {} (CNI_AGENT_RUN_DIR): {e}",
                self.cfg.cni_agent_run_dir.display()
            )
        })?;
        fsutil::atomic_write(&path, text.as_bytes(), mode).map_err(|e| e.to_string())?;
        *wrote = true;
        if self.kubeconfig_written {
            self.metrics.repair(Repair::Kubeconfig);
            log::info!(target: SCOPE, "rewrote {} (service-account token rotated, or the file changed)", path.display());
        } else {
            log::info!(target: SCOPE, "wrote {}:\n{}", path.display(), kubeconfig::redacted(&inputs));
        }
        self.kubeconfig_written = true;
        Ok(())
    }
}
