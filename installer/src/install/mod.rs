//! The installer: brings the node to the desired state (plugin binary, kubeconfig, CNI config
//! entry) and takes it away again. Every pass compares what is there with what should be there
//! and writes only what differs, so the agent's own writes (and unrelated events) cause no
//! second write and no readiness change.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value};

use crate::config::{Config, PLUGIN_BINARY, STANDALONE_CONF_NAME};
use crate::conflist::{self, EntryState, NetConf};
use crate::fight::{self, FightTracker, Removal};
use crate::fsutil::{self, FileStamp, ReadOutcome};
use crate::kubeconfig::{self, KubeconfigInputs};
use crate::metrics::{InstallResult, Metrics, Repair};

mod binaries;
mod cleanup;
mod cni_config;
mod kubeconfig_file;

pub use binaries::BinaryInstallError;
use binaries::*;
use cleanup::*;
pub use cleanup::{CleanupError, CleanupFailure, RemovalError, cleanup_node, files_naming_plugin};
pub use cni_config::{
    Candidate, ConfDirError, PrimaryConfError, Scan, choose_primary, scan_conf_dir,
};
pub use kubeconfig_file::KubeconfigError;

const SCOPE: &str = crate::logging::SCOPE_AGENT;

/// The outcome of one pass, per part. `Err` holds the reason the part is not in place.
#[derive(Debug)]
pub struct Pass {
    pub binary: Result<(), BinaryInstallError>,
    pub kubeconfig: Result<(), KubeconfigError>,
    pub cni_config: Result<(), ConfInstallError>,
    /// Something was written.
    pub wrote: bool,
    /// Look again at this time even without a file event (fight back-off, calm check).
    pub wake_at: Option<Instant>,
}

impl Pass {
    pub fn all_ok(&self) -> bool {
        self.binary.is_ok() && self.kubeconfig.is_ok() && self.cni_config.is_ok()
    }
}

/// A config file we wrote, to recognise our own content and others' rewrites.
#[derive(Debug, Clone)]
struct Written {
    path: PathBuf,
    digest: u64,
    /// A removal of our entry since this write was already counted.
    removal_counted: bool,
}

pub struct Installer {
    cfg: Config,
    entry: Map<String, Value>,
    metrics: Arc<Metrics>,
    /// The plugin binaries of the image, fixed at the first pass (as Istio does).
    binaries: Option<Vec<String>>,
    /// Stamp of each target binary when it last matched the source.
    bin_ok: BTreeMap<String, FileStamp>,
    kubeconfig_written: bool,
    /// The primary config we patched (chained) and the bytes we wrote there.
    pinned: Option<PathBuf>,
    written: Option<Written>,
    fight: FightTracker,
    /// Reports already logged (each said once until it changes).
    said: BTreeSet<String>,
    first_pass: bool,
}

/// The plugin's entry for this configuration.
pub fn plugin_entry(cfg: &Config) -> Result<Map<String, Value>, conflist::TemplateError> {
    let host_bin_dir = cfg.host_bin_dir.to_string_lossy();
    let vars = conflist::TemplateVars {
        plugin_log_level: cfg.plugin_log_level.as_str().into(),
        cni_agent_run_dir: cfg.cni_agent_run_dir.to_string_lossy().into(),
        kubeconfig_filename: crate::config::KUBECONFIG_NAME.into(),
        kubeconfig_filepath: cfg.kubeconfig_path().to_string_lossy().into(),
        log_uds_address: cfg.log_socket_path().to_string_lossy().into(),
        cni_event_address: cfg
            .cni_agent_run_dir
            .join("pluginevent.sock")
            .to_string_lossy()
            .into(),
        cni_netns_dir: "/var/run/netns".into(),
        // The host's path: the mounted dir without the container's `/host` prefix.
        cni_bin_dir: host_bin_dir
            .strip_prefix("/host")
            .unwrap_or(&host_bin_dir)
            .to_string(),
        ambient_enabled: cfg.ambient_enabled,
        exclude_namespaces: cfg.exclude_namespaces.clone(),
        exclude_namespaces_raw: cfg.exclude_namespaces_raw.clone(),
        pod_namespace: cfg.pod_namespace.clone(),
        native_nftables: cfg.native_nftables,
        enable_ambient_detection_retry: cfg.enable_ambient_detection_retry,
    };
    conflist::render_entry(&cfg.template.text, &cfg.template.origin, &vars)
}

