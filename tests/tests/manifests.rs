//! The shipped manifests as a cluster would take them: strictly valid Kubernetes objects,
//! settings install-cni accepts, and a cleanup DaemonSet that does what it says with the
//! agent's own mounts.
use fastpath_installer::config::{Config, RawConfig, SettingError};
use fastpath_tests::installer::{Agent, Host, PRIMARY};
use fastpath_tests::manifest::{container, find, manifest_path, objects};
use serde_json::Value;

/// The Kubernetes objects the project ships (the Helm values and IstioOperator files are
/// inputs to Istio's tools, not objects).
const OBJECT_MANIFESTS: [&str; 2] = ["istio-cni-fastpath.yaml", "cleanup-daemonset.yaml"];

#[test]
fn every_manifest_validates_strictly_against_kubernetes_1_32() {
    let probe = std::process::Command::new("kubernetes-validate")
        .arg("--version")
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        let why = "kubernetes-validate is not installed (scripts/setup.sh installs it from PyPI)";
        assert!(!fastpath_tests::in_ci(), "{why}");
        eprintln!("SKIPPED: {why}");
        return;
    }
    for name in OBJECT_MANIFESTS {
        let out = std::process::Command::new("kubernetes-validate")
            .args(["--strict", "-k", "1.32.0", "--quiet"])
            .arg(manifest_path(name))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name} does not validate strictly against Kubernetes 1.32:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The check rejects what it should (an unknown field), so passing means something.
    let bad = std::env::temp_dir().join(fastpath_tests::unique_name("bad-manifest-"));
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  nmae: typo\n",
    )
    .unwrap();
    let out = std::process::Command::new("kubernetes-validate")
        .args(["--strict", "-k", "1.32.0", "--quiet"])
        .arg(&bad)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&bad);
    assert!(!out.status.success(), "an unknown field was accepted");
}

/// The ConfigMap keys of Istio's `cni` chart (`templates/configmap-cni.yaml`) with the values
/// it renders by default, and the container env it sets besides the downward-API ones.
const ISTIO_CHART_ENV: &[(&str, &str)] = &[
    ("CURRENT_AGENT_VERSION", "1.28.0"),
    ("AMBIENT_ENABLED", "false"),
    ("AMBIENT_ENABLEMENT_SELECTOR", ""),
    ("AMBIENT_DNS_CAPTURE", "true"),
    ("AMBIENT_IPV6", "true"),
    ("AMBIENT_RECONCILE_POD_RULES_ON_STARTUP", "false"),
    ("ENABLE_AMBIENT_DETECTION_RETRY", "false"),
    ("ISTIO_OWNED_CNI_CONFIG", "false"),
    ("CHAINED_CNI_PLUGIN", "true"),
    ("EXCLUDE_NAMESPACES", "kube-system"),
    ("REPAIR_ENABLED", "true"),
    ("REPAIR_LABEL_PODS", "false"),
    ("REPAIR_DELETE_PODS", "false"),
    ("REPAIR_REPAIR_PODS", "true"),
    ("REPAIR_INIT_CONTAINER_NAME", "istio-validation"),
    ("REPAIR_BROKEN_POD_LABEL_KEY", "cni.istio.io/uninitialized"),
    ("REPAIR_BROKEN_POD_LABEL_VALUE", "true"),
    ("NATIVE_NFTABLES", "false"),
    ("REPAIR_RUN_AS_DAEMON", "true"),
    ("REPAIR_SIDECAR_ANNOTATION", "sidecar.istio.io/status"),
    ("ALLOW_SWITCH_TO_HOST_NS", "true"),
    ("GOMEMLIMIT", "1073741824"),
];

/// What a downward-API reference resolves to on a node.
fn resolve(env: &Value) -> String {
    if let Some(v) = env["value"].as_str() {
        return v.to_string();
    }
    match env["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
        Some("spec.nodeName") => "node-a".into(),
        Some("metadata.name") => "istio-cni-node-x7k2p".into(),
        Some("metadata.namespace") => "istio-system".into(),
        other => panic!("unexpected env source {other:?} in {env}"),
    }
}

fn build(env: &[(String, String)], args: &[String]) -> Result<Config, SettingError> {
    let raw = RawConfig::read(args.iter().cloned(), |k| {
        env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    })?;
    Config::build(&raw, |_| Ok(String::new()))
}

