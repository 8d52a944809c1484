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
}

impl Mesh {
    /// Builds the two pods, loads the rules, starts both sidecars, and enrolls both pods in
    /// `accel` when one is given (subnet: the third octet of the veth addresses, unique per
    /// concurrent mesh).
    pub fn new(tag: &str, subnet: u8, accel: Option<&Accel>) -> Self {
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
        // MESH_LOG=1 keeps a log of each session (bytes up and down, termination state) in the
        // mesh's directory, which is then kept.
        let text = if std::env::var("MESH_LOG").is_ok() {
            text.replace("global\n", "global\n    log stderr format raw local0\n")
                .replace("defaults\n", "defaults\n    log global\n    log-format \"%ci:%cp %ft %Tt up=%U down=%B %ts\"\n")
        } else {
            text
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
