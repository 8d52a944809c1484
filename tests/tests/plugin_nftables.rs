//! `native_nftables: true`: the built `istio-cni` run as a runtime runs it (the test's HTTPS
//! API server serving the pods), then the pod netns' ruleset (`nft -j list ruleset`) compared
//! with Istio's golden for the same config loaded with `nft -f` into a scratch netns. `nft`
//! is only used by the test; the plugin programs nf_tables over netlink.
//!
//! Rule handles are left out of the comparison (kernel-assigned ids: the plugin appends each
//! chain's rules in their final order where Istio's transaction inserts some). Goldens copied
//! before upstream added `counter` to every rule are compared without the counters (see
//! `cni-plugin/src/nftables/tests.rs`).
use anyhow::{Context as _, Result, bail};
use fastpath_tests::cni::{Attachment, Runtime, ScratchNet};
use fastpath_tests::kube_api::{FakeKubeApi, Trust, sidecar_pod};
use fastpath_tests::netns::NetNs;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Command;

const TOKEN: &str = "test-sa-token";

struct Node {
    net: ScratchNet,
    api: FakeKubeApi,
    rt: Runtime,
}

impl Node {
    fn new() -> Result<Self> {
        let net = ScratchNet::new("fpn")?;
        std::fs::create_dir_all(net.dir.join("run"))?;
        let api = FakeKubeApi::start(&net.dir.join("api"), TOKEN)?;
        api.write_kubeconfig(&net.dir.join("run/istio-cni-kubeconfig"), Trust::Ca, TOKEN)?;
        let rt = Runtime::with_built_plugin(net.dir.join("cache"), vec![]);
        Ok(Self { net, api, rt })
    }

    /// The istio-cni entry alone, with the address the primary plugin would have given.
    fn conf(&self, native_nftables: bool, ip: &str) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "fastpath-nft",
            "type": "istio-cni",
            "plugin_log_level": "debug",
            "cni_agent_run_dir": self.net.dir.join("run"),
            "ambient_enabled": false,
            "exclude_namespaces": ["kube-system"],
            "pod_namespace": "istio-system",
            "native_nftables": native_nftables,
            "fastpath_pod_retrieval_max_retries": 2,
            "fastpath_pod_retrieval_interval_ms": 20,
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": "x"}],
                "ips": [{"address": format!("{ip}/24"), "interface": 0}]
            }
        })
    }

    fn run(&self, cmd: &str, conf: &Value, ns: &NetNs, pod: &str) -> Result<()> {
        let att = Attachment {
            container_id: format!("ctr-{pod}"),
            netns: ns.path(),
            ifname: "eth0".into(),
            args: format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}"),
        };
        let run = self.rt.exec_plugin(cmd, conf, &att)?;
        if run.status != 0 {
            bail!(
                "{cmd} of pod {pod} exited {}: {}{}",
                run.status,
                run.stdout,
                run.stderr
            );
        }
        Ok(())
    }

    /// A sidecar pod with `annotations`, ADDed with native nftables into a fresh netns.
    fn add_pod(&self, pod: &str, annotations: &[(&str, &str)]) -> Result<NetNs> {
        self.api
            .set_pod(sidecar_pod("default", pod, annotations, &[]));
        let ns = NetNs::new(&format!("fpn-{}-{pod}", std::process::id()))?;
        self.run("ADD", &self.conf(true, "10.248.40.2"), &ns, pod)?;
        Ok(ns)
    }
}

/// `nft -j list ruleset` without handles and metainfo, one object per line.
fn ruleset(ns: &NetNs) -> Result<Vec<Value>> {
    let out = ns.exec_ok(&["nft", "-j", "list", "ruleset"])?;
    let v: Value = serde_json::from_str(&out).context("nft -j output")?;
    fn strip(v: &Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(k, _)| *k != "handle")
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.iter().map(strip).collect()),
            other => other.clone(),
        }
    }
    Ok(v["nftables"]
        .as_array()
        .context("no nftables array")?
        .iter()
        .filter(|o| o.get("metainfo").is_none())
        .map(strip)
        .collect())
}

/// Drops the `counter` statements (for goldens copied before upstream wrote them).
fn without_counters(objects: &[Value]) -> Vec<Value> {
    objects
        .iter()
        .map(|o| {
            let mut o = o.clone();
            if let Some(expr) = o["rule"]["expr"].as_array_mut() {
                expr.retain(|e| e.get("counter").is_none());
            }
            o
        })
        .collect()
}

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/istio-nftables")
        .join(name)
}

