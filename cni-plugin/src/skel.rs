//! The CNI protocol side of the plugin: what the runtime passes (`CNI_*` env, config on
//! stdin), which commands exist for which spec versions, and how results and errors are
//! written (stdout only, error JSON + non-zero exit). Everything is injected (env lookup,
//! stdin, stdout, stderr) so the protocol rules are unit-tested without a process.
//!
//! Semantics follow containernetworking/cni v1.3.0's `skel` (the library Istio's plugin uses),
//! with one deliberate change: the "CNI_NETNS is the plugin's own netns" check runs before the
//! command instead of after it, so a misconfigured runtime cannot make ADD touch the host.
use crate::version::{SUPPORTED_VERSIONS, SpecVersion};
use serde_json::{Value, json};
use std::io::{Read, Write};

/// CNI error codes (SPEC.md "Error codes"; containernetworking/cni `types.go`).
pub mod code {
    pub const INCOMPATIBLE_CNI_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT_VARIABLES: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    pub const INVALID_NETNS: u32 = 8;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const INTERNAL: u32 = 999;
}

/// A CNI error as printed on stdout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// A plain failure of the plugin's own work (code 999, as skel wraps plain Go errors).
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(code::INTERNAL, msg, "")
    }

    /// The error JSON of the spec; `cni_version` is the config's version when known.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.msg)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

/// What the runtime passed for one invocation.
#[derive(Clone, Debug, Default)]
pub struct CmdArgs {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    pub path: String,
    pub netns_override: String,
    pub stdin: Vec<u8>,
    /// The config's `cniVersion` (`0.1.0` when absent, as the spec says).
    pub cni_version: SpecVersion,
}

/// The plugin's commands. Each gets the parsed invocation and writes its result (if any) to
/// `stdout`. GC and STATUS default to success with no output, as in skel.
pub trait Commands {
    fn add(&self, args: &CmdArgs, stdout: &mut dyn Write) -> Result<(), CniError>;
    fn del(&self, args: &CmdArgs, stdout: &mut dyn Write) -> Result<(), CniError>;
    fn check(&self, args: &CmdArgs, stdout: &mut dyn Write) -> Result<(), CniError>;
    fn gc(&self, _args: &CmdArgs, _stdout: &mut dyn Write) -> Result<(), CniError> {
        Ok(())
    }
    fn status(&self, _args: &CmdArgs, _stdout: &mut dyn Write) -> Result<(), CniError> {
        Ok(())
    }
}

/// Which env vars each command needs (skel v1.3.0's table).
fn required_vars(cmd: &str) -> &'static [&'static str] {
    match cmd {
        "ADD" | "CHECK" => &[
            "CNI_COMMAND",
            "CNI_CONTAINERID",
            "CNI_NETNS",
            "CNI_IFNAME",
            "CNI_PATH",
        ],
        "DEL" => &["CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"],
        "GC" | "STATUS" => &["CNI_COMMAND", "CNI_PATH"],
        _ => &["CNI_COMMAND"],
    }
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

/// `utils.ValidateContainerID`.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    match chars.next() {
        None => Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            "missing containerID",
            "",
        )),
        Some(first) if first.is_ascii_alphanumeric() && chars.all(is_id_char) => Ok(()),
        Some(_) => Err(CniError::new(
            code::INVALID_ENVIRONMENT_VARIABLES,
            "invalid characters in containerID",
            id,
        )),
    }
}

/// `utils.ValidateInterfaceName`.
pub fn validate_interface_name(name: &str) -> Result<(), CniError> {
    let bad = |msg: &str| {
        Err(CniError::new(
            code::INVALID_ENVIRONMENT_VARIABLES,
            msg,
            name,
        ))
    };
    if name.is_empty() {
        return bad("interface name is empty");
    }
    if name.len() > 15 {
        return bad("interface name is too long");
    }
    if name == "." || name == ".." {
        return bad("interface name is . or ..");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return bad("interface name contains / or : or whitespace characters");
    }
    Ok(())
}

