//! Netlink framing on plain libc, shared by the two families the plugin speaks: nf_tables
//! (`nftables::netlink`, `NETLINK_NETFILTER`) and routing (`routing`, `NETLINK_ROUTE`). This
//! module knows messages, attributes and the socket; what the messages say is the callers'.
//! Numbers are the kernel's UAPI (`include/uapi/linux/netlink.h`).
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLA_F_NESTED: u16 = 0x8000;
/// `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;

/// A netlink attribute tree under construction.
#[derive(Default)]
pub struct Attrs(Vec<u8>);

impl Attrs {
    pub fn raw(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        self.raw_parts(kind, data, &[])
    }
    /// One attribute whose value is `data` then `tail`, reserved in one step.
    fn raw_parts(&mut self, kind: u16, data: &[u8], tail: &[u8]) -> &mut Self {
        let len = 4 + data.len() + tail.len();
        let pad = len.next_multiple_of(4) - len;
        self.0.reserve(len + pad);
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.0.extend_from_slice(tail);
        self.0.extend_from_slice(&[0; 3][..pad]);
        self
    }
    pub fn str(&mut self, kind: u16, s: &str) -> &mut Self {
        self.raw_parts(kind, s.as_bytes(), &[0])
    }
    /// A u32 in host byte order (rtnetlink's).
    pub fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.raw(kind, &v.to_ne_bytes())
    }
    /// A u32 in network byte order (nf_tables').
    pub fn be32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.raw(kind, &v.to_be_bytes())
    }
    pub fn nest(&mut self, kind: u16, inner: Attrs) -> &mut Self {
        self.raw(kind | NLA_F_NESTED, &inner.0)
    }
    pub fn with(f: impl FnOnce(&mut Attrs)) -> Attrs {
        let mut a = Attrs::default();
        f(&mut a);
        a
    }
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Appends one message to `buf`: the netlink header, the family's fixed header (`fixed`, e.g.
/// `nfgenmsg`, `rtmsg`; padded to 4 bytes), then the attributes.
pub fn push_message(
    buf: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    fixed: &[u8],
    attrs: &Attrs,
) {
    let start = buf.len();
    let len = NLMSG_HDRLEN + fixed.len().next_multiple_of(4) + attrs.0.len();
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    // Port id 0: the kernel fills in the socket's.
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(fixed);
    buf.resize(buf.len().next_multiple_of(4), 0);
    buf.extend_from_slice(&attrs.0);
    debug_assert_eq!(buf.len() - start, len);
}

/// What the plugin reads of a message's `nlmsghdr`.
struct Header {
    kind: u16,
    flags: u16,
    seq: u32,
}

/// The messages in `buf` with their payloads (after the `nlmsghdr`); a truncated tail is dropped.
fn messages(mut rest: &[u8]) -> Vec<(Header, &[u8])> {
    let field = |b: &[u8], at: usize| -> [u8; 4] { b[at..at + 4].try_into().expect("4 bytes") };
    let mut out = Vec::new();
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(field(rest, 0)) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            break;
        }
        let [k0, k1, f0, f1] = field(rest, 4);
        let header = Header {
            kind: u16::from_ne_bytes([k0, k1]),
            flags: u16::from_ne_bytes([f0, f1]),
            seq: u32::from_ne_bytes(field(rest, 8)),
        };
        out.push((header, &rest[NLMSG_HDRLEN..len]));
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    out
}

/// The messages of one datagram as (type, payload after the `nlmsghdr`); a truncated tail is
/// dropped.
pub fn parse_messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    messages(buf)
        .into_iter()
        .map(|(h, p)| (h.kind, p))
        .collect()
}

/// Makes the message that starts at `at` in `buf` (a [`push_message`] offset) ask for an ACK.
pub fn request_ack(buf: &mut [u8], at: usize) {
    let flags = &mut buf[at + 6..at + 8];
    let acked = u16::from_ne_bytes([flags[0], flags[1]]) | NLM_F_ACK;
    flags.copy_from_slice(&acked.to_ne_bytes());
}

/// The attributes of a message body as (type without `NLA_F_NESTED`, value); a malformed tail
/// is dropped.
pub fn parse_attrs(mut rest: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & !NLA_F_NESTED;
        if len < 4 || len > rest.len() {
            break;
        }
        out.push((kind, &rest[4..len]));
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    out
}

/// A u32 attribute value in host byte order, if it is one.
pub fn attr_u32(value: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(value.get(..4)?.try_into().ok()?))
}

/// The sequence number of the last message in `buf` that asks for an ACK.
fn last_acked_seq(buf: &[u8]) -> Option<u32> {
    messages(buf)
        .iter()
        .rev()
        .find(|(h, _)| h.flags & NLM_F_ACK != 0)
        .map(|(h, _)| h.seq)
}

/// The sequence number of the message an `NLMSG_ERROR` payload answers (its errno is followed
/// by that message's header).
fn answered_seq(payload: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(payload.get(12..16)?.try_into().ok()?))
}

/// The errno an `NLMSG_ERROR` payload carries (0: an ACK).
fn error_code(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .map_or(0, |b| -i32::from_ne_bytes(b.try_into().expect("4 bytes")))
}

/// The receive buffer: the largest datagram the plugin reads (a dump's batch of answers).
const RECV_BUF: usize = 1 << 16;

/// A netlink socket of one protocol, in the network namespace of the thread that opened it.
pub struct Socket(OwnedFd);

