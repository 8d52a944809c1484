//! The side effects of the nftables backend: a [`Ruleset`] encoded as nf_tables netlink
//! messages and sent as ONE batch (one kernel transaction: all of it or nothing) on a
//! `NETLINK_NETFILTER` socket opened inside the pod's netns. The bytecode of each statement is
//! what `nft` 1.0 generates for the same text (`nft --debug=netlink`), so `nft list ruleset`
//! shows the rules as Istio writes them. Message and attribute numbers are the kernel's UAPI
//! (`include/uapi/linux/netfilter/nf_tables.h`, `nfnetlink.h`); the framing and the socket are
//! [`crate::netlink`]'s.
use super::{Dir, Group, L4, Op, Ruleset, Stmt, TABLES, Verdict};
use crate::iptables::Netns;
use crate::netlink::{
    Attrs, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, Socket, parse_attrs,
    push_message, request_ack,
};
use std::net::IpAddr;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWSETELEM: u16 = 12;

const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

// Attributes.
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_DESC_SIZE: u16 = 1;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_CONSTANT: u32 = 0x2;
/// nft's `inet_service` data type (a port), for the anonymous port sets.
const TYPE_INET_SERVICE: u32 = 13;

const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
const NFT_JUMP: i32 = -3;
const NFT_RETURN: i32 = -5;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;

const NFT_META_MARK: u32 = 3;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_SKUID: u32 = 10;
const NFT_META_SKGID: u32 = 11;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CT_STATE: u32 = 0;
const NFT_CT_MARK: u32 = 3;
const NFT_CT_ZONE: u32 = 17;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_LOOKUP_F_INV: u32 = 1;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
const CT_STATE_INVALID: u32 = 1;
const CT_STATE_ESTABLISHED: u32 = 2;
const CT_STATE_RELATED: u32 = 4;
const IFNAMSIZ: usize = 16;

/// One expression: its kernel name and attributes.
struct Expr(&'static str, Attrs);

fn data_value(bytes: &[u8]) -> Attrs {
    Attrs::with(|a| {
        a.raw(NFTA_DATA_VALUE, bytes);
    })
}
fn meta_load(key: u32) -> Expr {
    Expr(
        "meta",
        Attrs::with(|a| {
            a.be32(2, key).be32(1, NFT_REG_1);
        }),
    )
}
fn meta_set(key: u32) -> Expr {
    Expr(
        "meta",
        Attrs::with(|a| {
            a.be32(2, key).be32(3, NFT_REG_1);
        }),
    )
}
fn ct_load(key: u32) -> Expr {
    Expr(
        "ct",
        Attrs::with(|a| {
            a.be32(1, NFT_REG_1).be32(2, key);
        }),
    )
}
fn ct_set(key: u32) -> Expr {
    Expr(
        "ct",
        Attrs::with(|a| {
            a.be32(2, key).be32(4, NFT_REG_1);
        }),
    )
}
fn cmp(op: Op, bytes: &[u8]) -> Expr {
    let op = if op == Op::Eq {
        NFT_CMP_EQ
    } else {
        NFT_CMP_NEQ
    };
    Expr(
        "cmp",
        Attrs::with(|a| {
            a.be32(1, NFT_REG_1).be32(2, op).nest(3, data_value(bytes));
        }),
    )
}
fn payload(base: u32, offset: u32, len: u32) -> Expr {
    Expr(
        "payload",
        Attrs::with(|a| {
            a.be32(1, NFT_REG_1)
                .be32(2, base)
                .be32(3, offset)
                .be32(4, len);
        }),
    )
}
fn bitwise(mask: &[u8]) -> Expr {
    let zero = vec![0u8; mask.len()];
    Expr(
        "bitwise",
        Attrs::with(|a| {
            a.be32(1, NFT_REG_1)
                .be32(2, NFT_REG_1)
                .be32(3, mask.len() as u32)
                .nest(4, data_value(mask))
                .nest(5, data_value(&zero));
        }),
    )
}
fn immediate(bytes: &[u8]) -> Expr {
    Expr(
        "immediate",
        Attrs::with(|a| {
            a.be32(1, NFT_REG_1).nest(2, data_value(bytes));
        }),
    )
}
fn verdict(v: &Verdict) -> Expr {
    let (code, chain) = match v {
        Verdict::Accept => (NF_ACCEPT, None),
        Verdict::Drop => (NF_DROP, None),
        Verdict::Return => (NFT_RETURN, None),
        Verdict::Jump(c) => (NFT_JUMP, Some(*c)),
    };
    let inner = Attrs::with(|a| {
        a.be32(NFTA_VERDICT_CODE, code as u32);
        if let Some(c) = chain {
            a.str(NFTA_VERDICT_CHAIN, c);
        }
    });
    Expr(
        "immediate",
        Attrs::with(|a| {
            a.be32(1, NFT_REG_VERDICT).nest(
                2,
                Attrs::with(|d| {
                    d.nest(NFTA_DATA_VERDICT, inner);
                }),
            );
        }),
    )
}

/// An owner group given by name that the host's `/etc/group` does not hold.
#[derive(Debug, thiserror::Error)]
#[error("group {name:?} (owner group) is not in /etc/group")]
pub struct UnknownGroup {
    pub name: String,
}

/// Programming, removing or reading Istio's nftables tables failed.
#[derive(Debug, thiserror::Error)]
pub enum NftablesError {
    #[error("entering netns {netns}: {source}")]
    EnterNetns {
        netns: String,
        source: std::io::Error,
    },
    /// A rule could not be encoded (nothing was sent).
    #[error("table {table} chain {chain}: {source}")]
    Encode {
        table: &'static str,
        chain: &'static str,
        source: UnknownGroup,
    },
    /// The kernel refused the batch (nothing of it was applied).
    #[error("nf_tables transaction of {tables} tables: {source}")]
    Transaction {
        tables: usize,
        source: std::io::Error,
    },
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("deleting table inet {table}: {source}")]
    DeleteTable {
        table: &'static str,
        source: std::io::Error,
    },
    #[error("dump rules: {0}")]
    Dump(std::io::Error),
}

