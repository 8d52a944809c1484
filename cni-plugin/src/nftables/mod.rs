//! Istio's sidecar redirection as a native nftables ruleset (`native_nftables: true`), as pure
//! data: the tables, chains, hooks, priorities, rules (in order) and counters that Istio's
//! nftables backend writes (`tools/istio-nftables/pkg/capture/run.go` in
//! <https://github.com/istio/istio>, Istio 1.27+), built from the same [`Redirect`] the iptables
//! path uses. [`Ruleset::transaction_text`] renders it as Istio's golden files show it
//! (`nft -f` syntax); [`netlink`] programs it.
//!
//! What the ruleset holds is decided here; [`netlink`] only encodes it. Why this crate writes
//! its own nf_tables netlink encoder rather than depending on one:
//! - no `nft` binary at run time (istio/istio#57978: a host without `nft` breaks pods);
//! - `rustables` (the one maintained pure-Rust nf_tables crate) is GPL-3.0-or-later, which a
//!   static Apache-2.0 binary cannot link, and it has no `tproxy` expression;
//! - `nftnl`/`mnl` bind the C libraries libnftnl/libmnl (no static musl build without them);
//! - the `nftables` crate drives the `nft` binary (JSON), which is what istio#57978 is about.
//!
//! The encoder needs a dozen expression kinds, all listed in [`Stmt`]; it is built on `libc`.
pub mod netlink;

use crate::redirect::{
    Cidr, GroupName, IfName, InterceptionMode, OwnerGroups, Redirect, Selection,
};
use crate::rules::{
    DNS_LISTENER_PORT, INBOUND_CAPTURE_PORT, INBOUND_TUNNEL_PORT, OUTBOUND_MARK, PROXY_PORT,
    TPROXY_MARK,
};
use std::fmt;

pub const NAT_TABLE: &str = "istio-proxy-nat";
pub const MANGLE_TABLE: &str = "istio-proxy-mangle";
pub const RAW_TABLE: &str = "istio-proxy-raw";
/// Every table this backend writes (and DEL removes), in Istio's order.
pub const TABLES: [&str; 3] = [NAT_TABLE, MANGLE_TABLE, RAW_TABLE];

const PREROUTING: &str = "prerouting";
const OUTPUT: &str = "output";
const ISTIO_INBOUND: &str = "istio-inbound";
const ISTIO_OUTPUT: &str = "istio-output";
const ISTIO_OUTPUT_DNS: &str = "istio-output-dns";
const ISTIO_REDIRECT: &str = "istio-redirect";
const ISTIO_IN_REDIRECT: &str = "istio-in-redirect";
const ISTIO_DIVERT: &str = "istio-divert";
const ISTIO_TPROXY: &str = "istio-tproxy";
const ISTIO_DROP: &str = "istio-drop";

const V6_LOOPBACK: &str = "::1/128";
const V4_PASSTHROUGH_SOURCE: &str = "127.0.0.6/32";
const V6_PASSTHROUGH_SOURCE: &str = "::6/128";
const DNS_PORT: u16 = 53;

/// A base chain's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainType {
    Nat,
    Filter,
    /// Re-routes a locally generated packet whose mark changed (needed for TPROXY's mark).
    Route,
}

