"""The load generators (sockperf, iperf3, wrk) and pure parsers of their output."""

import json
import re

QUANTILES_KEPT = 200  # points of each run's latency distribution kept for the plots


def parse_sockperf(text):
    """Parses `sockperf ping-pong` output: percentiles (µs) and message counts."""
    out = {}
    m = re.search(r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+); ReceivedMessages=(\d+)", text)
    if not m:
        raise ValueError(f"sockperf printed no [Valid Duration] line: {text[-500:]!r}")
    out["valid_secs"] = float(m.group(1))
    out["round_trips"] = int(m.group(3))
    # The whole run, warm-up included: what CPU time is divided by.
    m = re.search(r"\[Total Run\] RunTime=([\d.]+) sec; Warm up time=\d+ msec; SentMessages=(\d+); ReceivedMessages=(\d+)", text)
    out["round_trips_total"] = int(m.group(3)) if m else out["round_trips"]
    pct = {}
    for p, v in re.findall(r"---> percentile ([\d.]+) =\s*([\d.]+)", text):
        pct[float(p)] = float(v)
    if 50.0 not in pct or 99.0 not in pct:
        raise ValueError(f"sockperf printed no p50/p99: {text[-500:]!r}")
    out["p50_us"] = pct[50.0]
    out["p99_us"] = pct[99.0]
    out["p99_9_us"] = pct.get(99.9)
    m = re.search(r"avg-rtt=([\d.]+)", text)
    out["avg_us"] = float(m.group(1)) if m else None
    m = re.search(r"# dropped messages = (\d+); # duplicated messages = (\d+); # out-of-order messages = (\d+)", text)
    if m:
        out["dropped"], out["duplicated"], out["out_of_order"] = map(int, m.groups())
    out["round_trips_per_sec"] = out["round_trips"] / out["valid_secs"] if out["valid_secs"] else 0.0
    return out


def parse_sockperf_full_log(text):
    """The per-message round trips (µs) of a `--full-log` file."""
    rtts = []
    in_data = False
    for line in text.splitlines():
        if line.startswith("packet, txTime"):
            in_data = True
            continue
        if not in_data:
            continue
        parts = line.split(",")
        if len(parts) != 4:
            continue
        try:
            rtts.append(float(parts[3]))
        except ValueError:
            continue
    return rtts


def quantiles(values, n=QUANTILES_KEPT):
    """`n` evenly spaced quantiles (0..1 inclusive) of `values`, for a compact CDF."""
    if not values:
        return []
    s = sorted(values)
    last = len(s) - 1
    return [round(s[round(i * last / (n - 1))], 2) for i in range(n)]


def parse_iperf3(text):
    """Throughput (Gbit/s) of an `iperf3 -J` client run, as received by the server."""
    data = json.loads(text)
    if "error" in data:
        raise ValueError(f"iperf3: {data['error']}")
    end = data["end"]
    recv = end["sum_received"]
    return {
        "gbit_per_sec": recv["bits_per_second"] / 1e9,
        "bytes": recv["bytes"],
        "secs": recv["seconds"],
        "retransmits": end.get("sum_sent", {}).get("retransmits"),
    }


_UNIT_US = {"us": 1.0, "ms": 1000.0, "s": 1e6}


def _wrk_time_us(s):
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", s.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {s!r}")
    return float(m.group(1)) * _UNIT_US[m.group(2)]


def parse_wrk(text):
    """Requests/s and latency percentiles (µs) of `wrk --latency` output."""
    out = {}
    m = re.search(r"Requests/sec:\s*([\d.]+)", text)
    if not m:
        raise ValueError(f"wrk printed no Requests/sec: {text[-500:]!r}")
    out["requests_per_sec"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(s|m)", text)
    if m:
        out["requests"] = int(m.group(1))
    for p, v in re.findall(r"^\s*(50|75|90|99)%\s+(\S+)\s*$", text, re.M):
        out[f"p{p}_us"] = _wrk_time_us(v)
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(map(int, m.groups())) if m else 0
    if "p50_us" not in out or "p99_us" not in out:
        raise ValueError(f"wrk printed no latency distribution: {text[-500:]!r}")
    return out


def sockperf_client(dst, port, size, secs, full_log):
    return [
        "sockperf", "ping-pong", "--tcp", "-i", dst, "-p", str(port), "-m", str(size), "-t", str(secs),
        "--mps=max", "--full-rtt", "--full-log", str(full_log),
    ]  # fmt: skip


def iperf3_client(dst, port, secs):
    return ["iperf3", "-c", dst, "-p", str(port), "-t", str(secs), "-J"]


def wrk_client(dst, port, secs, connections):
    return ["wrk", "-t1", f"-c{connections}", f"-d{secs}s", "--latency", f"http://{dst}:{port}/"]
