//! Configuration: Istio's install-cni flags and env vars (same names, same defaults), plus a
//! few fastpath-only knobs.
//!
//! Two steps, kept apart: [`RawConfig::read`] only collects strings (a flag wins over its env
//! var, an empty env var counts as unset, as with viper's `AutomaticEnv`), and
//! [`Config::build`] turns them into typed settings, stopping at the first bad value with one
//! message that names the variable and the value.
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::logging::{Level, LogSettings};

/// How a parameter's string is interpreted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Str,
    Bool,
    Int,
    /// A file mode, Go `strconv.ParseInt(s, 0, 0)` style: `0600` is octal, `384` decimal.
    Mode,
}

/// One parameter: `--flag` and `ENV`, and its default.
#[derive(Clone, Copy, Debug)]
pub struct Param {
    pub flag: &'static str,
    pub env: &'static str,
    pub default: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

const fn p(
    flag: &'static str,
    env: &'static str,
    default: &'static str,
    kind: Kind,
    help: &'static str,
) -> Param {
    Param {
        flag,
        env,
        default,
        kind,
        help,
    }
}

use Kind::{Bool, Int, Mode, Str};

/// Every parameter, in the order of Istio's `cni/pkg/cmd/root.go` flags and
/// `cni/pkg/constants` env vars, then fastpath's.
#[rustfmt::skip]
pub const PARAMS: &[Param] = &[
    // Istio's registered flags.
    p("cni-conf-name", "CNI_CONF_NAME", "", Str, "Name of the CNI config file to patch (chained) or write (standalone); empty: auto-detect"),
    p("chained-cni-plugin", "CHAINED_CNI_PLUGIN", "true", Bool, "Insert the plugin into the primary CNI config (true) or write a standalone file (false)"),
    p("cni-network-config", "CNI_NETWORK_CONFIG", "", Str, "Tera template of the plugin's config entry (see docs/configuration.md)"),
    p("cni-network-config-file", "CNI_NETWORK_CONFIG_FILE", "", Str, "File holding the template of the plugin's config entry"),
    p("istio-owned-cni-config-filename", "ISTIO_OWNED_CNI_CONFIG_FILENAME", "", Str, "Ambient only; accepted, not used"),
    p("istio-owned-cni-config", "ISTIO_OWNED_CNI_CONFIG", "false", Bool, "Ambient only; accepted, not used"),
    p("log-level", "LOG_LEVEL", "warn", Str, "Log level of the CNI plugin, when set explicitly (--log_output_level cni-plugin:<level> wins)"),
    p("mounted-cni-net-dir", "MOUNTED_CNI_NET_DIR", "/host/etc/cni/net.d", Str, "Directory of the host's CNI config, as mounted in the container"),
    p("cni-agent-run-dir", "CNI_AGENT_RUN_DIR", "/var/run/istio-cni", Str, "Run directory (same path on host and container): kubeconfig, log socket"),
    p("kubeconfig-mode", "KUBECONFIG_MODE", "384", Mode, "File mode of the plugin's kubeconfig (0600)"),
    p("cni-conf-group-read", "CNI_CONF_GROUP_READ", "false", Bool, "Create CNI config files with mode 0640 instead of 0600"),
    p("kube-ca-file", "KUBE_CA_FILE", "", Str, "CA certificate for the kubeconfig; empty: <service account dir>/ca.crt"),
    p("skip-tls-verify", "SKIP_TLS_VERIFY", "false", Bool, "Write insecure-skip-tls-verify into the kubeconfig instead of the CA"),
    p("monitoring-port", "MONITORING_PORT", "15014", Int, "Port of the Prometheus /metrics endpoint; <= 0 disables it"),
    p("ztunnel-uds-address", "ZTUNNEL_UDS_ADDRESS", "/var/run/ztunnel/ztunnel.sock", Str, "Ambient only; accepted, not used"),
    p("ambient-enabled", "AMBIENT_ENABLED", "false", Bool, "Ambient mode (not supported by fastpath: must stay false)"),
    p("enable-ambient-detection-retry", "ENABLE_AMBIENT_DETECTION_RETRY", "false", Bool, "Passed to the plugin's config"),
    p("repair-enabled", "REPAIR_ENABLED", "true", Bool, "Run the repair controller: watch this node's pods and act on those whose istio-validation init container found no redirection (docs/repair.md)"),
    p("repair-delete-pods", "REPAIR_DELETE_PODS", "false", Bool, "Repair controller: delete broken pods (when REPAIR_REPAIR_PODS is off)"),
    p("repair-label-pods", "REPAIR_LABEL_PODS", "false", Bool, "Repair controller: label broken pods (when REPAIR_REPAIR_PODS and REPAIR_DELETE_PODS are off)"),
    p("repair-broken-pod-label-key", "REPAIR_BROKEN_POD_LABEL_KEY", "cni.istio.io/uninitialized", Str, "Repair controller: the label key set on broken pods"),
    p("repair-broken-pod-label-value", "REPAIR_BROKEN_POD_LABEL_VALUE", "true", Str, "Repair controller: the label value set on broken pods"),
    p("repair-node-name", "REPAIR_NODE_NAME", "", Str, "Repair controller: the node whose pods are watched; empty: NODE_NAME"),
    p("repair-sidecar-annotation", "REPAIR_SIDECAR_ANNOTATION", "sidecar.istio.io/status", Str, "Repair controller: only pods with this annotation can be broken; empty: any pod"),
    p("repair-init-container-name", "REPAIR_INIT_CONTAINER_NAME", "istio-validation", Str, "Repair controller: the init container whose failure marks a pod broken; empty: any"),
    p("repair-init-container-termination-message", "REPAIR_INIT_CONTAINER_TERMINATION_MESSAGE", "", Str, "Repair controller: the (trimmed) termination message of that failure; empty: any"),
    p("repair-init-container-exit-code", "REPAIR_INIT_CONTAINER_EXIT_CODE", "126", Int, "Repair controller: the exit code of that failure; 0: any"),
    p("repair-label-selectors", "REPAIR_LABEL_SELECTORS", "", Str, "Repair controller: label selector of the pods watched"),
    p("repair-field-selectors", "REPAIR_FIELD_SELECTORS", "", Str, "Repair controller: field selector of the pods watched (spec.nodeName=<node> is always added)"),
    // Istio's env-only knobs (also flags here).
    p("exclude-namespaces", "EXCLUDE_NAMESPACES", "", Str, "Comma-separated namespaces the plugin leaves alone"),
    p("pod-namespace", "POD_NAMESPACE", "", Str, "Namespace of this pod, written into the plugin's config"),
    p("ambient-enablement-selector", "AMBIENT_ENABLEMENT_SELECTOR", "", Str, "Ambient only; accepted, not used"),
    p("ambient-dns-capture", "AMBIENT_DNS_CAPTURE", "false", Bool, "Ambient only; accepted"),
    p("ambient-ipv6", "AMBIENT_IPV6", "false", Bool, "Ambient only; accepted"),
    p("ambient-disable-safe-upgrade", "AMBIENT_DISABLE_SAFE_UPGRADE", "false", Bool, "Ambient only; accepted"),
    p("ambient-reconcile-pod-rules-on-startup", "AMBIENT_RECONCILE_POD_RULES_ON_STARTUP", "false", Bool, "Ambient only; accepted"),
    p("native-nftables", "NATIVE_NFTABLES", "false", Bool, "The plugin programs Istio's nftables ruleset (tables inet istio-proxy-*) over netlink instead of iptables rules"),
    p("repair-repair-pods", "REPAIR_REPAIR_PODS", "false", Bool, "Repair controller: apply the redirection in broken pods' running network namespace (first choice of action)"),
    p("force-iptables-binary", "FORCE_IPTABLES_BINARY", "", Str, "legacy or nft (ambient only; accepted)"),
    p("kubernetes-service-protocol", "KUBERNETES_SERVICE_PROTOCOL", "https", Str, "Scheme of the API server URL in the kubeconfig"),
    p("kubernetes-service-host", "KUBERNETES_SERVICE_HOST", "", Str, "API server host for the kubeconfig (set by Kubernetes)"),
    p("kubernetes-service-port", "KUBERNETES_SERVICE_PORT", "", Str, "API server port for the kubeconfig (set by Kubernetes)"),
    p("kubernetes-node-name", "KUBERNETES_NODE_NAME", "", Str, "Node name (accepted)"),
    // Istio's logging and ControlZ flags (istio/pkg/log, pkg/ctrlz).
    p("log_output_level", "LOG_OUTPUT_LEVEL", "default:info", Str, "Per-scope levels: <scope>:<level>,... scopes cni-agent, cni-plugin, default; levels debug, info, warn, error, fatal, none"),
    p("log_as_json", "LOG_AS_JSON", "false", Bool, "Log JSON lines instead of text"),
    p("log_target", "LOG_TARGET", "stdout", Str, "stdout or stderr"),
    p("log_caller", "LOG_CALLER", "", Str, "Accepted, not used"),
    p("log_stacktrace_level", "LOG_STACKTRACE_LEVEL", "default:none", Str, "Accepted, not used"),
    p("log_rotate", "LOG_ROTATE", "", Str, "Accepted, not used"),
    p("log_rotate_max_age", "LOG_ROTATE_MAX_AGE", "30", Int, "Accepted, not used"),
    p("log_rotate_max_size", "LOG_ROTATE_MAX_SIZE", "104857600", Int, "Accepted, not used"),
    p("log_rotate_max_backups", "LOG_ROTATE_MAX_BACKUPS", "1000", Int, "Accepted, not used"),
    p("ctrlz_port", "CTRLZ_PORT", "9876", Int, "Accepted; fastpath has no ControlZ"),
    p("ctrlz_address", "CTRLZ_ADDRESS", "localhost", Str, "Accepted; fastpath has no ControlZ"),
    // fastpath's own (paths Istio hard-codes, ports, acceleration, shutdown).
    p("fastpath-health-port", "FASTPATH_HEALTH_PORT", "8000", Int, "Port of /healthz and /readyz (Istio: 8000)"),
    p("fastpath-cni-bin-source-dir", "FASTPATH_CNI_BIN_SOURCE_DIR", "/opt/cni/bin", Str, "Directory in the image holding the plugin binary"),
    p("fastpath-host-cni-bin-dir", "FASTPATH_HOST_CNI_BIN_DIR", "/host/opt/cni/bin", Str, "Host CNI bin dir, as mounted in the container"),
    p("fastpath-service-account-dir", "FASTPATH_SERVICE_ACCOUNT_DIR", "/var/run/secrets/kubernetes.io/serviceaccount", Str, "Service-account token and CA directory"),
    p("fastpath-keep-install-on-shutdown", "FASTPATH_KEEP_INSTALL_ON_SHUTDOWN", "auto", Str, "On SIGTERM: auto (ask the API: keep everything for an upgrade, remove everything when the DaemonSet is gone, being deleted or no longer selects this node), true (always keep), false (always remove)"),
    p("pod-name", "POD_NAME", "", Str, "Name of this pod (downward API): finds the DaemonSet that owns it on SIGTERM"),
    p("node-name", "NODE_NAME", "", Str, "Name of this node (downward API): checks the DaemonSet still selects it on SIGTERM"),
    p("fastpath-fight-threshold", "FASTPATH_FIGHT_THRESHOLD", "5", Int, "Removals of the plugin entry within the fight window that count as a fight with another agent; 0 disables detection"),
    p("fastpath-fight-window-seconds", "FASTPATH_FIGHT_WINDOW_SECONDS", "10", Int, "The fight window, in seconds"),
    p("fastpath-pod-cache", "FASTPATH_POD_CACHE", "true", Bool, "Watch this node's pods (NODE_NAME) and answer the plugin's pod lookups from them, so a pod ADD makes no API call; the plugin asks the API server when the agent cannot answer"),
    p("fastpath-acceleration", "FASTPATH_ACCELERATION", "true", Bool, "Load the eBPF same-node accelerator"),
    p("fastpath-max-queued-bytes", "FASTPATH_MAX_QUEUED_BYTES", "16777216", Int, "Bytes an accelerated reader may have queued (unread) before its connection goes back to TCP; 65536 to 1073741824"),
    p("fastpath-bpffs", "FASTPATH_BPFFS", "", Str, "The host's bpffs; empty: /sys/fs/bpf if mounted there, else the host's through /host/proc/1/root"),
    p("fastpath-bpf-pin-dir", "FASTPATH_BPF_PIN_DIR", "", Str, "Directory of the accelerator's pins; empty: <bpffs>/fastpath"),
    p("fastpath-kernel-features-off", "FASTPATH_KERNEL_FEATURES_OFF", "", Str, "Kernel features the accelerator must not use, as if the kernel lacked them (comma-separated: sockmap-link, recvmsg-tracepoint, btf); each has a fallback (docs/install.md, Kernels)"),
    p("fastpath-host-proc", "FASTPATH_HOST_PROC", "/host/proc", Str, "The host's procfs, where the repair controller finds a running pod's network namespace"),
    p("fastpath-cgroup-root", "FASTPATH_CGROUP_ROOT", "", Str, "The host's cgroup v2 root to attach to; empty: found from the host's mounts (/host/proc/1/mounts) or /proc/self/mounts"),
];

/// The subcommand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Run,
    Uninstall,
    /// Uninstall, then stay up until SIGTERM (the container of the cleanup DaemonSet: a
    /// container that exits is restarted).
    UninstallAndWait,
    AccelStatus,
    Version,
    Help,
}

