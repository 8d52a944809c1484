//! The result a chained plugin prints: the `prevResult` it was given, passed through with all
//! its content (fields this plugin does not know included), converted only when the config's
//! `cniVersion` uses a different result layout than the `prevResult` (SPEC.md "Chained plugins"
//! and containernetworking/cni `types/*/convert`).
use crate::skel::{CniError, code};
use crate::version::{ResultFormat, SpecVersion};
use serde_json::{Map, Value, json};
use std::net::IpAddr;

/// The result to print for `conf_version`: `prev` converted, or an empty result.
pub fn output(prev: Option<&Value>, conf_version: SpecVersion) -> Result<Value, CniError> {
    match prev {
        None | Some(Value::Null) => Ok(json!({"cniVersion": conf_version.to_string()})),
        Some(p) => convert(p, conf_version),
    }
}

/// Converts a result to the layout of `to`, keeping every field that has a place there.
pub fn convert(prev: &Value, to: SpecVersion) -> Result<Value, CniError> {
    let Value::Object(obj) = prev else {
        return Err(CniError::new(
            code::DECODING_FAILURE,
            "prevResult is not a JSON object",
            prev.to_string(),
        ));
    };
    let from = match obj.get("cniVersion").and_then(Value::as_str) {
        Some(s) if !s.is_empty() => SpecVersion::parse(s).map_err(|e| {
            CniError::new(
                code::DECODING_FAILURE,
                "prevResult has an invalid cniVersion",
                e.to_string(),
            )
        })?,
        // A prevResult without a version is read in the config's version (as libcni does).
        _ => to,
    };
    let mut out = obj.clone();
    match (from.result_format(), to.result_format()) {
        (a, b) if a == b => {}
        (ResultFormat::V04, ResultFormat::V1) => for_each_ip(&mut out, |ip| {
            ip.remove("version");
        }),
        (ResultFormat::V1, ResultFormat::V04) => for_each_ip(&mut out, |ip| {
            if let Some(v) = ip_family(ip) {
                ip.insert("version".into(), Value::String(v.into()));
            }
        }),
        (ResultFormat::V02, target) => from_v02(&mut out, target),
        (_, ResultFormat::V02) => to_v02(&mut out)?,
        _ => unreachable!("all format pairs are handled"),
    }
    if from != to {
        out.insert("cniVersion".into(), Value::String(to.to_string()));
    }
    Ok(Value::Object(out))
}

fn for_each_ip(obj: &mut Map<String, Value>, mut f: impl FnMut(&mut Map<String, Value>)) {
    if let Some(Value::Array(ips)) = obj.get_mut("ips") {
        for ip in ips.iter_mut() {
            if let Value::Object(m) = ip {
                f(m);
            }
        }
    }
}

fn address_ip(addr: &str) -> Option<IpAddr> {
    addr.split('/').next()?.parse().ok()
}

/// "4" or "6" for an `ips` entry, from its `address`.
fn ip_family(ip: &Map<String, Value>) -> Option<&'static str> {
    match address_ip(ip.get("address")?.as_str()?)? {
        IpAddr::V4(_) => Some("4"),
        IpAddr::V6(_) => Some("6"),
    }
}

/// 0.1/0.2 `ip4`/`ip6` objects to `ips` + `routes`.
fn from_v02(obj: &mut Map<String, Value>, target: ResultFormat) {
    let mut ips = Vec::new();
    let mut routes = Vec::new();
    for (key, family) in [("ip4", "4"), ("ip6", "6")] {
        let Some(Value::Object(old)) = obj.remove(key) else {
            continue;
        };
        let mut ip = Map::new();
        if target == ResultFormat::V04 {
            ip.insert("version".into(), Value::String(family.into()));
        }
        if let Some(a) = old.get("ip") {
            ip.insert("address".into(), a.clone());
        }
        if let Some(g) = old.get("gateway") {
            ip.insert("gateway".into(), g.clone());
        }
        ips.push(Value::Object(ip));
        if let Some(Value::Array(r)) = old.get("routes") {
            routes.extend(r.iter().cloned());
        }
    }
    if !ips.is_empty() {
        obj.insert("ips".into(), Value::Array(ips));
    }
    if !routes.is_empty() {
        obj.insert("routes".into(), Value::Array(routes));
    }
}

/// `ips` + `routes` to the 0.1/0.2 `ip4`/`ip6` objects (first address of each family).
fn to_v02(obj: &mut Map<String, Value>) -> Result<(), CniError> {
    let ips = match obj.remove("ips") {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    };
    let routes = match obj.remove("routes") {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    };
    obj.remove("interfaces");
    for (key, want_v4) in [("ip4", true), ("ip6", false)] {
        let Some(ip) = ips.iter().find_map(|ip| {
            let m = ip.as_object()?;
            let a = address_ip(m.get("address")?.as_str()?)?;
            (a.is_ipv4() == want_v4).then_some(m)
        }) else {
            continue;
        };
        let mut old = Map::new();
        old.insert("ip".into(), ip["address"].clone());
        if let Some(g) = ip.get("gateway") {
            old.insert("gateway".into(), g.clone());
        }
        let fam_routes: Vec<Value> = routes
            .iter()
            .filter(|r| {
                r.get("dst")
                    .and_then(Value::as_str)
                    .and_then(address_ip)
                    .is_some_and(|a| a.is_ipv4() == want_v4)
            })
            .cloned()
            .collect();
        if !fam_routes.is_empty() {
            old.insert("routes".into(), Value::Array(fam_routes));
        }
        obj.insert(key.into(), Value::Object(old));
    }
    Ok(())
}

