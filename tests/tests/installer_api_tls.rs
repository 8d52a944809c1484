//! install-cni checks TLS to the API server once at start, with the service account's CA, as
//! the plugin does on every ADD: a certificate that can never verify is named at start.
use fastpath_tests::installer::{Agent, Host, PRIMARY};
use fastpath_tests::kube_api::{FakeKubeApi, ServerCert};

const TOKEN: &str = "tls-check-token";

fn agent_against(tag: &str, cert: ServerCert) -> (Host, FakeKubeApi, Agent) {
    let h = Host::new(tag);
    let api = FakeKubeApi::start_with(&h.root.join("api"), TOKEN, cert).unwrap();
    h.set_service_account(TOKEN, &api.ca_pem);
    h.write("10-dbnet.conflist", PRIMARY);
    let port = api.addr.port().to_string();
    let a = Agent::start(
        &h,
        &[
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", &port),
        ],
    );
    (h, api, a)
}

#[test]
fn a_certificate_that_verifies_is_said_to_at_start() {
    let (_h, _api, mut a) = agent_against("tls-ok", ServerCert::SignedByCa);
    a.wait_until("the TLS check", |a| a.log().contains("TLS verified"));
    assert!(!a.log().contains("not trusted"), "{}", a.log());
}

/// The API serves a certificate valid for another name: no retry can fix that, and the agent
/// says so at start (the plugin would fail every mesh pod's ADD).
#[test]
fn a_certificate_that_cannot_verify_is_named_at_start() {
    let (_h, _api, mut a) = agent_against("tls-bad", ServerCert::SelfSignedCaOtherName);
    a.wait_until("the TLS check", |a| a.log().contains("not trusted"));
    let log = a.log();
    let line = log.lines().find(|l| l.contains("not trusted")).unwrap();
    assert!(
        line.contains("NotValidForName") && line.contains("every mesh pod's ADD"),
        "{line}"
    );
    assert!(!log.contains("TLS verified"), "{log}");
}
