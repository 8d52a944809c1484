//! The built `istio-cni` run as a container runtime runs it: chained after Debian's reference
//! plugins (bridge + host-local, and loopback for `lo`) in a netns made by the test, with the
//! test's HTTPS API server serving the pods. Then real traffic through the applied rules.
//!
//! Subnets: 10.248.1-19.0/24 (this file), bridges `fpc<pid><n>`.
use anyhow::Result;
use fastpath_tests::cni::{Attachment, RunsFailed, Runtime, ScratchNet};
use fastpath_tests::kube_api::{FakeKubeApi, ServerCert, Trust, plain_pod, sidecar_pod};
use fastpath_tests::netns::NetNs;
use serde_json::{Value, json};
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN: &str = "test-sa-token";

/// A throwaway "node": CNI dirs, run dir with kubeconfig, bridge, API server.
struct Node {
    net: ScratchNet,
    api: FakeKubeApi,
    rt: Runtime,
    subnet: u8,
}

impl Node {
    fn new(subnet: u8) -> Result<Self> {
        let net = ScratchNet::new("fpc")?;
        std::fs::create_dir_all(net.dir.join("run"))?;
        let api = FakeKubeApi::start(&net.dir.join("api"), TOKEN)?;
        api.write_kubeconfig(&net.dir.join("run/istio-cni-kubeconfig"), Trust::Ca, TOKEN)?;
        let rt = Runtime::with_built_plugin(net.dir.join("cache"), vec![]);
        Ok(Self {
            net,
            api,
            rt,
            subnet,
        })
    }

    fn run_dir(&self) -> PathBuf {
        self.net.dir.join("run")
    }

    /// The istio-cni conflist entry (Istio's keys) plus `extra`.
    fn istio_entry(&self, extra: &Value) -> Value {
        let mut e = json!({
            "type": "istio-cni",
            "ipam": {}, "dns": {},
            "plugin_log_level": "debug",
            "cni_agent_run_dir": self.run_dir(),
            "ambient_enabled": false,
            "enablement_selectors": [],
            "exclude_namespaces": ["kube-system"],
            "pod_namespace": "istio-system",
            "native_nftables": false,
            "enable_ambient_detection_retry": false,
            "fastpath_pod_retrieval_max_retries": 2,
            "fastpath_pod_retrieval_interval_ms": 20
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            e[k] = v.clone();
        }
        e
    }

    fn conflist(&self, extra: &Value) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": format!("net-{}", self.net.bridge),
            "plugins": [
                {
                    "type": "bridge", "bridge": self.net.bridge, "isGateway": true, "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": self.net.dir.join("ipam"),
                        "ranges": [[{"subnet": format!("10.248.{}.0/24", self.subnet)}]]
                    }
                },
                self.istio_entry(extra)
            ]
        })
    }

    fn lo_list() -> Value {
        json!({"cniVersion": "1.0.0", "name": "cni-loopback", "plugins": [{"type": "loopback"}]})
    }

    /// Makes a pod netns and runs lo + the chain for it. Returns the pod even if ADD failed.
    fn add_pod(&self, ns: &str, name: &str, extra: &Value) -> (Pod, Result<Value>) {
        let netns = NetNs::new(&fastpath_tests::unique_name("fpcp")).expect("netns");
        let att = Attachment {
            container_id: format!("cid-{}", netns.name),
            netns: netns.path(),
            ifname: "eth0".into(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=cid-{};K8S_POD_UID=uid-{name}",
                netns.name
            ),
        };
        let lo_att = Attachment {
            ifname: "lo".into(),
            ..att.clone()
        };
        self.rt
            .add(&Self::lo_list(), &lo_att)
            .expect("loopback ADD");
        let list = self.conflist(extra);
        let res = self.rt.add(&list, &att).map(|(r, _)| r);
        (Pod { netns, att, list }, res)
    }
}

struct Pod {
    netns: NetNs,
    att: Attachment,
    list: Value,
}

impl Pod {
    fn ip(result: &Value) -> Ipv4Addr {
        let a = result["ips"][0]["address"].as_str().expect("pod address");
        a.split('/').next().unwrap().parse().unwrap()
    }

    fn save(&self, bin: &str) -> String {
        self.netns.exec_ok(&[bin]).unwrap_or_default()
    }
}

/// Runs `f` on a thread inside `netns`, with the given file-system uid/gid (what `-m owner`
/// matches for sockets the thread creates).
fn in_netns<T: Send>(netns: &str, ids: Option<(u32, u32)>, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(netns).expect("open netns");
            // SAFETY: per-thread namespace and fs credential changes on this scoped thread.
            unsafe {
                assert_eq!(
                    libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET),
                    0,
                    "setns"
                );
                if let Some((uid, gid)) = ids {
                    libc::setfsgid(gid);
                    libc::setfsuid(uid);
                }
            }
            f()
        })
        .join()
        .expect("netns thread")
    })
}

