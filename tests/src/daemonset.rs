//! The project's DaemonSet on a real container runtime: the image built from this tree, run by
//! containerd's CRI as a kubelet runs the pod `manifests/istio-cni-fastpath.yaml` describes,
//! on a throwaway node (CNI dirs, run dir, service account, a scratch bpffs directory), with
//! the fake API server standing in for the cluster.
//!
//! The pod spec is read from the manifest in code ([`InstallerSpec::from_manifest`]): every
//! field the test does not know how to run fails it, so the manifest and the product cannot
//! drift apart unnoticed.
use crate::cri::{Containerd, in_netns_output, pod_sandbox_config};
use crate::installer::Host;
use crate::kube_api::{FakeKubeApi, sidecar_pod};
use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The image built from this tree, and a second one (the same binaries, another image id) to
/// upgrade to.
pub const IMAGE: &str = "localhost/fastpath/install-cni:e2e";
pub const IMAGE_NEXT: &str = "localhost/fastpath/install-cni:e2e-next";
/// The manifest the DaemonSet comes from.
pub const MANIFEST: &str = "istio-cni-fastpath.yaml";
/// Where a kubelet mounts the pod's service account.
const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// What `cargo test` sets for the test it runs; a nested build must not see it (it would be
/// taken for the package's own settings).
fn scrub_cargo_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let from_cargo_test = k == "CARGO"
            || k == "LD_LIBRARY_PATH"
            || [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .iter()
            .any(|p| k.starts_with(p));
        if from_cargo_test {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd
}

fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let st = cmd
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .with_context(|| format!("spawn {cmd:?}"))?;
    if !st.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{cmd:?}: {st}; {}:\n{}", log.display(), tail.join("\n"));
    }
    Ok(())
}

/// The two images as docker archives, for `ctr images import`.
pub struct Images {
    pub first: PathBuf,
    pub second: PathBuf,
}

/// Builds the linux/amd64 image from this tree with `scripts/image.sh` (buildah, offline, from
/// the static binaries of `scripts/build-static.sh`), and a second image from it, both as
/// archives in `target/image/e2e/`. Cheap when nothing changed: the static build is cargo's
/// no-op, and the archives are reused while the binaries and the Dockerfile are those they
/// were made from.
pub fn images() -> Images {
    let _lock = crate::serial_guard("image");
    let root = workspace();
    let out = root.join("target/image/e2e");
    std::fs::create_dir_all(&out).unwrap();
    let log = out.join("build.log");
    let _ = std::fs::remove_file(&log);
    let started = Instant::now();
    // The static binaries: cargo rebuilds them only when the tree changed.
    run_logged(
        scrub_cargo_env(
            Command::new("bash")
                .arg(root.join("scripts/build-static.sh"))
                .arg("amd64")
                .current_dir(&root),
        ),
        &log,
    )
    .unwrap_or_else(|e| panic!("static build: {e:#}"));
    let context = root.join("target/image/linux/amd64");
    let mut stamp = String::new();
    for f in [
        context.join("install-cni"),
        context.join("istio-cni"),
        root.join("Dockerfile"),
    ] {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::hash::DefaultHasher::new();
        std::fs::read(&f)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
            .hash(&mut h);
        stamp.push_str(&format!("{} {:016x}\n", f.display(), h.finish()));
    }
    let images = Images {
        first: out.join("install-cni-e2e.tar"),
        second: out.join("install-cni-e2e-next.tar"),
    };
    let stamp_file = out.join("stamp");
    let fresh = std::fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp)
        && images.first.is_file()
        && images.second.is_file();
    if fresh {
        eprintln!(
            "images: reused {} ({:.1} s)",
            out.display(),
            started.elapsed().as_secs_f64()
        );
        return images;
    }
    let _ = std::fs::remove_file(&stamp_file);
    let build = || -> Result<()> {
        run_logged(
            scrub_cargo_env(
                Command::new("bash")
                    .arg(root.join("scripts/image.sh"))
                    .arg(IMAGE)
                    .env("FASTPATH_ARCHES", "amd64")
                    .current_dir(&root),
            ),
            &log,
        )?;
        let built = format!("{IMAGE}-amd64");
        let buildah = |args: &[&str]| run_logged(Command::new("buildah").args(args), &log);
        for f in [&images.first, &images.second] {
            let _ = std::fs::remove_file(f);
        }
        buildah(&[
            "push",
            "--quiet",
            &built,
            &format!("docker-archive:{}:{IMAGE}", images.first.display()),
        ])?;
        // The second image: the same binaries under another image id, as a new release's
        // image would be.
        let work = format!("fastpath-e2e-next-{}", std::process::id());
        let _ = Command::new("buildah").args(["rm", &work]).output();
        let _ = Command::new("buildah").args(["rmi", IMAGE_NEXT]).output();
        buildah(&["from", "--pull=never", "--name", &work, &built])?;
        buildah(&["config", "--label", "io.fastpath.test/generation=2", &work])?;
        buildah(&["commit", "--rm", "--quiet", &work, IMAGE_NEXT])?;
        buildah(&[
            "push",
            "--quiet",
            IMAGE_NEXT,
            &format!("docker-archive:{}:{IMAGE_NEXT}", images.second.display()),
        ])?;
        Ok(())
    };
    build().unwrap_or_else(|e| panic!("image build: {e:#}"));
    std::fs::write(&stamp_file, stamp).unwrap();
    eprintln!(
        "images: built {} in {:.1} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    images
}

/// Where the DaemonSet's hostPaths are on the test's node.
pub struct NodePaths {
    pub cni_bin: PathBuf,
    pub cni_net: PathBuf,
    pub run: PathBuf,
    pub bpffs: PathBuf,
    pub service_account: PathBuf,
    /// The host's cgroup v2 root, mounted into the agent's container for it, when the node
    /// needs that (see [`hybrid_cgroup_root`]).
    pub cgroup_root: Option<PathBuf>,
}

