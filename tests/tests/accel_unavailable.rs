//! install-cni with acceleration on, on a node that lacks what the accelerator needs: no bpffs
//! it can use, no cgroup v2. The agent still installs the plugin and becomes ready (a mesh pod
//! added through the installed chain gets Istio's rules), reports
//! `fastpath_accel_state{state="unavailable"} 1`, names the reason in `/readyz` and in its log,
//! and leaves nothing attached. When bpffs is merely not mounted, the agent mounts it.
//!
//! Every test here may load the eBPF accelerator: each holds the node-wide sock_ops lock.
use std::path::{Path, PathBuf};

use fastpath_tests::cni::{Attachment, Runtime, load_conflist};
use fastpath_tests::installer::{Agent, Host, plugin_types};
use fastpath_tests::kube_api::{FakeKubeApi, sidecar_pod};
use fastpath_tests::netns::NetNs;

const TOKEN: &str = "accel-unavailable-token";
const PRIMARY: &str =
    r#"{"cniVersion": "1.0.0", "name": "fp-accel-off", "plugins": [{"type": "loopback"}]}"#;

/// Istio's chart's capabilities, and the same without SYS_ADMIN (no mount, no bpf()).
const ISTIO_CAPS: &str = "-all,+net_admin,+net_raw,+sys_ptrace,+sys_admin,+dac_override";
const NO_SYS_ADMIN: &str = "-all,+net_admin,+net_raw,+sys_ptrace,+dac_override";

/// A host with the real plugin as the image's, a loopback primary, and an API server.
struct Node {
    h: Host,
    api: FakeKubeApi,
    port: String,
}

impl Node {
    fn new(tag: &str) -> Self {
        let h = Host::new(tag);
        let api = FakeKubeApi::start(&h.root.join("api"), TOKEN).unwrap();
        h.set_service_account(TOKEN, &api.ca_pem);
        std::fs::copy(
            fastpath_tests::bin_path("istio-cni"),
            h.src.join("istio-cni"),
        )
        .unwrap();
        h.write("10-lo.conflist", PRIMARY);
        let port = api.addr.port().to_string();
        Node { h, api, port }
    }

    /// Starts the agent with acceleration on and `env` over it, through `launcher`.
    fn agent(&self, env: &[(&str, &str)], launcher: &[&str]) -> Agent {
        let mut all = vec![
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", self.port.as_str()),
            ("FASTPATH_ACCELERATION", "true"),
        ];
        all.extend_from_slice(env);
        Agent::start_under(&self.h, &all, &[], launcher)
    }

    /// The agent is ready with the plugin chained, and a mesh pod added through the installed
    /// chain gets Istio's rules: redirection works without acceleration.
    fn assert_redirection_works(&self, a: &mut Agent, pin_dir: &Path) {
        self.add_mesh_pod(a, pin_dir, |_| ());
    }

    /// [`Node::assert_redirection_works`], running `while_added` on the pod's netns between
    /// its ADD and its DEL; returns what it returned.
    fn add_mesh_pod<T>(
        &self,
        a: &mut Agent,
        pin_dir: &Path,
        while_added: impl FnOnce(&NetNs) -> T,
    ) -> T {
        a.wait_ready();
        assert_eq!(
            plugin_types(&self.h.json("10-lo.conflist")),
            ["loopback", "istio-cni"]
        );
        let list = load_conflist(&self.h.net_file("10-lo.conflist")).unwrap();
        // The plugin looks for the accelerator where this agent would have pinned it.
        let rt = Runtime {
            cni_path: vec!["/usr/lib/cni".into(), self.h.bin.clone()],
            cache_dir: self.h.root.join("cni-cache"),
            env: vec![("FASTPATH_BPF_PIN_DIR".into(), pin_dir.display().to_string())],
        };
        let pod = fastpath_tests::unique_name("web-");
        self.api.set_pod(sidecar_pod("shop", &pod, &[], &[]));
        let netns = NetNs::new(&fastpath_tests::unique_name("fpau")).unwrap();
        let att = Attachment {
            container_id: format!("cid-{}", netns.name),
            netns: netns.path(),
            ifname: "lo".into(),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={pod}"),
        };
        let added = rt.add(&list, &att);
        let saved = netns.exec_ok(&["iptables-nft-save"]).unwrap_or_default();
        let out = while_added(&netns);
        let del = rt.del(&list, &att);
        added.unwrap_or_else(|e| panic!("ADD failed: {e:#}\nagent log:\n{}", a.log()));
        del.unwrap();
        assert!(
            saved.contains("-A ISTIO_OUTPUT"),
            "no Istio rules:\n{saved}"
        );
        out
    }
}

