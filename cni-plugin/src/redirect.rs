//! The redirection a mesh pod gets, from its annotations and its `istio-proxy` container
//! (`cni/pkg/plugin/sidecar_redirect.go` `NewRedirect`). Annotations are written by pod authors:
//! each is parsed into typed values here, and any value that does not parse fails with an
//! error naming the annotation and the value. The rule text is built only from these types.
use crate::pod::{Pod, parse_go_bool};
use std::fmt;
use std::net::IpAddr;

pub const ANNOT_INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
pub const ANNOT_INCLUDE_OUTBOUND_IP_RANGES: &str =
    "traffic.sidecar.istio.io/includeOutboundIPRanges";
pub const ANNOT_EXCLUDE_OUTBOUND_IP_RANGES: &str =
    "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub const ANNOT_INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const ANNOT_EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const ANNOT_INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
pub const ANNOT_EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const ANNOT_EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
pub const ANNOT_KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
pub const ANNOT_REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";

/// Ports always kept out of inbound capture (agent status, health, Envoy metrics).
pub const STATUS_PORTS: [u16; 3] = [15020, 15021, 15090];
pub const DEFAULT_PROXY_UID: u32 = 1337;
pub const DEFAULT_PROXY_GID: u32 = 1337;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterceptionMode {
    Redirect,
    Tproxy,
}

/// An IP prefix, printed as written (`10.0.0.1/8` stays so; iptables masks it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Self> {
        let (a, l) = s.split_once('/')?;
        let addr: IpAddr = a.parse().ok()?;
        if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) || l.len() > 3 {
            return None;
        }
        let len: u8 = l.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Self { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A Linux interface name safe to put in a rule (1–15 chars, no separators or quoting).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfName(String);

impl IfName {
    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() <= 15
            && s != "."
            && s != ".."
            && s.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@' | b'+')
            });
        ok.then(|| Self(s.to_string()))
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `*` or a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection<T> {
    All,
    Only(Vec<T>),
}

/// Everything the rule builder needs, all typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub mode: InterceptionMode,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub include_outbound_cidrs: Selection<Cidr>,
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// `Only(empty)` means no inbound capture at all.
    pub include_inbound_ports: Selection<u16>,
    pub exclude_inbound_ports: Vec<u16>,
    pub include_outbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_interfaces: Vec<IfName>,
    pub reroute_virtual_interfaces: Vec<IfName>,
    pub dns_capture: bool,
    pub dual_stack: bool,
    pub drop_invalid: bool,
    /// From the runtime's environment (see [`apply_runtime_env`]).
    pub owner_groups: OwnerGroups,
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`, default `127.0.0.1/32`.
    pub ipv4_loopback: Cidr,
}

/// Which outbound traffic is captured by the sending process's group
/// (`ISTIO_OUTBOUND_OWNER_GROUPS` / `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerGroups {
    /// All groups except these (the default, with none excluded).
    AllExcept(Vec<GroupName>),
    /// Only these groups.
    Only(Vec<GroupName>),
}

/// A group name or id as given to `-m owner --gid-owner`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupName(String);

impl GroupName {
    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() <= 32
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        ok.then(|| Self(s.to_string()))
    }
}

impl fmt::Display for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub const ENV_OWNER_GROUPS: &str = "ISTIO_OUTBOUND_OWNER_GROUPS";
pub const ENV_OWNER_GROUPS_EXCLUDE: &str = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE";
pub const ENV_IPV4_LOOPBACK_CIDR: &str = "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR";

fn parse_groups(key: &str, value: &str) -> Result<Vec<GroupName>, InvalidValue> {
    value
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(|g| {
            GroupName::parse(g)
                .ok_or_else(|| invalid(key, value, format!("{g:?} is not a group name or id")))
        })
        .collect()
}

