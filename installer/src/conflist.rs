//! CNI network config: the plugin's entry (rendered from a tera template), reading other CNIs'
//! files the way libcni does, inserting and removing the entry, and writing JSON exactly as Go's
//! `json.MarshalIndent(v, "", "  ")` does. Pure functions only: no file system here.
use serde_json::{Map, Value};

/// The plugin's `type` (and `name`).
pub const PLUGIN_TYPE: &str = "istio-cni";

/// The built-in entry template: renders exactly Istio's entry (`createCNIConfigFile`, in its
/// struct order).
pub const DEFAULT_TEMPLATE: &str = r#"{
  "cniVersion": "0.3.1",
  "name": "istio-cni",
  "type": "istio-cni",
  "ipam": {},
  "dns": {},
  "plugin_log_level": {{ plugin_log_level | json_encode }},
  "cni_agent_run_dir": {{ cni_agent_run_dir | json_encode }},
  "ambient_enabled": {{ ambient_enabled | json_encode }},
  "enablement_selectors": [],
  "exclude_namespaces": {{ exclude_namespaces | json_encode }},
  "pod_namespace": {{ pod_namespace | json_encode }},
  "native_nftables": {{ native_nftables | json_encode }},
  "enable_ambient_detection_retry": {{ enable_ambient_detection_retry | json_encode }}
}
"#;

/// What a template can use. Each value is available under its own name and, for Istio's
/// pre-1.23 templates, under the old `__PLACEHOLDER__` name (both as a tera variable and as a
/// literal text substitution, so old templates work unchanged).
#[derive(Clone, Debug, Default)]
pub struct TemplateVars {
    pub plugin_log_level: String,
    pub cni_agent_run_dir: String,
    pub kubeconfig_filename: String,
    pub kubeconfig_filepath: String,
    pub log_uds_address: String,
    pub cni_event_address: String,
    pub cni_netns_dir: String,
    pub cni_bin_dir: String,
    pub ambient_enabled: bool,
    pub exclude_namespaces: Vec<String>,
    pub exclude_namespaces_raw: String,
    pub pod_namespace: String,
    pub native_nftables: bool,
    pub enable_ambient_detection_retry: bool,
}

impl TemplateVars {
    /// `(legacy placeholder, modern name, value)` for every variable.
    fn table(&self) -> Vec<(&'static str, &'static str, Value)> {
        let excl = if self.exclude_namespaces.is_empty() {
            Value::Null
        } else {
            Value::from(self.exclude_namespaces.clone())
        };
        vec![
            (
                "__LOG_LEVEL__",
                "plugin_log_level",
                self.plugin_log_level.clone().into(),
            ),
            (
                "__CNI_AGENT_RUN_DIR__",
                "cni_agent_run_dir",
                self.cni_agent_run_dir.clone().into(),
            ),
            (
                "__KUBECONFIG_FILENAME__",
                "kubeconfig_filename",
                self.kubeconfig_filename.clone().into(),
            ),
            (
                "__KUBECONFIG_FILEPATH__",
                "kubeconfig_filepath",
                self.kubeconfig_filepath.clone().into(),
            ),
            (
                "__LOG_UDS_ADDRESS__",
                "log_uds_address",
                self.log_uds_address.clone().into(),
            ),
            (
                "__CNI_EVENT_ADDRESS__",
                "cni_event_address",
                self.cni_event_address.clone().into(),
            ),
            (
                "__CNI_NETNS_DIR__",
                "cni_netns_dir",
                self.cni_netns_dir.clone().into(),
            ),
            (
                "__CNI_BIN_DIR__",
                "cni_bin_dir",
                self.cni_bin_dir.clone().into(),
            ),
            (
                "__AMBIENT_ENABLED__",
                "ambient_enabled",
                self.ambient_enabled.into(),
            ),
            // Old templates wrote `[ "__EXCLUDE_NAMESPACES__" ]` and Istio substituted the
            // names joined with `","`; the modern name is the list (null when empty).
            ("__EXCLUDE_NAMESPACES__", "exclude_namespaces", excl),
            (
                "__POD_NAMESPACE__",
                "pod_namespace",
                self.pod_namespace.clone().into(),
            ),
            (
                "__NATIVE_NFTABLES__",
                "native_nftables",
                self.native_nftables.into(),
            ),
            (
                "__ENABLE_AMBIENT_DETECTION_RETRY__",
                "enable_ambient_detection_retry",
                self.enable_ambient_detection_retry.into(),
            ),
        ]
    }

