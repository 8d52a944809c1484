//! install-cni with the real istio-cni plugin: the agent installs the plugin and its
//! kubeconfig, a runtime runs the installed chain for a sidecar pod (the plugin reaching a fake
//! API server through the kubeconfig the agent wrote), and the plugin's log lines come back
//! into the agent's log with the pod's name.
use fastpath_tests::cni::{Attachment, Runtime, load_conflist};
use fastpath_tests::installer::{Agent, Host};
use fastpath_tests::kube_api::{FakeKubeApi, sidecar_pod};
use fastpath_tests::netns::NetNs;

const TOKEN: &str = "installer-e2e-token";

#[test]
fn installed_plugin_runs_and_its_logs_reach_the_agent() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let h = Host::new("e2e");
    let api = FakeKubeApi::start(&h.root.join("api"), TOKEN).unwrap();
    h.set_service_account(TOKEN, &api.ca_pem);
    // The image's plugin is the real one.
    std::fs::copy(
        fastpath_tests::bin_path("istio-cni"),
        h.src.join("istio-cni"),
    )
    .unwrap();
    // A primary with only loopback keeps the test off shared bridges and subnets.
    h.write(
        "10-lo.conflist",
        r#"{"cniVersion": "1.0.0", "name": "fp-installer-e2e", "plugins": [{"type": "loopback"}]}"#,
    );
    let port = api.addr.port().to_string();
    let mut a = Agent::start(
        &h,
        &[
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", &port),
        ],
    );
    a.wait_ready();

    // A runtime runs the chain as installed: the plugin binary the agent copied to the host.
    let list = load_conflist(&h.net_file("10-lo.conflist")).unwrap();
    let rt = Runtime {
        cni_path: vec!["/usr/lib/cni".into(), h.bin.clone()],
        cache_dir: h.root.join("cni-cache"),
        env: vec![],
    };
    api.set_pod(sidecar_pod("shop", "web-7f9c", &[], &[]));
    let netns = NetNs::new(&fastpath_tests::unique_name("fpie")).unwrap();
    let att = Attachment {
        container_id: format!("cid-{}", netns.name),
        netns: netns.path(),
        ifname: "lo".into(),
        args:
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-7f9c;K8S_POD_UID=uid-web-7f9c"
                .into(),
    };
    let added = rt.add(&list, &att);
    let del = rt.del(&list, &att);
    let (_, runs) = added.unwrap_or_else(|e| panic!("ADD failed: {e:#}\nagent log:\n{}", a.log()));
    assert!(
        runs.iter()
            .any(|r| r.plugin_type == "istio-cni" && r.status == 0)
    );
    del.unwrap();
    assert!(
        api.requests_for("shop", "web-7f9c") >= 1,
        "the plugin did not reach the API with the agent's kubeconfig"
    );
    assert!(
        api.requests()
            .iter()
            .all(|r| r.authorization.as_deref() == Some(&format!("Bearer {TOKEN}")))
    );

    a.wait_until("the plugin's line in the agent's log", |a| {
        a.log().contains("sidecar redirection applied")
    });
    let log = a.log();
    let line = log
        .lines()
        .find(|l| l.contains("sidecar redirection applied"))
        .unwrap();
    assert!(line.contains("\tcni-plugin\t"), "{line}");
    assert!(line.contains("pod=shop/web-7f9c"), "{line}");
}

/// The agent as Istio's chart runs it: uid 0, not privileged, with exactly the chart's
/// capabilities (NET_ADMIN, NET_RAW, SYS_PTRACE, SYS_ADMIN, DAC_OVERRIDE). The accelerator
/// must load, pass its self-test and switch on with those alone.
#[test]
fn agent_with_istios_capabilities_turns_acceleration_on() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let pins = fastpath_tests::AgentPins::new("caps");
    let pin_dir = pins.dir.clone();
    let h = Host::new("caps");
    h.write(
        "10-lo.conflist",
        r#"{"cniVersion": "1.0.0", "name": "fp-caps", "plugins": [{"type": "loopback"}]}"#,
    );
    let caps = "-all,+net_admin,+net_raw,+sys_ptrace,+sys_admin,+dac_override";
    let mut a = Agent::start_under(
        &h,
        &[
            ("FASTPATH_ACCELERATION", "true"),
            ("FASTPATH_BPF_PIN_DIR", pin_dir.to_str().unwrap()),
        ],
        &[],
        &["setpriv", "--bounding-set", caps, "--inh-caps", caps, "--"],
    );
    a.wait_ready();
    let status = std::fs::read_to_string(format!("/proc/{}/status", a.child.id())).unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    // CAP_DAC_OVERRIDE 1, CAP_NET_ADMIN 12, CAP_NET_RAW 13, CAP_SYS_PTRACE 19, CAP_SYS_ADMIN 21.
    let istio: u64 = [1, 12, 13, 19, 21].iter().map(|b| 1u64 << b).sum();
    assert_eq!(
        cap_eff, istio,
        "the agent runs with Istio's capabilities only"
    );
    a.wait_until("acceleration on", |a| {
        a.metric("fastpath_accel_enabled") == Some(1.0)
    });
    assert!(
        a.log().contains("accelerator active"),
        "agent log:\n{}",
        a.log()
    );
    a.terminate();
    let out = std::process::Command::new(fastpath_tests::bin_path("install-cni"))
        .env_clear()
        .envs(h.env())
        .env("FASTPATH_BPF_PIN_DIR", &pin_dir)
        .arg("uninstall")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!pin_dir.exists());
}
