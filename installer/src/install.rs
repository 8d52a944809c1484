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

const SCOPE: &str = crate::logging::SCOPE_AGENT;

/// The outcome of one pass, per part. `Err` holds the reason the part is not in place.
#[derive(Debug)]
pub struct Pass {
    pub binary: Result<(), String>,
    pub kubeconfig: Result<(), String>,
    pub cni_config: Result<(), String>,
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
pub fn plugin_entry(cfg: &Config) -> Result<Map<String, Value>, String> {
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
    fn report(&mut self, part: &'static str, error: Option<&String>) {
        let prefix = format!("error:{part}:");
        let key = error.map(|e| format!("{prefix}{e}"));
        self.said
            .retain(|k| !k.starts_with(&prefix) || Some(k) == key.as_ref());
        if let (Some(key), Some(e)) = (key, error) {
            self.say_once(&key, log::Level::Error, e);
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
        self.report("binary", binary.as_ref().err());
        let kubeconfig = self.ensure_kubeconfig(&mut wrote);
        if kubeconfig.is_err() {
            self.metrics.install(InstallResult::CreateKubeconfigFailure);
        }
        self.report("kubeconfig", kubeconfig.as_ref().err());
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
            let loud = r.as_ref().err().filter(|e| !e.quiet).map(|e| &e.reason);
            self.report("cni-config", loud);
            r.map_err(|e| e.reason)
        } else {
            Err("waiting for the plugin binary and kubeconfig".into())
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

    // ----- binary -----

    fn ensure_binaries(&mut self, wrote: &mut bool) -> Result<(), String> {
        let names = match &self.binaries {
            Some(n) => n.clone(),
            None => {
                let names = list_binaries(&self.cfg.bin_source_dir)?;
                for n in &names {
                    fsutil::remove_stale_temps(&self.cfg.host_bin_dir.join(n));
                }
                self.binaries = Some(names.clone());
                names
            }
        };
        for name in names {
            let src = self.cfg.bin_source_dir.join(&name);
            let dst = self.cfg.host_bin_dir.join(&name);
            let now_stamp = fsutil::stamp(&dst);
            if now_stamp.is_some() && now_stamp == self.bin_ok.get(&name).copied() {
                continue;
            }
            if let Some(stamp) = now_stamp
                && same_file_content(&src, &dst)
            {
                // Same bytes and mode (e.g. after a restart, or a touch): no rewrite.
                self.bin_ok.insert(name, stamp);
                continue;
            }
            fsutil::atomic_copy(&src, &dst)?;
            *wrote = true;
            if self.bin_ok.remove(&name).is_some() {
                self.metrics.repair(Repair::Binary);
                let what = if now_stamp.is_some() {
                    "changed"
                } else {
                    "deleted"
                };
                log::info!(target: SCOPE, "{} was {what}: copied {} again", dst.display(), src.display());
            } else {
                log::info!(target: SCOPE, "copied {} to {}", src.display(), dst.display());
            }
            if let Some(s) = fsutil::stamp(&dst) {
                self.bin_ok.insert(name, s);
            }
        }
        Ok(())
    }

    // ----- kubeconfig -----

    /// The service account's API access (what the plugin's kubeconfig holds).
    pub fn api_access(&self) -> Result<fastpath_cni_plugin::kube::KubeAccess, String> {
        self.kubeconfig_inputs().map(|i| i.access())
    }

    fn kubeconfig_inputs(&self) -> Result<KubeconfigInputs, String> {
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

    fn ensure_kubeconfig(&mut self, wrote: &mut bool) -> Result<(), String> {
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

    // ----- CNI config, chained -----

    fn ensure_chained(&mut self, now: Instant, wrote: &mut bool) -> Result<(), ConfInstallError> {
        let dir = self.cfg.mounted_cni_net_dir.clone();
        let scan = scan_conf_dir(&dir).map_err(ConfInstallError::failed)?;
        for (name, why) in &scan.invalid {
            self.say_once(
                &format!("invalid:{name}:{why}"),
                log::Level::Warn,
                &format!("skipping {}: {why}", dir.join(name).display()),
            );
        }
        let primary = match choose_primary(&scan, self.cfg.cni_conf_name.as_deref()) {
            Ok(p) => {
                self.unsay("waiting");
                p
            }
            Err(why) => {
                self.say_once(
                    "waiting",
                    log::Level::Info,
                    &format!(
                        "Istio CNI is configured as chained plugin, but cannot find existing CNI network config: {why}. \
                         Waiting for CNI network config file to be written in {}",
                        dir.display()
                    ),
                );
                return Err(ConfInstallError::waiting(format!(
                    "no primary CNI config in {}: {why}",
                    dir.display()
                )));
            }
        };
        let path = dir.join(&primary.name);
        if let Some(target) = &primary.symlink_to {
            let msg = format!(
                "the primary CNI config {} is a symlink to {}: fastpath does not replace a symlinked config; \
                 set CNI_CONF_NAME to a regular file or replace the link with the file",
                path.display(),
                target
            );
            return Err(ConfInstallError::failed(msg));
        }
        // A different primary than before: take our entry out of the old one.
        if let Some(old) = self.pinned.clone()
            && old != path
            && old != path.with_extension("conflist")
        {
            log::info!(target: SCOPE, "primary CNI config changed from {} to {}", old.display(), path.display());
            remove_entry_from_file(&old).map_err(ConfInstallError::failed)?;
            self.written = None;
        }
        let conf = &primary.conf;
        if self.pinned.is_none() {
            // Left by a write that was interrupted (kill -9) in an earlier life.
            fsutil::remove_stale_temps(&path);
            fsutil::remove_stale_temps(&path.with_extension("conflist"));
        }
        let state = conflist::entry_state(conf, &self.entry);
        if state == EntryState::Current {
            self.pinned = Some(path.clone());
            if self.fight.entry_present(now) {
                log::info!(target: SCOPE, "{}: the istio-cni entry has stayed in place; no longer backing off", path.display());
                self.unsay("fight");
            }
            return match self.fight.is_fighting() {
                true => Err(ConfInstallError::backoff(format!(
                    "backing off: another agent keeps rewriting {}",
                    path.display()
                ))),
                false => Ok(()),
            };
        }
        // Our entry is missing or stale. If we wrote this file, someone else has changed it.
        let target = if conf.single {
            path.with_extension("conflist")
        } else {
            path.clone()
        };
        let dropped_ours = self.written.as_ref().is_some_and(|w| {
            (w.path == target || w.path == path) && w.digest != primary.digest && !w.removal_counted
        });
        if dropped_ours {
            if let Some(w) = &mut self.written {
                w.removal_counted = true;
            }
            match self.fight.record_removal(now) {
                Removal::Drift => {
                    self.metrics.repair(Repair::CniConfig);
                    log::info!(target: SCOPE, "{} was rewritten without the istio-cni entry: inserting it again", path.display());
                }
                Removal::FightStarted { removals } => {
                    self.metrics.fight();
                    self.say_once(
                        "fight",
                        log::Level::Error,
                        &format!(
                            "another agent keeps rewriting {} and dropping the istio-cni entry ({removals} times within {}s): \
                             backing off and staying not ready until it stops. Likely cause: {}",
                            path.display(),
                            self.fight.window().as_secs(),
                            fight::likely_cause(&primary.name)
                        ),
                    );
                }
                Removal::Fighting => self.metrics.repair(Repair::CniConfig),
            }
        }
        if !self.fight.may_write(now) {
            return Err(ConfInstallError::backoff(format!(
                "backing off: another agent keeps rewriting {}",
                path.display()
            )));
        }
        let merged = conflist::insert_entry(conf, &self.entry);
        conflist::check_preserved(conf, &merged)
            .map_err(|e| ConfInstallError::failed(format!("{}: {e}", path.display())))?;
        let bytes = conflist::to_go_json(&Value::Object(merged), true);
        // Keep the primary's mode.
        let mode = fsutil::mode_of(&path).unwrap_or(self.cfg.created_conf_mode());
        fsutil::remove_stale_temps(&target);
        fsutil::atomic_write(&target, bytes.as_bytes(), mode).map_err(ConfInstallError::failed)?;
        if conf.single {
            // The .conflist is in place; now the .conf it replaces can go.
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(ConfInstallError::failed(fsutil::describe_write_error(
                    &path, &e,
                )));
            }
        }
        *wrote = true;
        self.fight.wrote(now);
        if !dropped_ours {
            log::info!(target: SCOPE, "inserted the istio-cni entry into {}", target.display());
        }
        self.written = Some(Written {
            path: target.clone(),
            digest: fsutil::digest(bytes.as_bytes()),
            removal_counted: false,
        });
        self.pinned = Some(target);
        match self.fight.is_fighting() {
            true => Err(ConfInstallError::backoff(format!(
                "backing off: another agent keeps rewriting {}",
                path.display()
            ))),
            false => Ok(()),
        }
    }

    // ----- CNI config, standalone -----

    fn ensure_standalone(&mut self, wrote: &mut bool) -> Result<(), ConfInstallError> {
        let path = self.standalone_path();
        let bytes = conflist::to_go_json(&Value::Object(self.entry.clone()), false);
        if let ReadOutcome::Data(d) = fsutil::read_regular(&path)
            && d == bytes.as_bytes()
        {
            return Ok(());
        }
        let mode = fsutil::mode_of(&path).unwrap_or(self.cfg.created_conf_mode());
        fsutil::remove_stale_temps(&path);
        fsutil::atomic_write(&path, bytes.as_bytes(), mode).map_err(ConfInstallError::failed)?;
        *wrote = true;
        if self.written.is_some() {
            self.metrics.repair(Repair::CniConfig);
            log::info!(target: SCOPE, "{} was changed or removed: wrote it again", path.display());
        } else {
            log::info!(target: SCOPE, "wrote {}", path.display());
        }
        self.written = Some(Written {
            path: path.clone(),
            digest: fsutil::digest(bytes.as_bytes()),
            removal_counted: false,
        });
        Ok(())
    }

    fn standalone_path(&self) -> PathBuf {
        self.cfg.mounted_cni_net_dir.join(
            self.cfg
                .cni_conf_name
                .as_deref()
                .unwrap_or(STANDALONE_CONF_NAME),
        )
    }

    /// The config file this agent put its entry in (a chained install), if any.
    pub fn pinned_conf(&self) -> Option<&Path> {
        self.pinned.as_deref()
    }

    /// Shutdown cleanup, in the order that never leaves a config naming a missing binary:
    /// the entry, then the kubeconfig, then the binary. The binary stays when an entry could
    /// not be removed.
    pub fn cleanup(&mut self) -> Result<(), String> {
        cleanup_node(&self.cfg, self.pinned.as_deref())
    }
}

/// Why the plugin's entry is not in place (the `cni-config` readiness reason): an install
/// failure, or waiting for a primary config to appear.
#[derive(Debug)]
struct ConfInstallError {
    reason: String,
    /// Waiting for a primary: not an install failure.
    waiting: bool,
    /// Already explained in the log (the fight line).
    quiet: bool,
}

impl ConfInstallError {
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

fn list_binaries(dir: &Path) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| {
        format!(
            "cannot read the plugin binary directory {}: {e}",
            dir.display()
        )
    })?;
    for e in entries.flatten() {
        if std::fs::metadata(e.path())
            .map(|m| m.is_file())
            .unwrap_or(false)
        {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    if names.is_empty() {
        return Err(format!(
            "no plugin binary in {} (expected {PLUGIN_BINARY})",
            dir.display()
        ));
    }
    Ok(names)
}

fn same_file_content(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::symlink_metadata(b)) else {
        return false;
    };
    use std::os::unix::fs::PermissionsExt as _;
    if !mb.is_file() || ma.len() != mb.len() || ma.permissions().mode() != mb.permissions().mode() {
        return false;
    }
    fsutil::same_content(a, b)
}

/// The conf dir as libcni sees it.
#[derive(Debug, Default)]
pub struct Scan {
    /// Valid configs, sorted by name.
    pub valid: Vec<Candidate>,
    /// Files skipped, with why.
    pub invalid: Vec<(String, String)>,
}

#[derive(Debug)]
pub struct Candidate {
    pub name: String,
    pub conf: NetConf,
    pub digest: u64,
    /// Set when the file is a symlink (its target).
    pub symlink_to: Option<String>,
}

pub fn scan_conf_dir(dir: &Path) -> Result<Scan, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        format!(
            "cannot read the CNI config directory {} (MOUNTED_CNI_NET_DIR): {e}",
            dir.display()
        )
    })?;
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| conflist::is_conf_file_name(n))
        .collect();
    names.sort();
    let mut scan = Scan::default();
    for name in names {
        let path = dir.join(&name);
        let symlink_to = std::fs::read_link(&path)
            .ok()
            .map(|t| t.display().to_string());
        match fsutil::read_regular(&path) {
            ReadOutcome::Data(bytes) => match conflist::parse_net_conf(&name, &bytes) {
                Ok(conf) => scan.valid.push(Candidate {
                    name,
                    conf,
                    digest: fsutil::digest(&bytes),
                    symlink_to,
                }),
                Err(why) => scan.invalid.push((name, why)),
            },
            ReadOutcome::Missing => {}
            ReadOutcome::NotRegular(why) | ReadOutcome::Unreadable(why) => {
                scan.invalid.push((name, why))
            }
        }
    }
    Ok(scan)
}

