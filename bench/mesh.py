"""The bench topology: pods (named netns) on one node made through the real CNI chain, Istio's
sidecar redirection, HAProxy sidecars as uid 1337, and the apps the load generators talk to.

Everything created here is registered with a `Node`, whose `cleanup()` removes it (processes,
netns, the bridge, IPAM state, pins it made) and is safe to call twice or after a crash.
"""

import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
CONF_DIR = BENCH_DIR / "conf"

# bench's reserved range (see PREAMBLE): pods get addresses from host-local in this /24.
SUBNET = "10.246.0.0/24"
PROXY_UID = 1337
# Ports of the apps in the server pod; the sidecars forward to them by original destination.
SOCKPERF_PORT = 11111
IPERF_PORT = 5201
HTTP_PORT = 8080
# Name prefixes: everything the bench creates starts with these, so a later run can remove
# what a killed run left behind.
NETNS_PREFIX = "fpb-"
BRIDGE = "fpbench0"
NETWORK_NAME = "fpbench"

SIDECAR_RULES = (CONF_DIR / "istio-sidecar.rules").read_text()


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(argv, check=True, input=None, timeout=120):
    """Runs a command; on failure raises with its stderr so the reason reaches the user."""
    p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({p.returncode}): {p.stderr.strip()} {p.stdout.strip()}")
    return p


def in_netns(ns, argv):
    return ["ip", "netns", "exec", ns, *argv] if ns else list(argv)


def as_proxy_user(argv):
    return ["setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups", *argv]


def cpu_time_ns(pid):
    """CPU time (user+system, ns) of every thread of a live process, from schedstat."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                pass
    except FileNotFoundError:
        pass
    return total


def set_affinity(pid, cpus):
    """Moves every thread of a process to `cpus` (a set of CPU numbers)."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except ProcessLookupError:
                pass
    except FileNotFoundError:
        pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self):
        return self.popen.pid

    def alive(self):
        return self.popen.poll() is None


@dataclass
class Pod:
    name: str  # Kubernetes-style pod name, also the CNI container id
    netns: str
    ip: str = ""
    meshed: bool = False
    accelerated: bool = False
    procs: dict = field(default_factory=dict)


