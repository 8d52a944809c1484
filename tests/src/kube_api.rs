//! A small HTTPS Kubernetes API server for the tests. It serves Pod JSON in the shape the API
//! returns it (`GET /api/v1/namespaces/{ns}/pods/{name}`) and other objects by path, checks the
//! bearer token (any of a set a test may rotate), answers 401/404 (or any status a test sets)
//! with the API's `Status` objects, and records every request. Its certificate is signed by a
//! throwaway CA (made with the openssl CLI), so clients verify it exactly as they would a real
//! API server.
//!
//! Pods also behave as a real API server's pods do for a client that lists and watches them
//! (kube-rs' `watcher`/`reflector`, client-go informers):
//! - every pod change (`set_pod`, `remove_pod`, DELETE, PATCH) takes the next global
//!   resourceVersion, stored as the pod's `metadata.resourceVersion` (a string), and appends an
//!   ADDED/MODIFIED/DELETED event to a history;
//! - `GET /api/v1/pods` and `GET /api/v1/namespaces/{ns}/pods` answer a `PodList`, filtered by
//!   `fieldSelector` (`spec.nodeName`, `metadata.name`, `metadata.namespace`, `status.phase`,
//!   ...; `=`, `==`, `!=`) and `labelSelector` (`k=v`, `k!=v`, `k`, `!k`, `k in (..)`,
//!   `k notin (..)`), paged by `limit` + `continue` (every page comes from the snapshot the
//!   first page was cut from), at the `resourceVersion` / `resourceVersionMatch` asked
//!   (`Exact` rebuilds the older state from the history; 410 Expired once it is compacted);
//! - the same paths with `watch=true` stream a chunked response, one JSON event per line: the
//!   history after `resourceVersion` (or the current pods as ADDED when it is unset or "0";
//!   with `sendInitialEvents=true` followed by the `k8s.io/initial-events-end` BOOKMARK), then
//!   live events, a BOOKMARK about every second with `allowWatchBookmarks=true`, ending after
//!   `timeoutSeconds`. A pod that moves into a selection arrives as ADDED and one that moves
//!   out as DELETED, as the API's watch cache reports them. A watch from before the compacted
//!   history gets an ERROR event with a 410 Expired `Status`;
//! - DELETE (with `preconditions`) and PATCH (merge patch) of a pod or its `status`, and POST of an event
//!   (`v1` and `events.k8s.io/v1`): the writes Istio's CNI repair controller makes.
//!
//! Each connection carries one request (`Connection: close`). A few acceptor threads answer
//! the plain requests; every watch streams from a thread of its own.
use anyhow::{Context as _, Result, bail};
use fastpath_installer::repair::selector::{LabelReq, split_terms};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Threads accepting connections.
const ACCEPTORS: usize = 4;

/// The resourceVersion of an empty server: far from "0", which means "any version" to the API.
const FIRST_RESOURCE_VERSION: u64 = 1000;

/// How often an idle watch that allows bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    /// The query string (still URL-encoded), empty when there is none.
    pub query: String,
    pub authorization: Option<String>,
}

/// A pod's key: (namespace, name).
type Key = (String, String);

/// One change of a pod, as the history keeps it and open watches receive it.
struct Change {
    rv: u64,
    /// ADDED, MODIFIED or DELETED.
    kind: &'static str,
    /// The pod after the change; for DELETED its last state, with the deletion's
    /// resourceVersion (as the API sends it).
    object: Value,
    /// The pod before the change: a watch with a selector must see a pod that moves into its
    /// selection as ADDED and one that moves out as DELETED; an `Exact` list undoes changes
    /// with it.
    prev: Option<Value>,
}

struct State {
    pods: HashMap<Key, Value>,
    /// Other objects, by API path (`/apis/apps/v1/namespaces/ns/daemonsets/name`).
    objects: HashMap<String, Value>,
    /// Forced answers per API path: status + body.
    forced_paths: HashMap<String, (u16, Value)>,
    /// Forced answers per (ns, name): status + body.
    forced: HashMap<Key, (u16, Value)>,
    /// How long the answer takes, per (ns, name).
    delays: HashMap<Key, Duration>,
    requests: Vec<Recorded>,
    /// Bearer tokens accepted.
    tokens: Vec<String>,
    /// The last resourceVersion given out.
    rv: u64,
    /// Pod changes newer than `compacted_at`, oldest first.
    history: Vec<Arc<Change>>,
    /// Where the history starts: a watch or `Exact` list from before it gets 410 Expired.
    compacted_at: u64,
    /// One sender per open watch; dropping them ends the watches (`break_watches`).
    watchers: Vec<mpsc::Sender<Arc<Change>>>,
    /// Watch threads still streaming.
    open_watches: Arc<AtomicUsize>,
    /// The full item lists `continue` tokens page through: (resourceVersion, items).
    snapshots: Vec<(u64, Vec<Value>)>,
    /// Events POSTed, in order.
    events: Vec<Value>,
}