impl NftablesError {
    fn enter(netns: &Netns) -> impl FnOnce(std::io::Error) -> Self {
        let netns = netns.path.clone();
        move |source| Self::EnterNetns { netns, source }
    }
}

/// An anonymous set of ports a rule looks up; sent before the rule in the same batch.
struct AnonSet {
    id: u32,
    ports: Vec<u16>,
}

/// Encodes a rule's statements; anonymous sets it needs are added to `sets`.
fn encode_stmts(
    stmts: &[Stmt],
    sets: &mut Vec<AnonSet>,
    next_set_id: &mut u32,
    resolve_group: &dyn Fn(&str) -> Option<u32>,
) -> Result<Vec<Expr>, UnknownGroup> {
    let mut rule = RuleEncoder {
        out: Vec::new(),
        l4_known: None,
        nfproto_known: None,
        sets,
        next_set_id,
    };
    for s in stmts {
        rule.stmt(s, resolve_group)?;
    }
    Ok(rule.out)
}

/// The expressions of one rule as they are encoded.
struct RuleEncoder<'a> {
    out: Vec<Expr>,
    // nft writes a protocol's dependency once per rule (`meta l4proto`, `meta nfproto`).
    l4_known: Option<L4>,
    nfproto_known: Option<u8>,
    sets: &'a mut Vec<AnonSet>,
    next_set_id: &'a mut u32,
}