class Node:
    """One node's worth of bench state: a state dir, the CNI runtime, pods, processes."""

    def __init__(self, root, state_dir, cni_plugin=None, kube=None):
        self.root = Path(root)
        self.state = Path(state_dir)
        self.state.mkdir(parents=True, exist_ok=True)
        self.cnirun = self.root / "target/release/cnirun"
        # `cni_plugin`: path of the built istio-cni when it is chained; None = the fallback
        # that applies Istio's default sidecar rules itself.
        self.cni_plugin = cni_plugin
        self.kube = kube
        self.pods = []
        self.procs = []
        self.bin_dir = self.state / "cni-bin"
        self.run_dir = self.state / "istio-cni-run"
        # The node's CNI config dir; its one conflist is what pods are added with (install-cni,
        # when it runs, inserts istio-cni into it as it does on a real node).
        self.net_dir = self.state / "net.d"
        self.conflist_path = self.net_dir / "10-fpbench.conflist"

    # ---------------------------------------------------------------- CNI
    def conflist(self, with_plugin):
        plugins = [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(self.state / "ipam"),
                    "ranges": [[{"subnet": SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
        ]
        if with_plugin:
            plugins.append(
                {
                    "type": "istio-cni",
                    "ipam": {},
                    "dns": {},
                    "plugin_log_level": "info",
                    "cni_agent_run_dir": str(self.run_dir),
                    "ambient_enabled": False,
                    "enablement_selectors": [],
                    "exclude_namespaces": ["istio-system", "kube-system"],
                    "pod_namespace": "istio-system",
                    "native_nftables": False,
                    "enable_ambient_detection_retry": False,
                }
            )
        return {"cniVersion": "1.0.0", "name": NETWORK_NAME, "plugins": plugins}

    def write_cni_config(self, with_plugin):
        """Writes the conflists and the CNI bin dir: the reference plugins, plus istio-cni
        chained by the bench itself when `with_plugin` (else install-cni chains it, or the
        fallback rules stand in for it)."""
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        for p in Path("/usr/lib/cni").iterdir():
            dst = self.bin_dir / p.name
            if not dst.exists():
                dst.symlink_to(p)
        if with_plugin:
            dst = self.bin_dir / "istio-cni"
            if dst.exists() or dst.is_symlink():
                dst.unlink()
            dst.symlink_to(self.cni_plugin)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.net_dir.mkdir(parents=True, exist_ok=True)
        self.conflist_path.write_text(json.dumps(self.conflist(with_plugin), indent=2))
        # The runtime sets up the pod's loopback as its own network (as containerd does).
        lo = {"cniVersion": "1.0.0", "name": "fpbench-lo", "plugins": [{"type": "loopback"}]}
        (self.state / "lo.conflist").write_text(json.dumps(lo))

    def _cni(self, cmd, network, pod):
        """Runs CNI `cmd` for `pod` on the "lo" (loopback) or "net" (pod network) conflist."""
        conflist = self.state / "lo.conflist" if network == "lo" else self.conflist_path
        env = dict(os.environ, CNI_PATH=str(self.bin_dir), CNI_CACHE_DIR=str(self.state / "cni-cache"))
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={pod.name};K8S_POD_INFRA_CONTAINER_ID={pod.name}"
        argv = [str(self.cnirun), cmd, str(conflist), pod.name, f"/var/run/netns/{pod.netns}", "--args", args]
        t0 = time.monotonic()
        p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"CNI {cmd} {pod.name} ({conflist.name}) failed: {p.stderr.strip()} {p.stdout.strip()}")
        return p.stdout, time.monotonic() - t0

    # ---------------------------------------------------------------- pods
    def add_pod(self, name, meshed, accelerated):
        ns = NETNS_PREFIX + name
        run(["ip", "netns", "del", ns], check=False)
        run(["ip", "netns", "add", ns])
        pod = Pod(name=name, netns=ns, meshed=meshed, accelerated=accelerated)
        self.pods.append(pod)
        if self.kube:
            self.kube.add_pod("bench", name, sidecar=meshed, accelerate=accelerated)
        self._cni("ADD", "lo", pod)
        out, secs = self._cni("ADD", "net", pod)
        result = json.loads(out)
        pod.ip = result["ips"][0]["address"].split("/")[0]
        if meshed and not self.plugin_chained():
            # Fallback until the plugin is chained: the exact rules Istio's plugin applies.
            run(in_netns(ns, ["iptables-restore", "--noflush"]), input=SIDECAR_RULES)
        log(f"pod {name}: netns {ns}, ip {pod.ip}, mesh={'yes' if meshed else 'no'} (CNI ADD {secs * 1000:.0f} ms)")
        return pod

    def plugin_chained(self):
        try:
            return any(p.get("type") == "istio-cni" for p in json.loads(self.conflist_path.read_text())["plugins"])
        except (FileNotFoundError, KeyError, ValueError):
            return False

    def nat_rules(self, pod):
        return run(in_netns(pod.netns, ["iptables-save", "-t", "nat"])).stdout

    def assert_redirected(self, pod):
        """Fails unless the pod's netns carries Istio's sidecar redirection."""
        rules = self.nat_rules(pod)
        for needle in ("-j ISTIO_REDIRECT", "REDIRECT --to-ports 15001", "REDIRECT --to-ports 15006"):
            if needle not in rules:
                raise RuntimeError(f"pod {pod.name}: no Istio redirection in its netns (missing {needle!r}):\n{rules}")

    # ---------------------------------------------------------------- processes
    def start(self, pod, name, argv, uid_proxy=False, cpus=None):
        logf = self.state / f"{pod.name if pod else 'host'}-{name}.log"
        cmd = list(argv)
        if uid_proxy:
            cmd = as_proxy_user(cmd)
        cmd = in_netns(pod.netns if pod else None, cmd)
        with open(logf, "wb") as out:
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        proc = Proc(name=name, popen=p, log=logf)
        if cpus is not None:
            set_affinity(p.pid, cpus)
        self.procs.append(proc)
        if pod:
            pod.procs[name] = proc
        return proc

    def start_sidecar(self, pod):
        # The sidecar runs as uid 1337 and writes its pid file and stats socket here.
        d = self.state / "sidecars"
        d.mkdir(exist_ok=True)
        os.chown(d, PROXY_UID, PROXY_UID)
        cfg = d / f"haproxy-{pod.name}.cfg"
        cfg.write_text(
            (CONF_DIR / "haproxy-sidecar.cfg")
            .read_text()
            .format(pidfile=d / f"haproxy-{pod.name}.pid", stats_socket=self.stats_socket(pod))
        )
        run(["haproxy", "-c", "-q", "-f", str(cfg)])
        return self.start(pod, "sidecar", ["haproxy", "-db", "-f", str(cfg)], uid_proxy=True)

    def stats_socket(self, pod):
        return self.state / "sidecars" / f"haproxy-{pod.name}.sock"

    def sidecar_sessions(self, pod):
        """Total sessions each sidecar frontend accepted so far: {"outbound": n, "inbound": n}."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.stats_socket(pod)))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return parse_haproxy_frontend_sessions(data.decode())

    def start_apps(self, pod):
        """The server-side apps: sockperf, iperf3, nginx (as root, i.e. not the proxy uid)."""
        self.start(pod, "sockperf", ["sockperf", "server", "--tcp", "-i", "0.0.0.0", "-p", str(SOCKPERF_PORT)])
        self.start(pod, "iperf3", ["iperf3", "-s", "-p", str(IPERF_PORT)])
        tmp = self.state / f"nginx-{pod.name}-tmp"
        tmp.mkdir(exist_ok=True)
        conf = self.state / f"nginx-{pod.name}.conf"
        conf.write_text((CONF_DIR / "nginx.conf").read_text().format(state=self.state, pod=pod.name, port=HTTP_PORT))
        self.start(pod, "nginx", ["nginx", "-c", str(conf), "-e", str(self.state / f"nginx-{pod.name}.err")])

    def wait_listening(self, pod, port, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = run(in_netns(pod.netns, ["ss", "-Hltn", f"sport = :{port}"]), check=False).stdout
            if out.strip():
                return
            time.sleep(0.05)
        logs = "; ".join(f"{n}: {p.log.read_text()[-400:]}" for n, p in pod.procs.items() if p.log.exists())
        raise RuntimeError(f"pod {pod.name}: nothing listens on {port} after {timeout}s ({logs})")

    def pin_all(self, cpus):
        """Sets the CPU affinity of every long-running bench process (sidecars, apps)."""
        for p in self.procs:
            if p.alive():
                set_affinity(p.pid, cpus)

    # ---------------------------------------------------------------- cleanup
    def stop_procs(self):
        for p in self.procs:
            if p.alive():
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 3
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.popen.wait()
        self.procs.clear()

    def cleanup(self):
        self.stop_procs()
        for pod in reversed(self.pods):
            for conf in ("net", "lo"):
                try:
                    self._cni("DEL", conf, pod)
                except Exception as e:  # keep cleaning; report
                    log(f"cleanup: CNI DEL {pod.name} ({conf}): {e}")
            run(["ip", "netns", "del", pod.netns], check=False)
        self.pods.clear()


def parse_haproxy_frontend_sessions(csv_text):
    """From HAProxy's `show stat` CSV: {frontend name: total sessions (stot)}."""
    lines = csv_text.strip().splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ValueError(f"not HAProxy stats CSV: {csv_text[:200]!r}")
    header = lines[0][2:].split(",")
    out = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(",")))
        if row.get("svname") == "FRONTEND":
            out[row["pxname"]] = int(row["stot"] or 0)
    return out