impl ChainType {
    pub fn name(self) -> &'static str {
        match self {
            ChainType::Nat => "nat",
            ChainType::Filter => "filter",
            ChainType::Route => "route",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Output,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Output => "output",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BaseChain {
    pub kind: ChainType,
    pub hook: Hook,
    pub priority: i32,
}

/// knftables' named priorities, as Istio uses them.
const DNAT_PRIORITY: i32 = -100;
const MANGLE_PRIORITY: i32 = -150;
const RAW_PRIORITY: i32 = -300;

/// A table's chains in the order Istio declares them (`addIstio*TableRules`).
fn chain_specs(table: &str) -> &'static [(&'static str, Option<BaseChain>)] {
    const fn base(kind: ChainType, hook: Hook, priority: i32) -> Option<BaseChain> {
        Some(BaseChain {
            kind,
            hook,
            priority,
        })
    }
    const NAT: &[(&str, Option<BaseChain>)] = &[
        (
            PREROUTING,
            base(ChainType::Nat, Hook::Prerouting, DNAT_PRIORITY),
        ),
        (OUTPUT, base(ChainType::Nat, Hook::Output, DNAT_PRIORITY)),
        (ISTIO_INBOUND, None),
        (ISTIO_REDIRECT, None),
        (ISTIO_IN_REDIRECT, None),
        (ISTIO_OUTPUT, None),
        (ISTIO_OUTPUT_DNS, None),
    ];
    const MANGLE: &[(&str, Option<BaseChain>)] = &[
        (
            PREROUTING,
            base(ChainType::Filter, Hook::Prerouting, MANGLE_PRIORITY),
        ),
        (
            OUTPUT,
            base(ChainType::Route, Hook::Output, MANGLE_PRIORITY),
        ),
        (ISTIO_DIVERT, None),
        (ISTIO_TPROXY, None),
        (ISTIO_INBOUND, None),
        (ISTIO_DROP, None),
    ];
    const RAW: &[(&str, Option<BaseChain>)] = &[
        (
            PREROUTING,
            base(ChainType::Filter, Hook::Prerouting, RAW_PRIORITY),
        ),
        (OUTPUT, base(ChainType::Filter, Hook::Output, RAW_PRIORITY)),
        (ISTIO_INBOUND, None),
        (ISTIO_OUTPUT_DNS, None),
    ];
    match table {
        NAT_TABLE => NAT,
        MANGLE_TABLE => MANGLE,
        _ => RAW,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
}

impl L4 {
    pub fn name(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
        }
    }
    pub fn number(self) -> u8 {
        match self {
            L4::Tcp => libc::IPPROTO_TCP as u8,
            L4::Udp => libc::IPPROTO_UDP as u8,
        }
    }
}

/// Source or destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    Src,
    Dst,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Neq,
}

impl Op {
    fn prefix(self) -> &'static str {
        match self {
            Op::Eq => "",
            Op::Neq => "!= ",
        }
    }
}

/// A socket's group in `skgid`: the proxy's id, or an owner group as configured (name or id;
/// names are resolved when the rule is encoded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Group {
    Id(u32),
    Named(GroupName),
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Group::Id(id) => write!(f, "{id}"),
            Group::Named(n) => write!(f, "{n}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(&'static str),
}

/// One statement of a rule, typed; the text and the netlink encoding both come from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stmt {
    /// `meta l4proto tcp`
    L4Proto(L4),
    /// `tcp dport 15008`, `tcp dport != 15008`, `tcp dport != { 53, 15008 }`
    Port {
        proto: L4,
        dir: Dir,
        op: Op,
        ports: Vec<u16>,
    },
    /// `ip daddr != 127.0.0.1/32`, `ip6 saddr ::6/128`
    Addr {
        dir: Dir,
        op: Op,
        cidr: Cidr,
    },
    /// `iifname lo` (`Src`), `oifname lo` (`Dst`)
    IfName {
        dir: Dir,
        name: String,
    },
    /// `skuid 1337`; `meta skuid 1337` when `meta` (Istio spells it so in the raw table).
    SkUid {
        op: Op,
        uid: u32,
        meta: bool,
    },
    SkGid {
        op: Op,
        gid: Group,
        meta: bool,
    },
    /// `ct state related,established`
    CtStateRelatedEstablished,
    /// `ct state invalid`
    CtStateInvalid,
    /// `mark 1337`, `mark != 1338`
    Mark {
        op: Op,
        value: u32,
    },
    /// `ct mark 1337`
    CtMark(u32),
    Counter,
    MetaMarkSet(u32),
    /// `ct mark set mark`
    CtMarkSetMark,
    /// `meta mark set ct mark`
    MetaMarkSetCtMark,
    CtZoneSet(u16),
    /// `redirect to :15001`
    Redirect(u16),
    /// `tproxy ip to :15006` (`ip6` when `v6`)
    Tproxy {
        v6: bool,
        port: u16,
    },
    Verdict(Verdict),
}