pub struct FakeKubeApi {
    pub addr: SocketAddr,
    /// The token accepted at start (see [`FakeKubeApi::set_tokens`]).
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
    make_certs_for(dir, prefix, &[])
}

/// [`make_certs`] with a server certificate valid for `ips` too.
fn make_certs_for(dir: &Path, prefix: &str, ips: &[IpAddr]) -> Result<()> {
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
    let extra: String = ips.iter().map(|ip| format!(",IP:{ip}")).collect();
    std::fs::write(
        dir.join("ext.cnf"),
        format!(
            "subjectAltName=IP:127.0.0.1{extra},DNS:kubernetes.default.svc\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        ),
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
        Self::start_at(dir, token, cert, IpAddr::from([127, 0, 0, 1]))
    }

    /// The server on `ip` (random port), e.g. a bridge's gateway address that pods reach as
    /// they reach the cluster's API service; the certificate is valid for `ip` too.
    pub fn start_on(dir: &Path, token: &str, ip: IpAddr) -> Result<Self> {
        Self::start_at(dir, token, ServerCert::SignedByCa, ip)
    }

    fn start_at(dir: &Path, token: &str, cert: ServerCert, ip: IpAddr) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        match cert {
            ServerCert::SignedByCa => make_certs_for(dir, "", &[ip])?,
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
        let listener = TcpListener::bind(SocketAddr::new(ip, 0))?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            pods: HashMap::new(),
            objects: HashMap::new(),
            forced_paths: HashMap::new(),
            forced: HashMap::new(),
            delays: HashMap::new(),
            requests: Vec::new(),
            tokens: vec![token.to_string()],
            rv: FIRST_RESOURCE_VERSION,
            history: Vec::new(),
            compacted_at: FIRST_RESOURCE_VERSION,
            watchers: Vec::new(),
            open_watches: Arc::new(AtomicUsize::new(0)),
            snapshots: Vec::new(),
            events: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        // A few threads waiting in accept() (no thread start per request), each answering one
        // request per connection, so the server adds little to what a benchmark measures.
        for _ in 0..ACCEPTORS {
            let listener = listener.try_clone()?;
            let (state, stop, config) = (state.clone(), stop.clone(), config.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let _ = serve(conn, config.clone(), &state);
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

    /// Serves `pod` (keyed by its metadata namespace/name): ADDED when new, else MODIFIED,
    /// with the next resourceVersion.
    pub fn set_pod(&self, pod: Value) {
        let key = key_of(&pod);
        self.state.lock().unwrap().change_pod(key, Some(pod));
    }

    /// Stops serving the pod (a DELETED event); `false` when there was none.
    pub fn remove_pod(&self, ns: &str, name: &str) -> bool {
        let key = (ns.to_string(), name.to_string());
        self.state.lock().unwrap().change_pod(key, None).is_some()
    }

    /// The pod as stored now (with its resourceVersion and every write applied).
    pub fn pod(&self, ns: &str, name: &str) -> Option<Value> {
        let key = (ns.to_string(), name.to_string());
        self.state.lock().unwrap().pods.get(&key).cloned()
    }

    /// The current resourceVersion (of the last change), as the API writes it.
    pub fn resource_version(&self) -> String {
        self.state.lock().unwrap().rv.to_string()
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

    /// Answers requests for `path` (without the query: lists and watches too) with this status
    /// and a Status body instead.
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

    /// Accepts any of these bearer tokens from now on (and no other): a rotated token.
    pub fn set_tokens(&self, tokens: &[&str]) {
        self.state.lock().unwrap().tokens = tokens.iter().map(|t| t.to_string()).collect();
    }

    /// Ends every open watch at once, without the response's last chunk or a TLS
    /// close_notify: a dropped connection.
    pub fn break_watches(&self) {
        self.state.lock().unwrap().watchers.clear();
    }

    /// Forgets the history (as etcd's compaction does): a watch or an `Exact` list from an
    /// older resourceVersion, or a `continue` token from before, gets 410 Expired.
    pub fn compact_history(&self) {
        let mut st = self.state.lock().unwrap();
        st.compacted_at = st.rv;
        st.history.clear();
    }

    /// Watch streams still open.
    pub fn open_watches(&self) -> usize {
        self.state
            .lock()
            .unwrap()
            .open_watches
            .load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Requests for one pod.
    pub fn requests_for(&self, ns: &str, name: &str) -> usize {
        let path = format!("/api/v1/namespaces/{ns}/pods/{name}");
        self.requests().iter().filter(|r| r.path == path).count()
    }

    /// GETs of one pod.
    pub fn pod_gets(&self, ns: &str, name: &str) -> usize {
        let path = format!("/api/v1/namespaces/{ns}/pods/{name}");
        self.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == path)
            .count()
    }

    /// Lists of pods (all namespaces or one), whatever they were answered.
    pub fn lists(&self) -> usize {
        self.pod_collection_gets(false)
    }

    /// Watches of pods (all namespaces or one), whatever they were answered.
    pub fn watches(&self) -> usize {
        self.pod_collection_gets(true)
    }

    fn pod_collection_gets(&self, watch: bool) -> usize {
        self.requests()
            .iter()
            .filter(|r| {
                r.method == "GET"
                    && pod_collection(&r.path).is_some()
                    && is_watch(&parse_query(&r.query)) == watch
            })
            .count()
    }

    /// The events POSTed (either API group), in order, as stored.
    pub fn events(&self) -> Vec<Value> {
        self.state.lock().unwrap().events.clone()
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
        self.break_watches();
        self.stop.store(true, Ordering::SeqCst);
        for _ in 0..ACCEPTORS {
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        }
    }
}

/// The API's `Status` object for an error.
pub fn status_object(code: u16, message: &str) -> Value {
    let reason = match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    };
    failure(code, reason, message).1
}

/// A `Status` answer with its HTTP status.
fn failure(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// A failure about one pod, with the `details` the API adds.
fn pod_failure(code: u16, reason: &str, name: &str, message: &str) -> (u16, Value) {
    let (code, mut body) = failure(code, reason, message);
    body["details"] = json!({"name": name, "kind": "pods"});
    (code, body)
}

fn key_of(object: &Value) -> Key {
    let field = |f: &str| {
        object["metadata"][f]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    (field("namespace"), field("name"))
}

impl State {
    /// Stores `new` as pod `key` (or removes it with `None`) under the next resourceVersion,
    /// records the change and hands it to the open watches. Returns the object of the event,
    /// `None` when removing a pod that is not there.
    fn change_pod(&mut self, key: Key, new: Option<Value>) -> Option<Value> {
        let prev = self.pods.get(&key).cloned();
        let (kind, mut object) = match (new, &prev) {
            (Some(pod), None) => ("ADDED", pod),
            (Some(pod), Some(_)) => ("MODIFIED", pod),
            (None, Some(old)) => ("DELETED", old.clone()),
            (None, None) => return None,
        };
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if kind == "DELETED" {
            self.pods.remove(&key);
        } else {
            self.pods.insert(key, object.clone());
        }
        let change = Arc::new(Change {
            rv: self.rv,
            kind,
            object: object.clone(),
            prev,
        });
        self.history.push(change.clone());
        self.watchers.retain(|w| w.send(change.clone()).is_ok());
        Some(object)
    }

    /// The pods as they were at `rv` (not before `compacted_at`), ordered by key as the API
    /// lists them.
    fn pods_at(&self, rv: u64) -> BTreeMap<Key, Value> {
        let mut pods: BTreeMap<Key, Value> = self.pods.clone().into_iter().collect();
        for change in self.history.iter().rev().take_while(|c| c.rv > rv) {
            let key = key_of(&change.object);
            match &change.prev {
                Some(prev) => pods.insert(key, prev.clone()),
                None => pods.remove(&key),
            };
        }
        pods
    }

    fn too_large(&self, rv: u64) -> (u16, Value) {
        failure(
            504,
            "Timeout",
            &format!("Too large resource version: {rv}, current: {}", self.rv),
        )
    }

    fn too_old(&self, rv: u64) -> (u16, Value) {
        failure(
            410,
            "Expired",
            &format!("too old resource version: {rv} ({})", self.compacted_at),
        )
    }
}

/// What a request gets: a plain JSON answer, or a watch stream.
enum Reply {
    Json(u16, Value),
    Watch(Watch),
}

impl From<(u16, Value)> for Reply {
    fn from((status, body): (u16, Value)) -> Self {
        Reply::Json(status, body)
    }
}

struct Request<'a> {
    method: &'a str,
    path: &'a str,
    query: &'a str,
    authorization: Option<&'a str>,
    content_type: &'a str,
    body: &'a [u8],
}

fn serve(conn: TcpStream, config: Arc<rustls::ServerConfig>, state: &Mutex<State>) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    // A watch client that stops reading must not hold its thread forever.
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
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
    let target = parts.next().unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let authorization = headers.get("authorization").cloned();
    // `application/merge-patch+json; charset=utf-8` is still a merge patch.
    let content_type = headers
        .get("content-type")
        .map(|c| c.split(';').next().unwrap_or_default().trim().to_string())
        .unwrap_or_default();
    let (reply, delay, open_watches) = {
        let mut st = state.lock().unwrap();
        st.requests.push(Recorded {
            method: method.clone(),
            path: path.to_string(),
            query: query.to_string(),
            authorization: authorization.clone(),
        });
        let delay = st
            .delays
            .iter()
            .find(|((ns, name), _)| path == format!("/api/v1/namespaces/{ns}/pods/{name}"))
            .map(|(_, d)| *d);
        let request = Request {
            method: &method,
            path,
            query,
            authorization: authorization.as_deref(),
            content_type: &content_type,
            body: &body,
        };
        (handle(&mut st, &request), delay, st.open_watches.clone())
    };
    let (status, answer) = match reply {
        Reply::Json(status, answer) => (status, answer),
        Reply::Watch(watch) => {
            open_watches.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let _ = watch.stream(stream);
                open_watches.fetch_sub(1, Ordering::SeqCst);
            });
            return Ok(());
        }
    };
    if let Some(d) = delay {
        std::thread::sleep(d);
    }
    let body = answer.to_string();
    let reason = match status {
        200 => "OK",
        201 => "Created",
        _ => "Error",
    };
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

fn handle(st: &mut State, req: &Request<'_>) -> Reply {
    let authorized = st
        .tokens
        .iter()
        .any(|t| req.authorization == Some(format!("Bearer {t}").as_str()));
    if !authorized {
        return Reply::Json(401, status_object(401, "Unauthorized"));
    }
    if let Some((s, b)) = st.forced_paths.get(req.path) {
        return Reply::Json(*s, b.clone());
    }
    if req.method == "GET"
        && let Some(o) = st.objects.get(req.path)
    {
        return Reply::Json(200, o.clone());
    }
    if let Some(ns) = pod_collection(req.path) {
        return match req.method {
            "GET" => pods(st, ns, &parse_query(req.query)),
            _ => status_json(
                405,
                "the server does not allow this method on the requested resource",
            ),
        };
    }
    let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    match (req.method, parts.as_slice()) {
        (method, ["api", "v1", "namespaces", ns, "pods", name]) => {
            let key = (ns.to_string(), name.to_string());
            if let Some((s, b)) = st.forced.get(&key) {
                return Reply::Json(*s, b.clone());
            }
            match method {
                "GET" => match st.pods.get(&key) {
                    Some(p) => Reply::Json(200, p.clone()),
                    None => status_json(404, &format!("pods \"{name}\" not found")),
                },
                "DELETE" => delete_pod(st, key, req.body).into(),
                "PATCH" => patch_pod(st, key, req.content_type, req.body).into(),
                _ => status_json(
                    405,
                    "the server does not allow this method on the requested resource",
                ),
            }
        }
        // The status subresource: its metadata (labels) may be patched too, with less
        // privilege than the pod (what Istio's repair controller labels through).
        ("PATCH", ["api", "v1", "namespaces", ns, "pods", name, "status"]) => {
            let key = (ns.to_string(), name.to_string());
            if let Some((s, b)) = st.forced.get(&key) {
                return Reply::Json(*s, b.clone());
            }
            patch_pod(st, key, req.content_type, req.body).into()
        }
        ("POST", ["api", "v1", "namespaces", ns, "events"])
        | ("POST", ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"]) => {
            create_event(st, ns, req.body).into()
        }
        _ => status_json(404, "the server could not find the requested resource"),
    }
}

fn status_json(code: u16, message: &str) -> Reply {
    Reply::Json(code, status_object(code, message))
}

/// `Some(namespace)` (`None` for all namespaces) when `path` is a collection of pods.
fn pod_collection(path: &str) -> Option<Option<&str>> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", "pods"] => Some(None),
        ["api", "v1", "namespaces", ns, "pods"] => Some(Some(ns)),
        _ => None,
    }
}

type Query = HashMap<String, String>;

/// Splits a query string into its (URL-decoded) parameters; the last of a name wins.
fn parse_query(query: &str) -> Query {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

/// Decodes `%XX` and `+` (a space), as Go's `url.ParseQuery` does.
fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A boolean query parameter as Go's `strconv.ParseBool` reads it.
fn parse_bool(v: &str) -> bool {
    matches!(v, "1" | "t" | "T" | "true" | "TRUE" | "True")
}

fn is_watch(q: &Query) -> bool {
    q.get("watch").is_some_and(|w| parse_bool(w))
}

fn param<'a>(q: &'a Query, name: &str) -> &'a str {
    q.get(name).map(String::as_str).unwrap_or_default()
}

