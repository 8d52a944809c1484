//! The one Kubernetes call the plugin makes: `GET /api/v1/namespaces/{ns}/pods/{name}`, with
//! the server, CA (or skip-verify) and bearer token of the kubeconfig the installer writes
//! (`<cni_agent_run_dir>/istio-cni-kubeconfig`, client-go's YAML shape).
use base64::Engine as _;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Time limits of one request: TCP connect, then each of send and receive.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
struct KubeconfigFile {
    clusters: Vec<NamedCluster>,
    users: Vec<NamedUser>,
    contexts: Vec<NamedContext>,
    current_context: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct NamedCluster {
    name: String,
    cluster: Cluster,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
struct Cluster {
    server: String,
    certificate_authority_data: Option<String>,
    certificate_authority: Option<String>,
    insecure_skip_tls_verify: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct NamedUser {
    name: String,
    user: User,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct User {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct NamedContext {
    name: String,
    context: Context,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Context {
    cluster: String,
    user: String,
}

/// What the plugin needs from a kubeconfig.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeAccess {
    /// `https://host:port`, without a trailing slash.
    pub server: String,
    /// PEM bundle of the CA(s) to trust; `None` with `insecure` means skip verification.
    pub ca_pem: Option<Vec<u8>>,
    pub insecure: bool,
    pub token: Option<String>,
}

/// Why a kubeconfig's text cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KubeconfigParseError {
    #[error("invalid kubeconfig YAML: {0}")]
    Yaml(#[source] Box<serde_saphyr::Error>),
    #[error("kubeconfig names no cluster")]
    NoCluster,
    #[error("kubeconfig cluster {cluster:?} has no server")]
    NoServer { cluster: String },
    #[error("certificate-authority-data is not base64: {0}")]
    CaDataNotBase64(#[source] base64::DecodeError),
    #[error("read certificate-authority {}: {source}", path.display())]
    ReadCa {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("read tokenFile {}: {source}", path.display())]
    ReadTokenFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Why the kubeconfig file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("read kubeconfig {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: KubeconfigParseError,
    },
}

/// Parses kubeconfig YAML text. Relative file references are resolved against `base_dir`.
pub fn parse_kubeconfig(
    text: &str,
    base_dir: &std::path::Path,
) -> Result<KubeAccess, KubeconfigParseError> {
    let file: KubeconfigFile =
        serde_saphyr::from_str(text).map_err(|e| KubeconfigParseError::Yaml(Box::new(e)))?;
    let ctx = file
        .contexts
        .iter()
        .find(|c| c.name == file.current_context)
        .or(file.contexts.first())
        .map(|c| &c.context);
    let cluster = match ctx {
        Some(c) => file.clusters.iter().find(|k| k.name == c.cluster),
        None => file.clusters.first(),
    }
    .ok_or(KubeconfigParseError::NoCluster)?;
    let user = match ctx {
        Some(c) => file.users.iter().find(|u| u.name == c.user),
        None => file.users.first(),
    };
    let c = &cluster.cluster;
    if c.server.is_empty() {
        return Err(KubeconfigParseError::NoServer {
            cluster: cluster.name.clone(),
        });
    }
    let resolve = |p: &str| {
        let p = std::path::Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base_dir.join(p)
        }
    };
    let ca_pem = if let Some(data) = c.certificate_authority_data.as_deref() {
        let compact: String = data.chars().filter(|c| !c.is_whitespace()).collect();
        Some(
            base64::engine::general_purpose::STANDARD
                .decode(compact)
                .map_err(KubeconfigParseError::CaDataNotBase64)?,
        )
    } else if let Some(path) = c.certificate_authority.as_deref() {
        let p = resolve(path);
        Some(
            std::fs::read(&p).map_err(|source| KubeconfigParseError::ReadCa {
                path: p.clone(),
                source,
            })?,
        )
    } else {
        None
    };
    let token = match user.map(|u| &u.user) {
        Some(User { token: Some(t), .. }) if !t.is_empty() => Some(t.trim().to_string()),
        Some(User {
            token_file: Some(f),
            ..
        }) => {
            let p = resolve(f);
            Some(
                std::fs::read_to_string(&p)
                    .map_err(|source| KubeconfigParseError::ReadTokenFile {
                        path: p.clone(),
                        source,
                    })?
                    .trim()
                    .to_string(),
            )
        }
        _ => None,
    };
    Ok(KubeAccess {
        server: c.server.trim_end_matches('/').to_string(),
        ca_pem,
        insecure: c.insecure_skip_tls_verify,
        token,
    })
}

/// Reads and parses the kubeconfig file.
pub fn load_kubeconfig(path: &str) -> Result<KubeAccess, KubeconfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| KubeconfigError::Read {
        path: path.to_string(),
        source,
    })?;
    let dir = std::path::Path::new(path)
        .parent()
        .unwrap_or(std::path::Path::new("/"));
    parse_kubeconfig(&text, dir).map_err(|source| KubeconfigError::Parse {
        path: path.to_string(),
        source,
    })
}

/// Why a GET failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchError {
    /// The API answered with this HTTP status; the text is its `message` (or body).
    Status(u16, String),
    /// No answer (connect, TLS, timeout).
    Transport(String),
    /// An answer that is not a Pod.
    Decode(String),
    /// The kubeconfig could not be used.
    Config(String),
    /// The API server's certificate cannot be verified with the kubeconfig's CA: no retry
    /// can change that.
    Certificate(String),
}

impl FetchError {
    /// Whether another attempt could succeed (Istio retries; a certificate that does not
    /// verify, a kubeconfig that cannot be used or a pod name the API refuses never will).
    pub fn is_permanent(&self) -> bool {
        matches!(self, FetchError::Certificate(_) | FetchError::Config(_))
    }
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Status(401, m) => write!(
                f,
                "Unauthorized (401): {m} (the token in the plugin kubeconfig was rejected; install-cni rewrites it when the service account token rotates)"
            ),
            FetchError::Status(403, m) => write!(
                f,
                "Forbidden (403): {m} (the istio-cni service account needs get on pods)"
            ),
            FetchError::Status(404, m) => write!(f, "pod not found (404): {m}"),
            FetchError::Status(s @ 300..=399, m) => write!(
                f,
                "the API server answered with a redirect ({s}, to {m}), which is not followed (the kubeconfig must name the API server itself)"
            ),
            FetchError::Status(s, m) => write!(f, "API server answered {s}: {m}"),
            FetchError::Transport(m) => write!(f, "cannot reach the API server: {m}"),
            FetchError::Decode(m) => write!(f, "the API server's answer is not a Pod: {m}"),
            FetchError::Config(m) => write!(f, "{m}"),
            FetchError::Certificate(m) => write!(
                f,
                "the API server's certificate is not trusted: {m} (check certificate-authority-data in the plugin kubeconfig; install-cni writes it from the service account's ca.crt)"
            ),
        }
    }
}