    fn legacy_text(&self, placeholder: &str, v: &Value) -> String {
        match (placeholder, v) {
            ("__EXCLUDE_NAMESPACES__", _) => self.exclude_namespaces.join("\",\""),
            (_, Value::String(s)) => s.clone(),
            (_, v) => v.to_string(),
        }
    }
}

/// Why the plugin config template (`origin`: where it came from) gave no usable entry.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// Tera refused it (`why`: its error and causes).
    #[error("the plugin config template ({origin}) does not render: {why}")]
    Render { origin: String, why: String },
    #[error(
        "the plugin config template ({origin}) does not render to valid JSON: {source}; rendered: {rendered}"
    )]
    NotJson {
        origin: String,
        rendered: String,
        source: serde_json::Error,
    },
    #[error(
        "the plugin config template ({origin}) must render to a JSON object; rendered: {rendered}"
    )]
    NotObject { origin: String, rendered: String },
    #[error(
        "the plugin config template ({origin}) must render an object with \"type\": \"{}\"; rendered: {rendered}",
        PLUGIN_TYPE
    )]
    NotIstioCni { origin: String, rendered: String },
}

/// Renders the entry. The result must be a JSON object with `type` `istio-cni`.
pub fn render_entry(
    template: &str,
    origin: &str,
    vars: &TemplateVars,
) -> Result<Map<String, Value>, TemplateError> {
    let mut tera = tera::Tera::default();
    let json = |v: &tera::Value, _: tera::Kwargs, _: &tera::State| {
        serde_json::to_string(v).unwrap_or_default()
    };
    tera.register_filter("json_encode", json);
    tera.register_filter("json", json);
    let mut ctx = tera::Context::new();
    let table = vars.table();
    for (legacy, modern, v) in &table {
        ctx.insert(*modern, v);
        if *legacy == "__EXCLUDE_NAMESPACES__" {
            ctx.insert(*legacy, &vars.exclude_namespaces_raw);
        } else {
            ctx.insert(*legacy, v);
        }
    }
    let mut text = tera
        .render_str(template, &ctx, false)
        .map_err(|e| TemplateError::Render {
            origin: origin.to_string(),
            why: tera_error(&e),
        })?;
    for (legacy, _, v) in &table {
        if text.contains(legacy) {
            text = text.replace(legacy, &vars.legacy_text(legacy, v));
        }
    }
    let value: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(source) => {
            return Err(TemplateError::NotJson {
                origin: origin.to_string(),
                rendered: text,
                source,
            });
        }
    };
    let Value::Object(map) = value else {
        return Err(TemplateError::NotObject {
            origin: origin.to_string(),
            rendered: text,
        });
    };
    if map.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE) {
        return Err(TemplateError::NotIstioCni {
            origin: origin.to_string(),
            rendered: text,
        });
    }
    Ok(map)
}

fn tera_error(e: &tera::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Go's `json.MarshalIndent(v, "", "  ")` plus a newline. `sorted` sorts object keys (Go
/// maps); unsorted keeps the value's order (Go structs).
pub fn to_go_json(v: &Value, sorted: bool) -> String {
    let mut out = String::new();
    write_value(&mut out, v, sorted, 0);
    out.push('\n');
    out
}

fn write_value(out: &mut String, v: &Value, sorted: bool, depth: usize) {
    let indent = |out: &mut String, d: usize| {
        out.push('\n');
        for _ in 0..d {
            out.push_str("  ");
        }
    };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&go_number(n)),
        Value::String(s) => write_go_string(out, s),
        Value::Array(a) if a.is_empty() => out.push_str("[]"),
        Value::Array(a) => {
            out.push('[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, depth + 1);
                write_value(out, item, sorted, depth + 1);
            }
            indent(out, depth);
            out.push(']');
        }
        Value::Object(m) if m.is_empty() => out.push_str("{}"),
        Value::Object(m) => {
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            if sorted {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, depth + 1);
                write_go_string(out, k);
                out.push_str(": ");
                write_value(out, item, sorted, depth + 1);
            }
            indent(out, depth);
            out.push('}');
        }
    }
}