/// Where the agent's container gets the host's cgroup v2 root on a hybrid node.
const CGROUP_ROOT_MOUNT: &str = "/host/sys/fs/cgroup/unified";

/// The host's cgroup v2 root on a node with cgroup v1 controllers and the v2 hierarchy beside
/// them (hybrid, as this VM: cgroup2 at /sys/fs/cgroup/unified); `None` on a node with the
/// unified hierarchy at /sys/fs/cgroup.
///
/// On a hybrid node containerd runs containers with cgroup v1, in the node's cgroup
/// namespace, and their /sys/fs/cgroup holds the v1 hierarchies only. The agent then takes
/// the host's cgroup v2 from /host/proc/1/mounts, through /host/proc/1/root. On this VM the
/// host's /proc/1/root cannot be reached at all (its init refuses even root: EACCES), so the
/// test mounts the host's cgroup v2 root into the container and points FASTPATH_CGROUP_ROOT at
/// it, the documented knob for such nodes, the only setting it adds to the manifest's.
pub fn hybrid_cgroup_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let v2 = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_string())
    })?;
    (v2 != "/sys/fs/cgroup").then(|| PathBuf::from(v2))
}

impl NodePaths {
    /// The test's stand-in for a hostPath of the manifest; `None` for one it has none for.
    fn host_path(&self, path: &str) -> Option<PathBuf> {
        Some(match path {
            "/opt/cni/bin" => self.cni_bin.clone(),
            "/etc/cni/net.d" => self.cni_net.clone(),
            "/var/run/istio-cni" => self.run.clone(),
            "/sys/fs/bpf" => self.bpffs.clone(),
            // Read-only, and what the agent finds the host's cgroup root and pods through.
            "/proc" => PathBuf::from("/proc"),
            _ => return None,
        })
    }
}

/// Who a DaemonSet pod is.
pub struct PodIdentity {
    pub name: String,
    pub uid: String,
    pub node: String,
    pub api_host: String,
    pub api_port: u16,
}

/// The installer's pod as the manifest describes it, mapped onto the test's node.
pub struct InstallerSpec {
    /// The DaemonSet object (with a uid), as the API serves it.
    pub daemonset: Value,
    pub namespace: String,
    pub name: String,
    pub host_network: bool,
    /// `terminationGracePeriodSeconds`: what a kubelet gives StopContainer.
    pub grace_s: u64,
    /// The readiness probe's path and port.
    pub readiness: (String, u16),
    /// The Prometheus port (the container port `metrics`, the scrape annotation's).
    pub metrics_port: u16,
    template: Value,
    container: Value,
    config_map_env: Vec<(String, String)>,
}

/// A value of the manifest that must be a string.
fn s(v: &Value, what: &str) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: not a string: {v}"))
        .to_string()
}

/// Fails on a key of `obj` the test does not know what to do with.
fn only_keys(obj: &Value, what: &str, known: &[&str]) {
    let map = obj
        .as_object()
        .unwrap_or_else(|| panic!("{what} is not a mapping: {obj}"));
    for k in map.keys() {
        assert!(
            known.contains(&k.as_str()),
            "{what}.{k}: the DaemonSet test does not know how to run this field of {MANIFEST} \
             (teach tests/src/daemonset.rs, or the manifest drifted from what is tested)"
        );
    }
}

impl InstallerSpec {
    /// Reads the DaemonSet `istio-cni-node` and its ConfigMap from the manifest.
    pub fn from_manifest() -> InstallerSpec {
        Self::from_objects(&crate::manifest::objects(MANIFEST))
    }

