//! Applying the rules inside the pod's network namespace with the host's iptables binaries
//! (`sidecar_iptables_linux.go` and `tools/istio-iptables/pkg/dependencies`).
//!
//! Each child (`iptables-restore`, `iptables-save`) is forked with a small sandbox set up between fork and
//! exec, as Istio's `runInSandbox`: a private mount namespace with `/dev/null` over
//! `/etc/nsswitch.conf` (so `-m owner` lookups never go to the network, istio/istio#48416), then
//! `setns` into the pod netns. Legacy iptables takes its lock on the netns file
//! (`XTABLES_LOCKFILE`), never the host's `/run/xtables.lock`. If the sandbox cannot be set up
//! (SELinux and friends), the child runs without it, as Istio does.
use crate::config::BackendChoice;
use std::ffi::CString;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsRawFd as _, RawFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Which iptables variant runs the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
    /// Plain `iptables-restore` (whatever the host's alternatives point to).
    Default,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
            Backend::Default => "default",
        }
    }

    /// `iptables-restore`-like binary name for a family (`v6`) and verb (`restore`/`save`).
    pub fn binary(self, v6: bool, verb: &str) -> String {
        let base = if v6 { "ip6tables" } else { "iptables" };
        match self {
            Backend::Legacy => format!("{base}-legacy-{verb}"),
            Backend::Nft => format!("{base}-nft-{verb}"),
            Backend::Default => format!("{base}-{verb}"),
        }
    }
}

/// Finds a binary on `PATH` (the runtime's, i.e. the host's).
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// How [`Netns::run`] gets a thread into the netns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetnsEntry {
    /// A short-lived thread of its own enters it; the caller's thread is untouched. For
    /// long-lived, many-threaded processes (the installer's repair).
    #[default]
    OwnThread,
    /// The calling thread enters it and comes back. For the plugin, a one-shot process: a thread
    /// costs more there than the rules it writes (unmapping its stack shoots down the TLBs of
    /// every CPU it ran on: about 0.1 ms of a 1 ms ADD on this 2-CPU VM).
    CallingThread,
}

/// An open network namespace.
pub struct Netns {
    pub path: String,
    pub entry: NetnsEntry,
    file: File,
    /// The user namespace owning the netns, when it is not ours (pods with `hostUsers: false`).
    /// `-m owner` rules may only be written from inside it (the kernel's xt_owner refuses a
    /// writer from another user namespace), so children enter it too, as Istio does with
    /// `nsenter --user`.
    owner_userns: Option<File>,
}

/// `ioctl(NS_GET_USERNS)`: the user namespace that owns a namespace.
const NS_GET_USERNS: libc::c_ulong = 0xb701;

fn ns_identity(f: &File) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = f.metadata()?;
    Ok((m.dev(), m.ino()))
}

impl Netns {
    pub fn open(path: &str) -> std::io::Result<Self> {
        let file = File::open(path)?;
        Ok(Self {
            path: path.to_string(),
            entry: NetnsEntry::default(),
            owner_userns: foreign_owner_userns(&file),
            file,
        })
    }

    /// [`Netns::open`], entered the given way.
    pub fn open_with(path: &str, entry: NetnsEntry) -> std::io::Result<Self> {
        Ok(Self {
            entry,
            ..Self::open(path)?
        })
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Runs `f` on a thread that has entered this netns: its own thread or the calling thread,
    /// as [`Netns::entry`] says. Either way, the caller's thread is in its own netns afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
        if self.entry == NetnsEntry::CallingThread {
            // Without our own netns to come back to, the calling thread must not leave it.
            if let Ok(home) = File::open("/proc/thread-self/ns/net") {
                return self.run_on_calling_thread(home, f);
            }
        }
        self.run_on_own_thread(f)
    }