/// Why the configuration was refused: an env var or flag with a bad value (naming the
/// variable, as given, and the value), or a command line that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    #[error(
        "unknown command {command:?} (expected uninstall, uninstall-and-wait, accel-status, version)"
    )]
    UnknownCommand { command: String },
    #[error("more than one command given ({arg:?})")]
    SecondCommand { arg: String },
    #[error("unknown flag: --{flag}")]
    UnknownFlag { flag: String },
    #[error("flag needs an argument: --{flag}")]
    MissingArgument { flag: String },
    /// A value that cannot be used; `given_as` is how it was set (`--flag` or `ENV`).
    #[error("invalid {given_as}={value:?}: {why}")]
    Invalid {
        env: &'static str,
        given_as: String,
        value: String,
        why: String,
    },
    /// A variable the running agent needs (set by Kubernetes in a pod) is not set.
    #[error("{env} is not set: is this not running within a pod?")]
    NotSet { env: &'static str },
}

/// Strings as given, before any interpretation.
#[derive(Clone, Debug)]
pub struct RawConfig {
    pub command: Command,
    /// env name -> (value, where it came from).
    values: BTreeMap<&'static str, (String, Source)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Default,
    Env,
    Flag,
}

fn param_by_flag(flag: &str) -> Option<&'static Param> {
    // Go's pflag treats `-` and `_` as different; Istio's own log flags use `_`. Accept both
    // spellings for every flag, so `--log-output-level` works too.
    let norm = |s: &str| s.replace('_', "-");
    PARAMS
        .iter()
        .find(|p| p.flag == flag || norm(p.flag) == norm(flag))
}

