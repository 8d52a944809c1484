"""A fake Kubernetes API server, enough for istio-cni's pod lookup on CNI ADD.

It answers `GET /api/v1/namespaces/<ns>/pods/<name>` and `GET /api/v1/namespaces/<ns>` over
HTTPS on 127.0.0.1 with a throwaway CA, and writes the kubeconfig the plugin reads from
`<cni_agent_run_dir>/istio-cni-kubeconfig`, as install-cni would.
"""

import base64
import json
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TOKEN = "fastpath-bench-token"


def sidecar_pod(namespace, name, sidecar, extra_annotations=None):
    """A pod as the injector leaves it: `istio-proxy` container + `sidecar.istio.io/status`."""
    annotations = dict(extra_annotations or {})
    containers = [{"name": "app", "image": "bench/app"}]
    if sidecar:
        annotations["sidecar.istio.io/status"] = json.dumps(
            {"initContainers": ["istio-validation"], "containers": ["istio-proxy"], "volumes": [], "imagePullSecrets": None}
        )
        containers.append(
            {
                "name": "istio-proxy",
                "image": "docker.io/istio/proxyv2",
                "args": ["proxy", "sidecar", "--domain", f"{namespace}.svc.cluster.local"],
                "securityContext": {"runAsUser": 1337, "runAsGroup": 1337},
            }
        )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "annotations": annotations, "labels": {"app": name}},
        "spec": {"containers": containers, "initContainers": []},
        "status": {"phase": "Pending"},
    }


class FakeKube:
    def __init__(self, state_dir):
        self.dir = Path(state_dir) / "fake-kube"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pods = {}
        self.requests = []
        self.server = None

    token = TOKEN

    @property
    def ca_file(self):
        return self.dir / "ca.crt"

    def add_pod(self, namespace, name, sidecar, accelerate=True, annotations=None):
        annotations = dict(annotations or {})
        if sidecar and not accelerate:
            # fastpath's per-pod opt-out: the iptables-only column runs next to the accelerated one.
            annotations["fastpath.io/accelerate"] = "false"
        self.pods[(namespace, name)] = sidecar_pod(namespace, name, sidecar, annotations)

    def _make_certs(self):
        d = self.dir
        cmds = [
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "ca.key", "-out", d / "ca.crt",
             "-days", "2", "-subj", "/CN=fastpath-bench-ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", d / "tls.key", "-out", d / "tls.csr",
             "-subj", "/CN=kubernetes"],
        ]  # fmt: skip
        for c in cmds:
            subprocess.run(list(map(str, c)), check=True, capture_output=True)
        (d / "ext.cnf").write_text(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
        )
        subprocess.run(
            list(map(str, ["openssl", "x509", "-req", "-in", d / "tls.csr", "-CA", d / "ca.crt", "-CAkey", d / "ca.key",
                           "-CAcreateserial", "-out", d / "tls.crt", "-days", "2", "-extfile", d / "ext.cnf"])),
            check=True, capture_output=True,
        )  # fmt: skip

    def start(self):
        self._make_certs()
        kube = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                kube.requests.append((self.path, self.headers.get("Authorization")))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._send(401, {"kind": "Status", "status": "Failure", "reason": "Unauthorized", "code": 401})
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
                    pod = kube.pods.get((parts[3], parts[5]))
                    if pod:
                        return self._send(200, pod)
                elif len(parts) == 4 and parts[:3] == ["api", "v1", "namespaces"]:
                    return self._send(200, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": parts[3], "labels": {}}})
                self._send(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.dir / "tls.crt", self.dir / "tls.key")
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def port(self):
        return self.server.server_address[1]

    def kubeconfig(self):
        ca = base64.b64encode((self.dir / "ca.crt").read_bytes()).decode()
        return (
            "apiVersion: v1\n"
            "clusters:\n"
            "- cluster:\n"
            f"    certificate-authority-data: {ca}\n"
            f"    server: https://127.0.0.1:{self.port}\n"
            "  name: local\n"
            "contexts:\n"
            "- context:\n"
            "    cluster: local\n"
            "    user: istio-cni\n"
            "  name: istio-cni-context\n"
            "current-context: istio-cni-context\n"
            "kind: Config\n"
            "users:\n"
            "- name: istio-cni\n"
            "  user:\n"
            f"    token: {TOKEN}\n"
        )

    def write_kubeconfig(self, run_dir):
        p = Path(run_dir) / "istio-cni-kubeconfig"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.kubeconfig())
        p.chmod(0o600)
        return p

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
