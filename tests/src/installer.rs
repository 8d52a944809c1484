//! Harness for the install-cni tests: a throwaway "host" (CNI conf dir, bin dir, the image's
//! plugin dir, run dir, a kubelet-style service-account volume) and the BUILT `install-cni`
//! running against it on random free ports.
use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long any wait in these tests may take before the test fails (not a speed goal).
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A primary conflist with two plugins whose config must survive every rewrite.
pub const PRIMARY: &str = r#"{
  "cniVersion": "0.4.0",
  "name": "dbnet",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "args": {"labels": {"appVersion": "1.0"}},
     "ipam": {"type": "host-local", "subnet": "10.1.0.0/16", "gateway": "10.1.0.1"},
     "dns": {"nameservers": ["10.1.0.1"]}, "mtu": 1500},
    {"type": "tuning", "sysctl": {"net.core.somaxconn": "500"}}
  ]
}"#;

pub struct Host {
    pub root: PathBuf,
    pub net: PathBuf,
    pub bin: PathBuf,
    pub src: PathBuf,
    pub run: PathBuf,
    pub sa: PathBuf,
    generation: std::cell::Cell<u32>,
}

impl Host {
    pub fn new(tag: &str) -> Host {
        let root = std::env::temp_dir().join(crate::unique_name(&format!("fp-inst-{tag}-")));
        let _ = std::fs::remove_dir_all(&root);
        let h = Host {
            net: root.join("etc-cni-net.d"),
            bin: root.join("opt-cni-bin"),
            src: root.join("image-opt-cni-bin"),
            run: root.join("var-run-istio-cni"),
            sa: root.join("serviceaccount"),
            root,
            generation: std::cell::Cell::new(0),
        };
        for d in [&h.net, &h.bin, &h.src, &h.run, &h.sa] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(h.src.join("istio-cni"), h.plugin_bytes()).unwrap();
        std::fs::set_permissions(
            h.src.join("istio-cni"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        h.rotate_token("token-0");
        std::os::unix::fs::symlink("..data/token", h.sa.join("token")).unwrap();
        std::os::unix::fs::symlink("..data/ca.crt", h.sa.join("ca.crt")).unwrap();
        h
    }

    /// The fake plugin binary's content (unique per host).
    pub fn plugin_bytes(&self) -> Vec<u8> {
        format!(
            "#!/bin/sh\n# fake istio-cni for {}\nexit 0\n",
            self.root.display()
        )
        .into_bytes()
    }

    /// Kubelet's projected-volume update: a new timestamped dir, a `..data_tmp` symlink to it
    /// renamed over `..data`, then the old dir removed.
    pub fn rotate_token(&self, token: &str) {
        let g = self.generation.get() + 1;
        self.generation.set(g);
        let dir_name = format!("..2026_11_26_00_00_{g:02}.{}", std::process::id());
        let dir = self.sa.join(&dir_name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("token"), token).unwrap();
        std::fs::write(
            dir.join("ca.crt"),
            "-----BEGIN CERTIFICATE-----\nMIIfake\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let old = std::fs::read_link(self.sa.join("..data")).ok();
        let tmp = self.sa.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&dir_name, &tmp).unwrap();
        std::fs::rename(&tmp, self.sa.join("..data")).unwrap();
        if let Some(old) = old {
            std::fs::remove_dir_all(self.sa.join(old)).unwrap();
        }
    }

    /// Puts `token` and `ca_pem` in the service-account volume (a kubelet-style update).
    pub fn set_service_account(&self, token: &str, ca_pem: &str) {
        self.rotate_token(token);
        let dir = self
            .sa
            .join(std::fs::read_link(self.sa.join("..data")).unwrap());
        std::fs::write(dir.join("ca.crt"), ca_pem).unwrap();
    }

    pub fn net_file(&self, name: &str) -> PathBuf {
        self.net.join(name)
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.run.join("istio-cni-kubeconfig")
    }

    pub fn plugin(&self) -> PathBuf {
        self.bin.join("istio-cni")
    }

    pub fn write(&self, name: &str, text: &str) {
        std::fs::write(self.net_file(name), text).unwrap();
    }

    /// Writes like most CNI daemons do: temp file and rename.
    pub fn write_by_rename(&self, name: &str, text: &str) {
        let tmp = self.net.join(format!(".{name}.other-agent-tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.net_file(name)).unwrap();
    }

    pub fn json(&self, name: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(self.net_file(name))
            .unwrap_or_else(|e| panic!("read {name}: {e}"));
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{name} is not valid JSON ({e}):\n{text}"))
    }

    /// The env the agent runs with: every path in this host, Istio's names.
    pub fn env(&self) -> Vec<(String, String)> {
        let p = |p: &Path| p.display().to_string();
        vec![
            ("MOUNTED_CNI_NET_DIR".into(), p(&self.net)),
            ("FASTPATH_HOST_CNI_BIN_DIR".into(), p(&self.bin)),
            ("FASTPATH_CNI_BIN_SOURCE_DIR".into(), p(&self.src)),
            ("CNI_AGENT_RUN_DIR".into(), p(&self.run)),
            ("FASTPATH_SERVICE_ACCOUNT_DIR".into(), p(&self.sa)),
            ("KUBERNETES_SERVICE_HOST".into(), "10.96.0.1".into()),
            ("KUBERNETES_SERVICE_PORT".into(), "443".into()),
            ("FASTPATH_ACCELERATION".into(), "false".into()),
            ("FASTPATH_BPF_PIN_DIR".into(), p(&self.root.join("pins"))),
            ("POD_NAMESPACE".into(), "istio-system".into()),
            (
                "EXCLUDE_NAMESPACES".into(),
                "kube-system,istio-system".into(),
            ),
        ]
    }

    /// Every `.conf`/`.conflist` in the conf dir must be valid JSON; returns them by name.
    pub fn conf_files(&self) -> Vec<(String, serde_json::Value)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.net).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".conf") || name.ends_with(".conflist") {
                out.push((name.clone(), self.json(&name)));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The `type`s of a conflist's plugins.
pub fn plugin_types(v: &serde_json::Value) -> Vec<String> {
    v["plugins"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|p| p["type"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The non-istio plugins of a conflist, as JSON values.
pub fn other_plugins(v: &serde_json::Value) -> Vec<serde_json::Value> {
    v["plugins"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter(|p| p["type"] != "istio-cni")
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `install-cni`.
pub struct Agent {
    pub child: Child,
    pub health_port: u16,
    pub metrics_port: u16,
    pub log_path: PathBuf,
}

impl Agent {
    pub fn start(host: &Host, extra_env: &[(&str, &str)]) -> Agent {
        Self::start_with_args(host, extra_env, &[])
    }

    pub fn start_with_args(host: &Host, extra_env: &[(&str, &str)], args: &[&str]) -> Agent {
        Self::start_under(host, extra_env, args, &[])
    }

    /// Starts the agent through `launcher` (a command and its arguments that execs what
    /// follows it, such as `setpriv ... --`), or directly when it is empty.
    pub fn start_under(
        host: &Host,
        extra_env: &[(&str, &str)],
        args: &[&str],
        launcher: &[&str],
    ) -> Agent {
        let health_port = free_port();
        let metrics_port = free_port();
        let log_path = host.root.join(crate::unique_name("agent-log-"));
        let log = std::fs::File::create(&log_path).unwrap();
        let binary = crate::bin_path("install-cni");
        let mut cmd = match launcher.split_first() {
            None => Command::new(&binary),
            Some((program, launcher_args)) => {
                let mut c = Command::new(program);
                c.args(launcher_args).arg(&binary);
                c
            }
        };
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(host.env())
            .env("FASTPATH_HEALTH_PORT", health_port.to_string())
            .env("MONITORING_PORT", metrics_port.to_string())
            .args(["--log_output_level=default:debug"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn install-cni");
        Agent {
            child,
            health_port,
            metrics_port,
            log_path,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `(status, body)` of `/readyz`, or None when nothing answers yet.
    pub fn readyz(&self) -> Option<(u16, String)> {
        http_get(self.health_port, "/readyz")
    }

    pub fn metrics(&self) -> String {
        http_get(self.metrics_port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// Value of one metric series (exact name with labels), if present.
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metrics().lines().find_map(|l| {
            l.strip_prefix(series)
                .and_then(|r| r.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.readyz(), Some((200, _)))
    }

    pub fn wait_ready(&mut self) {
        self.wait_until("ready", |a| a.is_ready());
    }

    /// Polls `cond` until it holds; fails (with the agent's log) after [`PATIENCE`] or when the
    /// agent exits.
    pub fn wait_until(&mut self, what: &str, cond: impl Fn(&Agent) -> bool) {
        let start = Instant::now();
        loop {
            if cond(self) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "install-cni exited ({st}) while waiting for {what}; log:\n{}",
                    self.log()
                );
            }
            if start.elapsed() > PATIENCE {
                panic!(
                    "timed out waiting for {what}; readyz {:?}; log:\n{}",
                    self.readyz(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `/readyz` answers something `cond` accepts, and returns it.
    pub fn wait_readyz(&mut self, what: &str, cond: impl Fn(u16, &str) -> bool) -> (u16, String) {
        self.wait_until(what, |a| a.readyz().is_some_and(|(s, b)| cond(s, &b)));
        self.readyz().expect("readyz")
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > PATIENCE {
                panic!(
                    "install-cni did not exit after SIGTERM; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny HTTP/1.1 GET to 127.0.0.1.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_at(std::net::SocketAddr::from(([127, 0, 0, 1], port)), path)
}

/// A tiny HTTP/1.1 GET to `addr` (the kubelet's probe, Prometheus' scrape): its status and
/// body.
pub fn http_get_at(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// A POST over a unix socket (the plugin's log client).
pub fn unix_post(sock: &Path, path: &str, body: &[u8]) -> std::io::Result<u16> {
    let mut s = std::os::unix::net::UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: unix\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response {resp:?}")))
}

/// A small deterministic PRNG for the kill -9 test (seed printed for reruns).
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