fn param_by_env(env: &str) -> &'static Param {
    PARAMS
        .iter()
        .find(|p| p.env == env)
        .expect("known parameter")
}

impl RawConfig {
    /// Collects values: flag, else non-empty env var, else default.
    pub fn read(
        args: impl IntoIterator<Item = String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SettingError> {
        let mut values = BTreeMap::new();
        for p in PARAMS {
            match env(p.env).filter(|v| !v.is_empty()) {
                Some(v) => values.insert(p.env, (v, Source::Env)),
                None => values.insert(p.env, (p.default.to_string(), Source::Default)),
            };
        }
        let mut command = None;
        let mut args = args.into_iter().peekable();
        while let Some(arg) = args.next() {
            let Some(body) = arg
                .strip_prefix("--")
                .or_else(|| arg.strip_prefix('-').filter(|b| b.len() > 1))
            else {
                let c = match arg.as_str() {
                    "uninstall" => Command::Uninstall,
                    "uninstall-and-wait" => Command::UninstallAndWait,
                    "accel-status" => Command::AccelStatus,
                    "version" => Command::Version,
                    "help" => Command::Help,
                    other => {
                        return Err(SettingError::UnknownCommand {
                            command: other.to_string(),
                        });
                    }
                };
                if command.replace(c).is_some() {
                    return Err(SettingError::SecondCommand { arg });
                }
                continue;
            };
            if body == "help" || body == "h" {
                command = Some(Command::Help);
                continue;
            }
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let param = param_by_flag(name).ok_or_else(|| SettingError::UnknownFlag {
                flag: name.to_string(),
            })?;
            let value = match (inline, param.kind) {
                (Some(v), _) => v,
                // pflag: a bare boolean flag means true.
                (None, Kind::Bool) => "true".to_string(),
                (None, _) => args.next().ok_or_else(|| SettingError::MissingArgument {
                    flag: name.to_string(),
                })?,
            };
            values.insert(param.env, (value, Source::Flag));
        }
        Ok(RawConfig {
            command: command.unwrap_or(Command::Run),
            values,
        })
    }

    pub fn get(&self, env: &str) -> &str {
        &self.values.get(env).expect("known parameter").0
    }

    pub fn source(&self, env: &str) -> Source {
        self.values.get(env).expect("known parameter").1
    }

    fn bool(&self, env: &'static str) -> Result<bool, SettingError> {
        parse_bool(self.get(env)).ok_or_else(|| self.bad(env, "expected true or false"))
    }

    fn int(&self, env: &'static str) -> Result<i64, SettingError> {
        self.get(env)
            .trim()
            .parse()
            .map_err(|_| self.bad(env, "expected an integer"))
    }

    fn mode(&self, env: &'static str) -> Result<u32, SettingError> {
        let v = parse_go_int(self.get(env))
            .ok_or_else(|| self.bad(env, "expected a file mode such as 0600 or 384"))?;
        if !(0..=0o7777).contains(&v) {
            return Err(self.bad(env, "a file mode must be between 0 and 07777"));
        }
        Ok(v as u32)
    }

    fn path(&self, env: &'static str) -> Result<PathBuf, SettingError> {
        let v = self.get(env);
        if !v.starts_with('/') {
            return Err(self.bad(env, "expected an absolute path"));
        }
        Ok(PathBuf::from(v))
    }

    fn port(&self, env: &'static str, allow_off: bool) -> Result<Option<u16>, SettingError> {
        let v = self.int(env)?;
        if v <= 0 && allow_off {
            return Ok(None);
        }
        u16::try_from(v)
            .ok()
            .filter(|p| *p > 0)
            .map(Some)
            .ok_or_else(|| self.bad(env, "expected a port between 1 and 65535"))
    }

    /// The one message for a bad value.
    pub fn bad(&self, env: &'static str, why: &str) -> SettingError {
        let p = param_by_env(env);
        let given_as = match self.source(env) {
            Source::Flag => format!("--{}", p.flag),
            _ => env.to_string(),
        };
        SettingError::Invalid {
            env,
            given_as,
            value: self.get(env).to_string(),
            why: why.to_string(),
        }
    }
}

/// Go's `strconv.ParseBool`, which viper uses.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim() {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `strconv.ParseInt(s, 0, 64)`: `0x` hex, `0o`/leading `0` octal, `0b` binary.
pub fn parse_go_int(s: &str) -> Option<i64> {
    let s = s.trim().replace('_', "");
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r.to_string()),
        None => (false, s.strip_prefix('+').unwrap_or(&s).to_string()),
    };
    let lower = s.to_ascii_lowercase();
    let v = if let Some(h) = lower.strip_prefix("0x") {
        i64::from_str_radix(h, 16).ok()?
    } else if let Some(o) = lower.strip_prefix("0o") {
        i64::from_str_radix(o, 8).ok()?
    } else if let Some(b) = lower.strip_prefix("0b") {
        i64::from_str_radix(b, 2).ok()?
    } else if lower.len() > 1 && lower.starts_with('0') {
        i64::from_str_radix(&lower[1..], 8).ok()?
    } else {
        lower.parse().ok()?
    };
    Some(if neg { -v } else { v })
}

