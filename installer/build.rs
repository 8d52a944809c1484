//! Builds the eBPF probes with the nightly toolchain (aya-build) and leaves the object in
//! OUT_DIR, where `src/probes.rs` embeds it. `AYA_BUILD_SKIP=1` skips this for machines without
//! the BPF toolchain; the embedded object is then empty and loading reports that clearly.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join("fastpath-probes");
    let probes = aya_build::Package {
        name: "fastpath-probes",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../probes"),
        ..Default::default()
    };
    aya_build::build_ebpf([probes], aya_build::Toolchain::default())?;
    if !object.exists() {
        fs::write(&object, [])?;
    }
    Ok(())
}