/// Go decodes JSON numbers into float64 and prints them back: integral values without a
/// fraction, exponents as `e+21`/`e-07`. Integers that fit are printed as they are (we do not
/// lose precision where Go would).
fn go_number(n: &serde_json::Number) -> String {
    if n.is_i64() || n.is_u64() {
        return n.to_string();
    }
    let f = n.as_f64().unwrap_or(0.0);
    let abs = f.abs();
    if abs != 0.0 && !(1e-6..1e21).contains(&abs) {
        let s = format!("{f:e}");
        let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        return format!("{mant}e{sign}{digits:0>2}");
    }
    if f.fract() == 0.0 {
        format!("{f:.0}")
    } else {
        format!("{f}")
    }
}

/// Go's string encoding with HTML escaping (the default of `json.Marshal`).
fn write_go_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A CNI config file as libcni sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    /// The file's JSON object.
    pub value: Map<String, Value>,
    /// True for a single-plugin `.conf` (top-level `type`).
    pub single: bool,
}

/// The `type`s of the plugins in this config, in order.
impl NetConf {
    pub fn plugin_types(&self) -> Vec<String> {
        if self.single {
            return vec![
                self.value
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            ];
        }
        plugins(&self.value)
            .iter()
            .map(|p| {
                p.get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            })
            .collect()
    }

    /// A primary config has at least one plugin that is not ours.
    pub fn is_primary_candidate(&self) -> bool {
        self.plugin_types().iter().any(|t| t != PLUGIN_TYPE)
    }
}

fn plugins(m: &Map<String, Value>) -> Vec<&Map<String, Value>> {
    m.get("plugins")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_object).collect())
        .unwrap_or_default()
}

/// Why a file in the conf dir is not a valid CNI config (libcni would refuse it too).
#[derive(Debug, thiserror::Error)]
pub enum NetConfError {
    #[error("empty file")]
    Empty,
    #[error("invalid JSON: {source}")]
    InvalidJson { source: serde_json::Error },
    #[error("not a JSON object")]
    NotObject,
    #[error("conflist has no \"name\"")]
    NoName,
    #[error("conflist has no \"plugins\" list")]
    NoPluginList,
    #[error("conflist has no plugins")]
    NoPlugins,
    /// The plugin at `index` in the list has no `type`.
    #[error("plugin {index} has no \"type\"")]
    PluginWithoutType { index: usize },
    #[error("a .conf with no \"type\" (a conflist saved as .conf?)")]
    ConfWithoutType,
}

/// Parses a file from the conf dir as libcni's `ConfFromBytes` (`.conf`) or
/// `ConfListFromBytes` (`.conflist`) would, with the reason when it is not valid.
pub fn parse_net_conf(file_name: &str, bytes: &[u8]) -> Result<NetConf, NetConfError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(NetConfError::Empty);
    }
    let value: Value =
        serde_json::from_slice(bytes).map_err(|source| NetConfError::InvalidJson { source })?;
    let Value::Object(value) = value else {
        return Err(NetConfError::NotObject);
    };
    if file_name.ends_with(".conflist") {
        match value.get("name") {
            Some(Value::String(n)) if !n.is_empty() => {}
            _ => return Err(NetConfError::NoName),
        }
        let Some(list) = value.get("plugins").and_then(Value::as_array) else {
            return Err(NetConfError::NoPluginList);
        };
        if list.is_empty() {
            return Err(NetConfError::NoPlugins);
        }
        for (index, p) in list.iter().enumerate() {
            match p.as_object().and_then(|p| p.get("type")) {
                Some(Value::String(t)) if !t.is_empty() => {}
                _ => return Err(NetConfError::PluginWithoutType { index }),
            }
        }
        Ok(NetConf {
            value,
            single: false,
        })
    } else {
        match value.get("type") {
            Some(Value::String(t)) if !t.is_empty() => Ok(NetConf {
                value,
                single: true,
            }),
            _ => Err(NetConfError::ConfWithoutType),
        }
    }
}

/// Whether a file name is a CNI config file (libcni looks at `.conf` and `.conflist` only).
pub fn is_conf_file_name(name: &str) -> bool {
    name.ends_with(".conf") || name.ends_with(".conflist")
}

/// The entry as it goes into a list: without `cniVersion`.
pub fn list_entry(entry: &Map<String, Value>) -> Map<String, Value> {
    let mut e = entry.clone();
    e.remove("cniVersion");
    e
}

