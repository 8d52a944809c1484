//! The running agent: servers, watches, the reconcile loop and shutdown. Decisions live in
//! [`crate::install`]; this module only connects them to files, sockets, timers and signals.
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use notify::Watcher as _;

use crate::accel::{self, AccelState};
use crate::config::Config;
use crate::http::{self, Response};
use crate::install::Installer;
use crate::metrics::{self, Metrics};
use crate::readiness::Readiness;
use crate::shutdown::{self, KeepInstall, Verdict};
use fastpath_cni_plugin::kube::FetchError;

const SCOPE: &str = crate::logging::SCOPE_AGENT;

/// After a file event, wait this long for quiet before a pass (a rename burst is one change).
const DEBOUNCE_QUIET: Duration = Duration::from_millis(5);
/// ...but never longer than this.
const DEBOUNCE_MAX: Duration = Duration::from_millis(50);
/// A pass without any event, as a safety net (a watch lost with its directory, a remount).
const RESYNC: Duration = Duration::from_secs(30);
/// Retry after a failed pass: first delay, doubling to the max.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);

enum Msg {
    Fs,
    Shutdown(i32),
}

/// Takes drained demoted sockets out of the sockhash every 100 ms (see
/// [`accel::sweep_demoted`]), every second serves and removes retired connection maps (see
/// [`accel::retire`]), and every 5 s puts the read filter back in use once it can be
/// (see [`accel::refresh_read_filter`]), until the pins are gone (uninstalled).
fn maintain_accelerator(pin_dir: &Path) {
    for tick in 1u64.. {
        if !pin_dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
        if tick % 50 == 0
            && accel::read_filter_bypassed(pin_dir).unwrap_or(false)
            && let Err(e) = accel::refresh_read_filter(pin_dir)
        {
            log::debug!(target: SCOPE, "acceleration: read filter: {e:#}");
        }
        if tick % 10 == 0
            && let Err(e) = accel::retire::sweep(pin_dir)
        {
            log::debug!(target: SCOPE, "acceleration: retired connection maps: {e:#}");
        }
        match accel::sweep_demoted(pin_dir) {
            Ok(0) => {}
            Ok(n) => {
                log::debug!(target: SCOPE, "acceleration: {n} drained demoted sockets left the sockhash")
            }
            Err(e) => log::debug!(target: SCOPE, "acceleration: sweep of demoted sockets: {e:#}"),
        }
    }
}

