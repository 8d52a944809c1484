//! Enrollment through the real `istio-cni` binary, chained after bridge + host-local as a
//! runtime runs it, with Istio's redirection rules in the pods; then a request through all
//! three sidecar hops (app -> 15001, sidecar -> sidecar on 15006, 127.0.0.6 -> app), each of
//! which must be paired; then DEL removes the enrollment.
//!
//! Subnet 10.247.10.0/24 (accelerator range), bridge `fpac<pid>x<n>`.
use fastpath_common::map_names;
use fastpath_tests::accel::{Accel, read_exact_retry};
use fastpath_tests::cni::{Attachment, Runtime, ScratchNet};
use fastpath_tests::kube_api::{FakeKubeApi, Trust, sidecar_pod};
use fastpath_tests::netns::NetNs;
use serde_json::{Value, json};
use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::Duration,
};

const TOKEN: &str = "accel-test-token";

/// Runs `f` on a thread in `netns`, optionally with fs uid/gid (what `-m owner` matches).
fn in_netns<T: Send>(netns: &str, uid: Option<u32>, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(netns).unwrap();
            // SAFETY: per-thread namespace and fs credential changes on this scoped thread.
            unsafe {
                assert_eq!(libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET), 0);
                if let Some(id) = uid {
                    libc::setfsgid(id);
                    libc::setfsuid(id);
                }
            }
            f()
        })
        .join()
        .unwrap()
    })
}

struct Node {
    api: FakeKubeApi,
    rt: Runtime,
    net: ScratchNet,
}

fn conflist(node: &Node, run_dir: &std::path::Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": format!("net-{}", node.net.bridge),
        "plugins": [
            {
                "type": "bridge", "bridge": node.net.bridge, "isGateway": true, "ipMasq": false,
                "ipam": {"type": "host-local", "dataDir": node.net.dir.join("ipam"),
                         "ranges": [[{"subnet": "10.247.10.0/24"}]]}
            },
            {
                "type": "istio-cni", "ipam": {}, "dns": {},
                "plugin_log_level": "info",
                "cni_agent_run_dir": run_dir,
                "ambient_enabled": false, "enablement_selectors": [],
                "exclude_namespaces": ["kube-system"], "pod_namespace": "istio-system",
                "native_nftables": false, "enable_ambient_detection_retry": false
            }
        ]
    })
}