impl Installer {
    pub fn new(cfg: Config, entry: Map<String, Value>, metrics: Arc<Metrics>) -> Self {
        let fight = FightTracker::new(cfg.fight_threshold, cfg.fight_window);
        Installer {
            cfg,
            entry,
            metrics,
            binaries: None,
            bin_ok: BTreeMap::new(),
            kubeconfig_written: false,
            pinned: None,
            written: None,
            fight,
            said: BTreeSet::new(),
            first_pass: true,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Logs `msg` at `level` once until [`Installer::unsay`] with the same key.
    fn say_once(&mut self, key: &str, level: log::Level, msg: &str) {
        if self.said.insert(key.to_string()) {
            log::log!(target: SCOPE, level, "{msg}");
        }
    }

    fn unsay(&mut self, key: &str) {
        self.said.remove(key);
    }

    /// Logs a part's error when it first appears or changes; forgets it once the part is fine.
    fn report(&mut self, part: &'static str, error: Option<&dyn std::fmt::Display>) {
        let prefix = format!("error:{part}:");
        let error = error.map(ToString::to_string);
        let key = error.as_ref().map(|e| format!("{prefix}{e}"));
        self.said
            .retain(|k| !k.starts_with(&prefix) || Some(k) == key.as_ref());
        if let (Some(key), Some(e)) = (key, error) {
            self.say_once(&key, log::Level::Error, &e);
        }
    }

    /// One pass: binary, then kubeconfig, then CNI config (the config last, so it never names
    /// a binary or kubeconfig that is not there yet).
    pub fn reconcile(&mut self, now: Instant) -> Pass {
        self.metrics.reconcile();
        let mut wrote = false;
        let binary = self.ensure_binaries(&mut wrote);
        if binary.is_err() {
            self.metrics.install(InstallResult::CopyBinariesFailure);
        }
        self.report("binary", binary.as_ref().err().map(|e| e as _));
        let kubeconfig = self.ensure_kubeconfig(&mut wrote);
        if kubeconfig.is_err() {
            self.metrics.install(InstallResult::CreateKubeconfigFailure);
        }
        self.report("kubeconfig", kubeconfig.as_ref().err().map(|e| e as _));
        let cni_config = if binary.is_ok() && kubeconfig.is_ok() {
            let r = if self.cfg.chained {
                self.ensure_chained(now, &mut wrote)
            } else {
                self.ensure_standalone(&mut wrote)
            };
            if let Err(e) = &r
                && !e.waiting
            {
                self.metrics.install(InstallResult::CreateCniConfigFailure);
            }
            let loud = r.as_ref().err().filter(|e| !e.quiet);
            self.report("cni-config", loud.map(|e| e as _));
            r
        } else {
            Err(ConfInstallError::waiting(
                "waiting for the plugin binary and kubeconfig".into(),
            ))
        };
        let pass = Pass {
            binary,
            kubeconfig,
            cni_config,
            wrote,
            wake_at: self.fight.wake_at(now),
        };
        if pass.all_ok() && (wrote || self.first_pass) {
            self.metrics.install(InstallResult::Success);
        }
        if pass.all_ok() {
            self.first_pass = false;
        }
        pass
    }

    /// The config file this agent put its entry in (a chained install), if any.
    pub fn pinned_conf(&self) -> Option<&Path> {
        self.pinned.as_deref()
    }

    /// Shutdown cleanup, in the order that never leaves a config naming a missing binary:
    /// the entry, then the kubeconfig, then the binary. The binary stays when an entry could
    /// not be removed.
    pub fn cleanup(&mut self) -> Result<(), CleanupError> {
        cleanup_node(&self.cfg, self.pinned.as_deref())
    }
}

/// Why the plugin's entry is not in place (the `cni-config` readiness reason): an install
/// failure, or waiting (for a primary config to appear, or for the binary and kubeconfig).
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct ConfInstallError {
    reason: String,
    /// Waiting for a primary: not an install failure.
    waiting: bool,
    /// Already explained in the log (the fight line).
    quiet: bool,
}

impl ConfInstallError {
    /// Waiting for something else, not an install failure.
    pub fn is_waiting(&self) -> bool {
        self.waiting
    }

    /// Backing off in a fight with another agent.
    pub fn is_backing_off(&self) -> bool {
        self.quiet && !self.waiting
    }

    fn failed(reason: String) -> Self {
        ConfInstallError {
            reason,
            waiting: false,
            quiet: false,
        }
    }
    /// Waiting for a primary (logged by the caller in Istio's words).
    fn waiting(reason: String) -> Self {
        ConfInstallError {
            reason,
            waiting: true,
            quiet: true,
        }
    }
    /// Backing off in a fight (logged once by the fight line).
    fn backoff(reason: String) -> Self {
        ConfInstallError {
            reason,
            waiting: false,
            quiet: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(name: &str, json: &str) -> Candidate {
        Candidate {
            name: name.into(),
            conf: conflist::parse_net_conf(name, json.as_bytes()).unwrap(),
            digest: 0,
            symlink_to: None,
        }
    }

    #[test]
    fn binary_and_cleanup_errors_keep_their_wording() {
        let dir = std::env::temp_dir().join(format!("fastpath-binerr-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let e = list_binaries(&dir).unwrap_err();
        assert!(
            matches!(&e, BinaryInstallError::SourceDirUnreadable { dir: d, .. } if *d == dir),
            "{e:?}"
        );
        assert!(
            e.to_string().starts_with(&format!(
                "cannot read the plugin binary directory {}: ",
                dir.display()
            )),
            "{e}"
        );
        std::fs::create_dir_all(&dir).unwrap();
        let e = list_binaries(&dir).unwrap_err();
        assert!(matches!(e, BinaryInstallError::NoBinary { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!("no plugin binary in {} (expected istio-cni)", dir.display())
        );
        let _ = std::fs::remove_dir_all(&dir);

        let e = CleanupError {
            failures: vec![
                RemovalError::Remove {
                    path: "/x/k".into(),
                    source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
                }
                .into(),
                CleanupFailure::BinaryKept {
                    dir: "/host/opt/cni/bin".into(),
                    files: vec!["10-a.conflist".into(), "20-b.conflist".into()],
                },
            ],
        };
        let text = e.to_string();
        let (first, kept) = text.split_once("; ").unwrap();
        assert_eq!(
            first,
            crate::fsutil::describe_write_error(
                Path::new("/x/k"),
                &std::io::Error::from(std::io::ErrorKind::PermissionDenied)
            )
        );
        assert_eq!(
            kept,
            "kept the plugin binary in /host/opt/cni/bin: 10-a.conflist, 20-b.conflist still name \
             istio-cni (removing the binary would break pod creation and deletion on this node)"
        );
    }

    #[test]
    fn waiting_is_not_a_failure() {
        let e = ConfInstallError::waiting("waiting for the plugin binary and kubeconfig".into());
        assert!(e.is_waiting() && !e.is_backing_off());
        assert_eq!(
            e.to_string(),
            "waiting for the plugin binary and kubeconfig"
        );
        let e = ConfInstallError::backoff("backing off: another agent keeps rewriting /x".into());
        assert!(!e.is_waiting() && e.is_backing_off());
        assert!(!ConfInstallError::failed("x".into()).is_waiting());
    }

    #[test]
    fn primary_is_first_valid_non_istio_file() {
        let scan = Scan {
            valid: vec![
                cand(
                    "00-istio.conflist",
                    r#"{"name":"x","plugins":[{"type":"istio-cni"}]}"#,
                ),
                cand(
                    "10-calico.conflist",
                    r#"{"name":"k8s","plugins":[{"type":"calico"}]}"#,
                ),
                cand("20-flannel.conf", r#"{"name":"f","type":"flannel"}"#),
            ],
            invalid: vec![("05-bad.conflist".into(), "invalid JSON".into())],
        };
        assert_eq!(
            choose_primary(&scan, None).unwrap().name,
            "10-calico.conflist"
        );
        assert_eq!(
            choose_primary(&scan, Some("20-flannel.conflist"))
                .unwrap()
                .name,
            "20-flannel.conf"
        );
        let e = choose_primary(&scan, Some("05-bad.conflist")).unwrap_err();
        assert!(e.to_string().contains("invalid JSON"), "{e}");
        assert_eq!(
            e,
            PrimaryConfError::Invalid {
                name: "05-bad.conflist".into(),
                why: "invalid JSON".into()
            }
        );
        let e = choose_primary(&scan, Some("99-none.conf")).unwrap_err();
        assert_eq!(e.to_string(), "99-none.conf (CNI_CONF_NAME) does not exist");
        assert_eq!(
            choose_primary(&Scan::default(), None).unwrap_err(),
            PrimaryConfError::NoneFound
        );
    }
}
