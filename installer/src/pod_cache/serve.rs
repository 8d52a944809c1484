//! The pod cache's socket: one question per connection, answered from the watch's store.
//!
//! The socket is the plugin's only way in: it lives in the agent's run directory with mode
//! 0600 (root only, as the plugin runs). Questions are still read as untrusted: bounded in
//! size and time, names checked as the API server checks them, and a bounded number answered
//! at once (past it, a question gets a miss at once and its plugin asks the API server).
use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fastpath_cni_plugin::kube::valid_object_name;
use fastpath_cni_plugin::pod_cache::{AGENT_WAIT, MAX_QUERY_BYTES, PodAnswer, PodQuery, answers};

use super::WatchState;

const SCOPE: &str = crate::logging::SCOPE_AGENT;

/// Questions answered at once; more get a miss without waiting.
const MAX_IN_FLIGHT: usize = 64;
/// How often a waiting question looks at the store again.
const POLL: Duration = Duration::from_millis(5);

/// Where the answer to `query` comes from: the store, once it has the pod (waiting at most
/// `wait`), as a pure function of a lookup so that it is tested without a watch.
pub fn answer(
    query: &PodQuery,
    wait: Duration,
    mut lookup: impl FnMut(&str, &str) -> Option<serde_json::Value>,
) -> PodAnswer {
    if !valid_object_name(&query.namespace) || !valid_object_name(&query.name) {
        return PodAnswer::Miss(format!(
            "{:?}/{:?} is not a valid pod name",
            query.namespace, query.name
        ));
    }
    let deadline = Instant::now() + wait;
    loop {
        match lookup(&query.namespace, &query.name) {
            Some(pod) if answers(query, &pod) => return PodAnswer::Pod(pod),
            seen => {
                if Instant::now() >= deadline {
                    return PodAnswer::Miss(match seen {
                        Some(_) => format!(
                            "the cached pod {}/{} is not uid {} after {wait:?}",
                            query.namespace, query.name, query.uid
                        ),
                        None => format!(
                            "pod {}/{} not seen by the watch after {wait:?}",
                            query.namespace, query.name
                        ),
                    });
                }
                std::thread::sleep(POLL);
            }
        }
    }
}

/// Why the pod cache is off.
#[derive(Debug, thiserror::Error)]
pub enum PodCacheError {
    #[error("NODE_NAME is not set, so the pods of this node cannot be watched")]
    NoNodeName,
    #[error("pod cache: cannot create {}: {source}", dir.display())]
    CreateDir {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("pod cache: cannot listen on {}: {source}", socket.display())]
    Listen {
        socket: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("pod cache: cannot restrict {}: {source}", socket.display())]
    Restrict {
        socket: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("pod cache: cannot start its thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The cache's own watch ([`super::start`]) did not start.
    #[error(transparent)]
    Watch(#[from] crate::pod_watch::WatchStartError),
}

/// Listens on `socket` (replacing a stale one) and answers from `state`, on a thread.
pub fn serve(socket: &Path, state: Arc<WatchState>) -> Result<(), PodCacheError> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|source| PodCacheError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })?;
    }
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(|source| PodCacheError::Listen {
        socket: socket.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        PodCacheError::Restrict {
            socket: socket.to_path_buf(),
            source,
        }
    })?;
    let in_flight = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("pod-cache".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
                    in_flight.fetch_sub(1, Ordering::AcqRel);
                    reply(conn, &PodAnswer::Miss("the pod cache is busy".into()));
                    continue;
                }
                let (state, in_flight) = (state.clone(), in_flight.clone());
                let spawned = std::thread::Builder::new()
                    .name("pod-cache-q".into())
                    .stack_size(128 << 10)
                    .spawn(move || {
                        handle(conn, &state);
                        in_flight.fetch_sub(1, Ordering::AcqRel);
                    });
                if let Err(e) = spawned {
                    log::debug!(target: SCOPE, "pod cache: cannot answer a question: {e}");
                }
            }
        })
        .map_err(PodCacheError::Thread)?;
    log::info!(target: SCOPE, "pod cache: answering the plugin on {}", socket.display());
    Ok(())
}