    fn run_on_calling_thread<T>(&self, home: File, f: impl FnOnce() -> T) -> std::io::Result<T> {
        /// Moves the thread back to its netns when `f` is done.
        struct Return(File);
        impl Drop for Return {
            fn drop(&mut self) {
                // SAFETY: setns on a valid fd we own, for the calling thread only.
                if unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    // Nothing after this may run in the pod's netns (API calls, the log
                    // socket), and the thread cannot get out: end the invocation; the runtime
                    // retries the ADD.
                    let e = std::io::Error::last_os_error();
                    eprintln!("istio-cni: returning from the pod netns to our own failed: {e}");
                    std::process::exit(1);
                }
            }
        }
        // SAFETY: setns on a valid fd we own, for the calling thread only.
        if unsafe { libc::setns(self.fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let _return = Return(home);
        Ok(f())
    }

    fn run_on_own_thread<T: Send>(&self, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
        let fd = self.fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on a valid fd we own, on this short-lived thread only.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| std::io::Error::other("netns thread panicked"))?
        })
    }

    /// Runs a host binary inside the netns (sandboxed), feeding `stdin`.
    pub fn exec(&self, mut cmd: Command, stdin: Option<&[u8]>) -> std::io::Result<ExecOutput> {
        let fd = self.fd();
        let userns_fd = self.owner_userns.as_ref().map(|f| f.as_raw_fd());
        let sandbox = Sandbox::new();
        // SAFETY: only async-signal-safe syscalls run between fork and exec; the CStrings were
        // allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                sandbox.enter();
                if let Some(u) = userns_fd
                    && libc::setns(u, libc::CLONE_NEWUSER) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if userns_fd.is_some() {
                    // Become root of the pod's user namespace (as `nsenter --user` does), or
                    // exec would drop the capabilities gained there.
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setresgid(0, 0, 0) != 0
                        || libc::setresuid(0, 0, 0) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd.spawn()?;
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A child that exits early (bad binary, usage error) closes its stdin; its exit
            // status and stderr below say why, which a broken-pipe error here would hide.
            let _ = pipe.write_all(data);
        }
        let out = child.wait_with_output()?;
        Ok(ExecOutput {
            success: out.status.success(),
            status: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: start.elapsed(),
        })
    }
}

pub struct ExecOutput {
    pub success: bool,
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// The netns' owning user namespace if it differs from the plugin's own.
fn foreign_owner_userns(netns: &File) -> Option<File> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: NS_GET_USERNS on a namespace fd returns a new fd (or -1), which we then own.
    let fd = unsafe { libc::ioctl(netns.as_raw_fd(), NS_GET_USERNS as _) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor returned by the kernel.
    let owner = unsafe { File::from_raw_fd(fd) };
    let ours = File::open("/proc/self/ns/user").ok()?;
    (ns_identity(&owner).ok()? != ns_identity(&ours).ok()?).then_some(owner)
}

/// Paths for the sandbox, prepared before fork.
#[derive(Clone)]
struct Sandbox {
    root: CString,
    dev_null: CString,
    nsswitch: Option<CString>,
}

impl Sandbox {
    fn new() -> Self {
        let nsswitch = Path::new("/etc/nsswitch.conf")
            .exists()
            .then(|| CString::new("/etc/nsswitch.conf").unwrap());
        Self {
            root: CString::new("/").unwrap(),
            dev_null: CString::new("/dev/null").unwrap(),
            nsswitch,
        }
    }

    /// Best effort: each step that fails leaves the child unsandboxed from there on.
    fn enter(&self) {
        // SAFETY: plain syscalls with valid NUL-terminated paths.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return;
            }
            if libc::mount(
                std::ptr::null(),
                self.root.as_ptr(),
                std::ptr::null(),
                libc::MS_PRIVATE | libc::MS_REC,
                std::ptr::null(),
            ) != 0
            {
                return;
            }
            if let Some(ns) = &self.nsswitch {
                libc::mount(
                    self.dev_null.as_ptr(),
                    ns.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_RDONLY,
                    std::ptr::null(),
                );
            }
        }
    }
}

/// The chosen backend's `-restore` binary is not on `PATH`.
#[derive(Debug, thiserror::Error)]
#[error("{binary} not found on PATH {path:?}")]
pub struct BackendNotFound {
    pub binary: String,
    /// `PATH` as the plugin saw it.
    pub path: String,
}

/// `<backend>-restore --noflush` did not apply the rules.
#[derive(Debug, thiserror::Error)]
pub enum RuleApplyError {
    #[error("cannot run {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("{binary} --noflush failed (exit {status}): {stderr}")]
    Failed {
        binary: String,
        status: i32,
        /// Trimmed.
        stderr: String,
    },
}

/// `<backend>-save` did not list the rules.
#[derive(Debug, thiserror::Error)]
pub enum RuleSaveError {
    #[error("cannot run {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("{binary} failed: {stderr}")]
    Failed {
        binary: String,
        /// Trimmed.
        stderr: String,
    },
}

