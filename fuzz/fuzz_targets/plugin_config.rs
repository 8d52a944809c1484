//! The plugin's stdin (network config with prevResult), as the container runtime sends it:
//! parsing never panics, and a parsed prevResult converts to every supported version.
#![no_main]
use fastpath_cni_plugin::{config::PluginConfig, result, version::SUPPORTED_VERSIONS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(conf) = PluginConfig::parse(data) else {
        return;
    };
    let _ = conf.pod_ips();
    for v in SUPPORTED_VERSIONS {
        let _ = result::output(conf.prev_result.as_ref(), v);
    }
});