/// How the plugin's entry stands in a config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    Missing,
    /// Exactly one entry, equal to the desired one.
    Current,
    /// Present but different, or more than once.
    Stale,
}

pub fn entry_state(conf: &NetConf, desired: &Map<String, Value>) -> EntryState {
    if conf.single {
        return EntryState::Missing;
    }
    let want = list_entry(desired);
    let ours: Vec<_> = plugins(&conf.value)
        .into_iter()
        .filter(|p| p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE))
        .collect();
    match ours.as_slice() {
        [] => EntryState::Missing,
        [one] if **one == want => EntryState::Current,
        _ => EntryState::Stale,
    }
}

/// The config with the plugin's entry at the end of the chain (every earlier `istio-cni`
/// entry removed: Istio removes only the first, which left duplicates, #28258). A `.conf` is
/// wrapped into a list as Istio does.
pub fn insert_entry(conf: &NetConf, desired: &Map<String, Value>) -> Map<String, Value> {
    let entry = Value::Object(list_entry(desired));
    if conf.single {
        let mut original = conf.value.clone();
        original.remove("cniVersion");
        let mut m = Map::new();
        m.insert("cniVersion".into(), "0.3.1".into());
        m.insert("name".into(), "k8s-pod-network".into());
        m.insert(
            "plugins".into(),
            Value::Array(vec![Value::Object(original), entry]),
        );
        return m;
    }
    let (mut out, _) = remove_entry(&conf.value);
    if let Some(Value::Array(list)) = out.get_mut("plugins") {
        list.push(entry);
    }
    out
}

/// The config without any `istio-cni` entry, and whether one was there.
pub fn remove_entry(value: &Map<String, Value>) -> (Map<String, Value>, bool) {
    let mut out = value.clone();
    let mut removed = false;
    if let Some(Value::Array(list)) = out.get_mut("plugins") {
        let before = list.len();
        list.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
        removed = list.len() != before;
    }
    (out, removed)
}

/// What a rewrite of a primary config would have lost (the rewrite is refused).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MergeLossError {
    /// The single-plugin `.conf`'s plugin is not in the list, unchanged.
    #[error("the rewritten config would not carry the original plugin")]
    OriginalPlugin,
    #[error("the rewritten config would lose or change another plugin")]
    OtherPlugin,
    #[error("the rewritten config would lose or change the key {key:?}")]
    Key { key: String },
}