/// The typed configuration the agent runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub cni_conf_name: Option<String>,
    pub chained: bool,
    /// The entry template and where it came from (for error messages).
    pub template: Template,
    pub mounted_cni_net_dir: PathBuf,
    pub cni_agent_run_dir: PathBuf,
    pub kubeconfig_mode: u32,
    pub cni_conf_group_read: bool,
    pub kube_ca_file: PathBuf,
    pub skip_tls_verify: bool,
    pub monitoring_port: Option<u16>,
    pub health_port: u16,
    pub ambient_enabled: bool,
    pub enable_ambient_detection_retry: bool,
    pub exclude_namespaces: Vec<String>,
    pub exclude_namespaces_raw: String,
    pub pod_namespace: String,
    pub native_nftables: bool,
    pub repair_enabled: bool,
    /// The repair controller (see [`crate::repair`]).
    pub repair: crate::repair::RepairSettings,
    pub kubernetes_service_protocol: String,
    pub kubernetes_service_host: String,
    pub kubernetes_service_port: String,
    pub plugin_log_level: Level,
    pub log: LogSettings,
    pub bin_source_dir: PathBuf,
    pub host_bin_dir: PathBuf,
    pub service_account_dir: PathBuf,
    pub keep_install_on_shutdown: crate::shutdown::KeepInstall,
    /// Who this pod is, for the SIGTERM decision.
    pub identity: crate::shutdown::Identity,
    pub fight_threshold: usize,
    pub fight_window: std::time::Duration,
    /// Whether the node's pod cache runs (see [`crate::pod_cache`]).
    pub pod_cache: bool,
    pub accel: crate::accel::AccelSettings,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pub text: String,
    /// `CNI_NETWORK_CONFIG`, `CNI_NETWORK_CONFIG_FILE=<path>` or `built-in`.
    pub origin: String,
}