/// Runs until SIGTERM/SIGINT, keeping `entry` (the rendered plugin entry) installed. Returns the process exit code.
pub fn run(cfg: Config, entry: serde_json::Map<String, serde_json::Value>) -> i32 {
    log::info!(target: SCOPE, "install-cni (fastpath {}) starting", env!("CARGO_PKG_VERSION"));
    log::info!(target: SCOPE, "{}", describe(&cfg));
    for s in cfg.log.unknown_scopes() {
        log::warn!(target: SCOPE, "--log_output_level names scope {s:?}, which this agent does not have (scopes: cni-agent, cni-plugin, default)");
    }

    let readiness = Arc::new(Readiness::default());
    for (name, why) in [
        ("binary", "not installed yet"),
        ("kubeconfig", "not written yet"),
        ("cni-config", "not installed yet"),
    ] {
        readiness.register(name, why);
    }
    let metrics = Arc::new(Metrics::default());

    // Acceleration: never fatal, never a readiness condition (redirection works without it).
    let accel_state = start_accelerator(&cfg, &readiness);

    let (tx, rx) = mpsc::channel::<Msg>();
    if let Err(e) = start_servers(&cfg, &readiness, &metrics, &accel_state) {
        log::error!(target: SCOPE, "{e}");
        return 1;
    }
    readiness.register("log-socket", "not listening yet");
    let mut log_socket_started = start_log_socket(&cfg, &metrics, &readiness);

    if let Err(e) = forward_signals(tx.clone()) {
        log::error!(target: SCOPE, "cannot install signal handlers: {e}");
        return 1;
    }

    let mut watches = Watches::new(&cfg, tx.clone());
    let mut installer = Installer::new(cfg.clone(), entry, metrics.clone());
    check_api_tls(&installer);
    start_pod_watch(&cfg, &installer, &metrics);
    let mut retry = RETRY_FIRST;
    let signal = loop {
        watches.ensure();
        if !log_socket_started {
            log_socket_started = start_log_socket(&cfg, &metrics, &readiness);
        }
        let now = Instant::now();
        let pass = installer.reconcile(now);
        let was_ready = readiness.is_ready();
        readiness.set("binary", pass.binary.as_ref().copied().map_err(|e| e as _));
        readiness.set(
            "kubeconfig",
            pass.kubeconfig.as_ref().copied().map_err(|e| e as _),
        );
        readiness.set(
            "cni-config",
            pass.cni_config.as_ref().copied().map_err(|e| e as _),
        );
        let ready = readiness.is_ready();
        if ready != was_ready {
            match ready {
                true => log::info!(target: SCOPE, "ready: the istio-cni plugin is installed"),
                false => log::warn!(target: SCOPE, "not ready: {}", readiness.unmet().join("; ")),
            }
        }
        let mut wake = now + RESYNC;
        if pass.all_ok() {
            retry = RETRY_FIRST;
        } else {
            wake = wake.min(now + retry);
            retry = (retry * 2).min(RETRY_MAX);
        }
        if let Some(at) = pass.wake_at {
            wake = wake.min(at.max(now + Duration::from_millis(10)));
        }
        match wait(&rx, wake) {
            Some(sig) => break sig,
            None => continue,
        }
    };

    readiness.set("cni-config", Err(&"shutting down"));
    drop(watches);
    shut_down(&cfg, &installer, signal)
}

/// On SIGTERM or SIGINT: an upgrade keeps everything, an uninstall removes everything, and an
/// unknown keeps everything and says how to clean up ([`shutdown`]). Returns the exit code.
fn shut_down(cfg: &Config, installer: &Installer, signal: i32) -> i32 {
    let name = if signal == signal_hook::consts::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    let verdict = match cfg.keep_install_on_shutdown {
        KeepInstall::Always => Verdict::Upgrade("FASTPATH_KEEP_INSTALL_ON_SHUTDOWN=true".into()),
        KeepInstall::Never => Verdict::Uninstall("FASTPATH_KEEP_INSTALL_ON_SHUTDOWN=false".into()),
        KeepInstall::Auto => match installer.api_access() {
            Ok(access) => shutdown::decide(&cfg.identity, |o| shutdown::ask_api(&access, o)),
            Err(e) => Verdict::Unknown(format!("no API access: {e}")),
        },
    };
    match verdict {
        Verdict::Upgrade(why) => {
            log::info!(target: SCOPE, "{name}: upgrade or restart ({why}): the plugin, its config and kubeconfig, and the accelerator stay for the next agent");
            0
        }
        Verdict::Unknown(why) => {
            log::warn!(target: SCOPE, "{name}: cannot tell an upgrade from an uninstall ({why}), so everything stays; {}", shutdown::CLEANUP_HINT);
            0
        }
        Verdict::Uninstall(why) => {
            log::info!(target: SCOPE, "{name}: uninstall ({why}): removing the accelerator, then the plugin entry, the kubeconfig and the binary");
            crate::uninstall::node(cfg, installer.pinned_conf())
        }
    }
}