/// `text` (nft syntax) loaded into a scratch netns, listed.
fn loaded(text: &str, tag: &str) -> Result<Vec<Value>> {
    let ns = NetNs::new(&format!("fpn-{}-ref-{tag}", std::process::id()))?;
    let file = std::env::temp_dir().join(format!("fpn-{}-{tag}.nft", std::process::id()));
    std::fs::write(&file, text)?;
    let out = ns.exec(&["nft", "-f", file.to_str().expect("utf-8 path")])?;
    let _ = std::fs::remove_file(&file);
    if !out.status.success() {
        bail!("nft -f {tag}: {}", String::from_utf8_lossy(&out.stderr));
    }
    ruleset(&ns)
}

fn nft_available() -> bool {
    Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Annotations that turn the plugin's defaults (status ports excluded, every port and CIDR
/// captured) into Istio's `constructTestConfig` (nothing listed).
const ISTIO_TEST_BASE: &[(&str, &str)] = &[
    ("traffic.sidecar.istio.io/includeInboundPorts", ""),
    ("traffic.sidecar.istio.io/excludeOutboundPorts", ""),
    ("traffic.sidecar.istio.io/includeOutboundIPRanges", ""),
];

struct Case {
    golden: &'static str,
    annotations: &'static [(&'static str, &'static str)],
    /// The golden predates `counter`.
    no_counters: bool,
    /// The golden predates mangle `output` becoming a `route` chain.
    filter_output: bool,
}

const CASES: &[Case] = &[
    Case {
        golden: "empty.golden",
        annotations: &[],
        no_counters: true,
        filter_output: false,
    },
    Case {
        golden: "basic-exclude-nic.golden",
        annotations: &[(
            "traffic.sidecar.istio.io/excludeInterfaces",
            "not-istio-nic",
        )],
        no_counters: false,
        filter_output: false,
    },
    Case {
        golden: "inbound-ports-include.golden",
        annotations: &[(
            "traffic.sidecar.istio.io/includeInboundPorts",
            "32000,31000",
        )],
        no_counters: true,
        filter_output: false,
    },
    Case {
        golden: "inbound-ports-tproxy.golden",
        annotations: &[
            (
                "traffic.sidecar.istio.io/includeInboundPorts",
                "32000,31000",
            ),
            ("sidecar.istio.io/interceptionMode", "TPROXY"),
        ],
        no_counters: true,
        filter_output: true,
    },
    Case {
        golden: "kube-virt-interfaces.golden",
        annotations: &[
            ("traffic.sidecar.istio.io/includeOutboundIPRanges", "*"),
            ("traffic.sidecar.istio.io/kubevirtInterfaces", "eth1,eth2"),
        ],
        no_counters: true,
        filter_output: false,
    },
];

#[test]
fn nftables_add_matches_istio_goldens() -> Result<()> {
    if !fastpath_tests::require_privileges!() {
        return Ok(());
    }
    assert!(
        nft_available(),
        "the nft binary is needed by this test (scripts/setup.sh)"
    );
    let node = Node::new()?;
    for (i, case) in CASES.iter().enumerate() {
        let mut annotations: Vec<(&str, &str)> = ISTIO_TEST_BASE.to_vec();
        for (k, v) in case.annotations {
            annotations.retain(|(key, _)| key != k);
            annotations.push((k, v));
        }
        let pod = format!("golden-{i}");
        let ns = node.add_pod(&pod, &annotations)?;
        let mut got = ruleset(&ns)?;
        let text = std::fs::read_to_string(golden_path(case.golden))?;
        let mut want = loaded(&text, &format!("g{i}"))?;
        if case.no_counters {
            got = without_counters(&got);
            want = without_counters(&want);
        }
        if case.filter_output {
            for o in &mut got {
                if o["chain"]["table"] == "istio-proxy-mangle" && o["chain"]["name"] == "output" {
                    assert_eq!(o["chain"]["type"], "route", "{o}");
                    o["chain"]["type"] = json!("filter");
                }
            }
        }
        assert_eq!(
            got, want,
            "{}: the pod's ruleset differs from Istio's",
            case.golden
        );
        node.run("DEL", &node.conf(true, "10.248.40.2"), &ns, &pod)?;
    }
    Ok(())
}

/// The IPv4 ruleset the plugin builds for a sidecar pod with these annotations.
fn pod_ruleset(
    name: &str,
    annotations: &[(&str, &str)],
) -> Result<fastpath_cni_plugin::nftables::Ruleset> {
    let podv = sidecar_pod("default", name, annotations, &[]);
    let p = fastpath_cni_plugin::pod::Pod::from_json(podv.to_string().as_bytes())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let r = fastpath_cni_plugin::redirect::from_pod(&p).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(fastpath_cni_plugin::nftables::build(&r, false))
}

/// Variants no stored golden covers: the ruleset the plugin programs equals its own
/// transaction text loaded by `nft` (so the netlink encoding is nft's), and holds what the
/// annotations ask for.
#[test]
fn annotation_variants_are_encoded_as_nft_would() -> Result<()> {
    if !fastpath_tests::require_privileges!() {
        return Ok(());
    }
    let node = Node::new()?;
    let variants: &[&[(&str, &str)]] = &[
        &[(
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "10.96.0.1/32,10.0.0.0/12",
        )],
        &[
            ("sidecar.istio.io/interceptionMode", "TPROXY"),
            (
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                "10.96.0.0/12",
            ),
        ],
        // istio#58135: TPROXY without inbound ports.
        &[
            ("sidecar.istio.io/interceptionMode", "TPROXY"),
            ("traffic.sidecar.istio.io/includeInboundPorts", ""),
        ],
    ];
    for (i, annotations) in variants.iter().enumerate() {
        let pod = format!("variant-{i}");
        let ns = node.add_pod(&pod, annotations)?;
        let got = ruleset(&ns)?;
        let text = pod_ruleset(&pod, annotations)?.transaction_text();
        assert_eq!(got, loaded(&text, &format!("v{i}"))?, "{annotations:?}");
        let listing = ns.exec_ok(&["nft", "list", "ruleset"])?;
        match i {
            0 => assert!(
                listing.contains("ip daddr 10.0.0.0/12 counter packets 0 bytes 0 return"),
                "{listing}"
            ),
            1 => assert!(listing.contains("tproxy ip to :15006"), "{listing}"),
            _ => {
                let (_, mangle) = listing
                    .split_once("table inet istio-proxy-mangle")
                    .context("no mangle table")?;
                assert!(mangle.contains("chain output"), "{listing}");
                assert!(!mangle.contains("chain istio-inbound"), "{listing}");
            }
        }
    }
    Ok(())
}

#[test]
fn check_passes_and_del_leaves_no_table() -> Result<()> {
    if !fastpath_tests::require_privileges!() {
        return Ok(());
    }
    let node = Node::new()?;
    let conf = node.conf(true, "10.248.40.2");
    let ns = node.add_pod(
        "checked",
        &[("sidecar.istio.io/interceptionMode", "TPROXY")],
    )?;
    node.run("CHECK", &conf, &ns, "checked")?;
    // A repeated ADD replaces the rules (the batch flushes each table first).
    node.run("ADD", &conf, &ns, "checked").ok();
    node.run("CHECK", &conf, &ns, "checked")?;
    ns.exec_ok(&[
        "nft",
        "flush",
        "chain",
        "inet",
        "istio-proxy-nat",
        "istio-output",
    ])?;
    let err = node
        .run("CHECK", &conf, &ns, "checked")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("istio-proxy-nat/istio-output: 0 rules"),
        "{err}"
    );
    node.run("DEL", &conf, &ns, "checked")?;
    let tables = ns.exec_ok(&["nft", "list", "tables"])?;
    assert_eq!(tables.trim(), "", "tables left after DEL");
    // DEL again (nothing left) and DEL of a gone netns succeed.
    node.run("DEL", &conf, &ns, "checked")?;
    Ok(())
}