/// A Kubernetes object name or namespace must be a DNS-1123 label/subdomain; anything else is
/// refused before it reaches a URL.
pub fn valid_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

fn agent(access: &KubeAccess) -> Result<ureq::Agent, FetchError> {
    use ureq::tls::{TlsConfig, TlsProvider};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(provider.clone());
    // Verification as Istio's Go client does it (`crate::tls`), under ureq's own TCP transport;
    // insecure-skip-tls-verify uses ureq's TLS with verification off.
    let go_trust = if access.insecure {
        None
    } else if let Some(pem) = &access.ca_pem {
        let mut roots = Vec::new();
        for item in ureq::tls::parse_pem(pem) {
            match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => {
                    roots.push(rustls::pki_types::CertificateDer::from(c.der().to_vec()));
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(FetchError::Config(format!(
                        "kubeconfig certificate-authority-data is not a PEM certificate: {e}"
                    )));
                }
            }
        }
        if roots.is_empty() {
            return Err(FetchError::Config(
                "kubeconfig certificate-authority-data holds no certificate".into(),
            ));
        }
        let verifier = crate::tls::GoTrust::new(roots, provider.clone())
            .map_err(|e| FetchError::Config(e.to_string()))?;
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| FetchError::Config(format!("TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Some(crate::tls::TlsConnector {
            config: Arc::new(config),
        })
    } else {
        return Err(FetchError::Config(
            "kubeconfig has neither certificate-authority(-data) nor insecure-skip-tls-verify"
                .into(),
        ));
    };
    let tls = if access.insecure {
        tls.disable_verification(true)
    } else {
        tls
    };
    let config = ureq::Agent::config_builder()
        .tls_config(tls.build())
        // Per phase rather than global: a global limit makes ureq resolve on a helper thread
        // even for the IP literal the installer writes (KUBERNETES_SERVICE_HOST).
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_send_request(Some(REQUEST_TIMEOUT))
        .timeout_recv_response(Some(REQUEST_TIMEOUT))
        .timeout_recv_body(Some(REQUEST_TIMEOUT))
        .http_status_as_error(false)
        // A redirect could send the token elsewhere, or to plain http: never followed.
        .max_redirects(0)
        .user_agent("istio-cni (fastpath)")
        .build();
    Ok(match go_trust {
        None => config.new_agent(),
        Some(tls) => ureq::Agent::with_parts(
            config,
            ureq::unversioned::transport::Connector::chain(
                ureq::unversioned::transport::TcpConnector::default(),
                tls,
            ),
            ureq::unversioned::resolver::DefaultResolver::default(),
        ),
    })
}

