//! The node-local pod cache: install-cni watches the pods of its node and answers the plugin's
//! "which pod is this?" over a root-only unix socket in the agent's run directory, so a pod ADD
//! makes no API call when the agent is healthy. This module is the protocol both sides share
//! and the plugin's client; the agent's side is `fastpath_installer::pod_cache`.
//!
//! One connection, one question: the client writes one [`PodQuery`] as a JSON line, the agent
//! answers one [`PodAnswer`] as a JSON line and closes. A plugin that gets no answer in
//! [`CLIENT_TIMEOUT`] (no agent, an agent that is slow or restarting, a pod the watch has not
//! seen yet) asks the API server as it would without the cache.
use serde::{Deserialize, Serialize};
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The socket, under the agent's run directory (`cni_agent_run_dir`).
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("fastpath").join("pod-cache.sock")
}

/// How long the agent waits for a pod its watch has not delivered yet. A pod's ADD runs after
/// the pod was bound to the node, which the watch usually shows within milliseconds; a pod still
/// missing after this is asked of the API server directly.
pub const AGENT_WAIT: Duration = Duration::from_millis(500);

/// How long the plugin waits for the agent's answer: the agent's wait and room to answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_millis(750);

/// The longest answer the plugin reads (a pod object; the API's own limit for an object is
/// 1.5 MiB of etcd value, and annotations are at most 256 KiB).
pub const MAX_ANSWER_BYTES: u64 = 4 << 20;

/// The longest question the agent reads.
pub const MAX_QUERY_BYTES: u64 = 1024;

/// Which pod the plugin asks for: CNI_ARGS' `K8S_POD_NAMESPACE`, `K8S_POD_NAME` and, when the
/// runtime passes it, `K8S_POD_UID` (then only that very pod is an answer, never an older pod
/// of the same name still in the cache).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodQuery {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodAnswer {
    /// The pod, as the API server serves it (`GET /api/v1/namespaces/{ns}/pods/{name}`).
    Pod(serde_json::Value),
    /// Not in the cache (within the agent's wait), or the question was not valid: why.
    Miss(String),
}

/// How much of the answer the first read takes.
const ANSWER_READ_HINT: usize = 16 << 10;

/// A [`PodAnswer`] whose pod stays JSON text.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawAnswer<'a> {
    #[serde(borrow)]
    Pod(&'a serde_json::value::RawValue),
    #[allow(dead_code)]
    Miss(serde::de::IgnoredAny),
}

/// The part of a pod [`answers`] looks at.
#[derive(Deserialize)]
struct RawPodMeta {
    #[serde(default)]
    metadata: serde_json::Value,
}

/// Why the cache gave no pod.
#[derive(Debug)]
pub enum CacheMiss {
    /// No agent listens (no socket, refused), or it did not answer in time.
    Unreachable(String),
    /// The agent answered that it does not have the pod.
    NotCached(String),
    /// The answer was not one of [`PodAnswer`].
    BadAnswer(String),
}

impl std::fmt::Display for CacheMiss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheMiss::Unreachable(e) => write!(f, "the agent's pod cache is not reachable: {e}"),
            CacheMiss::NotCached(why) => write!(f, "not in the agent's pod cache: {why}"),
            CacheMiss::BadAnswer(e) => write!(f, "the agent's pod cache answered badly: {e}"),
        }
    }
}

/// Asks the agent at `socket` for the pod; its JSON (as the API serves it) on a hit.
pub fn ask(socket: &Path, query: &PodQuery, timeout: Duration) -> Result<Vec<u8>, CacheMiss> {
    let unreachable =
        |e: std::io::Error| CacheMiss::Unreachable(format!("{}: {e}", socket.display()));
    let mut s = UnixStream::connect(socket).map_err(unreachable)?;
    s.set_read_timeout(Some(timeout)).map_err(unreachable)?;
    s.set_write_timeout(Some(timeout)).map_err(unreachable)?;
    let mut line = serde_json::to_vec(query).map_err(|e| CacheMiss::BadAnswer(e.to_string()))?;
    line.push(b'\n');
    s.write_all(&line).map_err(unreachable)?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    // Room for a typical pod in one read.
    let mut answer = Vec::with_capacity(ANSWER_READ_HINT);
    s.take(MAX_ANSWER_BYTES + 1)
        .read_to_end(&mut answer)
        .map_err(unreachable)?;
    if answer.len() as u64 > MAX_ANSWER_BYTES {
        return Err(CacheMiss::BadAnswer(format!(
            "longer than {MAX_ANSWER_BYTES} bytes"
        )));
    }
    // A hit is the pod's own JSON text, handed on as it came (no parse into a `Value` and back);
    // anything else is decoded as before, for the same outcome and messages.
    if let Ok(RawAnswer::Pod(raw)) = serde_json::from_slice::<RawAnswer<'_>>(&answer)
        && let Ok(meta) = serde_json::from_str::<RawPodMeta>(raw.get())
        && answers(query, &serde_json::json!({ "metadata": meta.metadata }))
    {
        return Ok(raw.get().as_bytes().to_vec());
    }
    match serde_json::from_slice::<PodAnswer>(&answer) {
        Ok(PodAnswer::Pod(pod)) if answers(query, &pod) => {
            serde_json::to_vec(&pod).map_err(|e| CacheMiss::BadAnswer(e.to_string()))
        }
        Ok(PodAnswer::Pod(pod)) => Err(CacheMiss::BadAnswer(format!(
            "asked for {}/{} (uid {:?}), answered with {}/{} (uid {})",
            query.namespace,
            query.name,
            query.uid,
            pod["metadata"]["namespace"],
            pod["metadata"]["name"],
            pod["metadata"]["uid"]
        ))),
        Ok(PodAnswer::Miss(why)) => Err(CacheMiss::NotCached(why)),
        Err(e) if answer.is_empty() => Err(CacheMiss::Unreachable(format!(
            "{}: closed without an answer ({e})",
            socket.display()
        ))),
        Err(e) => Err(CacheMiss::BadAnswer(e.to_string())),
    }
}