impl Socket {
    /// `protocol`: `NETLINK_NETFILTER`, `NETLINK_ROUTE`.
    pub fn open(protocol: i32) -> std::io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let s = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        // A kernel that never answers must not hang the runtime's ADD.
        let tv = libc::timeval {
            tv_sec: 10,
            tv_usec: 0,
        };
        // SAFETY: valid fd, pointer to a live timeval of the size passed.
        unsafe {
            libc::setsockopt(
                s.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        Ok(s)
    }

    pub fn send(&self, buf: &[u8]) -> std::io::Result<()> {
        // SAFETY: sockaddr_nl is plain data; all zeroes is the kernel as destination.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: buf and addr outlive the call; sizes are theirs.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next datagram.
    pub fn recv(&self) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; RECV_BUF];
        let n = self.recv_into(&mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// The next datagram, into `buf` (one buffer serves every datagram of an exchange: no
    /// allocation per ACK); its length.
    fn recv_into(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Sends the messages in `buf` and waits for the ACK of the last one that asks for one; the
    /// first error the kernel names wins. The kernel answers every message that fails, whether
    /// it asked for an ACK or not, and answers in order: so a batch needs one ACK, not one per
    /// message (each is a datagram the kernel builds and we read).
    pub fn transact(&self, buf: &[u8]) -> std::io::Result<()> {
        self.send(buf)?;
        let Some(last) = last_acked_seq(buf) else {
            return Ok(());
        };
        let mut rx = vec![0u8; RECV_BUF];
        loop {
            let n = self.recv_into(&mut rx)?;
            for (kind, payload) in parse_messages(&rx[..n]) {
                if kind != NLMSG_ERROR {
                    continue;
                }
                match error_code(payload) {
                    0 if answered_seq(payload) == Some(last) => return Ok(()),
                    0 => {}
                    errno => return Err(std::io::Error::from_raw_os_error(errno)),
                }
            }
        }
    }

    /// Sends one dump request and returns each answer's payload (after the `nlmsghdr`) of type
    /// `kind`, up to `NLMSG_DONE`.
    pub fn dump(&self, request: &[u8], kind: u16) -> std::io::Result<Vec<Vec<u8>>> {
        self.send(request)?;
        let mut out = Vec::new();
        let mut rx = vec![0u8; RECV_BUF];
        loop {
            let n = self.recv_into(&mut rx)?;
            for (k, payload) in parse_messages(&rx[..n]) {
                match k {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        return Err(std::io::Error::from_raw_os_error(error_code(payload)));
                    }
                    k if k == kind => out.push(payload.to_vec()),
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_message_asked_to_is_awaited_for_an_ack() {
        let mut buf = Vec::new();
        let attrs = Attrs::with(|a| {
            a.str(1, "lo");
        });
        push_message(&mut buf, 16, NLM_F_REQUEST, 1, &[0; 4], &attrs);
        let second = buf.len();
        push_message(&mut buf, 17, NLM_F_REQUEST, 2, &[0; 4], &attrs);
        push_message(&mut buf, 18, NLM_F_REQUEST, 3, &[0; 4], &attrs);
        assert_eq!(last_acked_seq(&buf), None);
        request_ack(&mut buf, second);
        assert_eq!(last_acked_seq(&buf), Some(2));
        let kinds: Vec<u16> = parse_messages(&buf).iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, [16, 17, 18]);
        // A truncated tail is not a message.
        assert_eq!(parse_messages(&buf[..buf.len() - 1]).len(), 2);
    }

    #[test]
    fn attributes_are_padded_to_four_bytes_and_nest() {
        let a = Attrs::with(|a| {
            a.str(1, "lo").u32(2, 7).nest(
                3,
                Attrs::with(|n| {
                    n.be32(1, 1);
                }),
            );
        });
        let mut want = vec![7, 0, 1, 0, b'l', b'o', 0, 0];
        want.extend_from_slice(&[8, 0, 2, 0]);
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&[12, 0, 3, 0x80, 8, 0, 1, 0, 0, 0, 0, 1]);
        assert_eq!(a.bytes(), want);
        let parsed = parse_attrs(a.bytes());
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[0], (1, &b"lo\0"[..]));
        assert_eq!(attr_u32(parsed[1].1), Some(7));
        assert_eq!(parsed[2].0, 3, "the nested flag is not part of the type");
    }

    #[test]
    fn a_message_is_header_fixed_part_and_attributes() {
        let mut buf = Vec::new();
        let attrs = Attrs::with(|a| {
            a.u32(10, 1337);
        });
        push_message(
            &mut buf,
            32,
            NLM_F_REQUEST | NLM_F_ACK,
            5,
            &[2, 0, 0],
            &attrs,
        );
        assert_eq!(buf.len(), 16 + 4 + 8, "the fixed part is padded");
        assert_eq!(u32::from_ne_bytes(buf[0..4].try_into().unwrap()), 28);
        assert_eq!(u16::from_ne_bytes(buf[4..6].try_into().unwrap()), 32);
        assert_eq!(
            u16::from_ne_bytes(buf[6..8].try_into().unwrap()),
            5,
            "flags"
        );
        assert_eq!(u32::from_ne_bytes(buf[8..12].try_into().unwrap()), 5);
        let msgs = parse_messages(&buf);
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].0, 32);
        assert_eq!(&msgs[0].1[..4], &[2, 0, 0, 0]);
        assert_eq!(
            parse_attrs(&msgs[0].1[4..]),
            [(10, &1337u32.to_ne_bytes()[..])]
        );
    }

    #[test]
    fn error_payloads_carry_the_negated_errno() {
        assert_eq!(error_code(&(-libc::EEXIST).to_ne_bytes()), libc::EEXIST);
        assert_eq!(error_code(&0i32.to_ne_bytes()), 0);
        assert_eq!(error_code(&[]), 0);
    }
}
