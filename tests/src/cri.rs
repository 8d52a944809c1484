//! A real container runtime for the tests: Debian's containerd (CRI plugin) started with its own
//! state dir, config, CNI bin/conf dirs and socket, driven through CRI v1 by a small Python
//! client (`tests/cri/crictl.py`, on Debian's python3-grpcio, with stubs generated from the CRI
//! `api.proto` of the `k8s-cri` crate's source). The sandbox ("pause") image is built locally
//! from busybox-static and a tiny static C pause, and imported with `ctr`.
//!
//! Two settings this VM needs: `restrict_oom_score_adj = true` (no CAP_SYS_RESOURCE here),
//! and a CNI conf dir of our own with `max_conf_num = 1`.
use anyhow::{Context as _, Result, bail};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's interpreter: it has python3-grpcio and python3-grpc-tools (a pyenv `python3` on PATH
/// may not).
pub const PYTHON: &str = "/usr/bin/python3";
pub const PAUSE_IMAGE: &str = "localhost/fastpath-test/pause:1";
const K8S_CRI_CRATE: &str = "k8s-cri-0.11.0";

fn cri_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cri")
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {} {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn find_cri_proto() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let src = home.join("registry").join("src");
    std::fs::read_dir(src).ok()?.flatten().find_map(|reg| {
        let p = reg
            .path()
            .join(K8S_CRI_CRATE)
            .join("proto")
            .join("v1.proto");
        p.is_file().then_some(p)
    })
}

/// Python stubs for CRI v1 in `dir` (generated once; `cargo info` fetches the crate source into
/// the cargo registry when it is not there yet).
pub fn cri_stubs(dir: &Path) -> Result<PathBuf> {
    let out = dir.join("cri-stubs");
    if out.join("api_pb2_grpc.py").is_file() {
        return Ok(out);
    }
    let proto = match find_cri_proto() {
        Some(p) => p,
        None => {
            run(Command::new("cargo").args(["info", "k8s-cri@0.11.0"]))?;
            find_cri_proto()
                .context("k8s-cri 0.11.0 source not in the cargo registry after `cargo info`")?
        }
    };
    std::fs::create_dir_all(&out)?;
    std::fs::copy(&proto, out.join("api.proto"))?;
    run(Command::new(PYTHON).current_dir(&out).args([
        "-m",
        "grpc_tools.protoc",
        "-I.",
        "--python_out=.",
        "--grpc_python_out=.",
        "api.proto",
    ]))?;
    Ok(out)
}

/// Builds the pause image as a docker-archive tarball in `dir`.
pub fn build_pause_image(dir: &Path) -> Result<PathBuf> {
    let rootfs = dir.join("pause-rootfs");
    std::fs::create_dir_all(rootfs.join("bin"))?;
    run(Command::new("gcc").args([
        "-static",
        "-Os",
        "-o",
        rootfs.join("pause").to_str().unwrap(),
        cri_dir().join("pause.c").to_str().unwrap(),
    ]))?;
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).context("copy busybox-static")?;
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh"))?;
    let tar = dir.join("pause.tar");
    run(Command::new(PYTHON).args([
        cri_dir().join("mkimage.py").to_str().unwrap(),
        rootfs.to_str().unwrap(),
        PAUSE_IMAGE,
        tar.to_str().unwrap(),
        "[\"/pause\"]",
    ]))?;
    Ok(tar)
}

/// The PodSandboxConfig a kubelet sends for a plain pod on the pod network.
pub fn pod_sandbox_config(ns: &str, name: &str, log_dir: &Path) -> Value {
    serde_json::json!({
        "metadata": {"name": name, "uid": format!("uid-{name}"), "namespace": ns, "attempt": 0},
        "hostname": name,
        "logDirectory": log_dir.join(name),
        "labels": {"app": name},
        "linux": {"securityContext": {"namespaceOptions": {}}}
    })
}