fn listen(netns: &str, port: u16) -> TcpListener {
    in_netns(netns, None, || {
        let l = TcpListener::bind(("0.0.0.0", port)).expect("bind listener");
        l.set_nonblocking(true).unwrap();
        l
    })
}

fn connect(netns: &str, ids: (u32, u32), dst: SocketAddrV4) -> std::io::Result<TcpStream> {
    in_netns(netns, Some(ids), || {
        TcpStream::connect_timeout(&SocketAddr::V4(dst), Duration::from_secs(2))
    })
}

fn accept_within(l: &TcpListener, d: Duration) -> Option<(TcpStream, SocketAddr)> {
    let until = Instant::now() + d;
    loop {
        match l.accept() {
            Ok(c) => return Some(c),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(_) => return None,
        }
    }
}

/// `SO_ORIGINAL_DST` of a redirected connection.
fn original_dst(s: &TcpStream) -> SocketAddrV4 {
    fastpath_tests::sidecar::original_dst(s).expect("getsockopt SO_ORIGINAL_DST")
}

const APP: (u32, u32) = (1000, 1000);
const PROXY: (u32, u32) = (1337, 1337);

/// A one-line exchange so both ends really talk.
fn exchange(client: &mut TcpStream, server: &mut TcpStream) {
    server.set_nonblocking(false).unwrap();
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
}

/// CHECK on `pod` fails, and the plugin's error details name `what`.
fn check_fails_naming(node: &Node, pod: &Pod, what: &str) {
    let err = node
        .rt
        .check(&pod.list, &pod.att)
        .expect_err(&format!("CHECK must see what is missing: {what}"));
    let runs = &err.downcast_ref::<RunsFailed>().unwrap().0;
    let e: Value = serde_json::from_str(&runs.last().unwrap().stdout).unwrap();
    assert!(e["details"].as_str().unwrap().contains(what), "{e}");
}