/// Loads the accelerator on its own thread, so that installing the plugin does not wait for
/// it; the state is set once it is known. Once active, the thread looks after it.
fn start_accelerator(cfg: &Config, readiness: &Arc<Readiness>) -> Arc<OnceLock<AccelState>> {
    let accel_state: Arc<OnceLock<AccelState>> = Arc::new(OnceLock::new());
    readiness.detail("acceleration", "starting".into());
    {
        let (settings, state, readiness) =
            (cfg.accel.clone(), accel_state.clone(), readiness.clone());
        let spawned = std::thread::Builder::new().name("accel-start".into()).spawn(move || {
            let s = accel::start(&settings);
            match &s {
                AccelState::Active => {
                    log::info!(target: SCOPE, "acceleration: active (same-node sidecar traffic bypasses the TCP stack)")
                }
                AccelState::Disabled => {
                    log::info!(target: SCOPE, "acceleration: disabled (FASTPATH_ACCELERATION=false)")
                }
                AccelState::Unavailable { reason } => {
                    log::warn!(target: SCOPE, "acceleration: unavailable ({reason}); traffic redirection works without it")
                }
                AccelState::Conflict { programs } => {
                    log::warn!(target: SCOPE, "acceleration: off, another sockmap accelerator is attached ({}); traffic redirection works without it", accel::foreign::describe(programs))
                }
            }
            readiness.detail("acceleration", describe_accel(&s));
            let _ = state.set(s);
            // Loading the eBPF object takes ~20 MiB of heap for a moment; give it back.
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim has no preconditions.
            unsafe {
                libc::malloc_trim(0);
            }
            if state.get() == Some(&AccelState::Active) {
                maintain_accelerator(&settings.pin_dir);
            }
        });
        if let Err(e) = spawned {
            log::warn!(target: SCOPE, "acceleration: unavailable (cannot start its thread: {e}); traffic redirection works without it");
            let _ = accel_state.set(AccelState::Unavailable {
                reason: e.to_string(),
            });
        }
    }
    accel_state
}

/// Checks once, in the background, that the API server's certificate verifies with the
/// service account's CA, as the plugin will on every ADD: a certificate that can never verify
/// fails every mesh pod's ADD on this node, and the agent says so at start, with the cause,
/// rather than only in the plugin's log of each pod.
fn check_api_tls(installer: &Installer) {
    let access = match installer.api_access() {
        Ok(a) => a,
        Err(e) => {
            log::info!(target: SCOPE, "API server TLS not checked: {e}");
            return;
        }
    };
    if access.insecure {
        log::info!(target: SCOPE, "API server TLS not verified (SKIP_TLS_VERIFY=true)");
        return;
    }
    let server = access.server.clone();
    let _ = std::thread::Builder::new()
        .name("api-tls".into())
        .spawn(move || match fastpath_cni_plugin::kube::get(&access, fastpath_cni_plugin::kube::Object::Version) {
            Err(e @ FetchError::Certificate(_)) => {
                log::error!(target: SCOPE, "API server {server}: {e}; every mesh pod's ADD on this node will fail until it is fixed")
            }
            Err(FetchError::Transport(e)) => {
                log::warn!(target: SCOPE, "API server {server} not reachable at start: {e}")
            }
            // An answer (whatever its status) came over a verified connection.
            Ok(_) | Err(FetchError::Status(..)) => {
                log::info!(target: SCOPE, "API server {server}: TLS verified with the service account's CA")
            }
            Err(e) => log::warn!(target: SCOPE, "API server {server}: {e}"),
        });
}