/// Bounds of `FASTPATH_MAX_QUEUED_BYTES`: below 64 KiB connections would leave the fast path
/// on ordinary bursts; above 1 GiB a few slow readers could exhaust the node's TCP memory.
const MIN_QUEUED_BYTES: u64 = 64 << 10;
const MAX_QUEUED_BYTES: u64 = 1 << 30;

/// The file name Istio gives the standalone config.
pub const STANDALONE_CONF_NAME: &str = "YYY-istio-cni.conf";
/// The plugin's kubeconfig file name (fixed in Istio).
pub const KUBECONFIG_NAME: &str = "istio-cni-kubeconfig";
/// The plugin binary name.
pub const PLUGIN_BINARY: &str = "istio-cni";

impl Config {
    /// Builds typed settings. `read_file` reads `CNI_NETWORK_CONFIG_FILE`.
    pub fn build(
        raw: &RawConfig,
        read_file: impl Fn(&str) -> std::io::Result<String>,
    ) -> Result<Config, SettingError> {
        let log = LogSettings::parse(
            raw.get("LOG_OUTPUT_LEVEL"),
            raw.bool("LOG_AS_JSON")?,
            raw.get("LOG_TARGET"),
        )
        .map_err(|why| raw.bad(param_env_of_log(&why), &why.1))?;
        // LOG_LEVEL is Istio's dead knob; here it sets the plugin's level when given
        // explicitly, unless --log_output_level names the cni-plugin scope itself.
        let log_level_explicit = raw.source("LOG_LEVEL") != Source::Default;
        let log_level = Level::parse(raw.get("LOG_LEVEL")).ok_or_else(|| {
            raw.bad(
                "LOG_LEVEL",
                "expected debug, info, warn, error, fatal or none",
            )
        })?;
        let plugin_log_level = match (log.explicit_level("cni-plugin"), log_level_explicit) {
            (Some(l), _) => l,
            (None, true) => log_level,
            (None, false) => log.level_for("cni-plugin"),
        };
        let template = template(raw, read_file)?;
        let ambient_enabled = raw.bool("AMBIENT_ENABLED")?;
        if ambient_enabled {
            return Err(raw.bad(
                "AMBIENT_ENABLED",
                "fastpath replaces istio-cni in sidecar mode only; ambient mode is not supported",
            ));
        }
        let force_iptables = raw.get("FORCE_IPTABLES_BINARY");
        if !matches!(force_iptables, "" | "legacy" | "nft") {
            return Err(raw.bad("FORCE_IPTABLES_BINARY", "expected legacy or nft"));
        }
        // Validate the flags that are accepted but unused, so a typo still stops start-up.
        for p in PARAMS {
            match p.kind {
                Bool => drop(raw.bool(p.env)?),
                Int => drop(raw.int(p.env)?),
                Mode | Str => {}
            }
        }
        let conf_name = raw.get("CNI_CONF_NAME");
        if conf_name.contains('/') {
            return Err(raw.bad("CNI_CONF_NAME", "expected a file name, not a path"));
        }
        let service_account_dir = raw.path("FASTPATH_SERVICE_ACCOUNT_DIR")?;
        let kube_ca_file = match raw.get("KUBE_CA_FILE") {
            "" => service_account_dir.join("ca.crt"),
            _ => raw.path("KUBE_CA_FILE")?,
        };
        let exclude_raw = raw.get("EXCLUDE_NAMESPACES").to_string();
        Ok(Config {
            cni_conf_name: (!conf_name.is_empty()).then(|| conf_name.to_string()),
            chained: raw.bool("CHAINED_CNI_PLUGIN")?,
            template,
            mounted_cni_net_dir: raw.path("MOUNTED_CNI_NET_DIR")?,
            cni_agent_run_dir: raw.path("CNI_AGENT_RUN_DIR")?,
            kubeconfig_mode: raw.mode("KUBECONFIG_MODE")?,
            cni_conf_group_read: raw.bool("CNI_CONF_GROUP_READ")?,
            kube_ca_file,
            skip_tls_verify: raw.bool("SKIP_TLS_VERIFY")?,
            monitoring_port: raw.port("MONITORING_PORT", true)?,
            health_port: raw.port("FASTPATH_HEALTH_PORT", false)?.expect("port"),
            ambient_enabled,
            enable_ambient_detection_retry: raw.bool("ENABLE_AMBIENT_DETECTION_RETRY")?,
            exclude_namespaces: split_exclude_namespaces(&exclude_raw),
            exclude_namespaces_raw: exclude_raw,
            pod_namespace: raw.get("POD_NAMESPACE").to_string(),
            native_nftables: raw.bool("NATIVE_NFTABLES")?,
            repair_enabled: raw.bool("REPAIR_ENABLED")?,
            repair: repair_settings(raw)?,
            kubernetes_service_protocol: raw.get("KUBERNETES_SERVICE_PROTOCOL").to_string(),
            kubernetes_service_host: raw.get("KUBERNETES_SERVICE_HOST").to_string(),
            kubernetes_service_port: raw.get("KUBERNETES_SERVICE_PORT").to_string(),
            plugin_log_level,
            log,
            bin_source_dir: raw.path("FASTPATH_CNI_BIN_SOURCE_DIR")?,
            host_bin_dir: raw.path("FASTPATH_HOST_CNI_BIN_DIR")?,
            service_account_dir,
            keep_install_on_shutdown: crate::shutdown::KeepInstall::parse(
                raw.get("FASTPATH_KEEP_INSTALL_ON_SHUTDOWN"),
            )
            .ok_or_else(|| {
                raw.bad(
                    "FASTPATH_KEEP_INSTALL_ON_SHUTDOWN",
                    "expected auto, true or false",
                )
            })?,
            identity: crate::shutdown::Identity {
                pod_namespace: raw.get("POD_NAMESPACE").to_string(),
                pod_name: raw.get("POD_NAME").to_string(),
                node_name: raw.get("NODE_NAME").to_string(),
            },
            fight_threshold: usize::try_from(raw.int("FASTPATH_FIGHT_THRESHOLD")?)
                .map_err(|_| raw.bad("FASTPATH_FIGHT_THRESHOLD", "expected 0 or more"))?,
            fight_window: std::time::Duration::from_secs(
                u64::try_from(raw.int("FASTPATH_FIGHT_WINDOW_SECONDS")?)
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| {
                        raw.bad("FASTPATH_FIGHT_WINDOW_SECONDS", "expected 1 or more")
                    })?,
            ),
            pod_cache: raw.bool("FASTPATH_POD_CACHE")?,
            accel: accel_settings(raw)?,
        })
    }

    /// Checks what only the running agent needs (the uninstall command does not).
    pub fn check_for_run(&self, raw: &RawConfig) -> Result<(), SettingError> {
        for env in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
            if raw.get(env).is_empty() {
                return Err(SettingError::NotSet { env });
            }
        }
        Ok(())
    }

    pub fn kubeconfig_path(&self) -> PathBuf {
        self.cni_agent_run_dir.join(KUBECONFIG_NAME)
    }

    pub fn log_socket_path(&self) -> PathBuf {
        self.cni_agent_run_dir.join("log.sock")
    }

    pub fn token_path(&self) -> PathBuf {
        self.service_account_dir.join("token")
    }

    /// Mode of CNI config files this agent creates (never of files it patches).
    pub fn created_conf_mode(&self) -> u32 {
        if self.cni_conf_group_read {
            0o640
        } else {
            0o600
        }
    }
}