#[test]
fn plugin_chain_mesh_pod_traffic_is_redirected() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let node = Node::new(1).unwrap();
    // A plain pod acting as a server; its ADD passes through.
    node.api.set_pod(plain_pod("shop", "db-0"));
    let (server, res) = node.add_pod("shop", "db-0", &json!({}));
    let server_ip = Pod::ip(&res.expect("server ADD"));
    assert!(
        !server.save("iptables-nft-save").contains("ISTIO"),
        "a pod without sidecar gets no rules"
    );

    node.api.set_pod(sidecar_pod(
        "shop",
        "web-0",
        &[("traffic.sidecar.istio.io/excludeOutboundPorts", "8081")],
        &[],
    ));
    let (mesh, res) = node.add_pod("shop", "web-0", &json!({}));
    let result = res.expect("mesh pod ADD");
    let mesh_ip = Pod::ip(&result);
    let mesh_ns = mesh.netns.path();
    assert_eq!(node.api.requests_for("shop", "web-0"), 1);
    let req = &node.api.requests()[node.api.requests().len() - 1];
    assert_eq!(req.authorization.as_deref(), Some("Bearer test-sa-token"));
    let saved = mesh.save("iptables-nft-save");
    assert!(saved.contains(":ISTIO_OUTPUT"), "{saved}");
    // A ClusterIP-style address, routed into the bridge segment where nobody answers for it.
    mesh.netns
        .exec_ok(&["ip", "route", "add", "10.96.0.0/12", "dev", "eth0"])
        .unwrap();

    let outbound = listen(&mesh_ns, 15001);
    let inbound = listen(&mesh_ns, 15006);
    let server_ns = server.netns.path();
    let server80 = listen(&server_ns, 80);
    let server8081 = listen(&server_ns, 8081);

    // 1. app -> ClusterIP lands on 15001 with the dialled address as original destination.
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
    let mut c = connect(&mesh_ns, APP, vip).expect("app connects to the VIP");
    let (mut s, _) = accept_within(&outbound, Duration::from_secs(2)).expect("lands on 15001");
    assert_eq!(original_dst(&s), vip);
    exchange(&mut c, &mut s);

    // 2. app -> other pod:80 is redirected too.
    let db80 = SocketAddrV4::new(server_ip, 80);
    let _c = connect(&mesh_ns, APP, db80).expect("app connects to db");
    let (s, _) = accept_within(&outbound, Duration::from_secs(2)).expect("lands on 15001");
    assert_eq!(original_dst(&s), db80);
    assert!(accept_within(&server80, Duration::from_millis(100)).is_none());

    // 3. the proxy's uid (1337) is not redirected: it reaches the server.
    let mut c = connect(&mesh_ns, PROXY, db80).expect("proxy connects to db");
    let (mut s, peer) = accept_within(&server80, Duration::from_secs(2)).expect("reaches db");
    assert_eq!(peer.ip(), std::net::IpAddr::V4(mesh_ip));
    exchange(&mut c, &mut s);
    assert!(accept_within(&outbound, Duration::from_millis(100)).is_none());

    // 4. an excluded outbound port is not redirected.
    let db8081 = SocketAddrV4::new(server_ip, 8081);
    let _c = connect(&mesh_ns, APP, db8081).expect("app connects to db:8081");
    assert!(accept_within(&server8081, Duration::from_secs(2)).is_some());
    assert!(accept_within(&outbound, Duration::from_millis(100)).is_none());

    // 5. into the pod IP lands on 15006.
    let web8080 = SocketAddrV4::new(mesh_ip, 8080);
    let mut c = connect(&server_ns, APP, web8080).expect("db connects to web");
    let (mut s, _) = accept_within(&inbound, Duration::from_secs(2)).expect("lands on 15006");
    assert_eq!(original_dst(&s), web8080);
    exchange(&mut c, &mut s);

    // 6. the status port 15021 is excluded inbound: nobody listens there, so it is refused.
    let web15021 = SocketAddrV4::new(mesh_ip, 15021);
    assert!(connect(&server_ns, APP, web15021).is_err());
    assert!(accept_within(&inbound, Duration::from_millis(100)).is_none());

    // CHECK passes on the configured pod (with the cached result as prevResult).
    node.rt.check(&mesh.list, &mesh.att).expect("CHECK");

    // DEL, DEL again, DEL without netns.
    let ipam_file = node
        .net
        .dir
        .join("ipam")
        .join(format!("net-{}", node.net.bridge))
        .join(mesh_ip.to_string());
    assert!(ipam_file.exists());
    node.rt.del(&mesh.list, &mesh.att).expect("DEL");
    assert!(!ipam_file.exists(), "the chain's DEL ran");
    node.rt.del(&mesh.list, &mesh.att).expect("second DEL");
    let no_netns = Attachment {
        netns: String::new(),
        ..mesh.att.clone()
    };
    let run = node
        .rt
        .exec_plugin("DEL", &plugin_conf(&mesh.list, 1, None), &no_netns)
        .unwrap();
    assert_eq!(
        (run.status, run.stdout.as_str()),
        (0, ""),
        "DEL without netns: {}",
        run.stderr
    );
    // DEL after the netns is gone (the runtime may call it after the sandbox died).
    Command::new("ip")
        .args(["netns", "del", &mesh.netns.name])
        .status()
        .unwrap();
    assert!(!std::path::Path::new(&mesh.att.netns).exists());
    let run = node
        .rt
        .exec_plugin("DEL", &plugin_conf(&mesh.list, 1, Some(&result)), &mesh.att)
        .unwrap();
    assert_eq!(
        (run.status, run.stdout.as_str()),
        (0, ""),
        "DEL with the netns gone: {}",
        run.stderr
    );
    node.rt.del(&server.list, &server.att).expect("server DEL");
}

/// The stdin the runtime gives plugin `i` of a conflist.
fn plugin_conf(list: &Value, i: usize, prev: Option<&Value>) -> Value {
    let mut c = list["plugins"][i].clone();
    c["name"] = list["name"].clone();
    c["cniVersion"] = list["cniVersion"].clone();
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    c
}