/// `validateConfig`: the config must be JSON with a valid `name`; returns its `cniVersion`.
fn validate_config(stdin: &[u8]) -> Result<SpecVersion, CniError> {
    let conf: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODING_FAILURE,
            format!("error unmarshall network config: {e}"),
            "",
        )
    })?;
    let name = conf.get("name").and_then(Value::as_str).unwrap_or("");
    if name.is_empty() {
        return Err(CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "missing network name",
            "",
        ));
    }
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || !chars.all(is_id_char) {
        return Err(CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "invalid characters found in network name",
            name,
        ));
    }
    match conf.get("cniVersion") {
        None | Some(Value::Null) => Ok(SpecVersion::new(0, 1, 0)),
        Some(Value::String(s)) if s.is_empty() => Ok(SpecVersion::new(0, 1, 0)),
        Some(Value::String(s)) => SpecVersion::parse(s).map_err(|e| {
            CniError::new(
                code::DECODING_FAILURE,
                format!("invalid cniVersion: {e}"),
                "",
            )
        }),
        Some(other) => Err(CniError::new(
            code::DECODING_FAILURE,
            format!("cniVersion must be a string, got {other}"),
            "",
        )),
    }
}

fn supported_list() -> String {
    let names: Vec<String> = SUPPORTED_VERSIONS
        .iter()
        .map(|v| format!("{:?}", v.to_string()))
        .collect();
    format!("[{}]", names.join(" "))
}

fn require_supported(v: SpecVersion) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&v) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_CNI_VERSION,
            "incompatible CNI versions",
            format!("config is \"{v}\", plugin supports {}", supported_list()),
        ))
    }
}

fn require_at_least(v: SpecVersion, floor: SpecVersion, cmd: &str) -> Result<(), CniError> {
    if v < floor {
        return Err(CniError::new(
            code::INCOMPATIBLE_CNI_VERSION,
            format!("config version does not allow {cmd}"),
            "",
        ));
    }
    require_supported(v)
}

/// Identity of a network namespace file (device, inode).
pub type NetnsIdentity = (u64, u64);

/// Looks up a netns file's identity, or why it is not a network namespace one can open.
pub type NetnsProbe<'a> = &'a dyn Fn(&str) -> Result<NetnsIdentity, NetnsProbeError>;

/// Why `CNI_NETNS` cannot be used as a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsProbeError {
    /// It cannot be opened (gone, or no permission).
    #[error("{0}")]
    Open(std::io::Error),
    #[error("not a network namespace: {path} is {kind}")]
    NotANamespace { path: String, kind: &'static str },
    #[error("not a network namespace: {path} is a file, not a namespace ({error})")]
    PlainFile { path: String, error: std::io::Error },
    #[error("not a network namespace: {path} is another kind of namespace (type {kind:#x})")]
    OtherNamespace { path: String, kind: i32 },
}

/// Opens `path` as a network namespace and returns its identity. Refuses, with what it is,
/// anything else: a regular file, a directory, a FIFO (opened without blocking), another kind
/// of namespace. The kernel says what a namespace file is (`NS_GET_NSTYPE`).
pub fn probe_netns(path: &str) -> Result<NetnsIdentity, NetnsProbeError> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _};
    const NS_GET_NSTYPE: libc::c_ulong = 0xb7 << 8 | 0x3;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(NetnsProbeError::Open)?;
    let m = f.metadata().map_err(NetnsProbeError::Open)?;
    let t = m.file_type();
    let kind = if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_char_device() || t.is_block_device() {
        Some("a device")
    } else {
        None
    };
    if let Some(kind) = kind {
        return Err(NetnsProbeError::NotANamespace {
            path: path.to_string(),
            kind,
        });
    }
    // SAFETY: an ioctl without argument on an fd we own.
    let ns = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE as _) };
    if ns < 0 {
        return Err(NetnsProbeError::PlainFile {
            path: path.to_string(),
            error: std::io::Error::last_os_error(),
        });
    }
    if ns != libc::CLONE_NEWNET {
        return Err(NetnsProbeError::OtherNamespace {
            path: path.to_string(),
            kind: ns,
        });
    }
    Ok((m.dev(), m.ino()))
}