/// What a list or watch selects: a namespace, field and label requirements (all must hold).
struct Selector {
    ns: Option<String>,
    /// (field, equal?, value).
    fields: Vec<(String, bool, String)>,
    labels: Vec<LabelReq>,
}

/// The value of a pod field a field selector may name (the pod fields the API supports),
/// `None` for others.
fn pod_field(pod: &Value, field: &str) -> Option<String> {
    let path: &[&str] = match field {
        "metadata.name" => &["metadata", "name"],
        "metadata.namespace" => &["metadata", "namespace"],
        "spec.nodeName" => &["spec", "nodeName"],
        "spec.restartPolicy" => &["spec", "restartPolicy"],
        "spec.schedulerName" => &["spec", "schedulerName"],
        "spec.serviceAccountName" => &["spec", "serviceAccountName"],
        "status.phase" => &["status", "phase"],
        "status.podIP" => &["status", "podIP"],
        "status.nominatedNodeName" => &["status", "nominatedNodeName"],
        "spec.hostNetwork" => {
            return Some(
                pod["spec"]["hostNetwork"]
                    .as_bool()
                    .unwrap_or(false)
                    .to_string(),
            );
        }
        _ => return None,
    };
    let value = path.iter().fold(pod, |v, p| &v[*p]);
    Some(value.as_str().unwrap_or_default().to_string())
}