#[test]
fn plugin_chain_excluded_cidr_and_pass_through_pods() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let node = Node::new(2).unwrap();
    node.api.set_pod(plain_pod("shop", "db-0"));
    let (server, res) = node.add_pod("shop", "db-0", &json!({}));
    let bridge_result = res.unwrap();
    let server_ip = Pod::ip(&bridge_result);
    // The plugin passes the bridge's result through unchanged (same version, all fields).
    assert!(bridge_result["interfaces"].as_array().unwrap().len() >= 2);

    node.api.set_pod(sidecar_pod(
        "shop",
        "web-1",
        &[(
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            &format!("{server_ip}/32"),
        )],
        &[],
    ));
    let (mesh, res) = node.add_pod("shop", "web-1", &json!({}));
    res.expect("mesh ADD");
    let mesh_ns = mesh.netns.path();
    let outbound = listen(&mesh_ns, 15001);
    let server80 = listen(&server.netns.path(), 80);
    let _c = connect(&mesh_ns, APP, SocketAddrV4::new(server_ip, 80)).expect("connect");
    assert!(
        accept_within(&server80, Duration::from_secs(2)).is_some(),
        "excluded CIDR reaches the server"
    );
    assert!(accept_within(&outbound, Duration::from_millis(100)).is_none());

    // Excluded namespace, the agent's own pod and a pod without K8S args: no API call at all.
    let before = node.api.requests().len();
    let (p1, r1) = node.add_pod("kube-system", "coredns-1", &json!({}));
    let (p2, r2) = node.add_pod("istio-system", "istio-cni-node-abcde", &json!({}));
    assert!(r1.is_ok() && r2.is_ok());
    assert_eq!(node.api.requests().len(), before);
    for p in [&p1, &p2] {
        assert!(!p.save("iptables-nft-save").contains("ISTIO"));
    }
    // Injection disabled by label: looked up, not redirected.
    let mut v = sidecar_pod("shop", "off-0", &[], &[]);
    v["metadata"]["labels"]["sidecar.istio.io/inject"] = json!("false");
    node.api.set_pod(v);
    let (p3, r3) = node.add_pod("shop", "off-0", &json!({}));
    r3.unwrap();
    assert_eq!(node.api.requests_for("shop", "off-0"), 1);
    assert!(!p3.save("iptables-nft-save").contains("ISTIO"));
    for p in [&server, &mesh, &p1, &p2, &p3] {
        node.rt.del(&p.list, &p.att).unwrap();
    }
}

fn failure_of(res: Result<Value>) -> Value {
    let err = res.expect_err("ADD must fail");
    let runs = &err.downcast_ref::<RunsFailed>().expect("plugin runs").0;
    let last = runs.last().unwrap();
    assert_eq!(last.plugin_type, "istio-cni");
    assert_ne!(last.status, 0);
    serde_json::from_str(&last.stdout).expect("CNI error JSON on stdout")
}

#[test]
fn plugin_chain_hostile_annotations_fail_add_closed() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let node = Node::new(3).unwrap();
    let cases = [
        (
            "traffic.sidecar.istio.io/excludeInboundPorts",
            "22 -j ACCEPT",
        ),
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "0.0.0.0/0\n-A OUTPUT -j DROP",
        ),
        ("sidecar.istio.io/interceptionMode", "NONE"),
        ("traffic.sidecar.istio.io/excludeInterfaces", "eth0;reboot"),
    ];
    for (i, (key, value)) in cases.iter().enumerate() {
        let name = format!("evil-{i}");
        node.api
            .set_pod(sidecar_pod("shop", &name, &[(key, value)], &[]));
        let (pod, res) = node.add_pod("shop", &name, &json!({}));
        let e = failure_of(res);
        let msg = e["msg"].as_str().unwrap();
        assert!(
            msg.contains(key) && msg.contains(&format!("{value:?}")),
            "{msg}"
        );
        assert_eq!(e["code"], 999);
        assert!(
            !pod.save("iptables-nft-save").contains("ISTIO"),
            "nothing applied"
        );
        node.rt.del(&pod.list, &pod.att).unwrap();
    }
}

/// Runs only the istio-cni entry (no chain) for a pod in a bare netns.
fn add_alone(
    node: &Node,
    ns: &str,
    name: &str,
    extra: &Value,
) -> (NetNs, fastpath_tests::cni::PluginRun) {
    let netns = NetNs::new(&fastpath_tests::unique_name("fpca")).unwrap();
    let run = add_alone_in(node, &netns.path(), ns, name, extra);
    (netns, run)
}

fn add_alone_in(
    node: &Node,
    netns: &str,
    ns: &str,
    name: &str,
    extra: &Value,
) -> fastpath_tests::cni::PluginRun {
    let att = Attachment {
        container_id: "cid-alone".into(),
        netns: netns.to_string(),
        ifname: "eth0".into(),
        args: format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}"),
    };
    let mut conf = node.istio_entry(extra);
    conf["name"] = json!("k8s-pod-network");
    conf["cniVersion"] = json!("0.3.1");
    node.rt.exec_plugin("ADD", &conf, &att).unwrap()
}