/// Istio's choice (`DetectIptablesVersion`): legacy when this netns already holds legacy rules,
/// else nft, else the plain binary. "Holds legacy rules" is read from the netns' own
/// `/proc/net/ip{,6}_tables_names` (a legacy table exists there once anything used it) instead of
/// running `iptables-legacy-save` plus test rules: same answer, no child processes.
pub fn choose_backend(
    netns: &Netns,
    choice: BackendChoice,
    v6: bool,
) -> Result<Backend, BackendNotFound> {
    let has = |b: Backend| find_in_path(&b.binary(v6, "restore")).is_some();
    let pick = match choice {
        BackendChoice::Legacy => Backend::Legacy,
        BackendChoice::Nft => Backend::Nft,
        BackendChoice::Auto => {
            let legacy_tables = netns
                .run(|| {
                    let f = if v6 {
                        "ip6_tables_names"
                    } else {
                        "ip_tables_names"
                    };
                    std::fs::read_to_string(format!("/proc/thread-self/net/{f}"))
                        .map(|s| !s.trim().is_empty())
                        .unwrap_or(false)
                })
                .unwrap_or(false);
            if legacy_tables && has(Backend::Legacy) {
                Backend::Legacy
            } else if has(Backend::Nft) {
                Backend::Nft
            } else {
                Backend::Default
            }
        }
    };
    if has(pick) {
        Ok(pick)
    } else {
        Err(BackendNotFound {
            binary: pick.binary(v6, "restore"),
            path: std::env::var("PATH").unwrap_or_default(),
        })
    }
}

/// One `<backend>-restore --noflush` of `text` inside the netns.
pub fn restore(
    netns: &Netns,
    backend: Backend,
    v6: bool,
    text: &str,
) -> Result<Duration, RuleApplyError> {
    let bin = backend.binary(v6, "restore");
    let mut cmd = Command::new(&bin);
    cmd.arg("--noflush");
    if backend != Backend::Nft {
        // Legacy locks per netns, never the host's /run/xtables.lock (iptables >= 1.8.6), and
        // waits for that lock as Istio does (nft takes no lock; the plain binary may be either).
        cmd.env("XTABLES_LOCKFILE", &netns.path).arg("--wait=30");
    }
    let out = netns
        .exec(cmd, Some(text.as_bytes()))
        .map_err(|source| RuleApplyError::Spawn {
            binary: bin.clone(),
            source,
        })?;
    if !out.success {
        return Err(RuleApplyError::Failed {
            binary: bin,
            status: out.status,
            stderr: out.stderr.trim().to_string(),
        });
    }
    Ok(out.elapsed)
}

/// `<backend>-save` inside the netns.
pub fn save(netns: &Netns, backend: Backend, v6: bool) -> Result<String, RuleSaveError> {
    let bin = backend.binary(v6, "save");
    let out = netns
        .exec(Command::new(&bin), None)
        .map_err(|source| RuleSaveError::Spawn {
            binary: bin.clone(),
            source,
        })?;
    if !out.success {
        return Err(RuleSaveError::Failed {
            binary: bin,
            stderr: out.stderr.trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// What is missing from `saved` compared with the rules ADD applies (`expected`, from
/// `rules::rule_counts`). Istio chains must hold exactly their rules; built-in chains
/// at least the jumps ADD appended.
pub fn missing_rules(
    expected: &[(String, String, usize)],
    saved: &[(String, String, usize)],
) -> Vec<String> {
    let mut missing = Vec::new();
    for (table, chain, want) in expected {
        let have = saved
            .iter()
            .find(|(t, c, _)| t == table && c == chain)
            .map_or(0, |e| e.2);
        let ok = if chain.starts_with("ISTIO_") {
            have == *want
        } else {
            have >= *want
        };
        if !ok {
            missing.push(format!(
                "{table}/{chain}: {have} rules, expected {}{want}",
                if chain.starts_with("ISTIO_") {
                    ""
                } else {
                    "at least "
                }
            ));
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_names() {
        assert_eq!(
            Backend::Legacy.binary(false, "restore"),
            "iptables-legacy-restore"
        );
        assert_eq!(Backend::Nft.binary(true, "save"), "ip6tables-nft-save");
        assert_eq!(
            Backend::Default.binary(false, "restore"),
            "iptables-restore"
        );
    }

    #[test]
    fn check_compares_counts() {
        let saved = "# Generated by iptables-nft-save v1.8.9
*nat
:PREROUTING ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A PREROUTING -p tcp -j OTHER
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
COMMIT
";
        let got = crate::rules::rule_counts(saved);
        let want = vec![
            ("nat".to_string(), "PREROUTING".to_string(), 1),
            ("nat".to_string(), "ISTIO_INBOUND".to_string(), 1),
        ];
        assert!(missing_rules(&want, &got).is_empty());
        let want2 = vec![("nat".to_string(), "ISTIO_INBOUND".to_string(), 2)];
        assert_eq!(
            missing_rules(&want2, &got),
            vec!["nat/ISTIO_INBOUND: 1 rules, expected 2".to_string()]
        );
        let want3 = vec![("mangle".to_string(), "ISTIO_DIVERT".to_string(), 2)];
        assert_eq!(missing_rules(&want3, &got).len(), 1);
    }
}
