//! The plugin's entry in the node's CNI config: chained into the primary config, or a
//! standalone file; which file is the primary.
use super::*;

impl Installer {
    pub(super) fn ensure_chained(
        &mut self,
        now: Instant,
        wrote: &mut bool,
    ) -> Result<(), ConfInstallError> {
        let dir = self.cfg.mounted_cni_net_dir.clone();
        let primary = self.find_primary(&dir)?;
        let path = dir.join(&primary.name);
        // A different primary than before: take our entry out of the old one.
        if let Some(old) = self.pinned.clone()
            && old != path
            && old != path.with_extension("conflist")
        {
            log::info!(target: SCOPE, "primary CNI config changed from {} to {}", old.display(), path.display());
            remove_entry_from_file(&old).map_err(|e| ConfInstallError::failed(e.to_string()))?;
            self.written = None;
        }
        let conf = &primary.conf;
        if self.pinned.is_none() {
            // Left by a write that was interrupted (kill -9) in an earlier life.
            fsutil::remove_stale_temps(&path);
            fsutil::remove_stale_temps(&path.with_extension("conflist"));
        }
        if conflist::entry_state(conf, &self.entry) == EntryState::Current {
            self.pinned = Some(path.clone());
            if self.fight.entry_present(now) {
                log::info!(target: SCOPE, "{}: the istio-cni entry has stayed in place; no longer backing off", path.display());
                self.unsay("fight");
            }
            return self.fight_verdict(&path);
        }
        // Our entry is missing or stale. If we wrote this file, someone else has changed it.
        let target = if conf.single {
            path.with_extension("conflist")
        } else {
            path.clone()
        };
        let dropped_ours = self.note_removal(now, &primary, &path, &target);
        if !self.fight.may_write(now) {
            return Err(backing_off(&path));
        }
        self.write_entry(now, conf, &path, &target)?;
        *wrote = true;
        if !dropped_ours {
            log::info!(target: SCOPE, "inserted the istio-cni entry into {}", target.display());
        }
        self.fight_verdict(&path)
    }