#[test]
fn plugin_chain_pod_with_its_own_user_namespace() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    // A pod with `hostUsers: false`: its netns belongs to a child user namespace.
    let node = Node::new(9).unwrap();
    struct Holder(std::process::Child);
    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    for (backend, mode) in [("nft", "REDIRECT"), ("legacy", "TPROXY")] {
        let holder = Holder(
            Command::new("unshare")
                .args(["--user", "--net", "sleep", "60"])
                .spawn()
                .expect("unshare"),
        );
        let pid = holder.0.id();
        let netns = format!("/proc/{pid}/ns/net");
        let host_userns = std::fs::read_link("/proc/self/ns/user").unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{pid}/ns/user")).ok() == Some(host_userns.clone()) {
            assert!(
                Instant::now() < until,
                "unshare did not enter its user namespace"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // As kubelet does: the pod's ids 0-65535 are a high range of host ids.
        for map in ["uid_map", "gid_map"] {
            std::fs::write(format!("/proc/{pid}/{map}"), "0 1500000 65536\n").unwrap();
        }
        let name = format!("userns-{backend}");
        node.api.set_pod(sidecar_pod(
            "shop",
            &name,
            &[("sidecar.istio.io/interceptionMode", mode)],
            &[],
        ));
        let run = add_alone_in(
            &node,
            &netns,
            "shop",
            &name,
            &json!({"fastpath_iptables_backend": backend}),
        );
        assert_eq!(run.status, 0, "{backend}: {} {}", run.stdout, run.stderr);
        let out = Command::new("nsenter")
            .arg(format!("--net={netns}"))
            .arg(format!("iptables-{backend}-save"))
            .output()
            .unwrap();
        let saved = String::from_utf8_lossy(&out.stdout);
        assert!(saved.contains("--uid-owner 1337"), "{backend}: {saved}");
        drop(holder);
    }
}

#[test]
fn plugin_chain_api_failures_are_handled_as_istio() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let node = Node::new(4).unwrap();
    node.api.set_pod(sidecar_pod("shop", "web", &[], &[]));
    let kubeconfig = node.run_dir().join("istio-cni-kubeconfig");

    // Skip-verify kubeconfig works; no prevResult gives the empty result of the config version.
    node.api
        .write_kubeconfig(&kubeconfig, Trust::SkipVerify, TOKEN)
        .unwrap();
    let (ns, run) = add_alone(&node, "shop", "web", &json!({}));
    assert_eq!(run.status, 0, "{} {}", run.stdout, run.stderr);
    assert_eq!(
        serde_json::from_str::<Value>(&run.stdout).unwrap(),
        json!({"cniVersion": "0.3.1"})
    );
    let saved = ns.exec_ok(&["iptables-nft-save"]).unwrap();
    assert!(saved.contains("ISTIO_OUTPUT"));
    // ADD again for the same netns: the rules are in place, so it succeeds without doubling them.
    let again = add_alone_in(&node, &ns.path(), "shop", "web", &json!({}));
    assert_eq!(again.status, 0, "{} {}", again.stdout, again.stderr);
    let rules = |t: &str| t.lines().filter(|l| l.starts_with("-A")).count();
    assert_eq!(
        rules(&ns.exec_ok(&["iptables-nft-save"]).unwrap()),
        rules(&saved)
    );
    assert!(
        again.stderr.contains("already in place"),
        "{}",
        again.stderr
    );

    // 401: a rejected token, retried (2 attempts here), then ADD fails naming the cause.
    node.api
        .write_kubeconfig(&kubeconfig, Trust::Ca, "stale-token")
        .unwrap();
    let before = node.api.requests_for("shop", "web");
    let (_ns, run) = add_alone(&node, "shop", "web", &json!({}));
    let e: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(run.status, 1);
    assert!(
        e["msg"].as_str().unwrap().contains("Unauthorized (401)"),
        "{e}"
    );
    assert_eq!(node.api.requests_for("shop", "web") - before, 2);

    // 403 and 404 fail (code 999); 5xx fails as "try again later" (11).
    node.api
        .write_kubeconfig(&kubeconfig, Trust::Ca, TOKEN)
        .unwrap();
    node.api
        .force_status("shop", "web", 403, "pods \"web\" is forbidden");
    let (_ns, run) = add_alone(&node, "shop", "web", &json!({}));
    let e: Value = serde_json::from_str(&run.stdout).unwrap();
    assert!(
        e["msg"].as_str().unwrap().contains("Forbidden (403)"),
        "{e}"
    );
    assert_eq!(e["code"], 999);
    let (_ns, run) = add_alone(&node, "shop", "missing", &json!({}));
    let e: Value = serde_json::from_str(&run.stdout).unwrap();
    assert!(
        e["msg"].as_str().unwrap().contains("pod not found (404)"),
        "{e}"
    );
    node.api.force_status("shop", "web", 503, "etcd is down");
    let (_ns, run) = add_alone(&node, "shop", "web", &json!({}));
    let e: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(e["code"], 11, "{e}");
    assert!(e["msg"].as_str().unwrap().contains("etcd is down"));

    // A redirect is not followed (it could take the token elsewhere, or to plain http): ADD
    // fails at once, naming where it pointed, after one request.
    node.api.set_pod(sidecar_pod("shop", "moved", &[], &[]));
    node.api.force_status(
        "shop",
        "moved",
        302,
        "http://203.0.113.9/api/v1/namespaces/shop/pods/moved",
    );
    let before = node.api.requests().len();
    let (_ns, run) = add_alone(&node, "shop", "moved", &json!({}));
    let e: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(run.status, 1);
    assert!(
        e["msg"]
            .as_str()
            .unwrap()
            .contains("redirect (302, to http://203.0.113.9/"),
        "{e}"
    );
    assert_eq!(
        node.api.requests().len() - before,
        2,
        "retried as Istio does, never followed"
    );

    // A CA that did not sign the server: TLS verification fails, no request is served, and
    // it is not retried: the message names the certificate and what to check.
    node.api.set_pod(sidecar_pod("shop", "web2", &[], &[]));
    node.api
        .write_kubeconfig(&kubeconfig, Trust::WrongCa, TOKEN)
        .unwrap();
    let (_ns, run) = add_alone(&node, "shop", "web2", &json!({}));
    assert_eq!(run.status, 1);
    assert!(
        run.stdout.contains("certificate is not trusted")
            && run.stdout.contains("after 1 attempts")
            && run.stdout.contains("certificate-authority-data"),
        "{}",
        run.stdout
    );
    assert_eq!(node.api.requests_for("shop", "web2"), 0);

    // Names that are not Kubernetes names never reach a URL.
    let before = node.api.requests().len();
    let (_ns, run) = add_alone(&node, "shop", "..%2F..", &json!({}));
    let e: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(e["code"], 4, "{e}");
    assert_eq!(node.api.requests().len(), before);

    // No kubeconfig: excluded namespaces still work; others fail naming the file.
    std::fs::remove_file(&kubeconfig).unwrap();
    let (_ns, run) = add_alone(&node, "kube-system", "dns", &json!({}));
    assert_eq!(run.status, 0);
    let (_ns, run) = add_alone(&node, "shop", "web2", &json!({}));
    assert_eq!(run.status, 1);
    assert!(
        run.stdout.contains("istio-cni-kubeconfig"),
        "{}",
        run.stdout
    );
}