/// Applies the settings Istio's plugin reads from the runtime's environment (rarely set).
pub fn apply_runtime_env(
    r: &mut Redirect,
    getenv: &dyn Fn(&str) -> Option<String>,
) -> Result<(), InvalidValue> {
    let include = getenv(ENV_OWNER_GROUPS).filter(|v| !v.trim().is_empty());
    let exclude = getenv(ENV_OWNER_GROUPS_EXCLUDE).unwrap_or_default();
    r.owner_groups = match include.as_deref().map(str::trim) {
        None | Some("*") => {
            OwnerGroups::AllExcept(parse_groups(ENV_OWNER_GROUPS_EXCLUDE, &exclude)?)
        }
        Some(list) => {
            if !exclude.trim().is_empty() {
                return Err(invalid(
                    ENV_OWNER_GROUPS_EXCLUDE,
                    &exclude,
                    format!("cannot be combined with {ENV_OWNER_GROUPS}={list:?}"),
                ));
            }
            OwnerGroups::Only(parse_groups(ENV_OWNER_GROUPS, list)?)
        }
    };
    if let Some(v) = getenv(ENV_IPV4_LOOPBACK_CIDR).filter(|v| !v.is_empty()) {
        r.ipv4_loopback = Cidr::parse(&v)
            .filter(|c| c.addr.is_ipv4())
            .ok_or_else(|| invalid(ENV_IPV4_LOOPBACK_CIDR, &v, "not an IPv4 CIDR"))?;
    }
    Ok(())
}

/// A bad annotation (or proxy field) value: names the key and the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidValue {
    pub key: String,
    pub value: String,
    pub why: String,
}

impl fmt::Display for InvalidValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // An annotation may hold 256 KiB: the message shows its start and its size.
        const SHOWN: usize = 200;
        if self.value.len() <= SHOWN {
            return write!(
                f,
                "invalid value {:?} for {}: {}",
                self.value, self.key, self.why
            );
        }
        let mut end = SHOWN;
        while !self.value.is_char_boundary(end) {
            end -= 1;
        }
        write!(
            f,
            "invalid value {:?}... ({} bytes) for {}: {}",
            &self.value[..end],
            self.value.len(),
            self.key,
            self.why
        )
    }
}

/// How much a pod's annotations may ask for. Pod authors write annotations, and the plugin
/// turns them into rules as root during every ADD: a list of 256 KiB (the API's limit for all
/// of a pod's annotations) would make tens of thousands of rules, and the rerouted interfaces
/// times the included CIDRs grows as a product. Istio sets no limits of its own; these are
/// far above what any mesh configuration uses.
pub mod limits {
    /// Entries in one port list.
    pub const PORTS: usize = 1024;
    /// Entries in one CIDR list.
    pub const CIDRS: usize = 1024;
    /// Entries in one interface list.
    pub const INTERFACES: usize = 64;
    /// Rerouted interfaces times included CIDRs (one PREROUTING rule each).
    pub const REROUTE_RULES: usize = 4096;
}

/// Refuses a comma-separated list longer than `max` before parsing it.
fn check_entries(key: &str, value: &str, max: usize) -> Result<(), InvalidValue> {
    let n = value.split(',').count();
    if n > max {
        return Err(invalid(
            key,
            value,
            format!("{n} entries; at most {max} are accepted"),
        ));
    }
    Ok(())
}

fn invalid(key: &str, value: &str, why: impl Into<String>) -> InvalidValue {
    InvalidValue {
        key: key.to_string(),
        value: value.to_string(),
        why: why.into(),
    }
}

/// A comma-separated port list; blanks around entries are allowed (as Istio's `parsePort`).
fn parse_ports(key: &str, value: &str) -> Result<Vec<u16>, InvalidValue> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(Vec::new());
    }
    check_entries(key, value, limits::PORTS)?;
    v.split(',')
        .map(|p| {
            let p = p.trim();
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(key, value, format!("{p:?} is not a port number")));
            }
            p.parse::<u16>()
                .map_err(|_| invalid(key, value, format!("{p:?} is not a port number (0-65535)")))
        })
        .collect()
}

