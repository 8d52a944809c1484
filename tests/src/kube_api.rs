//! A small HTTPS Kubernetes API server for the plugin tests: it serves Pod JSON in the shape
//! the API returns it (`GET /api/v1/namespaces/{ns}/pods/{name}`), checks the bearer token,
//! answers 401/404 (or any status a test sets) with the API's `Status` objects, and records
//! every request. Its certificate is signed by a throwaway CA (made with the openssl CLI), so
//! the plugin's client verifies it exactly as it would a real API server.
use anyhow::{Context as _, Result, bail};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Threads accepting connections.
const ACCEPTORS: usize = 4;

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
}

#[derive(Default)]
struct State {
    pods: HashMap<(String, String), Value>,
    /// Other objects, by API path (`/apis/apps/v1/namespaces/ns/daemonsets/name`).
    objects: HashMap<String, Value>,
    /// Forced answers per API path: status + body.
    forced_paths: HashMap<String, (u16, Value)>,
    /// Forced answers per (ns, name): status + body.
    forced: HashMap<(String, String), (u16, Value)>,
    /// How long the answer takes, per (ns, name).
    delays: HashMap<(String, String), Duration>,
    requests: Vec<Recorded>,
}

pub struct FakeKubeApi {
    pub addr: SocketAddr,
    pub token: String,
    /// PEM of the CA that signed the server certificate.
    pub ca_pem: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    dir: PathBuf,
}

/// Which TLS trust the kubeconfig carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// `certificate-authority-data` with the server's CA.
    Ca,
    /// `insecure-skip-tls-verify: true` (Istio's SKIP_TLS_VERIFY).
    SkipVerify,
    /// `certificate-authority-data` with an unrelated CA: verification must fail.
    WrongCa,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("run openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {:?} failed: {}",
            args,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A self-signed P-256 certificate valid for 2 days (`openssl req -x509`), with `extra`
/// arguments.
fn self_signed(dir: &Path, key: &str, out: &str, subject: &str, extra: &[&str]) -> Result<()> {
    let mut args = vec![
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key,
        "-out",
        out,
        "-days",
        "2",
        "-subj",
        subject,
    ];
    args.extend_from_slice(extra);
    openssl(dir, &args)
}

/// Makes `ca.pem` and a `server.pem`/`server.key` for 127.0.0.1 signed by it, in `dir`.
fn make_certs(dir: &Path, prefix: &str) -> Result<()> {
    let ca_key = format!("{prefix}ca.key");
    let ca = format!("{prefix}ca.pem");
    self_signed(dir, &ca_key, &ca, "/CN=fastpath-test-ca", &[])?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=kubernetes",
        ],
    )?;
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:kubernetes.default.svc\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    )
}

/// Makes a self-signed CA certificate (`CA:TRUE`) that also serves: `server.pem` is `ca.pem`,
/// valid for `san` (as some clusters serve their API).
fn make_self_signed_ca(dir: &Path, san: &str) -> Result<()> {
    std::fs::write(
        dir.join("ca-ext.cnf"),
        format!(
            "[req]\ndistinguished_name=dn\n[dn]\n[v3]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,digitalSignature\nsubjectAltName={san}\n"
        ),
    )?;
    self_signed(
        dir,
        "server.key",
        "ca.pem",
        "/CN=kubernetes-self-signed",
        &["-config", "ca-ext.cnf", "-extensions", "v3"],
    )?;
    std::fs::copy(dir.join("ca.pem"), dir.join("server.pem"))?;
    Ok(())
}

/// The certificate the fake API server presents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerCert {
    /// A server certificate signed by a CA (the usual case).
    SignedByCa,
    /// Its self-signed CA certificate itself, valid for 127.0.0.1 (Go's client trusts it
    /// when the kubeconfig's CA data holds exactly that certificate).
    SelfSignedCa,
    /// As [`ServerCert::SelfSignedCa`], but valid for another name only.
    SelfSignedCaOtherName,
}

impl FakeKubeApi {
    /// Starts the server on 127.0.0.1 (random port); `dir` holds its certificates.
    pub fn start(dir: &Path, token: &str) -> Result<Self> {
        Self::start_with(dir, token, ServerCert::SignedByCa)
    }

