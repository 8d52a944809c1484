//! ADD, DEL and CHECK of the `istio-cni` plugin: Istio's decision order (`CmdAdd` in Istio's
//! `cni/pkg/plugin/plugin.go`), then the
//! redirection, then (for mesh pods) the accelerator's enrollment.
use crate::accel;
use crate::config::{K8sArgs, PluginConfig};
use crate::iptables::{self, Backend, Netns, NetnsEntry};
use crate::kube::{self, FetchError};
use crate::log::{Level, Logger};
use crate::nftables;
use crate::pod::{self, Pod};
use crate::pod_cache;
use crate::redirect::{self, InterceptionMode, Redirect};
use crate::result;
use crate::routing;
use crate::rules::{self, Family};
use crate::skel::{CmdArgs, CniError, Commands, code};
use serde_json::{Value, json};
use std::cell::RefCell;
use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Why [`redirect_running_pod`] did not redirect a pod.
#[derive(Debug, thiserror::Error)]
pub enum RunningPodRedirectError {
    #[error("not a Pod: {0}")]
    NotAPod(#[source] pod::PodDecodeError),
    /// An annotation or setting of the pod that the plugin refuses (as ADD would).
    #[error("{0}")]
    InvalidSetting(#[source] CniError),
    /// The redirection could not be applied in the netns.
    #[error("{0}")]
    Apply(#[source] CniError),
}

/// Applies to the network namespace at `netns_path` exactly the sidecar redirection ADD would
/// apply for `pod` (the API's Pod JSON) with addresses `ips`: iptables (the backend chosen as
/// for a plugin config without `fastpath_iptables_backend`) or, with `native_nftables`, nftables.
/// install-cni's repair controller uses it for pods that started before the plugin was
/// installed. `Ok(Some(why))` when the plugin would not redirect this pod at all.
pub fn redirect_running_pod(
    pod_json: &[u8],
    netns_path: &str,
    ips: &[IpAddr],
    native_nftables: bool,
) -> Result<Option<String>, RunningPodRedirectError> {
    let pod = Pod::from_json(pod_json).map_err(RunningPodRedirectError::NotAPod)?;
    if let Some(skip) = pod::sidecar_skip_reason(&pod) {
        return Ok(Some(skip.to_string()));
    }
    let r = IstioCni::redirect_for(&pod).map_err(RunningPodRedirectError::InvalidSetting)?;
    let conf = PluginConfig {
        native_nftables,
        ..Default::default()
    };
    IstioCni::default()
        .apply(&conf, netns_path, &r, ips)
        .map(|_| None)
        .map_err(RunningPodRedirectError::Apply)
}

/// The plugin, with the log buffer of this invocation.
pub struct IstioCni {
    pub log: RefCell<Logger>,
    /// Where the logs go at the end (the installer's socket), once the config is known.
    pub log_socket: RefCell<Option<String>>,
    started: Instant,
    /// The pod netns' cookie, when applying the rules read it on the way.
    netns_cookie: std::cell::Cell<Option<u64>>,
    /// How work inside the pod's netns gets there: the plugin's own process moves its thread;
    /// a caller in a long-lived process (the installer's repair) keeps the default.
    pub netns_entry: NetnsEntry,
}

impl Default for IstioCni {
    fn default() -> Self {
        Self {
            log: RefCell::new(Logger::default()),
            log_socket: RefCell::new(None),
            started: Instant::now(),
            netns_cookie: std::cell::Cell::new(None),
            netns_entry: NetnsEntry::default(),
        }
    }
}

/// What happened to a pod on ADD.
enum Outcome {
    /// Why, and how long the API lookup took (zero when there was none).
    PassThrough(String, Duration),
    Redirected,
}

/// Whether a pod gets the sidecar redirection.
enum Selection {
    /// A mesh pod, as the API returned it.
    Mesh(Box<Pod>),
    /// Not redirected, and why (the pass-through log line says it).
    Skip(String),
}

fn ms(d: Duration) -> Value {
    json!((d.as_secs_f64() * 1e6).round() / 1e3)
}

impl IstioCni {
    fn setup(&self, args: &CmdArgs) -> Result<(PluginConfig, K8sArgs), CniError> {
        let conf = PluginConfig::parse(&args.stdin)?;
        let mut log = self.log.borrow_mut();
        log.set_level(Level::from_config(conf.plugin_log_level.as_deref()));
        *self.log_socket.borrow_mut() = Some(conf.log_socket_path());
        log.add_context("containerID", args.container_id.clone());
        let k8s = K8sArgs::parse(&args.args)?;
        if !k8s.pod_name.is_empty() {
            log.add_context("pod", format!("{}/{}", k8s.pod_namespace, k8s.pod_name));
        }
        Ok((conf, k8s))
    }

    /// Steps 2–8 of Istio's `CmdAdd`: which pods are looked at at all, then the lookup.
    fn mesh_pod(
        &self,
        conf: &PluginConfig,
        k8s: &K8sArgs,
        api_time: &mut Duration,
    ) -> Result<Selection, CniError> {
        if conf.ambient_enabled {
            self.log.borrow_mut().warn(
                "ambient_enabled is set, but this istio-cni (fastpath) implements sidecar mode only; applying sidecar logic",
                &[],
            );
        }
        if pod::is_agent_pod(&k8s.pod_name, &k8s.pod_namespace, &conf.pod_namespace) {
            return Ok(Selection::Skip("the istio-cni agent's own pod".into()));
        }
        if k8s.pod_namespace.is_empty() || k8s.pod_name.is_empty() {
            return Ok(Selection::Skip("not a kubernetes pod".into()));
        }
        if conf.is_excluded_namespace(&k8s.pod_namespace) {
            return Ok(Selection::Skip(format!(
                "namespace {} is excluded",
                k8s.pod_namespace
            )));
        }
        let pod = self.lookup_pod(conf, k8s, api_time)?;
        match pod::sidecar_skip_reason(&pod) {
            Some(skip) => Ok(Selection::Skip(skip.to_string())),
            None => Ok(Selection::Mesh(Box::new(pod))),
        }
    }

    /// The pod's IPs from prevResult; entries that are not addresses are named in the log
    /// and left out.
    fn pod_ips(&self, conf: &PluginConfig) -> Vec<IpAddr> {
        let got = conf.pod_ips();
        for entry in &got.unparsable {
            self.log.borrow_mut().warn(
                "prevResult address is not an IP address; left out",
                &[("address", json!(entry))],
            );
        }
        got.ips
    }

    /// The pod from the node's pod cache (install-cni's watch; see [`pod_cache`]), or `None`
    /// when the agent does not have it: then the API server is asked, as without the cache.
    fn pod_from_cache(
        &self,
        conf: &PluginConfig,
        k8s: &K8sArgs,
        lookup_time: &mut Duration,
    ) -> Option<Pod> {
        let t = Instant::now();
        let query = pod_cache::PodQuery {
            namespace: k8s.pod_namespace.clone(),
            name: k8s.pod_name.clone(),
            uid: k8s.pod_uid.clone(),
        };
        let socket = pod_cache::socket_path(std::path::Path::new(conf.run_dir()));
        let answer = pod_cache::ask(&socket, &query, pod_cache::CLIENT_TIMEOUT);
        *lookup_time += t.elapsed();
        let parsed = answer.map_err(|e| e.to_string()).and_then(|body| {
            Pod::from_json(&body).map_err(|e| format!("the cached pod is not a Pod: {e}"))
        });
        match parsed {
            Ok(pod) => {
                self.log
                    .borrow_mut()
                    .debug("pod from the node's pod cache", &[]);
                Some(pod)
            }
            Err(e) => {
                self.log.borrow_mut().debug(
                    "pod not from the node's pod cache, asking the API server",
                    &[("reason", json!(e))],
                );
                None
            }
        }
    }

    /// GET the pod, with Istio's bounded retry. The kubeconfig is re-read on every attempt so a
    /// token the installer rotates meanwhile is picked up.
    fn lookup_pod(
        &self,
        conf: &PluginConfig,
        k8s: &K8sArgs,
        api_time: &mut Duration,
    ) -> Result<Pod, CniError> {
        if !kube::valid_object_name(&k8s.pod_namespace) || !kube::valid_object_name(&k8s.pod_name) {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT_VARIABLES,
                format!(
                    "istio-cni: CNI_ARGS names pod {:?}/{:?}, which are not valid Kubernetes names",
                    k8s.pod_namespace, k8s.pod_name
                ),
                "",
            ));
        }
        if let Some(pod) = self.pod_from_cache(conf, k8s, api_time) {
            return Ok(pod);
        }
        let (attempts, interval) = conf.pod_retrieval();
        let path = conf.kubeconfig_path();
        let mut last = FetchError::Transport("no attempt made".into());
        let mut attempts_made = 0;
        for attempt in 1..=attempts {
            let t = Instant::now();
            let got = kube::load_kubeconfig(&path)
                .map_err(|e| FetchError::Config(e.to_string()))
                .and_then(|access| kube::get_pod(&access, &k8s.pod_namespace, &k8s.pod_name));
            *api_time += t.elapsed();
            match got {
                Ok(body) => {
                    return Pod::from_json(&body).map_err(|e| {
                        CniError::internal(format!(
                            "the API server's answer for pod {}/{} is not a Pod: {e}",
                            k8s.pod_namespace, k8s.pod_name
                        ))
                    });
                }
                Err(e) => {
                    self.log.borrow_mut().debug(
                        "failed to get pod info",
                        &[("attempt", json!(attempt)), ("error", json!(e.to_string()))],
                    );
                    let permanent = e.is_permanent();
                    last = e;
                    if permanent {
                        attempts_made = attempt;
                        break;
                    }
                }
            }
            attempts_made = attempt;
            if attempt < attempts {
                std::thread::sleep(interval);
            }
        }
        let transient = matches!(last, FetchError::Transport(_))
            || matches!(last, FetchError::Status(s, _) if s >= 500 || s == 429);
        self.log.borrow_mut().error(
            "failed to get pod info",
            &[
                ("attempts", json!(attempts_made)),
                ("error", json!(last.to_string())),
            ],
        );
        Err(CniError::new(
            if transient {
                code::TRY_AGAIN_LATER
            } else {
                code::INTERNAL
            },
            format!(
                "istio-cni: failed to get pod {}/{} from the Kubernetes API after {attempts_made} attempts: {last}",
                k8s.pod_namespace, k8s.pod_name
            ),
            format!("kubeconfig {path}"),
        ))
    }

    fn redirect_for(pod: &Pod) -> Result<Redirect, CniError> {
        let getenv = |k: &str| std::env::var(k).ok();
        redirect::from_pod(pod)
            .and_then(|mut r| redirect::apply_runtime_env(&mut r, &getenv).map(|()| r))
            .map_err(|e| {
                CniError::new(
                    code::INTERNAL,
                    format!(
                        "istio-cni: pod {}/{} has an invalid redirect setting: {e}",
                        pod.metadata.namespace, pod.metadata.name
                    ),
                    "",
                )
            })
    }

    /// Istio enables IPv6 rules when the pod's first address is IPv6, or with `ISTIO_DUAL_STACK`.
    fn ipv6_enabled(ips: &[IpAddr], r: &Redirect) -> bool {
        ips.first().is_some_and(IpAddr::is_ipv6)
            || (r.dual_stack && ips.iter().any(IpAddr::is_ipv6))
    }

    fn apply(
        &self,
        conf: &PluginConfig,
        netns_path: &str,
        r: &Redirect,
        ips: &[IpAddr],
    ) -> Result<Vec<(&'static str, Value)>, CniError> {
        let fail = |what: &dyn std::fmt::Display| {
            CniError::new(
                code::INTERNAL,
                format!(
                    "istio-cni: failed to apply the sidecar redirection in {netns_path}: {what}"
                ),
                "",
            )
        };
        let netns = Netns::open_with(netns_path, self.netns_entry)
            .map_err(|e| fail(&format_args!("open netns: {e}")))?;
        let v6 = Self::ipv6_enabled(ips, r);
        let mut timings = Vec::new();
        if conf.native_nftables {
            if v6 {
                routing::add_inbound_passthrough_v6(&netns).map_err(|e| fail(&e))?;
            }
            let set = nftables::build(r, v6);
            // The text is only made for a debug log.
            if self.log.borrow().enabled(Level::Debug) {
                self.log.borrow_mut().debug(
                    "nftables ruleset",
                    &[("rules", json!(set.transaction_text()))],
                );
            }
            let t = Instant::now();
            let cookie =
                nftables::netlink::apply_with_cookie(&netns, &set).map_err(|e| fail(&e))?;
            self.netns_cookie.set(cookie);
            timings.push(("backend", json!("nftables")));
            timings.push(("nftables_ms", ms(t.elapsed())));
            if r.mode == InterceptionMode::Tproxy {
                routing::add_tproxy_routing(&netns, v6).map_err(|e| fail(&e))?;
            }
            return Ok(timings);
        }
        let choice = conf.backend_choice()?;
        let b4 = iptables::choose_backend(&netns, choice, false).map_err(|e| fail(&e))?;
        let text4 = rules::restore_text(r, Family::V4);
        self.log.borrow_mut().debug(
            "iptables-restore input (IPv4)",
            &[("backend", json!(b4.name())), ("rules", json!(text4))],
        );
        let t4 = self
            .restore_once(&netns, b4, false, &text4)
            .map_err(|e| fail(&e))?;
        timings.push(("backend", json!(b4.name())));
        timings.push(("restore_v4_ms", ms(t4)));
        if self.log.borrow().enabled(Level::Debug) {
            // Istio logs the final state; it costs one more child, so only at debug.
            let state = iptables::save(&netns, b4, false).unwrap_or_else(|e| e.to_string());
            self.log
                .borrow_mut()
                .debug("final iptables state (IPv4)", &[("state", json!(state))]);
        }
        if v6 {
            routing::add_inbound_passthrough_v6(&netns).map_err(|e| fail(&e))?;
            let b6: Backend =
                iptables::choose_backend(&netns, choice, true).map_err(|e| fail(&e))?;
            let text6 = rules::restore_text(r, Family::V6);
            let t6 = self
                .restore_once(&netns, b6, true, &text6)
                .map_err(|e| fail(&e))?;
            timings.push(("restore_v6_ms", ms(t6)));
        }
        if r.mode == InterceptionMode::Tproxy {
            routing::add_tproxy_routing(&netns, v6).map_err(|e| fail(&e))?;
        }
        // For enrolling the pod, read while the netns is at hand (`None`: enrolling reads it).
        let cookie = netns.run(fastpath_pins::current_netns_cookie);
        self.netns_cookie.set(cookie.ok().and_then(Result::ok));
        Ok(timings)
    }

    /// Applies `text`, unless the netns already holds exactly these rules: a runtime that
    /// repeats ADD for the same sandbox gets success, as with Istio (which skips a "compatible
    /// residual configuration"). Checked only when the restore failed, so a fresh netns pays
    /// nothing for it.
    fn restore_once(
        &self,
        netns: &Netns,
        backend: Backend,
        v6: bool,
        text: &str,
    ) -> Result<Duration, iptables::RuleApplyError> {
        let err = match iptables::restore(netns, backend, v6, text) {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        let in_place = iptables::save(netns, backend, v6).is_ok_and(|saved| {
            iptables::missing_rules(&rules::rule_counts(text), &rules::rule_counts(&saved))
                .is_empty()
        });
        if in_place {
            self.log.borrow_mut().info(
                "the pod's redirection rules are already in place",
                &[("ipv6", json!(v6))],
            );
            Ok(Duration::ZERO)
        } else {
            Err(err)
        }
    }

    fn write_result(stdout: &mut dyn Write, result: &Value) -> Result<(), CniError> {
        let mut text = result.to_string();
        text.push('\n');
        stdout
            .write_all(text.as_bytes())
            .map_err(|e| CniError::new(code::IO_FAILURE, format!("writing the result: {e}"), ""))
    }

    fn add_inner(&self, args: &CmdArgs) -> Result<(Value, Outcome), CniError> {
        let (conf, k8s) = self.setup(args)?;
        // Converted first: a prevResult that cannot be passed on fails before any side effect.
        let out = result::output(conf.prev_result.as_ref(), args.cni_version)?;
        let mut api_time = Duration::ZERO;
        let pod = match self.mesh_pod(&conf, &k8s, &mut api_time)? {
            Selection::Skip(why) => return Ok((out, Outcome::PassThrough(why, api_time))),
            Selection::Mesh(p) => p,
        };
        let r = Self::redirect_for(&pod)?;
        let ips = self.pod_ips(&conf);
        let before_apply = Instant::now();
        let mut fields = self.apply(&conf, &args.netns, &r, &ips)?;
        let apply_time = before_apply.elapsed();
        let enrollment = accel::PodEnrollment {
            netns_path: &args.netns,
            namespace: &k8s.pod_namespace,
            name: &k8s.pod_name,
            container_id: &args.container_id,
            ips: ips.clone(),
            annotations: Some(&pod.metadata.annotations),
            run_dir: conf.run_dir(),
        };
        if let Err(e) = accel::enroll_with_cookie(&enrollment, self.netns_cookie.get()) {
            self.log.borrow_mut().warn(
                "pod is redirected but not accelerated",
                &[("error", json!(format!("{e:#}")))],
            );
        }
        fields.push(("api_ms", ms(api_time)));
        fields.push(("apply_ms", ms(apply_time)));
        fields.push(("total_ms", ms(self.started.elapsed())));
        self.log
            .borrow_mut()
            .info("sidecar redirection applied", &fields);
        Ok((out, Outcome::Redirected))
    }
}

impl Commands for IstioCni {
    fn add(&self, args: &CmdArgs, stdout: &mut dyn Write) -> Result<(), CniError> {
        match self.add_inner(args) {
            Ok((out, outcome)) => {
                if let Outcome::PassThrough(why, api_time) = outcome {
                    let total = ms(self.started.elapsed());
                    self.log.borrow_mut().info(
                        "no redirection for pod",
                        &[
                            ("reason", json!(why)),
                            ("api_ms", ms(api_time)),
                            ("total_ms", total),
                        ],
                    );
                }
                Self::write_result(stdout, &out)
            }
            Err(e) => {
                self.log
                    .borrow_mut()
                    .error("istio-cni ADD failed", &[("error", json!(e.to_string()))]);
                Err(e)
            }
        }
    }

    /// Nothing to undo in the netns (it goes with the pod); the accelerator forgets the pod.
    /// Idempotent, and works when the netns is gone.
    fn del(&self, args: &CmdArgs, _stdout: &mut dyn Write) -> Result<(), CniError> {
        // DEL must not fail on what ADD would refuse: a config or CNI_ARGS it cannot read
        // only costs the log context.
        let conf = match self.setup(args) {
            Ok((conf, _)) => conf,
            Err(_) => PluginConfig::parse(&args.stdin).unwrap_or_default(),
        };
        if conf.native_nftables {
            // The tables go with the netns; removed here too so a netns that outlives the pod
            // (or a runtime that reuses it) keeps no redirection. A netns already gone is fine.
            match Netns::open_with(&args.netns, self.netns_entry) {
                Ok(netns) => {
                    if let Err(e) = nftables::netlink::delete_tables(&netns) {
                        self.log.borrow_mut().warn(
                            "DEL: removing the nftables tables failed",
                            &[
                                ("netns", json!(args.netns)),
                                ("error", json!(e.to_string())),
                            ],
                        );
                    }
                }
                Err(e) => self.log.borrow_mut().debug(
                    "DEL: netns not open; nothing to remove",
                    &[
                        ("netns", json!(args.netns)),
                        ("error", json!(e.to_string())),
                    ],
                ),
            }
        } else {
            self.log.borrow_mut().debug(
                "DEL: nothing to undo in the pod netns",
                &[("netns", json!(args.netns))],
            );
        }
        if let Err(e) = accel::unenroll(&args.netns, &args.container_id, conf.run_dir()) {
            self.log.borrow_mut().warn(
                "accelerator unenroll failed",
                &[("error", json!(format!("{e:#}")))],
            );
        }
        Ok(())
    }

    /// Checks that a mesh pod's netns still holds the rules ADD applied.
    fn check(&self, args: &CmdArgs, _stdout: &mut dyn Write) -> Result<(), CniError> {
        let (conf, k8s) = self.setup(args)?;
        let mut api_time = Duration::ZERO;
        let pod = match self.mesh_pod(&conf, &k8s, &mut api_time)? {
            Selection::Skip(_) => return Ok(()),
            Selection::Mesh(p) => p,
        };
        let r = Self::redirect_for(&pod)?;
        let ips = self.pod_ips(&conf);
        let netns = Netns::open_with(&args.netns, self.netns_entry).map_err(|e| {
            CniError::new(
                code::INVALID_NETNS,
                format!("failed to open netns {:?}", args.netns),
                e.to_string(),
            )
        })?;
        let mut families = vec![Family::V4];
        if Self::ipv6_enabled(&ips, &r) {
            families.push(Family::V6);
        }
        let mut problems = Vec::new();
        if conf.native_nftables {
            let want = nftables::build(&r, families.contains(&Family::V6)).rule_counts();
            let have = nftables::netlink::rule_counts(&netns)
                .map_err(|e| CniError::internal(e.to_string()))?;
            for (table, chain, want) in want {
                let got = have
                    .iter()
                    .find(|(t, c, _)| *t == table && *c == chain)
                    .map_or(0, |e| e.2);
                if got != want {
                    problems.push(format!(
                        "nftables inet {table}/{chain}: {got} rules, expected {want}"
                    ));
                }
            }
            families.clear();
        }
        let choice = conf.backend_choice()?;
        for fam in families {
            let v6 = fam == Family::V6;
            let backend = iptables::choose_backend(&netns, choice, v6)
                .map_err(|e| CniError::internal(e.to_string()))?;
            let saved = iptables::save(&netns, backend, v6)
                .map_err(|e| CniError::internal(e.to_string()))?;
            let want = rules::rule_counts(&rules::restore_text(&r, fam));
            problems.extend(iptables::missing_rules(&want, &rules::rule_counts(&saved)));
        }
        if r.mode == InterceptionMode::Tproxy {
            let v6 = Self::ipv6_enabled(&ips, &r);
            problems.extend(
                routing::tproxy_routing_problems(&netns, v6)
                    .map_err(|e| CniError::internal(e.to_string()))?,
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                code::INTERNAL,
                format!(
                    "istio-cni CHECK: the sidecar redirection of pod {}/{} is not in place",
                    k8s.pod_namespace, k8s.pod_name
                ),
                problems.join("; "),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::tests::injected_pod;

    fn redirect(dual_stack: bool) -> Redirect {
        let mut v = injected_pod();
        if dual_stack {
            v["spec"]["containers"][1]["env"] =
                json!([{"name": "ISTIO_DUAL_STACK", "value": "true"}]);
        }
        redirect::from_pod(&Pod::from_json(v.to_string().as_bytes()).unwrap()).unwrap()
    }

    #[test]
    fn ipv6_rules_follow_istio() {
        let v4: IpAddr = "10.248.0.2".parse().unwrap();
        let v6: IpAddr = "fd00::2".parse().unwrap();
        // the first address decides; dual stack needs ISTIO_DUAL_STACK
        assert!(!IstioCni::ipv6_enabled(&[v4], &redirect(false)));
        assert!(IstioCni::ipv6_enabled(&[v6], &redirect(false)));
        assert!(IstioCni::ipv6_enabled(&[v6, v4], &redirect(false)));
        assert!(!IstioCni::ipv6_enabled(&[v4, v6], &redirect(false)));
        assert!(IstioCni::ipv6_enabled(&[v4, v6], &redirect(true)));
        assert!(!IstioCni::ipv6_enabled(&[], &redirect(true)));
    }
}