impl RuleEncoder<'_> {
    fn push(&mut self, e: Expr) {
        self.out.push(e);
    }

    /// A `load` of a key followed by a comparison with `bytes`.
    fn meta_match(&mut self, key: u32, op: Op, bytes: &[u8]) {
        self.push(meta_load(key));
        self.push(cmp(op, bytes));
    }

    #[rustfmt::skip]
    fn stmt(&mut self, s: &Stmt, resolve_group: &dyn Fn(&str) -> Option<u32>) -> Result<(), UnknownGroup> {
        match s {
            Stmt::L4Proto(p) => self.l4_dependency(*p, true),
            Stmt::Port { proto, dir, op, ports } => self.port(*proto, *dir, *op, ports),
            Stmt::Addr { dir, op, cidr } => self.addr(*dir, *op, cidr),
            Stmt::IfName { dir, name } => self.if_name(*dir, name),
            Stmt::SkUid { op, uid, .. } => self.meta_match(NFT_META_SKUID, *op, &uid.to_ne_bytes()),
            Stmt::SkGid { op, gid, .. } => {
                let gid = group_id(gid, resolve_group)?;
                self.meta_match(NFT_META_SKGID, *op, &gid.to_ne_bytes());
            }
            Stmt::CtStateRelatedEstablished => self.ct_state_any(CT_STATE_RELATED | CT_STATE_ESTABLISHED),
            Stmt::CtStateInvalid => self.ct_state_any(CT_STATE_INVALID),
            Stmt::Mark { op, value } => self.meta_match(NFT_META_MARK, *op, &value.to_ne_bytes()),
            Stmt::CtMark(v) => {
                self.push(ct_load(NFT_CT_MARK));
                self.push(cmp(Op::Eq, &v.to_ne_bytes()));
            }
            Stmt::Counter => self.push(Expr("counter", Attrs::with(|a| {
                a.raw(1, &0u64.to_be_bytes()).raw(2, &0u64.to_be_bytes());
            }))),
            Stmt::MetaMarkSet(v) => {
                self.push(immediate(&v.to_ne_bytes()));
                self.push(meta_set(NFT_META_MARK));
            }
            Stmt::CtMarkSetMark => {
                self.push(meta_load(NFT_META_MARK));
                self.push(ct_set(NFT_CT_MARK));
            }
            Stmt::MetaMarkSetCtMark => {
                self.push(ct_load(NFT_CT_MARK));
                self.push(meta_set(NFT_META_MARK));
            }
            Stmt::CtZoneSet(z) => {
                self.push(immediate(&z.to_ne_bytes()));
                self.push(ct_set(NFT_CT_ZONE));
            }
            Stmt::Redirect(port) => {
                self.push(immediate(&port.to_be_bytes()));
                self.push(Expr("redir", Attrs::with(|a| {
                    a.be32(1, NFT_REG_1).be32(3, NF_NAT_RANGE_PROTO_SPECIFIED);
                })));
            }
            Stmt::Tproxy { v6, port } => {
                let family = if *v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 };
                self.push(immediate(&port.to_be_bytes()));
                self.push(Expr("tproxy", Attrs::with(|a| {
                    a.be32(1, u32::from(family)).be32(3, NFT_REG_1);
                })));
            }
            Stmt::Verdict(v) => self.push(verdict(v)),
        }
        Ok(())
    }

    /// `meta l4proto`: written for an explicit match, or once as a port match's dependency.
    fn l4_dependency(&mut self, proto: L4, explicit: bool) {
        if explicit || self.l4_known != Some(proto) {
            self.meta_match(NFT_META_L4PROTO, Op::Eq, &[proto.number()]);
            self.l4_known = Some(proto);
        }
    }

    /// A port or a set of ports: one comparison, or a lookup in an anonymous set.
    fn port(&mut self, proto: L4, dir: Dir, op: Op, ports: &[u16]) {
        self.l4_dependency(proto, false);
        let offset = if dir == Dir::Src { 0 } else { 2 };
        self.push(payload(NFT_PAYLOAD_TRANSPORT_HEADER, offset, 2));
        if let [one] = ports {
            self.push(cmp(op, &one.to_be_bytes()));
            return;
        }
        *self.next_set_id += 1;
        let id = *self.next_set_id;
        self.sets.push(AnonSet {
            id,
            ports: ports.to_vec(),
        });
        let flags = if op == Op::Neq { NFT_LOOKUP_F_INV } else { 0 };
        self.push(Expr(
            "lookup",
            Attrs::with(|a| {
                a.str(1, "__set%d")
                    .be32(2, NFT_REG_1)
                    .be32(4, id)
                    .be32(5, flags);
            }),
        ));
    }

    /// An address prefix. As nft: a byte-aligned prefix loads only its bytes; any other loads
    /// the whole address and masks it. A zero-length prefix keeps only the family dependency.
    fn addr(&mut self, dir: Dir, op: Op, cidr: &super::Cidr) {
        let (family, bytes, src_off, dst_off) = match cidr.addr {
            IpAddr::V4(a) => (NFPROTO_IPV4, a.octets().to_vec(), 12, 16),
            IpAddr::V6(a) => (NFPROTO_IPV6, a.octets().to_vec(), 8, 24),
        };
        if self.nfproto_known != Some(family) {
            self.meta_match(NFT_META_NFPROTO, Op::Eq, &[family]);
            self.nfproto_known = Some(family);
        }
        let len = usize::from(cidr.len);
        if len == 0 {
            return;
        }
        let aligned = len % 8 == 0;
        let n = if aligned { len / 8 } else { bytes.len() };
        let offset = if dir == Dir::Src { src_off } else { dst_off };
        self.push(payload(NFT_PAYLOAD_NETWORK_HEADER, offset, n as u32));
        let mask: Vec<u8> = (0..n)
            .map(|i| match len.saturating_sub(i * 8) {
                0 => 0,
                l if l >= 8 => 0xff,
                l => 0xff << (8 - l),
            })
            .collect();
        if !aligned {
            self.push(bitwise(&mask));
        }
        let value: Vec<u8> = bytes[..n].iter().zip(&mask).map(|(b, m)| b & m).collect();
        self.push(cmp(op, &value));
    }

    /// `iifname`/`oifname`: the name padded to `IFNAMSIZ`.
    fn if_name(&mut self, dir: Dir, name: &str) {
        let key = if dir == Dir::Src {
            NFT_META_IIFNAME
        } else {
            NFT_META_OIFNAME
        };
        let mut padded = name.as_bytes().to_vec();
        padded.resize(IFNAMSIZ, 0);
        self.meta_match(key, Op::Eq, &padded);
    }

    /// `ct state` holding any of `bits`.
    fn ct_state_any(&mut self, bits: u32) {
        self.push(ct_load(NFT_CT_STATE));
        self.push(bitwise(&bits.to_ne_bytes()));
        self.push(cmp(Op::Neq, &0u32.to_ne_bytes()));
    }
}