impl fmt::Display for Stmt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stmt::L4Proto(p) => write!(f, "meta l4proto {}", p.name()),
            Stmt::Port {
                proto,
                dir,
                op,
                ports,
            } => {
                let field = if *dir == Dir::Src { "sport" } else { "dport" };
                write!(f, "{} {field} {}", proto.name(), op.prefix())?;
                if let [one] = ports.as_slice() {
                    write!(f, "{one}")
                } else {
                    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                    write!(f, "{{ {} }}", list.join(", "))
                }
            }
            Stmt::Addr { dir, op, cidr } => {
                let fam = if cidr.addr.is_ipv4() { "ip" } else { "ip6" };
                let field = if *dir == Dir::Src { "saddr" } else { "daddr" };
                write!(f, "{fam} {field} {}{cidr}", op.prefix())
            }
            Stmt::IfName { dir, name } => {
                let key = if *dir == Dir::Src {
                    "iifname"
                } else {
                    "oifname"
                };
                write!(f, "{key} {name}")
            }
            Stmt::SkUid { op, uid, meta } => {
                let m = if *meta { "meta " } else { "" };
                write!(f, "{m}skuid {}{uid}", op.prefix())
            }
            Stmt::SkGid { op, gid, meta } => {
                let m = if *meta { "meta " } else { "" };
                write!(f, "{m}skgid {}{gid}", op.prefix())
            }
            Stmt::CtStateRelatedEstablished => f.write_str("ct state related,established"),
            Stmt::CtStateInvalid => f.write_str("ct state invalid"),
            Stmt::Mark { op, value } => write!(f, "mark {}{value}", op.prefix()),
            Stmt::CtMark(v) => write!(f, "ct mark {v}"),
            Stmt::Counter => f.write_str("counter"),
            Stmt::MetaMarkSet(v) => write!(f, "meta mark set {v}"),
            Stmt::CtMarkSetMark => f.write_str("ct mark set mark"),
            Stmt::MetaMarkSetCtMark => f.write_str("meta mark set ct mark"),
            Stmt::CtZoneSet(z) => write!(f, "ct zone set {z}"),
            Stmt::Redirect(p) => write!(f, "redirect to :{p}"),
            Stmt::Tproxy { v6, port } => {
                write!(f, "tproxy {} to :{port}", if *v6 { "ip6" } else { "ip" })
            }
            Stmt::Verdict(Verdict::Accept) => f.write_str("accept"),
            Stmt::Verdict(Verdict::Drop) => f.write_str("drop"),
            Stmt::Verdict(Verdict::Return) => f.write_str("return"),
            Stmt::Verdict(Verdict::Jump(c)) => write!(f, "jump {c}"),
        }
    }
}

/// One rule as Istio's transaction writes it: appended, or inserted at an index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleOp {
    pub chain: &'static str,
    /// `insert rule ... index n` (already turned into an append where Istio does so).
    pub index: Option<usize>,
    pub stmts: Vec<Stmt>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub name: &'static str,
    pub base: Option<BaseChain>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub name: &'static str,
    /// Only the chains that hold rules, in Istio's declaration order.
    pub chains: Vec<Chain>,
    /// In transaction order.
    pub ops: Vec<RuleOp>,
}

impl Table {
    /// The chain's rules in their final order (inserts applied).
    pub fn chain_rules(&self, chain: &str) -> Vec<&[Stmt]> {
        let mut out: Vec<&[Stmt]> = Vec::new();
        for op in self.ops.iter().filter(|o| o.chain == chain) {
            match op.index {
                Some(i) => out.insert(i, &op.stmts),
                None => out.push(&op.stmts),
            }
        }
        out
    }
}

/// All of a pod's tables (only those with rules, in Istio's order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    pub tables: Vec<Table>,
}

impl Ruleset {
    /// The transaction in `nft -f` syntax, laid out as Istio's golden files.
    pub fn transaction_text(&self) -> String {
        let mut out = String::new();
        for t in &self.tables {
            out += &format!("add table inet {}\nflush table inet {}\n", t.name, t.name);
            for c in &t.chains {
                out += &format!("add chain inet {} {}", t.name, c.name);
                if let Some(b) = c.base {
                    out += &format!(
                        " {{ type {} hook {} priority {} ; }}",
                        b.kind.name(),
                        b.hook.name(),
                        b.priority
                    );
                }
                out.push('\n');
            }
            for op in &t.ops {
                let stmts: Vec<String> = op.stmts.iter().map(Stmt::to_string).collect();
                match op.index {
                    Some(i) => {
                        out += &format!("insert rule inet {} {} index {i} ", t.name, op.chain)
                    }
                    None => out += &format!("add rule inet {} {} ", t.name, op.chain),
                }
                out += &stmts.join(" ");
                out.push('\n');
            }
        }
        out
    }