/// Waits until the accelerator's start-up has decided, and returns the state reported.
fn accel_state(a: &mut Agent) -> &'static str {
    let states = ["active", "disabled", "unavailable", "conflict"];
    let series = |s: &str| format!("fastpath_accel_state{{state=\"{s}\"}}");
    a.wait_until("the accelerator's state", |a| {
        states.iter().any(|s| a.metric(&series(s)) == Some(1.0))
    });
    let state = states
        .into_iter()
        .find(|s| a.metric(&series(s)) == Some(1.0))
        .unwrap();
    for other in states.iter().filter(|s| **s != state) {
        assert_eq!(a.metric(&series(other)), Some(0.0), "{other}");
    }
    state
}

/// Acceleration is unavailable, and `/readyz` and the log give a reason that holds every one
/// of `reason`; returns the reason as `/readyz` gives it.
fn assert_unavailable(a: &mut Agent, reason: &[&str]) -> String {
    let state = accel_state(a);
    assert_eq!(state, "unavailable", "agent log:\n{}", a.log());
    assert_eq!(a.metric("fastpath_accel_enabled"), Some(0.0));
    let (status, body) = a.wait_readyz("ready, with the acceleration line", |s, b| {
        s == 200 && b.contains("acceleration: unavailable (")
    });
    assert_eq!(status, 200, "{body}");
    let line = body
        .lines()
        .find(|l| l.contains("acceleration: unavailable ("))
        .unwrap()
        .to_string();
    for part in reason {
        assert!(line.contains(part), "/readyz must say {part:?}: {line}");
    }
    assert!(line.ends_with("redirection works without it"), "{line}");
    let log = a.log();
    let logged = log
        .lines()
        .find(|l| l.contains("acceleration: unavailable ("))
        .unwrap_or_else(|| panic!("no 'acceleration: unavailable' line in the log:\n{log}"));
    for part in reason {
        assert!(logged.contains(part), "the log must say {part:?}: {logged}");
    }
    assert!(logged.contains("\twarn\t"), "a warning: {logged}");
    line
}

/// No pin of fastpath's left under `pin_dir` (nothing stays attached).
fn assert_nothing_pinned(pin_dir: &Path) {
    let left: Vec<String> = std::fs::read_dir(pin_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", pin_dir.display());
}

/// Whether the pod in `netns` is in the `FP_PODS` map pinned under `pin_dir`.
fn enrolled(pin_dir: &Path, netns: &NetNs) -> bool {
    let cookie = fastpath_cni_plugin::accel::netns_cookie(&netns.path()).unwrap();
    let pods = fastpath_pins::Pins::new(pin_dir).pods().unwrap();
    pods.get(&cookie).unwrap().is_some()
}

fn mounted_fs(path: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts.lines().rev().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, ty) = (f.next()?, f.next()?, f.next()?);
        (Path::new(dir) == path).then(|| ty.to_string())
    })
}

/// A file system mounted (by the agent or the test) at a path; unmounted on drop, after
/// uninstalling any accelerator pinned in it.
struct MountGuard {
    dir: PathBuf,
    pin_dir: Option<PathBuf>,
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(pin_dir) = &self.pin_dir
            && pin_dir.exists()
        {
            let mut settings = fastpath_installer::accel::AccelSettings::defaults();
            settings.bpffs = self.dir.clone();
            settings.pin_dir = pin_dir.clone();
            if let Err(e) = fastpath_installer::accel::uninstall(&settings) {
                eprintln!("uninstall {}: {e:#}", pin_dir.display());
            }
        }
        while mounted_fs(&self.dir).is_some() {
            let st = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .status();
            if !st.is_ok_and(|s| s.success()) {
                break;
            }
        }
    }
}