/// A group's id: given, numeric, or looked up by name.
fn group_id(gid: &Group, resolve_group: &dyn Fn(&str) -> Option<u32>) -> Result<u32, UnknownGroup> {
    match gid {
        Group::Id(id) => Ok(*id),
        Group::Named(name) => {
            let name = name.to_string();
            match name.parse::<u32>() {
                Ok(id) => Ok(id),
                Err(_) => resolve_group(&name).ok_or(UnknownGroup { name }),
            }
        }
    }
}

/// A batch of nf_tables messages.
struct Batch {
    buf: Vec<u8>,
    seq: u32,
    /// Where the last nf_tables message starts: the one that asks for the batch's ACK.
    last_nft: Option<usize>,
}

impl Batch {
    fn empty() -> Self {
        Self {
            buf: Vec::new(),
            seq: 0,
            last_nft: None,
        }
    }

    fn new() -> Self {
        let mut b = Self::empty();
        b.msg(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            &Attrs::default(),
        );
        b
    }

    /// One message with its `nfgenmsg` (family, version 0, resource id).
    fn msg(&mut self, kind: u16, flags: u16, family: u8, res_id: u16, attrs: &Attrs) {
        self.seq += 1;
        let [r0, r1] = res_id.to_be_bytes();
        push_message(
            &mut self.buf,
            kind,
            flags,
            self.seq,
            &[family, 0, r0, r1],
            attrs,
        );
    }