#[test]
fn iptables_and_nftables_pods_coexist_on_a_node() -> Result<()> {
    if !fastpath_tests::require_privileges!() {
        return Ok(());
    }
    let node = Node::new()?;
    node.api.set_pod(sidecar_pod("default", "ipt", &[], &[]));
    let ipt = NetNs::new(&format!("fpn-{}-ipt", std::process::id()))?;
    node.run("ADD", &node.conf(false, "10.248.41.2"), &ipt, "ipt")?;
    let nft = node.add_pod("nft", &[])?;
    // Each netns holds its own backend's rules and none of the other's.
    let saved = ipt.exec_ok(&["iptables-save"])?;
    assert!(saved.contains("-A ISTIO_OUTPUT"), "{saved}");
    let ipt_tables = ipt.exec_ok(&["nft", "list", "tables"])?;
    assert!(!ipt_tables.contains("istio-proxy"), "{ipt_tables}");
    let nft_tables = nft.exec_ok(&["nft", "list", "tables"])?;
    assert!(
        nft_tables.contains("table inet istio-proxy-nat"),
        "{nft_tables}"
    );
    let saved = nft.exec_ok(&["iptables-save"])?;
    assert!(!saved.contains("ISTIO_"), "{saved}");
    node.run("CHECK", &node.conf(false, "10.248.41.2"), &ipt, "ipt")?;
    node.run("CHECK", &node.conf(true, "10.248.40.2"), &nft, "nft")?;
    Ok(())
}