    /// [`FakeKubeApi::start`] presenting `cert`.
    pub fn start_with(dir: &Path, token: &str, cert: ServerCert) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        match cert {
            ServerCert::SignedByCa => make_certs(dir, "")?,
            ServerCert::SelfSignedCa => make_self_signed_ca(dir, "IP:127.0.0.1")?,
            ServerCert::SelfSignedCaOtherName => {
                make_self_signed_ca(dir, "DNS:not-the-api.example")?
            }
        }
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.join("server.pem"))?
                .collect::<std::result::Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_file(dir.join("server.key"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(certs, key)?,
        );
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        // A few threads waiting in accept() (no thread start per request), each answering one
        // request per connection, so the server adds little to what a benchmark measures.
        for _ in 0..ACCEPTORS {
            let listener = listener.try_clone()?;
            let (state, stop, token, config) = (
                state.clone(),
                stop.clone(),
                token.to_string(),
                config.clone(),
            );
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let _ = serve(conn, config.clone(), &state, &token);
                }
            });
        }
        Ok(Self {
            addr,
            token: token.to_string(),
            ca_pem: std::fs::read_to_string(dir.join("ca.pem"))?,
            state,
            stop,
            dir: dir.to_path_buf(),
        })
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Serves `pod` (keyed by its metadata namespace/name).
    pub fn set_pod(&self, pod: Value) {
        let key = (
            pod["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            pod["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        self.state.lock().unwrap().pods.insert(key, pod);
    }

    /// Serves `object` at the API `path` (a DaemonSet, a Node).
    pub fn set_object(&self, path: &str, object: Value) {
        self.state
            .lock()
            .unwrap()
            .objects
            .insert(path.to_string(), object);
    }

    /// Stops serving the object at `path` (404 from then on).
    pub fn remove_object(&self, path: &str) {
        self.state.lock().unwrap().objects.remove(path);
    }

    /// Answers requests for `path` with this status and a Status body instead.
    pub fn force_path_status(&self, path: &str, status: u16, message: &str) {
        self.state
            .lock()
            .unwrap()
            .forced_paths
            .insert(path.to_string(), (status, status_object(status, message)));
    }

    /// Answers requests for ns/name with this status and body instead.
    pub fn force_status(&self, ns: &str, name: &str, status: u16, message: &str) {
        let body = status_object(status, message);
        self.state
            .lock()
            .unwrap()
            .forced
            .insert((ns.to_string(), name.to_string()), (status, body));
    }

    /// Answers requests for ns/name only after `delay` (an overloaded API server).
    pub fn delay(&self, ns: &str, name: &str, delay: Duration) {
        self.state
            .lock()
            .unwrap()
            .delays
            .insert((ns.to_string(), name.to_string()), delay);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Requests for one pod.
    pub fn requests_for(&self, ns: &str, name: &str) -> usize {
        let path = format!("/api/v1/namespaces/{ns}/pods/{name}");
        self.requests().iter().filter(|r| r.path == path).count()
    }

    /// Writes the plugin's kubeconfig (Istio's golden shape) at `path`.
    pub fn write_kubeconfig(&self, path: &Path, trust: Trust, token: &str) -> Result<()> {
        use base64::Engine as _;
        let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
        let tls_line = match trust {
            Trust::SkipVerify => "    insecure-skip-tls-verify: true\n".to_string(),
            Trust::Ca => format!("    certificate-authority-data: {}\n", b64(&self.ca_pem)),
            Trust::WrongCa => {
                make_certs(&self.dir, "other-")?;
                let other = std::fs::read_to_string(self.dir.join("other-ca.pem"))?;
                format!("    certificate-authority-data: {}\n", b64(&other))
            }
        };
        let text = format!(
            "apiVersion: v1\nclusters:\n- cluster:\n{tls_line}    server: {}\n  name: local\ncontexts:\n- context:\n    cluster: local\n    user: istio-cni\n  name: istio-cni-context\ncurrent-context: istio-cni-context\nkind: Config\nusers:\n- name: istio-cni\n  user:\n    token: {token}\n",
            self.url()
        );
        std::fs::write(path, text)?;
        Ok(())
    }
}

impl Drop for FakeKubeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for _ in 0..ACCEPTORS {
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        }
    }
}

