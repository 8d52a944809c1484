//! The plugin's log socket, `<CNI_AGENT_RUN_DIR>/log.sock` (Istio's UDS log server): `POST /log`
//! with a JSON array of strings, each one JSON log line with `level`, `time`, `msg` and fields
//! (the pod's name among them). Each line is re-emitted in the agent's log under the
//! `cni-plugin` scope, with its fields, so the plugin's lines are found next to the agent's.
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::Path;
use std::sync::Arc;

use crate::http::{Request, Response};
use crate::logging::{self, Level, SCOPE_PLUGIN};
use crate::metrics::Metrics;

#[derive(Debug, PartialEq)]
pub struct PluginLine {
    pub level: Level,
    pub time: String,
    pub msg: String,
    pub fields: Vec<(String, serde_json::Value)>,
}

/// Parses a `POST /log` body. Lines that are not JSON objects, or have a level other than
/// debug/info/warn/error, are dropped (as Istio does) and counted in the second value.
/// A `POST /log` body that is not Istio's JSON array of strings (answered with a 400).
#[derive(Debug, thiserror::Error)]
#[error("body is not a JSON array of strings: {0}")]
pub struct LogBodyError(#[source] serde_json::Error);

/// Why the plugin log socket is not listening (the `log-socket` readiness reason).
#[derive(Debug, thiserror::Error)]
pub enum LogSocketError {
    #[error("cannot create {} (CNI_AGENT_RUN_DIR): {source}", dir.display())]
    CreateDir {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot remove the stale socket {}: {source}", path.display())]
    RemoveStale {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on the plugin log socket {}: {source}", path.display())]
    Listen {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot chmod {}: {source}", path.display())]
    Chmod {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the log socket thread: {0}")]
    Thread(#[source] std::io::Error),
}

pub fn parse_body(body: &[u8]) -> Result<(Vec<PluginLine>, usize), LogBodyError> {
    let lines: Vec<String> = serde_json::from_slice(body).map_err(LogBodyError)?;
    let mut out = Vec::new();
    let mut dropped = 0;
    for l in lines {
        match parse_line(&l) {
            Some(p) => out.push(p),
            None => dropped += 1,
        }
    }
    Ok((out, dropped))
}

fn parse_line(line: &str) -> Option<PluginLine> {
    let serde_json::Value::Object(mut m) = serde_json::from_str(line).ok()? else {
        return None;
    };
    let level = match m.remove("level")?.as_str()? {
        "debug" => Level::Debug,
        "info" => Level::Info,
        "warn" => Level::Warn,
        "error" => Level::Error,
        _ => return None,
    };
    let time = match m.remove("time") {
        Some(serde_json::Value::String(t)) => t,
        _ => logging::now_rfc3339(),
    };
    let msg = match m.remove("msg") {
        Some(serde_json::Value::String(s)) => s,
        Some(v) => v.to_string(),
        None => String::new(),
    };
    // The plugin's own scope label is implied.
    m.remove("scope");
    Some(PluginLine {
        level,
        time,
        msg,
        fields: m.into_iter().collect(),
    })
}

pub fn handle(req: &Request, metrics: &Metrics) -> Response {
    if req.path != "/log" {
        return Response::text(404, "not found\n");
    }
    if req.method != "POST" {
        return Response::text(405, "use POST\n");
    }
    match parse_body(&req.body) {
        Ok((lines, dropped)) => {
            for l in &lines {
                metrics.plugin_log_line();
                logging::emit(SCOPE_PLUGIN, l.level, &l.time, &l.msg, &l.fields);
            }
            for _ in 0..dropped {
                metrics.plugin_log_rejected();
            }
            Response::text(200, "")
        }
        Err(e) => {
            metrics.plugin_log_rejected();
            Response::text(400, format!("{e}\n"))
        }
    }
}

/// Listens on `path` (stale socket removed, parent created 0750, socket mode 0600: the plugin
/// runs as root, and nothing else may write the agent's log).
pub fn start(path: &Path, metrics: Arc<Metrics>) -> Result<(), LogSocketError> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|source| LogSocketError::CreateDir {
                dir: dir.to_path_buf(),
                source,
            })?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(LogSocketError::RemoveStale {
                path: path.to_path_buf(),
                source,
            });
        }
    }
    let listener =
        std::os::unix::net::UnixListener::bind(path).map_err(|source| LogSocketError::Listen {
            path: path.to_path_buf(),
            source,
        })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        LogSocketError::Chmod {
            path: path.to_path_buf(),
            source,
        }
    })?;
    crate::http::serve(
        "log-socket",
        crate::http::Listener::Unix(listener),
        crate::http::Limits::LOG_SOCKET,
        move |req| handle(req, &metrics),
    )
    .map_err(LogSocketError::Thread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_zap_lines() {
        let body = serde_json::to_vec(&vec![
            r#"{"level":"info","time":"2026-01-01T00:00:00Z","msg":"redirect set","pod":"default/web-1","scope":"cni-plugin"}"#,
            r#"{"level":"panic","msg":"x"}"#,
            "not json",
        ])
        .unwrap();
        let (lines, dropped) = parse_body(&body).unwrap();
        assert_eq!(dropped, 2);
        assert_eq!(
            lines,
            vec![PluginLine {
                level: Level::Info,
                time: "2026-01-01T00:00:00Z".into(),
                msg: "redirect set".into(),
                fields: vec![("pod".into(), "default/web-1".into())],
            }]
        );
        assert!(parse_body(b"{}").is_err());
    }

    #[test]
    fn handler_routes() {
        let m = Metrics::default();
        let req = |method: &str, path: &str, body: &[u8]| Request {
            method: method.into(),
            path: path.into(),
            body: body.to_vec(),
        };
        assert_eq!(handle(&req("POST", "/log", b"[]"), &m).status, 200);
        assert_eq!(handle(&req("GET", "/log", b""), &m).status, 405);
        assert_eq!(handle(&req("POST", "/other", b""), &m).status, 404);
        assert_eq!(handle(&req("POST", "/log", b"nope"), &m).status, 400);
    }
}
