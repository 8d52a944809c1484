//! A two-pod sidecar mesh on one node, as the benchmark builds it: a client pod and a server
//! pod joined by a veth pair, Istio's sidecar rules loaded in both, and an HAProxy sidecar in
//! each running as uid 1337 (the same configuration files as `bench/`). With an [`Accel`]
//! both pods are enrolled, so every hop of the sidecar path can be accelerated:
//! app -> outbound sidecar (15001), sidecar -> sidecar (15006), inbound sidecar -> app
//! (from 127.0.0.6).
use crate::accel::{Accel, Pod, link_pods};
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const HAPROXY_CFG: &str = include_str!("../../bench/conf/haproxy-sidecar.cfg");
const ISTIO_RULES: &str = include_str!("../../bench/conf/istio-sidecar.rules");
const PROXY_UID: u32 = 1337;

pub struct Mesh {
    pub client: Pod,
    pub server: Pod,
    sidecars: Vec<Child>,
    dir: PathBuf,
    polling: SidecarPolling,
}

/// How the HAProxy sidecars poll their sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SidecarPolling {
    /// As Debian's HAProxy 2.6 ships (level-triggered epoll): it now and then takes the end of
    /// a full-duplex stream too early by itself, with or without acceleration (see
    /// `accel_sidecar_echo.rs`).
    Default,
    /// `tune.fd.edge-triggered on`, which does not lose track of unread input that way: a
    /// stand-in without that defect, for the tests whose failures must all be the product's
    /// (the sidecar echo, the randomized harness).
    EdgeTriggered,
}

impl SidecarPolling {
    /// The polling the env var `name` asks for: `default` for HAProxy's own, anything else
    /// (or unset) for [`SidecarPolling::EdgeTriggered`].
    pub fn from_env(name: &str) -> Self {
        match std::env::var(name).as_deref() {
            Ok("default") => SidecarPolling::Default,
            _ => SidecarPolling::EdgeTriggered,
        }
    }
}

impl Mesh {
    /// Builds the two pods, loads the rules, starts both sidecars, and enrolls both pods in
    /// `accel` when one is given (subnet: the third octet of the veth addresses, unique per
    /// concurrent mesh).
    pub fn new(tag: &str, subnet: u8, accel: Option<&Accel>) -> Self {
        Self::with_polling(tag, subnet, accel, SidecarPolling::Default)
    }

    /// [`Mesh::new`] with sidecars that poll as `polling` says.
    pub fn with_polling(
        tag: &str,
        subnet: u8,
        accel: Option<&Accel>,
        polling: SidecarPolling,
    ) -> Self {
        let mut client = Pod::new(&format!("{tag}c"));
        let mut server = Pod::new(&format!("{tag}s"));
        link_pods(&mut client, &mut server, subnet);
        let dir = std::env::temp_dir().join(crate::unique_name(&format!("fp-mesh-{tag}-")));
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
        let mut mesh = Self {
            client,
            server,
            sidecars: Vec::new(),
            dir,
            polling,
        };
        for pod in [&mesh.client, &mesh.server] {
            load_rules(pod);
            if let Some(a) = accel {
                a.enroll(pod, None);
            }
        }
        for which in ["c", "s"] {
            let child = mesh.start_sidecar(which);
            mesh.sidecars.push(child);
        }
        for pod in [&mesh.client, &mesh.server] {
            wait_listening(pod, 15001);
            wait_listening(pod, 15006);
        }
        mesh
    }

