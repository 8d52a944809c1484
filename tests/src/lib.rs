//! Shared harness for the end-to-end tests.
//!
//! Privileged tests call [`require_privileges`] first. Outside CI a test that cannot run says so
//! and returns; with `CI=true` it fails, so CI never passes by skipping.

/// Returns `true` when the test may go on. Panics under `CI=true` when it may not.
pub fn require_privileges(test: &str) -> bool {
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
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf ")))
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
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::create_dir_all(&path).expect("create scratch bpffs dir");
        Self(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchBpffsDir {
    fn drop(&mut self) {
        // bpffs has no recursive rmdir: unlink the pins first.
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}
