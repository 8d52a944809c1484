//! Istio's sidecar iptables rules as `iptables-restore` text
//! (`tools/istio-iptables/pkg/capture/run.go` `Run` with the plugin's config, laid out as
//! `builder/iptables_builder_impl.go` `buildRestore`). Every token comes from typed values.
use crate::redirect::{InterceptionMode, OwnerGroups, Redirect, Selection};

pub const PROXY_PORT: u16 = 15001;
pub const INBOUND_CAPTURE_PORT: u16 = 15006;
pub const INBOUND_TUNNEL_PORT: u16 = 15008;
pub const DNS_LISTENER_PORT: u16 = 15053;
pub const TPROXY_MARK: u32 = 1337;
pub const OUTBOUND_MARK: u32 = 1338;
pub const TPROXY_ROUTE_TABLE: u32 = 133;

const ISTIO_INBOUND: &str = "ISTIO_INBOUND";
const ISTIO_REDIRECT: &str = "ISTIO_REDIRECT";
const ISTIO_IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
const ISTIO_OUTPUT: &str = "ISTIO_OUTPUT";
const ISTIO_OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";
const ISTIO_DIVERT: &str = "ISTIO_DIVERT";
const ISTIO_TPROXY: &str = "ISTIO_TPROXY";
const ISTIO_DROP: &str = "ISTIO_DROP";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// IPv6 loopback; the IPv4 one is configurable (`Redirect::ipv4_loopback`).
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }
    /// Source of Envoy's inbound passthrough connections.
    fn inbound_passthrough_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    table: &'static str,
    chain: &'static str,
    /// `-A CHAIN ...` or `-I CHAIN n ...`, fully rendered.
    params: Vec<String>,
}

/// Collects the rules of one address family in insertion order.
struct Builder {
    family: Family,
    rules: Vec<Rule>,
}

macro_rules! p {
    ($($x:expr),* $(,)?) => { vec![$($x.to_string()),*] };
}

impl Builder {
    fn append(&mut self, table: &'static str, chain: &'static str, params: Vec<String>) {
        let mut full = vec!["-A".to_string(), chain.to_string()];
        full.extend(params);
        self.rules.push(Rule {
            table,
            chain,
            params: full,
        });
    }

    fn insert(&mut self, table: &'static str, chain: &'static str, pos: u32, params: Vec<String>) {
        let mut full = vec!["-I".to_string(), chain.to_string(), pos.to_string()];
        full.extend(params);
        self.rules.push(Rule {
            table,
            chain,
            params: full,
        });
    }

    fn is_v4(&self) -> bool {
        self.family == Family::V4
    }

    /// `buildRestore`: per table (sorted), `-N` for each custom chain in order of first use,
    /// then for chains only jumped to, then the rules; empty tables are left out.
    fn restore_text(&self) -> String {
        let mut out = String::new();
        for table in ["filter", "mangle", "nat", "raw"] {
            let rules: Vec<&Rule> = self.rules.iter().filter(|r| r.table == table).collect();
            if rules.is_empty() {
                continue;
            }
            let mut chains: Vec<&str> = Vec::new();
            for r in &rules {
                if is_custom_chain(r.chain) && !chains.contains(&r.chain) {
                    chains.push(r.chain);
                }
            }
            for r in &rules {
                let n = r.params.len();
                if n >= 2 && r.params[n - 2] == "-j" {
                    let target = r.params[n - 1].as_str();
                    if is_custom_chain(target) && !chains.contains(&target) {
                        chains.push(target);
                    }
                }
            }
            out.push_str("* ");
            out.push_str(table);
            out.push('\n');
            for c in chains {
                out.push_str("-N ");
                out.push_str(c);
                out.push('\n');
            }
            for r in rules {
                out.push_str(&r.params.join(" "));
                out.push('\n');
            }
            out.push_str("COMMIT\n");
        }
        out
    }
}

fn is_custom_chain(name: &str) -> bool {
    name.starts_with("ISTIO_")
}

/// The restore text for one family.
pub fn restore_text(r: &Redirect, family: Family) -> String {
    let mut b = Builder {
        family,
        rules: Vec::new(),
    };
    build(r, &mut b);
    b.restore_text()
}

