//! `REPAIR_LABEL_SELECTORS` and `REPAIR_FIELD_SELECTORS`, evaluated on the pods of the node's
//! shared watch ([`crate::pod_watch`], which selects `spec.nodeName` only) the way the API
//! server evaluates them on a list or watch: labels as `labels.Parse` reads them (`k`, `!k`,
//! `k=v`, `k==v`, `k!=v`, `k in (..)`, `k notin (..)`, `k>n`, `k<n`), fields as
//! `fields.ParseSelector` reads them (`f=v`, `f==v`, `f!=v`) over the pod fields the API server
//! can select on. What the server would refuse is refused when the controller starts.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

/// One requirement of a label selector (the test suite's fake API server evaluates its
/// watches' label selectors with it too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
    Gt(String, i64),
    Lt(String, i64),
}

/// One term of a field selector: the field, equal (or not), the value.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FieldReq {
    field: String,
    equal: bool,
    value: String,
}

/// The repair controller's own narrowing of the node's pods; empty selects all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodSelector {
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

/// The pod fields the API server selects on (`PodToSelectableFields`).
const POD_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
];

/// The value of a selectable field; absent fields are "" (and `spec.hostNetwork` "false").
fn pod_field(pod: &Pod, field: &str) -> String {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let text = |v: Option<&String>| v.cloned().unwrap_or_default();
    match field {
        "metadata.name" => text(pod.metadata.name.as_ref()),
        "metadata.namespace" => text(pod.metadata.namespace.as_ref()),
        "spec.nodeName" => text(spec.and_then(|s| s.node_name.as_ref())),
        "spec.restartPolicy" => text(spec.and_then(|s| s.restart_policy.as_ref())),
        "spec.schedulerName" => text(spec.and_then(|s| s.scheduler_name.as_ref())),
        "spec.serviceAccountName" => text(spec.and_then(|s| s.service_account_name.as_ref())),
        "spec.hostNetwork" => spec
            .and_then(|s| s.host_network)
            .unwrap_or(false)
            .to_string(),
        "status.phase" => text(status.and_then(|s| s.phase.as_ref())),
        "status.podIP" => text(status.and_then(|s| s.pod_ip.as_ref())),
        "status.nominatedNodeName" => text(status.and_then(|s| s.nominated_node_name.as_ref())),
        _ => String::new(),
    }
}

/// Splits `s` at the commas outside parentheses (`a in (x,y),b`).
pub fn split_terms(s: &str) -> Vec<&str> {
    let (mut terms, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    terms
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

/// A term of `REPAIR_LABEL_SELECTORS` or `REPAIR_FIELD_SELECTORS` that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("REPAIR_LABEL_SELECTORS: cannot parse requirement {term:?}")]
    Label { term: String },
    #[error("REPAIR_FIELD_SELECTORS: cannot parse {term:?} (field=value or field!=value)")]
    FieldSyntax { term: String },
    /// A field the API server cannot select pods on.
    #[error(
        "REPAIR_FIELD_SELECTORS: the API server cannot select pods on field {field:?} (it can on {})",
        POD_FIELDS.join(", ")
    )]
    FieldUnselectable { field: String },
}

fn parse_label(term: &str) -> Result<LabelReq, SelectorError> {
    LabelReq::parse(term).ok_or_else(|| SelectorError::Label {
        term: term.to_string(),
    })
}

impl LabelReq {
    /// One term of a label selector as `labels.Parse` reads it; `None` when it cannot.
    pub fn parse(term: &str) -> Option<LabelReq> {
        parse_label_term(term)
    }

    /// Whether a pod whose labels `label` looks up meets this requirement.
    pub fn holds<'a>(&self, label: impl Fn(&str) -> Option<&'a str>) -> bool {
        let int = |k: &str| label(k).and_then(|v| v.parse::<i64>().ok());
        match self {
            LabelReq::Eq(k, v) => label(k) == Some(v.as_str()),
            LabelReq::Ne(k, v) => label(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
            LabelReq::Gt(k, n) => int(k).is_some_and(|v| v > *n),
            LabelReq::Lt(k, n) => int(k).is_some_and(|v| v < *n),
        }
    }
}

