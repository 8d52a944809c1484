//! Builds the eBPF probes with the nightly toolchain (aya-build) and leaves the object in
//! OUT_DIR, where `src/probes.rs` embeds it. `AYA_BUILD_SKIP=1` skips this for machines without
//! the BPF toolchain; the embedded object is then empty and loading reports that clearly.
//!
//! aya-build passes every line of the nested cargo build (its progress included) to cargo as a
//! `cargo:warning`, so each build of this crate printed a screen of warnings and real ones
//! drowned. Its output is caught here: the nested build's progress lines are shown only when it
//! fails; compiler diagnostics and every other cargo directive pass through.
use std::{
    env, fs,
    io::Write as _,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join("fastpath-probes");
    let probes = aya_build::Package {
        name: "fastpath-probes",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../probes"),
        ..Default::default()
    };
    let caught = out_dir.join("probe-build.log");
    let built = with_stdout_in(&caught, || {
        aya_build::build_ebpf([probes], aya_build::Toolchain::default())
    })?;
    let output = fs::read_to_string(&caught)?;
    for line in output.lines() {
        if built.is_err() || !is_progress(line) {
            println!("{line}");
        }
    }
    built?;
    if !object.exists() {
        fs::write(&object, [])?;
    }
    Ok(())
}

/// A status line of the nested cargo build ("Compiling …", "Finished …"), as aya-build
/// passes it on.
fn is_progress(line: &str) -> bool {
    const STATUS: [&str; 11] = [
        "Compiling",
        "Finished",
        "Fresh",
        "Running",
        "Blocking",
        "Updating",
        "Locking",
        "Downloading",
        "Downloaded",
        "Adding",
        "Checking",
    ];
    line.strip_prefix("cargo:warning=")
        .map(str::trim_start)
        .is_some_and(|rest| STATUS.iter().any(|s| rest.starts_with(s)))
}

/// Runs `f` with this process's stdout (where cargo reads a build script's directives)
/// redirected into the file `to`.
fn with_stdout_in<T>(to: &std::path::Path, f: impl FnOnce() -> T) -> anyhow::Result<T> {
    let file = fs::File::create(to)?;
    std::io::stdout().flush()?;
    // SAFETY: dup/dup2 on fd 1 and on a file we own; the saved copy is owned and closed below.
    let saved = unsafe {
        let fd = libc::dup(1);
        anyhow::ensure!(fd >= 0, "dup(stdout): {}", std::io::Error::last_os_error());
        OwnedFd::from_raw_fd(fd)
    };
    anyhow::ensure!(
        unsafe { libc::dup2(file.as_raw_fd(), 1) } >= 0,
        "dup2(stdout): {}",
        std::io::Error::last_os_error()
    );
    let result = f();
    std::io::stdout().flush()?;
    anyhow::ensure!(
        unsafe { libc::dup2(saved.as_raw_fd(), 1) } >= 0,
        "dup2(stdout) back: {}",
        std::io::Error::last_os_error()
    );
    Ok(result)
}