/// bpffs is not mounted where the agent is told it is, and the agent cannot mount it (a pod
/// without SYS_ADMIN): acceleration is unavailable, the reason names bpffs and the path, and
/// nothing is mounted or pinned.
#[test]
fn bpffs_missing_and_not_mountable_leaves_acceleration_unavailable_and_redirection_working() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let _lock = fastpath_tests::serial_guard("cgroup-sockops");
    let node = Node::new("nobpffs");
    let bpffs = node.h.root.join("sys-fs-bpf");
    std::fs::create_dir(&bpffs).unwrap();
    let _guard = MountGuard {
        dir: bpffs.clone(),
        pin_dir: Some(bpffs.join("fastpath")),
    };
    let mut a = node.agent(
        &[
            ("FASTPATH_BPFFS", bpffs.to_str().unwrap()),
            ("FASTPATH_BPF_PIN_DIR", ""),
        ],
        &[
            "setpriv",
            "--bounding-set",
            NO_SYS_ADMIN,
            "--inh-caps",
            NO_SYS_ADMIN,
            "--",
        ],
    );
    let reason = assert_unavailable(
        &mut a,
        &["bpffs", &format!("mount -t bpf bpf {}", bpffs.display())],
    );
    eprintln!("{reason}");
    node.assert_redirection_works(&mut a, &bpffs.join("fastpath"));
    assert_eq!(mounted_fs(&bpffs), None, "something was mounted");
    assert!(!bpffs.join("fastpath").exists());
    a.terminate();
}

/// bpffs is not mounted where the agent is told it is, and the agent may mount it (Istio's
/// capabilities): it mounts bpffs there and acceleration is active.
#[test]
fn bpffs_not_mounted_is_mounted_by_the_agent() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let _lock = fastpath_tests::serial_guard("cgroup-sockops");
    let node = Node::new("mountbpffs");
    let bpffs = node.h.root.join("sys-fs-bpf");
    std::fs::create_dir(&bpffs).unwrap();
    let pin_dir = bpffs.join("fastpath");
    let _guard = MountGuard {
        dir: bpffs.clone(),
        pin_dir: Some(pin_dir.clone()),
    };
    assert_eq!(mounted_fs(&bpffs), None);
    let mut a = node.agent(
        &[
            ("FASTPATH_BPFFS", bpffs.to_str().unwrap()),
            ("FASTPATH_BPF_PIN_DIR", ""),
        ],
        &[
            "setpriv",
            "--bounding-set",
            ISTIO_CAPS,
            "--inh-caps",
            ISTIO_CAPS,
            "--",
        ],
    );
    let state = accel_state(&mut a);
    assert_eq!(state, "active", "agent log:\n{}", a.log());
    assert_eq!(mounted_fs(&bpffs).as_deref(), Some("bpf"));
    assert!(pin_dir.join("link_sockops").exists());
    let (status, body) = a.wait_readyz("ready", |s, _| s == 200);
    assert!(body.contains("acceleration: active"), "{status} {body}");
    // A mesh pod added now is enrolled in the accelerator pinned there.
    let enrolled = node.add_mesh_pod(&mut a, &pin_dir, |netns| enrolled(&pin_dir, netns));
    assert!(
        enrolled,
        "a mesh pod was not enrolled; agent log:\n{}",
        a.log()
    );
    a.terminate();
    // The uninstall command finds the pins where the agent put them and removes them.
    let out = std::process::Command::new(fastpath_tests::bin_path("install-cni"))
        .env_clear()
        .envs(node.h.env())
        .env("FASTPATH_BPFFS", &bpffs)
        .env("FASTPATH_BPF_PIN_DIR", "")
        .arg("uninstall")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!pin_dir.exists());
}