    fn nft(&mut self, msg: u16, flags: u16, attrs: &Attrs) {
        self.last_nft = Some(self.buf.len());
        self.msg(
            (NFNL_SUBSYS_NFTABLES << 8) | msg,
            NLM_F_REQUEST | flags,
            NFPROTO_INET,
            0,
            attrs,
        );
    }

    /// An anonymous constant set of ports and its elements, for a rule that follows.
    fn anon_set(&mut self, table: &str, s: &AnonSet) {
        self.nft(
            NFT_MSG_NEWSET,
            NLM_F_CREATE,
            &Attrs::with(|a| {
                a.str(NFTA_SET_TABLE, table)
                    .str(NFTA_SET_NAME, "__set%d")
                    .be32(NFTA_SET_FLAGS, NFT_SET_ANONYMOUS | NFT_SET_CONSTANT)
                    .be32(NFTA_SET_KEY_TYPE, TYPE_INET_SERVICE)
                    .be32(NFTA_SET_KEY_LEN, 2)
                    .be32(NFTA_SET_ID, s.id)
                    .nest(
                        NFTA_SET_DESC,
                        Attrs::with(|d| {
                            d.be32(NFTA_SET_DESC_SIZE, s.ports.len() as u32);
                        }),
                    );
            }),
        );
        let elems = Attrs::with(|l| {
            for p in &s.ports {
                l.nest(
                    NFTA_LIST_ELEM,
                    Attrs::with(|e| {
                        e.nest(NFTA_SET_ELEM_KEY, data_value(&p.to_be_bytes()));
                    }),
                );
            }
        });
        self.nft(
            NFT_MSG_NEWSETELEM,
            NLM_F_CREATE,
            &Attrs::with(|a| {
                a.str(NFTA_SET_ELEM_LIST_TABLE, table)
                    .str(NFTA_SET_ELEM_LIST_SET, "__set%d")
                    .be32(NFTA_SET_ELEM_LIST_SET_ID, s.id)
                    .nest(NFTA_SET_ELEM_LIST_ELEMENTS, elems);
            }),
        );
    }

    /// Ends the batch. Only its last nf_tables message asks for an ACK: a failing message is
    /// answered anyway, so that one ACK says the whole transaction went through.
    fn finish(mut self) -> Self {
        if let Some(at) = self.last_nft {
            request_ack(&mut self.buf, at);
        }
        self.msg(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            0,
            NFNL_SUBSYS_NFTABLES,
            &Attrs::default(),
        );
        self
    }
}

/// The whole ruleset as one batch: per table, create it, flush it (so a repeated ADD
/// replaces rather than doubles), its chains, then its rules in their final order.
fn ruleset_batch(
    set: &Ruleset,
    resolve_group: &dyn Fn(&str) -> Option<u32>,
) -> Result<Batch, NftablesError> {
    let mut b = Batch::new();
    let mut next_set_id = 0u32;
    for t in &set.tables {
        let table = Attrs::with(|a| {
            a.str(NFTA_TABLE_NAME, t.name);
        });
        b.nft(NFT_MSG_NEWTABLE, NLM_F_CREATE, &table);
        b.nft(
            NFT_MSG_DELRULE,
            0,
            &Attrs::with(|a| {
                a.str(NFTA_RULE_TABLE, t.name);
            }),
        );
        for c in &t.chains {
            let attrs = Attrs::with(|a| {
                a.str(NFTA_CHAIN_TABLE, t.name).str(NFTA_CHAIN_NAME, c.name);
                if let Some(base) = c.base {
                    let hook = match base.hook {
                        super::Hook::Prerouting => NF_INET_PRE_ROUTING,
                        super::Hook::Output => NF_INET_LOCAL_OUT,
                    };
                    a.nest(
                        NFTA_CHAIN_HOOK,
                        Attrs::with(|h| {
                            h.be32(NFTA_HOOK_HOOKNUM, hook)
                                .be32(NFTA_HOOK_PRIORITY, base.priority as u32);
                        }),
                    );
                    a.str(NFTA_CHAIN_TYPE, base.kind.name());
                }
            });
            b.nft(NFT_MSG_NEWCHAIN, NLM_F_CREATE, &attrs);
        }
        for c in &t.chains {
            for stmts in t.chain_rules(c.name) {
                let mut sets = Vec::new();
                let exprs = encode_stmts(stmts, &mut sets, &mut next_set_id, resolve_group)
                    .map_err(|source| NftablesError::Encode {
                        table: t.name,
                        chain: c.name,
                        source,
                    })?;
                for s in &sets {
                    b.anon_set(t.name, s);
                }
                let list = Attrs::with(|l| {
                    for Expr(name, data) in exprs {
                        l.nest(
                            NFTA_LIST_ELEM,
                            Attrs::with(|e| {
                                e.str(NFTA_EXPR_NAME, name).nest(NFTA_EXPR_DATA, data);
                            }),
                        );
                    }
                });
                b.nft(
                    NFT_MSG_NEWRULE,
                    NLM_F_CREATE | NLM_F_APPEND,
                    &Attrs::with(|a| {
                        a.str(NFTA_RULE_TABLE, t.name)
                            .str(NFTA_RULE_CHAIN, c.name)
                            .nest(NFTA_RULE_EXPRESSIONS, list);
                    }),
                );
            }
        }
    }
    Ok(b.finish())
}