/// The API's `Status` object for an error.
pub fn status_object(code: u16, message: &str) -> Value {
    let reason = match code {
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        _ => "Unknown",
    };
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn serve(
    conn: TcpStream,
    config: Arc<rustls::ServerConfig>,
    state: &Mutex<State>,
    token: &str,
) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_nodelay(true)?;
    let tls = rustls::ServerConnection::new(config)?;
    let mut stream = rustls::StreamOwned::new(tls, conn);
    let mut reader = BufReader::new(&mut stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line)? == 0 {
        return Ok(());
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let authorization = headers.get("authorization").cloned();
    let answer = {
        let mut st = state.lock().unwrap();
        st.requests.push(Recorded {
            method: method.clone(),
            path: path.clone(),
            authorization: authorization.clone(),
        });
        let delay = st
            .delays
            .iter()
            .find(|((ns, name), _)| path == format!("/api/v1/namespaces/{ns}/pods/{name}"))
            .map(|(_, d)| *d);
        let answer = answer(&st, &method, &path, authorization.as_deref(), token);
        (answer, delay)
    };
    let ((status, answer), delay) = (answer.0, answer.1);
    if let Some(d) = delay {
        std::thread::sleep(d);
    }
    let body = answer.to_string();
    let reason = if status == 200 { "OK" } else { "Error" };
    // A forced redirect goes where its message says (`force_status(.., 302, "http://..")`).
    let location = match (status, answer["message"].as_str()) {
        (300..=399, Some(to)) => format!("Location: {to}\r\n"),
        _ => String::new(),
    };
    // One write: a response split over TLS records waits on Nagle + delayed ACK (40 ms).
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{location}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.conn.send_close_notify();
    stream.flush()?;
    Ok(())
}

fn answer(
    st: &State,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    token: &str,
) -> (u16, Value) {
    if authorization != Some(&format!("Bearer {token}")) {
        return (401, status_object(401, "Unauthorized"));
    }
    if let Some((s, b)) = st.forced_paths.get(path) {
        return (*s, b.clone());
    }
    if method == "GET"
        && let Some(o) = st.objects.get(path)
    {
        return (200, o.clone());
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => {
            let key = (ns.to_string(), name.to_string());
            if let Some((s, b)) = st.forced.get(&key) {
                return (*s, b.clone());
            }
            match st.pods.get(&key) {
                Some(p) => (200, p.clone()),
                None => (
                    404,
                    status_object(404, &format!("pods \"{name}\" not found")),
                ),
            }
        }
        _ => (
            404,
            status_object(404, "the server could not find the requested resource"),
        ),
    }
}

/// A pod as the API returns it after Istio's injector ran with CNI enabled (no istio-init;
/// `istio-validation` init container; `istio-proxy` sidecar; `sidecar.istio.io/status`).
pub fn sidecar_pod(
    ns: &str,
    name: &str,
    annotations: &[(&str, &str)],
    proxy_env: &[(&str, &str)],
) -> Value {
    let mut ann = serde_json::Map::new();
    ann.insert(
        "sidecar.istio.io/status".into(),
        json!("{\"initContainers\":[\"istio-validation\"],\"containers\":[\"istio-proxy\"],\"volumes\":[\"istio-envoy\"],\"imagePullSecrets\":null,\"revision\":\"default\"}"),
    );
    ann.insert(
        "kubectl.kubernetes.io/default-container".into(),
        json!("app"),
    );
    for (k, v) in annotations {
        ann.insert((*k).to_string(), json!(v));
    }
    let mut env = vec![
        json!({"name": "PILOT_CERT_PROVIDER", "value": "istiod"}),
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}),
    ];
    env.extend(
        proxy_env
            .iter()
            .map(|(k, v)| json!({"name": k, "value": v})),
    );
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {
            "name": name, "namespace": ns, "uid": format!("uid-{name}"), "resourceVersion": "1234",
            "creationTimestamp": "2026-11-26T07:00:00Z",
            "labels": {"app": name, "security.istio.io/tlsMode": "istio", "service.istio.io/canonical-name": name},
            "annotations": ann
        },
        "spec": {
            "initContainers": [{
                "name": "istio-validation", "image": "docker.io/istio/proxyv2:1.30.3",
                "args": ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020", "--log_output_level=default:info", "--run-validation", "--skip-rule-apply"],
                "securityContext": {"runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": true}
            }],
            "containers": [
                {"name": "app", "image": "nginx", "ports": [{"containerPort": 80, "protocol": "TCP"}]},
                {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.30.3",
                 "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local", "--proxyLogLevel=warning"],
                 "env": env,
                 "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
                 "securityContext": {"runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": true, "readOnlyRootFilesystem": true}}
            ],
            "nodeName": "node-1", "serviceAccountName": "default"
        },
        "status": {"phase": "Pending", "qosClass": "BestEffort"}
    })
}

/// A pod without a sidecar.
pub fn plain_pod(ns: &str, name: &str) -> Value {
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": {"app": name}},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]},
        "status": {"phase": "Pending"}
    })
}

/// The installer's side of the plugin's log socket (`<run dir>/log.sock`, `POST /log` with a
/// JSON array of JSON log lines): collects every line it receives.
pub struct LogSink {
    path: PathBuf,
    lines: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
}

impl LogSink {
    pub fn start(path: &Path) -> Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = std::os::unix::net::UnixListener::bind(path)?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (lines, stop) = (lines.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut conn) = conn else { continue };
                    if let Ok(body) = read_log_post(&mut conn) {
                        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                        let batch: Vec<String> = serde_json::from_slice(&body).unwrap_or_default();
                        let mut l = lines.lock().unwrap();
                        l.extend(batch.iter().filter_map(|s| serde_json::from_str(s).ok()));
                    }
                }
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            lines,
            stop,
        })
    }

    pub fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for a line with this `msg`.
    pub fn wait_for_msg(&self, msg: &str, timeout: Duration) -> Option<Value> {
        self.wait_for(|l| l["msg"] == msg, timeout)
    }

    /// Waits up to `timeout` for a line matching `pred`.
    pub fn wait_for(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Option<Value> {
        let until = std::time::Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| pred(l)) {
                return Some(l);
            }
            if std::time::Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LogSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

fn read_log_post(conn: &mut std::os::unix::net::UnixStream) -> Result<Vec<u8>> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn);
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("connection closed before the body");
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse()?;
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    Ok(body)
}