#[test]
fn plugin_enrolls_pods_and_every_sidecar_hop_is_paired() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let accel = Accel::start("plugin");
    let net = ScratchNet::new("fpac").unwrap();
    let api = FakeKubeApi::start(&net.dir.join("api"), TOKEN).unwrap();
    api.write_kubeconfig(
        &accel.run_dir.join("istio-cni-kubeconfig"),
        Trust::Ca,
        TOKEN,
    )
    .unwrap();
    let node = Node {
        api,
        rt: Runtime::with_built_plugin(
            net.dir.join("cache"),
            vec![(
                fastpath_cni_plugin::accel::PIN_DIR_ENV.into(),
                accel.pin_dir().display().to_string(),
            )],
        ),
        net,
    };
    let list = conflist(&node, &accel.run_dir);
    let lo = json!({"cniVersion": "1.0.0", "name": "lo", "plugins": [{"type": "loopback"}]});

    let add = |name: &str| -> (NetNs, Attachment, Ipv4Addr) {
        node.api.set_pod(sidecar_pod("shop", name, &[], &[]));
        let netns = NetNs::new(&fastpath_tests::unique_name("fpacp")).unwrap();
        let att = Attachment {
            container_id: format!("cid-{}", netns.name),
            netns: netns.path(),
            ifname: "eth0".into(),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name}"),
        };
        node.rt
            .add(
                &lo,
                &Attachment {
                    ifname: "lo".into(),
                    ..att.clone()
                },
            )
            .unwrap();
        let (result, _) = node.rt.add(&list, &att).expect("chain ADD");
        let ip = result["ips"][0]["address"].as_str().unwrap();
        let ip: Ipv4Addr = ip.split('/').next().unwrap().parse().unwrap();
        (netns, att, ip)
    };
    let (ns_a, att_a, ip_a) = add("frontend");
    let (ns_b, att_b, ip_b) = add("backend");
    assert_eq!(accel.map_entries(map_names::PODS), 2, "both pods enrolled");
    assert_eq!(
        accel.map_entries(map_names::POD_IPS),
        2,
        "both pod IPs registered"
    );
    let (pa, pb) = (ns_a.path(), ns_b.path());

    // The mesh: A's sidecar on 15001, B's sidecar on 15006, B's app on :80.
    let out_a = in_netns(&pa, None, || TcpListener::bind("0.0.0.0:15001").unwrap());
    let in_b = in_netns(&pb, None, || TcpListener::bind("0.0.0.0:15006").unwrap());
    let app_b = in_netns(&pb, None, || {
        TcpListener::bind(SocketAddr::from((ip_b, 80))).unwrap()
    });
    let request = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n".repeat(100);

    // Hop 1: A's app dials B:80, lands on A's 15001.
    let mut app = in_netns(&pa, None, || TcpStream::connect((ip_b, 80)).unwrap());
    let (mut s1, peer1) = out_a.accept().unwrap();
    assert_eq!(peer1.ip(), ip_a);
    // Hop 2: A's sidecar (uid 1337) dials B:80, lands on B's 15006.
    let mut c2 = in_netns(&pa, Some(1337), || TcpStream::connect((ip_b, 80)).unwrap());
    let (mut s2, peer2) = in_b.accept().unwrap();
    assert_eq!(peer2.ip(), ip_a);
    // Hop 3: B's sidecar (uid 1337) from 127.0.0.6 to B's app.
    let mut c3 = in_netns(&pb, Some(1337), || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from(([127, 0, 0, 6], 0)).into())
            .unwrap();
        s.connect(&SocketAddr::from((ip_b, 80)).into()).unwrap();
        TcpStream::from(s)
    });
    let (mut s3, peer3) = app_b.accept().unwrap();
    assert_eq!(peer3.ip().to_string(), "127.0.0.6");

    // The request through all hops, and the response back.
    let mut buf = vec![0u8; request.len()];
    app.write_all(&request).unwrap();
    read_exact_retry(&mut s1, &mut buf, Duration::from_secs(10));
    c2.write_all(&buf).unwrap();
    read_exact_retry(&mut s2, &mut buf, Duration::from_secs(10));
    c3.write_all(&buf).unwrap();
    read_exact_retry(&mut s3, &mut buf, Duration::from_secs(10));
    assert!(buf == request, "request altered");
    let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".repeat(50);
    let mut buf = vec![0u8; response.len()];
    s3.write_all(&response).unwrap();
    read_exact_retry(&mut c3, &mut buf, Duration::from_secs(10));
    s2.write_all(&buf).unwrap();
    read_exact_retry(&mut c2, &mut buf, Duration::from_secs(10));
    s1.write_all(&buf).unwrap();
    read_exact_retry(&mut app, &mut buf, Duration::from_secs(10));
    assert!(buf == response, "response altered");

    let counters = fastpath_installer::accel::pod_counters(&accel.settings).unwrap();
    let of = |name: &str| {
        counters
            .iter()
            .find(|c| c.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("counters labelled {name}: {counters:?}"))
            .clone()
    };
    let (fa, fb) = (of("frontend"), of("backend"));
    assert_eq!(fa.namespace.as_deref(), Some("shop"));
    assert_eq!(fa.stats.connections_paired, 1, "hop 1 paired: {fa:?}");
    assert_eq!(
        fb.stats.connections_paired, 2,
        "hops 2 and 3 paired: {fb:?}"
    );
    assert!(fa.stats.msgs_redirected >= 3 && fb.stats.msgs_redirected >= 3);
    assert_eq!(fa.stats.peer_misses + fb.stats.peer_misses, 0);

    // DEL (twice: idempotent), also once the netns is gone.
    drop((app, s1, c2, s2, c3, s3));
    node.rt.del(&list, &att_a).expect("DEL a");
    node.rt.del(&list, &att_a).expect("DEL a again");
    drop(ns_b);
    node.rt.del(&list, &att_b).expect("DEL b without netns");
    assert_eq!(accel.map_entries(map_names::PODS), 0);
    assert_eq!(accel.map_entries(map_names::POD_IPS), 0);
    let records = accel.run_dir.join(fastpath_common::POD_STATE_SUBDIR);
    assert_eq!(
        std::fs::read_dir(records).unwrap().count(),
        0,
        "records removed"
    );
}
