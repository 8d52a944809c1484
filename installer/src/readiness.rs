//! Readiness registry: named conditions, each either met or not met with a reason. The agent
//! is ready when every registered condition is met. Whatever is not met is listed in the
//! `/readyz` body, so "not ready" always says why.
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct Readiness {
    conditions: Mutex<BTreeMap<&'static str, Option<String>>>,
    /// Extra lines for the `/readyz` body that do not affect readiness (acceleration state).
    details: Mutex<BTreeMap<&'static str, String>>,
}

impl Readiness {
    /// Adds a condition, not met until [`Readiness::set`] says so.
    pub fn register(&self, name: &'static str, why: &str) {
        self.conditions
            .lock()
            .unwrap()
            .insert(name, Some(why.to_string()));
    }

    /// Marks a condition met (`Ok`) or not (`Err(reason)`). Returns whether it changed.
    pub fn set(&self, name: &'static str, state: Result<(), &dyn std::fmt::Display>) -> bool {
        let new = state.err().map(ToString::to_string);
        let mut c = self.conditions.lock().unwrap();
        let old = c.insert(name, new.clone());
        old != Some(new)
    }

    pub fn detail(&self, name: &'static str, text: String) {
        self.details.lock().unwrap().insert(name, text);
    }

    pub fn is_ready(&self) -> bool {
        self.conditions
            .lock()
            .unwrap()
            .values()
            .all(Option::is_none)
    }

    /// The reasons for not being ready, `name: reason`.
    pub fn unmet(&self) -> Vec<String> {
        self.conditions
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(n, r)| r.as_ref().map(|r| format!("{n}: {r}")))
            .collect()
    }

    /// The `/readyz` body.
    pub fn report(&self) -> String {
        let mut s = String::new();
        let unmet = self.unmet();
        if unmet.is_empty() {
            s.push_str("ready\n");
        } else {
            s.push_str("not ready\n");
            for u in unmet {
                s.push_str(&format!("  {u}\n"));
            }
        }
        for (n, d) in self.details.lock().unwrap().iter() {
            s.push_str(&format!("{n}: {d}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_all_met() {
        let r = Readiness::default();
        assert!(r.is_ready());
        r.register("cni-config", "starting");
        r.register("binary", "starting");
        assert!(!r.is_ready());
        assert!(r.set("binary", Ok(())));
        assert!(!r.set("binary", Ok(())));
        assert!(!r.is_ready());
        r.set("cni-config", Err(&"waiting for a primary"));
        assert!(r.report().contains("cni-config: waiting for a primary"));
        r.detail("acceleration", "unavailable: x".into());
        r.set("cni-config", Ok(()));
        assert!(r.is_ready());
        assert!(r.report().starts_with("ready\n"));
        assert!(r.report().contains("acceleration: unavailable: x"));
    }
}
