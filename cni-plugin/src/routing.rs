//! The pod's routing state that Istio sets with the `ip` command, set here over rtnetlink
//! (`NETLINK_ROUTE`) from inside the pod's netns, so no `ip` binary is needed (the image is
//! `FROM scratch`): TPROXY's policy routing (`ip rule add fwmark 1337 lookup 133` and
//! `ip route add local default dev lo table 133`, per family) and Envoy's IPv6 inbound
//! passthrough source (`ip -6 addr add ::6/128 dev lo`).
//!
//! Each message is the one iproute2 sends for that command (same header fields, flags and
//! attributes, `strace`d from iproute2 6.1), so the kernel ends in the same state and
//! `ip rule show` / `ip route show` print the same lines. As with Istio's calls, "File exists"
//! means already done; TPROXY's rule, which the kernel never reports as existing, is looked up
//! before it is added. The encoders and parsers are pure; the functions taking a [`Netns`] hold
//! the side effects.
use crate::iptables::Netns;
use crate::netlink::{
    Attrs, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, Socket, attr_u32,
    parse_attrs, push_message,
};
use crate::rules::{TPROXY_MARK, TPROXY_ROUTE_TABLE};
use std::net::{IpAddr, Ipv6Addr};

// include/uapi/linux/rtnetlink.h, fib_rules.h, if_addr.h
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWRULE: u16 = 32;
const RTM_GETRULE: u16 = 34;
const RT_TABLE_UNSPEC: u8 = 0;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const FR_ACT_TO_TBL: u8 = 1;
const FIB_RULE_INVERT: u32 = 0x2;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

/// `ip`'s creating requests: `NLM_F_EXCL`, so an existing object answers `EEXIST`.
const CREATE: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE;
/// One request per socket: the sequence number only has to be non-zero.
const SEQ: u32 = 1;

/// Envoy's inbound passthrough source on IPv6 (Istio's `configureIPv6Addresses`).
pub const INBOUND_PASSTHROUGH_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

fn family(v6: bool) -> u8 {
    if v6 {
        libc::AF_INET6 as u8
    } else {
        libc::AF_INET as u8
    }
}

fn family_flag(v6: bool) -> &'static str {
    if v6 { "-6" } else { "-4" }
}

/// A table id as iproute2 sends it: in the header when it fits a byte, else as an attribute
/// with `RT_TABLE_UNSPEC` in the header.
fn table_fields(table: u32) -> (u8, Option<u32>) {
    match u8::try_from(table) {
        Ok(t) => (t, None),
        Err(_) => (RT_TABLE_UNSPEC, Some(table)),
    }
}

/// `ip -4|-6 rule add fwmark <fwmark> lookup <table>` (`struct fib_rule_hdr` + attributes).
pub fn new_rule_message(v6: bool, fwmark: u32, table: u32) -> Vec<u8> {
    let (hdr_table, table_attr) = table_fields(table);
    let mut fixed = vec![family(v6), 0, 0, 0, hdr_table, 0, 0, FR_ACT_TO_TBL];
    fixed.extend_from_slice(&0u32.to_ne_bytes());
    let attrs = Attrs::with(|a| {
        a.u32(FRA_FWMARK, fwmark);
        if let Some(t) = table_attr {
            a.u32(FRA_TABLE, t);
        }
    });
    let mut buf = Vec::new();
    push_message(&mut buf, RTM_NEWRULE, CREATE, SEQ, &fixed, &attrs);
    buf
}

/// `ip -4|-6 route add local default dev <oif> table <table>` (`struct rtmsg` + attributes).
/// As iproute2: the default destination is sent as an all-zero address, and a local route's
/// scope is host on IPv4, universe on IPv6.
pub fn new_local_default_route_message(v6: bool, oif: u32, table: u32) -> Vec<u8> {
    let (hdr_table, table_attr) = table_fields(table);
    let scope = if v6 { RT_SCOPE_UNIVERSE } else { RT_SCOPE_HOST };
    let mut fixed = vec![
        family(v6),
        0,
        0,
        0,
        hdr_table,
        RTPROT_BOOT,
        scope,
        RTN_LOCAL,
    ];
    fixed.extend_from_slice(&0u32.to_ne_bytes());
    let zero: &[u8] = if v6 { &[0; 16] } else { &[0; 4] };
    let attrs = Attrs::with(|a| {
        if let Some(t) = table_attr {
            a.u32(RTA_TABLE, t);
        }
        a.raw(RTA_DST, zero).u32(RTA_OIF, oif);
    });
    let mut buf = Vec::new();
    push_message(&mut buf, RTM_NEWROUTE, CREATE, SEQ, &fixed, &attrs);
    buf
}

