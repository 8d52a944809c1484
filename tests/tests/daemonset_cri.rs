//! The DaemonSet end to end on containerd: the image built from this tree runs as the pod
//! `manifests/istio-cni-fastpath.yaml` describes (its spec read from the manifest, mapped onto
//! a throwaway node), driven through CRI as a kubelet drives it, with the fake API server as
//! the cluster. Through one life of the DaemonSet on a node:
//! 1. install: the plugin and its config land in containerd's CNI dirs, the accelerator loads;
//! 2. sidecar pods get Istio's redirection and their sidecar hops are accelerated (the per-pod
//!    counters, on the agent's metrics port, say so);
//! 3. the agent is killed (SIGKILL) and restarted in its sandbox: the pods stay accelerated
//!    meanwhile, and a transfer running across it loses no byte;
//! 4. an upgrade to a second image whose connection maps have another layout: the pins are
//!    migrated (old maps retired, serving their connections until these close), pods are
//!    created throughout the swap and none fails;
//! 5. an uninstall (the DaemonSet deleted): nothing of fastpath is left attached or pinned,
//!    the plugin's entry is gone, pods can still be created and deleted, and the accelerated
//!    connections that were open finished intact.
//!
//! Subnet 10.248.202.0/24. Takes the containerd and accelerator locks.
use fastpath_installer::accel::{pinned_program_ids, retire, still_loaded_after};
use fastpath_tests::daemonset::{
    IMAGE, IMAGE_NEXT, InstallerPod, InstallerSpec, Node, STREAM_AHEAD, Stream, images, pod_metric,
};
use fastpath_tests::installer::plugin_types;
use fastpath_tests::stress::stamp_another_map_abi;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const TOKEN: &str = "daemonset-cri-token";
const CONFLIST: &str = "10-k8s-pod-network.conflist";
const NS: &str = "shop";

fn entry_installed(node: &Node) -> bool {
    plugin_types(&node.host.json(CONFLIST))
        .last()
        .is_some_and(|t| t == "istio-cni")
}