/// The primary config: `CNI_CONF_NAME` (or its `.conf`/`.conflist` sibling) when set, else the
/// first valid file by name that has a plugin other than ours (kubelet's choice).
pub fn choose_primary<'a>(
    scan: &'a Scan,
    conf_name: Option<&str>,
) -> Result<&'a Candidate, String> {
    if let Some(name) = conf_name {
        let sibling = match name.strip_suffix(".conflist") {
            Some(stem) => format!("{stem}.conf"),
            None => format!("{}list", name),
        };
        return scan
            .valid
            .iter()
            .find(|c| c.name == name)
            .or_else(|| scan.valid.iter().find(|c| c.name == sibling))
            .filter(|c| c.conf.is_primary_candidate())
            .ok_or_else(|| {
                match scan
                    .invalid
                    .iter()
                    .find(|(n, _)| *n == name || *n == sibling)
                {
                    Some((n, why)) => {
                        format!("{n} (CNI_CONF_NAME) is not a valid CNI config: {why}")
                    }
                    None => format!("{name} (CNI_CONF_NAME) does not exist"),
                }
            });
    }
    scan.valid
        .iter()
        .find(|c| c.conf.is_primary_candidate())
        .ok_or_else(|| "no valid networks found".to_string())
}

/// Removes every `istio-cni` entry from one config file, keeping its mode. Missing or invalid
/// files are left alone.
fn remove_entry_from_file(path: &Path) -> Result<bool, String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ReadOutcome::Data(bytes) = fsutil::read_regular(path) else {
        return Ok(false);
    };
    let Ok(conf) = conflist::parse_net_conf(&name, &bytes) else {
        return Ok(false);
    };
    if conf.single {
        return Ok(false);
    }
    let (out, removed) = conflist::remove_entry(&conf.value);
    if !removed {
        return Ok(false);
    }
    let mode = fsutil::mode_of(path).unwrap_or(0o600);
    let has_plugins = out
        .get("plugins")
        .and_then(Value::as_array)
        .is_some_and(|l| !l.is_empty());
    if has_plugins {
        fsutil::atomic_write(
            path,
            conflist::to_go_json(&Value::Object(out), true).as_bytes(),
            mode,
        )?;
    } else {
        // The list held only our entry: an empty list is not a valid config; remove it.
        std::fs::remove_file(path).map_err(|e| fsutil::describe_write_error(path, &e))?;
    }
    log::info!(target: SCOPE, "removed the istio-cni entry from {}", path.display());
    Ok(true)
}