fn parse_cidrs(key: &str, value: &str) -> Result<Vec<Cidr>, InvalidValue> {
    if value.is_empty() {
        return Ok(Vec::new());
    }
    check_entries(key, value, limits::CIDRS)?;
    value
        .split(',')
        .map(|c| {
            Cidr::parse(c).ok_or_else(|| {
                invalid(
                    key,
                    value,
                    format!("{c:?} is not a CIDR (address/prefix-length)"),
                )
            })
        })
        .collect()
}

fn parse_ifnames(key: &str, value: &str) -> Result<Vec<IfName>, InvalidValue> {
    if value.is_empty() {
        return Ok(Vec::new());
    }
    check_entries(key, value, limits::INTERFACES)?;
    value
        .split(',')
        .map(|n| {
            IfName::parse(n)
                .ok_or_else(|| invalid(key, value, format!("{n:?} is not an interface name")))
        })
        .collect()
}

fn id_from(key: &str, v: Option<i64>, default: u32) -> Result<u32, InvalidValue> {
    match v {
        None | Some(0) => Ok(default),
        Some(n) => {
            u32::try_from(n).map_err(|_| invalid(key, &n.to_string(), "not a valid uid/gid"))
        }
    }
}

/// Builds the redirection for a mesh pod (`NewRedirect`).
pub fn from_pod(pod: &Pod) -> Result<Redirect, InvalidValue> {
    let a = |k: &str| pod.annotation(k);
    refuse_non_string_annotations(pod)?;
    let mode = interception_mode(a(ANNOT_INTERCEPTION_MODE))?;
    let proxy = pod.proxy_container();
    let sc = proxy.and_then(|p| p.security_context.as_ref());
    let proxy_uid = id_from(
        "istio-proxy securityContext.runAsUser",
        sc.and_then(|s| s.run_as_user),
        DEFAULT_PROXY_UID,
    )?;
    let proxy_gid = id_from(
        "istio-proxy securityContext.runAsGroup",
        sc.and_then(|s| s.run_as_group),
        DEFAULT_PROXY_GID,
    )?;

    let include_outbound_cidrs = match a(ANNOT_INCLUDE_OUTBOUND_IP_RANGES) {
        None | Some("*") => Selection::All,
        Some(v) => Selection::Only(parse_cidrs(ANNOT_INCLUDE_OUTBOUND_IP_RANGES, v)?),
    };
    let exclude_outbound_cidrs = match a(ANNOT_EXCLUDE_OUTBOUND_IP_RANGES) {
        None => Vec::new(),
        Some(v) => parse_cidrs(ANNOT_EXCLUDE_OUTBOUND_IP_RANGES, v)?,
    };
    let include_inbound_ports = match a(ANNOT_INCLUDE_INBOUND_PORTS) {
        None => Selection::All,
        Some(v) if v.trim() == "*" => Selection::All,
        Some(v) => Selection::Only(parse_ports(ANNOT_INCLUDE_INBOUND_PORTS, v)?),
    };
    // Default 15020; then the status ports are always appended, duplicates dropped.
    let mut exclude_inbound_ports = match a(ANNOT_EXCLUDE_INBOUND_PORTS) {
        None => vec![15020],
        Some(v) => parse_ports(ANNOT_EXCLUDE_INBOUND_PORTS, v)?,
    };
    exclude_inbound_ports.extend(STATUS_PORTS);
    let mut seen = std::collections::HashSet::new();
    exclude_inbound_ports.retain(|p| seen.insert(*p));
    let include_outbound_ports = match a(ANNOT_INCLUDE_OUTBOUND_PORTS) {
        None => Vec::new(),
        Some(v) => parse_ports(ANNOT_INCLUDE_OUTBOUND_PORTS, v)?,
    };
    let exclude_outbound_ports = match a(ANNOT_EXCLUDE_OUTBOUND_PORTS) {
        None => vec![15020],
        Some(v) => parse_ports(ANNOT_EXCLUDE_OUTBOUND_PORTS, v)?,
    };
    let exclude_interfaces = match a(ANNOT_EXCLUDE_INTERFACES) {
        None => Vec::new(),
        Some(v) => parse_ifnames(ANNOT_EXCLUDE_INTERFACES, v)?,
    };
    let reroute_virtual_interfaces = reroute_interfaces(pod, &include_outbound_cidrs)?;
    // Istio logs and ignores env values that are not booleans.
    let env_bool = |name: &str| {
        proxy
            .and_then(|p| p.env_value(name))
            .and_then(parse_go_bool)
            .unwrap_or(false)
    };
    Ok(Redirect {
        mode,
        proxy_uid,
        proxy_gid,
        include_outbound_cidrs,
        exclude_outbound_cidrs,
        include_inbound_ports,
        exclude_inbound_ports,
        include_outbound_ports,
        exclude_outbound_ports,
        exclude_interfaces,
        reroute_virtual_interfaces,
        dns_capture: env_bool("ISTIO_META_DNS_CAPTURE"),
        dual_stack: env_bool("ISTIO_DUAL_STACK"),
        drop_invalid: env_bool("INVALID_DROP"),
        owner_groups: OwnerGroups::AllExcept(Vec::new()),
        ipv4_loopback: Cidr {
            addr: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            len: 32,
        },
    })
}