/// A failed exchange, with certificate failures told apart (rustls reports them itself, or
/// inside the I/O error of the TLS stream).
fn transport_error(e: ureq::Error) -> FetchError {
    let certificate = match &e {
        ureq::Error::Rustls(rustls::Error::InvalidCertificate(c)) => Some(c.clone()),
        ureq::Error::Io(io) => match io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::InvalidCertificate(c)) => Some(c.clone()),
            _ => None,
        },
        _ => None,
    };
    match certificate {
        Some(c) => FetchError::Certificate(format!("{c:?}")),
        None => FetchError::Transport(e.to_string()),
    }
}

/// An object the agent and the plugin read, by kind: its API path is built from names that
/// passed [`valid_object_name`] only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Object<'a> {
    Pod {
        namespace: &'a str,
        name: &'a str,
    },
    DaemonSet {
        namespace: &'a str,
        name: &'a str,
    },
    Node {
        name: &'a str,
    },
    /// The server's version (`/version`): what the agent asks to check TLS at start.
    Version,
}

impl Object<'_> {
    /// The path under the API server's URL, or why the names cannot be asked for.
    pub fn path(&self) -> Result<String, FetchError> {
        let (namespace, name) = match *self {
            Object::Pod { namespace, name } | Object::DaemonSet { namespace, name } => {
                (Some(namespace), name)
            }
            Object::Node { name } => (None, name),
            Object::Version => return Ok("/version".into()),
        };
        if !namespace.is_none_or(valid_object_name) || !valid_object_name(name) {
            return Err(FetchError::Config(format!(
                "refusing to look up {} {}{name:?}: not valid Kubernetes names",
                self.kind(),
                namespace.map(|n| format!("{n:?}/")).unwrap_or_default()
            )));
        }
        Ok(match *self {
            Object::Pod { namespace, name } => {
                format!("/api/v1/namespaces/{namespace}/pods/{name}")
            }
            Object::DaemonSet { namespace, name } => {
                format!("/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}")
            }
            Object::Node { name } => format!("/api/v1/nodes/{name}"),
            Object::Version => "/version".into(),
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            Object::Pod { .. } => "pod",
            Object::DaemonSet { .. } => "daemonset",
            Object::Node { .. } => "node",
            Object::Version => "version",
        }
    }
}