/// The repair controller's settings (Istio's `REPAIR_*`).
fn repair_settings(raw: &RawConfig) -> Result<crate::repair::RepairSettings, SettingError> {
    let s = |env: &str| raw.get(env).to_string();
    Ok(crate::repair::RepairSettings {
        enabled: raw.bool("REPAIR_ENABLED")?,
        repair_pods: raw.bool("REPAIR_REPAIR_PODS")?,
        delete_pods: raw.bool("REPAIR_DELETE_PODS")?,
        label_pods: raw.bool("REPAIR_LABEL_PODS")?,
        label_key: s("REPAIR_BROKEN_POD_LABEL_KEY"),
        label_value: s("REPAIR_BROKEN_POD_LABEL_VALUE"),
        node_name: crate::repair::node_name(raw.get("REPAIR_NODE_NAME"), raw.get("NODE_NAME")),
        sidecar_annotation: s("REPAIR_SIDECAR_ANNOTATION"),
        init_container_name: s("REPAIR_INIT_CONTAINER_NAME"),
        init_container_termination_message: s("REPAIR_INIT_CONTAINER_TERMINATION_MESSAGE"),
        init_container_exit_code: raw.int("REPAIR_INIT_CONTAINER_EXIT_CODE")?,
        label_selectors: s("REPAIR_LABEL_SELECTORS"),
        field_selectors: s("REPAIR_FIELD_SELECTORS"),
        host_proc: raw.path("FASTPATH_HOST_PROC")?,
        native_nftables: raw.bool("NATIVE_NFTABLES")?,
    })
}