/// Files in the conf dir that still name the plugin (entries in lists, or a standalone file).
pub fn files_naming_plugin(dir: &Path) -> Vec<String> {
    let Ok(scan) = scan_conf_dir(dir) else {
        return Vec::new();
    };
    scan.valid
        .iter()
        .filter(|c| {
            c.conf
                .plugin_types()
                .iter()
                .any(|t| t == conflist::PLUGIN_TYPE)
        })
        .map(|c| c.name.clone())
        .collect()
}

/// Removes the plugin from the node: entries (from `pinned` and from every other config in the
/// dir), the standalone file, then the kubeconfig, then the binary, which stays if any config
/// still names it.
pub fn cleanup_node(cfg: &Config, pinned: Option<&Path>) -> Result<(), String> {
    let dir = &cfg.mounted_cni_net_dir;
    let mut errors = Vec::new();
    if let Some(p) = pinned
        && let Err(e) = remove_entry_from_file(p)
    {
        errors.push(e);
    }
    if let Ok(scan) = scan_conf_dir(dir) {
        for c in &scan.valid {
            let path = dir.join(&c.name);
            let ours_only = c.conf.single && c.conf.plugin_types() == [conflist::PLUGIN_TYPE];
            if ours_only {
                match std::fs::remove_file(&path) {
                    Ok(()) => log::info!(target: SCOPE, "removed {}", path.display()),
                    Err(e) => errors.push(fsutil::describe_write_error(&path, &e)),
                }
            } else if let Err(e) = remove_entry_from_file(&path) {
                errors.push(e);
            }
        }
    }
    let remaining = files_naming_plugin(dir);
    let kubeconfig = cfg.kubeconfig_path();
    match std::fs::remove_file(&kubeconfig) {
        Ok(()) => log::info!(target: SCOPE, "removed {}", kubeconfig.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(fsutil::describe_write_error(&kubeconfig, &e)),
    }
    if remaining.is_empty() {
        let names =
            list_binaries(&cfg.bin_source_dir).unwrap_or_else(|_| vec![PLUGIN_BINARY.to_string()]);
        for n in names {
            let p = cfg.host_bin_dir.join(&n);
            match std::fs::remove_file(&p) {
                Ok(()) => log::info!(target: SCOPE, "removed {}", p.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => errors.push(fsutil::describe_write_error(&p, &e)),
            }
        }
    } else {
        errors.push(format!(
            "kept the plugin binary in {}: {} still name istio-cni (removing the binary would break pod \
             creation and deletion on this node)",
            cfg.host_bin_dir.display(),
            remaining.join(", ")
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
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
        assert!(e.contains("invalid JSON"), "{e}");
        assert!(
            choose_primary(&scan, Some("99-none.conf"))
                .unwrap_err()
                .contains("does not exist")
        );
        assert!(choose_primary(&Scan::default(), None).is_err());
    }
}