/// Waits until the agent's log (copied by containerd's shim, a moment behind) says `what`;
/// returns the log.
fn wait_log(node: &Node, agent: &InstallerPod, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = node.installer_log(agent);
        if log.contains(what) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "the agent's log does not say {what:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sets the flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Polls `cond` for up to 20 s.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_daemonset_installs_accelerates_survives_a_kill_upgrades_and_uninstalls_on_containerd() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let t0 = Instant::now();
    let imgs = images();
    let node = Node::start("dscri", "10.248.202", TOKEN, &imgs);
    let spec = InstallerSpec::from_manifest();
    node.api
        .set_object(&spec.daemonset_path(), spec.daemonset.clone());
    node.api.set_object(
        &format!("/api/v1/nodes/{}", node.node_name),
        spec.node_object(&node.node_name),
    );
    eprintln!("node up after {:.1} s", t0.elapsed().as_secs_f64());

    // 1. Install.
    let mut agent = node.run_installer(&spec, "istio-cni-node-e2e01", IMAGE);
    node.wait_ready(&spec, &agent);
    node.wait_installer(&agent, "acceleration on", || {
        node.metrics(&spec, &agent)
            .lines()
            .any(|l| l == "fastpath_accel_enabled 1")
    });
    assert!(entry_installed(&node), "{}", node.installer_log(&agent));
    assert!(node.host.kubeconfig().exists(), "the plugin's kubeconfig");
    let shipped = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/image/linux/amd64/istio-cni"),
    )
    .unwrap();
    assert!(
        std::fs::read(node.host.plugin()).unwrap() == shipped,
        "the plugin on the node is not the image's"
    );
    // The pins are on the node's bpffs (the manifest's hostPath), where the plugin finds them.
    assert_eq!(
        pinned_program_ids(&node.pin_dir()).len(),
        4,
        "the accelerator's programs pinned in {}",
        node.pin_dir().display()
    );
    eprintln!("installed after {:.1} s", t0.elapsed().as_secs_f64());

    // 2. Sidecar pods are redirected and accelerated; a pod without sidecar is left alone.
    let a = node.run_app_pod(NS, "web-a", true).unwrap();
    let b = node.run_app_pod(NS, "web-b", true).unwrap();
    let plain = node.run_app_pod(NS, "plain-0", false).unwrap();
    assert!(a.redirected() && b.redirected(), "sidecar rules");
    assert!(!plain.redirected(), "rules in a pod without sidecar");
    let out_a = a.sidecar_outbound();
    let out_b = b.sidecar_outbound();
    let dst_b = SocketAddr::from((b.ip, 80));
    let dst_a = SocketAddr::from((a.ip, 80));
    let (app, side) = a.dial_through_sidecar(&out_a, dst_b);
    let stream_a = Stream::start(app, side);
    let (app, side) = b.dial_through_sidecar(&out_b, dst_a);
    let stream_b = Stream::start(app, side);
    stream_a.wait_progress(1 << 20, "pod a's first MiB");
    stream_b.wait_progress(1 << 20, "pod b's first MiB");
    for pod in [&a, &b] {
        let st = node.pod_stats(&pod.ns, &pod.name);
        assert!(
            st.connections_paired >= 1 && st.bytes_redirected >= 1 << 20,
            "{}: {st:?}",
            pod.name
        );
        node.wait_installer(&agent, "the pod's counters on /metrics", || {
            pod_metric(
                &node.metrics(&spec, &agent),
                "fastpath_pod_bytes_redirected_total",
                &pod.ns,
                &pod.name,
            )
            .is_some_and(|v| v >= (1 << 20) as f64)
        });
    }
    let m = node.metrics(&spec, &agent);
    assert_eq!(
        pod_metric(&m, "fastpath_pod_bytes_redirected_total", NS, "plain-0"),
        None,
        "a pod without sidecar has counters:\n{m}"
    );
    eprintln!("pods accelerated after {:.1} s", t0.elapsed().as_secs_f64());

    // 3. SIGKILL: the pods stay accelerated while no agent runs, and after its restart.
    let before = node.pod_stats(NS, "web-a").bytes_redirected;
    let st = node.stop_installer(&agent, 0);
    assert_eq!(st["state"], "CONTAINER_EXITED", "{st}");
    assert_eq!(st["exitCode"], 137, "killed by SIGKILL: {st}");
    // Read after `before`, written after it: at most STREAM_AHEAD of it written before.
    stream_a.wait_progress(STREAM_AHEAD + (5 << 20), "pod a, no agent running");
    stream_b.wait_progress(4 << 20, "pod b, no agent running");
    assert!(
        node.pod_stats(NS, "web-a").bytes_redirected >= before + (4 << 20),
        "pod a's connection left the fast path when the agent died"
    );
    assert!(entry_installed(&node), "a killed agent removed the entry");
    node.restart_installer(&spec, &mut agent);
    node.wait_ready(&spec, &agent);
    // The restarted agent takes the pins over.
    wait_log(
        &node,
        &agent,
        "accelerator already loaded by this build: reusing the pins",
    );
    let paired = node.pod_stats(NS, "web-b").connections_paired;
    let (app, side) = b.dial_through_sidecar(&out_b, dst_a);
    eventually("a new connection of pod b paired", || {
        node.pod_stats(NS, "web-b").connections_paired > paired
    });
    let stream_b2 = Stream::start(app, side);
    stream_b2.wait_progress(1 << 20, "pod b's new connection");
    let before = node.pod_stats(NS, "web-a").bytes_redirected;
    stream_a.wait_progress(STREAM_AHEAD + (2 << 20), "pod a after the restart");
    assert!(
        node.pod_stats(NS, "web-a").bytes_redirected >= before + (1 << 20),
        "pod a's connection left the fast path after the restart"
    );
    let (n, _, _) = stream_b.finish();
    eprintln!(
        "kill -9 and restart: {n} bytes across it intact, after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    drop(stream_b2.finish());

    let st = node.pod_stats(NS, "web-a");
    assert_eq!(
        st.queue_demotions, 0,
        "pod a's connection left the fast path: {st:?}"
    );

    // 4. Upgrade to the second image, with pods created all along.
    let old_image = node.installer_status(&agent)["imageRef"].clone();
    let old_programs = pinned_program_ids(&node.pin_dir());
    assert_eq!(old_programs.len(), 4, "{old_programs:?}");
    let stop_churn = AtomicBool::new(false);
    let churned: Mutex<Vec<Result<String, String>>> = Mutex::new(Vec::new());
    let count = || churned.lock().unwrap().len();
    let wait_churn = |n: usize, what: &str| {
        let target = count() + n;
        eventually(what, || count() >= target);
    };
    let pods = node.pods();
    let agent = std::thread::scope(|sc| {
        sc.spawn(|| {
            let mut i = 0;
            while !stop_churn.load(Ordering::SeqCst) {
                let name = format!("churn-{i}");
                let made = pods.run(NS, &name, true).and_then(|p| {
                    let redirected = p.redirected();
                    pods.delete(&p)?;
                    anyhow::ensure!(redirected, "no sidecar rules");
                    Ok(name.clone())
                });
                churned
                    .lock()
                    .unwrap()
                    .push(made.map_err(|e| format!("{name}: {e:#}")));
                i += 1;
            }
        });
        // A failure below must not leave this thread creating pods (the scope would wait).
        let _stop = StopOnDrop(&stop_churn);
        wait_churn(2, "pods created under the old agent");
        // The DaemonSet controller deletes the old pod (maxUnavailable 1): SIGTERM, with the
        // DaemonSet still there, is an upgrade: everything stays for the next agent.
        let st = node.stop_installer(&agent, spec.grace_s);
        let log = wait_log(&node, &agent, "upgrade or restart");
        assert_eq!(st["exitCode"], 0, "{st}\n{log}");
        assert!(entry_installed(&node) && node.host.plugin().exists());
        node.delete_installer_pod(&spec, &agent);
        // SIMULATION of a release whose connection maps have another layout: both images
        // hold the same binaries, so the pinned META map is stamped with another map ABI
        // version before the new agent starts, which then finds maps it cannot reuse (as
        // tests/src/stress.rs does).
        stamp_another_map_abi(&node.pin_dir()).unwrap();
        wait_churn(2, "pods created while no agent runs");
        let agent = node.run_installer(&spec, "istio-cni-node-e2e02", IMAGE_NEXT);
        node.wait_ready(&spec, &agent);
        // The pins migrated: the old connection maps retired, serving pod a's connection.
        wait_log(
            &node,
            &agent,
            "connection maps of another layout are pinned: moved to",
        );
        let log = wait_log(&node, &agent, "re-enrolled");
        let (code, report, err) = node
            .ctrd
            .exec(&agent.container, &["install-cni", "accel-status"], 30)
            .unwrap();
        assert_eq!(code, 0, "{report}{err}");
        // The retired set holds pod a's open connection (its 2 sockets) until it closes.
        // (Its writer stays under its reader's backlog room: when it ran 4 MiB ahead, the
        // connection was demoted for lagging, 1 run in 5, and left the retired maps early.)
        assert!(
            report.contains("retired connection maps: 1 set(s) with 2 socket(s)"),
            "pod a's open connection is not in the retired maps after the upgrade:\n{report}\n\
             agent log:\n{log}"
        );
        node.wait_installer(&agent, "acceleration on after the upgrade", || {
            node.metrics(&spec, &agent)
                .lines()
                .any(|l| l == "fastpath_accel_enabled 1")
        });
        wait_churn(2, "pods created under the new agent");
        stop_churn.store(true, Ordering::SeqCst);
        agent
    });
    let churned = churned.into_inner().unwrap();
    let failed: Vec<&String> = churned.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "pod creations failed during the upgrade: {failed:?}"
    );
    let st = node.installer_status(&agent);
    assert_ne!(
        st["imageRef"], old_image,
        "the new pod runs the second image"
    );
    // Pod a is enrolled in the new maps: its next connection pairs there.
    let (app, side) = a.dial_through_sidecar(&out_a, dst_b);
    eventually("pod a's new connection paired in the new maps", || {
        node.pod_stats(NS, "web-a").connections_paired >= 1
    });
    let stream_a2 = Stream::start(app, side);
    stream_a.wait_progress(1 << 20, "pod a's old connection after the upgrade");
    stream_a2.wait_progress(1 << 20, "pod a's new connection");
    let (n, c, s) = stream_a.finish();
    drop((c, s));
    eventually(
        "the retired maps removed once their last connection closed",
        || retire::sets(&node.pin_dir()).is_empty(),
    );
    wait_log(
        &node,
        &agent,
        "their last connection closed; detached and removed",
    );
    eprintln!(
        "upgrade: {} pods created across it, {n} bytes on a connection across it intact, \
         after {:.1} s",
        churned.len(),
        t0.elapsed().as_secs_f64()
    );

    // 5. Uninstall: the DaemonSet is deleted, then its pod.
    let programs = pinned_program_ids(&node.pin_dir());
    assert_eq!(
        programs.len(),
        4,
        "sock_ops, sk_msg, tracepoint, gate: {programs:?}"
    );
    node.api.remove_object(&spec.daemonset_path());
    let st = node.stop_installer(&agent, spec.grace_s);
    let gone = format!("DaemonSet {}/{} is gone", spec.namespace, spec.name);
    let log = wait_log(&node, &agent, &gone);
    assert_eq!(st["exitCode"], 0, "{st}\n{log}");
    stream_a2.wait_progress(1 << 20, "pod a's connection after the uninstall");
    let (n, _, _) = stream_a2.finish();
    let all: Vec<u32> = programs.iter().chain(&old_programs).copied().collect();
    let loaded = still_loaded_after(&all, Duration::from_secs(2));
    assert!(
        loaded.is_empty(),
        "fastpath programs still loaded after the uninstall: {loaded:?}"
    );
    assert!(!node.pin_dir().exists(), "pins left");
    assert!(!entry_installed(&node), "the plugin's entry left");
    assert!(!node.host.kubeconfig().exists(), "the kubeconfig left");
    assert!(!node.host.plugin().exists(), "the plugin binary left");
    node.delete_installer_pod(&spec, &agent);
    // Pods are still created (the chain without istio-cni) and deleted, those made with the
    // plugin too.
    let after = node.run_app_pod(NS, "after-0", true).unwrap();
    assert!(!after.redirected(), "sidecar rules without the plugin");
    for pod in [&after, &a, &b, &plain] {
        node.delete_app_pod(pod)
            .unwrap_or_else(|e| panic!("delete {}: {e:#}", pod.name));
    }
    eprintln!(
        "uninstall: {n} bytes on a connection across it intact; done after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