#[test]
fn install_cni_accepts_every_setting_the_manifest_and_istios_chart_give_it() {
    let objs = objects("istio-cni-fastpath.yaml");
    let cm = find(&objs, "ConfigMap", "istio-cni-config");
    let ds = find(&objs, "DaemonSet", "istio-cni-node");
    let c = container(ds);
    assert_eq!(c["envFrom"][0]["configMapRef"]["name"], "istio-cni-config");
    let mut env: Vec<(String, String)> = cm["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    for e in c["env"].as_array().unwrap() {
        env.push((e["name"].as_str().unwrap().to_string(), resolve(e)));
    }
    let args: Vec<String> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let cfg = build(&env, &args).unwrap_or_else(|e| panic!("the manifest's settings: {e}"));
    assert_eq!(cfg.identity.pod_name, "istio-cni-node-x7k2p");
    assert_eq!(cfg.identity.node_name, "node-a");
    let istio: Vec<(String, String)> = ISTIO_CHART_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    build(&istio, &["--log_output_level=info".to_string()])
        .unwrap_or_else(|e| panic!("Istio's chart's settings: {e}"));
    // And a bad value is still refused, so acceptance means something.
    let mut bad = istio.clone();
    bad.retain(|(k, _)| k != "REPAIR_ENABLED");
    bad.push(("REPAIR_ENABLED".into(), "yes please".into()));
    assert!(build(&bad, &[]).is_err());
}

#[test]
fn the_cleanup_daemonset_has_the_agents_mounts_and_rights_and_leaves_a_node_clean() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let agent_objs = objects("istio-cni-fastpath.yaml");
    let cleanup_objs = objects("cleanup-daemonset.yaml");
    let agent = find(&agent_objs, "DaemonSet", "istio-cni-node");
    let cleanup = find(&cleanup_objs, "DaemonSet", "istio-cni-cleanup");
    let host_paths = |ds: &Value| -> Vec<(String, String)> {
        let volumes = ds["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap();
        let mut m: Vec<(String, String)> = container(ds)["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|vm| {
                let vol = volumes
                    .iter()
                    .find(|v| v["name"] == vm["name"])
                    .unwrap_or_else(|| panic!("no volume for {vm}"));
                (
                    vm["mountPath"].as_str().unwrap().to_string(),
                    vol["hostPath"]["path"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        m.sort();
        m
    };
    assert_eq!(
        host_paths(cleanup),
        host_paths(agent),
        "the cleanup must see the node as the agent does"
    );
    assert_eq!(
        container(cleanup)["securityContext"],
        container(agent)["securityContext"]
    );
    assert_eq!(
        cleanup["spec"]["template"]["spec"]["nodeSelector"],
        agent["spec"]["template"]["spec"]["nodeSelector"]
    );
    let command: Vec<String> = container(cleanup)["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(command[0], "install-cni");

    // A node an agent left behind (killed): the entry, the kubeconfig and the binary.
    let h = Host::new("cleanup-ds");
    h.write("10-dbnet.conflist", PRIMARY);
    let mut old = Agent::start(&h, &[]);
    old.wait_ready();
    old.signal(libc::SIGKILL);
    let _ = old.child.wait();
    assert!(h.plugin().exists() && h.kubeconfig().exists());

    // The cleanup container, as the manifest runs it.
    let args: Vec<&str> = command[1..].iter().map(String::as_str).collect();
    let mut run = Agent::start_with_args(&h, &[], &args);
    run.wait_until("the node reported clean", |a| {
        a.log().contains("node is clean")
    });
    let conf = h.json("10-dbnet.conflist");
    assert_eq!(
        fastpath_tests::installer::plugin_types(&conf),
        ["bridge", "tuning"],
        "entry left"
    );
    assert!(!h.kubeconfig().exists(), "kubeconfig left");
    assert!(!h.plugin().exists(), "binary left");
    assert!(
        run.child.try_wait().unwrap().is_none(),
        "the container exited after a clean uninstall (it would be restarted)"
    );
    let st = run.terminate();
    assert!(st.success(), "{st}; log:\n{}", run.log());
}
