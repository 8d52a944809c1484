"""fastpath's install-cni as the bench runs it, on a throwaway "node": it copies the plugin into
the bench's CNI bin dir, inserts istio-cni into the bench's primary conflist, writes the plugin's
kubeconfig (pointing at the fake API server), and loads, attaches and pins the accelerator's
probes under /sys/fs/bpf/fastpath. The plugin then enrolls the accelerated pods on ADD; pods
annotated `fastpath.io/accelerate: "false"` (the iptables-only column) stay out.

install-cni runs in a network namespace of its own, so its HTTP ports never meet anything else
on the machine; the programs it attaches to the root cgroup see every pod.
"""

import json
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import mesh
from mesh import log, run

PIN_DIR = Path("/sys/fs/bpf/fastpath")
SO_NETNS_COOKIE = 71
HEALTH_PORT = 8000


def pod_stats_fields(common_src):
    """The u64 fields of `PodStats` in fastpath-common's source, in layout order: the FP_STATS
    value (per CPU) as the probes write it. Read from the source so the bench follows the ABI."""
    m = re.search(r"pub struct PodStats \{(.*?)\n\}", common_src, re.S)
    if not m:
        raise ValueError("no `pub struct PodStats` in fastpath-common")
    fields = re.findall(r"^\s*pub (\w+): u64,", m.group(1), re.M)
    if not fields:
        raise ValueError("`PodStats` has no u64 fields")
    return tuple(fields)


def counter_delta(before, after):
    """Per-pod counter increase between two snapshots {pod: {counter: n}}."""
    out = {}
    for pod, counters in after.items():
        prev = before.get(pod, {})
        out[pod] = {k: v - prev.get(k, 0) for k, v in counters.items() if isinstance(v, (int, float))}
    return out