    /// Per (table, chain), how many rules it holds. Used by CHECK.
    pub fn rule_counts(&self) -> Vec<(String, String, usize)> {
        let mut out = Vec::new();
        for t in &self.tables {
            for c in &t.chains {
                out.push((
                    t.name.to_string(),
                    c.name.to_string(),
                    t.chain_rules(c.name).len(),
                ));
            }
        }
        out
    }
}

/// Collects rules per table in Istio's call order (`NftablesRuleBuilder`).
struct Builder {
    v6: bool,
    /// (table, chain, requested index, statements)
    calls: Vec<(&'static str, &'static str, Option<usize>, Vec<Stmt>)>,
}

impl Builder {
    fn append(&mut self, table: &'static str, chain: &'static str, stmts: Vec<Stmt>) {
        self.calls.push((table, chain, None, stmts));
    }
    fn append_v6(&mut self, table: &'static str, chain: &'static str, stmts: Vec<Stmt>) {
        if self.v6 {
            self.append(table, chain, stmts);
        }
    }
    fn insert(&mut self, table: &'static str, chain: &'static str, at: usize, stmts: Vec<Stmt>) {
        self.calls.push((table, chain, Some(at), stmts));
    }
    fn insert_v6(&mut self, table: &'static str, chain: &'static str, at: usize, stmts: Vec<Stmt>) {
        if self.v6 {
            self.insert(table, chain, at, stmts);
        }
    }

    /// `addIstioTableRules`: a table only if it has rules, only its chains with rules, and an
    /// insert at an index the chain does not reach yet becomes an append (nftables refuses an
    /// index past the end, where iptables takes `-I 1` on an empty chain).
    fn finish(self) -> Ruleset {
        let mut tables = Vec::new();
        for name in TABLES {
            let calls: Vec<_> = self.calls.iter().filter(|c| c.0 == name).collect();
            if calls.is_empty() {
                continue;
            }
            let chains = chain_specs(name)
                .iter()
                .filter(|(c, _)| calls.iter().any(|call| call.1 == *c))
                .map(|(c, base)| Chain {
                    name: c,
                    base: *base,
                })
                .collect();
            let mut counts: Vec<(&str, usize)> = Vec::new();
            let mut ops = Vec::new();
            for (_, chain, index, stmts) in calls {
                let n = match counts.iter_mut().find(|(c, _)| c == chain) {
                    Some(e) => e,
                    None => {
                        counts.push((chain, 0));
                        counts.last_mut().expect("just pushed")
                    }
                };
                let index = index.filter(|i| n.1 != 0 && *i < n.1);
                n.1 += 1;
                ops.push(RuleOp {
                    chain,
                    index,
                    stmts: stmts.clone(),
                });
            }
            tables.push(Table { name, chains, ops });
        }
        Ruleset { tables }
    }
}

fn cidr(s: &str) -> Cidr {
    Cidr::parse(s).expect("a constant CIDR")
}

use Stmt::Counter;
const TCP: Stmt = Stmt::L4Proto(L4::Tcp);
const RETURN: Stmt = Stmt::Verdict(Verdict::Return);

fn jump(chain: &'static str) -> Stmt {
    Stmt::Verdict(Verdict::Jump(chain))
}
fn port(proto: L4, dir: Dir, op: Op, ports: &[u16]) -> Stmt {
    Stmt::Port {
        proto,
        dir,
        op,
        ports: ports.to_vec(),
    }
}
fn dport(p: u16) -> Stmt {
    port(L4::Tcp, Dir::Dst, Op::Eq, &[p])
}
fn addr(dir: Dir, op: Op, cidr: Cidr) -> Stmt {
    Stmt::Addr { dir, op, cidr }
}
fn iif(name: &str) -> Stmt {
    Stmt::IfName {
        dir: Dir::Src,
        name: name.to_string(),
    }
}
fn oif(name: &str) -> Stmt {
    Stmt::IfName {
        dir: Dir::Dst,
        name: name.to_string(),
    }
}
fn ifname(i: &IfName) -> String {
    i.to_string()
}

/// The proxy's uid or gid, as one kind of socket-owner match.
#[derive(Clone, Copy)]
enum Owner {
    Uid(u32),
    Gid(u32),
}