impl Selector {
    fn parse(ns: Option<&str>, q: &Query) -> std::result::Result<Self, (u16, Value)> {
        let mut fields = Vec::new();
        for term in split_terms(param(q, "fieldSelector")) {
            let (field, eq, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(failure(
                    400,
                    "BadRequest",
                    &format!("invalid selector: '{term}'; can't understand '{term}'"),
                ));
            };
            let field = field.trim();
            if pod_field(&Value::Null, field).is_none() {
                return Err(failure(
                    400,
                    "BadRequest",
                    &format!("field label not supported: {field}"),
                ));
            }
            fields.push((field.to_string(), eq, value.trim().to_string()));
        }
        let mut labels = Vec::new();
        for term in split_terms(param(q, "labelSelector")) {
            let Some(req) = LabelReq::parse(term) else {
                return Err(failure(
                    400,
                    "BadRequest",
                    &format!("unable to parse requirement: {term}"),
                ));
            };
            labels.push(req);
        }
        Ok(Self {
            ns: ns.map(str::to_string),
            fields,
            labels,
        })
    }

    fn is_empty(&self) -> bool {
        self.fields.is_empty() && self.labels.is_empty()
    }

    fn matches(&self, pod: &Value) -> bool {
        if let Some(ns) = &self.ns
            && pod["metadata"]["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        let fields_hold = self.fields.iter().all(|(field, eq, value)| {
            (pod_field(pod, field).as_deref() == Some(value.as_str())) == *eq
        });
        let labels_hold = self
            .labels
            .iter()
            .all(|req| req.holds(|k| pod["metadata"]["labels"][k].as_str()));
        fields_hold && labels_hold
    }

    /// The event a watch with this selection sees for `change`, if any.
    fn project(&self, change: &Change) -> Option<(&'static str, Value)> {
        let was_in = change.prev.as_ref().is_some_and(|p| self.matches(p));
        let now_in = change.kind != "DELETED" && self.matches(&change.object);
        let kind = match (was_in, now_in) {
            (false, false) => return None,
            (false, true) => "ADDED",
            (true, true) => "MODIFIED",
            (true, false) => "DELETED",
        };
        Some((kind, change.object.clone()))
    }
}

