//! The fake API server lists and watches pods as a real API server does (resourceVersions,
//! selectors, pages, watch streams, bookmarks, 410 after compaction) and takes the writes of
//! Istio's CNI repair controller. Driven by a plain HTTPS client over rustls; no root needed.
use fastpath_tests::kube_api::{FakeKubeApi, plain_pod, sidecar_pod};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "watch-token";

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A server in a scratch directory, removed afterwards.
struct Api {
    api: FakeKubeApi,
    dir: PathBuf,
    tls: Arc<rustls::ClientConfig>,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl std::ops::Deref for Api {
    type Target = FakeKubeApi;
    fn deref(&self) -> &FakeKubeApi {
        &self.api
    }
}

fn start() -> Api {
    let dir = std::env::temp_dir().join(fastpath_tests::unique_name("kube-watch-"));
    let api = FakeKubeApi::start(&dir, TOKEN).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(api.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    Api { api, dir, tls }
}

/// A pod of `node`.
fn pod_on(ns: &str, name: &str, node: &str) -> Value {
    let mut pod = plain_pod(ns, name);
    pod["spec"]["nodeName"] = json!(node);
    pod
}

fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

fn rv_of(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .expect("resourceVersion is a string")
        .parse()
        .unwrap()
}

/// Reads a response's status line and headers (lower-cased names).
fn read_head(r: &mut BufReader<Tls>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    (status, headers)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

impl Api {
    fn connect(&self) -> Tls {
        let sock = TcpStream::connect(self.addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(self.tls.clone(), name).unwrap();
        rustls::StreamOwned::new(conn, sock)
    }

    fn send(&self, method: &str, target: &str, token: &str, ctype: &str, body: &str) -> Tls {
        let mut tls = self.connect();
        let req = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nAccept: application/json\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        tls.write_all(req.as_bytes()).unwrap();
        tls.flush().unwrap();
        tls
    }

    /// One request with `token`; the status and the JSON body.
    fn call_as(
        &self,
        method: &str,
        target: &str,
        token: &str,
        ctype: &str,
        body: &str,
    ) -> (u16, Value) {
        let mut r = BufReader::new(self.send(method, target, token, ctype, body));
        let (status, headers) = read_head(&mut r);
        let len: usize = header(&headers, "content-length").unwrap().parse().unwrap();
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    fn call(&self, method: &str, target: &str, ctype: &str, body: &str) -> (u16, Value) {
        self.call_as(method, target, TOKEN, ctype, body)
    }

    fn get(&self, target: &str) -> (u16, Value) {
        self.call("GET", target, "application/json", "")
    }

    fn watch(&self, target: &str) -> Watch {
        let mut r = BufReader::new(self.send("GET", target, TOKEN, "application/json", ""));
        let (status, headers) = read_head(&mut r);
        assert_eq!(status, 200, "watch {target}");
        assert_eq!(header(&headers, "transfer-encoding"), Some("chunked"));
        assert_eq!(header(&headers, "content-type"), Some("application/json"));
        Watch {
            r,
            pending: Vec::new(),
        }
    }
}

/// How a watch stream went on.
#[derive(Debug)]
enum Next {
    Event(Value),
    /// The last chunk came: the server ended the response.
    End,
    /// The connection ended without the last chunk (or a TLS close_notify).
    Dropped(String),
}

struct Watch {
    r: BufReader<Tls>,
    pending: Vec<u8>,
}

impl Watch {
    /// The next event, decoding the chunked body (each line one JSON event).
    fn next(&mut self) -> Next {
        loop {
            if let Some(at) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=at).collect();
                return Next::Event(serde_json::from_slice(&line).unwrap());
            }
            let mut size = String::new();
            match self.r.read_line(&mut size) {
                Ok(0) => return Next::Dropped("eof".into()),
                Ok(_) => {}
                Err(e) => return Next::Dropped(e.to_string()),
            }
            let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
            let mut chunk = vec![0; size + 2];
            if let Err(e) = self.r.read_exact(&mut chunk) {
                return Next::Dropped(e.to_string());
            }
            if size == 0 {
                return Next::End;
            }
            self.pending.extend_from_slice(&chunk[..size]);
        }
    }

    fn event(&mut self) -> Value {
        match self.next() {
            Next::Event(e) => e,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    /// The next event that is not a BOOKMARK.
    fn change(&mut self) -> Value {
        loop {
            let e = self.event();
            if e["type"] != "BOOKMARK" {
                return e;
            }
        }
    }
}

#[test]
fn lists_the_pods_of_a_node_in_pages() {
    let api = start();
    api.set_pod(pod_on("b", "p3", "node-1"));
    api.set_pod(pod_on("a", "p1", "node-1"));
    api.set_pod(pod_on("a", "p2", "node-2"));
    api.set_pod(pod_on("c", "p4", "node-1"));
    api.set_pod(pod_on("a", "p0", "node-1"));

    let (status, page) = api.get("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1&limit=2");
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["kind"], "PodList");
    assert_eq!(page["apiVersion"], "v1");
    let rv = page["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(rv, api.resource_version());
    let names: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(name_of)
        .collect();
    assert_eq!(names, ["p0", "p1"], "ordered by namespace/name");
    assert!(page["items"][0]["metadata"]["resourceVersion"].is_string());
    // A change between pages does not show: every page comes from the first one's snapshot.
    api.set_pod(pod_on("c", "p5", "node-1"));
    let token = page["metadata"]["continue"]
        .as_str()
        .expect("continue token");
    let (status, page) = api.get(&format!(
        "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1&limit=2&continue={token}"
    ));
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["metadata"]["resourceVersion"], rv.as_str());
    let names: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(name_of)
        .collect();
    assert_eq!(names, ["p3", "p4"]);
    assert!(
        page["metadata"].get("continue").is_none(),
        "the last page: {page}"
    );

    // One namespace, a label selector, no limit.
    let (_, page) = api.get("/api/v1/namespaces/a/pods?labelSelector=app%20in%20(p1%2Cp2)");
    let names: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(name_of)
        .collect();
    assert_eq!(names, ["p1", "p2"]);
    assert!(page["metadata"].get("continue").is_none());
    // An unfiltered page says how many are left.
    let (_, page) = api.get("/api/v1/pods?limit=4");
    assert_eq!(page["metadata"]["remainingItemCount"], 2, "{page}");

    let (status, body) = api.get("/api/v1/pods?fieldSelector=spec.nodeNam%3Dx");
    assert_eq!((status, body["reason"].as_str()), (400, Some("BadRequest")));
    assert_eq!(api.lists(), 5);
    assert_eq!(api.watches(), 0);
    let last = api.requests().pop().unwrap();
    assert_eq!(last.path, "/api/v1/pods");
    assert_eq!(last.query, "fieldSelector=spec.nodeNam%3Dx");
}

#[test]
fn an_exact_list_shows_an_older_state_until_compaction() {
    let api = start();
    api.set_pod(pod_on("a", "p1", "node-1"));
    let before = api.resource_version();
    api.set_pod(pod_on("a", "p2", "node-1"));
    api.remove_pod("a", "p1");
    let (_, now) = api.get("/api/v1/pods");
    let names: Vec<&str> = now["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(name_of)
        .collect();
    assert_eq!(names, ["p2"]);
    let exact = format!("/api/v1/pods?resourceVersion={before}&resourceVersionMatch=Exact");
    let (status, then) = api.get(&exact);
    assert_eq!(status, 200, "{then}");
    let names: Vec<&str> = then["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(name_of)
        .collect();
    assert_eq!(names, ["p1"]);
    assert_eq!(then["metadata"]["resourceVersion"], before.as_str());
    api.compact_history();
    let (status, body) = api.get(&exact);
    assert_eq!((status, body["reason"].as_str()), (410, Some("Expired")));
    let (status, _) = api.get("/api/v1/pods?resourceVersionMatch=NotOlderThan");
    assert_eq!(status, 422, "resourceVersionMatch needs a resourceVersion");
}

#[test]
fn a_watch_from_the_lists_version_sees_every_change_in_order() {
    let api = start();
    api.set_pod(pod_on("a", "old", "node-1"));
    let (_, list) = api.get("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1");
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    // Before the watch starts: replayed from the history.
    api.set_pod(pod_on("a", "web", "node-1"));
    let mut w = api.watch(&format!(
        "/api/v1/pods?watch=true&resourceVersion={rv}&fieldSelector=spec.nodeName%3Dnode-1&timeoutSeconds=30"
    ));
    let mut modified = pod_on("a", "web", "node-1");
    modified["status"]["phase"] = json!("Running");
    api.set_pod(modified);
    api.set_pod(pod_on("a", "elsewhere", "node-2"));
    // Scheduled onto the node afterwards: the node's watch sees it arrive.
    let mut pending = plain_pod("a", "late");
    api.set_pod(pending.clone());
    pending["spec"]["nodeName"] = json!("node-1");
    api.set_pod(pending);
    assert!(api.remove_pod("a", "web"));
    assert!(!api.remove_pod("a", "web"));
    // Moved away (as a test may): the node's watch sees it go.
    api.set_pod(pod_on("a", "old", "node-3"));

    let want = [
        ("ADDED", "web"),
        ("MODIFIED", "web"),
        ("ADDED", "late"),
        ("DELETED", "web"),
        ("DELETED", "old"),
    ];
    let mut last = rv.parse::<u64>().unwrap();
    for (kind, name) in want {
        let e = w.change();
        assert_eq!(
            (e["type"].as_str().unwrap(), name_of(&e["object"])),
            (kind, name),
            "{e}"
        );
        assert!(rv_of(&e["object"]) > last, "resourceVersions grow: {e}");
        last = rv_of(&e["object"]);
    }
    assert_eq!(api.pod("a", "web"), None);
    assert_eq!(api.watches(), 1);
    assert_eq!(api.open_watches(), 1);
}

#[test]
fn bookmarks_arrive_and_the_watch_ends_after_its_timeout() {
    let api = start();
    api.set_pod(pod_on("a", "p1", "node-1"));
    let rv = api.resource_version();
    let started = Instant::now();
    let mut w = api.watch(&format!(
        "/api/v1/namespaces/a/pods?watch=1&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=3"
    ));
    let e = w.event();
    assert_eq!(e["type"], "BOOKMARK", "{e}");
    assert_eq!(e["object"]["kind"], "Pod");
    assert_eq!(e["object"]["apiVersion"], "v1");
    assert_eq!(e["object"]["metadata"]["resourceVersion"], rv.as_str());
    // A change elsewhere still moves the bookmark on.
    api.set_pod(pod_on("other", "p2", "node-1"));
    let e = w.event();
    assert_eq!(e["type"], "BOOKMARK", "{e}");
    assert_eq!(
        e["object"]["metadata"]["resourceVersion"],
        api.resource_version().as_str()
    );
    loop {
        match w.next() {
            Next::Event(e) => assert_eq!(e["type"], "BOOKMARK", "{e}"),
            Next::End => break,
            Next::Dropped(why) => panic!("dropped: {why}"),
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(6),
        "{took:?}"
    );
}

#[test]
fn a_streaming_list_sends_the_pods_then_the_initial_events_end_bookmark() {
    let api = start();
    api.set_pod(pod_on("a", "p1", "node-1"));
    api.set_pod(pod_on("b", "p2", "node-1"));
    api.set_pod(pod_on("b", "p3", "node-2"));
    let rv = api.resource_version();
    let (status, body) =
        api.get("/api/v1/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan");
    assert_eq!(
        (status, body["reason"].as_str()),
        (422, Some("Invalid")),
        "bookmarks are required"
    );
    let mut w = api.watch(
        "/api/v1/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=&allowWatchBookmarks=true&fieldSelector=spec.nodeName%3Dnode-1&timeoutSeconds=30",
    );
    for name in ["p1", "p2"] {
        let e = w.event();
        assert_eq!(
            (e["type"].as_str(), name_of(&e["object"])),
            (Some("ADDED"), name),
            "{e}"
        );
        assert_eq!(e["object"]["kind"], "Pod");
    }
    let e = w.event();
    assert_eq!(e["type"], "BOOKMARK", "{e}");
    assert_eq!(e["object"]["metadata"]["resourceVersion"], rv.as_str());
    assert_eq!(
        e["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    api.set_pod(pod_on("c", "p4", "node-1"));
    let e = w.change();
    assert_eq!(
        (e["type"].as_str(), name_of(&e["object"])),
        (Some("ADDED"), "p4")
    );
}

#[test]
fn a_watch_from_before_the_compacted_history_gets_410_expired() {
    let api = start();
    api.set_pod(pod_on("a", "p1", "node-1"));
    let old = api.resource_version();
    api.set_pod(pod_on("a", "p2", "node-1"));
    api.compact_history();
    let mut w = api.watch(&format!("/api/v1/pods?watch=true&resourceVersion={old}"));
    let e = w.event();
    assert_eq!(e["type"], "ERROR", "{e}");
    assert_eq!(e["object"]["kind"], "Status");
    assert_eq!(e["object"]["code"], 410);
    assert_eq!(e["object"]["reason"], "Expired");
    assert!(matches!(w.next(), Next::End));
    // From the current version it watches on.
    let now = api.resource_version();
    let mut w = api.watch(&format!("/api/v1/pods?watch=true&resourceVersion={now}"));
    api.set_pod(pod_on("a", "p3", "node-1"));
    assert_eq!(name_of(&w.change()["object"]), "p3");
}

#[test]
fn break_watches_drops_every_stream_and_watches_never_block_other_requests() {
    let api = start();
    api.set_pod(pod_on("a", "p1", "node-1"));
    // More watches than acceptor threads, and a GET still answers.
    let mut watches: Vec<Watch> = (0..6)
        .map(|_| api.watch("/api/v1/pods?watch=true&allowWatchBookmarks=true"))
        .collect();
    for w in &mut watches {
        assert_eq!(name_of(&w.change()["object"]), "p1");
    }
    assert_eq!(api.get("/api/v1/namespaces/a/pods/p1").0, 200);
    assert_eq!(api.pod_gets("a", "p1"), 1);
    assert_eq!(api.open_watches(), 6);
    api.break_watches();
    for w in &mut watches {
        loop {
            match w.next() {
                Next::Event(e) => assert_eq!(e["type"], "BOOKMARK", "{e}"),
                Next::End => panic!("a broken watch ended cleanly"),
                Next::Dropped(_) => break,
            }
        }
    }
    let until = Instant::now() + Duration::from_secs(5);
    while api.open_watches() > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(api.open_watches(), 0);
    assert_eq!(api.watches(), 6);
}

#[test]
fn rotated_tokens_and_forced_errors_apply_to_lists_and_watches() {
    let api = start();
    api.set_pod(sidecar_pod("a", "p1", &[], &[]));
    assert_eq!(
        api.call_as("GET", "/api/v1/pods", "wrong", "application/json", "")
            .0,
        401
    );
    api.set_tokens(&["new-1", "new-2"]);
    assert_eq!(
        api.call_as("GET", "/api/v1/pods", TOKEN, "application/json", "")
            .0,
        401
    );
    for token in ["new-1", "new-2"] {
        let (status, list) = api.call_as("GET", "/api/v1/pods", token, "application/json", "");
        assert_eq!(status, 200);
        assert_eq!(list["items"].as_array().unwrap().len(), 1);
    }
    api.set_tokens(&[TOKEN]);
    api.force_path_status(
        "/api/v1/pods",
        403,
        "pods is forbidden: User \"x\" cannot list resource \"pods\"",
    );
    let (status, body) = api.get("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1&limit=500");
    assert_eq!((status, body["reason"].as_str()), (403, Some("Forbidden")));
    let (status, _) = api.get("/api/v1/pods?watch=true");
    assert_eq!(status, 403);
    assert_eq!(api.get("/api/v1/namespaces/a/pods").0, 200);
}

#[test]
fn delete_honours_preconditions() {
    let api = start();
    api.set_pod(pod_on("a", "broken", "node-1"));
    let pod = api.pod("a", "broken").unwrap();
    let rv = pod["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let mut w = api.watch(&format!("/api/v1/pods?watch=true&resourceVersion={rv}"));
    let path = "/api/v1/namespaces/a/pods/broken";
    let (status, body) = api.call(
        "DELETE",
        path,
        "application/json",
        r#"{"kind":"DeleteOptions","apiVersion":"v1","preconditions":{"uid":"someone-else"}}"#,
    );
    assert_eq!(
        (status, body["reason"].as_str()),
        (409, Some("Conflict")),
        "{body}"
    );
    let (status, _) = api.call(
        "DELETE",
        path,
        "application/json",
        r#"{"preconditions":{"uid":"uid-broken","resourceVersion":"1"}}"#,
    );
    assert_eq!(status, 409);
    assert!(api.pod("a", "broken").is_some());
    let body = format!(r#"{{"preconditions":{{"uid":"uid-broken","resourceVersion":"{rv}"}}}}"#);
    let (status, gone) = api.call("DELETE", path, "application/json", &body);
    assert_eq!(status, 200, "{gone}");
    assert_eq!(name_of(&gone), "broken");
    assert!(api.pod("a", "broken").is_none());
    let e = w.change();
    assert_eq!(
        (e["type"].as_str(), name_of(&e["object"])),
        (Some("DELETED"), "broken")
    );
    let (status, body) = api.call("DELETE", path, "application/json", "");
    assert_eq!((status, body["reason"].as_str()), (404, Some("NotFound")));
}

#[test]
fn patch_merges_labels_and_bumps_the_resource_version() {
    let api = start();
    api.set_pod(pod_on("a", "broken", "node-1"));
    let rv = api.resource_version();
    let mut w = api.watch(&format!("/api/v1/pods?watch=true&resourceVersion={rv}"));
    let path = "/api/v1/namespaces/a/pods/broken";
    for ctype in [
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
    ] {
        let (status, pod) = api.call(
            "PATCH",
            path,
            ctype,
            r#"{"metadata":{"labels":{"cni.istio.io/uninitialized":"true","app":null}}}"#,
        );
        assert_eq!(status, 200, "{pod}");
        assert_eq!(
            pod["metadata"]["labels"],
            json!({"cni.istio.io/uninitialized": "true"})
        );
    }
    // The second patch changed nothing: one write, one event.
    let pod = api.pod("a", "broken").unwrap();
    assert_eq!(rv_of(&pod), rv.parse::<u64>().unwrap() + 1);
    let e = w.change();
    assert_eq!(e["type"], "MODIFIED");
    assert_eq!(
        e["object"]["metadata"]["labels"]["cni.istio.io/uninitialized"],
        "true"
    );
    let (status, _) = api.call("PATCH", path, "application/json-patch+json", "[]");
    assert_eq!(status, 415);
    let (status, _) = api.call(
        "PATCH",
        path,
        "application/merge-patch+json",
        r#"{"metadata":{"resourceVersion":"1","labels":{"x":"y"}}}"#,
    );
    assert_eq!(status, 409, "a stale resourceVersion in the patch");
    let (status, _) = api.call(
        "PATCH",
        "/api/v1/namespaces/a/pods/nope",
        "application/merge-patch+json",
        "{}",
    );
    assert_eq!(status, 404);
}

#[test]
fn events_are_recorded() {
    let api = start();
    let core = json!({"apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": "broken."},
        "involvedObject": {"kind": "Pod", "namespace": "a", "name": "broken"},
        "reason": "BrokenPodRepaired", "type": "Normal"});
    let (status, stored) = api.call(
        "POST",
        "/api/v1/namespaces/a/events",
        "application/json",
        &core.to_string(),
    );
    assert_eq!(status, 201, "{stored}");
    assert!(name_of(&stored).starts_with("broken."), "{stored}");
    assert_eq!(stored["metadata"]["namespace"], "a");
    let new = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": "repair-1", "namespace": "b"},
        "regarding": {"kind": "Pod", "namespace": "b", "name": "p"}, "reason": "Repaired"});
    let target = "/apis/events.k8s.io/v1/namespaces/b/events";
    assert_eq!(
        api.call("POST", target, "application/json", &new.to_string())
            .0,
        201
    );
    assert_eq!(
        api.call("POST", target, "application/json", &new.to_string())
            .0,
        409
    );
    let (status, _) = api.call(
        "POST",
        "/api/v1/namespaces/c/events",
        "application/json",
        &new.to_string(),
    );
    assert_eq!(status, 400, "namespace mismatch");
    let events = api.events();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["reason"], "BrokenPodRepaired");
    assert_eq!(events[1]["metadata"]["name"], "repair-1");
}