/// Whether `pod` (API JSON) is the pod asked for: same namespace and name, and the same UID
/// when the question has one.
pub fn answers(query: &PodQuery, pod: &serde_json::Value) -> bool {
    let meta = &pod["metadata"];
    meta["namespace"].as_str() == Some(query.namespace.as_str())
        && meta["name"].as_str() == Some(query.name.as_str())
        && (query.uid.is_empty() || meta["uid"].as_str() == Some(query.uid.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn query(uid: &str) -> PodQuery {
        PodQuery {
            namespace: "ns1".into(),
            name: "web-0".into(),
            uid: uid.into(),
        }
    }

    #[test]
    fn an_answer_must_be_the_very_pod_asked_for() {
        let pod = json!({"metadata": {"namespace": "ns1", "name": "web-0", "uid": "u-2"}});
        assert!(answers(&query(""), &pod));
        assert!(answers(&query("u-2"), &pod));
        // A pod of the same name from before (a StatefulSet's pod recreated) is not the one.
        assert!(!answers(&query("u-1"), &pod));
        let other = json!({"metadata": {"namespace": "ns2", "name": "web-0", "uid": "u-2"}});
        assert!(!answers(&query(""), &other));
    }

    #[test]
    fn the_wire_format_is_one_json_object_each_way() {
        assert_eq!(
            serde_json::to_string(&query("")).unwrap(),
            r#"{"namespace":"ns1","name":"web-0"}"#
        );
        let hit: PodAnswer = serde_json::from_str(r#"{"pod":{"kind":"Pod"}}"#).unwrap();
        assert_eq!(hit, PodAnswer::Pod(json!({"kind": "Pod"})));
        let miss: PodAnswer = serde_json::from_str(r#"{"miss":"not seen"}"#).unwrap();
        assert_eq!(miss, PodAnswer::Miss("not seen".into()));
    }

    #[test]
    fn no_agent_is_unreachable_and_named() {
        let dir = std::env::temp_dir().join(format!("fp-podcache-{}", std::process::id()));
        let err = ask(&socket_path(&dir), &query(""), CLIENT_TIMEOUT).unwrap_err();
        assert!(matches!(err, CacheMiss::Unreachable(_)), "{err}");
        assert!(err.to_string().contains("pod-cache.sock"), "{err}");
    }

    /// A listener where the agent's socket would be, in a run dir of its own (`tag`): the run
    /// dir, the socket's path and the listener.
    fn agent_socket(
        tag: &str,
    ) -> (
        std::path::PathBuf,
        std::path::PathBuf,
        std::os::unix::net::UnixListener,
    ) {
        let dir = std::env::temp_dir().join(format!("fp-podcache-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("fastpath")).unwrap();
        let path = socket_path(&dir);
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        (dir, path, l)
    }

    #[test]
    fn a_hit_hands_on_the_pod_and_a_wrong_pod_is_named() {
        let (dir, path, l) = agent_socket("h");
        let pod = json!({"kind": "Pod", "metadata": {"namespace": "ns1", "name": "web-0", "uid": "u-2"},
                         "spec": {"containers": [{"name": "app", "env": [{"name": "A", "value": "é\"x"}]}]}});
        let body = serde_json::to_vec(&PodAnswer::Pod(pod.clone())).unwrap();
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let (mut c, _) = l.accept().unwrap();
                let mut q = Vec::new();
                let _ = (&mut c).take(MAX_QUERY_BYTES).read_to_end(&mut q);
                let _ = c.write_all(&body);
            }
        });
        let got = ask(&path, &query("u-2"), CLIENT_TIMEOUT).unwrap();
        assert_eq!(got, serde_json::to_vec(&pod).unwrap());
        let wrong = ask(&path, &query("u-1"), CLIENT_TIMEOUT).unwrap_err();
        assert_eq!(
            wrong.to_string(),
            r#"the agent's pod cache answered badly: asked for ns1/web-0 (uid "u-1"), answered with "ns1"/"web-0" (uid "u-2")"#
        );
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_answer_over_the_bound_or_garbled_is_refused() {
        let (dir, path, l) = agent_socket("b");
        let server = std::thread::spawn(move || {
            for body in [
                b"not json".to_vec(),
                vec![b' '; (MAX_ANSWER_BYTES + 10) as usize],
            ] {
                let (mut c, _) = l.accept().unwrap();
                let mut q = Vec::new();
                let _ = (&mut c).take(MAX_QUERY_BYTES).read_to_end(&mut q);
                let _ = c.write_all(&body);
            }
        });
        let garbled = ask(&path, &query(""), CLIENT_TIMEOUT).unwrap_err();
        assert!(matches!(garbled, CacheMiss::BadAnswer(_)), "{garbled}");
        let long = ask(&path, &query(""), CLIENT_TIMEOUT).unwrap_err();
        assert!(matches!(long, CacheMiss::BadAnswer(_)), "{long}");
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