/// `ip addr add <addr>/<prefix_len> dev <ifindex>` (`struct ifaddrmsg` + local and address).
/// Scope 0 (global), as iproute2 picks for any address outside 127/8.
pub fn new_address_message(addr: IpAddr, prefix_len: u8, ifindex: u32) -> Vec<u8> {
    let (fam, bytes) = match addr {
        IpAddr::V4(a) => (family(false), a.octets().to_vec()),
        IpAddr::V6(a) => (family(true), a.octets().to_vec()),
    };
    let mut fixed = vec![fam, prefix_len, 0, RT_SCOPE_UNIVERSE];
    fixed.extend_from_slice(&ifindex.to_ne_bytes());
    let attrs = Attrs::with(|a| {
        a.raw(IFA_LOCAL, &bytes).raw(IFA_ADDRESS, &bytes);
    });
    let mut buf = Vec::new();
    push_message(&mut buf, RTM_NEWADDR, CREATE, SEQ, &fixed, &attrs);
    buf
}

/// A dump of one family's rules (`kind` RTM_GETRULE) or routes (RTM_GETROUTE); both fixed
/// headers are 12 bytes starting with the family.
fn dump_message(kind: u16, v6: bool) -> Vec<u8> {
    let mut fixed = vec![0u8; 12];
    fixed[0] = family(v6);
    let mut buf = Vec::new();
    push_message(
        &mut buf,
        kind,
        NLM_F_REQUEST | NLM_F_DUMP,
        SEQ,
        &fixed,
        &Attrs::default(),
    );
    buf
}

/// What a policy rule says, as far as TPROXY's rule is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub fwmark: Option<u32>,
    pub fwmask: Option<u32>,
    pub table: u32,
    pub action: u8,
    pub inverted: bool,
}

impl Rule {
    /// A `RTM_NEWRULE` payload (after the `nlmsghdr`).
    pub fn parse(payload: &[u8]) -> Option<Rule> {
        let hdr = payload.get(..12)?;
        let mut rule = Rule {
            fwmark: None,
            fwmask: None,
            table: u32::from(hdr[4]),
            action: hdr[7],
            inverted: attr_u32(&hdr[8..12])? & FIB_RULE_INVERT != 0,
        };
        for (kind, value) in parse_attrs(&payload[12..]) {
            match kind {
                FRA_FWMARK => rule.fwmark = attr_u32(value),
                FRA_FWMASK => rule.fwmask = attr_u32(value),
                FRA_TABLE => rule.table = attr_u32(value)?,
                _ => {}
            }
        }
        Some(rule)
    }

    /// `fwmark <fwmark> lookup <table>` with the full mask, as `ip rule add` makes it.
    pub fn is_fwmark_lookup(&self, fwmark: u32, table: u32) -> bool {
        self.fwmark == Some(fwmark)
            && self.fwmask.is_none_or(|m| m == u32::MAX)
            && self.table == table
            && self.action == FR_ACT_TO_TBL
            && !self.inverted
    }
}

/// What a route says, as far as TPROXY's route is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub table: u32,
    pub kind: u8,
    pub dst_len: u8,
    pub oif: Option<u32>,
}

impl Route {
    /// A `RTM_NEWROUTE` payload (after the `nlmsghdr`).
    pub fn parse(payload: &[u8]) -> Option<Route> {
        let hdr = payload.get(..12)?;
        let mut route = Route {
            table: u32::from(hdr[4]),
            kind: hdr[7],
            dst_len: hdr[1],
            oif: None,
        };
        for (kind, value) in parse_attrs(&payload[12..]) {
            match kind {
                RTA_TABLE => route.table = attr_u32(value)?,
                RTA_OIF => route.oif = attr_u32(value),
                _ => {}
            }
        }
        Some(route)
    }