def parse_bpftool_percpu_dump(doc, fields):
    """`bpftool -j map dump` of a per-CPU hash of u64 key -> u64 fields: {key: {field: sum}}."""
    out = {}
    for entry in doc:
        key = int.from_bytes(bytes(int(b, 16) for b in entry["key"]), "little")
        total = dict.fromkeys(fields, 0)
        for v in entry.get("values", []):
            raw = bytes(int(b, 16) for b in v["value"])
            n = min(len(fields), len(raw) // 8)
            for i, val in enumerate(struct.unpack_from(f"<{n}Q", raw)):
                total[fields[i]] += val
        out[key] = total
    return out


def accel_unavailable_reason(agent_log):
    """install-cni's own words on why acceleration is off, from its log."""
    for line in reversed(agent_log.splitlines()):
        if "acceleration" in line and ("unavailable" in line or "disabled" in line):
            return line.strip()[-300:]
    return "no reason in its log"


def netns_cookie(netns):
    """The netns cookie the probes key pods by (SO_NETNS_COOKIE of a socket made inside)."""
    code = "import socket;s=socket.socket();print(int.from_bytes(s.getsockopt(socket.SOL_SOCKET,%d,8),'little'))" % SO_NETNS_COOKIE
    return int(run(mesh.in_netns(netns, ["/usr/bin/python3", "-c", code])).stdout.strip())


class Accelerator:
    def __init__(self, root, state_dir, installer=None):
        self.root = Path(root)
        self.state = Path(state_dir)
        self.installer = Path(installer) if installer else self.root / "target/release/install-cni"
        self.netns = mesh.NETNS_PREFIX + "node"
        self.proc = None
        self.lock = None
        self.pins_existed = PIN_DIR.exists()
        self.status = None
        self.cookies = {}
        self.env = None
        # Present while pins this bench made may exist: a later --cleanup-only removes them.
        self.marker = self.state / "created-pins"

    def start(self, node, kube, plugin):
        """Runs install-cni against the bench node. Returns (ready, accel_active, why)."""
        if not self.installer.is_file():
            return False, False, "install-cni is not built"
        if not plugin:
            return False, False, "the istio-cni plugin does not work yet, so nothing would enroll pods"
        self.state.mkdir(parents=True, exist_ok=True)
        if self.pins_existed:
            log(f"{PIN_DIR} exists before the bench: install-cni reuses it, and it is left in place at the end")
        image_bin = self.state / "image-bin"
        image_bin.mkdir(exist_ok=True)
        shutil.copy(plugin, image_bin / "istio-cni")
        sa = self.state / "serviceaccount"
        sa.mkdir(exist_ok=True)
        (sa / "token").write_text(kube.token)
        shutil.copy(kube.ca_file, sa / "ca.crt")
        (sa / "namespace").write_text("istio-system")
        run(["ip", "netns", "add", self.netns])
        run(mesh.in_netns(self.netns, ["ip", "link", "set", "lo", "up"]))
        self.env = env = dict(
            os.environ,
            MOUNTED_CNI_NET_DIR=str(node.net_dir),
            CNI_AGENT_RUN_DIR=str(node.run_dir),
            FASTPATH_CNI_BIN_SOURCE_DIR=str(image_bin),
            FASTPATH_HOST_CNI_BIN_DIR=str(node.bin_dir),
            FASTPATH_SERVICE_ACCOUNT_DIR=str(sa),
            KUBE_CA_FILE=str(sa / "ca.crt"),
            KUBERNETES_SERVICE_HOST="127.0.0.1",
            KUBERNETES_SERVICE_PORT=str(kube.port),
            KUBERNETES_NODE_NAME="fpbench-node",
            POD_NAMESPACE="istio-system",
            REPAIR_ENABLED="false",
            EXCLUDE_NAMESPACES="istio-system,kube-system",
            FASTPATH_HEALTH_PORT=str(HEALTH_PORT),
            FASTPATH_ACCELERATION="true",
            RUST_LOG="info",
        )
        # The root cgroup's sock_ops attachment is node-wide: the tests take this lock for it.
        try:
            self.lock = mesh.NodeLock("cgroup-sockops").__enter__()
        except RuntimeError as e:
            return False, False, str(e)
        logf = self.state / "install-cni.log"
        with open(logf, "wb") as out:
            self.proc = subprocess.Popen(
                # nsenter, not `ip netns exec`: that one remounts /sys, which hides the cgroup v2
                # mount and bpffs from the agent.
                ["nsenter", f"--net=/var/run/netns/{self.netns}", str(self.installer)], env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False, False, f"install-cni exited {self.proc.returncode}: {logf.read_text()[-600:]}"
            if self._ready():
                break
            time.sleep(0.2)
        else:
            return False, False, f"install-cni was not ready after 60 s: {logf.read_text()[-600:]}"
        if not self.pins_existed:
            self.marker.write_text(str(PIN_DIR))
        # Ready means the plugin is installed; the accelerator may still be loading and
        # self-testing. Wait until its switch is on (or it says why not).
        deadline = time.monotonic() + 60
        while True:
            self.status = self.status_report()
            if "acceleration switch: on" in self.status:
                break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                why = accel_unavailable_reason(logf.read_text())
                return True, False, f"install-cni is ready but the accelerator did not switch on ({why}); accel-status: {self.status[-400:]}"
            time.sleep(0.3)
        log(f"install-cni ready, accelerator on (pins under {PIN_DIR})")
        return True, True, None

    def _ready(self):
        code = f"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:{HEALTH_PORT}/readyz',timeout=1).status)"
        p = subprocess.run(mesh.in_netns(self.netns, ["/usr/bin/python3", "-c", code]), capture_output=True, text=True)
        return p.returncode == 0 and p.stdout.strip() == "200"

    def status_report(self):
        p = subprocess.run([str(self.installer), "accel-status"], capture_output=True, text=True, timeout=30, env=self.env)
        return (p.stdout + p.stderr).strip()

    def describe(self):
        agent_log = (self.state / "install-cni.log").read_text(errors="replace") if (self.state / "install-cni.log").exists() else ""
        self_test = next((line.split("accelerator self-test:", 1)[1].strip() for line in agent_log.splitlines() if "accelerator self-test:" in line), None)
        return {"installer": str(self.installer.relative_to(self.root)) if self.installer.is_relative_to(self.root) else str(self.installer),
                "pins": str(PIN_DIR), "status": (self.status or "")[:1500], "self_test": self_test}  # fmt: skip

    def pod_cookie(self, pod):
        if pod.name not in self.cookies:
            self.cookies[pod.name] = netns_cookie(pod.netns)
        return self.cookies[pod.name]

    def counters(self, node, pair):
        """{pod name: {counter: n}} for the pair, from the pinned per-pod stats map."""
        p = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(PIN_DIR / "FP_STATS")], capture_output=True, text=True)
        if p.returncode != 0:
            return {}
        fields = pod_stats_fields((self.root / "common/src/lib.rs").read_text())
        stats = parse_bpftool_percpu_dump(json.loads(p.stdout or "[]"), fields)
        return {pod.name: stats.get(self.pod_cookie(pod), {}) for pod in pair}

    def enrolled(self, pod):
        p = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(PIN_DIR / "FP_PODS")], capture_output=True, text=True)
        if p.returncode != 0:
            return None
        keys = {int.from_bytes(bytes(int(b, 16) for b in e["key"]), "little") for e in json.loads(p.stdout or "[]")}
        return self.pod_cookie(pod) in keys

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        if self.marker.exists() and PIN_DIR.exists():
            # With the agent's environment, so it removes what that agent installed, nothing else.
            env = self.env or dict(os.environ, MOUNTED_CNI_NET_DIR=str(self.state / "none"), CNI_AGENT_RUN_DIR=str(self.state / "none"),
                                   FASTPATH_HOST_CNI_BIN_DIR=str(self.state / "none"))  # fmt: skip
            p = subprocess.run([str(self.installer), "uninstall"], capture_output=True, text=True, timeout=60, env=env)
            if p.returncode != 0 or PIN_DIR.exists():
                log(f"install-cni uninstall left {PIN_DIR} ({p.returncode}): {(p.stdout + p.stderr).strip()[-300:]}")
        self.marker.unlink(missing_ok=True)
        self.proc = None
        run(["ip", "netns", "del", self.netns], check=False)
        if self.lock:
            self.lock.__exit__(None, None, None)
            self.lock = None