/// The pod's addresses in a result of any layout, in order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PodIps {
    pub ips: Vec<IpAddr>,
    /// Address entries that are not addresses, as they were written (for the log: the
    /// previous plugin wrote them, and they are left out).
    pub unparsable: Vec<String>,
}

pub fn pod_ips(result: &Value) -> PodIps {
    let mut out = PodIps::default();
    let mut take = |v: &Value| match v.as_str().and_then(address_ip) {
        Some(a) => out.ips.push(a),
        None => out.unparsable.push(v.to_string()),
    };
    if let Some(ips) = result.get("ips").and_then(Value::as_array) {
        for ip in ips {
            take(ip.get("address").unwrap_or(&Value::Null));
        }
    }
    for key in ["ip4", "ip6"] {
        if let Some(a) = result.get(key).and_then(|o| o.get("ip")) {
            take(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> SpecVersion {
        SpecVersion::parse(s).unwrap()
    }

    fn v1_result() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/var/run/netns/x", "vendorThing": 7}],
            "ips": [
                {"interface": 0, "address": "10.248.0.5/24", "gateway": "10.248.0.1"},
                {"interface": 0, "address": "fd00::5/64"}
            ],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fd00::1"}],
            "dns": {"nameservers": ["10.96.0.10"]},
            "x-unknown": {"kept": true}
        })
    }

    #[test]
    fn same_version_passes_through_untouched() {
        let r = v1_result();
        assert_eq!(convert(&r, v("1.0.0")).unwrap(), r);
        let r040 = json!({"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.0.0.2/24"}], "extra": [1]});
        assert_eq!(convert(&r040, v("0.4.0")).unwrap(), r040);
    }

    #[test]
    fn same_layout_only_relabels_version() {
        let out = convert(&v1_result(), v("1.1.0")).unwrap();
        let mut want = v1_result();
        want["cniVersion"] = json!("1.1.0");
        assert_eq!(out, want);
        let r = json!({"cniVersion": "0.3.0", "ips": [{"version": "4", "address": "10.0.0.2/24"}]});
        assert_eq!(convert(&r, v("0.4.0")).unwrap()["cniVersion"], "0.4.0");
    }

    #[test]
    fn v1_to_040_adds_ip_versions_and_keeps_unknown_fields() {
        let out = convert(&v1_result(), v("0.4.0")).unwrap();
        assert_eq!(out["cniVersion"], "0.4.0");
        assert_eq!(out["ips"][0]["version"], "4");
        assert_eq!(out["ips"][1]["version"], "6");
        assert_eq!(out["x-unknown"], json!({"kept": true}));
        assert_eq!(out["interfaces"][0]["vendorThing"], 7);
        // and back again
        assert_eq!(convert(&out, v("1.0.0")).unwrap(), v1_result());
    }

    #[test]
    fn v1_to_020_and_back() {
        let out = convert(&v1_result(), v("0.2.0")).unwrap();
        assert_eq!(
            out,
            json!({
                "cniVersion": "0.2.0",
                "ip4": {"ip": "10.248.0.5/24", "gateway": "10.248.0.1", "routes": [{"dst": "0.0.0.0/0"}]},
                "ip6": {"ip": "fd00::5/64", "routes": [{"dst": "::/0", "gw": "fd00::1"}]},
                "dns": {"nameservers": ["10.96.0.10"]},
                "x-unknown": {"kept": true}
            })
        );
        let back = convert(&out, v("0.3.1")).unwrap();
        assert_eq!(back["cniVersion"], "0.3.1");
        assert_eq!(
            back["ips"],
            json!([{"version": "4", "address": "10.248.0.5/24", "gateway": "10.248.0.1"},
                   {"version": "6", "address": "fd00::5/64"}])
        );
        assert_eq!(back["routes"].as_array().unwrap().len(), 2);
        assert_eq!(back["dns"], json!({"nameservers": ["10.96.0.10"]}));
        let v1 = convert(&out, v("1.0.0")).unwrap();
        assert!(v1["ips"][0].get("version").is_none());
    }

    #[test]
    fn prev_result_without_version_is_read_in_config_version() {
        let r = json!({"ips": [{"address": "10.0.0.2/24"}]});
        assert_eq!(convert(&r, v("1.0.0")).unwrap(), r);
    }

    #[test]
    fn no_prev_result_gives_empty_result() {
        assert_eq!(
            output(None, v("0.3.1")).unwrap(),
            json!({"cniVersion": "0.3.1"})
        );
    }

    #[test]
    fn bad_prev_result_is_decoding_error() {
        assert_eq!(convert(&json!([1]), v("1.0.0")).unwrap_err().code, 6);
        assert_eq!(
            convert(&json!({"cniVersion": "x"}), v("1.0.0"))
                .unwrap_err()
                .code,
            6
        );
    }

    #[test]
    fn pod_ips_of_each_layout() {
        assert_eq!(
            pod_ips(&v1_result()).ips,
            vec![
                "10.248.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        let old = json!({"ip4": {"ip": "10.1.2.3/16"}});
        assert_eq!(
            pod_ips(&old).ips,
            vec!["10.1.2.3".parse::<IpAddr>().unwrap()]
        );
        let odd = serde_json::json!({"ips": [{"address": "10.1.2.4/24"}, {"address": "not-an-ip/24"}, {}], "ip4": {"ip": 7}});
        let got = pod_ips(&odd);
        assert_eq!(got.ips, vec!["10.1.2.4".parse::<IpAddr>().unwrap()]);
        assert_eq!(got.unparsable, vec!["\"not-an-ip/24\"", "null", "7"]);
    }
}