/// `FASTPATH_CGROUP_ROOT` names a directory that is not a cgroup v2 mount (a tmpfs, as
/// `/sys/fs/cgroup` is on a cgroup v1 host): unavailable, the reason names the directory, and
/// the maps and programs loaded before the attach failed are unpinned. Returns the reason
/// `/readyz` gives and the directory.
fn with_a_cgroup_root_that_is_a_tmpfs(tag: &str) -> (String, PathBuf) {
    let pins = fastpath_tests::AgentPins::new(tag);
    let pin_dir = pins.dir.clone();
    let node = Node::new(tag);
    let cgroup = node.h.root.join("sys-fs-cgroup");
    std::fs::create_dir(&cgroup).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "fastpath-test-cgroup"])
        .arg(&cgroup)
        .status()
        .unwrap();
    assert!(st.success());
    let _guard = MountGuard {
        dir: cgroup.clone(),
        pin_dir: None,
    };
    let mut a = node.agent(
        &[
            ("FASTPATH_CGROUP_ROOT", cgroup.to_str().unwrap()),
            ("FASTPATH_BPF_PIN_DIR", pin_dir.to_str().unwrap()),
        ],
        &[],
    );
    let reason = assert_unavailable(&mut a, &[&cgroup.display().to_string()]);
    eprintln!("{reason}");
    node.assert_redirection_works(&mut a, &pin_dir);
    assert_nothing_pinned(&pin_dir);
    a.terminate();
    (reason, cgroup)
}

#[test]
fn cgroup_root_that_is_not_cgroup_v2_leaves_acceleration_unavailable_and_redirection_working() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    with_a_cgroup_root_that_is_a_tmpfs("nocg2");
}

/// The reason says what is wrong with the directory, as it does for a pin directory that is
/// not on bpffs: not a cgroup v2 mount (not just the errno of the attach that failed).
#[test]
fn cgroup_root_that_is_not_cgroup_v2_is_named_as_such() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let (reason, dir) = with_a_cgroup_root_that_is_a_tmpfs("nocg2name");
    assert!(
        reason.contains("cgroup v2") || reason.contains("cgroup2"),
        "the reason must say that {} is not a cgroup v2 mount: {reason}",
        dir.display()
    );
}

/// No cgroup v2 mount at all where the agent looks (it runs in a mount namespace of its own
/// with the cgroup2 mounts taken away): unavailable, and the reason says so.
#[test]
fn no_cgroup_v2_mount_leaves_acceleration_unavailable_and_redirection_working() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let pins = fastpath_tests::AgentPins::new("nocgmount");
    let pin_dir = pins.dir.clone();
    let node = Node::new("nocgmount");
    // In the agent's own mount namespace only: unmount every cgroup2 mount, then exec it.
    let script = r#"for m in $(awk '$3 == "cgroup2" { print $2 }' /proc/self/mounts); do umount -l "$m" || exit 1; done; exec "$0" "$@""#;
    let mut a = node.agent(
        &[
            ("FASTPATH_CGROUP_ROOT", ""),
            ("FASTPATH_BPF_PIN_DIR", pin_dir.to_str().unwrap()),
        ],
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let reason = assert_unavailable(&mut a, &["no cgroup v2 mount"]);
    // (Read once it runs: the launcher unmounts before it execs the agent.)
    let mounts = std::fs::read_to_string(format!("/proc/{}/mounts", a.child.id())).unwrap();
    assert!(
        !mounts.lines().any(|l| l.contains(" cgroup2 ")),
        "the agent still sees a cgroup2 mount:\n{mounts}"
    );
    eprintln!("{reason}");
    node.assert_redirection_works(&mut a, &pin_dir);
    assert_nothing_pinned(&pin_dir);
    // The node's own cgroup2 mounts are untouched.
    assert!(
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .contains(" cgroup2 ")
    );
    a.terminate();
}