/// Starts the pod cache and the repair controller (those switched on) and the one watch of the
/// node's pods they share ([`crate::pod_watch`]). Never fatal: without the cache the plugin asks
/// the API server, without the controller broken pods stay as they are (as with Istio's off).
fn start_pod_watch(cfg: &Config, installer: &Installer, metrics: &Arc<Metrics>) {
    let api = || {
        installer
            .api_access()
            .map(|access| crate::pod_watch::ApiSettings {
                server: access.server,
                ca_pem: access.ca_pem,
                token_file: cfg.token_path(),
            })
    };
    let cache = start_pod_cache(cfg, api);
    let repair = start_repair(cfg, api, metrics);
    // One watch per node: the cache's is NODE_NAME's, the controller's REPAIR_NODE_NAME's
    // (which falls back to NODE_NAME).
    let mut watches: Vec<(String, crate::pod_watch::Consumers)> = Vec::new();
    if let Some(feed) = cache {
        let consumers = crate::pod_watch::Consumers {
            cache: Some(feed),
            repair: None,
        };
        watches.push((cfg.identity.node_name.clone(), consumers));
    }
    if let Some(feed) = repair {
        let node = &cfg.repair.node_name;
        match watches.iter_mut().find(|(n, _)| n == node) {
            Some((_, consumers)) => consumers.repair = Some(feed),
            None => {
                if !watches.is_empty() {
                    log::warn!(target: SCOPE, "REPAIR_NODE_NAME={node} is not NODE_NAME={}: the repair controller watches that node's pods with a watch of its own", cfg.identity.node_name);
                }
                let consumers = crate::pod_watch::Consumers {
                    cache: None,
                    repair: Some(feed),
                };
                watches.push((node.clone(), consumers));
            }
        }
    }
    for (node, consumers) in watches {
        let started = api().map_err(ComponentStartError::from).and_then(|api| {
            crate::pod_watch::start(&api, &node, consumers).map_err(ComponentStartError::from)
        });
        if let Err(e) = started {
            log::warn!(target: SCOPE, "the watch of node {node}'s pods did not start: {e}");
        }
    }
}

/// Opens the pod cache's socket (see [`crate::pod_cache`]) unless it is switched off; its store
/// is filled by the node's pod watch.
fn start_pod_cache(
    cfg: &Config,
    api: impl Fn() -> Result<crate::pod_watch::ApiSettings, crate::install::KubeconfigError>,
) -> Option<crate::pod_cache::CacheFeed> {
    if !cfg.pod_cache {
        log::info!(target: SCOPE, "pod cache off (FASTPATH_POD_CACHE=false): every pod ADD asks the API server");
        return None;
    }
    let prepared = api().map_err(ComponentStartError::from).and_then(|api| {
        crate::pod_cache::prepare(&crate::pod_cache::PodCacheSettings {
            api,
            node_name: cfg.identity.node_name.clone(),
            socket: fastpath_cni_plugin::pod_cache::socket_path(&cfg.cni_agent_run_dir),
        })
        .map_err(ComponentStartError::from)
    });
    match prepared {
        Ok((feed, _)) => Some(feed),
        Err(e) => {
            log::warn!(target: SCOPE, "pod cache off, every pod ADD asks the API server: {e}");
            None
        }
    }
}

/// Starts the repair controller (see [`crate::repair`]) when `REPAIR_ENABLED` and an action is
/// switched on; it acts on the events of the node's pod watch.
fn start_repair(
    cfg: &Config,
    api: impl Fn() -> Result<crate::pod_watch::ApiSettings, crate::install::KubeconfigError>,
    metrics: &Arc<Metrics>,
) -> Option<crate::repair::RepairFeed> {
    if !cfg.repair.enabled {
        log::info!(target: SCOPE, "repair controller off (REPAIR_ENABLED=false)");
        return None;
    }
    let started = api().map_err(ComponentStartError::from).and_then(|api| {
        crate::repair::start(&api, &cfg.repair, metrics.clone()).map_err(ComponentStartError::from)
    });
    match started {
        Ok(Some((action, feed))) => {
            log::info!(target: SCOPE, "repair controller on: broken pods of node {} are handled by {} (selector {:?}{})", cfg.repair.node_name, match action {
                crate::repair::Action::Repair => "repairing them in place",
                crate::repair::Action::Delete => "deleting them",
                crate::repair::Action::Label => "labelling them",
            }, crate::repair::field_selector(&cfg.repair), match cfg.repair.label_selectors.as_str() {
                "" => String::new(),
                l => format!(", labels {l:?}"),
            });
            Some(feed)
        }
        Ok(None) => {
            log::info!(target: SCOPE, "repair controller idle: REPAIR_ENABLED=true but none of REPAIR_REPAIR_PODS, REPAIR_DELETE_PODS, REPAIR_LABEL_PODS is true");
            None
        }
        Err(e) => {
            log::warn!(target: SCOPE, "repair controller off, broken pods are not handled: {e}");
            None
        }
    }
}