/// Refuses a rewrite that would lose anything of the original other than our own entries:
/// every top-level key and every other plugin must still be there, unchanged and in order.
pub fn check_preserved(old: &NetConf, new: &Map<String, Value>) -> Result<(), MergeLossError> {
    let others = |plugins: Vec<&Map<String, Value>>| -> Vec<Map<String, Value>> {
        plugins
            .into_iter()
            .filter(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE))
            .cloned()
            .collect()
    };
    let new_others = others(plugins(new));
    if old.single {
        let mut original = old.value.clone();
        original.remove("cniVersion");
        if new_others != vec![original] {
            return Err(MergeLossError::OriginalPlugin);
        }
        return Ok(());
    }
    if new_others != others(plugins(&old.value)) {
        return Err(MergeLossError::OtherPlugin);
    }
    for (k, v) in &old.value {
        if k != "plugins" && new.get(k) != Some(v) {
            return Err(MergeLossError::Key { key: k.clone() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> TemplateVars {
        TemplateVars {
            plugin_log_level: "debug".into(),
            cni_agent_run_dir: "/tmp".into(),
            kubeconfig_filename: "istio-cni-kubeconfig".into(),
            kubeconfig_filepath: "/tmp/istio-cni-kubeconfig".into(),
            log_uds_address: "/tmp/log.sock".into(),
            cni_netns_dir: "/var/run/netns".into(),
            cni_bin_dir: "/opt/cni/bin".into(),
            exclude_namespaces: vec!["istio-system".into()],
            exclude_namespaces_raw: "istio-system".into(),
            ..Default::default()
        }
    }

    /// `cni/test/testdata/expected/YYY-istio-cni.conf`.
    const STANDALONE_GOLDEN: &str = r#"{
  "cniVersion": "0.3.1",
  "name": "istio-cni",
  "type": "istio-cni",
  "ipam": {},
  "dns": {},
  "plugin_log_level": "debug",
  "cni_agent_run_dir": "/tmp",
  "ambient_enabled": false,
  "enablement_selectors": [],
  "exclude_namespaces": [
    "istio-system"
  ],
  "pod_namespace": "",
  "native_nftables": false,
  "enable_ambient_detection_retry": false
}
"#;

    #[test]
    fn default_template_renders_istios_entry() {
        let e = render_entry(DEFAULT_TEMPLATE, "built-in", &vars()).unwrap();
        assert_eq!(to_go_json(&Value::Object(e), false), STANDALONE_GOLDEN);
    }

    #[test]
    fn empty_exclude_namespaces_is_null() {
        let v = TemplateVars {
            exclude_namespaces: vec![],
            ..vars()
        };
        let e = render_entry(DEFAULT_TEMPLATE, "built-in", &v).unwrap();
        assert_eq!(e["exclude_namespaces"], Value::Null);
    }

    const LIST_INPUT: &str = r#"{
  "cniVersion": "0.4.0",
  "name": "dbnet",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "args": {"labels": {"appVersion": "1.0"}},
      "ipam": {"type": "host-local", "subnet": "10.1.0.0/16", "gateway": "10.1.0.1"},
      "dns": {"nameservers": ["10.1.0.1"]}
    },
    {"type": "tuning", "sysctl": {"net.core.somaxconn": "500"}}
  ]
}"#;

    /// `cni/pkg/install/testdata/list.conflist.golden`.
    const LIST_GOLDEN: &str = r#"{
  "cniVersion": "0.4.0",
  "name": "dbnet",
  "plugins": [
    {
      "args": {
        "labels": {
          "appVersion": "1.0"
        }
      },
      "bridge": "cni0",
      "dns": {
        "nameservers": [
          "10.1.0.1"
        ]
      },
      "ipam": {
        "gateway": "10.1.0.1",
        "subnet": "10.1.0.0/16",
        "type": "host-local"
      },
      "type": "bridge"
    },
    {
      "sysctl": {
        "net.core.somaxconn": "500"
      },
      "type": "tuning"
    },
    {
      "ambient_enabled": false,
      "cni_agent_run_dir": "/path/to/kubeconfig",
      "dns": {},
      "enable_ambient_detection_retry": false,
      "enablement_selectors": [],
      "exclude_namespaces": null,
      "ipam": {},
      "name": "istio-cni",
      "native_nftables": false,
      "plugin_log_level": "debug",
      "pod_namespace": "my-namespace",
      "type": "istio-cni"
    }
  ]
}
"#;

    fn golden_vars() -> TemplateVars {
        TemplateVars {
            cni_agent_run_dir: "/path/to/kubeconfig".into(),
            pod_namespace: "my-namespace".into(),
            exclude_namespaces: vec![],
            ..vars()
        }
    }

    #[test]
    fn insert_into_list_matches_golden() {
        let conf = parse_net_conf("list.conflist", LIST_INPUT.as_bytes()).unwrap();
        let e = render_entry(DEFAULT_TEMPLATE, "built-in", &golden_vars()).unwrap();
        assert_eq!(entry_state(&conf, &e), EntryState::Missing);
        let out = insert_entry(&conf, &e);
        check_preserved(&conf, &out).unwrap();
        assert_eq!(to_go_json(&Value::Object(out.clone()), true), LIST_GOLDEN);
        // Inserting again replaces rather than appends, and is a fixed point.
        let again = parse_net_conf("list.conflist", LIST_GOLDEN.as_bytes()).unwrap();
        assert_eq!(entry_state(&again, &e), EntryState::Current);
        assert_eq!(
            to_go_json(&Value::Object(insert_entry(&again, &e)), true),
            LIST_GOLDEN
        );
    }

    #[test]
    fn duplicates_and_stale_entries_are_replaced_by_one() {
        let mut conf = parse_net_conf("list.conflist", LIST_INPUT.as_bytes()).unwrap();
        let old = serde_json::json!({"type": "istio-cni", "log_level": "info"});
        if let Some(Value::Array(l)) = conf.value.get_mut("plugins") {
            l.insert(0, old.clone());
            l.push(old);
        }
        let e = render_entry(DEFAULT_TEMPLATE, "built-in", &golden_vars()).unwrap();
        assert_eq!(entry_state(&conf, &e), EntryState::Stale);
        let out = insert_entry(&conf, &e);
        check_preserved(&conf, &out).unwrap();
        assert_eq!(to_go_json(&Value::Object(out), true), LIST_GOLDEN);
    }

    #[test]
    fn conf_is_wrapped_as_istio_does() {
        let input = r#"{"cniVersion": "0.3.0", "name": "mynet", "type": "bridge", "bridge": "cni0",
            "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}}"#;
        let conf = parse_net_conf("bridge.conf", input.as_bytes()).unwrap();
        assert!(conf.single);
        let e = render_entry(DEFAULT_TEMPLATE, "built-in", &golden_vars()).unwrap();
        let out = insert_entry(&conf, &e);
        check_preserved(&conf, &out).unwrap();
        let text = to_go_json(&Value::Object(out), true);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["name"], "k8s-pod-network");
        assert_eq!(v["plugins"][0]["name"], "mynet");
        assert_eq!(v["plugins"][0].get("cniVersion"), None);
        assert_eq!(v["plugins"][1]["type"], "istio-cni");
        assert!(text.starts_with("{\n  \"cniVersion\": \"0.3.1\",\n  \"name\": \"k8s-pod-network\",\n  \"plugins\": [\n    {\n      \"bridge\": \"cni0\","));
    }

    #[test]
    fn errors_say_what_is_wrong_as_before() {
        let why = |name: &str, b: &str| parse_net_conf(name, b.as_bytes()).unwrap_err();
        assert!(matches!(why("a.conflist", " \n"), NetConfError::Empty));
        assert!(matches!(
            why("a.conflist", "{not json"),
            NetConfError::InvalidJson { .. }
        ));
        assert!(
            why("a.conflist", "{not json")
                .to_string()
                .starts_with("invalid JSON: ")
        );
        assert_eq!(why("a.conflist", "[]").to_string(), "not a JSON object");
        assert_eq!(
            why("a.conflist", r#"{"plugins":[]}"#).to_string(),
            "conflist has no \"name\""
        );
        assert_eq!(
            why("a.conflist", r#"{"name":"x"}"#).to_string(),
            "conflist has no \"plugins\" list"
        );
        assert_eq!(
            why("a.conflist", r#"{"name":"x","plugins":[]}"#).to_string(),
            "conflist has no plugins"
        );
        let e = why("a.conflist", r#"{"name":"x","plugins":[{"type":"a"},{}]}"#);
        assert!(matches!(e, NetConfError::PluginWithoutType { index: 1 }));
        assert_eq!(e.to_string(), "plugin 1 has no \"type\"");
        assert_eq!(
            why("a.conf", r#"{"name":"x"}"#).to_string(),
            "a .conf with no \"type\" (a conflist saved as .conf?)"
        );

        let conf = parse_net_conf(
            "l.conflist",
            br#"{"name":"x","k":1,"plugins":[{"type":"a"}]}"#,
        )
        .unwrap();
        let mut lossy = conf.value.clone();
        lossy.remove("k");
        let e = check_preserved(&conf, &lossy).unwrap_err();
        assert_eq!(e, MergeLossError::Key { key: "k".into() });
        assert_eq!(
            e.to_string(),
            "the rewritten config would lose or change the key \"k\""
        );

        let e = render_entry(r#"{"type": "bridge"}"#, "built-in", &vars()).unwrap_err();
        assert!(matches!(e, TemplateError::NotIstioCni { .. }));
        assert_eq!(
            e.to_string(),
            "the plugin config template (built-in) must render an object with \"type\": \"istio-cni\"; rendered: {\"type\": \"bridge\"}"
        );
        let e = render_entry("[1]", "built-in", &vars()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the plugin config template (built-in) must render to a JSON object; rendered: [1]"
        );
    }

    #[test]
    fn remove_leaves_the_rest() {
        let conf = parse_net_conf("list.conflist", LIST_GOLDEN.as_bytes()).unwrap();
        let (out, removed) = remove_entry(&conf.value);
        assert!(removed);
        let orig = parse_net_conf("list.conflist", LIST_INPUT.as_bytes()).unwrap();
        assert_eq!(out, orig.value);
        let (_, removed) = remove_entry(&out);
        assert!(!removed);
    }

    #[test]
    fn check_preserved_catches_loss() {
        let conf = parse_net_conf("list.conflist", LIST_INPUT.as_bytes()).unwrap();
        let mut lossy = conf.value.clone();
        if let Some(Value::Array(l)) = lossy.get_mut("plugins") {
            l.remove(1);
        }
        assert!(check_preserved(&conf, &lossy).is_err());
        let mut lossy = conf.value.clone();
        lossy.remove("cniVersion");
        assert!(check_preserved(&conf, &lossy).is_err());
    }

    #[test]
    fn libcni_validity() {
        assert!(parse_net_conf("a.conflist", b"").is_err());
        assert!(parse_net_conf("a.conflist", b"  \n").is_err());
        assert!(parse_net_conf("a.conflist", b"{not json").is_err());
        assert!(parse_net_conf("a.conflist", b"[]").is_err());
        assert!(parse_net_conf("a.conflist", br#"{"name":"x","plugins":[]}"#).is_err());
        assert!(parse_net_conf("a.conflist", br#"{"plugins":[{"type":"bridge"}]}"#).is_err());
        assert!(
            parse_net_conf("a.conf", br#"{"name":"x","plugins":[{"type":"bridge"}]}"#).is_err()
        );
        assert!(parse_net_conf("a.conf", br#"{"name":"x","type":"bridge"}"#).is_ok());
        let only_ours = parse_net_conf(
            "z.conflist",
            br#"{"name":"x","plugins":[{"type":"istio-cni"}]}"#,
        )
        .unwrap();
        assert!(!only_ours.is_primary_candidate());
    }

    #[test]
    fn go_encoding_details() {
        let v: Value = serde_json::from_str(
            r#"{"b":"<a&b>","a":1.0,"c":1e-7,"d":2.5,"e":12345678901234567890}"#,
        )
        .unwrap();
        assert_eq!(
            to_go_json(&v, true),
            "{\n  \"a\": 1,\n  \"b\": \"\\u003ca\\u0026b\\u003e\",\n  \"c\": 1e-07,\n  \"d\": 2.5,\n  \"e\": 12345678901234567890\n}\n"
        );
    }

    #[test]
    fn user_templates_modern_and_legacy() {
        let modern = r#"{"type": "istio-cni", "name": "istio-cni", "level": {{ plugin_log_level | json_encode }},
            "ns": {{ exclude_namespaces | json_encode }}, "netns": "{{ __CNI_NETNS_DIR__ }}"}"#;
        let e = render_entry(modern, "CNI_NETWORK_CONFIG", &vars()).unwrap();
        assert_eq!(e["level"], "debug");
        assert_eq!(e["ns"], serde_json::json!(["istio-system"]));
        assert_eq!(e["netns"], "/var/run/netns");
        let legacy = r#"{"cniVersion": "0.3.1", "name": "istio-cni", "type": "istio-cni",
            "log_level": "__LOG_LEVEL__", "log_uds_address": "__LOG_UDS_ADDRESS__",
            "kubernetes": {"kubeconfig": "__KUBECONFIG_FILEPATH__", "cni_bin_dir": "__CNI_BIN_DIR__",
            "exclude_namespaces": [ "__EXCLUDE_NAMESPACES__" ]}}"#;
        let v = TemplateVars {
            exclude_namespaces: vec!["istio-system".into(), "kube-system".into()],
            ..vars()
        };
        let e = render_entry(legacy, "CNI_NETWORK_CONFIG", &v).unwrap();
        assert_eq!(e["log_level"], "debug");
        assert_eq!(e["kubernetes"]["kubeconfig"], "/tmp/istio-cni-kubeconfig");
        assert_eq!(
            e["kubernetes"]["exclude_namespaces"],
            serde_json::json!(["istio-system", "kube-system"])
        );
        let err = render_entry("{{ nope }}", "CNI_NETWORK_CONFIG", &vars())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CNI_NETWORK_CONFIG") && err.contains("nope"),
            "{err}"
        );
        let err = render_entry(r#"{"type": "bridge"}"#, "CNI_NETWORK_CONFIG", &vars())
            .unwrap_err()
            .to_string();
        assert!(err.contains("istio-cni"), "{err}");
        let err = render_entry(r#"{"type": "#, "CNI_NETWORK_CONFIG", &vars())
            .unwrap_err()
            .to_string();
        assert!(err.contains("valid JSON"), "{err}");
    }
}