    fn start_sidecar(&self, which: &str) -> Child {
        let pod = if which == "c" {
            &self.client
        } else {
            &self.server
        };
        let cfg = self.dir.join(format!("haproxy-{which}.cfg"));
        let text = HAPROXY_CFG
            .replace(
                "{pidfile}",
                &self.dir.join(format!("{which}.pid")).to_string_lossy(),
            )
            .replace(
                "{stats_socket}",
                &self.dir.join(format!("{which}.sock")).to_string_lossy(),
            );
        // Every session is logged when it ends (the mesh's directory; MESH_LOG=1 keeps it): the
        // app or sidecar port it came from, the port the sidecar connected from, bytes each
        // way, and HAProxy's termination state, which tells a failure the sidecar saw (a reset
        // or an error on one side) from a normal close. `Mesh::explain` reads it.
        let text = text
            .replace("global\n", "global\n    log stderr format raw local0\n")
            .replace(
                "defaults\n",
                "defaults\n    log global\n    log-format \"%ci:%cp %ft %bi:%bp %Tt up=%U down=%B %ts\"\n",
            );
        let text = match self.polling {
            SidecarPolling::Default => text,
            SidecarPolling::EdgeTriggered => text.replacen(
                "global\n",
                "global\n    expose-experimental-directives\n    tune.fd.edge-triggered on\n",
                1,
            ),
        };
        std::fs::write(&cfg, text).unwrap();
        let log = std::fs::File::create(self.dir.join(format!("{which}.log"))).unwrap();
        let uid = PROXY_UID.to_string();
        Command::new("ip")
            .args(["netns", "exec", &pod.ns.name, "setpriv"])
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "haproxy",
                "-db",
                "-f",
            ])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start haproxy")
    }

    /// The server pod's IPv4 address: what the client app dials.
    pub fn server_ip(&self) -> IpAddr {
        self.server.ips[0]
    }

    pub fn server_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.server_ip(), port)
    }

    /// Whether both sidecars still run (a dead sidecar makes every later case fail).
    pub fn sidecars_alive(&mut self) -> bool {
        self.sidecars
            .iter_mut()
            .all(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for c in &mut self.sidecars {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::env::var("MESH_LOG").is_err() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("sidecar logs kept in {}", self.dir.display());
        }
    }
}

fn load_rules(pod: &Pod) {
    use std::io::Write as _;
    // Packets conntrack takes as INVALID (which Istio's REDIRECT then leaves un-NATed) go to
    // the kernel log with the reason, for a failure report.
    let _ = Command::new("ip")
        .args(["netns", "exec", &pod.ns.name, "sysctl", "-qw"])
        .arg("net.netfilter.nf_conntrack_log_invalid=6")
        .status();
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.ns.name,
            "iptables-restore",
            "--noflush",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .expect("iptables-restore");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(ISTIO_RULES.as_bytes())
        .unwrap();
    assert!(
        child.wait().unwrap().success(),
        "iptables-restore in {}",
        pod.ns.name
    );
}

fn wait_listening(pod: &Pod, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = pod.sh(&format!("ss -Hltn 'sport = :{port}'"));
        if !out.trim().is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pod {}: nothing listens on {port}",
            pod.ns.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One session a sidecar logged when it ended (see the log format in `start_sidecar`).
#[derive(Debug, Clone)]
pub struct Session {
    /// The port the session came from: the app's own port on the outbound sidecar, the
    /// client sidecar's `via_port` on the inbound one.
    pub from_port: u16,
    /// The port the sidecar connected onwards from.
    pub via_port: u16,
    /// Bytes the sidecar read from the session's client side.
    pub up: u64,
    pub line: String,
    /// HAProxy's termination state: `--` is a normal close; a first letter `C`/`S` is an
    /// abort (a reset or an error) on the client/server side, `c`/`s` a timeout there.
    pub state: String,
}

impl Session {
    fn parse(line: &str) -> Option<Self> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let port = |s: &str| s.rsplit(':').next()?.parse().ok();
        Some(Self {
            from_port: port(f.first()?)?,
            via_port: port(f.get(2)?)?,
            up: f.iter().find_map(|w| w.strip_prefix("up=")?.parse().ok())?,
            state: f.last()?.to_string(),
            line: line.to_string(),
        })
    }

    pub fn ended_normally(&self) -> bool {
        self.state.starts_with('-')
    }
}

/// What both sidecars logged of one app connection.
#[derive(Debug)]
pub struct Trace {
    pub outbound: Option<Session>,
    pub inbound: Option<Session>,
}

impl std::fmt::Display for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let line = |s: &Option<Session>| s.as_ref().map_or("not logged".into(), |s| s.line.clone());
        write!(
            f,
            "client sidecar [{}], server sidecar [{}]",
            line(&self.outbound),
            line(&self.inbound)
        )
    }
}

impl Mesh {
    fn sessions(&self, which: &str) -> Vec<Session> {
        std::fs::read_to_string(self.dir.join(format!("{which}.log")))
            .unwrap_or_default()
            .lines()
            .filter_map(Session::parse)
            .collect()
    }

