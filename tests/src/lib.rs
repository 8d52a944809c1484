//! Shared harness for the end-to-end tests.
//!
//! Privileged tests call [`require_privileges`] first. Outside CI a test that cannot run says so
//! and returns; with `CI=true` it fails, so CI never passes by skipping.
pub mod cni;
pub mod cri;
pub mod daemonset;
pub mod installer;
pub mod kube_api;
pub mod manifest;
pub mod netns;
pub mod sidecar;

/// `true` when the calling test may go on: it runs as root. Under `CI=true` a test that may
/// not run fails instead of skipping. The test's name in the message is the calling
/// function's own.
#[macro_export]
macro_rules! require_privileges {
    () => {
        $crate::may_run($crate::function_name!())
    };
}

/// The name of the function this is written in (without its module path).
#[macro_export]
macro_rules! function_name {
    () => {{
        fn here() {}
        let path = ::std::any::type_name_of_val(&here);
        let path = path.strip_suffix("::here").unwrap_or(path);
        path.rsplit("::").next().unwrap_or(path)
    }};
}

/// `true` when `test` may go on; see [`require_privileges!`].
pub fn may_run(test: &str) -> bool {
    let why = missing_privilege();
    match why {
        None => true,
        Some(why) if in_ci() => panic!("{test}: cannot run in CI: {why}"),
        Some(why) => {
            eprintln!("SKIPPED {test}: {why} (would fail under CI=true)");
            false
        }
    }
}

pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

fn missing_privilege() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)".into());
    }
    None
}

/// Mounts bpffs at /sys/fs/bpf when it is not mounted (as the installer does).
pub fn ensure_bpffs() {
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
        })
        .unwrap_or(false);
    if !mounted {
        let st = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .expect("run mount");
        assert!(st.success(), "mount -t bpf bpf /sys/fs/bpf failed");
    }
}

/// A directory under /sys/fs/bpf, unique to one test, removed with everything in it on drop.
pub struct ScratchBpffsDir(std::path::PathBuf);

impl ScratchBpffsDir {
    pub fn new(tag: &str) -> Self {
        let path = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/fastpath-test-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&path).expect("create scratch bpffs dir");
        Self(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

/// What a test that runs an agent with acceleration on holds: the node's sock_ops lock (one
/// accelerator at a time) and a scratch pin directory on bpffs (`dir`), unpinned on drop.
pub struct AgentPins {
    pub dir: std::path::PathBuf,
    _pins: ScratchBpffsDir,
    _lock: std::fs::File,
}

impl AgentPins {
    pub fn new(tag: &str) -> Self {
        let lock = serial_guard("cgroup-sockops");
        ensure_bpffs();
        let pins = ScratchBpffsDir::new(tag);
        Self {
            dir: pins.path().join("fastpath"),
            _pins: pins,
            _lock: lock,
        }
    }
}

impl Drop for ScratchBpffsDir {
    /// Unpins everything below, subdirectories included (a pin directory an installer made in
    /// it): a test that fails half-way must not leave programs attached to the node's root
    /// cgroup and tracepoints for every later test and benchmark.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Serialises tests that share a node-wide resource (the root cgroup's sock_ops attachment,
/// host iptables, a containerd instance) across test binaries, which cargo runs one after the
/// other but whose tests run on parallel threads. Hold the guard for the test's duration.
pub fn serial_guard(resource: &str) -> std::fs::File {
    use std::os::fd::AsRawFd as _;
    let path = format!("/tmp/fastpath-test-{resource}.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .expect("open lock file");
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {path}");
    f
}

/// A name unique to this process and call, for netns, bridges, containers.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Path of a binary built by this workspace (`istio-cni`, `install-cni`, `cnirun`), next to the
/// test executable's `deps/` directory. `cargo test` at the workspace root builds them all.
pub fn bin_path(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is not built; run the tests from the workspace root with `cargo test`",
        p.display()
    );
    p
}

pub mod accel;
pub mod mesh;
pub mod stress;

#[cfg(test)]
mod tests {
    #[test]
    fn a_test_is_named_after_its_function() {
        assert_eq!(function_name!(), "a_test_is_named_after_its_function");
    }
}