/// One GET of the pod. Returns the raw JSON body on 200.
pub fn get_pod(access: &KubeAccess, namespace: &str, name: &str) -> Result<Vec<u8>, FetchError> {
    get(access, Object::Pod { namespace, name })
}

/// One GET of `object`. Returns the raw JSON body on 200.
pub fn get(access: &KubeAccess, object: Object<'_>) -> Result<Vec<u8>, FetchError> {
    let url = format!("{}{}", access.server, object.path()?);
    let mut req = agent(access)?
        .get(&url)
        .header("Accept", "application/json");
    if let Some(t) = &access.token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    let mut resp = req.call().map_err(transport_error)?;
    let status = resp.status().as_u16();
    if (300..400).contains(&status) {
        let to = resp
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .unwrap_or("no Location")
            .chars()
            .take(300)
            .collect();
        return Err(FetchError::Status(status, to));
    }
    let body = resp
        .body_mut()
        .with_config()
        .limit(16 << 20)
        .read_to_vec()
        .map_err(|e| FetchError::Transport(format!("reading the answer: {e}")))?;
    if status != 200 {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(300).collect());
        return Err(FetchError::Status(status, message));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOLDEN_SKIP_TLS: &str = include_str!("../../testdata/istio/kubeconfig-skip-tls");

    #[test]
    fn istio_golden_kubeconfig() {
        let a = parse_kubeconfig(GOLDEN_SKIP_TLS, std::path::Path::new("/")).unwrap();
        assert_eq!(
            a,
            KubeAccess {
                server: "https://10.96.0.1:443".into(),
                ca_pem: None,
                insecure: true,
                token: Some("service_account_token_string".into())
            }
        );
    }

    #[test]
    fn ca_data_is_decoded() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let b64 = base64::engine::general_purpose::STANDARD.encode(pem);
        let text = GOLDEN_SKIP_TLS.replace(
            "    insecure-skip-tls-verify: true\n",
            &format!("    certificate-authority-data: {b64}\n"),
        );
        let a = parse_kubeconfig(&text, std::path::Path::new("/")).unwrap();
        assert_eq!(a.ca_pem.as_deref(), Some(pem.as_bytes()));
        assert!(!a.insecure);
    }

    #[test]
    fn broken_kubeconfigs_say_why() {
        let e = parse_kubeconfig("clusters: [", std::path::Path::new("/")).unwrap_err();
        assert!(matches!(e, KubeconfigParseError::Yaml(_)), "{e:?}");
        assert!(
            e.to_string().starts_with("invalid kubeconfig YAML: "),
            "{e}"
        );
        let e = parse_kubeconfig("kind: Config\n", std::path::Path::new("/")).unwrap_err();
        assert_eq!(e.to_string(), "kubeconfig names no cluster");
        let text = GOLDEN_SKIP_TLS.replace(
            "    insecure-skip-tls-verify: true\n",
            "    certificate-authority-data: '%%%'\n",
        );
        let e = parse_kubeconfig(&text, std::path::Path::new("/")).unwrap_err();
        assert!(
            matches!(e, KubeconfigParseError::CaDataNotBase64(_)),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with("certificate-authority-data is not base64: "),
            "{e}"
        );
    }

    #[test]
    fn object_names() {
        assert!(valid_object_name("web-0"));
        assert!(valid_object_name("a.b-c"));
        assert!(!valid_object_name("../x"));
        assert!(!valid_object_name("Web"));
        assert!(!valid_object_name(""));
        assert!(!valid_object_name("a/b"));
        assert!(!valid_object_name("a?b"));
    }

    #[test]
    fn status_errors_name_the_cause() {
        assert!(
            FetchError::Status(401, "Unauthorized".into())
                .to_string()
                .contains("token")
        );
        assert!(
            FetchError::Status(403, "x".into())
                .to_string()
                .contains("get on pods")
        );
    }
}