impl Owner {
    fn matches(self, op: Op, meta: bool) -> Stmt {
        match self {
            Owner::Uid(uid) => Stmt::SkUid { op, uid, meta },
            Owner::Gid(gid) => Stmt::SkGid {
                op,
                gid: Group::Id(gid),
                meta,
            },
        }
    }
}

/// Istio's `NftablesConfigurator.Run` for a sidecar pod, with the plugin's settings: DNS
/// capture is capture-all (`CaptureAllDNS`, as the CNI plugin always sets it), IPv6 rules only
/// when `ipv6` (`EnableIPv6`).
#[rustfmt::skip]
pub fn build(r: &Redirect, ipv6: bool) -> Ruleset {
    let mut b = Builder { v6: ipv6, calls: Vec::new() };
    let tproxy = r.mode == InterceptionMode::Tproxy;
    let lo4 = r.ipv4_loopback;
    let lo6 = cidr(V6_LOOPBACK);
    let (include_v4, include_v6): (Option<Vec<Cidr>>, Option<Vec<Cidr>>) = match &r.include_outbound_cidrs {
        Selection::All => (None, None),
        Selection::Only(l) => (
            Some(l.iter().filter(|c| c.addr.is_ipv4()).copied().collect()),
            Some(l.iter().filter(|c| c.addr.is_ipv6()).copied().collect()),
        ),
    };
    let include_has_loopback = [&include_v4, &include_v6]
        .iter()
        .any(|l| l.as_ref().is_some_and(|l| l.iter().any(|c| c.addr.is_loopback())));
    let dns = r.dns_capture;

    for i in &r.exclude_interfaces {
        b.append(NAT_TABLE, PREROUTING, vec![iif(&ifname(i)), Counter, RETURN]);
        b.append(NAT_TABLE, OUTPUT, vec![oif(&ifname(i)), Counter, RETURN]);
    }
    if tproxy {
        for i in &r.exclude_interfaces {
            b.append(MANGLE_TABLE, PREROUTING, vec![iif(&ifname(i)), Counter, RETURN]);
            b.append(MANGLE_TABLE, OUTPUT, vec![oif(&ifname(i)), Counter, RETURN]);
        }
    }
    for i in &r.reroute_virtual_interfaces {
        b.insert(NAT_TABLE, PREROUTING, 0, vec![iif(&ifname(i)), Counter, RETURN]);
    }
    if r.drop_invalid {
        b.append(MANGLE_TABLE, PREROUTING, vec![TCP, Stmt::CtStateInvalid, Counter, jump(ISTIO_DROP)]);
        b.append(MANGLE_TABLE, ISTIO_DROP, vec![Counter, Stmt::Verdict(Verdict::Drop)]);
    }
    b.append(NAT_TABLE, ISTIO_INBOUND, vec![TCP, dport(INBOUND_TUNNEL_PORT), Counter, RETURN]);
    b.append(NAT_TABLE, ISTIO_REDIRECT, vec![TCP, Counter, Stmt::Redirect(PROXY_PORT)]);
    b.append(NAT_TABLE, ISTIO_IN_REDIRECT, vec![TCP, Counter, Stmt::Redirect(INBOUND_CAPTURE_PORT)]);

    // Inbound.
    let inbound_captured = r.include_inbound_ports != Selection::Only(Vec::new());
    if inbound_captured {
        let all = r.include_inbound_ports == Selection::All;
        let ports: &[u16] = match &r.include_inbound_ports {
            Selection::All => &[],
            Selection::Only(l) => l,
        };
        if tproxy {
            b.append(MANGLE_TABLE, ISTIO_DIVERT, vec![Counter, Stmt::MetaMarkSet(TPROXY_MARK)]);
            b.append(MANGLE_TABLE, ISTIO_DIVERT, vec![Counter, Stmt::Verdict(Verdict::Accept)]);
            b.append(MANGLE_TABLE, ISTIO_TPROXY, vec![TCP, addr(Dir::Dst, Op::Neq, lo4), Stmt::Tproxy { v6: false, port: INBOUND_CAPTURE_PORT }, Stmt::MetaMarkSet(TPROXY_MARK), Counter, Stmt::Verdict(Verdict::Accept)]);
            b.append_v6(MANGLE_TABLE, ISTIO_TPROXY, vec![TCP, addr(Dir::Dst, Op::Neq, lo6), Stmt::Tproxy { v6: true, port: INBOUND_CAPTURE_PORT }, Stmt::MetaMarkSet(TPROXY_MARK), Counter, Stmt::Verdict(Verdict::Accept)]);
            b.append(MANGLE_TABLE, PREROUTING, vec![TCP, Counter, jump(ISTIO_INBOUND)]);
            if all {
                for p in &r.exclude_inbound_ports {
                    b.append(MANGLE_TABLE, ISTIO_INBOUND, vec![TCP, dport(*p), Counter, RETURN]);
                }
                b.append(MANGLE_TABLE, ISTIO_INBOUND, vec![TCP, Stmt::CtStateRelatedEstablished, Counter, jump(ISTIO_DIVERT)]);
                b.append(MANGLE_TABLE, ISTIO_INBOUND, vec![TCP, Counter, jump(ISTIO_TPROXY)]);
            } else {
                for p in ports {
                    b.append(MANGLE_TABLE, ISTIO_INBOUND, vec![TCP, Stmt::CtStateRelatedEstablished, dport(*p), Counter, jump(ISTIO_DIVERT)]);
                    b.append(MANGLE_TABLE, ISTIO_INBOUND, vec![TCP, dport(*p), Counter, jump(ISTIO_TPROXY)]);
                }
            }
        } else {
            b.append(NAT_TABLE, PREROUTING, vec![TCP, Counter, jump(ISTIO_INBOUND)]);
            if all {
                for p in &r.exclude_inbound_ports {
                    b.append(NAT_TABLE, ISTIO_INBOUND, vec![TCP, dport(*p), Counter, RETURN]);
                }
                b.append(NAT_TABLE, ISTIO_INBOUND, vec![TCP, Counter, jump(ISTIO_IN_REDIRECT)]);
            } else {
                for p in ports {
                    b.append(NAT_TABLE, ISTIO_INBOUND, vec![TCP, dport(*p), Counter, jump(ISTIO_IN_REDIRECT)]);
                }
            }
        }
    }

    // Outbound.
    b.append(NAT_TABLE, OUTPUT, vec![Counter, jump(ISTIO_OUTPUT)]);
    for p in &r.exclude_outbound_ports {
        b.append(NAT_TABLE, ISTIO_OUTPUT, vec![port(L4::Tcp, Dir::Dst, Op::Eq, &[*p]), Counter, RETURN]);
        b.append(NAT_TABLE, ISTIO_OUTPUT, vec![port(L4::Udp, Dir::Dst, Op::Eq, &[*p]), Counter, RETURN]);
    }
    b.append(NAT_TABLE, ISTIO_OUTPUT, vec![oif("lo"), addr(Dir::Src, Op::Eq, cidr(V4_PASSTHROUGH_SOURCE)), Counter, RETURN]);
    b.append_v6(NAT_TABLE, ISTIO_OUTPUT, vec![oif("lo"), addr(Dir::Src, Op::Eq, cidr(V6_PASSTHROUGH_SOURCE)), Counter, RETURN]);
    for owner in [Owner::Uid(r.proxy_uid), Owner::Gid(r.proxy_gid)] {
        // App calls to itself through a service VIP go through Envoy inbound; with DNS capture
        // the uid rule leaves port 53 to the agent (Istio does this for the uid only).
        let not_ports: &[u16] = match owner {
            Owner::Uid(_) if dns => &[DNS_PORT, INBOUND_TUNNEL_PORT],
            _ => &[INBOUND_TUNNEL_PORT],
        };
        for lo in [lo4, lo6] {
            let stmts = vec![oif("lo"), TCP, addr(Dir::Dst, Op::Neq, lo), port(L4::Tcp, Dir::Dst, Op::Neq, not_ports), owner.matches(Op::Eq, false), Counter, jump(ISTIO_IN_REDIRECT)];
            if lo.addr.is_ipv4() {
                b.append(NAT_TABLE, ISTIO_OUTPUT, stmts);
            } else {
                b.append_v6(NAT_TABLE, ISTIO_OUTPUT, stmts);
            }
        }
        // App to itself by its own address stays local, unless loopback is explicitly included.
        if !include_has_loopback {
            if dns {
                b.append(NAT_TABLE, ISTIO_OUTPUT, vec![oif("lo"), TCP, port(L4::Tcp, Dir::Dst, Op::Neq, &[DNS_PORT]), owner.matches(Op::Neq, false), Counter, RETURN]);
            } else {
                b.append(NAT_TABLE, ISTIO_OUTPUT, vec![oif("lo"), owner.matches(Op::Neq, false), Counter, RETURN]);
            }
        }
        // Envoy's own traffic is never captured again.
        b.append(NAT_TABLE, ISTIO_OUTPUT, vec![owner.matches(Op::Eq, false), Counter, RETURN]);
    }
    match &r.owner_groups {
        OwnerGroups::AllExcept(groups) => {
            for g in groups {
                b.append(NAT_TABLE, ISTIO_OUTPUT, vec![Stmt::SkGid { op: Op::Eq, gid: Group::Named(g.clone()), meta: false }, Counter, RETURN]);
            }
        }
        OwnerGroups::Only(groups) => {
            let mut stmts: Vec<Stmt> = groups
                .iter()
                .map(|g| Stmt::SkGid { op: Op::Neq, gid: Group::Named(g.clone()), meta: false })
                .collect();
            stmts.extend([Counter, RETURN]);
            b.append(NAT_TABLE, ISTIO_OUTPUT, stmts);
        }
    }
    if dns {
        dns_rules(&mut b, r);
    }
    b.append(NAT_TABLE, ISTIO_OUTPUT, vec![addr(Dir::Dst, Op::Eq, lo4), Counter, RETURN]);
    b.append_v6(NAT_TABLE, ISTIO_OUTPUT, vec![addr(Dir::Dst, Op::Eq, lo6), Counter, RETURN]);
    for c in r.exclude_outbound_cidrs.iter().filter(|c| c.addr.is_ipv4()) {
        b.append(NAT_TABLE, ISTIO_OUTPUT, vec![addr(Dir::Dst, Op::Eq, *c), Counter, RETURN]);
    }
    for c in r.exclude_outbound_cidrs.iter().filter(|c| c.addr.is_ipv6()) {
        b.append_v6(NAT_TABLE, ISTIO_OUTPUT, vec![addr(Dir::Dst, Op::Eq, *c), Counter, RETURN]);
    }
    for p in &r.include_outbound_ports {
        b.append(NAT_TABLE, ISTIO_OUTPUT, vec![port(L4::Tcp, Dir::Dst, Op::Eq, &[*p]), Counter, jump(ISTIO_REDIRECT)]);
    }
    match (&include_v4, &include_v6) {
        (None, _) | (_, None) => {
            b.append(NAT_TABLE, ISTIO_OUTPUT, vec![Counter, jump(ISTIO_REDIRECT)]);
            for i in &r.reroute_virtual_interfaces {
                b.insert(NAT_TABLE, PREROUTING, 0, vec![iif(&ifname(i)), Counter, jump(ISTIO_REDIRECT)]);
            }
        }
        (Some(v4), Some(v6)) => {
            for c in v4 {
                for i in &r.reroute_virtual_interfaces {
                    b.insert(NAT_TABLE, PREROUTING, 0, vec![iif(&ifname(i)), addr(Dir::Dst, Op::Eq, *c), Counter, jump(ISTIO_REDIRECT)]);
                }
                b.append(NAT_TABLE, ISTIO_OUTPUT, vec![addr(Dir::Dst, Op::Eq, *c), Counter, jump(ISTIO_REDIRECT)]);
            }
            for c in v6 {
                for i in &r.reroute_virtual_interfaces {
                    b.insert_v6(NAT_TABLE, PREROUTING, 0, vec![iif(&ifname(i)), addr(Dir::Dst, Op::Eq, *c), Counter, jump(ISTIO_REDIRECT)]);
                }
                b.append_v6(NAT_TABLE, ISTIO_OUTPUT, vec![addr(Dir::Dst, Op::Eq, *c), Counter, jump(ISTIO_REDIRECT)]);
            }
        }
    }

    if tproxy {
        b.append(MANGLE_TABLE, PREROUTING, vec![TCP, Stmt::Mark { op: Op::Eq, value: TPROXY_MARK }, Counter, Stmt::CtMarkSetMark]);
        b.append(MANGLE_TABLE, OUTPUT, vec![oif("lo"), TCP, Stmt::Mark { op: Op::Eq, value: TPROXY_MARK }, Counter, RETURN]);
        for owner in [Owner::Uid(r.proxy_uid), Owner::Gid(r.proxy_gid)] {
            b.append(MANGLE_TABLE, OUTPUT, vec![oif("lo"), TCP, addr(Dir::Dst, Op::Neq, lo4), owner.matches(Op::Eq, false), Counter, Stmt::MetaMarkSet(OUTBOUND_MARK)]);
            b.append_v6(MANGLE_TABLE, OUTPUT, vec![oif("lo"), TCP, addr(Dir::Dst, Op::Neq, lo6), owner.matches(Op::Eq, false), Counter, Stmt::MetaMarkSet(OUTBOUND_MARK)]);
        }
        b.append(MANGLE_TABLE, OUTPUT, vec![TCP, Stmt::CtMark(TPROXY_MARK), Counter, Stmt::MetaMarkSetCtMark]);
        // The guards of the mangle istio-inbound chain. Only prerouting's jump reaches that
        // chain, and there is none when no inbound port is captured: Istio still writes the
        // guards then (istio/istio#58135, `inbound-ports-empty-tproxy.golden`), an unreachable
        // chain; they are left out here.
        if inbound_captured {
            b.insert(MANGLE_TABLE, ISTIO_INBOUND, 0, vec![TCP, Stmt::Mark { op: Op::Eq, value: TPROXY_MARK }, Counter, RETURN]);
            b.insert(MANGLE_TABLE, ISTIO_INBOUND, 1, vec![iif("lo"), TCP, addr(Dir::Src, Op::Eq, cidr(V4_PASSTHROUGH_SOURCE)), Counter, RETURN]);
            b.insert_v6(MANGLE_TABLE, ISTIO_INBOUND, 1, vec![iif("lo"), TCP, addr(Dir::Src, Op::Eq, cidr(V6_PASSTHROUGH_SOURCE)), Counter, RETURN]);
            b.insert(MANGLE_TABLE, ISTIO_INBOUND, 2, vec![iif("lo"), TCP, Stmt::Mark { op: Op::Neq, value: OUTBOUND_MARK }, Counter, RETURN]);
        }
    }
    b.finish()
}

