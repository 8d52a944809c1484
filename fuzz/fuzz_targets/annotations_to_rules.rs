//! A pod as the API returns it, annotations written by its author: the redirect is built or
//! refused, never a panic, and the rules of a built one render for both families.
#![no_main]
use fastpath_cni_plugin::{pod::Pod, redirect, rules};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(pod) = Pod::from_json(data) else {
        return;
    };
    let Ok(r) = redirect::from_pod(&pod) else {
        return;
    };
    for family in [rules::Family::V4, rules::Family::V6] {
        let text = rules::restore_text(&r, family);
        let _ = rules::rule_counts(&text);
    }
});