/// Group names from the host's `/etc/group` (the runtime's, as `nft` would read it).
fn etc_group_id(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// Programs the ruleset in the netns, as one transaction.
pub fn apply(netns: &Netns, set: &Ruleset) -> Result<(), NftablesError> {
    apply_with_cookie(netns, set).map(|_| ())
}

/// [`apply`], and the netns cookie read on the same trip into the netns (`None` when it could
/// not be read: the caller reads it its own way), so enrolling the pod needs no second thread.
pub fn apply_with_cookie(netns: &Netns, set: &Ruleset) -> Result<Option<u64>, NftablesError> {
    let batch = ruleset_batch(set, &etc_group_id)?;
    let (applied, cookie) = netns
        .run(|| {
            let applied =
                Socket::open(libc::NETLINK_NETFILTER).and_then(|s| s.transact(&batch.buf));
            let cookie = applied
                .is_ok()
                .then(|| fastpath_pins::current_netns_cookie().ok())
                .flatten();
            (applied, cookie)
        })
        .map_err(NftablesError::enter(netns))?;
    applied.map_err(|source| NftablesError::Transaction {
        tables: set.tables.len(),
        source,
    })?;
    Ok(cookie)
}

/// Removes Istio's sidecar tables from the netns; a table that is not there is no error.
pub fn delete_tables(netns: &Netns) -> Result<(), NftablesError> {
    netns
        .run(|| -> Result<(), NftablesError> {
            let s = Socket::open(libc::NETLINK_NETFILTER).map_err(NftablesError::Socket)?;
            for name in TABLES {
                let mut b = Batch::new();
                b.nft(
                    NFT_MSG_DELTABLE,
                    0,
                    &Attrs::with(|a| {
                        a.str(NFTA_TABLE_NAME, name);
                    }),
                );
                let b = b.finish();
                match s.transact(&b.buf) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(source) => {
                        return Err(NftablesError::DeleteTable {
                            table: name,
                            source,
                        });
                    }
                }
            }
            Ok(())
        })
        .map_err(NftablesError::enter(netns))?
}

/// Per (table, chain), how many rules the netns holds in Istio's tables.
pub fn rule_counts(netns: &Netns) -> Result<Vec<(String, String, usize)>, NftablesError> {
    netns
        .run(|| -> Result<Vec<(String, String, usize)>, NftablesError> {
            let s = Socket::open(libc::NETLINK_NETFILTER).map_err(NftablesError::Socket)?;
            let mut req = Batch::empty();
            req.msg(
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE,
                NLM_F_REQUEST | NLM_F_DUMP,
                NFPROTO_INET,
                0,
                &Attrs::default(),
            );
            let rules = s
                .dump(&req.buf, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE)
                .map_err(NftablesError::Dump)?;
            let mut counts: Vec<(String, String, usize)> = Vec::new();
            // After each message's nfgenmsg.
            for (table, chain) in rules.iter().filter_map(|r| r.get(4..)).map(rule_location) {
                if TABLES.contains(&table.as_str()) {
                    match counts
                        .iter_mut()
                        .find(|(t, c, _)| *t == table && *c == chain)
                    {
                        Some(e) => e.2 += 1,
                        None => counts.push((table, chain, 1)),
                    }
                }
            }
            Ok(counts)
        })
        .map_err(NftablesError::enter(netns))?
}

