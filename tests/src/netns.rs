//! Named network namespaces ("pods") made with `ip netns`, deleted on drop.
use anyhow::{Context as _, Result, bail};
use std::process::{Command, Output};

pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates `/var/run/netns/<name>` with its loopback down, as a runtime does before CNI ADD.
    pub fn new(name: &str) -> Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run(Command::new("ip").args(["netns", "add", name]))?;
        Ok(Self {
            name: name.to_string(),
        })
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Runs a command inside the namespace (`ip netns exec`), returning its output.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()?;
        Ok(out)
    }

    /// Like [`Self::exec`] but fails unless the command exits 0; returns stdout.
    pub fn exec_ok(&self, argv: &[&str]) -> Result<String> {
        let out = self.exec(argv)?;
        if !out.status.success() {
            bail!(
                "in netns {}: {:?} failed: {}",
                self.name,
                argv,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs a command and fails with its stderr when it does not exit 0.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
