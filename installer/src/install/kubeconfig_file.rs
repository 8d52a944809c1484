//! The plugin's kubeconfig, written from the service account's token and CA, and the same
//! credentials for the agent's own API calls.
use super::*;

/// Why the plugin's kubeconfig is not in place, or the agent has no API access (the
/// `kubeconfig` readiness reason): the service account's token or CA, or the write.
#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("the service-account token {} is not UTF-8", path.display())]
    TokenNotUtf8 { path: PathBuf },
    #[error("the service-account token {} does not exist", path.display())]
    TokenMissing { path: PathBuf },
    /// Not a regular file, or unreadable (`why`).
    #[error("cannot read the service-account token {}: {why}", path.display())]
    TokenUnreadable { path: PathBuf, why: String },
    #[error("the CA file {} (KUBE_CA_FILE) does not exist", path.display())]
    CaMissing { path: PathBuf },
    /// Not a regular file, or unreadable (`why`).
    #[error("cannot read the CA file {} (KUBE_CA_FILE): {why}", path.display())]
    CaUnreadable { path: PathBuf, why: String },
    #[error("cannot create the run directory {} (CNI_AGENT_RUN_DIR): {source}", dir.display())]
    RunDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] fsutil::FileWriteError),
}

impl Installer {
    /// The service account's API access (what the plugin's kubeconfig holds).
    pub fn api_access(&self) -> Result<fastpath_cni_plugin::kube::KubeAccess, KubeconfigError> {
        self.kubeconfig_inputs().map(|i| i.access())
    }

    pub(super) fn kubeconfig_inputs(&self) -> Result<KubeconfigInputs, KubeconfigError> {
        let token_path = self.cfg.token_path();
        let token = match fsutil::read_regular(&token_path) {
            ReadOutcome::Data(d) => {
                String::from_utf8(d).map_err(|_| KubeconfigError::TokenNotUtf8 {
                    path: token_path.clone(),
                })?
            }
            ReadOutcome::Missing => {
                return Err(KubeconfigError::TokenMissing { path: token_path });
            }
            ReadOutcome::NotRegular(why) | ReadOutcome::Unreadable(why) => {
                return Err(KubeconfigError::TokenUnreadable {
                    path: token_path,
                    why,
                });
            }
        };
        let ca_pem = if self.cfg.skip_tls_verify {
            None
        } else {
            match fsutil::read_regular(&self.cfg.kube_ca_file) {
                ReadOutcome::Data(d) => Some(d),
                ReadOutcome::Missing => {
                    return Err(KubeconfigError::CaMissing {
                        path: self.cfg.kube_ca_file.clone(),
                    });
                }
                ReadOutcome::NotRegular(why) | ReadOutcome::Unreadable(why) => {
                    return Err(KubeconfigError::CaUnreadable {
                        path: self.cfg.kube_ca_file.clone(),
                        why,
                    });
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

    pub(super) fn ensure_kubeconfig(&mut self, wrote: &mut bool) -> Result<(), KubeconfigError> {
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
        std::fs::create_dir_all(&self.cfg.cni_agent_run_dir).map_err(|source| {
            KubeconfigError::RunDir {
                dir: self.cfg.cni_agent_run_dir.clone(),
                source,
            }
        })?;
        fsutil::atomic_write(&path, text.as_bytes(), mode)?;
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