    /// `local default dev <oif>` in `table`.
    pub fn is_local_default(&self, oif: u32, table: u32) -> bool {
        self.kind == RTN_LOCAL && self.dst_len == 0 && self.oif == Some(oif) && self.table == table
    }
}

/// How `ip rule show` prints TPROXY's rule (and how errors name it).
fn tproxy_rule_text() -> String {
    format!("fwmark {TPROXY_MARK:#x} lookup {TPROXY_ROUTE_TABLE}")
}

/// Setting or reading the pod's routing state failed.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// The thread that enters the netns could not.
    #[error("entering netns {netns}: {source}")]
    EnterNetns {
        netns: String,
        source: std::io::Error,
    },
    /// A step inside the netns failed.
    #[error("in netns {netns}: {step}")]
    InNetns {
        netns: String,
        step: RoutingStepError,
    },
}

/// One step inside the pod's netns.
#[derive(Debug, thiserror::Error)]
pub enum RoutingStepError {
    #[error("rtnetlink socket: {0}")]
    Socket(std::io::Error),
    #[error("no interface \"lo\": {0}")]
    NoLoopback(std::io::Error),
    /// A request or dump, named by the `ip` command it stands for.
    #[error("{command}: {source}")]
    Netlink {
        command: String,
        source: std::io::Error,
    },
}

impl RoutingStepError {
    fn netlink(command: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let command = command.into();
        move |source| Self::Netlink { command, source }
    }
}

/// The index of `lo` in the calling thread's netns.
fn loopback_index() -> Result<u32, RoutingStepError> {
    // SAFETY: a NUL-terminated name; if_nametoindex only reads it.
    match unsafe { libc::if_nametoindex(c"lo".as_ptr()) } {
        0 => Err(RoutingStepError::NoLoopback(std::io::Error::last_os_error())),
        i => Ok(i),
    }
}

/// Runs `f` with a `NETLINK_ROUTE` socket opened inside `netns` and `lo`'s index there.
fn in_netns<T: Send>(
    netns: &Netns,
    f: impl FnOnce(&Socket, u32) -> Result<T, RoutingStepError> + Send,
) -> Result<T, RoutingError> {
    netns
        .run(|| {
            let s = Socket::open(libc::NETLINK_ROUTE).map_err(RoutingStepError::Socket)?;
            f(&s, loopback_index()?)
        })
        .map_err(|source| RoutingError::EnterNetns {
            netns: netns.path.clone(),
            source,
        })?
        .map_err(|step| RoutingError::InNetns {
            netns: netns.path.clone(),
            step,
        })
}

/// Sends one creating request; "File exists" is success, as `ip` is used by Istio.
fn create(s: &Socket, message: &[u8], what: &str) -> Result<(), RoutingStepError> {
    match s.transact(message) {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => Err(RoutingStepError::netlink(what)(e)),
        _ => Ok(()),
    }
}

/// Whether the family's rules hold TPROXY's rule.
fn has_tproxy_rule(s: &Socket, v6: bool) -> Result<bool, RoutingStepError> {
    let rules = s
        .dump(&dump_message(RTM_GETRULE, v6), RTM_NEWRULE)
        .map_err(RoutingStepError::netlink(format!(
            "ip {} rule show",
            family_flag(v6)
        )))?;
    Ok(rules
        .iter()
        .filter_map(|r| Rule::parse(r))
        .any(|r| r.is_fwmark_lookup(TPROXY_MARK, TPROXY_ROUTE_TABLE)))
}

/// TPROXY's policy routing: packets marked by the mangle rules are delivered locally, for IPv4
/// and, with `v6`, IPv6 (Istio's `configureTProxyRoutes`).
pub fn add_tproxy_routing(netns: &Netns, v6: bool) -> Result<(), RoutingError> {
    let families: &[bool] = if v6 { &[false, true] } else { &[false] };
    in_netns(netns, |s, lo| {
        for &v6 in families {
            let fam = family_flag(v6);
            // A rule without a priority never answers "File exists" (the kernel gives the new
            // one the next free priority), so `ip rule add` run twice holds it twice: looked up
            // first, so that a repeated ADD or a repair leaves one.
            if !has_tproxy_rule(s, v6)? {
                create(
                    s,
                    &new_rule_message(v6, TPROXY_MARK, TPROXY_ROUTE_TABLE),
                    &format!("ip {fam} rule add {}", tproxy_rule_text()),
                )?;
            }
            create(
                s,
                &new_local_default_route_message(v6, lo, TPROXY_ROUTE_TABLE),
                &format!("ip {fam} route add local default dev lo table {TPROXY_ROUTE_TABLE}"),
            )?;
        }
        Ok(())
    })
}

