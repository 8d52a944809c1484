#!/usr/bin/env python3
"""The mesh benchmark: plain vs Istio redirection vs redirection + fastpath, on one node, with
real HAProxy sidecars and real load generators, interleaved and repeated in one run.

Usage (as root, from the repo, after a release build; scripts/bench.sh does all of it):
    python3 bench/run.py [--quick] [--reps N] [--secs S] [--out DIR]
Writes DIR/results.json, then bench/report.py renders BENCHMARKS.md and the plots from it.
"""

import argparse
import json
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accel as accel_mod  # noqa: E402
import loadgen  # noqa: E402
import mesh  # noqa: E402
import plan  # noqa: E402
import perfprofile as perf_profile  # noqa: E402
from fake_kube import FakeKube  # noqa: E402
from mesh import log  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OTHER_BENCHES = ("bench_plugin_add", "bench_installer", "bench_onehop")
# The image's static plugin for this machine's architecture (scripts/build-static.sh).
STATIC_PLUGIN = ROOT / "target" / "image" / "linux" / {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine) / "istio-cni"


def parse_json_summary(stdout):
    """A bench binary's JSON summary: the whole stdout, or else its last line."""
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        return json.loads(stdout.strip().splitlines()[-1])


def compact_json(obj):
    """Indented JSON with every list of numbers on one line (the latency quantiles)."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s+(-?[\d.e+-]+(?:,\s+-?[\d.e+-]+)*)\s+\]", lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


class Interrupted(Exception):
    pass


def on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


def machine_info():
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")).split()[1])

    def ver(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.splitlines()[0].strip()
        except Exception:
            return "?"

    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "haproxy": ver(["haproxy", "-v"]),
        "sockperf": ver(["sockperf", "--version"]),
        "iperf3": ver(["iperf3", "--version"]),
        "wrk": ver(["wrk", "-v"]),
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "git": subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip(),
    }


def run_client(pod, argv, cpus, timeout):
    """Runs a load generator in `pod`; returns (stdout, CPU seconds it used)."""
    cmd = mesh.in_netns(pod.netns, argv)
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=(lambda: os.sched_setaffinity(0, cpus))
    )
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        raise RuntimeError(f"{argv[0]} did not finish in {timeout}s: {out[-400:]}")
    # The rusage of the waited child: ip netns exec execs the client in place.
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return p.returncode, out, ru


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.state = Path(args.state_dir)
        self.kube = None
        self.node = None
        self.accel = None
        self.pairs = {}
        self.ncpu = os.cpu_count()
        self.pin_cpu = {self.ncpu - 1}
        self.all_cpus = set(range(self.ncpu))
        self.notes = []

    # ------------------------------------------------------------ set-up
    def choose_redirection(self):
        """The real istio-cni plugin, chained with a fake API server for its pod lookup, when it
        is built and really applies Istio's rules; else the clearly named fallback that applies
        the same rules with iptables-restore."""
        plugin = Path(self.args.bin_dir) / "istio-cni"
        if not plugin.is_file():
            return None, "istio-cni is not built"
        self.kube = FakeKube(self.state).start()
        probe = mesh.Node(ROOT, self.state / "probe", cni_plugin=plugin, kube=self.kube)
        self.kube.write_kubeconfig(probe.run_dir)
        probe.write_cni_config(with_plugin=True)
        try:
            pod = probe.add_pod("probe-meshed", meshed=True, accelerated=False)
            probe.assert_redirected(pod)
            return plugin, None
        except Exception as e:
            return None, f"the built istio-cni did not redirect a sidecar pod: {e}"
        finally:
            probe.cleanup()

    def setup(self):
        mesh.remove_leftovers()
        plugin, why_no_plugin = self.choose_redirection()
        self.node = mesh.Node(ROOT, self.state / "node", cni_plugin=plugin, kube=self.kube)
        modes = ["plain", "mesh"]
        installed = False
        if plugin and not self.args.no_accel:
            self.accel = accel_mod.Accelerator(ROOT, self.state / "accel", installer=Path(self.args.bin_dir) / "install-cni")
            self.node.write_cni_config(with_plugin=False)
            ready, active, why = self.accel.start(self.node, self.kube, plugin)
            installed = ready and self.node.plugin_chained()
            if ready and not installed:
                why = f"install-cni became ready but did not chain istio-cni into {self.node.conflist_path}"
                active = False
            if active:
                modes.append("accel")
            else:
                self.notes.append(f"No accelerated column: {why}.")
                log(f"accelerator unavailable: {why}")
            if not installed:
                self.accel.stop()
                self.accel = None
        elif not self.args.no_accel:
            self.notes.append(f"No accelerated column: {why_no_plugin}, so nothing would enroll pods.")
        if not installed:
            self.node.write_cni_config(with_plugin=bool(plugin))
            if self.kube:
                self.kube.write_kubeconfig(self.node.run_dir)
        if installed:
            self.redirection = ("istio-cni, installed by install-cni into the node's primary conflist (after bridge + host-local), "
                                "pod lookup answered by a fake API server")  # fmt: skip
        elif plugin:
            self.redirection = "istio-cni chained by the bench after bridge + host-local, pod lookup answered by a fake API server"
        else:
            self.redirection = "fallback: Istio's default sidecar rules (bench/conf/istio-sidecar.rules) applied with iptables-restore --noflush"
            self.notes.append(f"Redirection by the fallback, because {why_no_plugin}.")
        log(f"redirection: {self.redirection}")
        self.modes = modes

        for mode in modes:
            meshed = mode != "plain"
            client = self.node.add_pod(f"{mode}-client", meshed=meshed, accelerated=mode == "accel")
            server = self.node.add_pod(f"{mode}-server", meshed=meshed, accelerated=mode == "accel")
            if meshed:
                self.node.assert_redirected(client)
                self.node.assert_redirected(server)
                self.node.start_sidecar(client)
                self.node.start_sidecar(server)
            self.node.start_apps(server)
            self.pairs[mode] = (client, server)
        if self.accel:
            self.check_enrollment()
        for mode, (client, server) in self.pairs.items():
            for port in (mesh.SOCKPERF_PORT, mesh.IPERF_PORT, mesh.HTTP_PORT):
                self.node.wait_listening(server, port)
            if mode != "plain":
                self.node.wait_listening(client, 15001)
                self.node.wait_listening(server, 15006)
        for mode in modes:
            self.check_path(mode)

    def check_enrollment(self):
        """The accelerated pods are enrolled; the other columns' pods are not."""
        for mode, pair in self.pairs.items():
            for pod in pair:
                enrolled = self.accel.enrolled(pod)
                want = mode == "accel"
                if enrolled is None:
                    self.notes.append("Could not read the enrolled pods map (FP_PODS) with bpftool.")
                    return
                if enrolled != want:
                    raise RuntimeError(f"pod {pod.name} is {'' if enrolled else 'not '}enrolled in the accelerator; expected the opposite")
        log("enrollment: accel pods enrolled, the others not")

    def check_path(self, mode):
        """Proves the path: the server app sees 127.0.0.6 (through both sidecars) in a mesh
        pair and the client pod's IP in the plain pair; both sidecars counted the connection."""
        client, server = self.pairs[mode]
        before = self.sessions(mode)
        out = mesh.run(mesh.in_netns(client.netns, ["curl", "-sS", "--max-time", "5", f"http://{server.ip}:{mesh.HTTP_PORT}/"])).stdout
        seen = out.strip().rsplit(" ", 1)[-1]
        want = client.ip if mode == "plain" else "127.0.0.6"
        if seen != want:
            raise RuntimeError(f"{mode}: the server app saw the client as {seen!r}, expected {want} ({out!r})")
        if mode != "plain":
            after = self.sessions(mode)
            if after["client_outbound"] <= before["client_outbound"] or after["server_inbound"] <= before["server_inbound"]:
                raise RuntimeError(f"{mode}: the sidecars did not both carry the check request: {before} -> {after}")
        log(f"path {mode}: ok (server app saw {seen})")

    def sessions(self, mode):
        client, server = self.pairs[mode]
        if mode == "plain":
            return {}
        c = self.node.sidecar_sessions(client)
        s = self.node.sidecar_sessions(server)
        return {"client_outbound": c.get("outbound", 0), "server_inbound": s.get("inbound", 0)}

    # ------------------------------------------------------------ runs
    def place(self, placement):
        cpus = self.pin_cpu if placement == "pinned" else self.all_cpus
        self.node.pin_all(cpus)
        return cpus

    def sidecar_cpu_ns(self, mode):
        """CPU time so far of both sidecars of a column."""
        return sum(mesh.cpu_time_ns(p.pid) for pod in self.pairs[mode] for n, p in pod.procs.items() if n == "sidecar")

    def app_cpu_ns(self, mode, test):
        _, server = self.pairs[mode]
        p = server.procs.get({"sockperf": "sockperf", "iperf3": "iperf3", "wrk": "nginx"}[test])
        return mesh.cpu_time_ns(p.pid) if p else 0

    def run_cell(self, cell, cpus):
        client, server = self.pairs[cell.mode]
        secs = self.args.secs
        full_log = self.state / "fulllog" / f"{cell.test}-{cell.size}-{cell.placement}-{cell.mode}-{cell.rep}.csv"
        full_log.parent.mkdir(exist_ok=True)
        if cell.test == "sockperf":
            argv = loadgen.sockperf_client(server.ip, mesh.SOCKPERF_PORT, cell.size, secs, full_log)
        elif cell.test == "iperf3":
            argv = loadgen.iperf3_client(server.ip, mesh.IPERF_PORT, secs)
        else:
            argv = loadgen.wrk_client(server.ip, mesh.HTTP_PORT, secs, self.args.wrk_connections)
        sess0 = self.sessions(cell.mode)
        acc0 = self.accel.counters(self.node, self.pairs[cell.mode]) if self.accel and cell.mode == "accel" else None
        proxy0, app0 = self.sidecar_cpu_ns(cell.mode), self.app_cpu_ns(cell.mode, cell.test)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        rc, out, ru1 = run_client(client, argv, cpus, timeout=secs + 60)
        proxy_ns = self.sidecar_cpu_ns(cell.mode) - proxy0
        app_ns = self.app_cpu_ns(cell.mode, cell.test) - app0
        client_ns = ((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)) * 1e9
        if rc != 0:
            raise RuntimeError(f"{argv[0]} exited {rc}: {out[-600:]}")
        rec = {"test": cell.test, "size": cell.size, "placement": cell.placement, "mode": cell.mode, "rep": cell.rep}
        if cell.test == "sockperf":
            m = loadgen.parse_sockperf(out)
            rtts = loadgen.parse_sockperf_full_log(full_log.read_text()) if full_log.exists() else []
            rec["quantiles_us"] = loadgen.quantiles(rtts)
            full_log.unlink(missing_ok=True)
            requests = m["round_trips_total"]
        elif cell.test == "iperf3":
            m = loadgen.parse_iperf3(out)
            requests = None
        else:
            m = loadgen.parse_wrk(out)
            requests = m.get("requests")
        total_ns = proxy_ns + app_ns + client_ns
        m["cpu_proxies_ms"] = proxy_ns / 1e6
        m["cpu_total_ms"] = total_ns / 1e6
        if requests:
            m["cpu_us_per_req"] = total_ns / 1e3 / requests
            m["cpu_proxies_us_per_req"] = proxy_ns / 1e3 / requests
        if cell.test == "iperf3" and m.get("bytes"):
            m["cpu_ms_per_gib"] = total_ns / 1e6 / (m["bytes"] / 2**30)
        rec["metrics"] = m
        if cell.mode != "plain":
            sess1 = self.sessions(cell.mode)
            rec["sidecar_sessions"] = {k: sess1[k] - sess0.get(k, 0) for k in sess1}
            if not all(v > 0 for v in rec["sidecar_sessions"].values()):
                raise RuntimeError(f"{cell}: traffic bypassed a sidecar: {rec['sidecar_sessions']}")
        if acc0 is not None:
            acc1 = self.accel.counters(self.node, self.pairs[cell.mode])
            rec["accel_counters"] = accel_mod.counter_delta(acc0, acc1)
        return rec

    def run_all(self):
        cells = plan.schedule(self.args.reps, self.modes)
        log(f"{len(cells)} runs of {self.args.secs}s: {self.args.reps} repetitions x {len(plan.PLACEMENTS)} placements x "
            f"{len(plan.tests())} tests x {len(self.modes)} modes, interleaved")  # fmt: skip
        runs = []
        placement, cpus = None, None
        for i, cell in enumerate(cells):
            if cell.placement != placement:
                placement = cell.placement
                cpus = self.place(placement)
            try:
                rec = self.run_cell(cell, cpus)
            except Interrupted:
                raise
            except Exception as e:
                log(f"run {cell} failed: {e}")
                rec = {"test": cell.test, "size": cell.size, "placement": cell.placement, "mode": cell.mode, "rep": cell.rep, "error": str(e)}
            runs.append(rec)
            m = rec.get("metrics", {})
            brief = (
                f"p50 {m['p50_us']:.1f} p99 {m['p99_us']:.1f} us" if "p50_us" in m and cell.test == "sockperf"
                else f"{m['gbit_per_sec']:.2f} Gbit/s" if "gbit_per_sec" in m
                else f"{m['requests_per_sec']:.0f} req/s p50 {m['p50_us']:.0f} us" if "requests_per_sec" in m
                else "FAILED"
            )  # fmt: skip
            log(f"[{i + 1}/{len(cells)}] rep {cell.rep} {cell.placement:8} {cell.test:8} {cell.size or '':>5} {cell.mode:5}: {brief}")
        return runs

    # ------------------------------------------------------------ where the time goes
    PATH_COMMS = ("haproxy", "sockperf", "ksoftirqd", "swapper")

    def profile_path(self, size=64):
        """perf cpu-clock samples of the pinned CPU during a pinned ping-pong, per column."""
        probe = subprocess.run(["perf", "record", "-F", "99", "-o", "/dev/null", "--", "true"], capture_output=True, text=True)
        if probe.returncode != 0:
            return {"unavailable": f"perf record does not work here: {probe.stderr.strip()[-200:]}"}
        cpus = self.place("pinned")
        (cpu,) = self.pin_cpu
        out = {"freq_hz": self.args.perf_freq, "size": size, "modes": {}}
        for mode in self.modes:
            client, server = self.pairs[mode]
            data = self.state / f"perf-{mode}.data"
            full_log = self.state / f"perf-{mode}.csv"
            argv = ["perf", "record", "-q", "-C", str(cpu), "-F", str(self.args.perf_freq), "-o", str(data), "--",
                    *mesh.in_netns(client.netns, loadgen.sockperf_client(server.ip, mesh.SOCKPERF_PORT, size, self.args.secs, full_log))]  # fmt: skip
            p = subprocess.run(argv, capture_output=True, text=True, timeout=self.args.secs + 60,
                               preexec_fn=lambda: os.sched_setaffinity(0, cpus))  # fmt: skip
            if p.returncode != 0:
                out["modes"][mode] = {"error": p.stderr.strip()[-300:]}
                continue
            m = loadgen.parse_sockperf(p.stdout)
            rep = subprocess.run(["perf", "report", "-i", str(data), "-n", "--stdio", "--no-children", "-s", "comm,dso,sym",
                                  "-g", "none", "-t", ";"], capture_output=True, text=True, timeout=120)  # fmt: skip
            rows = perf_profile.parse_perf_report(rep.stdout)
            out["modes"][mode] = {
                "p50_us": m["p50_us"],
                "round_trips": m["round_trips_total"],
                "us_per_rt": perf_profile.breakdown(rows, self.args.perf_freq, m["round_trips_total"], self.PATH_COMMS),
                "top": perf_profile.top_symbols(rows, only_comms=self.PATH_COMMS),
                "kernel_other": perf_profile.top_in_category(rows, "kernel, other", only_comms=self.PATH_COMMS),
            }
            data.unlink(missing_ok=True)
            full_log.unlink(missing_ok=True)
            log(f"profile {mode}: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(out["modes"][mode]["us_per_rt"].items(), key=lambda kv: -kv[1])))
        return out

    # ------------------------------------------------------------ other benches
    def other_benches(self):
        results = {}
        for name in OTHER_BENCHES:
            exe = Path(self.args.bin_dir) / name
            if not exe.is_file():
                results[name] = {"missing": f"{name} is not built (not in this tree yet)"}
                continue
            log(f"running {name}")
            t0 = time.monotonic()
            env = dict(os.environ)
            if name == "bench_plugin_add" and STATIC_PLUGIN.is_file():
                # The plugin the image ships (static musl, scripts/build-static.sh): the runtime
                # on a node runs that one, not the glibc build next to the bench.
                env["ISTIO_CNI_BIN"] = str(STATIC_PLUGIN)
            try:
                p = subprocess.run([str(exe)], capture_output=True, text=True, timeout=self.args.other_timeout, cwd=ROOT, env=env)
                if p.returncode != 0:
                    results[name] = {"error": f"exit {p.returncode}: {p.stderr.strip()[-800:]}"}
                else:
                    results[name] = {"summary": parse_json_summary(p.stdout)}
            except (json.JSONDecodeError, IndexError) as e:
                results[name] = {"error": f"stdout is not a JSON summary ({e}): {p.stdout[-400:]!r}"}
            except subprocess.TimeoutExpired:
                results[name] = {"error": f"did not finish in {self.args.other_timeout}s"}
            results[name]["secs"] = round(time.monotonic() - t0, 1)
        return results

    def cleanup(self):
        if self.node:
            self.node.cleanup()
            self.node = None
        if self.accel:
            self.accel.stop()
        if self.kube:
            self.kube.stop()
        mesh.remove_leftovers()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repetition of 2 s runs (a smoke run, not for publishing)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--secs", type=int, default=3)
    ap.add_argument("--wrk-connections", type=int, default=8)
    ap.add_argument("--no-accel", action="store_true", help="skip the accelerated column")
    ap.add_argument("--no-other", action="store_true", help="skip the plugin/installer/one-hop benches")
    ap.add_argument("--other-timeout", type=int, default=300)
    ap.add_argument("--no-profile", action="store_true", help="skip the perf profile of the pinned 64 B path")
    ap.add_argument("--perf-freq", type=int, default=4999)
    ap.add_argument("--bin-dir", default=str(ROOT / "target/release"), help="where istio-cni, install-cni and the bench_* binaries are")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    ap.add_argument("--state-dir", default="/tmp/fastpath-bench")
    ap.add_argument("--cleanup-only", action="store_true", help="remove what a killed run left behind, then exit")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.secs = 1, 2
    if os.geteuid() != 0:
        sys.exit("bench: must run as root (netns, iptables, bpf)")
    if args.cleanup_only:
        mesh.remove_leftovers()
        accel_mod.Accelerator(ROOT, Path(args.state_dir) / "accel").stop()
        return
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    subprocess.run(["rm", "-rf", args.state_dir])
    Path(args.state_dir).mkdir(parents=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    started = time.time()
    results = {"machine": machine_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))}
    try:
        bench.setup()
        results["redirection"] = bench.redirection
        results["accelerator"] = bench.accel.describe() if bench.accel else None
        results["config"] = {"reps": args.reps, "secs": args.secs, "wrk_connections": args.wrk_connections, "modes": bench.modes,
                             "pinned_cpu": sorted(bench.pin_cpu), "quick": args.quick}  # fmt: skip
        results["runs"] = bench.run_all()
        if bench.accel:
            # With every pod still up: what the pinned maps hold.
            results["accelerator"] = dict(bench.accel.describe(), status_after_runs=bench.accel.status_report()[:1500])
        if not args.no_profile:
            results["profile"] = bench.profile_path()
    finally:
        bench.cleanup()
    results["other"] = {} if args.no_other else bench.other_benches()
    results["notes"] = bench.notes
    results["duration_secs"] = round(time.time() - started)
    (out / "results.json").write_text(compact_json(results))
    log(f"wrote {out / 'results.json'} ({results['duration_secs']} s)")


if __name__ == "__main__":
    main()