    /// Both sidecars' log of the connection the client app made from `app_port` (the
    /// sidecars log a session when it ends, so this waits up to 2 s for them).
    pub fn trace(&self, app_port: u16) -> Trace {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let outbound = self
                .sessions("c")
                .into_iter()
                .rfind(|s| s.line.contains(" outbound ") && s.from_port == app_port);
            let inbound = outbound.as_ref().and_then(|o| {
                self.sessions("s")
                    .into_iter()
                    .rfind(|s| s.line.contains(" inbound ") && s.from_port == o.via_port)
            });
            if inbound.is_some() || Instant::now() > deadline {
                return Trace { outbound, inbound };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A pod's TCP and conntrack counters: what tells a reset that the network made from one an
/// application or a sidecar made.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    /// Packets conntrack marked INVALID (out of its TCP window). Istio's REDIRECT rules skip
    /// NAT for them, so one can reach a socket it was not meant for and draw a reset
    /// (kubernetes/kubernetes#74839; Istio's `INVALID_DROP` drops them).
    pub conntrack_invalid: u64,
    /// Resets this pod's stack sent.
    pub tcp_out_rsts: u64,
    /// Resets sent because a socket was closed with unread data.
    pub abort_on_close: u64,
    /// Resets sent because data arrived after close.
    pub abort_on_data: u64,
    /// Challenge ACKs sent (a RST or SYN whose sequence number was in the window but not the
    /// expected one is answered with one and otherwise ignored), and those skipped by the
    /// rate limit.
    pub challenge_acks: u64,
    pub challenge_acks_skipped: u64,
}

impl NetCounters {
    pub fn of(pod: &crate::accel::Pod) -> Self {
        pod.run(|| {
            let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
            let conntrack_invalid = read("/proc/thread-self/net/stat/nf_conntrack")
                .lines()
                .skip(1)
                .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(4)?, 16).ok())
                .sum();
            Self {
                conntrack_invalid,
                tcp_out_rsts: proc_net_field(&read("/proc/thread-self/net/snmp"), "Tcp", "OutRsts"),
                abort_on_close: proc_net_field(
                    &read("/proc/thread-self/net/netstat"),
                    "TcpExt",
                    "TCPAbortOnClose",
                ),
                abort_on_data: proc_net_field(
                    &read("/proc/thread-self/net/netstat"),
                    "TcpExt",
                    "TCPAbortOnData",
                ),
                challenge_acks: proc_net_field(
                    &read("/proc/thread-self/net/netstat"),
                    "TcpExt",
                    "TCPChallengeACK",
                ),
                challenge_acks_skipped: proc_net_field(
                    &read("/proc/thread-self/net/netstat"),
                    "TcpExt",
                    "TCPACKSkippedChallenge",
                ),
            }
        })
    }
}

/// A field of /proc/net/snmp or /proc/net/netstat: a header line and a value line per group.
fn proc_net_field(text: &str, group: &str, field: &str) -> u64 {
    let prefix = format!("{group}:");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
    let [names, values] = lines[..] else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == field)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_line_names_its_ports_and_how_it_ended() {
        let s = Session::parse(
            "127.0.0.1:40312 outbound 10.247.61.1:51234 812 up=4194304 down=4194304 --",
        )
        .unwrap();
        assert_eq!((s.from_port, s.via_port, s.up), (40312, 51234, 4194304));
        assert!(s.ended_normally());
        let s = Session::parse(
            "10.247.61.1:51234 inbound 127.0.0.6:39001 640 up=4028495 down=4028495 SD",
        )
        .unwrap();
        assert!(!s.ended_normally());
        assert!(Session::parse("[NOTICE] (123) : haproxy started").is_none());
    }

    #[test]
    fn proc_net_fields_are_read_by_name() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoAlgorithm OutRsts InCsumErrors\nTcp: 1 17 0\n";
        assert_eq!(proc_net_field(snmp, "Tcp", "OutRsts"), 17);
        assert_eq!(proc_net_field(snmp, "Tcp", "Missing"), 0);
        assert_eq!(proc_net_field(snmp, "Udp", "OutRsts"), 0);
    }
}