fn parse_label_term(term: &str) -> Option<LabelReq> {
    let set = |s: &str| -> Option<Vec<String>> {
        let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
        Some(inner.split(',').map(|v| v.trim().to_string()).collect())
    };
    let key = |s: &str| -> Option<String> {
        let k = s.trim();
        let bad = k.is_empty() || k.contains([' ', '(', ')', '=', '!', '<', '>']);
        (!bad).then(|| k.to_string())
    };
    let int = |s: &str| s.trim().parse::<i64>().ok();
    Some(if let Some(k) = term.strip_prefix('!') {
        LabelReq::NotExists(key(k)?)
    } else if let Some((k, v)) = term.split_once(" notin ") {
        LabelReq::NotIn(key(k)?, set(v)?)
    } else if let Some((k, v)) = term.split_once(" in ") {
        LabelReq::In(key(k)?, set(v)?)
    } else if let Some((k, v)) = term.split_once("!=") {
        LabelReq::Ne(key(k)?, v.trim().to_string())
    } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        LabelReq::Eq(key(k)?, v.trim().to_string())
    } else if let Some((k, v)) = term.split_once('>') {
        LabelReq::Gt(key(k)?, int(v)?)
    } else if let Some((k, v)) = term.split_once('<') {
        LabelReq::Lt(key(k)?, int(v)?)
    } else {
        LabelReq::Exists(key(term)?)
    })
}

fn parse_field(term: &str) -> Result<FieldReq, SelectorError> {
    let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
        (f, false, v)
    } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        (f, true, v)
    } else {
        return Err(SelectorError::FieldSyntax {
            term: term.to_string(),
        });
    };
    let field = field.trim();
    if !POD_FIELDS.contains(&field) {
        return Err(SelectorError::FieldUnselectable {
            field: field.to_string(),
        });
    }
    Ok(FieldReq {
        field: field.to_string(),
        equal,
        value: value.trim().to_string(),
    })
}

impl PodSelector {
    /// `labels` (`REPAIR_LABEL_SELECTORS`) and `fields` (`REPAIR_FIELD_SELECTORS`); errors name
    /// the setting and the term.
    pub fn parse(labels: &str, fields: &str) -> Result<Self, SelectorError> {
        Ok(Self {
            labels: split_terms(labels)
                .into_iter()
                .map(parse_label)
                .collect::<Result<_, _>>()?,
            fields: split_terms(fields)
                .into_iter()
                .map(parse_field)
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn matches(&self, pod: &Pod) -> bool {
        let empty = BTreeMap::new();
        let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
        let labels_hold = self
            .labels
            .iter()
            .all(|req| req.holds(|k| labels.get(k).map(String::as_str)));
        labels_hold
            && self
                .fields
                .iter()
                .all(|f| (pod_field(pod, &f.field) == f.value) == f.equal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: serde_json::Value, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "labels": labels},
            "spec": {"containers": [], "nodeName": "n1"},
            "status": {"phase": phase}
        }))
        .unwrap()
    }

    #[test]
    fn an_empty_selector_selects_every_pod() {
        let s = PodSelector::parse("", " ").unwrap();
        assert_eq!(s, PodSelector::default());
        assert!(s.matches(&pod(json!({}), "Running")));
    }

    #[test]
    fn labels_are_read_as_the_api_server_reads_them() {
        let p = pod(json!({"app": "web", "tier": "3"}), "Running");
        let holds = |sel: &str| PodSelector::parse(sel, "").unwrap().matches(&p);
        assert!(holds("app=web"));
        assert!(holds("app==web,tier"));
        assert!(!holds("app!=web"));
        assert!(holds("app in (api, web)"));
        assert!(!holds("app notin (api,web)"));
        assert!(holds("env notin (prod)"), "absent: not in");
        assert!(holds("!env"));
        assert!(!holds("!app"));
        assert!(holds("tier>2") && !holds("tier<3"));
        assert!(!holds("env>1"), "absent: never greater");
        for bad in ["app in web", "a b", "x>y", "=web"] {
            let e = PodSelector::parse(bad, "").unwrap_err().to_string();
            assert!(
                e.contains("REPAIR_LABEL_SELECTORS") && e.contains(bad),
                "{e}"
            );
        }
    }

    #[test]
    fn fields_are_the_pod_fields_the_api_server_selects_on() {
        let p = pod(json!({}), "Pending");
        let holds = |sel: &str| PodSelector::parse("", sel).unwrap().matches(&p);
        assert!(holds("status.phase!=Succeeded,status.phase!=Failed"));
        assert!(!holds("status.phase=Running"));
        assert!(holds("metadata.namespace==shop,spec.nodeName=n1"));
        assert!(holds("spec.hostNetwork=false"));
        assert!(holds("status.podIP="), "an absent field is empty");
        let e = PodSelector::parse("", "spec.containers=x").unwrap_err();
        assert_eq!(
            e,
            SelectorError::FieldUnselectable {
                field: "spec.containers".into()
            }
        );
        let e = e.to_string();
        assert!(e.contains("\"spec.containers\""), "{e}");
        let e = PodSelector::parse("", "status.phase").unwrap_err();
        assert!(matches!(e, SelectorError::FieldSyntax { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "REPAIR_FIELD_SELECTORS: cannot parse \"status.phase\" (field=value or field!=value)"
        );
    }
}
