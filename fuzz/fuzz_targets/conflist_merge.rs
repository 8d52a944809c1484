//! A primary CNI config written by another CNI: chaining the entry in keeps everything of the
//! original (the check the installer makes before it writes), and the entry is found again.
//! (Found by this target: a `.conf` whose own type is istio-cni; the installer never takes
//! one as the primary, so the property holds for primaries only.)
#![no_main]
use fastpath_installer::conflist;
use libfuzzer_sys::fuzz_target;
use serde_json::json;

fuzz_target!(|data: &[u8]| {
    for name in ["10-net.conflist", "10-net.conf"] {
        let Ok(conf) = conflist::parse_net_conf(name, data) else {
            continue;
        };
        // The installer merges only into a primary: a config with a plugin not its own (one
        // made of istio-cni entries only, e.g. a leftover standalone file, is never chosen).
        if !conf.is_primary_candidate() {
            continue;
        }
        let entry = json!({"type": "istio-cni", "kubeconfig": "/etc/cni/net.d/k"});
        let desired = entry.as_object().unwrap();
        let merged = conflist::insert_entry(&conf, desired);
        conflist::check_preserved(&conf, &merged).expect("the merge lost part of the original");
        let (_, removed) = conflist::remove_entry(&merged);
        assert!(removed, "the entry inserted is not found again");
        let _ = conflist::to_go_json(&serde_json::Value::Object(merged), true);
    }
});