/// Sends the first SIGTERM or SIGINT to the loop.
fn forward_signals(tx: mpsc::Sender<Msg>) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 << 10)
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let _ = tx.send(Msg::Shutdown(sig));
            }
        })?;
    Ok(())
}

/// Waits for the next pass: a debounced file event, a timer, or a signal (returned).
fn wait(rx: &mpsc::Receiver<Msg>, until: Instant) -> Option<i32> {
    let timeout = until.saturating_duration_since(Instant::now());
    match rx.recv_timeout(timeout) {
        Ok(Msg::Shutdown(sig)) => Some(sig),
        Err(RecvTimeoutError::Disconnected) => Some(signal_hook::consts::SIGTERM),
        Err(RecvTimeoutError::Timeout) => None,
        Ok(Msg::Fs) => {
            let start = Instant::now();
            loop {
                let left = DEBOUNCE_MAX.saturating_sub(start.elapsed());
                if left.is_zero() {
                    return None;
                }
                match rx.recv_timeout(DEBOUNCE_QUIET.min(left)) {
                    Ok(Msg::Fs) => continue,
                    Ok(Msg::Shutdown(sig)) => return Some(sig),
                    Err(RecvTimeoutError::Timeout) => return None,
                    Err(RecvTimeoutError::Disconnected) => {
                        return Some(signal_hook::consts::SIGTERM);
                    }
                }
            }
        }
    }
}

fn describe_accel(s: &AccelState) -> String {
    match s {
        AccelState::Unavailable { reason } => {
            format!("unavailable ({reason}); redirection works without it")
        }
        AccelState::Conflict { programs } => format!(
            "conflict: another sockmap accelerator is attached ({}); redirection works without it",
            accel::foreign::describe(programs)
        ),
        s => metrics::accel_state_name(s).to_string(),
    }
}

fn describe(cfg: &Config) -> String {
    format!(
        "config: chained={} cni_conf_name={} mounted_cni_net_dir={} host_cni_bin_dir={} cni_agent_run_dir={} \
         kubeconfig_mode={:#o} skip_tls_verify={} exclude_namespaces={:?} pod_namespace={:?} plugin_log_level={} \
         template={} monitoring_port={} health_port={} keep_install_on_shutdown={} acceleration={} pin_dir={}",
        cfg.chained,
        cfg.cni_conf_name.as_deref().unwrap_or("(auto)"),
        cfg.mounted_cni_net_dir.display(),
        cfg.host_bin_dir.display(),
        cfg.cni_agent_run_dir.display(),
        cfg.kubeconfig_mode,
        cfg.skip_tls_verify,
        cfg.exclude_namespaces,
        cfg.pod_namespace,
        cfg.plugin_log_level.as_str(),
        cfg.template.origin,
        cfg.monitoring_port
            .map(|p| p.to_string())
            .unwrap_or_else(|| "disabled".into()),
        cfg.health_port,
        cfg.keep_install_on_shutdown,
        cfg.accel.enabled,
        cfg.accel.pin_dir.display(),
    )
}