/// Per chain of each table, how many rules a text holds: the `-A`/`-I` lines of
/// `iptables-restore` input (`* nat`) or of `iptables-save` output (`*nat`). Used by CHECK.
pub fn rule_counts(text: &str) -> Vec<(String, String, usize)> {
    let mut table = String::new();
    let mut counts: Vec<(String, String, usize)> = Vec::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
        } else if let Some(rest) = line
            .strip_prefix("-A ")
            .or_else(|| line.strip_prefix("-I "))
        {
            let chain = rest.split(' ').next().unwrap_or_default().to_string();
            match counts
                .iter_mut()
                .find(|(t, c, _)| *t == table && *c == chain)
            {
                Some(e) => e.2 += 1,
                None => counts.push((table.clone(), chain, 1)),
            }
        }
    }
    counts
}

/// `Run()`: the rules of one family, in Istio's order. One iptables rule is one line here
/// (the table, the chain, then its arguments), as in Istio's builder calls.
#[rustfmt::skip]
fn build(r: &Redirect, b: &mut Builder) {
    let fam = b.family;
    let tproxy = r.mode == InterceptionMode::Tproxy;
    let lo_v4 = r.ipv4_loopback.to_string();
    let lo = match fam {
        Family::V4 => lo_v4.as_str(),
        Family::V6 => fam.loopback(),
    };
    let passthrough = fam.inbound_passthrough_source();
    let uid = r.proxy_uid.to_string();
    let gid = r.proxy_gid.to_string();
    let tunnel = INBOUND_TUNNEL_PORT.to_string();
    let mark = TPROXY_MARK.to_string();
    let (include_v4, include_v6) = match &r.include_outbound_cidrs {
        Selection::All => (None, None),
        Selection::Only(list) => (
            Some(list.iter().filter(|c| c.addr.is_ipv4()).collect::<Vec<_>>()),
            Some(list.iter().filter(|c| c.addr.is_ipv6()).collect::<Vec<_>>()),
        ),
    };
    let include_has_loopback = [&include_v4, &include_v6]
        .iter()
        .any(|l| l.as_ref().is_some_and(|l| l.iter().any(|c| c.addr.is_loopback())));

    // Excluded interfaces are never captured.
    for ifc in &r.exclude_interfaces {
        b.append("nat", "PREROUTING", p!["-i", ifc, "-j", "RETURN"]);
        b.append("nat", "OUTPUT", p!["-o", ifc, "-j", "RETURN"]);
    }
    if tproxy {
        for ifc in &r.exclude_interfaces {
            b.append("mangle", "PREROUTING", p!["-i", ifc, "-j", "RETURN"]);
            b.append("mangle", "OUTPUT", p!["-o", ifc, "-j", "RETURN"]);
        }
    }
    // Do not capture the virtual (e.g. KubeVirt) interfaces' own traffic here.
    for ifc in &r.reroute_virtual_interfaces {
        b.insert("nat", "PREROUTING", 1, p!["-i", ifc, "-j", "RETURN"]);
    }
    if r.drop_invalid {
        b.append("mangle", "PREROUTING", p!["-m", "conntrack", "--ctstate", "INVALID", "-j", ISTIO_DROP]);
        b.append("mangle", ISTIO_DROP, p!["-j", "DROP"]);
    }
    b.append("nat", ISTIO_INBOUND, p!["-p", "tcp", "--dport", tunnel, "-j", "RETURN"]);
    b.append("nat", ISTIO_REDIRECT, p!["-p", "tcp", "-j", "REDIRECT", "--to-ports", PROXY_PORT]);
    b.append("nat", ISTIO_IN_REDIRECT, p!["-p", "tcp", "-j", "REDIRECT", "--to-ports", INBOUND_CAPTURE_PORT]);

    // Inbound.
    let inbound_all = r.include_inbound_ports == Selection::All;
    let inbound_list: &[u16] = match &r.include_inbound_ports {
        Selection::All => &[],
        Selection::Only(l) => l,
    };
    if inbound_all || !inbound_list.is_empty() {
        let table = if tproxy {
            b.append("mangle", ISTIO_DIVERT, p!["-j", "MARK", "--set-mark", mark]);
            b.append("mangle", ISTIO_DIVERT, p!["-j", "ACCEPT"]);
            b.append("mangle", ISTIO_TPROXY, p!["!", "-d", lo, "-p", "tcp", "-j", "TPROXY", "--tproxy-mark", format!("{mark}/0xffffffff"), "--on-port", INBOUND_CAPTURE_PORT]);
            "mangle"
        } else {
            "nat"
        };
        b.append(table, "PREROUTING", p!["-p", "tcp", "-j", ISTIO_INBOUND]);
        if inbound_all {
            for port in &r.exclude_inbound_ports {
                b.append(table, ISTIO_INBOUND, p!["-p", "tcp", "--dport", port, "-j", "RETURN"]);
            }
            if tproxy {
                b.append("mangle", ISTIO_INBOUND, p!["-p", "tcp", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", ISTIO_DIVERT]);
                b.append("mangle", ISTIO_INBOUND, p!["-p", "tcp", "-j", ISTIO_TPROXY]);
            } else {
                b.append("nat", ISTIO_INBOUND, p!["-p", "tcp", "-j", ISTIO_IN_REDIRECT]);
            }
        } else {
            for port in inbound_list {
                if tproxy {
                    b.append("mangle", ISTIO_INBOUND, p!["-p", "tcp", "--dport", port, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", ISTIO_DIVERT]);
                    b.append("mangle", ISTIO_INBOUND, p!["-p", "tcp", "--dport", port, "-j", ISTIO_TPROXY]);
                } else {
                    b.append("nat", ISTIO_INBOUND, p!["-p", "tcp", "--dport", port, "-j", ISTIO_IN_REDIRECT]);
                }
            }
        }
    }

    // Outbound.
    b.append("nat", "OUTPUT", p!["-j", ISTIO_OUTPUT]);
    for port in &r.exclude_outbound_ports {
        b.append("nat", ISTIO_OUTPUT, p!["-p", "tcp", "--dport", port, "-j", "RETURN"]);
        b.append("nat", ISTIO_OUTPUT, p!["-p", "udp", "--dport", port, "-j", "RETURN"]);
    }
    b.append("nat", ISTIO_OUTPUT, p!["-o", "lo", "-s", passthrough, "-j", "RETURN"]);
    for (flag, id) in [("--uid-owner", &uid), ("--gid-owner", &gid)] {
        // App calls to itself through a service VIP go through Envoy inbound.
        if r.dns_capture && flag == "--uid-owner" {
            b.append("nat", ISTIO_OUTPUT, p!["-o", "lo", "!", "-d", lo, "-p", "tcp", "-m", "multiport", "!", "--dports", format!("53,{tunnel}"), "-m", "owner", flag, id, "-j", ISTIO_IN_REDIRECT]);
        } else {
            b.append("nat", ISTIO_OUTPUT, p!["-o", "lo", "!", "-d", lo, "-p", "tcp", "!", "--dport", tunnel, "-m", "owner", flag, id, "-j", ISTIO_IN_REDIRECT]);
        }
        // App to itself by its own address stays local (unless loopback is explicitly included).
        if !include_has_loopback {
            if r.dns_capture {
                b.append("nat", ISTIO_OUTPUT, p!["-o", "lo", "-p", "tcp", "!", "--dport", "53", "-m", "owner", "!", flag, id, "-j", "RETURN"]);
            } else {
                b.append("nat", ISTIO_OUTPUT, p!["-o", "lo", "-m", "owner", "!", flag, id, "-j", "RETURN"]);
            }
        }
        // Envoy's own traffic is never captured again.
        b.append("nat", ISTIO_OUTPUT, p!["-m", "owner", flag, id, "-j", "RETURN"]);
    }
    match &r.owner_groups {
        OwnerGroups::AllExcept(groups) => {
            for g in groups {
                b.append("nat", ISTIO_OUTPUT, p!["-m", "owner", "--gid-owner", g, "-j", "RETURN"]);
            }
        }
        OwnerGroups::Only(groups) => {
            // One rule: RETURN unless the sender is in one of the groups.
            let mut params = Vec::new();
            for g in groups {
                params.extend(p!["-m", "owner", "!", "--gid-owner", g]);
            }
            params.extend(p!["-j", "RETURN"]);
            b.append("nat", ISTIO_OUTPUT, params);
        }
    }
    if r.dns_capture {
        dns_rules(b, &uid, &gid);
    }
    b.append("nat", ISTIO_OUTPUT, p!["-d", lo, "-j", "RETURN"]);
    for c in &r.exclude_outbound_cidrs {
        if c.addr.is_ipv4() == b.is_v4() {
            b.append("nat", ISTIO_OUTPUT, p!["-d", c, "-j", "RETURN"]);
        }
    }
    for port in &r.include_outbound_ports {
        b.append("nat", ISTIO_OUTPUT, p!["-p", "tcp", "--dport", port, "-j", ISTIO_REDIRECT]);
    }
    let include = if b.is_v4() { &include_v4 } else { &include_v6 };
    match include {
        None => {
            b.append("nat", ISTIO_OUTPUT, p!["-j", ISTIO_REDIRECT]);
            for ifc in &r.reroute_virtual_interfaces {
                b.insert("nat", "PREROUTING", 1, p!["-i", ifc, "-j", ISTIO_REDIRECT]);
            }
        }
        Some(cidrs) => {
            for c in cidrs {
                for ifc in &r.reroute_virtual_interfaces {
                    b.insert("nat", "PREROUTING", 1, p!["-i", ifc, "-d", c, "-j", ISTIO_REDIRECT]);
                }
                b.append("nat", ISTIO_OUTPUT, p!["-d", c, "-j", ISTIO_REDIRECT]);
            }
        }
    }

    if tproxy {
        b.append("mangle", "PREROUTING", p!["-p", "tcp", "-m", "mark", "--mark", mark, "-j", "CONNMARK", "--save-mark"]);
        b.append("mangle", "OUTPUT", p!["-p", "tcp", "-o", "lo", "-m", "mark", "--mark", mark, "-j", "RETURN"]);
        for (flag, id) in [("--uid-owner", &uid), ("--gid-owner", &gid)] {
            b.append("mangle", "OUTPUT", p!["!", "-d", lo, "-p", "tcp", "-o", "lo", "-m", "owner", flag, id, "-j", "MARK", "--set-mark", OUTBOUND_MARK]);
        }
        b.append("mangle", "OUTPUT", p!["-p", "tcp", "-m", "connmark", "--mark", mark, "-j", "CONNMARK", "--restore-mark"]);
        b.insert("mangle", ISTIO_INBOUND, 1, p!["-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN"]);
        b.insert("mangle", ISTIO_INBOUND, 2, p!["-p", "tcp", "-s", passthrough, "-i", "lo", "-j", "RETURN"]);
        b.insert("mangle", ISTIO_INBOUND, 3, p!["-p", "tcp", "-i", "lo", "-m", "mark", "!", "--mark", OUTBOUND_MARK, "-j", "RETURN"]);
    }
}

/// `SetupDNSRedir` with capture-all (what the plugin always uses when DNS capture is on).
#[rustfmt::skip]
fn dns_rules(b: &mut Builder, uid: &str, gid: &str) {
    let dns_port = DNS_LISTENER_PORT.to_string();
    b.append("raw", "OUTPUT", p!["-j", ISTIO_OUTPUT_DNS]);
    b.append("nat", ISTIO_OUTPUT, p!["-j", ISTIO_OUTPUT_DNS]);
    b.append("nat", ISTIO_OUTPUT_DNS, p!["-p", "tcp", "--dport", "53", "-j", "REDIRECT", "--to-ports", dns_port]);
    // The proxy's own upstream UDP queries are not captured again.
    for (flag, id) in [("--uid-owner", uid), ("--gid-owner", gid)] {
        b.append("nat", ISTIO_OUTPUT_DNS, p!["-p", "udp", "--dport", "53", "-m", "owner", flag, id, "-j", "RETURN"]);
    }
    b.append("nat", ISTIO_OUTPUT_DNS, p!["-p", "udp", "--dport", "53", "-j", "REDIRECT", "--to-port", dns_port]);
    // Conntrack zones: the proxy's upstream queries in zone 1, its answers to the app in zone 2.
    for (flag, id) in [("--uid-owner", uid), ("--gid-owner", gid)] {
        b.append("raw", ISTIO_OUTPUT_DNS, p!["-p", "udp", "--dport", "53", "-m", "owner", flag, id, "-j", "CT", "--zone", "1"]);
        b.append("raw", ISTIO_OUTPUT_DNS, p!["-p", "udp", "--sport", dns_port, "-m", "owner", flag, id, "-j", "CT", "--zone", "2"]);
    }
    b.append("raw", "PREROUTING", p!["-j", ISTIO_INBOUND]);
    b.append("raw", ISTIO_OUTPUT_DNS, p!["-p", "udp", "--dport", "53", "-j", "CT", "--zone", "2"]);
    b.append("raw", ISTIO_INBOUND, p!["-p", "udp", "--sport", "53", "-j", "CT", "--zone", "1"]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::Pod;
    use crate::pod::tests::injected_pod;
    use crate::redirect::{self, from_pod};
    use serde_json::{Value, json};

    fn redirect(annotations: &[(&str, &str)], proxy_patch: Option<Value>) -> Redirect {
        let mut v = injected_pod();
        for (k, val) in annotations {
            v["metadata"]["annotations"][*k] = Value::String(val.to_string());
        }
        if let Some(Value::Object(patch)) = proxy_patch {
            for (k, val) in patch {
                v["spec"]["containers"][1][k] = val;
            }
        }
        from_pod(&Pod::from_json(v.to_string().as_bytes()).unwrap()).unwrap()
    }

    /// `cni/pkg/plugin/testdata/basic.txt.golden` from Istio's repository.
    const BASIC_GOLDEN: &str = include_str!("../../testdata/istio/basic.txt.golden");

    /// One subtest of Istio's `TestIPTablesRuleGeneration` (`cni/pkg/plugin/plugin_dryrun_test.go`),
    /// which writes a golden of `cni/pkg/plugin/testdata/` from a fake pod: `sidecar.istio.io/status`
    /// set, an `istio-proxy` container with these env values and a securityContext holding only
    /// these ids, IPv4 only. `testdata/istio/README.md` says where each copy comes from.
    struct IstioCase {
        /// Istio's subtest name.
        name: &'static str,
        /// File under `testdata/istio/`.
        golden: &'static str,
        annotations: &'static [(&'static str, &'static str)],
        proxy_env: &'static [(&'static str, &'static str)],
        run_as_user: Option<i64>,
        run_as_group: Option<i64>,
        /// The Istio rules the stored copy was written with.
        era: Era,
    }

    /// Istio's rules changed over time; a golden copied before a change is compared with this
    /// crate's rules as they were then. Each era is a mechanical rewrite of today's text.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Era {
        /// As `basic.txt.golden`.
        Current,
        /// Before istio/istio#53998: the `OUTPUT` jump matched `-p tcp` only, and no outbound
        /// port (the health port 15020, excluded ports) had a UDP exception.
        BeforeUdpOutput,
        /// Older still: also before the owner rules that send the proxy's loopback traffic to
        /// inbound skipped HBONE's port (`-p tcp ! --dport 15008`).
        BeforeOwnerHboneSkip,
    }

    fn in_era(text: &str, era: Era) -> String {
        if era == Era::Current {
            return text.to_string();
        }
        let udp_exception =
            |l: &str| l.starts_with("-A ISTIO_OUTPUT -p udp --dport ") && l.ends_with(" -j RETURN");
        text.lines()
            .filter(|l| !udp_exception(l))
            .map(|l| match l {
                "-A OUTPUT -j ISTIO_OUTPUT" => "-A OUTPUT -p tcp -j ISTIO_OUTPUT".to_string(),
                l if era == Era::BeforeOwnerHboneSkip && l.contains(" -m owner ") => {
                    l.replace(" -p tcp ! --dport 15008", "")
                }
                l => l.to_string(),
            })
            .map(|l| l + "\n")
            .collect()
    }

    /// Only cases whose golden is in `testdata/istio/` (see its README for the others).
    const ISTIO_CASES: &[IstioCase] = &[
        IstioCase {
            name: "basic",
            golden: "basic.txt.golden",
            annotations: &[],
            proxy_env: &[],
            run_as_user: None,
            run_as_group: None,
            era: Era::Current,
        },
        // runAsUser 0 is not a proxy uid: the default 1337 applies, so the rules are basic's.
        IstioCase {
            name: "custom-uid-zero",
            golden: "basic.txt.golden",
            annotations: &[],
            proxy_env: &[],
            run_as_user: Some(0),
            run_as_group: None,
            era: Era::Current,
        },
        IstioCase {
            name: "custom-uid",
            golden: "custom-uid.txt.golden",
            annotations: &[],
            proxy_env: &[],
            run_as_user: Some(1000670000),
            run_as_group: Some(1000670001),
            era: Era::BeforeUdpOutput,
        },
        IstioCase {
            name: "custom-uid-tproxy",
            golden: "custom-uid-tproxy.txt.golden",
            annotations: &[("sidecar.istio.io/interceptionMode", "TPROXY")],
            proxy_env: &[],
            run_as_user: Some(1000670000),
            run_as_group: Some(1000670001),
            era: Era::BeforeUdpOutput,
        },
        IstioCase {
            name: "include-exclude-ports",
            golden: "include-exclude-ports.txt.golden",
            annotations: &[
                ("traffic.sidecar.istio.io/includeInboundPorts", "1111,2222"),
                ("traffic.sidecar.istio.io/excludeInboundPorts", "3333,4444"),
                ("traffic.sidecar.istio.io/excludeOutboundPorts", "5555,6666"),
            ],
            proxy_env: &[],
            run_as_user: None,
            run_as_group: None,
            era: Era::BeforeOwnerHboneSkip,
        },
        IstioCase {
            name: "tproxy",
            golden: "tproxy.txt.golden",
            annotations: &[("sidecar.istio.io/interceptionMode", "TPROXY")],
            proxy_env: &[],
            run_as_user: None,
            run_as_group: None,
            era: Era::Current,
        },
        IstioCase {
            name: "DNS",
            golden: "dns.txt.golden",
            annotations: &[],
            proxy_env: &[("ISTIO_META_DNS_CAPTURE", "true")],
            run_as_user: None,
            run_as_group: None,
            era: Era::Current,
        },
    ];

    /// The case's pod, through the plugin's own path: the pod JSON is parsed as the API's answer
    /// is, then `from_pod` reads its annotations and proxy container, then the runtime's settings
    /// are applied (none are set, as in Istio's test).
    fn istio_case_redirect(c: &IstioCase) -> Redirect {
        let mut v = injected_pod();
        for (k, val) in c.annotations {
            v["metadata"]["annotations"][*k] = json!(val);
        }
        let proxy = &mut v["spec"]["containers"][1];
        assert_eq!(proxy["name"], "istio-proxy");
        proxy["env"] = Value::Array(
            c.proxy_env
                .iter()
                .map(|(n, val)| json!({"name": n, "value": val}))
                .collect(),
        );
        proxy["securityContext"] = json!({});
        if let Some(uid) = c.run_as_user {
            proxy["securityContext"]["runAsUser"] = json!(uid);
        }
        if let Some(gid) = c.run_as_group {
            proxy["securityContext"]["runAsGroup"] = json!(gid);
        }
        let pod = Pod::from_json(v.to_string().as_bytes()).unwrap();
        let mut r = from_pod(&pod).unwrap_or_else(|e| panic!("case {}: {e}", c.name));
        redirect::apply_runtime_env(&mut r, &|_: &str| None).unwrap();
        r
    }

    /// The two texts line by line, aligned on their longest common subsequence:
    /// `-` only in `want`, `+` only in `got`.
    fn line_diff(want: &str, got: &str) -> String {
        let (w, g): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
        // lcs[i][j]: length of the longest common subsequence of w[i..] and g[j..].
        let mut lcs = vec![vec![0usize; g.len() + 1]; w.len() + 1];
        for i in (0..w.len()).rev() {
            for j in (0..g.len()).rev() {
                lcs[i][j] = if w[i] == g[j] {
                    lcs[i + 1][j + 1] + 1
                } else {
                    lcs[i + 1][j].max(lcs[i][j + 1])
                };
            }
        }
        let (mut i, mut j, mut out) = (0, 0, String::new());
        while i < w.len() || j < g.len() {
            if i < w.len() && j < g.len() && w[i] == g[j] {
                out.push_str(&format!("  {}\n", w[i]));
                (i, j) = (i + 1, j + 1);
            } else if i < w.len() && (j == g.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
                out.push_str(&format!("- {}\n", w[i]));
                i += 1;
            } else {
                out.push_str(&format!("+ {}\n", g[j]));
                j += 1;
            }
        }
        out
    }

    /// Every Istio sidecar golden in `testdata/istio/`, byte for byte. With `REFRESH_GOLDEN=true`
    /// the goldens are first rewritten from this crate's output (as Istio's `RefreshGoldenFile`
    /// does) so that `git diff testdata/istio` shows a difference; never keep such a rewrite:
    /// the goldens are Istio's, and a difference is this crate's to fix.
    #[test]
    fn rules_match_istio_goldens() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/istio");
        let refresh = std::env::var("REFRESH_GOLDEN").is_ok_and(|v| v == "true");
        let mut failures = Vec::new();
        for c in ISTIO_CASES {
            let got = in_era(&restore_text(&istio_case_redirect(c), Family::V4), c.era);
            let path = dir.join(c.golden);
            if refresh && c.era == Era::Current {
                std::fs::write(&path, &got).unwrap();
            }
            let want = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("case {}: {}: {e}", c.name, path.display()));
            if got != want {
                failures.push(format!(
                    "case {}: the rules differ from testdata/istio/{} (- Istio's golden, + this crate):\n{}",
                    c.name,
                    c.golden,
                    line_diff(&want, &got)
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn include_exclude_ports() {
        let t = restore_text(
            &redirect(
                &[
                    (redirect::ANNOT_INCLUDE_INBOUND_PORTS, "1111,2222"),
                    (redirect::ANNOT_EXCLUDE_OUTBOUND_PORTS, "5555,6666"),
                    (redirect::ANNOT_INCLUDE_OUTBOUND_PORTS, "443"),
                ],
                None,
            ),
            Family::V4,
        );
        assert!(t.contains("-A ISTIO_INBOUND -p tcp --dport 1111 -j ISTIO_IN_REDIRECT\n-A ISTIO_INBOUND -p tcp --dport 2222 -j ISTIO_IN_REDIRECT\n"));
        assert!(!t.contains("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"));
        // explicit include list: exclusions are not emitted
        assert!(!t.contains("--dport 15021 -j RETURN"));
        assert!(t.contains("-A ISTIO_OUTPUT -p tcp --dport 5555 -j RETURN\n-A ISTIO_OUTPUT -p udp --dport 5555 -j RETURN\n-A ISTIO_OUTPUT -p tcp --dport 6666 -j RETURN\n-A ISTIO_OUTPUT -p udp --dport 6666 -j RETURN\n"));
        assert!(!t.contains("--dport 15020 -j RETURN"));
        assert!(t.contains("-A ISTIO_OUTPUT -p tcp --dport 443 -j ISTIO_REDIRECT\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n"));
    }

    #[test]
    fn no_inbound_capture_when_include_is_empty() {
        let t = restore_text(
            &redirect(&[(redirect::ANNOT_INCLUDE_INBOUND_PORTS, "")], None),
            Family::V4,
        );
        assert!(!t.contains("PREROUTING"));
        assert!(t.contains("-N ISTIO_INBOUND")); // the tunnel-port rule stays, as in Istio
    }

    #[test]
    fn include_exclude_ip_ranges() {
        let t = restore_text(
            &redirect(
                &[
                    (
                        redirect::ANNOT_INCLUDE_OUTBOUND_IP_RANGES,
                        "127.0.0.0/8,10.96.0.0/12,fd00::/8",
                    ),
                    (
                        redirect::ANNOT_EXCLUDE_OUTBOUND_IP_RANGES,
                        "10.0.0.0/8,fd01::/16",
                    ),
                ],
                None,
            ),
            Family::V4,
        );
        assert!(t.ends_with("-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n-A ISTIO_OUTPUT -d 10.0.0.0/8 -j RETURN\n-A ISTIO_OUTPUT -d 127.0.0.0/8 -j ISTIO_REDIRECT\n-A ISTIO_OUTPUT -d 10.96.0.0/12 -j ISTIO_REDIRECT\nCOMMIT\n"), "{t}");
        // loopback included: the "app to itself by lo" RETURN rules are dropped
        assert!(!t.contains("-o lo -m owner ! --uid-owner"));
        assert!(!t.contains("fd0"));
        let t6 = restore_text(
            &redirect(
                &[
                    (
                        redirect::ANNOT_INCLUDE_OUTBOUND_IP_RANGES,
                        "10.96.0.0/12,fd00::/8",
                    ),
                    (redirect::ANNOT_EXCLUDE_OUTBOUND_IP_RANGES, "fd01::/16"),
                ],
                None,
            ),
            Family::V6,
        );
        assert!(t6.contains("-A ISTIO_OUTPUT -d ::1/128 -j RETURN\n-A ISTIO_OUTPUT -d fd01::/16 -j RETURN\n-A ISTIO_OUTPUT -d fd00::/8 -j ISTIO_REDIRECT\nCOMMIT\n"), "{t6}");
        assert!(t6.contains("-A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN"));
        assert!(!t6.contains("10.96"));
    }

    #[test]
    fn custom_uid_gid() {
        let t = restore_text(
            &redirect(
                &[],
                Some(json!({"securityContext": {"runAsUser": 1500, "runAsGroup": 1600}})),
            ),
            Family::V4,
        );
        assert!(t.contains("-A ISTIO_OUTPUT -m owner --uid-owner 1500 -j RETURN"));
        assert!(t.contains("-A ISTIO_OUTPUT -m owner --gid-owner 1600 -j RETURN"));
        assert!(!t.contains("1337"));
    }

    #[test]
    fn tproxy_mode() {
        let t = restore_text(
            &redirect(
                &[
                    (redirect::ANNOT_INTERCEPTION_MODE, "TPROXY"),
                    (redirect::ANNOT_EXCLUDE_INBOUND_PORTS, "22"),
                ],
                None,
            ),
            Family::V4,
        );
        let mangle = "* mangle
-N ISTIO_DIVERT
-N ISTIO_TPROXY
-N ISTIO_INBOUND
-A ISTIO_DIVERT -j MARK --set-mark 1337
-A ISTIO_DIVERT -j ACCEPT
-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 22 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT
-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY
-A PREROUTING -p tcp -m mark --mark 1337 -j CONNMARK --save-mark
-A OUTPUT -p tcp -o lo -m mark --mark 1337 -j RETURN
-A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --uid-owner 1337 -j MARK --set-mark 1338
-A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --gid-owner 1337 -j MARK --set-mark 1338
-A OUTPUT -p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark
-I ISTIO_INBOUND 1 -p tcp -m mark --mark 1337 -j RETURN
-I ISTIO_INBOUND 2 -p tcp -s 127.0.0.6/32 -i lo -j RETURN
-I ISTIO_INBOUND 3 -p tcp -i lo -m mark ! --mark 1338 -j RETURN
COMMIT
* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
";
        assert!(t.starts_with(mangle), "{t}");
        assert!(!t.contains("-A PREROUTING -p tcp -j ISTIO_INBOUND\n-A ISTIO_INBOUND -p tcp --dport 22 -j RETURN\n-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"));
        assert!(!t[t.find("* nat").unwrap()..].contains("PREROUTING"));
    }

    #[test]
    fn dns_capture() {
        let t = restore_text(
            &redirect(
                &[],
                Some(json!({"env": [{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}]})),
            ),
            Family::V4,
        );
        assert!(t.contains("-N ISTIO_OUTPUT\n-N ISTIO_OUTPUT_DNS\n"));
        assert!(t.contains("-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT\n-A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --uid-owner 1337 -j RETURN\n"));
        assert!(t.contains("-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN\n-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS\n-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -j REDIRECT --to-ports 15053\n-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner 1337 -j RETURN\n-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --gid-owner 1337 -j RETURN\n-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053\n-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n"));
        let raw = "* raw
-N ISTIO_OUTPUT_DNS
-N ISTIO_INBOUND
-A OUTPUT -j ISTIO_OUTPUT_DNS
-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1
-A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --uid-owner 1337 -j CT --zone 2
-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --gid-owner 1337 -j CT --zone 1
-A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --gid-owner 1337 -j CT --zone 2
-A PREROUTING -j ISTIO_INBOUND
-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j CT --zone 2
-A ISTIO_INBOUND -p udp --sport 53 -j CT --zone 1
COMMIT
";
        assert!(t.ends_with(raw), "{t}");
    }

    #[test]
    fn interfaces_and_drop_invalid() {
        let t = restore_text(
            &redirect(
                &[
                    (redirect::ANNOT_EXCLUDE_INTERFACES, "net1"),
                    (redirect::ANNOT_REROUTE_VIRTUAL_INTERFACES, "k6t-eth0"),
                ],
                Some(json!({"env": [{"name": "INVALID_DROP", "value": "true"}]})),
            ),
            Family::V4,
        );
        assert!(t.starts_with("* mangle\n-N ISTIO_DROP\n-A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP\n-A ISTIO_DROP -j DROP\nCOMMIT\n* nat\n"), "{t}");
        assert!(t.contains("-A PREROUTING -i net1 -j RETURN\n-A OUTPUT -o net1 -j RETURN\n-I PREROUTING 1 -i k6t-eth0 -j RETURN\n"));
        assert!(t.contains("-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n-I PREROUTING 1 -i k6t-eth0 -j ISTIO_REDIRECT\nCOMMIT"));
    }

    #[test]
    fn owner_groups_and_loopback_cidr() {
        let mut r = redirect(&[], None);
        redirect::apply_runtime_env(&mut r, &|k: &str| match k {
            "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE" => Some("root,999".into()),
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR" => Some("127.0.0.0/8".into()),
            _ => None,
        })
        .unwrap();
        let t = restore_text(&r, Family::V4);
        assert!(t.contains("-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN\n-A ISTIO_OUTPUT -m owner --gid-owner root -j RETURN\n-A ISTIO_OUTPUT -m owner --gid-owner 999 -j RETURN\n-A ISTIO_OUTPUT -d 127.0.0.0/8 -j RETURN\n"), "{t}");
        assert!(t.contains("-o lo ! -d 127.0.0.0/8 -p tcp"));
        redirect::apply_runtime_env(&mut r, &|k: &str| {
            (k == "ISTIO_OUTBOUND_OWNER_GROUPS").then(|| "java,1001".to_string())
        })
        .unwrap();
        let t = restore_text(&r, Family::V4);
        assert!(t.contains("-A ISTIO_OUTPUT -m owner ! --gid-owner java -m owner ! --gid-owner 1001 -j RETURN\n"), "{t}");
    }

    #[test]
    fn counts_for_check() {
        let c = rule_counts(BASIC_GOLDEN);
        assert!(c.contains(&("nat".into(), "ISTIO_OUTPUT".into(), 11)));
        assert!(c.contains(&("nat".into(), "PREROUTING".into(), 1)));
        assert!(c.contains(&("nat".into(), "ISTIO_INBOUND".into(), 5)));
    }
}