    /// [`InstallerSpec::from_manifest`] from the manifest's objects.
    pub fn from_objects(objs: &[Value]) -> InstallerSpec {
        let mut ds = crate::manifest::find(objs, "DaemonSet", "istio-cni-node").clone();
        ds["metadata"]["uid"] = json!("uid-ds-istio-cni-node");
        let namespace = s(&ds["metadata"]["namespace"], "DaemonSet namespace");
        let name = s(&ds["metadata"]["name"], "DaemonSet name");
        let template = ds["spec"]["template"].clone();
        let pod = &template["spec"];
        only_keys(
            pod,
            "spec.template.spec",
            &[
                "nodeSelector",
                "tolerations",
                "priorityClassName",
                "serviceAccountName",
                "terminationGracePeriodSeconds",
                "containers",
                "volumes",
                "hostNetwork",
            ],
        );
        let containers = pod["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 1, "one container in the DaemonSet's pod");
        let c = containers[0].clone();
        only_keys(
            &c,
            "containers[0]",
            &[
                "name",
                "image",
                "command",
                "args",
                "ports",
                "readinessProbe",
                "securityContext",
                "envFrom",
                "env",
                "volumeMounts",
                "resources",
            ],
        );
        let image = s(&c["image"], "image");
        let repo = image.rsplit_once(':').map_or(image.as_str(), |(r, _)| r);
        assert!(
            repo.ends_with("/install-cni"),
            "the manifest's image {image} is not the install-cni image this test builds"
        );
        let host_network = pod["hostNetwork"].as_bool().unwrap_or(false);
        let grace_s = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        let ports = c["ports"].as_array().cloned().unwrap_or_default();
        let port_named = |name: &str| {
            ports
                .iter()
                .find(|p| p["name"] == name)
                .and_then(|p| p["containerPort"].as_u64())
                .map(|p| p as u16)
        };
        let probe = &c["readinessProbe"]["httpGet"];
        assert!(
            probe.is_object(),
            "the readiness probe is not an httpGet: {}",
            c["readinessProbe"]
        );
        let probe_port = match &probe["port"] {
            Value::Number(n) => n.as_u64().unwrap() as u16,
            Value::String(n) => port_named(n).unwrap_or_else(|| panic!("no port named {n}")),
            other => panic!("readiness probe port {other}"),
        };
        let metrics_port = port_named("metrics").expect("a container port named metrics");
        let scrape = &template["metadata"]["annotations"]["prometheus.io/port"];
        assert_eq!(
            scrape.as_str(),
            Some(metrics_port.to_string().as_str()),
            "the scrape annotation's port is the metrics port"
        );
        let mut config_map_env = Vec::new();
        for from in c["envFrom"].as_array().cloned().unwrap_or_default() {
            only_keys(&from, "envFrom[]", &["configMapRef"]);
            let cm_name = s(&from["configMapRef"]["name"], "configMapRef.name");
            let cm = crate::manifest::find(objs, "ConfigMap", &cm_name);
            assert_eq!(cm["metadata"]["namespace"], namespace.as_str());
            for (k, v) in cm["data"].as_object().expect("ConfigMap data") {
                config_map_env.push((k.clone(), s(v, k)));
            }
        }
        InstallerSpec {
            namespace,
            name,
            host_network,
            grace_s,
            readiness: (
                probe["path"].as_str().unwrap_or("/").to_string(),
                probe_port,
            ),
            metrics_port,
            template,
            container: c,
            config_map_env,
            daemonset: ds,
        }
    }

    pub fn daemonset_path(&self) -> String {
        format!(
            "/apis/apps/v1/namespaces/{}/daemonsets/{}",
            self.namespace, self.name
        )
    }

    /// The node object: labelled so that the DaemonSet's nodeSelector selects it.
    pub fn node_object(&self, node: &str) -> Value {
        let labels = self.template["spec"]["nodeSelector"].clone();
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": node, "labels": if labels.is_null() { json!({}) } else { labels }}})
    }

    /// The pod the DaemonSet controller makes for `who`, as the API serves it.
    pub fn pod_object(&self, who: &PodIdentity) -> Value {
        let mut spec = self.template["spec"].clone();
        spec["nodeName"] = json!(who.node);
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": who.name, "namespace": self.namespace, "uid": who.uid,
                            "labels": self.template["metadata"]["labels"],
                            "annotations": self.template["metadata"]["annotations"],
                            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                                 "name": self.name,
                                                 "uid": self.daemonset["metadata"]["uid"],
                                                 "controller": true, "blockOwnerDeletion": true}]},
               "spec": spec})
    }

    /// The PodSandboxConfig a kubelet sends for the pod.
    pub fn sandbox_config(&self, who: &PodIdentity, log_dir: &Path) -> Value {
        json!({
            "metadata": {"name": who.name, "uid": who.uid, "namespace": self.namespace, "attempt": 0},
            "hostname": if self.host_network { who.node.clone() } else { who.name.clone() },
            "logDirectory": log_dir,
            "labels": self.template["metadata"]["labels"],
            "annotations": self.template["metadata"]["annotations"],
            "linux": {"securityContext": {"namespaceOptions": {
                "network": if self.host_network { "NODE" } else { "POD" }}}}
        })
    }

    /// The environment: the ConfigMap's, the container's (downward API resolved for `who`),
    /// and the API service's, as a kubelet sets them.
    pub fn env(&self, who: &PodIdentity, paths: &NodePaths) -> Vec<(String, String)> {
        let mut env = self.config_map_env.clone();
        let mut set = |k: &str, v: String| {
            env.retain(|(n, _)| n != k);
            env.push((k.to_string(), v));
        };
        for e in self.container["env"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let name = s(&e["name"], "env name");
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else {
                match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("spec.nodeName") => who.node.clone(),
                    Some("metadata.name") => who.name.clone(),
                    Some("metadata.namespace") => self.namespace.clone(),
                    other => panic!("env {name}: the test has no value for {other:?}: {e}"),
                }
            };
            set(&name, value);
        }
        set("KUBERNETES_SERVICE_HOST", who.api_host.clone());
        set("KUBERNETES_SERVICE_PORT", who.api_port.to_string());
        set("KUBERNETES_SERVICE_PORT_HTTPS", who.api_port.to_string());
        set(
            "KUBERNETES_PORT",
            format!("tcp://{}:{}", who.api_host, who.api_port),
        );
        // The run dir holds the plugin's kubeconfig, whose path the agent writes into the
        // plugin's config: the product needs it at the same path in the container and on the
        // host (the manifest mounts /var/run/istio-cni at /var/run/istio-cni). The test's run
        // dir is elsewhere on the host, so it is mounted at its own path and the agent told.
        set("CNI_AGENT_RUN_DIR", paths.run.display().to_string());
        if paths.cgroup_root.is_some() {
            set("FASTPATH_CGROUP_ROOT", CGROUP_ROOT_MOUNT.to_string());
        }
        env
    }

    /// The mounts: the manifest's hostPath volumes on the test's stand-ins, and the service
    /// account.
    pub fn mounts(&self, paths: &NodePaths) -> Vec<Value> {
        let volumes = self.template["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut mounts = Vec::new();
        for vm in self.container["volumeMounts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            only_keys(&vm, "volumeMounts[]", &["mountPath", "name", "readOnly"]);
            let name = s(&vm["name"], "volumeMount name");
            let vol = volumes
                .iter()
                .find(|v| v["name"] == name.as_str())
                .unwrap_or_else(|| panic!("no volume {name}"));
            only_keys(vol, "volumes[]", &["name", "hostPath"]);
            let host = s(&vol["hostPath"]["path"], "hostPath.path");
            let mut container_path = s(&vm["mountPath"], "mountPath");
            let on_node = paths.host_path(&host).unwrap_or_else(|| {
                panic!("hostPath {host}: the test has no throwaway stand-in for it")
            });
            match vol["hostPath"]["type"].as_str() {
                None | Some("") => {}
                Some("Directory") => assert!(on_node.is_dir(), "{} missing", on_node.display()),
                Some("DirectoryOrCreate") => std::fs::create_dir_all(&on_node).unwrap(),
                Some(t) => panic!("hostPath type {t} of {name}"),
            }
            if host == "/var/run/istio-cni" {
                assert_eq!(
                    container_path, host,
                    "the run dir must be at the same path in the container and on the host"
                );
                container_path = on_node.display().to_string();
            }
            mounts.push(json!({"containerPath": container_path, "hostPath": on_node,
                               "readonly": vm["readOnly"].as_bool().unwrap_or(false)}));
        }
        assert!(
            self.template["spec"]["serviceAccountName"].is_string(),
            "the pod runs as a service account"
        );
        mounts.push(json!({"containerPath": SERVICE_ACCOUNT_MOUNT,
                           "hostPath": paths.service_account, "readonly": true}));
        if let Some(root) = &paths.cgroup_root {
            mounts.push(json!({"containerPath": CGROUP_ROOT_MOUNT, "hostPath": root,
                               "readonly": true}));
        }
        mounts
    }

    /// The container's security context, as a kubelet turns the manifest's into CRI's.
    fn security_context(&self) -> Value {
        let sc = &self.container["securityContext"];
        only_keys(
            sc,
            "securityContext",
            &[
                "privileged",
                "runAsGroup",
                "runAsUser",
                "runAsNonRoot",
                "capabilities",
            ],
        );
        only_keys(&sc["capabilities"], "capabilities", &["add", "drop"]);
        let uid = sc["runAsUser"].as_i64();
        assert!(
            !(sc["runAsNonRoot"].as_bool() == Some(true) && uid.unwrap_or(0) == 0),
            "a kubelet refuses runAsNonRoot with uid 0"
        );
        let container = s(&self.container["name"], "container name");
        let apparmor = self.template["metadata"]["annotations"]
            [format!("container.apparmor.security.beta.kubernetes.io/{container}")]
        .as_str()
        .map(|p| match p {
            "unconfined" => "Unconfined",
            "runtime/default" => "RuntimeDefault",
            other => panic!("AppArmor profile {other}"),
        })
        .unwrap_or("RuntimeDefault");
        let mut out = json!({
            "privileged": sc["privileged"].as_bool().unwrap_or(false),
            "capabilities": {"addCapabilities": sc["capabilities"]["add"],
                             "dropCapabilities": sc["capabilities"]["drop"]},
            "namespaceOptions": {"network": if self.host_network { "NODE" } else { "POD" },
                                 "pid": "CONTAINER", "ipc": "POD"},
            // A kubelet without --seccomp-default runs a pod without a seccompProfile so.
            "seccomp": {"profileType": "Unconfined"},
            "seccompProfilePath": "unconfined",
            "apparmor": {"profileType": apparmor},
        });
        if apparmor == "Unconfined" {
            out["apparmorProfile"] = json!("unconfined");
        }
        if let Some(u) = uid {
            out["runAsUser"] = json!({"value": u});
        }
        if let Some(g) = sc["runAsGroup"].as_i64() {
            out["runAsGroup"] = json!({"value": g});
        }
        out
    }

    /// The ContainerConfig of attempt `attempt` of the container, from `image`.
    pub fn container_config(
        &self,
        who: &PodIdentity,
        paths: &NodePaths,
        image: &str,
        attempt: u32,
    ) -> Value {
        let name = s(&self.container["name"], "container name");
        let envs: Vec<Value> = self
            .env(who, paths)
            .into_iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect();
        json!({
            "metadata": {"name": name, "attempt": attempt},
            "image": {"image": image},
            "command": self.container["command"],
            "args": self.container["args"],
            "envs": envs,
            "mounts": self.mounts(paths),
            "labels": {"io.kubernetes.container.name": name},
            "logPath": format!("{name}/{attempt}.log"),
            "linux": {"securityContext": self.security_context()}
        })
    }
}