def remove_leftovers():
    """Removes every netns and the bridge with the bench's names (also from a killed run)."""
    try:
        names = [n for n in os.listdir("/var/run/netns") if n.startswith(NETNS_PREFIX)]
    except FileNotFoundError:
        names = []
    for n in names:
        # Kill what still runs inside (a crashed run's sidecars) before deleting the netns.
        pids = run(["ip", "netns", "pids", n], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        run(["ip", "netns", "del", n], check=False)
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        run(["ip", "link", "del", BRIDGE], check=False)


class NodeLock:
    """The cgroup sock_ops attachment is node-wide: hold the same lock the tests use
    (fastpath_tests::serial_guard("cgroup-sockops")) while the accelerator is attached."""

    def __init__(self, resource, timeout=600):
        self.path = f"/tmp/fastpath-test-{resource}.lock"
        self.timeout = timeout
        self.f = None

    def __enter__(self):
        self.f = open(self.path, "a")
        deadline = time.monotonic() + self.timeout
        said = False
        while True:
            try:
                fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.f.close()
                    raise RuntimeError(f"{self.path} stayed locked for {self.timeout}s (a test holds it)")
                if not said:
                    log(f"waiting for {self.path} (a test is using the root cgroup's sock_ops)")
                    said = True
                time.sleep(0.5)

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()