/// Why a component that runs beside the installer (the pod cache, the repair controller, the
/// watch of the node's pods) did not start: said after what is off, never fatal.
#[derive(Debug, thiserror::Error)]
enum ComponentStartError {
    /// No service-account credentials for the API.
    #[error(transparent)]
    ApiAccess(#[from] crate::install::KubeconfigError),
    #[error(transparent)]
    PodCache(#[from] crate::pod_cache::PodCacheError),
    #[error(transparent)]
    Repair(#[from] crate::repair::run::RepairStartError),
    #[error(transparent)]
    Watch(#[from] crate::pod_watch::WatchStartError),
}

/// Why the health or metrics server did not start (fatal).
#[derive(Debug, thiserror::Error)]
enum ServerStartError {
    #[error("cannot listen on the health port {port} (FASTPATH_HEALTH_PORT): {source}")]
    HealthPort { port: u16, source: std::io::Error },
    #[error("cannot start the health server: {0}")]
    Health(#[source] std::io::Error),
    #[error("cannot listen on the monitoring port {port} (MONITORING_PORT): {source}")]
    MonitoringPort { port: u16, source: std::io::Error },
    #[error("cannot start the metrics server: {0}")]
    Metrics(#[source] std::io::Error),
}

fn start_servers(
    cfg: &Config,
    readiness: &Arc<Readiness>,
    metrics: &Arc<Metrics>,
    accel_state: &Arc<OnceLock<AccelState>>,
) -> Result<(), ServerStartError> {
    let health =
        http::bind_all(cfg.health_port).map_err(|source| ServerStartError::HealthPort {
            port: cfg.health_port,
            source,
        })?;
    let r = readiness.clone();
    http::serve(
        "health",
        http::Listener::Tcp(health),
        http::Limits::PORTS,
        move |req| match req.path.as_str() {
            "/healthz" => Response::text(200, "ok\n"),
            "/readyz" => Response::text(if r.is_ready() { 200 } else { 503 }, r.report()),
            _ => Response::text(404, "not found\n"),
        },
    )
    .map_err(ServerStartError::Health)?;
    if let Some(port) = cfg.monitoring_port {
        let l = http::bind_all(port)
            .map_err(|source| ServerStartError::MonitoringPort { port, source })?;
        let (r, m, a, settings) = (
            readiness.clone(),
            metrics.clone(),
            accel_state.clone(),
            cfg.accel.clone(),
        );
        http::serve(
            "metrics",
            http::Listener::Tcp(l),
            http::Limits::PORTS,
            move |req| match req.path.as_str() {
                "/metrics" => {
                    let state = a.get();
                    let pods = match state {
                        Some(AccelState::Active) => {
                            accel::pod_counters(&settings).unwrap_or_else(|e| {
                                log::debug!(target: SCOPE, "reading per-pod counters: {e}");
                                Vec::new()
                            })
                        }
                        _ => Vec::new(),
                    };
                    Response {
                        status: 200,
                        content_type: crate::metrics::CONTENT_TYPE,
                        body: m.render(r.is_ready(), state, &pods).into_bytes(),
                    }
                }
                _ => Response::text(404, "not found\n"),
            },
        )
        .map_err(ServerStartError::Metrics)?;
    }
    Ok(())
}

fn start_log_socket(cfg: &Config, metrics: &Arc<Metrics>, readiness: &Readiness) -> bool {
    let path = cfg.log_socket_path();
    match crate::logsock::start(&path, metrics.clone()) {
        Ok(()) => {
            log::info!(target: SCOPE, "plugin log socket listening on {}", path.display());
            readiness.set("log-socket", Ok(()));
            true
        }
        Err(e) => {
            if readiness.set("log-socket", Err(&e)) {
                log::error!(target: SCOPE, "{e}");
            }
            false
        }
    }
}

/// The directory watches, re-established when a directory appears later or is replaced (a
/// watch follows the inode, not the path).
struct Watches {
    watcher: Option<notify::RecommendedWatcher>,
    /// Each directory and the inode it had when the watch was added.
    dirs: Vec<(PathBuf, Option<u64>)>,
    /// Watched directories reported removed or moved away (a new one with the same path may
    /// even reuse the inode number), to watch again.
    lost: Arc<std::sync::Mutex<Vec<PathBuf>>>,
}

fn inode(p: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(p).ok().map(|m| m.ino())
}

impl Watches {
    fn new(cfg: &Config, tx: mpsc::Sender<Msg>) -> Self {
        let filter = EventFilter {
            conf_dir: cfg.mounted_cni_net_dir.clone(),
            bin_dir: cfg.host_bin_dir.clone(),
            run_dir: cfg.cni_agent_run_dir.clone(),
            kubeconfig: cfg.kubeconfig_path(),
        };
        let mut dirs = vec![
            cfg.mounted_cni_net_dir.clone(),
            cfg.host_bin_dir.clone(),
            cfg.service_account_dir.clone(),
            cfg.cni_agent_run_dir.clone(),
        ];
        if let Some(ca_dir) = cfg.kube_ca_file.parent()
            && !dirs.iter().any(|d| d == ca_dir)
        {
            dirs.push(ca_dir.to_path_buf());
        }
        let lost = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (watched_dirs, lost_in_cb) = (dirs.clone(), lost.clone());
        let watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(ev) => {
                    use notify::EventKind;
                    use notify::event::ModifyKind;
                    if matches!(
                        ev.kind,
                        EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
                    ) {
                        for p in ev.paths.iter().filter(|p| watched_dirs.contains(p)) {
                            lost_in_cb.lock().unwrap().push(p.clone());
                        }
                    }
                    if filter.relevant(&ev) {
                        let _ = tx.send(Msg::Fs);
                    }
                }
                Err(e) => {
                    log::warn!(target: SCOPE, "file watch error: {e}");
                    let _ = tx.send(Msg::Fs);
                }
            });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                log::error!(target: SCOPE, "cannot watch files ({e}); checking every {}s instead", RESYNC.as_secs());
                None
            }
        };
        Watches {
            watcher,
            dirs: dirs.into_iter().map(|d| (d, None)).collect(),
            lost,
        }
    }

    fn ensure(&mut self) {
        let Some(w) = &mut self.watcher else { return };
        let lost: Vec<PathBuf> = std::mem::take(&mut *self.lost.lock().unwrap());
        for (dir, watched) in &mut self.dirs {
            if lost.contains(dir) {
                *watched = None;
                let _ = w.unwatch(dir);
            }
            let now = inode(dir);
            if now.is_some() && now == *watched {
                continue;
            }
            if watched.take().is_some() {
                let _ = w.unwatch(dir);
            }
            match w.watch(dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => *watched = now,
                Err(e) => log::debug!(target: SCOPE, "cannot watch {} yet: {e}", dir.display()),
            }
        }
    }
}

struct EventFilter {
    conf_dir: PathBuf,
    bin_dir: PathBuf,
    run_dir: PathBuf,
    kubeconfig: PathBuf,
}

impl EventFilter {
    /// Opens and reads (our own reads among them) are not changes; in the run dir only the
    /// kubeconfig matters (the plugin's log file changes there all the time).
    fn relevant(&self, ev: &notify::Event) -> bool {
        use notify::EventKind;
        use notify::event::{AccessKind, AccessMode};
        match ev.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
            EventKind::Access(_) => return false,
            _ => {}
        }
        ev.paths.is_empty() || ev.paths.iter().any(|p| self.path_relevant(p))
    }

    fn path_relevant(&self, p: &Path) -> bool {
        // An atomic write's temp file comes and goes with the write, also when the write
        // fails: taken as a change, a failing write (a full disk) would trigger the next one
        // at once, past the retry back-off.
        if crate::fsutil::is_temp_file(p) {
            return false;
        }
        let parent = p.parent().unwrap_or(p);
        if p == self.run_dir
            || (parent == self.run_dir
                && self.run_dir != self.conf_dir
                && self.run_dir != self.bin_dir)
        {
            return p == self.kubeconfig || p == self.run_dir;
        }
        true
    }
}