/// NFTA_RULE_TABLE and NFTA_RULE_CHAIN of a NEWRULE message's attributes.
fn rule_location(attrs: &[u8]) -> (String, String) {
    let (mut table, mut chain) = (String::new(), String::new());
    for (kind, value) in parse_attrs(attrs) {
        let value = String::from_utf8_lossy(value)
            .trim_end_matches('\0')
            .to_string();
        match kind {
            NFTA_RULE_TABLE => table = value,
            NFTA_RULE_CHAIN => chain = value,
            _ => {}
        }
    }
    (table, chain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redirect::{Cidr, GroupName};

    fn exprs(stmts: &[Stmt]) -> Vec<&'static str> {
        let mut sets = Vec::new();
        let mut id = 0;
        encode_stmts(stmts, &mut sets, &mut id, &|_| None)
            .unwrap()
            .iter()
            .map(|e| e.0)
            .collect()
    }

    #[test]
    fn protocol_dependencies_are_written_once_as_nft_does() {
        let c = Cidr::parse("9.9.0.0/16").unwrap();
        let stmts = [
            Stmt::L4Proto(L4::Tcp),
            Stmt::Addr {
                dir: Dir::Dst,
                op: Op::Neq,
                cidr: c,
            },
            Stmt::Port {
                proto: L4::Tcp,
                dir: Dir::Dst,
                op: Op::Neq,
                ports: vec![15008],
            },
            Stmt::Counter,
            Stmt::Verdict(Verdict::Return),
        ];
        assert_eq!(
            exprs(&stmts),
            [
                "meta",
                "cmp",
                "meta",
                "cmp",
                "payload",
                "cmp",
                "payload",
                "cmp",
                "counter",
                "immediate"
            ]
        );
        // A /12 is not byte aligned: masked.
        let c12 = Cidr::parse("10.96.0.0/12").unwrap();
        assert_eq!(
            exprs(&[Stmt::Addr {
                dir: Dir::Dst,
                op: Op::Eq,
                cidr: c12
            }]),
            ["meta", "cmp", "payload", "bitwise", "cmp"]
        );
    }

    #[test]
    fn port_lists_become_one_anonymous_set() {
        let mut sets = Vec::new();
        let mut id = 0;
        let stmts = [Stmt::Port {
            proto: L4::Tcp,
            dir: Dir::Dst,
            op: Op::Neq,
            ports: vec![53, 15008],
        }];
        let e = encode_stmts(&stmts, &mut sets, &mut id, &|_| None).unwrap();
        assert_eq!(e.last().unwrap().0, "lookup");
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].ports, [53, 15008]);
    }

    #[test]
    fn an_unknown_group_name_is_named() {
        let g = Stmt::SkGid {
            op: Op::Eq,
            gid: Group::Named(GroupName::parse("nosuchgrp").unwrap()),
            meta: false,
        };
        let err = encode_stmts(&[g], &mut Vec::new(), &mut 0, &|_| None)
            .err()
            .unwrap();
        assert_eq!(err.name, "nosuchgrp");
        assert_eq!(
            err.to_string(),
            "group \"nosuchgrp\" (owner group) is not in /etc/group"
        );
        let ok = Stmt::SkGid {
            op: Op::Eq,
            gid: Group::Named(GroupName::parse("202").unwrap()),
            meta: false,
        };
        assert!(encode_stmts(&[ok], &mut Vec::new(), &mut 0, &|_| None).is_ok());
    }
}