/// The stdout of `argv` run in the network namespace at `netns` (`iptables-nft-save`...).
pub fn in_netns_output(netns: &str, argv: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(argv)
        .output()
        .expect("nsenter");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A containerd the test started; stopped (with its pods and shims) on drop.
pub struct Containerd {
    pub dir: PathBuf,
    pub sock: PathBuf,
    stubs: PathBuf,
    child: Child,
}

impl Containerd {
    /// Starts containerd in `dir` with CNI from `cni_bin_dir`/`cni_conf_dir`, and imports the
    /// pause image.
    pub fn start(dir: &Path, cni_bin_dir: &Path, cni_conf_dir: &Path) -> Result<Self> {
        Self::start_with_env(dir, cni_bin_dir, cni_conf_dir, &[])
    }

    /// [`Containerd::start`] with extra environment for containerd, which the CNI plugins it
    /// runs inherit (libcni passes its own environment on), e.g. `FASTPATH_BPF_PIN_DIR`.
    pub fn start_with_env(
        dir: &Path,
        cni_bin_dir: &Path,
        cni_conf_dir: &Path,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let stubs = cri_stubs(dir)?;
        let image = build_pause_image(dir)?;
        let sock = dir.join("containerd.sock");
        let d = dir.display();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "info"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # no CAP_SYS_RESOURCE on these VMs: a negative oom_score_adj is refused
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
            sock = sock.display(),
            bin = cni_bin_dir.display(),
            conf = cni_conf_dir.display(),
        );
        std::fs::write(dir.join("config.toml"), config)?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new("containerd")
            .envs(env.iter().copied())
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start containerd")?;
        let me = Self {
            dir: dir.to_path_buf(),
            sock,
            stubs,
            child,
        };
        let until = Instant::now() + Duration::from_secs(20);
        while me.crictl(&["version"]).is_err() {
            if Instant::now() > until {
                bail!(
                    "containerd did not serve CRI within 20 s; log: {}",
                    me.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        me.import_image(&image)?;
        Ok(me)
    }

    /// Imports an image archive (docker-archive or OCI) into the CRI's namespace.
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        run(Command::new("ctr")
            .arg("--address")
            .arg(&self.sock)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(archive))
        .map(|_| ())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Runs one CRI call; returns its JSON answer.
    pub fn crictl(&self, args: &[&str]) -> Result<Value> {
        let out = Command::new(PYTHON)
            .env("PYTHONPATH", &self.stubs)
            .arg(cri_dir().join("crictl.py"))
            .arg(&self.sock)
            .args(args)
            .output()?;
        let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "crictl {args:?}: no JSON answer: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if !out.status.success() {
            bail!("crictl {args:?} failed: {v}");
        }
        Ok(v)
    }

    pub fn run_pod(&self, config: &Value) -> Result<String> {
        let v = self.crictl(&["runp", &config.to_string()])?;
        Ok(v["id"].as_str().context("runp gave no id")?.to_string())
    }

    pub fn inspect_pod(&self, id: &str) -> Result<Value> {
        self.crictl(&["inspectp", id])
    }

    pub fn stop_pod(&self, id: &str) -> Result<()> {
        self.crictl(&["stopp", id]).map(|_| ())
    }

    pub fn remove_pod(&self, id: &str) -> Result<()> {
        self.crictl(&["rmp", id]).map(|_| ())
    }

    /// CreateContainer in sandbox `pod` (whose config was `sandbox`); returns its id.
    pub fn create_container(&self, pod: &str, config: &Value, sandbox: &Value) -> Result<String> {
        let v = self.crictl(&["create", pod, &config.to_string(), &sandbox.to_string()])?;
        Ok(v["id"].as_str().context("create gave no id")?.to_string())
    }

    pub fn start_container(&self, id: &str) -> Result<()> {
        self.crictl(&["start", id]).map(|_| ())
    }

    /// StopContainer: the stop signal (SIGTERM), SIGKILL after `grace_s`; SIGKILL at once with 0.
    pub fn stop_container(&self, id: &str, grace_s: u64) -> Result<()> {
        self.crictl(&["stop", id, &grace_s.to_string()]).map(|_| ())
    }

    pub fn remove_container(&self, id: &str) -> Result<()> {
        self.crictl(&["rm", id]).map(|_| ())
    }

    /// ContainerStatus: `state` (CONTAINER_RUNNING, CONTAINER_EXITED...), `exitCode`, `pid`,
    /// `imageRef`, `logPath`...
    pub fn inspect_container(&self, id: &str) -> Result<Value> {
        self.crictl(&["inspect", id])
    }

    /// ExecSync: `(exit code, stdout, stderr)` of `cmd` run in the container.
    pub fn exec(&self, id: &str, cmd: &[&str], timeout_s: u64) -> Result<(i64, String, String)> {
        let argv = serde_json::to_string(cmd)?;
        let v = self.crictl(&["exec", id, &timeout_s.to_string(), &argv])?;
        Ok((
            v["exitCode"].as_i64().unwrap_or(-1),
            v["stdout"].as_str().unwrap_or_default().to_string(),
            v["stderr"].as_str().unwrap_or_default().to_string(),
        ))
    }

    /// Pids of the containerd shims serving this instance (found by our socket in their cmdline).
    fn shim_pids(&self) -> Vec<i32> {
        let needle = self.sock.to_string_lossy().to_string();
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if text.contains("containerd-shim") && text.contains(&needle) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Ok(Value::Array(pods)) = self.crictl(&["pods"]) {
            for p in pods {
                if let Some(id) = p["id"].as_str() {
                    let _ = self.stop_pod(id);
                    let _ = self.remove_pod(id);
                }
            }
        }
        // SAFETY: signalling the process we started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in self.shim_pids() {
            // SAFETY: killing a shim of our own containerd, by pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Whatever is still mounted under our root (snapshots) goes before the directory.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let prefix = self.dir.to_string_lossy().to_string();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = Command::new("umount").arg("-l").arg(m).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