/// The "netns from CNI_NETNS is the plugin's own" check. `own` is the plugin's netns identity.
fn check_netns(
    cmd: &str,
    netns: &str,
    own: Option<NetnsIdentity>,
    probe: NetnsProbe<'_>,
) -> Result<(), CniError> {
    if netns.is_empty() {
        return Ok(());
    }
    match probe(netns) {
        Ok(id) if Some(id) == own => Err(CniError::new(
            code::INVALID_NETNS,
            "plugin's netns and netns from CNI_NETNS should not be the same",
            "",
        )),
        Ok(_) => Ok(()),
        // DEL must work when the netns is already gone.
        Err(_) if cmd == "DEL" => Ok(()),
        Err(e) => Err(CniError::new(
            code::INVALID_NETNS,
            format!("failed to open netns {netns:?}"),
            e.to_string(),
        )),
    }
}

/// Everything the dispatcher needs from its process.
pub struct Io<'a> {
    pub getenv: &'a dyn Fn(&str) -> Option<String>,
    pub stdin: &'a mut dyn Read,
    pub stdout: &'a mut dyn Write,
    pub stderr: &'a mut dyn Write,
    /// Identity of the plugin's own netns, and a probe for CNI_NETNS.
    pub own_netns: Option<NetnsIdentity>,
    pub probe_netns: NetnsProbe<'a>,
}

/// Runs one invocation; returns the process exit code. Errors are printed on stdout as the spec
/// says; nothing else is ever written to stdout except a command's result.
pub fn dispatch(mut io: Io<'_>, commands: &dyn Commands, about: &str) -> i32 {
    let mut conf_version = String::from("1.1.0");
    match dispatch_inner(&mut io, commands, about, &mut conf_version) {
        Ok(()) => 0,
        Err(e) => {
            let mut text = e.to_json(&conf_version).to_string();
            text.push('\n');
            let _ = io.stdout.write_all(text.as_bytes());
            let _ = io.stdout.flush();
            1
        }
    }
}