/// The API down or slow: a mesh pod fails closed ("try again later", code 11) within the
/// bound the retries set (attempts x (5 s answer timeout + interval); 2 attempts here, 30 at
/// Istio's default: about 3 min); a pod of an excluded namespace passes without a call.
#[test]
fn plugin_chain_api_down_or_slow_fails_mesh_pods_closed_within_the_bound() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let node = Node::new(10).unwrap();
    node.api.set_pod(sidecar_pod("shop", "web", &[], &[]));
    node.api.delay("shop", "web", Duration::from_secs(10));
    let started = Instant::now();
    let (_ns, run) = add_alone(&node, "shop", "web", &json!({}));
    let took = started.elapsed();
    let e: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!((run.status, e["code"].as_u64()), (1, Some(11)), "{e}");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(12),
        "2 attempts of 5 s: {took:?}"
    );
    assert_eq!(node.api.requests_for("shop", "web"), 2);

    // Down: nothing listens where the kubeconfig points.
    let kubeconfig = node.run_dir().join("istio-cni-kubeconfig");
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    std::fs::write(
        &kubeconfig,
        text.replace(&node.api.url(), &format!("https://{closed}")),
    )
    .unwrap();
    let started = Instant::now();
    let (_ns, run) = add_alone(&node, "shop", "web", &json!({}));
    let e: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!((run.status, e["code"].as_u64()), (1, Some(11)), "{e}");
    assert!(
        e["msg"]
            .as_str()
            .unwrap()
            .contains("cannot reach the API server"),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let (_ns, run) = add_alone(&node, "kube-system", "dns", &json!({}));
    assert_eq!(run.status, 0, "{}", run.stdout);
}