/// A list item: the API leaves `kind` and `apiVersion` to the list.
fn list_item(mut pod: Value) -> Value {
    if let Some(o) = pod.as_object_mut() {
        o.remove("kind");
        o.remove("apiVersion");
    }
    pod
}

/// A list or a watch of pods.
fn pods(st: &mut State, ns: Option<&str>, q: &Query) -> Reply {
    let sel = match Selector::parse(ns, q) {
        Ok(sel) => sel,
        Err(e) => return e.into(),
    };
    if is_watch(q) {
        watch(st, sel, q)
    } else {
        list(st, &sel, q).into()
    }
}

/// A `continue` token: base64url of JSON, as the API's are (opaque to clients).
fn encode_continue(rv: u64, snapshot: usize, offset: usize) -> String {
    use base64::Engine as _;
    let token = json!({"v": "meta.k8s.io/v1", "rv": rv, "snapshot": snapshot, "offset": offset});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

fn decode_continue(token: &str) -> Option<(u64, usize, usize)> {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    let v: Value = serde_json::from_slice(&raw).ok()?;
    Some((
        v["rv"].as_u64()?,
        usize::try_from(v["snapshot"].as_u64()?).ok()?,
        usize::try_from(v["offset"].as_u64()?).ok()?,
    ))
}

/// The resourceVersion a list is served at, from `resourceVersion` + `resourceVersionMatch`.
fn list_rv(st: &State, q: &Query) -> std::result::Result<u64, (u16, Value)> {
    let (rv, rvm) = (
        param(q, "resourceVersion"),
        param(q, "resourceVersionMatch"),
    );
    if rv.is_empty() {
        if !rvm.is_empty() {
            return Err(failure(
                422,
                "Invalid",
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        return Ok(st.rv);
    }
    let Ok(n) = rv.parse::<u64>() else {
        return Err(failure(
            400,
            "BadRequest",
            &format!("invalid resource version: {rv}"),
        ));
    };
    match rvm {
        // "0" is "any version"; a newer one than asked is fine ("not older than").
        "" | "NotOlderThan" if n > st.rv => Err(st.too_large(n)),
        "" | "NotOlderThan" => Ok(st.rv),
        "Exact" if n == 0 => Err(failure(
            422,
            "Invalid",
            "resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
        )),
        "Exact" if n > st.rv => Err(st.too_large(n)),
        "Exact" if n < st.compacted_at => Err(st.too_old(n)),
        "Exact" => Ok(n),
        other => Err(failure(
            422,
            "Invalid",
            &format!("resourceVersionMatch: Unsupported value: \"{other}\""),
        )),
    }
}

fn list(st: &mut State, sel: &Selector, q: &Query) -> (u16, Value) {
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => 0,
        Some(Ok(l)) => l,
        Some(Err(_)) => return failure(400, "BadRequest", "limit: Invalid value"),
    };
    let cont = param(q, "continue");
    // (resourceVersion, the full selection, its index in `snapshots` once kept, offset).
    let (rv, items, kept, offset) = if cont.is_empty() {
        let rv = match list_rv(st, q) {
            Ok(rv) => rv,
            Err(e) => return e,
        };
        let items: Vec<Value> = st
            .pods_at(rv)
            .into_values()
            .filter(|p| sel.matches(p))
            .map(list_item)
            .collect();
        (rv, items, None, 0)
    } else {
        let found = decode_continue(cont).filter(|(_, s, _)| *s < st.snapshots.len());
        let Some((rv, snapshot, offset)) = found else {
            return failure(400, "BadRequest", "continue key is not valid");
        };
        if rv < st.compacted_at {
            return failure(
                410,
                "Expired",
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
            );
        }
        (rv, st.snapshots[snapshot].1.clone(), Some(snapshot), offset)
    };
    let start = offset.min(items.len());
    let end = match limit {
        0 => items.len(),
        l => (start + l).min(items.len()),
    };
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    let page = items[start..end].to_vec();
    if end < items.len() {
        let left = items.len() - end;
        // Later pages come from the first page's snapshot, as the API serves them from the
        // etcd revision of the first page.
        let snapshot = kept.unwrap_or_else(|| {
            st.snapshots.push((rv, items));
            st.snapshots.len() - 1
        });
        metadata["continue"] = json!(encode_continue(rv, snapshot, end));
        // The API counts what is left only when it need not filter.
        if sel.is_empty() {
            metadata["remainingItemCount"] = json!(left);
        }
    }
    (
        200,
        json!({"kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": page}),
    )
}

/// The object of a BOOKMARK event.
fn bookmark(rv: u64, initial_events_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": "Pod", "apiVersion": "v1", "metadata": metadata})
}

fn event_line(kind: &str, object: Value) -> String {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    line
}

/// A watch stream, set up under the lock; [`Watch::stream`] writes it.
struct Watch {
    /// Events to send first (history, initial state, or the 410 ERROR).
    first: Vec<String>,
    /// Live changes; `None` when the stream ends after `first`.
    live: Option<mpsc::Receiver<Arc<Change>>>,
    sel: Selector,
    bookmarks: bool,
    timeout: Option<Duration>,
    /// The resourceVersion every change up to has been seen: what a bookmark says.
    seen: u64,
}

fn watch(st: &mut State, sel: Selector, q: &Query) -> Reply {
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| parse_bool(v));
    let initial_events = q.get("sendInitialEvents").map(|v| parse_bool(v));
    let (rv, rvm) = (
        param(q, "resourceVersion"),
        param(q, "resourceVersionMatch"),
    );
    let timeout = match q.get("timeoutSeconds").map(|t| t.parse::<u64>()) {
        None | Some(Ok(0)) => None,
        Some(Ok(t)) => Some(Duration::from_secs(t)),
        Some(Err(_)) => return status_json(400, "timeoutSeconds: Invalid value"),
    };
    // The API's validation of a watch's parameters.
    if initial_events == Some(true) {
        if rvm != "NotOlderThan" {
            return status_json(
                422,
                "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            );
        }
        if !bookmarks {
            return status_json(
                422,
                "allowWatchBookmarks: Forbidden: sendInitialEvents requires setting allowWatchBookmarks to true",
            );
        }
    } else if !rvm.is_empty() {
        return status_json(
            422,
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        );
    }
    let from = match rv {
        "" | "0" => None,
        rv => match rv.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => return status_json(400, &format!("invalid resource version: {rv}")),
        },
    };
    let mut first = Vec::new();
    let mut ends = false;
    match (initial_events, from) {
        // The current state as ADDED events: asked for, or implied by "any version".
        (Some(true), _) | (None, None) => {
            let mut pods: Vec<(&Key, &Value)> = st.pods.iter().collect();
            pods.sort_by(|a, b| a.0.cmp(b.0));
            for (_, pod) in pods.into_iter().filter(|(_, p)| sel.matches(p)) {
                first.push(event_line("ADDED", pod.clone()));
            }
            if initial_events == Some(true) {
                first.push(event_line("BOOKMARK", bookmark(st.rv, true)));
            }
        }
        (Some(false), None) => {}
        (_, Some(n)) if n < st.compacted_at => {
            first.push(event_line("ERROR", st.too_old(n).1));
            ends = true;
        }
        (_, Some(n)) => {
            for change in st.history.iter().filter(|c| c.rv > n) {
                if let Some((kind, object)) = sel.project(change) {
                    first.push(event_line(kind, object));
                }
            }
        }
    }
    let live = (!ends).then(|| {
        let (tx, rx) = mpsc::channel();
        st.watchers.push(tx);
        rx
    });
    Reply::Watch(Watch {
        first,
        live,
        sel,
        bookmarks,
        timeout,
        seen: st.rv,
    })
}

type TlsStream = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

/// Appends `line` as one chunk of a chunked body.
fn push_chunk(out: &mut Vec<u8>, line: &str) {
    out.extend_from_slice(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes());
}

impl Watch {
    fn stream(mut self, mut stream: TlsStream) -> std::io::Result<()> {
        let mut out = b"HTTP/1.1 200 OK\r\nCache-Control: no-cache, private\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
        for line in &self.first {
            push_chunk(&mut out, line);
        }
        stream.write_all(&out)?;
        stream.flush()?;
        let Some(live) = self.live.take() else {
            return finish(stream);
        };
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let mut next_bookmark = Instant::now() + BOOKMARK_EVERY;
        loop {
            let now = Instant::now();
            if deadline.is_some_and(|d| d <= now) {
                return finish(stream);
            }
            let wake = match (deadline, self.bookmarks) {
                (Some(d), true) => Some(d.min(next_bookmark)),
                (Some(d), false) => Some(d),
                (None, true) => Some(next_bookmark),
                (None, false) => None,
            };
            let got = match wake {
                Some(w) => live.recv_timeout(w.saturating_duration_since(now)),
                None => live.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let mut out = Vec::new();
            match got {
                Ok(change) => {
                    self.seen = change.rv;
                    if let Some((kind, object)) = self.sel.project(&change) {
                        push_chunk(&mut out, &event_line(kind, object));
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.bookmarks && Instant::now() >= next_bookmark {
                        push_chunk(
                            &mut out,
                            &event_line("BOOKMARK", bookmark(self.seen, false)),
                        );
                        next_bookmark = Instant::now() + BOOKMARK_EVERY;
                    }
                }
                // `break_watches` (or the server's end): drop the connection, with neither the
                // last chunk nor a close_notify, as a lost connection looks to the client.
                Err(RecvTimeoutError::Disconnected) => {
                    return stream.sock.shutdown(Shutdown::Both);
                }
            }
            if !out.is_empty() {
                stream.write_all(&out)?;
                stream.flush()?;
            }
        }
    }
}

/// Ends a chunked response the way the API does when a watch times out.
fn finish(mut stream: TlsStream) -> std::io::Result<()> {
    stream.write_all(b"0\r\n\r\n")?;
    stream.conn.send_close_notify();
    stream.flush()
}

fn json_body(body: &[u8]) -> std::result::Result<Value, (u16, Value)> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body)
        .map_err(|e| failure(400, "BadRequest", &format!("invalid JSON body: {e}")))
}

/// DELETE of a pod, honouring `DeleteOptions.preconditions`.
fn delete_pod(st: &mut State, key: Key, body: &[u8]) -> (u16, Value) {
    let options = match json_body(body) {
        Ok(o) => o,
        Err(e) => return e,
    };
    let name = key.1.clone();
    let Some(pod) = st.pods.get(&key) else {
        return pod_failure(
            404,
            "NotFound",
            &name,
            &format!("pods \"{name}\" not found"),
        );
    };
    for (field, what) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
        let (Some(want), have) = (
            options["preconditions"][field].as_str(),
            pod["metadata"][field].as_str().unwrap_or_default(),
        ) else {
            continue;
        };
        if want != have {
            return pod_failure(
                409,
                "Conflict",
                &name,
                &format!(
                    "Operation cannot be fulfilled on pods \"{name}\": Precondition failed: {what} in precondition: {want}, {what} in object meta: {have}"
                ),
            );
        }
    }
    match st.change_pod(key, None) {
        Some(pod) => (200, pod),
        None => pod_failure(
            404,
            "NotFound",
            &name,
            &format!("pods \"{name}\" not found"),
        ),
    }
}

/// Applies a JSON merge patch (RFC 7386) to `target`.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(t) = target {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// PATCH of a pod: a merge patch (a strategic merge patch is applied as one, which is the
/// same for the maps a repair controller patches: labels, annotations).
fn patch_pod(st: &mut State, key: Key, content_type: &str, body: &[u8]) -> (u16, Value) {
    if !matches!(
        content_type,
        "application/merge-patch+json" | "application/strategic-merge-patch+json"
    ) {
        return failure(
            415,
            "UnsupportedMediaType",
            &format!(
                "the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json (got {content_type:?})"
            ),
        );
    }
    let patch = match json_body(body) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let name = key.1.clone();
    let Some(old) = st.pods.get(&key).cloned() else {
        return pod_failure(
            404,
            "NotFound",
            &name,
            &format!("pods \"{name}\" not found"),
        );
    };
    // A resourceVersion in the patch is a precondition, as the API treats it.
    if let Some(want) = patch["metadata"]["resourceVersion"].as_str()
        && Some(want) != old["metadata"]["resourceVersion"].as_str()
    {
        return pod_failure(
            409,
            "Conflict",
            &name,
            &format!(
                "Operation cannot be fulfilled on pods \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
        );
    }
    let mut new = old.clone();
    merge_patch(&mut new, &patch);
    new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
    for field in ["name", "namespace", "uid"] {
        if new["metadata"][field] != old["metadata"][field] {
            return pod_failure(
                422,
                "Invalid",
                &name,
                &format!("Pod \"{name}\" is invalid: metadata.{field}: field is immutable"),
            );
        }
    }
    // A patch that changes nothing writes nothing (no new resourceVersion, no event).
    if new == old {
        return (200, old);
    }
    match st.change_pod(key, Some(new)) {
        Some(pod) => (200, pod),
        None => pod_failure(
            404,
            "NotFound",
            &name,
            &format!("pods \"{name}\" not found"),
        ),
    }
}

/// POST of an event (`v1` or `events.k8s.io/v1`) into `ns`.
fn create_event(st: &mut State, ns: &str, body: &[u8]) -> (u16, Value) {
    let mut event = match json_body(body) {
        Ok(e) if e.is_object() => e,
        Ok(_) => return failure(400, "BadRequest", "the body is not an object"),
        Err(e) => return e,
    };
    match event["metadata"]["namespace"].as_str() {
        Some(other) if !other.is_empty() && other != ns => {
            return failure(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            );
        }
        _ => event["metadata"]["namespace"] = json!(ns),
    }
    st.rv += 1;
    let rv = st.rv;
    let name = match (
        event["metadata"]["name"].as_str().filter(|n| !n.is_empty()),
        event["metadata"]["generateName"].as_str(),
    ) {
        (Some(name), _) => name.to_string(),
        // The API appends 5 random characters; the resourceVersion makes them unique here.
        (None, Some(prefix)) => format!("{prefix}{:05x}", rv & 0xf_ffff),
        (None, None) => {
            return failure(
                422,
                "Invalid",
                "Event is invalid: metadata.name: Required value: name or generateName is required",
            );
        }
    };
    let taken = st
        .events
        .iter()
        .any(|e| e["metadata"]["namespace"] == ns && e["metadata"]["name"] == name.as_str());
    if taken {
        let (code, mut body) = failure(
            409,
            "AlreadyExists",
            &format!("events \"{name}\" already exists"),
        );
        body["details"] = json!({"name": name, "kind": "events"});
        return (code, body);
    }
    event["metadata"]["name"] = json!(name);
    event["metadata"]["uid"] = json!(format!("uid-event-{rv}"));
    event["metadata"]["resourceVersion"] = json!(rv.to_string());
    st.events.push(event.clone());
    (201, event)
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