/// The protocol checks, then the command. `conf_version` is set as soon as the config's
/// version is known, for the error JSON.
fn dispatch_inner(
    io: &mut Io<'_>,
    commands: &dyn Commands,
    about: &str,
    conf_version: &mut String,
) -> Result<(), CniError> {
    let getenv = io.getenv;
    let var = |k: &str| getenv(k).unwrap_or_default();
    let cmd = var("CNI_COMMAND");
    let missing: Vec<&str> = required_vars(&cmd)
        .iter()
        .copied()
        .filter(|k| var(k).is_empty())
        .collect();
    if !missing.is_empty() {
        if cmd.is_empty() && !about.is_empty() {
            let versions: Vec<String> = SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect();
            let _ = writeln!(io.stderr, "{about}");
            let _ = writeln!(
                io.stderr,
                "CNI protocol versions supported: {}",
                versions.join(", ")
            );
            return Ok(());
        }
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT_VARIABLES,
            format!("required env variables [{}] missing", missing.join(",")),
            "",
        ));
    }
    if matches!(cmd.as_str(), "ADD" | "CHECK" | "DEL") {
        validate_container_id(&var("CNI_CONTAINERID"))?;
        validate_interface_name(&var("CNI_IFNAME"))?;
    }
    if cmd == "VERSION" {
        // stdin is ignored for VERSION (skel); the answer names every supported version.
        let versions: Vec<String> = SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect();
        let out = json!({"cniVersion": crate::version::CURRENT.to_string(), "supportedVersions": versions});
        writeln!(io.stdout, "{out}")
            .map_err(|e| CniError::new(code::IO_FAILURE, e.to_string(), ""))?;
        return Ok(());
    }
    // Room for a chained config with its prevResult in one read (read_to_end would start at 32
    // bytes and double: seven reads for a 1 KiB config).
    let mut data = Vec::with_capacity(8 << 10);
    io.stdin.read_to_end(&mut data).map_err(|e| {
        CniError::new(
            code::IO_FAILURE,
            format!("error reading from stdin: {e}"),
            "",
        )
    })?;
    let version = validate_config(&data)?;
    *conf_version = version.to_string();
    let args = CmdArgs {
        command: cmd.clone(),
        container_id: var("CNI_CONTAINERID"),
        netns: var("CNI_NETNS"),
        ifname: var("CNI_IFNAME"),
        args: var("CNI_ARGS"),
        path: var("CNI_PATH"),
        netns_override: var("CNI_NETNS_OVERRIDE"),
        stdin: data,
        cni_version: version,
    };
    let override_netns_check =
        args.netns_override.eq_ignore_ascii_case("true") || args.netns_override == "1";
    match cmd.as_str() {
        "ADD" => {
            require_supported(version)?;
            if !override_netns_check {
                check_netns("ADD", &args.netns, io.own_netns, io.probe_netns)?;
            }
            commands.add(&args, io.stdout)
        }
        "DEL" => {
            require_supported(version)?;
            if !override_netns_check {
                check_netns("DEL", &args.netns, io.own_netns, io.probe_netns)?;
            }
            commands.del(&args, io.stdout)
        }
        "CHECK" => {
            require_at_least(version, SpecVersion::new(0, 4, 0), "CHECK")?;
            commands.check(&args, io.stdout)
        }
        "GC" => {
            require_at_least(version, SpecVersion::new(1, 1, 0), "GC")?;
            commands.gc(&args, io.stdout)
        }
        "STATUS" => {
            require_at_least(version, SpecVersion::new(1, 1, 0), "STATUS")?;
            commands.status(&args, io.stdout)
        }
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT_VARIABLES,
            format!("unknown CNI_COMMAND: {other}"),
            "",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Recorder {
        calls: RefCell<Vec<String>>,
        fail_add: Option<CniError>,
    }

    impl Commands for Recorder {
        fn add(&self, a: &CmdArgs, out: &mut dyn Write) -> Result<(), CniError> {
            self.calls
                .borrow_mut()
                .push(format!("ADD {}", a.cni_version));
            if let Some(e) = &self.fail_add {
                return Err(e.clone());
            }
            out.write_all(b"{\"ok\":true}\n").unwrap();
            Ok(())
        }
        fn del(&self, a: &CmdArgs, _: &mut dyn Write) -> Result<(), CniError> {
            self.calls.borrow_mut().push(format!("DEL {}", a.netns));
            Ok(())
        }
        fn check(&self, _: &CmdArgs, _: &mut dyn Write) -> Result<(), CniError> {
            self.calls.borrow_mut().push("CHECK".into());
            Ok(())
        }
        fn gc(&self, _: &CmdArgs, _: &mut dyn Write) -> Result<(), CniError> {
            self.calls.borrow_mut().push("GC".into());
            Ok(())
        }
    }

    struct Run {
        code: i32,
        stdout: String,
        stderr: String,
    }

    fn run(env: &[(&str, &str)], stdin: &str, rec: &Recorder) -> Run {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let getenv = move |k: &str| env.get(k).cloned();
        let probe = |p: &str| match p {
            "/own" => Ok((1, 1)),
            "/pod" => Ok((1, 2)),
            _ => Err(NetnsProbeError::Open(std::io::Error::from(
                std::io::ErrorKind::NotFound,
            ))),
        };
        let mut input = stdin.as_bytes();
        let mut out = Vec::new();
        let mut err = Vec::new();
        let code = dispatch(
            Io {
                getenv: &getenv,
                stdin: &mut input,
                stdout: &mut out,
                stderr: &mut err,
                own_netns: Some((1, 1)),
                probe_netns: &probe,
            },
            rec,
            "CNI plugin istio-cni test",
        );
        Run {
            code,
            stdout: String::from_utf8(out).unwrap(),
            stderr: String::from_utf8(err).unwrap(),
        }
    }

    fn env_for(cmd: &'static str, netns: &'static str) -> Vec<(&'static str, &'static str)> {
        vec![
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
    }

    fn err_json(r: &Run) -> Value {
        assert_eq!(r.code, 1, "expected failure, stdout={}", r.stdout);
        serde_json::from_str(&r.stdout).expect("error JSON on stdout")
    }

    #[test]
    fn add_calls_handler_and_prints_only_its_result() {
        let rec = Recorder::default();
        let r = run(
            &env_for("ADD", "/pod"),
            r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"istio-cni"}"#,
            &rec,
        );
        assert_eq!(r.code, 0);
        assert_eq!(r.stdout, "{\"ok\":true}\n");
        assert_eq!(rec.calls.borrow().as_slice(), ["ADD 1.0.0"]);
    }

    #[test]
    fn missing_cni_version_means_0_1_0() {
        let rec = Recorder::default();
        let r = run(&env_for("ADD", "/pod"), r#"{"name":"n","type":"t"}"#, &rec);
        assert_eq!(r.code, 0);
        assert_eq!(rec.calls.borrow().as_slice(), ["ADD 0.1.0"]);
    }

    #[test]
    fn unsupported_version_is_error_code_1() {
        let rec = Recorder::default();
        let r = run(
            &env_for("ADD", "/pod"),
            r#"{"cniVersion":"9.9.9","name":"n"}"#,
            &rec,
        );
        let e = err_json(&r);
        assert_eq!(e["code"], 1);
        assert_eq!(e["msg"], "incompatible CNI versions");
        assert!(
            e["details"]
                .as_str()
                .unwrap()
                .contains("config is \"9.9.9\"")
        );
        assert!(rec.calls.borrow().is_empty());
    }

    #[test]
    fn check_only_from_0_4_0() {
        let rec = Recorder::default();
        let r = run(
            &env_for("CHECK", "/pod"),
            r#"{"cniVersion":"0.3.1","name":"n"}"#,
            &rec,
        );
        let e = err_json(&r);
        assert_eq!(e["code"], 1);
        assert_eq!(e["msg"], "config version does not allow CHECK");
        let r = run(
            &env_for("CHECK", "/pod"),
            r#"{"cniVersion":"0.4.0","name":"n"}"#,
            &rec,
        );
        assert_eq!(r.code, 0);
        assert_eq!(rec.calls.borrow().as_slice(), ["CHECK"]);
    }

    #[test]
    fn gc_and_status_only_from_1_1_0() {
        let rec = Recorder::default();
        let env = vec![("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")];
        let e = err_json(&run(&env, r#"{"cniVersion":"1.0.0","name":"n"}"#, &rec));
        assert_eq!(e["msg"], "config version does not allow GC");
        let r = run(&env, r#"{"cniVersion":"1.1.0","name":"n"}"#, &rec);
        assert_eq!((r.code, r.stdout.as_str()), (0, ""));
        let env = vec![("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/opt/cni/bin")];
        let e = err_json(&run(&env, r#"{"cniVersion":"1.0.0","name":"n"}"#, &rec));
        assert_eq!(e["msg"], "config version does not allow STATUS");
        let r = run(&env, r#"{"cniVersion":"1.1.0","name":"n"}"#, &rec);
        assert_eq!((r.code, r.stdout.as_str()), (0, ""));
    }

    #[test]
    fn version_lists_all_supported() {
        let rec = Recorder::default();
        let r = run(&[("CNI_COMMAND", "VERSION")], "", &rec);
        assert_eq!(r.code, 0);
        let v: Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(
            v["supportedVersions"],
            json!([
                "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"
            ])
        );
    }

    #[test]
    fn missing_env_names_the_variables() {
        let rec = Recorder::default();
        let e = err_json(&run(&[("CNI_COMMAND", "ADD")], r#"{"name":"n"}"#, &rec));
        assert_eq!(e["code"], 4);
        assert_eq!(
            e["msg"],
            "required env variables [CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME,CNI_PATH] missing"
        );
    }

    #[test]
    fn no_command_prints_about_on_stderr_and_succeeds() {
        let rec = Recorder::default();
        let r = run(&[], "", &rec);
        assert_eq!(r.code, 0);
        assert_eq!(r.stdout, "");
        assert!(r.stderr.contains("CNI plugin istio-cni test"));
        assert!(r.stderr.contains("CNI protocol versions supported: 0.1.0,"));
    }

    #[test]
    fn unknown_command_is_code_4() {
        let rec = Recorder::default();
        let e = err_json(&run(&[("CNI_COMMAND", "FROB")], r#"{"name":"n"}"#, &rec));
        assert_eq!(e["code"], 4);
        assert_eq!(e["msg"], "unknown CNI_COMMAND: FROB");
    }

    #[test]
    fn bad_config_json_and_names() {
        let rec = Recorder::default();
        let e = err_json(&run(&env_for("ADD", "/pod"), "{not json", &rec));
        assert_eq!(e["code"], 6);
        let e = err_json(&run(
            &env_for("ADD", "/pod"),
            r#"{"cniVersion":"1.0.0"}"#,
            &rec,
        ));
        assert_eq!(
            (e["code"].as_u64(), e["msg"].as_str()),
            (Some(7), Some("missing network name"))
        );
        let e = err_json(&run(
            &env_for("ADD", "/pod"),
            r#"{"cniVersion":"1.0.0","name":"bad name"}"#,
            &rec,
        ));
        assert_eq!(e["code"], 7);
        assert_eq!(e["details"], "bad name");
        assert_eq!(e["cniVersion"], "1.1.0");
    }

    #[test]
    fn container_id_and_ifname_are_validated() {
        let rec = Recorder::default();
        let mut env = env_for("ADD", "/pod");
        env[1] = ("CNI_CONTAINERID", "-bad");
        let e = err_json(&run(&env, r#"{"name":"n"}"#, &rec));
        assert_eq!(
            (e["code"].as_u64(), e["details"].as_str()),
            (Some(4), Some("-bad"))
        );
        let mut env = env_for("ADD", "/pod");
        env[3] = ("CNI_IFNAME", "a-very-long-interface-name");
        let e = err_json(&run(&env, r#"{"name":"n"}"#, &rec));
        assert_eq!(e["msg"], "interface name is too long");
    }

    #[test]
    fn only_a_network_namespace_passes_the_netns_probe() {
        let dir = std::env::temp_dir().join(format!("fp-netns-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let probe =
            |p: &std::path::Path| probe_netns(p.to_str().unwrap()).map_err(|e| e.to_string());
        assert!(
            probe(&file)
                .unwrap_err()
                .contains("is a file, not a namespace")
        );
        assert!(probe(&dir).unwrap_err().contains("is a directory"));
        // A FIFO with no writer would block a plain open for ever.
        assert!(probe(&fifo).unwrap_err().contains("is a FIFO"));
        assert!(
            probe_netns("/proc/self/ns/uts")
                .unwrap_err()
                .to_string()
                .contains("another kind of namespace")
        );
        assert!(matches!(
            probe_netns("/nonexistent/netns"),
            Err(NetnsProbeError::Open(_))
        ));
        let own = probe_netns("/proc/self/ns/net").unwrap();
        let m = std::fs::metadata("/proc/self/ns/net").unwrap();
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(own, (m.dev(), m.ino()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn own_netns_is_rejected_with_code_8() {
        let rec = Recorder::default();
        let e = err_json(&run(
            &env_for("ADD", "/own"),
            r#"{"name":"n","cniVersion":"1.0.0"}"#,
            &rec,
        ));
        assert_eq!(e["code"], 8);
        assert_eq!(e["cniVersion"], "1.0.0");
        assert!(rec.calls.borrow().is_empty());
        let mut env = env_for("ADD", "/own");
        env.push(("CNI_NETNS_OVERRIDE", "true"));
        assert_eq!(run(&env, r#"{"name":"n"}"#, &rec).code, 0);
    }

    #[test]
    fn add_with_missing_netns_fails_but_del_succeeds() {
        let rec = Recorder::default();
        let e = err_json(&run(&env_for("ADD", "/gone"), r#"{"name":"n"}"#, &rec));
        assert_eq!(e["code"], 8);
        let r = run(&env_for("DEL", "/gone"), r#"{"name":"n"}"#, &rec);
        assert_eq!(r.code, 0);
        let mut env = env_for("DEL", "");
        env.retain(|(k, _)| *k != "CNI_NETNS");
        let r = run(&env, r#"{"name":"n"}"#, &rec);
        assert_eq!((r.code, r.stdout.as_str()), (0, ""));
        assert_eq!(rec.calls.borrow().as_slice(), ["DEL /gone", "DEL "]);
    }

    #[test]
    fn handler_error_is_printed_with_config_version() {
        let rec = Recorder {
            fail_add: Some(CniError::internal("boom")),
            ..Default::default()
        };
        let e = err_json(&run(
            &env_for("ADD", "/pod"),
            r#"{"name":"n","cniVersion":"0.3.1"}"#,
            &rec,
        ));
        assert_eq!(e, json!({"cniVersion":"0.3.1","code":999,"msg":"boom"}));
    }
}
