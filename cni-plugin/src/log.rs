//! The plugin's logs: buffered during the invocation, then sent in one `POST /log` to the
//! installer's socket (`<cni_agent_run_dir>/log.sock`, Istio's UDS log format: a JSON array of
//! strings, each a JSON log line with `level`, `time`, `msg` and fields), or written to stderr
//! when there is no socket or the POST fails. Never stdout: stdout belongs to the CNI result.
use serde_json::{Map, Value};
use std::io::{Read as _, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Istio's log levels, least to most severe: the plugin's `plugin_log_level`, and the levels of
/// the installer's scopes (which uses this type too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
    Fatal,
    None,
}

impl Level {
    /// A level as Istio's flags and config spell it (any case; `warning` for `warn`).
    pub fn parse(s: &str) -> Option<Level> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "debug" => Level::Debug,
            "info" => Level::Info,
            "warn" | "warning" => Level::Warn,
            "error" => Level::Error,
            "fatal" => Level::Fatal,
            "none" => Level::None,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
            Level::Fatal => "fatal",
            Level::None => "none",
        }
    }

    /// `plugin_log_level`; Istio's default is `info`. `none` and `fatal` keep only errors: a
    /// failing ADD still says why.
    pub fn from_config(s: Option<&str>) -> Level {
        match s.and_then(Level::parse) {
            Some(Level::Fatal | Level::None) => Level::Error,
            Some(level) => level,
            None => Level::Info,
        }
    }
}

/// A log buffer for one plugin invocation.
pub struct Logger {
    level: Level,
    /// Fields added to every line (pod, container id).
    context: Map<String, Value>,
    lines: Vec<String>,
}

impl Default for Logger {
    fn default() -> Self {
        Self::new(Level::Info)
    }
}

impl Logger {
    pub fn new(level: Level) -> Self {
        Self {
            level,
            context: Map::new(),
            lines: Vec::new(),
        }
    }

    pub fn set_level(&mut self, level: Level) {
        self.level = level;
    }

    pub fn enabled(&self, level: Level) -> bool {
        level >= self.level
    }

    pub fn add_context(&mut self, key: &str, value: impl Into<Value>) {
        self.context.insert(key.to_string(), value.into());
    }

    pub fn log(&mut self, level: Level, msg: &str, fields: &[(&str, Value)]) {
        if !self.enabled(level) {
            return;
        }
        let mut line = Map::new();
        line.insert("level".into(), level.as_str().into());
        line.insert("time".into(), rfc3339_now().into());
        line.insert("msg".into(), msg.into());
        for (k, v) in &self.context {
            line.insert(k.clone(), v.clone());
        }
        for (k, v) in fields {
            line.insert((*k).to_string(), v.clone());
        }
        self.lines.push(Value::Object(line).to_string());
    }

    pub fn debug(&mut self, msg: &str, fields: &[(&str, Value)]) {
        self.log(Level::Debug, msg, fields)
    }
    pub fn info(&mut self, msg: &str, fields: &[(&str, Value)]) {
        self.log(Level::Info, msg, fields)
    }
    pub fn warn(&mut self, msg: &str, fields: &[(&str, Value)]) {
        self.log(Level::Warn, msg, fields)
    }
    pub fn error(&mut self, msg: &str, fields: &[(&str, Value)]) {
        self.log(Level::Error, msg, fields)
    }

    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// Sends the buffered lines to `socket` if it exists, else (or if that fails) to `stderr`.
    pub fn flush(&mut self, socket: Option<&Path>, stderr: &mut dyn Write) {
        if self.lines.is_empty() {
            return;
        }
        if let Some(sock) = socket.filter(|s| s.exists()) {
            match post_logs(sock, &self.lines) {
                Ok(()) => {
                    self.lines.clear();
                    return;
                }
                Err(e) => {
                    let _ = writeln!(
                        stderr,
                        "istio-cni: could not send logs to {}: {e}",
                        sock.display()
                    );
                }
            }
        }
        // One write for all lines (stderr is unbuffered: a `writeln!` per line costs two).
        let mut text = String::with_capacity(self.lines.iter().map(|l| l.len() + 1).sum());
        for l in self.lines.drain(..) {
            text.push_str(&l);
            text.push('\n');
        }
        let _ = stderr.write_all(text.as_bytes());
    }
}

/// `POST /log` over the unix socket, 1 s timeout (as Istio's client).
pub fn post_logs(socket: &Path, lines: &[String]) -> std::io::Result<()> {
    let body = serde_json::to_string(lines)?;
    let mut s = UnixStream::connect(socket)?;
    s.set_write_timeout(Some(Duration::from_secs(1)))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut request = format!(
        "POST /log HTTP/1.1\r\nHost: unix\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    request.push_str(&body);
    s.write_all(request.as_bytes())?;
    let mut status = [0u8; 12];
    s.read_exact(&mut status)?;
    // "HTTP/1.1 200"
    if &status[9..12] != b"200" {
        return Err(std::io::Error::other(format!(
            "log server answered {:?}",
            String::from_utf8_lossy(&status)
        )));
    }
    Ok(())
}

/// Current UTC time as RFC 3339 with microseconds (`2026-11-26T07:40:00.123456Z`).
pub fn rfc3339_now() -> String {
    crate::timestamp::Rfc3339::now().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn level_filter_and_line_shape() {
        let mut l = Logger::new(Level::from_config(Some("warn")));
        l.add_context("pod", "ns/web");
        l.info("hidden", &[]);
        l.warn("shown", &[("value", json!("x"))]);
        assert_eq!(l.lines().len(), 1);
        let v: Value = serde_json::from_str(&l.lines()[0]).unwrap();
        assert_eq!(v["level"], "warn");
        assert_eq!(v["msg"], "shown");
        assert_eq!(v["pod"], "ns/web");
        assert_eq!(v["value"], "x");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(Level::from_config(None), Level::Info);
        assert_eq!(Level::from_config(Some("DEBUG")), Level::Debug);
    }

    // Posting to the installer's socket is tested with the built plugin, end to end:
    // `plugin_chain_logs_go_to_the_socket_never_stdout` (tests/tests/plugin_chain.rs).
    #[test]
    fn flush_without_socket_goes_to_stderr() {
        let mut l = Logger::new(Level::Debug);
        l.debug("a", &[]);
        let mut err = Vec::new();
        l.flush(Some(Path::new("/nonexistent/log.sock")), &mut err);
        let text = String::from_utf8(err).unwrap();
        assert!(text.contains("\"msg\":\"a\""));
        assert!(l.lines().is_empty());
    }
}