/// One pod of the DaemonSet on the node: its sandbox and its container's attempts.
pub struct InstallerPod {
    pub who: PodIdentity,
    pub sandbox: String,
    pub sandbox_config: Value,
    pub log_dir: PathBuf,
    /// Where the probes reach it (the pod IP, or the node's loopback with host network).
    pub ip: std::net::IpAddr,
    /// The current container and its attempt.
    pub container: String,
    pub attempt: u32,
    pub image: String,
}

/// Strips the CRI log format (`<time> <stream> <P|F> <text>`) from a container log.
pub fn cri_log_text(raw: &str) -> String {
    let mut out = String::new();
    for line in raw.lines() {
        let mut parts = line.splitn(4, ' ');
        let (_, _, tag, text) = (parts.next(), parts.next(), parts.next(), parts.next());
        out.push_str(text.unwrap_or(""));
        if tag != Some("P") {
            out.push('\n');
        }
    }
    out
}

/// The test's node: containerd with the CNI dirs the DaemonSet installs into, the fake API
/// on the pod network's gateway, a scratch bpffs directory for the pins, the locks of the
/// node-wide resources it uses. Everything is removed on drop (containerd stops every pod
/// first; the scratch pin dir's removal detaches whatever an agent left attached).
pub struct Node {
    // Field order is drop order.
    pub ctrd: Containerd,
    pub api: FakeKubeApi,
    pub host: Host,
    pub paths: NodePaths,
    pub node_name: String,
    pub gateway: Ipv4Addr,
    pub subnet: String,
    _bridge: BridgeGuard,
    pins: crate::ScratchBpffsDir,
    _locks: (std::fs::File, std::fs::File),
}

struct BridgeGuard(String);

impl Drop for BridgeGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