/// Some clusters serve the API with their self-signed CA certificate, which the kubeconfig's
/// CA data holds. Istio's Go client trusts it; rustls alone refused it (`CaUsedAsEndEntity`)
/// and ADD failed after 30 retries with "cannot reach the API server". The name is still
/// checked.
#[test]
fn plugin_chain_trusts_an_api_server_serving_its_own_ca_certificate_as_go_does() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let node = Node::new(9).unwrap();
    let kubeconfig = node.run_dir().join("istio-cni-kubeconfig");
    for (cert, works) in [
        (ServerCert::SelfSignedCa, true),
        (ServerCert::SelfSignedCaOtherName, false),
    ] {
        let dir = std::env::temp_dir().join(fastpath_tests::unique_name("fp-selfsigned-api-"));
        let api = FakeKubeApi::start_with(&dir, TOKEN, cert).unwrap();
        api.set_pod(sidecar_pod("shop", "web", &[], &[]));
        api.write_kubeconfig(&kubeconfig, Trust::Ca, TOKEN).unwrap();
        let (ns, run) = add_alone(&node, "shop", "web", &json!({}));
        if works {
            assert_eq!(run.status, 0, "{cert:?}: {} {}", run.stdout, run.stderr);
            assert!(
                ns.exec_ok(&["iptables-nft-save"])
                    .unwrap()
                    .contains("ISTIO_OUTPUT")
            );
            assert_eq!(api.requests_for("shop", "web"), 1);
        } else {
            assert_eq!(run.status, 1, "{cert:?}");
            assert!(
                run.stdout.contains("certificate is not trusted")
                    && run.stdout.contains("NotValidForName"),
                "{cert:?}: {}",
                run.stdout
            );
            assert_eq!(api.requests_for("shop", "web"), 0);
        }
        drop(api);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn plugin_chain_logs_go_to_the_socket_never_stdout() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let node = Node::new(5).unwrap();
    let sock = node.run_dir().join("log.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let collector = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            let n = c.read(&mut chunk).unwrap();
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some(i) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                if buf.len() >= i + 4 + len {
                    c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        .unwrap();
                    return text;
                }
            }
        }
    });
    node.api.set_pod(sidecar_pod("shop", "web", &[], &[]));
    let (netns, run) = add_alone(&node, "shop", "web", &json!({}));
    assert_eq!(run.status, 0, "{}", run.stdout);
    assert_eq!(
        run.stdout, "{\"cniVersion\":\"0.3.1\"}\n",
        "stdout holds only the result"
    );
    assert_eq!(run.stderr, "", "logs went to the socket");
    let req = collector.join().unwrap();
    assert!(req.starts_with("POST /log HTTP/1.1"));
    let body = &req[req.find("\r\n\r\n").unwrap() + 4..];
    let lines: Vec<String> = serde_json::from_str(body).unwrap();
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        parsed
            .iter()
            .all(|l| l["level"].is_string() && l["time"].is_string() && l["msg"].is_string())
    );
    let applied = parsed
        .iter()
        .find(|l| l["msg"] == "sidecar redirection applied")
        .expect("an info line for the redirected pod");
    assert_eq!(applied["pod"], "shop/web");
    let state = parsed
        .iter()
        .find(|l| l["msg"] == "final iptables state (IPv4)")
        .expect("at debug, the final iptables state is logged");
    assert!(state["state"].as_str().unwrap().contains(":ISTIO_OUTPUT"));
    assert!(
        parsed
            .iter()
            .any(|l| l["level"] == "debug" && l["msg"] == "iptables-restore input (IPv4)"),
        "plugin_log_level debug lets debug lines through"
    );
    assert!(applied["total_ms"].is_number());
    drop(netns);
}

#[test]
fn plugin_chain_tproxy_dns_legacy_and_check() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let node = Node::new(6).unwrap();
    node.api.set_pod(sidecar_pod(
        "shop",
        "tp",
        &[("sidecar.istio.io/interceptionMode", "TPROXY")],
        &[("ISTIO_META_DNS_CAPTURE", "true")],
    ));
    let extra = json!({"fastpath_iptables_backend": "legacy"});
    let (pod, res) = node.add_pod("shop", "tp", &extra);
    res.expect("TPROXY ADD");
    let saved = pod.save("iptables-legacy-save");
    assert!(saved.contains(":ISTIO_TPROXY"), "{saved}");
    assert!(saved.contains("-j TPROXY --on-port 15006"), "{saved}");
    assert!(saved.contains(":ISTIO_OUTPUT_DNS"), "{saved}");
    assert!(
        !pod.save("iptables-nft-save").contains("ISTIO"),
        "legacy only"
    );
    let rules = pod.netns.exec_ok(&["ip", "rule"]).unwrap();
    assert!(rules.contains("fwmark 0x539 lookup 133"), "{rules}");
    let routes = pod
        .netns
        .exec_ok(&["ip", "route", "show", "table", "133"])
        .unwrap();
    assert!(routes.contains("local default dev lo"), "{routes}");

    node.rt.check(&pod.list, &pod.att).expect("CHECK after ADD");
    pod.netns
        .exec_ok(&["ip", "-4", "rule", "del", "fwmark", "1337", "lookup", "133"])
        .unwrap();
    check_fails_naming(&node, &pod, "fwmark 0x539 lookup 133");
    pod.netns
        .exec_ok(&["ip", "-4", "rule", "add", "fwmark", "1337", "lookup", "133"])
        .unwrap();
    node.rt
        .check(&pod.list, &pod.att)
        .expect("CHECK with the rule back");
    pod.netns
        .exec_ok(&["iptables-legacy", "-t", "mangle", "-F", "ISTIO_DIVERT"])
        .unwrap();
    check_fails_naming(&node, &pod, "mangle/ISTIO_DIVERT");
    node.rt.del(&pod.list, &pod.att).unwrap();
}