fn handle(mut conn: UnixStream, state: &WatchState) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
    let mut line = Vec::new();
    let read = (&mut conn)
        .take(MAX_QUERY_BYTES)
        .read_until_newline(&mut line);
    let answer = match read.and_then(|()| {
        serde_json::from_slice::<PodQuery>(&line)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }) {
        // Before the first list is in, waiting is still worth it: the list usually takes
        // milliseconds, and the plugin's own timeout bounds the whole.
        Ok(query) => answer(&query, AGENT_WAIT, |ns, name| state.pod(ns, name)),
        Err(e) => PodAnswer::Miss(format!("not a question: {e}")),
    };
    reply(conn, &answer);
}

fn reply(mut conn: UnixStream, answer: &PodAnswer) {
    if let Ok(mut body) = serde_json::to_vec(answer) {
        body.push(b'\n');
        let _ = conn.write_all(&body);
    }
}

/// Reads up to the first newline (or the end): a question is one line.
trait ReadUntilNewline {
    fn read_until_newline(&mut self, out: &mut Vec<u8>) -> std::io::Result<()>;
}

impl<R: std::io::Read> ReadUntilNewline for R {
    fn read_until_newline(&mut self, out: &mut Vec<u8>) -> std::io::Result<()> {
        let mut byte = [0u8; 1];
        loop {
            match self.read(&mut byte) {
                Ok(0) => return Ok(()),
                Ok(_) if byte[0] == b'\n' => return Ok(()),
                Ok(_) => out.push(byte[0]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(uid: &str) -> serde_json::Value {
        json!({"kind": "Pod", "metadata": {"namespace": "ns1", "name": "web-0", "uid": uid}})
    }

    fn query(uid: &str) -> PodQuery {
        PodQuery {
            namespace: "ns1".into(),
            name: "web-0".into(),
            uid: uid.into(),
        }
    }

    #[test]
    fn a_cached_pod_is_answered_at_once() {
        let got = answer(&query("u-1"), Duration::from_secs(5), |_, _| {
            Some(pod("u-1"))
        });
        assert_eq!(got, PodAnswer::Pod(pod("u-1")));
    }

    #[test]
    fn a_pod_the_watch_delivers_during_the_wait_is_answered() {
        let start = Instant::now();
        let got = answer(&query(""), Duration::from_secs(5), |_, _| {
            (start.elapsed() > Duration::from_millis(30)).then(|| pod("u-1"))
        });
        assert_eq!(got, PodAnswer::Pod(pod("u-1")));
    }

    #[test]
    fn a_miss_is_bounded_by_the_wait_and_says_why() {
        let start = Instant::now();
        let got = answer(&query(""), Duration::from_millis(50), |_, _| None);
        assert!(start.elapsed() < Duration::from_millis(500));
        assert!(
            matches!(&got, PodAnswer::Miss(w) if w.contains("not seen")),
            "{got:?}"
        );
        // An older pod of the same name is never the answer.
        let got = answer(&query("u-2"), Duration::from_millis(20), |_, _| {
            Some(pod("u-1"))
        });
        assert!(
            matches!(&got, PodAnswer::Miss(w) if w.contains("not uid u-2")),
            "{got:?}"
        );
    }

    #[test]
    fn a_question_with_an_invalid_name_is_refused_without_a_lookup() {
        let q = PodQuery {
            namespace: "../etc".into(),
            name: "web-0".into(),
            uid: String::new(),
        };
        let got = answer(&q, Duration::from_secs(5), |_, _| panic!("looked up"));
        assert!(
            matches!(&got, PodAnswer::Miss(w) if w.contains("not a valid pod name")),
            "{got:?}"
        );
    }
}
