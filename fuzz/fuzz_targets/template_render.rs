//! The plugin config template (CNI_NETWORK_CONFIG or a mounted file): rendered or refused with
//! a message, never a panic.
#![no_main]
use fastpath_installer::conflist::{TemplateVars, render_entry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(template) = std::str::from_utf8(data) else {
        return;
    };
    let vars = TemplateVars {
        exclude_namespaces: vec!["kube-system".into()],
        exclude_namespaces_raw: "kube-system".into(),
        ..TemplateVars::default()
    };
    let _ = render_entry(template, "fuzz", &vars);
});