/// `::6/128` on `lo`: Envoy's inbound passthrough source on IPv6 (Istio's
/// `configureIPv6Addresses`).
pub fn add_inbound_passthrough_v6(netns: &Netns) -> Result<(), RoutingError> {
    in_netns(netns, |s, lo| {
        create(
            s,
            &new_address_message(IpAddr::V6(INBOUND_PASSTHROUGH_V6), 128, lo),
            &format!("ip -6 addr add {INBOUND_PASSTHROUGH_V6}/128 dev lo"),
        )
    })
}

/// What of TPROXY's policy routing is missing (CNI CHECK): IPv4 and, with `v6`, IPv6.
pub fn tproxy_routing_problems(netns: &Netns, v6: bool) -> Result<Vec<String>, RoutingError> {
    let families: &[bool] = if v6 { &[false, true] } else { &[false] };
    in_netns(netns, |s, lo| {
        let mut problems = Vec::new();
        for &v6 in families {
            let fam = family_flag(v6);
            if !has_tproxy_rule(s, v6)? {
                problems.push(format!(
                    "{fam} ip rule \"{}\" is missing",
                    tproxy_rule_text()
                ));
            }
            let routes = s
                .dump(&dump_message(RTM_GETROUTE, v6), RTM_NEWROUTE)
                .map_err(RoutingStepError::netlink(format!(
                    "ip {fam} route show table {TPROXY_ROUTE_TABLE}"
                )))?;
            if !routes
                .iter()
                .filter_map(|r| Route::parse(r))
                .any(|r| r.is_local_default(lo, TPROXY_ROUTE_TABLE))
            {
                problems.push(format!(
                    "{fam} route table {TPROXY_ROUTE_TABLE} has no local default route"
                ));
            }
        }
        Ok(problems)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `nlmsghdr` as iproute2 writes it (port id 0).
    fn header(len: u32, kind: u16, flags: u16) -> Vec<u8> {
        let mut h = len.to_ne_bytes().to_vec();
        h.extend_from_slice(&kind.to_ne_bytes());
        h.extend_from_slice(&flags.to_ne_bytes());
        h.extend_from_slice(&SEQ.to_ne_bytes());
        h.extend_from_slice(&0u32.to_ne_bytes());
        h
    }

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        a
    }

    /// REQUEST | ACK | EXCL | CREATE, as `strace ip ... add` shows.
    const IP_ADD_FLAGS: u16 = 0x605;

    #[test]
    fn the_rule_is_iproute2s_fwmark_lookup() {
        // strace: {nlmsg_len=36, RTM_NEWRULE, ...}, {family=AF_INET, dst_len=0, src_len=0,
        // tos=0, table=0x85, action=FR_ACT_TO_TBL, flags=0}, [{nla_len=8, FRA_FWMARK}, 1337]
        for (v6, fam) in [(false, 2u8), (true, 10u8)] {
            let mut want = header(36, 32, IP_ADD_FLAGS);
            want.extend_from_slice(&[fam, 0, 0, 0, 133, 0, 0, 1, 0, 0, 0, 0]);
            want.extend(attr(10, &1337u32.to_ne_bytes()));
            assert_eq!(new_rule_message(v6, 1337, 133), want, "v6={v6}");
        }
        // A table past 255 goes in FRA_TABLE, as iproute2 does.
        let big = new_rule_message(false, 1337, 1000);
        assert_eq!(big[16 + 4], RT_TABLE_UNSPEC);
        assert_eq!(&big[36..44], &attr(15, &1000u32.to_ne_bytes())[..]);
    }

    #[test]
    fn the_route_is_iproute2s_local_default() {
        // strace (IPv4): {nlmsg_len=44, RTM_NEWROUTE, ...}, {rtm_family=AF_INET, rtm_dst_len=0,
        // rtm_src_len=0, rtm_tos=0, rtm_table=0x85, rtm_protocol=RTPROT_BOOT,
        // rtm_scope=RT_SCOPE_HOST, rtm_type=RTN_LOCAL, rtm_flags=0},
        // [{nla_len=8, RTA_DST}, 0.0.0.0], [{nla_len=8, RTA_OIF}, lo]
        let mut want = header(44, 24, IP_ADD_FLAGS);
        want.extend_from_slice(&[2, 0, 0, 0, 133, 3, 254, 2, 0, 0, 0, 0]);
        want.extend(attr(1, &[0; 4]));
        want.extend(attr(4, &1u32.to_ne_bytes()));
        assert_eq!(new_local_default_route_message(false, 1, 133), want);
        // IPv6: scope universe, RTA_DST ::, 56 bytes.
        let mut want = header(56, 24, IP_ADD_FLAGS);
        want.extend_from_slice(&[10, 0, 0, 0, 133, 3, 0, 2, 0, 0, 0, 0]);
        want.extend(attr(1, &[0; 16]));
        want.extend(attr(4, &1u32.to_ne_bytes()));
        assert_eq!(new_local_default_route_message(true, 1, 133), want);
    }

    #[test]
    fn the_passthrough_address_is_iproute2s_addr_add() {
        // strace: {nlmsg_len=64, RTM_NEWADDR, ...}, {ifa_family=AF_INET6, ifa_prefixlen=128,
        // ifa_flags=0, ifa_scope=RT_SCOPE_UNIVERSE, ifa_index=lo},
        // [{nla_len=20, IFA_LOCAL}, ::6], [{nla_len=20, IFA_ADDRESS}, ::6]
        let six = INBOUND_PASSTHROUGH_V6.octets();
        let mut want = header(64, 20, IP_ADD_FLAGS);
        want.extend_from_slice(&[10, 128, 0, 0]);
        want.extend_from_slice(&1u32.to_ne_bytes());
        want.extend(attr(2, &six));
        want.extend(attr(1, &six));
        assert_eq!(
            new_address_message(IpAddr::V6(INBOUND_PASSTHROUGH_V6), 128, 1),
            want
        );
    }

    #[test]
    fn a_dump_asks_for_one_family() {
        let mut want = header(28, 34, 0x301);
        want.extend_from_slice(&[10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(dump_message(RTM_GETRULE, true), want);
    }

    #[test]
    fn a_dumped_rule_matches_only_as_ip_made_it() {
        // What the kernel answers is what was asked, plus the priority it picked.
        let sent = new_rule_message(false, 1337, 133);
        let mut answer = sent[16..].to_vec();
        answer.extend(attr(6, &32765u32.to_ne_bytes()));
        let rule = Rule::parse(&answer).unwrap();
        assert!(rule.is_fwmark_lookup(1337, 133), "{rule:?}");
        assert!(!rule.is_fwmark_lookup(1338, 133));
        assert!(!rule.is_fwmark_lookup(1337, 134));
        let masked = Rule {
            fwmask: Some(0xff),
            ..rule.clone()
        };
        assert!(!masked.is_fwmark_lookup(1337, 133), "another mask");
        let full = Rule {
            fwmask: Some(u32::MAX),
            ..rule.clone()
        };
        assert!(full.is_fwmark_lookup(1337, 133), "the kernel's full mask");
        let inverted = Rule {
            inverted: true,
            ..rule
        };
        assert!(!inverted.is_fwmark_lookup(1337, 133), "not fwmark ...");
        let big = Rule::parse(&new_rule_message(false, 1337, 1000)[16..]).unwrap();
        assert_eq!(big.table, 1000);
        assert_eq!(Rule::parse(&[0; 8]), None, "too short");
    }

    #[test]
    fn a_dumped_route_matches_only_local_default_on_lo() {
        let route = Route::parse(&new_local_default_route_message(true, 1, 133)[16..]).unwrap();
        assert!(route.is_local_default(1, 133), "{route:?}");
        assert!(!route.is_local_default(2, 133), "another device");
        assert!(!route.is_local_default(1, 254), "another table");
        let unicast = Route { kind: 1, ..route };
        assert!(!unicast.is_local_default(1, 133));
    }

    #[test]
    fn the_rule_is_named_as_ip_rule_show_prints_it() {
        assert_eq!(tproxy_rule_text(), "fwmark 0x539 lookup 133");
    }
}