impl Node {
    /// `subnet`: the pod network's /24 as `a.b.c` (the gateway is `a.b.c.1`).
    pub fn start(tag: &str, subnet: &str, token: &str, images: &Images) -> Node {
        let containerd_lock = crate::serial_guard("containerd");
        let accel_lock = crate::serial_guard("cgroup-sockops");
        crate::ensure_bpffs();
        let pins = crate::ScratchBpffsDir::new(tag);
        let host = Host::new(tag);
        let paths = NodePaths {
            cni_bin: host.bin.clone(),
            cni_net: host.net.clone(),
            run: host.run.clone(),
            bpffs: pins.path().to_path_buf(),
            service_account: host.sa.clone(),
            cgroup_root: hybrid_cgroup_root(),
        };
        for p in ["loopback", "bridge", "host-local"] {
            std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(p), paths.cni_bin.join(p))
                .unwrap();
        }
        // The bridge up front, with the gateway address the bridge plugin gives it, so that
        // the API server can listen there before the first pod: pods reach it there as they
        // reach a cluster's API service, and so does the plugin on the node.
        let bridge = crate::unique_name("fpds");
        let guard = BridgeGuard(bridge.clone());
        let gateway: Ipv4Addr = format!("{subnet}.1").parse().unwrap();
        for args in [
            vec!["link", "add", &bridge, "type", "bridge"],
            vec!["addr", "add", &format!("{gateway}/24"), "dev", &bridge],
            vec!["link", "set", &bridge, "up"],
        ] {
            crate::netns::run(Command::new("ip").args(&args)).unwrap();
        }
        let api = FakeKubeApi::start_on(&host.root.join("api"), token, gateway.into()).unwrap();
        host.set_service_account(token, &api.ca_pem);
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "plugins": [
                {"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
                 "ipam": {"type": "host-local", "dataDir": host.root.join("ipam"),
                          "ranges": [[{"subnet": format!("{subnet}.0/24"), "gateway": gateway}]]}}
            ]
        });
        host.write("10-k8s-pod-network.conflist", &conflist.to_string());
        // The plugin containerd runs finds the pins where the agent's bpffs mount puts them.
        let pin_dir = paths.bpffs.join(fastpath_common::PIN_DIR_NAME);
        let ctrd = Containerd::start_with_env(
            &host.root.join("containerd"),
            &paths.cni_bin,
            &paths.cni_net,
            &[(
                fastpath_cni_plugin::accel::PIN_DIR_ENV,
                pin_dir.to_str().unwrap(),
            )],
        )
        .expect("start containerd");
        for image in [&images.first, &images.second] {
            ctrd.import_image(image)
                .unwrap_or_else(|e| panic!("import {}: {e:#}", image.display()));
        }
        Node {
            ctrd,
            api,
            host,
            paths,
            node_name: format!("node-{tag}"),
            gateway,
            subnet: subnet.to_string(),
            _bridge: guard,
            pins,
            _locks: (containerd_lock, accel_lock),
        }
    }

    /// The pin directory as the host sees it.
    pub fn pin_dir(&self) -> PathBuf {
        self.pins.path().join(fastpath_common::PIN_DIR_NAME)
    }

    /// The accelerator's settings as seen from the host (for its counters and maps).
    pub fn accel_settings(&self) -> fastpath_installer::accel::AccelSettings {
        let mut s = fastpath_installer::accel::AccelSettings::defaults();
        s.bpffs = PathBuf::from("/sys/fs/bpf");
        s.pin_dir = self.pin_dir();
        s.run_dir = self.paths.run.clone();
        s
    }

    /// Summed counters of the pod `ns/name` (zero when it has none).
    pub fn pod_stats(&self, ns: &str, name: &str) -> fastpath_common::PodStats {
        let mut sum = fastpath_common::PodStats::default();
        for c in fastpath_installer::accel::pod_counters(&self.accel_settings()).unwrap_or_default()
        {
            if c.namespace.as_deref() == Some(ns) && c.name.as_deref() == Some(name) {
                sum.connections_paired += c.stats.connections_paired;
                sum.bytes_redirected += c.stats.bytes_redirected;
                sum.msgs_redirected += c.stats.msgs_redirected;
                sum.sockets_enrolled += c.stats.sockets_enrolled;
                sum.queue_demotions += c.stats.queue_demotions;
            }
        }
        sum
    }

    pub fn identity(&self, name: &str) -> PodIdentity {
        PodIdentity {
            name: name.to_string(),
            uid: format!("uid-{name}"),
            node: self.node_name.clone(),
            api_host: self.gateway.to_string(),
            api_port: self.api.addr.port(),
        }
    }

    /// What the DaemonSet controller and a kubelet do for a new pod of the DaemonSet: the
    /// pod object in the API, its sandbox, its container from `image`, started.
    pub fn run_installer(&self, spec: &InstallerSpec, name: &str, image: &str) -> InstallerPod {
        let who = self.identity(name);
        self.api.set_pod(spec.pod_object(&who));
        let log_dir = self
            .host
            .root
            .join("pod-logs")
            .join(format!("{}_{}_{}", spec.namespace, who.name, who.uid));
        std::fs::create_dir_all(&log_dir).unwrap();
        let sandbox_config = spec.sandbox_config(&who, &log_dir);
        let sandbox = self
            .ctrd
            .run_pod(&sandbox_config)
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e:#}\n{}", self.ctrd.log()));
        let ip = if spec.host_network {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            let status = self.ctrd.inspect_pod(&sandbox).unwrap();
            status["network"]["ip"]
                .as_str()
                .and_then(|ip| ip.parse().ok())
                .unwrap_or_else(|| panic!("no pod IP: {status}"))
        };
        let mut pod = InstallerPod {
            who,
            sandbox,
            sandbox_config,
            log_dir,
            ip,
            container: String::new(),
            attempt: 0,
            image: image.to_string(),
        };
        self.start_container(spec, &mut pod, 0);
        pod
    }

    fn start_container(&self, spec: &InstallerSpec, pod: &mut InstallerPod, attempt: u32) {
        let config = spec.container_config(&pod.who, &self.paths, &pod.image, attempt);
        let id = self
            .ctrd
            .create_container(&pod.sandbox, &config, &pod.sandbox_config)
            .unwrap_or_else(|e| panic!("CreateContainer: {e:#}\n{}", self.ctrd.log()));
        self.ctrd
            .start_container(&id)
            .unwrap_or_else(|e| panic!("StartContainer: {e:#}\n{}", self.ctrd.log()));
        pod.container = id;
        pod.attempt = attempt;
    }

    /// A kubelet restarting the container after it died: the next attempt in the same
    /// sandbox (the dead one removed).
    pub fn restart_installer(&self, spec: &InstallerSpec, pod: &mut InstallerPod) {
        let dead = pod.container.clone();
        self.ctrd.remove_container(&dead).unwrap();
        self.start_container(spec, pod, pod.attempt + 1);
    }

    /// The current container's log (its output, without the CRI framing).
    pub fn installer_log(&self, pod: &InstallerPod) -> String {
        let path = pod
            .log_dir
            .join("install-cni")
            .join(format!("{}.log", pod.attempt));
        cri_log_text(&std::fs::read_to_string(path).unwrap_or_default())
    }

    /// `state`, `exitCode`... of the current container.
    pub fn installer_status(&self, pod: &InstallerPod) -> Value {
        self.ctrd.inspect_container(&pod.container).unwrap()
    }

    /// Polls `cond` until it holds; fails with the agent's log after `PATIENCE` or when its
    /// container is no longer running.
    pub fn wait_installer(&self, pod: &InstallerPod, what: &str, cond: impl Fn() -> bool) {
        let start = Instant::now();
        loop {
            if cond() {
                return;
            }
            let st = self.installer_status(pod);
            if st["state"] != "CONTAINER_RUNNING" {
                panic!(
                    "the installer container is {} (exit code {}) while waiting for {what}; log:\n{}",
                    st["state"],
                    st["exitCode"],
                    self.installer_log(pod)
                );
            }
            if start.elapsed() > crate::installer::PATIENCE {
                panic!(
                    "timed out waiting for {what}; log:\n{}",
                    self.installer_log(pod)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the readiness probe the manifest declares passes.
    pub fn wait_ready(&self, spec: &InstallerSpec, pod: &InstallerPod) {
        self.wait_installer(pod, "the readiness probe", || {
            matches!(
                probe(pod.ip, spec.readiness.1, &spec.readiness.0),
                Some((200, _))
            )
        });
    }

    /// The agent's /metrics, on the manifest's metrics port.
    pub fn metrics(&self, spec: &InstallerSpec, pod: &InstallerPod) -> String {
        probe(pod.ip, spec.metrics_port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// StopContainer with `grace_s` (SIGTERM first; SIGKILL at once with 0); returns the
    /// container's status afterwards.
    pub fn stop_installer(&self, pod: &InstallerPod, grace_s: u64) -> Value {
        self.ctrd
            .stop_container(&pod.container, grace_s)
            .unwrap_or_else(|e| panic!("StopContainer: {e:#}"));
        self.installer_status(pod)
    }

    /// Deletes the DaemonSet's pod: its sandbox and its object.
    pub fn delete_installer_pod(&self, spec: &InstallerSpec, pod: &InstallerPod) {
        self.ctrd.stop_pod(&pod.sandbox).unwrap();
        self.ctrd.remove_pod(&pod.sandbox).unwrap();
        self.api.remove_pod(&spec.namespace, &pod.who.name);
    }

    /// What creates and deletes application pods (shareable with other threads).
    pub fn pods(&self) -> Pods<'_> {
        Pods {
            ctrd: &self.ctrd,
            api: &self.api,
            node_name: &self.node_name,
            log_dir: self.host.root.join("pod-logs"),
        }
    }

    /// An application pod (`sidecar`: Istio-injected) through RunPodSandbox.
    pub fn run_app_pod(&self, ns: &str, name: &str, sidecar: bool) -> Result<AppPod> {
        self.pods().run(ns, name, sidecar)
    }

    /// StopPodSandbox and RemovePodSandbox, as a kubelet deletes a pod.
    pub fn delete_app_pod(&self, pod: &AppPod) -> Result<()> {
        self.pods().delete(pod)
    }
}

/// Application pods on the node: the pod object in the API, the sandbox through CRI.
pub struct Pods<'a> {
    ctrd: &'a Containerd,
    api: &'a FakeKubeApi,
    node_name: &'a str,
    log_dir: PathBuf,
}

impl Pods<'_> {
    /// A pod (`sidecar`: Istio-injected) through RunPodSandbox.
    pub fn run(&self, ns: &str, name: &str, sidecar: bool) -> Result<AppPod> {
        let mut obj = if sidecar {
            sidecar_pod(ns, name, &[], &[])
        } else {
            crate::kube_api::plain_pod(ns, name)
        };
        obj["spec"]["nodeName"] = json!(self.node_name);
        self.api.set_pod(obj);
        let id = self
            .ctrd
            .run_pod(&pod_sandbox_config(ns, name, &self.log_dir))?;
        let status = self.ctrd.inspect_pod(&id)?;
        if status["state"] != "SANDBOX_READY" {
            bail!("sandbox {ns}/{name} is not ready: {status}");
        }
        let ip = status["network"]["ip"]
            .as_str()
            .and_then(|ip| ip.parse().ok())
            .with_context(|| format!("no IP: {status}"))?;
        Ok(AppPod {
            ns: ns.to_string(),
            name: name.to_string(),
            id,
            netns: s(&status["netnsPath"], "netnsPath"),
            ip,
        })
    }

    /// StopPodSandbox and RemovePodSandbox, as a kubelet deletes a pod.
    pub fn delete(&self, pod: &AppPod) -> Result<()> {
        self.ctrd.stop_pod(&pod.id)?;
        self.ctrd.remove_pod(&pod.id)?;
        self.api.remove_pod(&pod.ns, &pod.name);
        Ok(())
    }
}

/// A GET to `ip:port` (the kubelet's probe, Prometheus' scrape).
pub fn probe(ip: std::net::IpAddr, port: u16, path: &str) -> Option<(u16, String)> {
    crate::installer::http_get_at(SocketAddr::new(ip, port), path)
}

/// The sum of one per-pod metric family's series for the pod `ns/name`, if it has any.
pub fn pod_metric(metrics: &str, family: &str, ns: &str, name: &str) -> Option<f64> {
    let (want_ns, want_pod) = (format!("namespace=\"{ns}\""), format!("pod=\"{name}\""));
    let mut found = None;
    for l in metrics.lines() {
        let Some(rest) = l.strip_prefix(family).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let labels: Vec<&str> = labels.split(',').collect();
        if labels.contains(&want_ns.as_str()) && labels.contains(&want_pod.as_str()) {
            let v: f64 = value.trim().parse().unwrap_or(f64::NAN);
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// A pod an application runs in.
pub struct AppPod {
    pub ns: String,
    pub name: String,
    pub id: String,
    pub netns: String,
    pub ip: Ipv4Addr,
}

impl AppPod {
    /// Istio's sidecar rules in the pod (`iptables-nft-save` shows the redirects).
    pub fn redirected(&self) -> bool {
        let saved = in_netns_output(&self.netns, &["iptables-nft-save"]);
        saved.contains("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001")
            && saved.contains("-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006")
    }

    /// The sidecar's outbound listener (15001), in the pod.
    pub fn sidecar_outbound(&self) -> TcpListener {
        crate::accel::in_netns(&self.netns, || {
            TcpListener::bind("0.0.0.0:15001").expect("bind 15001")
        })
    }

    /// The app dials `dst`; the redirect takes it to the pod's sidecar on `outbound`. Returns
    /// (app side, sidecar side), after checking the sidecar sees `dst` as the original
    /// destination.
    pub fn dial_through_sidecar(
        &self,
        outbound: &TcpListener,
        dst: SocketAddr,
    ) -> (TcpStream, TcpStream) {
        let app = crate::accel::in_netns(&self.netns, || {
            TcpStream::connect_timeout(&dst, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("{}: connect {dst}: {e}", self.name))
        });
        let (sidecar, _) = outbound.accept().unwrap();
        let original = crate::sidecar::original_dst(&sidecar).expect("SO_ORIGINAL_DST");
        assert_eq!(
            SocketAddr::V4(original),
            dst,
            "the sidecar got the app's connection by redirection"
        );
        (app, sidecar)
    }
}

/// The byte at `offset` of every test stream: a stream that lost, repeated or reordered a
/// byte anywhere does not match from there on.
fn stream_byte(offset: u64) -> u8 {
    let x = (offset / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (offset >> 20);
    (x >> (8 * (offset % 8))) as u8
}

/// A one-way transfer on a connection that runs until [`Stream::finish`]: the writer writes
/// [`stream_byte`]s in chunks, the reader checks every byte as it arrives.
/// How far a [`Stream`]'s writer may get ahead of its reader before it writes another 64 KiB
/// chunk: so that the unread bytes (at most this and one chunk, 160 KiB) stay below the
/// bound past which a connection leaves the fast path, however slowly the reader gets the
/// CPU. That bound is the reader's backlog room, and the app's sidecar, reached through the
/// redirect, has the smallest: 168 KiB (docs/accelerator.md, *The backlog room*). Bytes read
/// after a moment may have been written (and counted) up to this much before it.
pub const STREAM_AHEAD: u64 = 96 << 10;

/// Dropped unfinished (a test failed), it stops: the writer half-closes, the reader ends.
pub struct Stream {
    stop: Arc<AtomicBool>,
    read: Arc<AtomicU64>,
    threads: Option<(Writer, Reader)>,
}

type Writer = std::thread::JoinHandle<std::io::Result<(TcpStream, u64)>>;
type Reader = std::thread::JoinHandle<Result<(TcpStream, u64), String>>;

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Stream {
    pub fn start(mut from: TcpStream, mut to: TcpStream) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let read = Arc::new(AtomicU64::new(0));
        let writer = {
            let (stop, read) = (stop.clone(), read.clone());
            std::thread::spawn(move || {
                const CHUNK: u64 = 64 << 10;
                let mut off = 0u64;
                let mut buf = vec![0u8; CHUNK as usize];
                while !stop.load(Ordering::SeqCst) {
                    if off >= read.load(Ordering::SeqCst) + STREAM_AHEAD {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    for (i, b) in buf.iter_mut().enumerate() {
                        *b = stream_byte(off + i as u64);
                    }
                    from.write_all(&buf)?;
                    off += CHUNK;
                    std::thread::sleep(Duration::from_millis(2));
                }
                from.shutdown(std::net::Shutdown::Write)?;
                Ok((from, off))
            })
        };
        let reader = {
            let read = read.clone();
            std::thread::spawn(move || {
                to.set_read_timeout(Some(Duration::from_millis(500)))
                    .map_err(|e| e.to_string())?;
                let mut buf = vec![0u8; 256 << 10];
                let mut got = 0u64;
                let mut last = Instant::now();
                loop {
                    match to.read(&mut buf) {
                        Ok(0) => return Ok((to, got)),
                        Ok(n) => {
                            for (k, b) in buf[..n].iter().enumerate() {
                                let at = got + k as u64;
                                if *b != stream_byte(at) {
                                    return Err(format!("byte {at} differs"));
                                }
                            }
                            got += n as u64;
                            read.store(got, Ordering::SeqCst);
                            last = Instant::now();
                        }
                        // Timeouts, and the spurious EAGAIN of paired sockets on 6.18
                        // (tests/src/accel.rs, read_exact_retry).
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock
                                    | std::io::ErrorKind::TimedOut
                                    | std::io::ErrorKind::Interrupted
                            ) =>
                        {
                            if last.elapsed() > Duration::from_secs(60) {
                                return Err(format!("stalled after {got} bytes"));
                            }
                        }
                        Err(e) => return Err(format!("read after {got} bytes: {e}")),
                    }
                }
            })
        };
        Stream {
            stop,
            read,
            threads: Some((writer, reader)),
        }
    }

    /// Bytes read (and checked) so far.
    pub fn read_so_far(&self) -> u64 {
        self.read.load(Ordering::SeqCst)
    }

    /// Waits until `more` bytes beyond what was read now have arrived.
    pub fn wait_progress(&self, more: u64, what: &str) {
        let target = self.read_so_far() + more;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.read_so_far() < target {
            assert!(
                !self.threads.as_ref().is_some_and(|(_, r)| r.is_finished()),
                "{what}: the stream's reader stopped after {} bytes",
                self.read_so_far()
            );
            assert!(
                Instant::now() < deadline,
                "{what}: the stream did not move ({} of {target} bytes)",
                self.read_so_far()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Ends the transfer (the writer half-closes) and checks it: every byte written arrived,
    /// in order. Returns the bytes and the two sockets.
    pub fn finish(mut self) -> (u64, TcpStream, TcpStream) {
        self.stop.store(true, Ordering::SeqCst);
        let (writer, reader) = self.threads.take().expect("threads");
        let (from, written) = writer.join().unwrap().expect("the stream's writer");
        let (to, got) = reader
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("the stream's reader: {e}"));
        assert_eq!(got, written, "bytes read of bytes written");
        (written, from, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cri_log_format_is_stripped() {
        let raw = "2026-01-01T00:00:00.1Z stdout F line one\n\
                   2026-01-01T00:00:00.2Z stderr P part \n\
                   2026-01-01T00:00:00.3Z stderr F two\n";
        assert_eq!(cri_log_text(raw), "line one\npart two\n");
    }

    #[test]
    fn per_pod_series_are_summed_for_that_pod_only() {
        let m = "fastpath_pod_bytes_redirected_total{namespace=\"shop\",pod=\"a\",netns_cookie=\"1\"} 5\n\
                 fastpath_pod_bytes_redirected_total{namespace=\"shop\",pod=\"ab\",netns_cookie=\"2\"} 7\n\
                 fastpath_pod_bytes_redirected_total{namespace=\"shop\",pod=\"a\",netns_cookie=\"3\"} 1\n";
        let f = "fastpath_pod_bytes_redirected_total";
        assert_eq!(pod_metric(m, f, "shop", "a"), Some(6.0));
        assert_eq!(pod_metric(m, f, "shop", "b"), None);
        assert_eq!(pod_metric(m, f, "other", "a"), None);
    }

    #[test]
    fn stream_bytes_change_with_the_offset() {
        let a: Vec<u8> = (0..4096).map(stream_byte).collect();
        let b: Vec<u8> = (1..4097).map(stream_byte).collect();
        assert_ne!(a, b, "a stream one byte off would match");
        let c: Vec<u8> = (8..4104).map(stream_byte).collect();
        assert_ne!(a, c, "a stream eight bytes off would match");
    }

    fn node_paths() -> NodePaths {
        NodePaths {
            cni_bin: "/n/bin".into(),
            cni_net: "/n/net".into(),
            run: "/n/run".into(),
            bpffs: std::env::temp_dir(),
            service_account: "/n/sa".into(),
            cgroup_root: None,
        }
    }

    /// The manifest with `edit` applied to its DaemonSet.
    fn edited(edit: impl FnOnce(&mut Value)) -> Vec<Value> {
        let mut objs = crate::manifest::objects(MANIFEST);
        let ds = objs.iter_mut().find(|o| o["kind"] == "DaemonSet").unwrap();
        edit(ds);
        objs
    }

    #[test]
    #[should_panic(expected = "spec.template.spec.hostPID")]
    fn a_pod_field_the_test_does_not_run_fails_it() {
        InstallerSpec::from_objects(&edited(|ds| {
            ds["spec"]["template"]["spec"]["hostPID"] = json!(true)
        }));
    }

    #[test]
    #[should_panic(expected = "hostPath /var/lib/kubelet")]
    fn a_host_path_without_a_stand_in_fails_the_test() {
        let spec = InstallerSpec::from_objects(&edited(|ds| {
            let pod = &mut ds["spec"]["template"]["spec"];
            pod["volumes"][0]["hostPath"]["path"] = json!("/var/lib/kubelet");
        }));
        spec.mounts(&node_paths());
    }

    #[test]
    #[should_panic(expected = "same path in the container and on the host")]
    fn a_run_dir_mounted_elsewhere_fails_the_test() {
        let spec = InstallerSpec::from_objects(&edited(|ds| {
            let c = &mut ds["spec"]["template"]["spec"]["containers"][0];
            for m in c["volumeMounts"].as_array_mut().unwrap() {
                if m["mountPath"] == "/var/run/istio-cni" {
                    m["mountPath"] = json!("/run/istio-cni");
                }
            }
        }));
        spec.mounts(&node_paths());
    }

    #[test]
    fn the_manifest_maps_onto_a_node() {
        let spec = InstallerSpec::from_manifest();
        let paths = node_paths();
        let mounts = spec.mounts(&paths);
        let has = |c: &str, h: &str| {
            mounts
                .iter()
                .any(|m| m["containerPath"] == c && m["hostPath"] == h)
        };
        assert!(has("/host/opt/cni/bin", "/n/bin"), "{mounts:?}");
        assert!(has("/host/etc/cni/net.d", "/n/net"), "{mounts:?}");
        assert!(has("/n/run", "/n/run"), "{mounts:?}");
        assert!(has(SERVICE_ACCOUNT_MOUNT, "/n/sa"), "{mounts:?}");
        let who = PodIdentity {
            name: "p".into(),
            uid: "u".into(),
            node: "n".into(),
            api_host: "10.0.0.1".into(),
            api_port: 6443,
        };
        let env = spec.env(&who, &paths);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("POD_NAME"), Some("p"));
        assert_eq!(get("NODE_NAME"), Some("n"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT"), Some("6443"));
        assert_eq!(get("CNI_AGENT_RUN_DIR"), Some("/n/run"));
        assert_eq!(get("REPAIR_ENABLED"), Some("true"), "the ConfigMap's");
        let sc = spec.security_context();
        assert_eq!(sc["capabilities"]["dropCapabilities"], json!(["ALL"]));
        assert_eq!((spec.readiness.1, spec.metrics_port), (8000, 15014));
    }
}
