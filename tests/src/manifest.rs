//! The shipped manifests (`manifests/*.yaml`), read as a cluster would take them: every YAML
//! document an object, as JSON values.
use serde_json::Value;
use std::path::{Path, PathBuf};

pub fn manifest_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests")
        .join(name)
}

/// The objects of one manifest file (empty documents left out).
pub fn objects(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(manifest_path(name)).unwrap();
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{name} is not YAML: {e}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// The object of this kind and name.
pub fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The first container of a DaemonSet's pod template.
pub fn container(ds: &Value) -> &Value {
    &ds["spec"]["template"]["spec"]["containers"][0]
}
