//! The plugin's routing state over rtnetlink (`fastpath_cni_plugin::routing`) against the `ip`
//! commands it replaces: TPROXY's policy routing and the IPv6 passthrough address applied in
//! one scratch netns by the plugin's code, and in another by the commands the plugin used to
//! run (Istio's), then `ip rule show` / `ip route show table 133` / `ip -6 addr show dev lo`
//! compared line by line. `ip` is only used by the test.
use fastpath_cni_plugin::iptables::Netns;
use fastpath_cni_plugin::routing;
use fastpath_tests::netns::NetNs;

/// What the plugin ran before (`ip` in the pod netns), for IPv4 and IPv6.
const IP_COMMANDS: &[&[&str]] = &[
    &["ip", "-6", "addr", "add", "::6/128", "dev", "lo"],
    &["ip", "-4", "rule", "add", "fwmark", "1337", "lookup", "133"],
    &[
        "ip", "-4", "route", "add", "local", "default", "dev", "lo", "table", "133",
    ],
    &["ip", "-6", "rule", "add", "fwmark", "1337", "lookup", "133"],
    &[
        "ip", "-6", "route", "add", "local", "default", "dev", "lo", "table", "133",
    ],
];

/// What `ip` shows of the routing state the two paths set.
const SHOW: &[&[&str]] = &[
    &["ip", "-4", "rule", "show"],
    &["ip", "-6", "rule", "show"],
    &["ip", "-4", "route", "show", "table", "133"],
    &["ip", "-6", "route", "show", "table", "133"],
    &["ip", "-6", "addr", "show", "dev", "lo"],
];

/// A netns with `lo` up, as a pod's is.
fn pod_netns(prefix: &str) -> NetNs {
    let ns = NetNs::new(&fastpath_tests::unique_name(prefix)).unwrap();
    ns.exec_ok(&["ip", "link", "set", "lo", "up"]).unwrap();
    ns
}

fn shown(ns: &NetNs) -> Vec<String> {
    SHOW.iter()
        .map(|argv| {
            let out = ns.exec_ok(argv).unwrap();
            format!("$ {}\n{}", argv.join(" "), out.trim_end())
        })
        .collect()
}

#[test]
fn tproxy_routing_over_rtnetlink_is_what_the_ip_commands_set() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    let by_ip = pod_netns("fprtip");
    for argv in IP_COMMANDS {
        by_ip.exec_ok(argv).unwrap();
    }
    let by_plugin = pod_netns("fprtnl");
    let netns = Netns::open(&by_plugin.path()).unwrap();
    routing::add_inbound_passthrough_v6(&netns).unwrap();
    routing::add_tproxy_routing(&netns, true).unwrap();
    let (want, got) = (shown(&by_ip), shown(&by_plugin));
    assert_eq!(got, want, "rtnetlink (left) vs ip (right)");
    assert!(
        got[0].contains("fwmark 0x539 lookup 133") && got[3].contains("local default dev lo"),
        "{got:#?}"
    );

    // Applied again (a repeated ADD, a repair): "File exists" is done, nothing doubles.
    routing::add_inbound_passthrough_v6(&netns).unwrap();
    routing::add_tproxy_routing(&netns, true).unwrap();
    assert_eq!(shown(&by_plugin), want);
    assert_eq!(
        routing::tproxy_routing_problems(&netns, true).unwrap(),
        Vec::<String>::new()
    );
    // What the old path's CHECK found missing, the new one names the same way.
    by_plugin
        .exec_ok(&["ip", "-6", "rule", "del", "fwmark", "1337", "lookup", "133"])
        .unwrap();
    by_plugin
        .exec_ok(&["ip", "-4", "route", "flush", "table", "133"])
        .unwrap();
    assert_eq!(
        routing::tproxy_routing_problems(&netns, true).unwrap(),
        [
            "-4 route table 133 has no local default route",
            "-6 ip rule \"fwmark 0x539 lookup 133\" is missing",
        ]
    );
    // IPv4 only: the IPv6 state is not looked at.
    by_plugin
        .exec_ok(&[
            "ip", "-4", "route", "add", "local", "default", "dev", "lo", "table", "133",
        ])
        .unwrap();
    assert!(
        routing::tproxy_routing_problems(&netns, false)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_routing_failure_names_the_command_and_the_netns() {
    if !fastpath_tests::require_privileges!() {
        return;
    }
    // lo down: the kernel refuses an IPv6 route through it ("Nexthop device is not up"), as
    // it refused `ip -6 route add`.
    let ns = NetNs::new(&fastpath_tests::unique_name("fprtdown")).unwrap();
    let netns = Netns::open(&ns.path()).unwrap();
    let err = routing::add_tproxy_routing(&netns, true).unwrap_err();
    assert!(
        matches!(
            &err,
            routing::RoutingError::InNetns {
                step: routing::RoutingStepError::Netlink { .. },
                ..
            }
        ),
        "{err:?}"
    );
    let err = err.to_string();
    assert!(
        err.contains("ip -6 route add local default dev lo table 133") && err.contains(&ns.path()),
        "{err}"
    );
}
