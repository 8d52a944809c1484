//! The eBPF object built from `probes/` by the build script, embedded in the installer.

/// The probes' ELF object. Empty when the build ran with `AYA_BUILD_SKIP=1`.
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fastpath-probes"));

/// Whether this build carries the probes.
pub fn embedded() -> bool {
    !OBJECT.is_empty()
}