fn param_env_of_log(why: &(&'static str, String)) -> &'static str {
    why.0
}

/// Istio's `util.SplitExcludeNamespaces`: comma-separated, trimmed, empty items dropped.
pub fn split_exclude_namespaces(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(String::from)
        .collect()
}

/// `install-cni --help`.
/// The plugin entry's template: `CNI_NETWORK_CONFIG`, else the file
/// `CNI_NETWORK_CONFIG_FILE` names, else the built-in one.
fn template(
    raw: &RawConfig,
    read_file: impl Fn(&str) -> std::io::Result<String>,
) -> Result<Template, SettingError> {
    Ok(
        match (
            raw.get("CNI_NETWORK_CONFIG"),
            raw.get("CNI_NETWORK_CONFIG_FILE"),
        ) {
            (t, _) if !t.is_empty() => Template {
                text: t.to_string(),
                origin: "CNI_NETWORK_CONFIG".into(),
            },
            (_, f) if !f.is_empty() => {
                let text = read_file(f).map_err(|e| {
                    raw.bad("CNI_NETWORK_CONFIG_FILE", &format!("cannot read it: {e}"))
                })?;
                Template {
                    text,
                    origin: format!("CNI_NETWORK_CONFIG_FILE={f}"),
                }
            }
            _ => Template {
                text: crate::conflist::DEFAULT_TEMPLATE.to_string(),
                origin: "built-in".into(),
            },
        },
    )
}

/// The accelerator's settings: the host paths found from what this process sees of the
/// node, unless set, and the acceleration knobs.
fn accel_settings(raw: &RawConfig) -> Result<crate::accel::AccelSettings, SettingError> {
    let optional_path = |env: &'static str| match raw.get(env) {
        "" => Ok(None),
        _ => raw.path(env).map(Some),
    };
    let (bpffs, pin_dir, cgroup_root) = crate::accel::locate_host_paths(
        optional_path("FASTPATH_BPFFS")?,
        optional_path("FASTPATH_BPF_PIN_DIR")?,
        optional_path("FASTPATH_CGROUP_ROOT")?,
    );
    Ok(crate::accel::AccelSettings {
        enabled: raw.bool("FASTPATH_ACCELERATION")?,
        bpffs,
        pin_dir,
        cgroup_root,
        run_dir: raw.path("CNI_AGENT_RUN_DIR")?,
        max_queued_bytes: u64::try_from(raw.int("FASTPATH_MAX_QUEUED_BYTES")?)
            .ok()
            .filter(|b| (MIN_QUEUED_BYTES..=MAX_QUEUED_BYTES).contains(b))
            .ok_or_else(|| {
                raw.bad(
                    "FASTPATH_MAX_QUEUED_BYTES",
                    "expected bytes between 65536 (64 KiB) and 1073741824 (1 GiB)",
                )
            })?,
        drain_timeout: crate::accel::drain::DRAIN_TIMEOUT,
        features_off: crate::accel::features::FeaturesOff::parse(
            raw.get("FASTPATH_KERNEL_FEATURES_OFF"),
        )
        .map_err(|why| raw.bad("FASTPATH_KERNEL_FEATURES_OFF", &why.to_string()))?,
    })
}

pub fn usage() -> String {
    let mut s = String::from(
        "install-cni (fastpath): installs the istio-cni plugin on this node and keeps it installed.\n\n\
         Usage: install-cni [command] [--flag=value ...]\n\n\
         Commands:\n  (none)        run the agent\n  uninstall     drain and remove the accelerator, then the plugin entry, kubeconfig and binary;\n                say what is left\n  \
         uninstall-and-wait  the same, then wait for SIGTERM (the cleanup DaemonSet's container)\n  \
         accel-status  print the accelerator's state\n  version       print the version\n\n\
         Flags (each also settable as the env var shown; a flag wins over its env var):\n",
    );
    for p in PARAMS {
        s.push_str(&format!(
            "  --{:<44} {:<42} default {:?}\n      {}\n",
            p.flag, p.env, p.default, p.help
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(args: &[&str], env: &[(&str, &str)]) -> Result<RawConfig, SettingError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RawConfig::read(args.iter().map(|s| s.to_string()), move |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }

    fn build(args: &[&str], env: &[(&str, &str)]) -> Result<Config, SettingError> {
        Config::build(&read(args, env)?, |_| Ok(String::new()))
    }

    #[test]
    fn defaults_are_istios() {
        let c = build(&[], &[]).unwrap();
        assert!(c.chained);
        assert_eq!(c.mounted_cni_net_dir, PathBuf::from("/host/etc/cni/net.d"));
        assert_eq!(c.cni_agent_run_dir, PathBuf::from("/var/run/istio-cni"));
        assert_eq!(c.kubeconfig_mode, 0o600);
        assert_eq!(c.monitoring_port, Some(15014));
        assert_eq!(c.health_port, 8000);
        assert_eq!(c.plugin_log_level, Level::Info);
        assert_eq!(
            c.kube_ca_file,
            PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
        );
        assert_eq!(c.host_bin_dir, PathBuf::from("/host/opt/cni/bin"));
        assert_eq!(c.template.origin, "built-in");
        assert_eq!(
            c.keep_install_on_shutdown,
            crate::shutdown::KeepInstall::Auto
        );
        assert!(c.accel.enabled);
    }

    #[test]
    fn flag_wins_over_env_and_empty_env_is_unset() {
        let c = build(&["--monitoring-port=9999"], &[("MONITORING_PORT", "1234")]).unwrap();
        assert_eq!(c.monitoring_port, Some(9999));
        let c = build(&["--monitoring-port", "0"], &[]).unwrap();
        assert_eq!(c.monitoring_port, None);
        let c = build(&[], &[("MONITORING_PORT", "")]).unwrap();
        assert_eq!(c.monitoring_port, Some(15014));
        let c = build(
            &["--chained-cni-plugin=false"],
            &[("CHAINED_CNI_PLUGIN", "true")],
        )
        .unwrap();
        assert!(!c.chained);
        let c = build(&["--skip-tls-verify"], &[]).unwrap();
        assert!(c.skip_tls_verify);
    }

    #[test]
    fn bad_values_name_the_variable_and_value() {
        let e = build(&[], &[("CHAINED_CNI_PLUGIN", "maybe")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid CHAINED_CNI_PLUGIN=\"maybe\": expected true or false"
        );
        let e = build(&["--monitoring-port=abc"], &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("invalid --monitoring-port=\"abc\""), "{e}");
        let e = build(&[], &[("KUBECONFIG_MODE", "0999")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("KUBECONFIG_MODE=\"0999\""), "{e}");
        let e = build(&[], &[("LOG_OUTPUT_LEVEL", "cni-agent:loud")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("LOG_OUTPUT_LEVEL=\"cni-agent:loud\""), "{e}");
        let e = build(&["--log_output_level=cni-agent:loud"], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--log_output_level=\"cni-agent:loud\""), "{e}");
        let e = build(&["--no-such-flag"], &[]).unwrap_err().to_string();
        assert!(e.contains("--no-such-flag"), "{e}");
        let e = build(&[], &[("REPAIR_INIT_CONTAINER_EXIT_CODE", "x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("REPAIR_INIT_CONTAINER_EXIT_CODE"), "{e}");
        let e = build(&[], &[("MOUNTED_CNI_NET_DIR", "relative/dir")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("MOUNTED_CNI_NET_DIR"), "{e}");
        let e = build(&[], &[("AMBIENT_ENABLED", "true")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("AMBIENT_ENABLED"), "{e}");
        let e = build(&[], &[("FASTPATH_KEEP_INSTALL_ON_SHUTDOWN", "sometimes")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid FASTPATH_KEEP_INSTALL_ON_SHUTDOWN=\"sometimes\": expected auto, true or false"
        );
        for bad in ["1000", "2147483648", "-1", "2MiB"] {
            let e = build(&[], &[("FASTPATH_MAX_QUEUED_BYTES", bad)])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("FASTPATH_MAX_QUEUED_BYTES=\"{bad}\"")),
                "{e}"
            );
        }
    }

    #[test]
    fn setting_errors_carry_the_variable_and_value() {
        match build(&["--monitoring-port=abc"], &[]).unwrap_err() {
            SettingError::Invalid {
                env,
                given_as,
                value,
                why,
            } => {
                assert_eq!(env, "MONITORING_PORT");
                assert_eq!(given_as, "--monitoring-port");
                assert_eq!(value, "abc");
                assert_eq!(why, "expected an integer");
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(
            read(&["--no-such-flag"], &[]).unwrap_err(),
            SettingError::UnknownFlag {
                flag: "no-such-flag".into()
            }
        );
        assert_eq!(
            read(&["--cni-conf-name"], &[]).unwrap_err().to_string(),
            "flag needs an argument: --cni-conf-name"
        );
        assert_eq!(
            read(&["bogus"], &[]).unwrap_err().to_string(),
            "unknown command \"bogus\" (expected uninstall, uninstall-and-wait, accel-status, version)"
        );
        assert_eq!(
            read(&["version", "help"], &[]).unwrap_err().to_string(),
            "more than one command given (\"help\")"
        );
        let raw = read(&[], &[]).unwrap();
        let c = Config::build(&raw, |_| Ok(String::new())).unwrap();
        let e = c.check_for_run(&raw).unwrap_err();
        assert_eq!(
            e,
            SettingError::NotSet {
                env: "KUBERNETES_SERVICE_HOST"
            }
        );
        assert_eq!(
            e.to_string(),
            "KUBERNETES_SERVICE_HOST is not set: is this not running within a pod?"
        );
    }

    #[test]
    fn queue_limit_defaults_to_2_mib_and_takes_bytes() {
        assert_eq!(build(&[], &[]).unwrap().accel.max_queued_bytes, 16 << 20);
        assert_eq!(
            build(&["--fastpath-max-queued-bytes=65536"], &[])
                .unwrap()
                .accel
                .max_queued_bytes,
            65536
        );
    }

    #[test]
    fn kubeconfig_mode_is_go_int() {
        assert_eq!(
            build(&[], &[("KUBECONFIG_MODE", "0640")])
                .unwrap()
                .kubeconfig_mode,
            0o640
        );
        assert_eq!(
            build(&[], &[("KUBECONFIG_MODE", "420")])
                .unwrap()
                .kubeconfig_mode,
            0o644
        );
        assert_eq!(
            build(&[], &[("KUBECONFIG_MODE", "0o644")])
                .unwrap()
                .kubeconfig_mode,
            0o644
        );
    }

    #[test]
    fn plugin_level_from_scope_or_log_level() {
        let c = build(
            &["--log_output_level=cni-plugin:debug"],
            &[("LOG_LEVEL", "error")],
        )
        .unwrap();
        assert_eq!(c.plugin_log_level, Level::Debug);
        let c = build(&[], &[("LOG_LEVEL", "error")]).unwrap();
        assert_eq!(c.plugin_log_level, Level::Error);
        let c = build(&["--log_output_level=warn"], &[]).unwrap();
        assert_eq!(c.plugin_log_level, Level::Warn);
    }

    #[test]
    fn template_sources() {
        let raw = read(&[], &[("CNI_NETWORK_CONFIG_FILE", "/t.json")]).unwrap();
        let c = Config::build(&raw, |p| {
            assert_eq!(p, "/t.json");
            Ok("{}".into())
        })
        .unwrap();
        assert_eq!(c.template.text, "{}");
        let e = Config::build(&raw, |_| Err(std::io::Error::other("nope")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("CNI_NETWORK_CONFIG_FILE=\"/t.json\""), "{e}");
    }

    #[test]
    fn commands() {
        assert_eq!(
            read(&["uninstall"], &[]).unwrap().command,
            Command::Uninstall
        );
        assert_eq!(
            read(&["accel-status", "--fastpath-bpf-pin-dir=/x"], &[])
                .unwrap()
                .command,
            Command::AccelStatus
        );
        assert!(read(&["bogus"], &[]).is_err());
    }

    #[test]
    fn every_parameter_is_documented() {
        let doc = include_str!("../../docs/configuration.md");
        for p in PARAMS {
            assert!(
                doc.contains(&format!("`--{}` | `{}` |", p.flag, p.env)),
                "{} missing from docs/configuration.md",
                p.env
            );
        }
    }

    #[test]
    fn exclude_namespaces_split() {
        assert_eq!(split_exclude_namespaces(" a, b,,c "), vec!["a", "b", "c"]);
        assert!(split_exclude_namespaces("").is_empty());
    }
}
