//! The plugin's kubeconfig, in the exact YAML client-go writes (Istio's golden
//! `cni/pkg/install/testdata/kubeconfig-*`).

/// Where the API server is and how to trust it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeconfigInputs {
    pub protocol: String,
    pub host: String,
    pub port: String,
    /// `None` with `insecure-skip-tls-verify`.
    pub ca_pem: Option<Vec<u8>>,
    pub token: String,
}

/// `<protocol>://<host>:<port>`, with an IPv6 host in brackets (Go's `net.JoinHostPort`).
pub fn server_url(protocol: &str, host: &str, port: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("{protocol}://[{host}]:{port}")
    } else {
        format!("{protocol}://{host}:{port}")
    }
}

pub fn render(i: &KubeconfigInputs) -> String {
    let trust = match &i.ca_pem {
        Some(ca) => format!("    certificate-authority-data: {}\n", base64(ca)),
        None => "    insecure-skip-tls-verify: true\n".to_string(),
    };
    format!(
        "apiVersion: v1\nclusters:\n- cluster:\n{trust}    server: {}\n  name: local\ncontexts:\n- context:\n    cluster: local\n    user: istio-cni\n  name: istio-cni-context\ncurrent-context: istio-cni-context\nkind: Config\nusers:\n- name: istio-cni\n  user:\n    token: {}\n",
        yaml_scalar(&server_url(&i.protocol, &i.host, &i.port)),
        yaml_scalar(i.token.trim()),
    )
}

impl KubeconfigInputs {
    /// The same credentials for the agent's own API calls.
    pub fn access(&self) -> fastpath_cni_plugin::kube::KubeAccess {
        fastpath_cni_plugin::kube::KubeAccess {
            server: server_url(&self.protocol, &self.host, &self.port),
            ca_pem: self.ca_pem.clone(),
            insecure: self.ca_pem.is_none(),
            token: Some(self.token.trim().to_string()),
        }
    }
}

/// The same text with the token hidden, for the log.
pub fn redacted(i: &KubeconfigInputs) -> String {
    let mut r = i.clone();
    r.token = "<redacted>".into();
    if r.ca_pem.is_some() {
        r.ca_pem = Some(b"<redacted>".to_vec());
    }
    render(&r)
}

/// A plain YAML scalar when safe (tokens and URLs are), else a double-quoted one.
fn yaml_scalar(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._/:[]+=~".contains(c))
        && !s.starts_with(['-', ':', '[', ']', '~'])
        && !matches!(
            s,
            "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "~"
        )
        && s.parse::<f64>().is_err();
    if plain && !s.contains(": ") {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_default()
    }
}

/// Standard base64 with padding (what Go's YAML emits for `[]byte`).
pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(A[(n >> 18) as usize & 63] as char);
        out.push(A[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            A[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            A[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cni/pkg/install/testdata/kubeconfig-skip-tls`.
    const SKIP_TLS_GOLDEN: &str = include_str!("../../testdata/istio/kubeconfig-skip-tls");

    fn inputs() -> KubeconfigInputs {
        KubeconfigInputs {
            protocol: "https".into(),
            host: "10.96.0.1".into(),
            port: "443".into(),
            ca_pem: None,
            token: "service_account_token_string".into(),
        }
    }

    #[test]
    fn skip_tls_golden() {
        assert_eq!(render(&inputs()), SKIP_TLS_GOLDEN);
    }

    #[test]
    fn with_ca() {
        let k = render(&KubeconfigInputs {
            ca_pem: Some(b"ca".to_vec()),
            ..inputs()
        });
        assert!(k.contains("- cluster:\n    certificate-authority-data: Y2E=\n    server: https://10.96.0.1:443\n"), "{k}");
        assert!(!k.contains("insecure"));
    }

    #[test]
    fn ipv6_and_token_edge_cases() {
        assert_eq!(
            server_url("https", "fd00::1", "443"),
            "https://[fd00::1]:443"
        );
        let k = render(&KubeconfigInputs {
            token: "eyJh.b-c_d\n".into(),
            ..inputs()
        });
        assert!(k.contains("    token: eyJh.b-c_d\n"));
        let k = render(&KubeconfigInputs {
            token: "a: b".into(),
            ..inputs()
        });
        assert!(k.contains("    token: \"a: b\"\n"));
        assert!(!redacted(&inputs()).contains("service_account_token_string"));
    }

    #[test]
    fn base64_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