#[test]
fn plugin_chain_ipv6_pod_gets_ip6tables_rules() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let node = Node::new(7).unwrap();
    node.api.set_pod(sidecar_pod("shop", "v6", &[], &[]));
    let mut list = node.conflist(&json!({}));
    list["plugins"][0]["ipam"]["ranges"] = json!([[{"subnet": "fd00:248:7::/64"}]]);
    let netns = NetNs::new(&fastpath_tests::unique_name("fpc6")).unwrap();
    let att = Attachment {
        container_id: "cid-v6".into(),
        netns: netns.path(),
        ifname: "eth0".into(),
        args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=v6".into(),
    };
    node.rt
        .add(
            &Node::lo_list(),
            &Attachment {
                ifname: "lo".into(),
                ..att.clone()
            },
        )
        .unwrap();
    let (result, _) = node.rt.add(&list, &att).expect("IPv6 ADD");
    assert!(
        result["ips"][0]["address"]
            .as_str()
            .unwrap()
            .starts_with("fd00:248:7::")
    );
    let v6 = netns.exec_ok(&["ip6tables-nft-save"]).unwrap();
    assert!(v6.contains("-A ISTIO_OUTPUT -d ::1/128 -j RETURN"), "{v6}");
    assert!(
        v6.contains("-s ::6/128 -o lo -j RETURN") || v6.contains("-o lo -s ::6/128"),
        "{v6}"
    );
    let lo = netns
        .exec_ok(&["ip", "-6", "addr", "show", "dev", "lo"])
        .unwrap();
    assert!(lo.contains("::6/128"), "{lo}");
    // the IPv4 rules are applied as well (as Istio)
    assert!(
        netns
            .exec_ok(&["iptables-nft-save"])
            .unwrap()
            .contains("ISTIO_OUTPUT")
    );
    node.rt.del(&list, &att).unwrap();
}

#[test]
fn plugin_chain_binary_speaks_the_protocol() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let bin = fastpath_tests::bin_path("istio-cni");
    let out = Command::new(&bin)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 7);
    // No command: the about text on stderr, nothing on stdout.
    let out = Command::new(&bin).env_clear().output().unwrap();
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CNI protocol versions supported"));

    // A 0.2.0 prevResult given to a 1.0.0 config is converted; unknown fields survive.
    let node = Node::new(8).unwrap();
    let netns = NetNs::new(&fastpath_tests::unique_name("fpcv")).unwrap();
    let att = Attachment {
        container_id: "cid-v".into(),
        netns: netns.path(),
        ifname: "eth0".into(),
        args: "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=x".into(),
    };
    let mut conf = node.istio_entry(&json!({}));
    conf["name"] = json!("k8s-pod-network");
    conf["cniVersion"] = json!("1.0.0");
    conf["prevResult"] = json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.248.8.2/24", "gateway": "10.248.8.1"}, "dns": {}, "vendor": 1});
    let run = node.rt.exec_plugin("ADD", &conf, &att).unwrap();
    assert_eq!(run.status, 0, "{}", run.stdout);
    let r: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        r,
        json!({"cniVersion": "1.0.0", "dns": {}, "vendor": 1, "ips": [{"address": "10.248.8.2/24", "gateway": "10.248.8.1"}]})
    );
    // The plugin's own netns as CNI_NETNS is refused (code 8).
    let own = Attachment {
        netns: "/proc/self/ns/net".into(),
        ..att.clone()
    };
    let run = node.rt.exec_plugin("ADD", &conf, &own).unwrap();
    let e: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!((run.status, e["code"].as_u64()), (1, Some(8)));
    // CNI_NETNS naming a regular file or a FIFO is refused up front, also code 8, and a FIFO
    // without a writer does not hang the ADD.
    let dir = std::env::temp_dir().join(fastpath_tests::unique_name("fp-not-netns-"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("file");
    std::fs::write(&file, b"").unwrap();
    let fifo = dir.join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    for (path, what) in [(&file, "not a namespace"), (&fifo, "is a FIFO")] {
        let bad = Attachment {
            netns: path.to_string_lossy().into_owned(),
            ..att.clone()
        };
        let started = std::time::Instant::now();
        let run = node.rt.exec_plugin("ADD", &conf, &bad).unwrap();
        let e: Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!((run.status, e["code"].as_u64()), (1, Some(8)), "{e}");
        assert!(e["details"].as_str().unwrap_or("").contains(what), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
