//! A container runtime's side of CNI, as libcni does it: run each plugin of a conflist with the
//! per-plugin stdin (plugin conf + `name` + `cniVersion` + `prevResult`), ADD in order, CHECK and
//! DEL with the cached result, DEL in reverse order. Used by the tests, the demo and the bench to
//! drive the real plugin binaries exactly as containerd or CRI-O would.
use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// One runtime invocation context.
#[derive(Clone, Debug)]
pub struct Runtime {
    /// Directories searched for plugin binaries, in order (`CNI_PATH`).
    pub cni_path: Vec<PathBuf>,
    /// Where results are cached between ADD and CHECK/DEL (`CNI_CACHE_DIR`).
    pub cache_dir: PathBuf,
    /// Extra environment for every plugin (e.g. `PATH`).
    pub env: Vec<(String, String)>,
}

impl Runtime {
    /// The reference plugins (`/usr/lib/cni`) and the built `istio-cni`, results cached under
    /// `cache_dir`.
    pub fn with_built_plugin(cache_dir: PathBuf, env: Vec<(String, String)>) -> Self {
        let plugin_dir = crate::bin_path("istio-cni")
            .parent()
            .expect("the plugin binary has a directory")
            .to_path_buf();
        Self {
            cni_path: vec![PathBuf::from("/usr/lib/cni"), plugin_dir],
            cache_dir,
            env,
        }
    }
}

/// A test's own CNI network: a unique bridge name and a scratch directory (IPAM, cache, API
/// state), both removed on drop.
pub struct ScratchNet {
    pub bridge: String,
    pub dir: PathBuf,
}

impl ScratchNet {
    pub fn new(prefix: &str) -> Result<Self> {
        let bridge = crate::unique_name(prefix);
        let dir = std::env::temp_dir().join(format!("fastpath-{bridge}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Self { bridge, dir })
    }
}

impl Drop for ScratchNet {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One attachment: a container's interface in a network namespace.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS`, e.g. `K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0`.
    pub args: String,
}

/// What one plugin run returned.
#[derive(Debug)]
pub struct PluginRun {
    pub plugin_type: String,
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Runtime {
    pub fn find_plugin(&self, ty: &str) -> Result<PathBuf> {
        for dir in &self.cni_path {
            let p = dir.join(ty);
            if p.is_file() {
                return Ok(p);
            }
        }
        bail!("failed to find plugin {ty:?} in path {:?}", self.cni_path)
    }

    fn cache_file(&self, net: &str, att: &Attachment) -> PathBuf {
        self.cache_dir
            .join("results")
            .join(format!("{net}-{}-{}", att.container_id, att.ifname))
    }

    /// Runs one plugin with `stdin_conf` for `command`.
    pub fn exec_plugin(&self, command: &str, conf: &Value, att: &Attachment) -> Result<PluginRun> {
        let ty = conf["type"]
            .as_str()
            .context("plugin conf has no string \"type\"")?
            .to_string();
        let bin = self.find_plugin(&ty)?;
        let path_var = std::env::join_paths(&self.cni_path)?;
        let mut cmd = Command::new(&bin);
        cmd.env_clear()
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_ARGS", &att.args)
            .env("CNI_PATH", path_var);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&serde_json::to_vec(conf)?)?;
        let out = child.wait_with_output()?;
        Ok(PluginRun {
            plugin_type: ty,
            status: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: start.elapsed(),
        })
    }

    fn plugin_conf(list: &Value, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut conf = plugin.clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        conf
    }

    /// ADD through the whole chain. Returns the final result and each plugin's run.
    pub fn add(&self, list: &Value, att: &Attachment) -> Result<(Value, Vec<PluginRun>)> {
        let net = list["name"].as_str().context("conflist has no name")?;
        let mut prev: Option<Value> = None;
        let mut runs = Vec::new();
        for plugin in list["plugins"]
            .as_array()
            .context("conflist has no plugins")?
        {
            let conf = Self::plugin_conf(list, plugin, prev.as_ref());
            let run = self.exec_plugin("ADD", &conf, att)?;
            if run.status != 0 {
                let msg = format!(
                    "plugin type={:?} failed (add): status {}: {} {}",
                    run.plugin_type, run.status, run.stdout, run.stderr
                );
                runs.push(run);
                return Err(anyhow::anyhow!(msg)).context(RunsFailed(runs));
            }
            prev = Some(serde_json::from_str(&run.stdout).with_context(|| {
                format!(
                    "plugin {} printed a result that is not JSON: {:?}",
                    run.plugin_type, run.stdout
                )
            })?);
            runs.push(run);
        }
        let result = prev.unwrap_or_else(|| json!({"cniVersion": list["cniVersion"]}));
        let cache = self.cache_file(net, att);
        std::fs::create_dir_all(cache.parent().unwrap())?;
        std::fs::write(&cache, serde_json::to_vec(&result)?)?;
        Ok((result, runs))
    }

    fn cached(&self, list: &Value, att: &Attachment) -> Option<Value> {
        let net = list["name"].as_str()?;
        let data = std::fs::read(self.cache_file(net, att)).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// CHECK through the whole chain with the cached result.
    pub fn check(&self, list: &Value, att: &Attachment) -> Result<Vec<PluginRun>> {
        let prev = self
            .cached(list, att)
            .context("no cached result for CHECK")?;
        let mut runs = Vec::new();
        for plugin in list["plugins"]
            .as_array()
            .context("conflist has no plugins")?
        {
            let run =
                self.exec_plugin("CHECK", &Self::plugin_conf(list, plugin, Some(&prev)), att)?;
            let failed = run.status != 0;
            let msg = format!(
                "plugin type={:?} failed (check): {}",
                run.plugin_type, run.stdout
            );
            runs.push(run);
            if failed {
                return Err(anyhow::anyhow!(msg)).context(RunsFailed(runs));
            }
        }
        Ok(runs)
    }

    /// DEL through the chain in reverse order; every plugin runs even if one fails.
    pub fn del(&self, list: &Value, att: &Attachment) -> Result<Vec<PluginRun>> {
        let prev = self.cached(list, att);
        let mut runs = Vec::new();
        let mut first_err = None;
        for plugin in list["plugins"]
            .as_array()
            .context("conflist has no plugins")?
            .iter()
            .rev()
        {
            let run =
                self.exec_plugin("DEL", &Self::plugin_conf(list, plugin, prev.as_ref()), att)?;
            if run.status != 0 && first_err.is_none() {
                first_err = Some(format!(
                    "plugin type={:?} failed (delete): {}",
                    run.plugin_type, run.stdout
                ));
            }
            runs.push(run);
        }
        if let Some(e) = first_err {
            return Err(anyhow::anyhow!(e)).context(RunsFailed(runs));
        }
        if let Some(net) = list["name"].as_str() {
            let _ = std::fs::remove_file(self.cache_file(net, att));
        }
        Ok(runs)
    }
}

/// Attached to an error so a test can still look at each plugin's output.
#[derive(Debug)]
pub struct RunsFailed(pub Vec<PluginRun>);

impl std::fmt::Display for RunsFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for r in &self.0 {
            writeln!(
                f,
                "{} exit {}: stdout={} stderr={}",
                r.plugin_type,
                r.status,
                r.stdout.trim(),
                r.stderr.trim()
            )?;
        }
        Ok(())
    }
}

/// Reads a conflist file.
pub fn load_conflist(path: &Path) -> Result<Value> {
    let data = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&data).with_context(|| format!("parse {}", path.display()))
}
