//! Istio-style logging: scopes (`cni-agent`, `cni-plugin`, `default`), per-scope levels from
//! `--log_output_level scope:level,...`, text or JSON lines (`--log_as_json`).
//!
//! Text: `<RFC3339 time>\t<level>\t<scope>\t<msg>[\tkey=value...]`, as Istio prints (the
//! `default` scope is not named, as in Istio).
//! JSON: `{"level":..,"time":..,"scope":..,"msg":..,<fields>}`.
//! The agent logs with `log::info!(target: SCOPE_AGENT, ...)`; the plugin's lines received on
//! the log socket go through [`emit`] under the `cni-plugin` scope with their fields.
use std::io::Write as _;
use std::sync::OnceLock;

pub const SCOPE_AGENT: &str = "cni-agent";
pub const SCOPE_PLUGIN: &str = "cni-plugin";
pub const SCOPE_DEFAULT: &str = "default";
const SCOPES: &[&str] = &[SCOPE_AGENT, SCOPE_PLUGIN, SCOPE_DEFAULT];

/// Istio's levels (the plugin's type: the plugin's lines and the agent's are filtered alike).
pub use fastpath_cni_plugin::log::Level;

fn level_of(l: log::Level) -> Level {
    match l {
        log::Level::Trace | log::Level::Debug => Level::Debug,
        log::Level::Info => Level::Info,
        log::Level::Warn => Level::Warn,
        log::Level::Error => Level::Error,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Stdout,
    Stderr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSettings {
    /// Level for scopes not named explicitly.
    pub default: Level,
    /// Levels named per scope.
    pub scopes: Vec<(String, Level)>,
    pub json: bool,
    pub target: Target,
}

impl LogSettings {
    /// Parses `--log_output_level`: `level` or `scope:level` items, comma-separated. A bare
    /// level, `default:`, `all:` or `*:` sets the level of every scope not named otherwise.
    /// Errors carry the env name of the bad setting and why.
    pub fn parse(
        output_level: &str,
        json: bool,
        target: &str,
    ) -> Result<Self, (&'static str, String)> {
        let mut default = Level::Info;
        let mut scopes = Vec::new();
        for item in output_level
            .split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            let (scope, level) = match item.rsplit_once(':') {
                Some((s, l)) => (s.trim(), l),
                None => ("default", item),
            };
            let level = Level::parse(level).ok_or_else(|| {
                (
                    "LOG_OUTPUT_LEVEL",
                    format!(
                        "unknown level {level:?} (expected debug, info, warn, error, fatal or none)"
                    ),
                )
            })?;
            match scope {
                "default" | "all" | "*" => default = level,
                s => scopes.push((s.to_string(), level)),
            }
        }
        let target = match target {
            "stdout" => Target::Stdout,
            "stderr" => Target::Stderr,
            _ => return Err(("LOG_TARGET", "expected stdout or stderr".into())),
        };
        Ok(LogSettings {
            default,
            scopes,
            json,
            target,
        })
    }

    pub fn explicit_level(&self, scope: &str) -> Option<Level> {
        self.scopes
            .iter()
            .rev()
            .find(|(s, _)| s == scope)
            .map(|(_, l)| *l)
    }

    pub fn level_for(&self, scope: &str) -> Level {
        self.explicit_level(scope).unwrap_or(self.default)
    }

    /// Scopes named that this agent does not have (Istio's binary registers more; we warn).
    pub fn unknown_scopes(&self) -> Vec<String> {
        self.scopes
            .iter()
            .filter(|(s, _)| !SCOPES.contains(&s.as_str()))
            .map(|(s, _)| s.clone())
            .collect()
    }
}

/// The settings the installed logger runs with, for [`emit`].
static SETTINGS: OnceLock<LogSettings> = OnceLock::new();

fn level_filter(level: Level) -> log::LevelFilter {
    match level {
        Level::Debug => log::LevelFilter::Debug,
        Level::Info => log::LevelFilter::Info,
        Level::Warn => log::LevelFilter::Warn,
        Level::Error | Level::Fatal => log::LevelFilter::Error,
        Level::None => log::LevelFilter::Off,
    }
}

/// Crates of the pod cache's API client (kube-rs and what it runs on).
const API_CLIENT_CRATES: [&str; 8] = [
    "kube",
    "kube_client",
    "kube_runtime",
    "hyper",
    "hyper_util",
    "rustls",
    "tower",
    "tower_http",
];

/// Installs the logger (env_logger, with Istio's line format and per-scope levels). Call once.
pub fn init(settings: LogSettings) {
    let mut builder = env_logger::Builder::new();
    // Log targets are scope names; anything else (crates' own targets) is the default scope.
    builder.filter_level(level_filter(settings.default));
    for scope in SCOPES {
        builder.filter_module(scope, level_filter(settings.level_for(scope)));
    }
    // The API client's crates log every request at debug and each retry of a failing watch at
    // warn; the pod cache reports its watch's state itself (once per change), so only their
    // errors come through.
    for noisy in API_CLIENT_CRATES {
        builder.filter_module(noisy, log::LevelFilter::Error);
    }
    let json = settings.json;
    builder.format(move |buf, record| {
        let line = format_line(
            json,
            level_of(record.level()),
            &buf.timestamp_micros().to_string(),
            scope_of(record.target()),
            &record.args().to_string(),
            &[],
        );
        buf.write_all(line.as_bytes())
    });
    builder.target(match settings.target {
        Target::Stdout => env_logger::Target::Stdout,
        Target::Stderr => env_logger::Target::Stderr,
    });
    builder.write_style(env_logger::WriteStyle::Never);
    let _ = SETTINGS.set(settings);
    let _ = builder.try_init();
}

fn scope_of(target: &str) -> &str {
    if SCOPES.contains(&target) {
        target
    } else {
        SCOPE_DEFAULT
    }
}

/// Writes one preformatted line where the logger writes, in one call so lines never interleave.
fn write_line(target: Target, line: &str) {
    let _ = match target {
        Target::Stdout => std::io::stdout().lock().write_all(line.as_bytes()),
        Target::Stderr => std::io::stderr().lock().write_all(line.as_bytes()),
    };
}

/// Emits one line under `scope` with extra fields, honouring the scope's level.
pub fn emit(
    scope: &str,
    level: Level,
    time: &str,
    msg: &str,
    fields: &[(String, serde_json::Value)],
) {
    let Some(settings) = SETTINGS.get() else {
        return;
    };
    if level < settings.level_for(scope) || level == Level::None {
        return;
    }
    write_line(
        settings.target,
        &format_line(settings.json, level, time, scope, msg, fields),
    );
}

/// One log line, newline-terminated.
pub fn format_line(
    json: bool,
    level: Level,
    time: &str,
    scope: &str,
    msg: &str,
    fields: &[(String, serde_json::Value)],
) -> String {
    if json {
        let mut m = serde_json::Map::new();
        m.insert("level".into(), level.as_str().into());
        m.insert("time".into(), time.into());
        // Istio names every scope but the default one.
        if scope != SCOPE_DEFAULT {
            m.insert("scope".into(), scope.into());
        }
        m.insert("msg".into(), msg.into());
        for (k, v) in fields {
            m.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let mut s = serde_json::Value::Object(m).to_string();
        s.push('\n');
        s
    } else {
        // The plugin's lines come from a socket: what a client sends must not start a line of
        // its own or drive the terminal, so control characters are escaped.
        let (time, msg) = (escape_controls(time), escape_controls(msg));
        let mut s = match scope {
            SCOPE_DEFAULT => format!("{time}\t{}\t{msg}", level.as_str()),
            _ => format!("{time}\t{}\t{scope}\t{msg}", level.as_str()),
        };
        for (k, v) in fields {
            let k = escape_controls(k);
            match v {
                serde_json::Value::String(v) => {
                    s.push_str(&format!("\t{k}={}", escape_controls(v)))
                }
                // JSON text escapes control characters itself.
                v => s.push_str(&format!("\t{k}={v}")),
            }
        }
        s.push('\n');
        s
    }
}

/// `s` with every control character written as an escape (`\n`, `\t`, `\u{1b}`).
fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// Now as RFC 3339 UTC with microseconds, as Istio's logs print it.
pub fn now_rfc3339() -> String {
    fastpath_cni_plugin::timestamp::Rfc3339::now().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_level_syntax() {
        let s = LogSettings::parse("cni-agent:debug,cni-plugin:warn", false, "stdout").unwrap();
        assert_eq!(s.level_for("cni-agent"), Level::Debug);
        assert_eq!(s.level_for("cni-plugin"), Level::Warn);
        assert_eq!(s.level_for("default"), Level::Info);
        let s = LogSettings::parse("error", false, "stdout").unwrap();
        assert_eq!(s.level_for("cni-agent"), Level::Error);
        let s = LogSettings::parse("default:debug,cni-plugin:none", true, "stderr").unwrap();
        assert_eq!(s.level_for("cni-agent"), Level::Debug);
        assert_eq!(s.level_for("cni-plugin"), Level::None);
        assert_eq!(s.target, Target::Stderr);
        let s = LogSettings::parse("repair:debug", false, "stdout").unwrap();
        assert_eq!(s.unknown_scopes(), vec!["repair".to_string()]);
        assert!(LogSettings::parse("cni-agent:verbose", false, "stdout").is_err());
        assert_eq!(
            LogSettings::parse("info", false, "file").unwrap_err().0,
            "LOG_TARGET"
        );
    }

    #[test]
    fn line_formats() {
        let f = vec![("pod".to_string(), serde_json::Value::from("default/web-1"))];
        let t = format_line(false, Level::Info, "T", "cni-plugin", "added", &f);
        assert_eq!(t, "T\tinfo\tcni-plugin\tadded\tpod=default/web-1\n");
        let j: serde_json::Value =
            serde_json::from_str(&format_line(true, Level::Warn, "T", "cni-agent", "m", &f))
                .unwrap();
        assert_eq!(j["level"], "warn");
        assert_eq!(j["scope"], "cni-agent");
        assert_eq!(j["pod"], "default/web-1");
        assert_eq!(
            format_line(false, Level::Info, "T", "default", "m", &[]),
            "T\tinfo\tm\n"
        );
    }

    #[test]
    fn text_lines_escape_what_a_client_sent() {
        let forged = "ok\n2026-01-01T00:00:00Z\terror\tforged \u{1b}[2J";
        let f = vec![
            ("pod\nx".to_string(), serde_json::Value::from("a\rb")),
            ("n".to_string(), serde_json::Value::from(1)),
        ];
        let t = format_line(false, Level::Info, "T\n", "cni-plugin", forged, &f);
        assert_eq!(t.matches('\n').count(), 1, "{t:?}");
        assert!(!t.contains('\u{1b}'), "{t:?}");
        assert_eq!(
            t,
            "T\\n\tinfo\tcni-plugin\tok\\n2026-01-01T00:00:00Z\\terror\\tforged \\u{1b}[2J\tpod\\nx=a\\rb\tn=1\n"
        );
    }
}