/// `SetupDNSRedir` + `addDNSConntrackZones` with capture-all.
#[rustfmt::skip]
fn dns_rules(b: &mut Builder, r: &Redirect) {
    b.append(RAW_TABLE, OUTPUT, vec![Counter, jump(ISTIO_OUTPUT_DNS)]);
    b.append(NAT_TABLE, ISTIO_OUTPUT, vec![Counter, jump(ISTIO_OUTPUT_DNS)]);
    b.append(NAT_TABLE, ISTIO_OUTPUT_DNS, vec![TCP, dport(DNS_PORT), Counter, Stmt::Redirect(DNS_LISTENER_PORT)]);
    b.append(NAT_TABLE, ISTIO_OUTPUT_DNS, vec![port(L4::Udp, Dir::Dst, Op::Eq, &[DNS_PORT]), Counter, Stmt::Redirect(DNS_LISTENER_PORT)]);
    // Conntrack zones: the proxy's upstream queries in zone 1, its answers to the app in zone 2.
    for owner in [Owner::Uid(r.proxy_uid), Owner::Gid(r.proxy_gid)] {
        b.append(RAW_TABLE, ISTIO_OUTPUT_DNS, vec![port(L4::Udp, Dir::Dst, Op::Eq, &[DNS_PORT]), owner.matches(Op::Eq, true), Counter, Stmt::CtZoneSet(1)]);
        b.append(RAW_TABLE, ISTIO_OUTPUT_DNS, vec![port(L4::Udp, Dir::Src, Op::Eq, &[DNS_LISTENER_PORT]), owner.matches(Op::Eq, true), Counter, Stmt::CtZoneSet(2)]);
    }
    b.append(RAW_TABLE, PREROUTING, vec![Counter, jump(ISTIO_INBOUND)]);
    b.append(RAW_TABLE, ISTIO_OUTPUT_DNS, vec![port(L4::Udp, Dir::Dst, Op::Eq, &[DNS_PORT]), Counter, Stmt::CtZoneSet(2)]);
    b.append(RAW_TABLE, ISTIO_INBOUND, vec![port(L4::Udp, Dir::Src, Op::Eq, &[DNS_PORT]), Counter, Stmt::CtZoneSet(1)]);
}

#[cfg(test)]
mod tests;