    /// The primary config in `dir` (or why there is none yet), after naming the files skipped.
    fn find_primary(&mut self, dir: &Path) -> Result<Candidate, ConfInstallError> {
        let scan = scan_conf_dir(dir).map_err(|e| ConfInstallError::failed(e.to_string()))?;
        for (name, why) in &scan.invalid {
            self.say_once(
                &format!("invalid:{name}:{why}"),
                log::Level::Warn,
                &format!("skipping {}: {why}", dir.join(name).display()),
            );
        }
        let chosen = match choose_primary(&scan, self.cfg.cni_conf_name.as_deref()) {
            Ok(p) => {
                self.unsay("waiting");
                p.name.clone()
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
        let primary = scan
            .valid
            .into_iter()
            .find(|c| c.name == chosen)
            .expect("the primary chosen is one of the valid configs");
        if let Some(target) = &primary.symlink_to {
            return Err(ConfInstallError::failed(format!(
                "the primary CNI config {} is a symlink to {}: fastpath does not replace a symlinked config; \
                 set CNI_CONF_NAME to a regular file or replace the link with the file",
                dir.join(&primary.name).display(),
                target
            )));
        }
        Ok(primary)
    }

    /// Whether the file lost the entry this agent wrote (someone rewrote it): counted once,
    /// as drift or as a fight with another agent. True when it did.
    fn note_removal(
        &mut self,
        now: Instant,
        primary: &Candidate,
        path: &Path,
        target: &Path,
    ) -> bool {
        let dropped_ours = self.written.as_ref().is_some_and(|w| {
            (w.path == target || w.path == path) && w.digest != primary.digest && !w.removal_counted
        });
        if !dropped_ours {
            return false;
        }
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
        true
    }

    /// Writes the primary `conf` with the entry into `target` (a `.conf` becomes a
    /// `.conflist`, written first, then the `.conf` removed), keeping the primary's mode.
    fn write_entry(
        &mut self,
        now: Instant,
        conf: &NetConf,
        path: &Path,
        target: &Path,
    ) -> Result<(), ConfInstallError> {
        let merged = conflist::insert_entry(conf, &self.entry);
        conflist::check_preserved(conf, &merged)
            .map_err(|e| ConfInstallError::failed(format!("{}: {e}", path.display())))?;
        let bytes = conflist::to_go_json(&Value::Object(merged), true);
        let mode = fsutil::mode_of(path).unwrap_or(self.cfg.created_conf_mode());
        fsutil::remove_stale_temps(target);
        fsutil::atomic_write(target, bytes.as_bytes(), mode)
            .map_err(|e| ConfInstallError::failed(e.to_string()))?;
        if conf.single
            && let Err(e) = std::fs::remove_file(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(ConfInstallError::failed(fsutil::describe_write_error(
                path, &e,
            )));
        }
        self.fight.wrote(now);
        self.written = Some(Written {
            path: target.to_path_buf(),
            digest: fsutil::digest(bytes.as_bytes()),
            removal_counted: false,
        });
        self.pinned = Some(target.to_path_buf());
        Ok(())
    }

    /// Ready, unless another agent keeps rewriting the file.
    fn fight_verdict(&self, path: &Path) -> Result<(), ConfInstallError> {
        match self.fight.is_fighting() {
            true => Err(backing_off(path)),
            false => Ok(()),
        }
    }

    pub(super) fn ensure_standalone(&mut self, wrote: &mut bool) -> Result<(), ConfInstallError> {
        let path = self.standalone_path();
        let bytes = conflist::to_go_json(&Value::Object(self.entry.clone()), false);
        if let ReadOutcome::Data(d) = fsutil::read_regular(&path)
            && d == bytes.as_bytes()
        {
            return Ok(());
        }
        let mode = fsutil::mode_of(&path).unwrap_or(self.cfg.created_conf_mode());
        fsutil::remove_stale_temps(&path);
        fsutil::atomic_write(&path, bytes.as_bytes(), mode)
            .map_err(|e| ConfInstallError::failed(e.to_string()))?;
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

    pub(super) fn standalone_path(&self) -> PathBuf {
        self.cfg.mounted_cni_net_dir.join(
            self.cfg
                .cni_conf_name
                .as_deref()
                .unwrap_or(STANDALONE_CONF_NAME),
        )
    }
}

/// Not ready while another agent keeps rewriting the file.
fn backing_off(path: &Path) -> ConfInstallError {
    ConfInstallError::backoff(format!(
        "backing off: another agent keeps rewriting {}",
        path.display()
    ))
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

/// The CNI config directory (`MOUNTED_CNI_NET_DIR`) cannot be listed.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the CNI config directory {} (MOUNTED_CNI_NET_DIR): {source}", dir.display())]
pub struct ConfDirError {
    pub dir: PathBuf,
    pub source: std::io::Error,
}

pub fn scan_conf_dir(dir: &Path) -> Result<Scan, ConfDirError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ConfDirError {
        dir: dir.to_path_buf(),
        source,
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
                Err(why) => scan.invalid.push((name, why.to_string())),
            },
            ReadOutcome::Missing => {}
            ReadOutcome::NotRegular(why) | ReadOutcome::Unreadable(why) => {
                scan.invalid.push((name, why))
            }
        }
    }
    Ok(scan)
}

/// Why there is no primary config to chain the entry into (yet).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrimaryConfError {
    /// The file `CNI_CONF_NAME` names (or its sibling, `name`) is not valid (`why`).
    #[error("{name} (CNI_CONF_NAME) is not a valid CNI config: {why}")]
    Invalid { name: String, why: String },
    /// Neither `CNI_CONF_NAME` (`name`) nor its sibling is a valid primary config.
    #[error("{name} (CNI_CONF_NAME) does not exist")]
    Missing { name: String },
    /// No valid config with a plugin other than ours.
    #[error("no valid networks found")]
    NoneFound,
}

/// The primary config: `CNI_CONF_NAME` (or its `.conf`/`.conflist` sibling) when set, else the
/// first valid file by name that has a plugin other than ours (kubelet's choice).
pub fn choose_primary<'a>(
    scan: &'a Scan,
    conf_name: Option<&str>,
) -> Result<&'a Candidate, PrimaryConfError> {
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
                    Some((n, why)) => PrimaryConfError::Invalid {
                        name: n.clone(),
                        why: why.clone(),
                    },
                    None => PrimaryConfError::Missing {
                        name: name.to_string(),
                    },
                }
            });
    }
    scan.valid
        .iter()
        .find(|c| c.conf.is_primary_candidate())
        .ok_or(PrimaryConfError::NoneFound)
}