/// A batch asks the kernel for one ACK, after its last message. A message that fails earlier
/// must still fail the ADD with the kernel's error, and the kernel must have applied nothing of
/// the batch: here a rule in the middle jumps to a chain the batch never makes.
#[test]
fn a_batch_with_one_failing_rule_applies_nothing_and_names_the_error() -> Result<()> {
    use fastpath_cni_plugin::iptables::Netns;
    use fastpath_cni_plugin::nftables::{RuleOp, Stmt, Verdict, netlink};
    if !fastpath_tests::require_privileges!() {
        return Ok(());
    }
    let ns = NetNs::new(&format!("fpn-{}-failing", std::process::id()))?;
    let mut set = pod_ruleset("failing", &[])?;
    let table = &mut set.tables[0];
    let chain = table.chains[0].name;
    let middle = table.ops.len() / 2;
    table.ops.insert(
        middle,
        RuleOp {
            chain,
            index: None,
            stmts: vec![Stmt::Verdict(Verdict::Jump("no-such-chain"))],
        },
    );
    let netns = Netns::open(&ns.path())?;
    let err = netlink::apply(&netns, &set).unwrap_err().to_string();
    assert!(
        err.contains("nf_tables transaction") && err.contains("No such file or directory"),
        "{err}"
    );
    let tables = ns.exec_ok(&["nft", "list", "tables"])?;
    assert_eq!(tables.trim(), "", "a refused batch left tables behind");
    // The same set without the bad rule goes through on the same netns.
    set.tables[0].ops.remove(middle);
    netlink::apply(&netns, &set)?;
    let counts = netlink::rule_counts(&netns)?;
    assert!(!counts.is_empty(), "{counts:?}");
    Ok(())
}

/// The plugin steps into the pod netns on its own thread (`NetnsEntry::CallingThread`), the
/// installer on a thread of its own: either way the work runs in the pod's netns and the caller
/// is back in its own netns afterwards, also after work that failed.
#[test]
fn work_in_the_pod_netns_runs_there_and_the_caller_comes_back() -> Result<()> {
    use fastpath_cni_plugin::iptables::{Netns, NetnsEntry};
    use std::os::unix::fs::MetadataExt as _;
    if !fastpath_tests::require_privileges!() {
        return Ok(());
    }
    let ns = NetNs::new(&format!("fpn-{}-entry", std::process::id()))?;
    let pod_ino = std::fs::metadata(ns.path())?.ino();
    let own_ino = || std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino());
    let home = own_ino()?;
    assert_ne!(home, pod_ino);
    for entry in [NetnsEntry::CallingThread, NetnsEntry::OwnThread] {
        let netns = Netns::open_with(&ns.path(), entry)?;
        let inside = netns.run(own_ino)??;
        assert_eq!(
            inside, pod_ino,
            "{entry:?}: the work ran outside the pod netns"
        );
        assert_eq!(own_ino()?, home, "{entry:?}: the caller did not come back");
        let failed: std::io::Result<()> = netns.run(|| Err(std::io::Error::other("boom")))?;
        assert!(failed.is_err());
        assert_eq!(own_ino()?, home, "{entry:?}: no way back after a failure");
    }
    Ok(())
}