/// Non-string annotation values cannot come from the API; refused rather than guessed at.
fn refuse_non_string_annotations(pod: &Pod) -> Result<(), InvalidValue> {
    for (k, v) in &pod.metadata.annotations {
        if !v.is_string()
            && (k.starts_with("traffic.sidecar.istio.io/")
                || k == ANNOT_INTERCEPTION_MODE
                || k == ANNOT_REROUTE_VIRTUAL_INTERFACES)
        {
            return Err(invalid(
                k,
                &v.to_string(),
                "annotation values must be strings",
            ));
        }
    }
    Ok(())
}

/// `sidecar.istio.io/interceptionMode`: REDIRECT (the default) or TPROXY.
fn interception_mode(value: Option<&str>) -> Result<InterceptionMode, InvalidValue> {
    match value {
        None | Some("REDIRECT") => Ok(InterceptionMode::Redirect),
        Some("TPROXY") => Ok(InterceptionMode::Tproxy),
        Some(other) => Err(invalid(
            ANNOT_INTERCEPTION_MODE,
            other,
            "the istio-cni plugin supports REDIRECT or TPROXY",
        )),
    }
}

/// The interfaces whose traffic is rerouted to the sidecar, with the bound on the rules they
/// make with the included CIDRs (one per pair). The newer annotation wins over the
/// deprecated one when both are present.
fn reroute_interfaces(
    pod: &Pod,
    include_outbound_cidrs: &Selection<Cidr>,
) -> Result<Vec<IfName>, InvalidValue> {
    let a = |k: &str| pod.annotation(k);
    let reroute_key = match a(ANNOT_REROUTE_VIRTUAL_INTERFACES) {
        Some(_) => ANNOT_REROUTE_VIRTUAL_INTERFACES,
        None => ANNOT_KUBEVIRT_INTERFACES,
    };
    let reroute_virtual_interfaces = match a(reroute_key) {
        Some(v) => parse_ifnames(reroute_key, v)?,
        None => Vec::new(),
    };
    if let Selection::Only(cidrs) = include_outbound_cidrs {
        let rules = cidrs.len() * reroute_virtual_interfaces.len();
        if rules > limits::REROUTE_RULES {
            return Err(invalid(
                reroute_key,
                a(reroute_key).unwrap_or_default(),
                format!(
                    "{} rerouted interfaces times {} CIDRs in {ANNOT_INCLUDE_OUTBOUND_IP_RANGES} \
                     make {rules} rules; at most {} are accepted",
                    reroute_virtual_interfaces.len(),
                    cidrs.len(),
                    limits::REROUTE_RULES
                ),
            ));
        }
    }
    Ok(reroute_virtual_interfaces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::tests::injected_pod;
    use serde_json::{Value, json};

    fn redirect_with(annotations: &[(&str, &str)]) -> Result<Redirect, InvalidValue> {
        let mut v = injected_pod();
        for (k, val) in annotations {
            v["metadata"]["annotations"][*k] = Value::String(val.to_string());
        }
        from_pod(&Pod::from_json(v.to_string().as_bytes()).unwrap())
    }

    #[test]
    fn defaults() {
        let r = redirect_with(&[]).unwrap();
        assert_eq!(r.mode, InterceptionMode::Redirect);
        assert_eq!((r.proxy_uid, r.proxy_gid), (1337, 1337));
        assert_eq!(r.include_outbound_cidrs, Selection::All);
        assert_eq!(r.include_inbound_ports, Selection::All);
        assert_eq!(r.exclude_inbound_ports, vec![15020, 15021, 15090]);
        assert_eq!(r.exclude_outbound_ports, vec![15020]);
        assert!(r.include_outbound_ports.is_empty());
        assert!(!r.dns_capture);
    }

    #[test]
    fn annotations_are_parsed() {
        let r = redirect_with(&[
            (ANNOT_INTERCEPTION_MODE, "TPROXY"),
            (ANNOT_INCLUDE_OUTBOUND_IP_RANGES, "10.96.0.0/12,fd00::/8"),
            (ANNOT_EXCLUDE_OUTBOUND_IP_RANGES, "10.96.0.1/32"),
            (ANNOT_INCLUDE_INBOUND_PORTS, "80, 8080"),
            (ANNOT_EXCLUDE_INBOUND_PORTS, "22,15021"),
            (ANNOT_INCLUDE_OUTBOUND_PORTS, "443"),
            (ANNOT_EXCLUDE_OUTBOUND_PORTS, "5432,6379"),
            (ANNOT_EXCLUDE_INTERFACES, "net1"),
            (ANNOT_KUBEVIRT_INTERFACES, "k6t-eth0"),
        ])
        .unwrap();
        assert_eq!(r.mode, InterceptionMode::Tproxy);
        assert_eq!(
            r.include_outbound_cidrs,
            Selection::Only(vec![
                Cidr::parse("10.96.0.0/12").unwrap(),
                Cidr::parse("fd00::/8").unwrap()
            ])
        );
        assert_eq!(r.include_inbound_ports, Selection::Only(vec![80, 8080]));
        assert_eq!(r.exclude_inbound_ports, vec![22, 15021, 15020, 15090]);
        assert_eq!(r.exclude_outbound_ports, vec![5432, 6379]);
        assert_eq!(r.exclude_interfaces, vec![IfName::parse("net1").unwrap()]);
        assert_eq!(
            r.reroute_virtual_interfaces,
            vec![IfName::parse("k6t-eth0").unwrap()]
        );
        let r = redirect_with(&[
            (ANNOT_KUBEVIRT_INTERFACES, "old0"),
            (ANNOT_REROUTE_VIRTUAL_INTERFACES, "new0"),
        ])
        .unwrap();
        assert_eq!(
            r.reroute_virtual_interfaces,
            vec![IfName::parse("new0").unwrap()]
        );
        // empty include ports: no inbound capture
        let r = redirect_with(&[(ANNOT_INCLUDE_INBOUND_PORTS, "")]).unwrap();
        assert_eq!(r.include_inbound_ports, Selection::Only(vec![]));
        let r = redirect_with(&[(ANNOT_EXCLUDE_OUTBOUND_PORTS, "")]).unwrap();
        assert!(r.exclude_outbound_ports.is_empty());
    }

    #[test]
    fn hostile_values_are_refused_with_key_and_value() {
        let cases: &[(&str, &str)] = &[
            (ANNOT_INTERCEPTION_MODE, "NONE"),
            (ANNOT_INTERCEPTION_MODE, "REDIRECT\n-A OUTPUT -j DROP"),
            (ANNOT_INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8 -j ACCEPT"),
            (ANNOT_INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0"),
            (ANNOT_EXCLUDE_OUTBOUND_IP_RANGES, "1.2.3.4/33"),
            (ANNOT_EXCLUDE_OUTBOUND_IP_RANGES, "*"),
            (ANNOT_INCLUDE_INBOUND_PORTS, "80;rm -rf /"),
            (ANNOT_INCLUDE_INBOUND_PORTS, "70000"),
            (ANNOT_EXCLUDE_INBOUND_PORTS, "*"),
            (ANNOT_EXCLUDE_INBOUND_PORTS, "-1"),
            (ANNOT_INCLUDE_OUTBOUND_PORTS, "*"),
            (ANNOT_EXCLUDE_OUTBOUND_PORTS, "80,"),
            (ANNOT_EXCLUDE_INTERFACES, "eth0 -j ACCEPT"),
            (ANNOT_EXCLUDE_INTERFACES, "averyveryverylongname"),
            (ANNOT_KUBEVIRT_INTERFACES, "a\"b"),
            (ANNOT_REROUTE_VIRTUAL_INTERFACES, "x\n* filter"),
        ];
        for (k, v) in cases {
            let e = redirect_with(&[(k, v)]).expect_err(&format!("{k}={v:?} must be refused"));
            assert_eq!(e.key, *k);
            assert_eq!(e.value, *v);
            let text = e.to_string();
            assert!(
                text.contains(k) && text.contains(&format!("{v:?}")),
                "{text}"
            );
        }
    }

    #[test]
    fn lists_above_their_limits_are_refused_with_the_key_and_the_limit() {
        let list = |n: usize, f: fn(usize) -> String| (0..n).map(f).collect::<Vec<_>>().join(",");
        let ports = |i: usize| (1 + i % 60000).to_string();
        let cidrs = |i: usize| format!("10.{}.{}.0/24", i / 256, i % 256);
        let ifaces = |i: usize| format!("net{i}");
        for (key, at_limit, above) in [
            (
                ANNOT_EXCLUDE_INBOUND_PORTS,
                list(limits::PORTS, ports),
                list(limits::PORTS + 1, ports),
            ),
            (
                ANNOT_EXCLUDE_OUTBOUND_IP_RANGES,
                list(limits::CIDRS, cidrs),
                list(limits::CIDRS + 1, cidrs),
            ),
            (
                ANNOT_EXCLUDE_INTERFACES,
                list(limits::INTERFACES, ifaces),
                list(limits::INTERFACES + 1, ifaces),
            ),
        ] {
            assert!(
                redirect_with(&[(key, &at_limit)]).is_ok(),
                "{key} at its limit"
            );
            let e = redirect_with(&[(key, &above)]).unwrap_err();
            assert_eq!(e.key, key);
            let msg = e.to_string();
            assert!(msg.contains("entries; at most"), "{msg}");
            assert!(msg.len() < 400, "the message shows a bounded part: {msg}");
            assert!(msg.contains(&format!("({} bytes)", above.len())), "{msg}");
        }
    }

    #[test]
    fn rerouted_interfaces_times_included_cidrs_is_bounded() {
        let cidrs: Vec<String> = (0..1024)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect();
        let ifaces: Vec<String> = (0..5).map(|i| format!("net{i}")).collect();
        let (cidrs, ifaces) = (cidrs.join(","), ifaces.join(","));
        let e = redirect_with(&[
            (ANNOT_INCLUDE_OUTBOUND_IP_RANGES, &cidrs),
            (ANNOT_REROUTE_VIRTUAL_INTERFACES, &ifaces),
        ])
        .unwrap_err();
        assert_eq!(e.key, ANNOT_REROUTE_VIRTUAL_INTERFACES);
        assert!(e.why.contains("make 5120 rules; at most 4096"), "{e}");
        // Four interfaces: 4096 rules, accepted; and the rules are built.
        let four = "net0,net1,net2,net3";
        let r = redirect_with(&[
            (ANNOT_INCLUDE_OUTBOUND_IP_RANGES, &cidrs),
            (ANNOT_KUBEVIRT_INTERFACES, four),
        ])
        .unwrap();
        assert_eq!(r.reroute_virtual_interfaces.len(), 4);
    }

    #[test]
    fn non_string_annotation_is_refused() {
        let mut v = injected_pod();
        v["metadata"]["annotations"][ANNOT_EXCLUDE_INBOUND_PORTS] = json!(22);
        let e = from_pod(&Pod::from_json(v.to_string().as_bytes()).unwrap()).unwrap_err();
        assert_eq!(e.key, ANNOT_EXCLUDE_INBOUND_PORTS);
    }

    #[test]
    fn proxy_ids_and_env() {
        let mut v = injected_pod();
        v["spec"]["containers"][1]["securityContext"] = json!({"runAsUser": 2000, "runAsGroup": 0});
        v["spec"]["containers"][1]["env"] = json!([
            {"name": "ISTIO_META_DNS_CAPTURE", "value": "true"},
            {"name": "INVALID_DROP", "value": "maybe"}
        ]);
        let r = from_pod(&Pod::from_json(v.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!((r.proxy_uid, r.proxy_gid), (2000, 1337));
        assert!(r.dns_capture);
        assert!(!r.drop_invalid);
        v["spec"]["containers"][1]["securityContext"] = json!({"runAsUser": -5});
        let e = from_pod(&Pod::from_json(v.to_string().as_bytes()).unwrap()).unwrap_err();
        assert!(e.key.contains("runAsUser"));
    }

    #[test]
    fn runtime_env_settings() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let mut r = redirect_with(&[]).unwrap();
        apply_runtime_env(&mut r, &env(&[])).unwrap();
        assert_eq!(r.owner_groups, OwnerGroups::AllExcept(vec![]));
        apply_runtime_env(&mut r, &env(&[(ENV_OWNER_GROUPS_EXCLUDE, "root, 999")])).unwrap();
        assert_eq!(
            r.owner_groups,
            OwnerGroups::AllExcept(vec![
                GroupName::parse("root").unwrap(),
                GroupName::parse("999").unwrap()
            ])
        );
        apply_runtime_env(
            &mut r,
            &env(&[
                (ENV_OWNER_GROUPS, "java,1001"),
                (ENV_IPV4_LOOPBACK_CIDR, "127.0.0.0/8"),
            ]),
        )
        .unwrap();
        assert_eq!(
            r.owner_groups,
            OwnerGroups::Only(vec![
                GroupName::parse("java").unwrap(),
                GroupName::parse("1001").unwrap()
            ])
        );
        assert_eq!(r.ipv4_loopback.to_string(), "127.0.0.0/8");
        let e = apply_runtime_env(
            &mut r,
            &env(&[(ENV_OWNER_GROUPS, "a"), (ENV_OWNER_GROUPS_EXCLUDE, "b")]),
        )
        .unwrap_err();
        assert_eq!(e.key, ENV_OWNER_GROUPS_EXCLUDE);
        let e = apply_runtime_env(&mut r, &env(&[(ENV_OWNER_GROUPS, "a b")])).unwrap_err();
        assert_eq!(e.value, "a b");
        let e =
            apply_runtime_env(&mut r, &env(&[(ENV_IPV4_LOOPBACK_CIDR, "::1/128")])).unwrap_err();
        assert_eq!(e.key, ENV_IPV4_LOOPBACK_CIDR);
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(Cidr::parse("10.0.0.1/8").unwrap().to_string(), "10.0.0.1/8");
        assert_eq!(Cidr::parse("fd00::/8").unwrap().to_string(), "fd00::/8");
        assert!(Cidr::parse("fd00::/129").is_none());
        assert!(Cidr::parse("10.0.0.0/+8").is_none());
        assert!(Cidr::parse("010.0.0.0/8").is_none());
    }
}
