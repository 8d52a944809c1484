//! The plugin's kubeconfig (written by install-cni, but read from a host directory).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ =
            fastpath_cni_plugin::kube::parse_kubeconfig(text, std::path::Path::new("/nonexistent"));
    }
});
