#!/usr/bin/env python3
"""Renders BENCHMARKS.md and the plots from a bench run's results.json.

    python3 bench/report.py [--results bench/results/results.json] [--out BENCHMARKS.md]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import plan  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def fx(r, digits=2):
    return "–" if r is None else f"**{r:.{digits}f}×**"


def spread(runs, key, metric):
    vals = [r["metrics"][metric] for r in runs if not r.get("error") and (r["test"], r["size"], r["placement"], r["mode"]) == key and r["metrics"].get(metric) is not None]
    return (min(vals), max(vals)) if vals else None


def cell(summary, runs, key, metric, digits=1, show_range=True):
    s = summary.get(key)
    if not s or s.get(metric) is None:
        return "–"
    rng = spread(runs, key, metric) if show_range else None
    if rng and len([r for r in runs if (r["test"], r["size"], r["placement"], r["mode"]) == key]) > 1:
        return f"{fmt(s[metric], digits)} <sub>({fmt(rng[0], digits)}–{fmt(rng[1], digits)})</sub>"
    return fmt(s[metric], digits)


# ------------------------------------------------------------------ plots
def plot(results, out_dir):
    """Latency distributions (CDF per mode, pooled over repetitions) and a bar summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if not r.get("error")]
    modes = results["config"]["modes"]
    colors = {"plain": "#7f7f7f", "mesh": "#d62728", "accel": "#2ca02c"}
    files = []

    fig, axes = plt.subplots(len(plan.PLACEMENTS), len(plan.SOCKPERF_SIZES), figsize=(15, 8), squeeze=False)
    for i, placement in enumerate(plan.PLACEMENTS):
        for j, size in enumerate(plan.SOCKPERF_SIZES):
            ax = axes[i][j]
            for mode in modes:
                pooled = sorted(q for r in runs if (r["test"], r["size"], r["placement"], r["mode"]) == ("sockperf", size, placement, mode) for q in r.get("quantiles_us", []))
                if not pooled:
                    continue
                ys = [k / (len(pooled) - 1) * 100 for k in range(len(pooled))]
                ax.plot(pooled, ys, label=plan.MODE_TITLES[mode], color=colors[mode], lw=1.6)
            ax.set_xscale("log")
            ax.set_title(f"{size} B, {placement}")
            ax.set_xlabel("round trip (µs, log)")
            ax.set_ylabel("percentile")
            ax.set_ylim(0, 100)
            ax.axhline(50, color="#ccc", lw=0.6, zorder=0)
            ax.axhline(99, color="#ccc", lw=0.6, zorder=0)
            ax.grid(True, which="both", axis="x", color="#eee")
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("sockperf ping-pong round trip (--full-rtt), app → sidecar → sidecar → app; CDF pooled over repetitions")
    fig.tight_layout()
    p = out_dir / "latency-cdf.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)

    # Tail view: latency at each percentile, percentile axis stretched towards 99.9.
    fig, axes = plt.subplots(1, len(plan.PLACEMENTS), figsize=(13, 4.8), squeeze=False)
    import math

    for i, placement in enumerate(plan.PLACEMENTS):
        ax = axes[0][i]
        for mode in modes:
            for size, style in zip(plan.SOCKPERF_SIZES, ("-", "--", ":")):
                pooled = sorted(q for r in runs if (r["test"], r["size"], r["placement"], r["mode"]) == ("sockperf", size, placement, mode) for q in r.get("quantiles_us", []))
                if len(pooled) < 10:
                    continue
                n = len(pooled)
                xs, ys = [], []
                for k in range(n - 1):
                    pct = k / (n - 1)
                    xs.append(-math.log10(1 - pct))
                    ys.append(pooled[k])
                ax.plot(xs, ys, style, color=colors[mode], lw=1.3, label=f"{mode} {size} B")
        ax.set_xticks([0, 1, 2, 3])
        ax.set_xticklabels(["p0", "p90", "p99", "p99.9"])
        ax.set_yscale("log")
        ax.set_ylabel("round trip (µs, log)")
        ax.set_title(f"tail latency, {placement}")
        ax.grid(True, which="both", color="#eee")
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    p = out_dir / "latency-tail.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)

    summary = plan.summarise(runs)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    groups = [(f"{s} B\n{pl}", ("sockperf", s, pl)) for pl in plan.PLACEMENTS for s in plan.SOCKPERF_SIZES]
    width = 0.8 / max(1, len(modes))
    for k, mode in enumerate(modes):
        vals = [(summary.get((*g, mode)) or {}).get("p50_us") for _, g in groups]
        axes[0].bar([x + k * width for x in range(len(groups))], [v or 0 for v in vals], width, label=plan.MODE_TITLES[mode], color=colors[mode])
    axes[0].set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(groups))])
    axes[0].set_xticklabels([g[0] for g in groups], fontsize=8)
    axes[0].set_ylabel("p50 round trip (µs)")
    axes[0].set_title("latency (lower is better)")
    axes[0].legend(fontsize=8)
    for ax, test, metric, label in ((axes[1], "iperf3", "gbit_per_sec", "stream (Gbit/s)"), (axes[2], "wrk", "requests_per_sec", "HTTP keep-alive (req/s)")):
        for k, mode in enumerate(modes):
            vals = [(summary.get((test, 0, pl, mode)) or {}).get(metric) for pl in plan.PLACEMENTS]
            ax.bar([x + k * width for x in range(len(plan.PLACEMENTS))], [v or 0 for v in vals], width, label=plan.MODE_TITLES[mode], color=colors[mode])
        ax.set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(plan.PLACEMENTS))])
        ax.set_xticklabels(plan.PLACEMENTS)
        ax.set_title(f"{label} (higher is better)")
    fig.suptitle(f"medians of {results['config']['reps']} interleaved repetitions")
    fig.tight_layout()
    p = out_dir / "summary.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)
    return files


# ------------------------------------------------------------------ markdown
# Fields that name an item of a list in a bench's JSON summary (rather than measure it).
ID_KEYS = ("name", "case", "test", "mode", "cpu", "placement", "size", "write_size")


def item_label(item, index):
    """`cpu=same size=64` for a list item that carries identifying fields, else its index."""
    if isinstance(item, dict):
        ids = [f"{k}={item[k]}" for k in ID_KEYS if k in item and not isinstance(item[k], (dict, list))]
        if ids:
            return " ".join(ids)
    return str(index)


def flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list) and all(not isinstance(x, (dict, list)) for x in obj):
        yield prefix, ", ".join(map(str, obj))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from flatten(v, f"{prefix}[{item_label(v, i)}]")
    else:
        yield prefix, obj


def summary_tables(summary):
    """A JSON summary as markdown tables: each object whose values are plain becomes a row
    (named by its path), rows with the same fields share a table."""
    rows = {}
    for path, v in flatten(summary):
        parent, _, leaf = path.rpartition(".")
        rows.setdefault(parent or "(top)", {})[leaf] = v
    tables = {}
    for name, fields in rows.items():
        tables.setdefault(tuple(fields), []).append((name, fields))
    out = []
    for cols, members in tables.items():
        if len(members) == 1 and len(cols) <= 3 and members[0][0] == "(top)":
            out.append(", ".join(f"{c}: `{members[0][1][c]}`" for c in cols) + "\n")
            continue
        out.append("| | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
        for name, fields in members:
            out.append(f"| {name} | " + " | ".join(f"{fields[c]:.4g}" if isinstance(fields[c], float) else str(fields[c]) for c in cols) + " |")
        out.append("")
    return out


OTHER_TITLES = {
    "bench_plugin_add": "CNI plugin ADD latency (`tests/src/bin/bench_plugin_add.rs`)",
    "bench_installer": "Installer: start → ready, repair latency, memory (`tests/src/bin/bench_installer.rs`)",
    "bench_onehop": "One hop on loopback: plain TCP vs sockmap vs unix socket (`tests/src/bin/bench_onehop.rs`)",
}


def render_other(other):
    lines = []
    for name, title in OTHER_TITLES.items():
        r = other.get(name)
        lines.append(f"### {title}\n")
        if r is None:
            lines.append("Not run (`--no-other`).\n")
            continue
        if "missing" in r:
            lines.append(f"Not available: {r['missing']}.\n")
            continue
        if "error" in r:
            lines.append(f"**Failed** ({r.get('secs', '?')} s): `{r['error'][:600]}`\n")
            continue
        lines.append(f"Ran in {r.get('secs', '?')} s. Its JSON summary, as printed, one row per object:\n")
        lines.extend(summary_tables(r["summary"]))
    return "\n".join(lines)


def hop_check(run):
    """(connections, hops expected, hops paired) of one accelerated run. Each connection of the
    path makes three hops, each paired on its server side: app -> sidecar in the client pod,
    sidecar -> sidecar and sidecar -> app in the server pod."""
    conns = run.get("sidecar_sessions", {}).get("client_outbound", 0)
    c = run["accel_counters"]
    client = next((v for k, v in c.items() if k.endswith("-client")), {})
    server = next((v for k, v in c.items() if k.endswith("-server")), {})
    if "connections_paired" not in client:
        # Older counters: both sockets of a hop are enrolled only once it is paired.
        if "sockets_enrolled" in client:
            return conns, 3 * conns, (client.get("sockets_enrolled", 0) + server.get("sockets_enrolled", 0)) // 2
        return conns, 3 * conns, None
    return conns, 3 * conns, client.get("connections_paired", 0) + server.get("connections_paired", 0)


def render_hops(accel_runs):
    L = ["### Was every hop redirected? (fastpath's per-pod counters, per accelerated run)\n"]
    L.append("Each connection of the path makes three hops (app → sidecar in the client pod; sidecar → sidecar and "
             "sidecar → app in the server pod), each counted as paired on its server side.\n")  # fmt: skip
    keys = sorted({k for r in accel_runs for cs in r["accel_counters"].values() for k in cs})
    L.append("| test | placement | rep | connections | hops paired | " + " | ".join(keys) + " |")
    L.append("|" + "---|" * (5 + len(keys)))
    all_paired = True
    for r in accel_runs:
        conns, want, paired = hop_check(r)
        if paired is None or paired < want:
            all_paired = False
        sums = {k: sum(cs.get(k, 0) for cs in r["accel_counters"].values()) for k in keys}
        name = f"{r['test']} {r['size']} B" if r["test"] == "sockperf" else r["test"]
        L.append(f"| {name} | {r['placement']} | {r['rep']} | {conns} | {'?' if paired is None else paired} of {want} | "
                 + " | ".join(str(sums[k]) for k in keys) + " |")  # fmt: skip
    L.append("")
    L.append(("Every hop of every accelerated run was paired." if all_paired else
              "**Not every hop was paired** in every run (see the table): those hops took the TCP path.") + "\n")  # fmt: skip
    return L


NETWORK_AREAS = ("TCP/IP stack, veth, bridge, loopback", "netfilter (iptables, conntrack, NAT)", "memcpy (user <-> kernel)")


def render_unpinned_split(runs, modes):
    """Unpinned runs are bimodal: compare the columns within each scheduler placement."""
    split = plan.unpinned_by_placement(runs)
    if not split:
        return []
    L = ["#### Unpinned, split by where the scheduler put the chain\n",
         f"A run counts as *one vCPU* when its p50 is within {plan.COLOCATED_FACTOR}× of the pinned median of its column "
         "and size, else as *spread* over both vCPUs. Medians of p50 (µs) with the number of runs; the ratio compares "
         "like with like.\n"]  # fmt: skip
    hdr = "| size | placement | " + " | ".join(modes) + (" | **mesh → accel** |" if "accel" in modes else " |")
    L.append(hdr)
    L.append("|" + "---|" * (hdr.count("|") - 1))
    for size in plan.SOCKPERF_SIZES:
        for where in ("one vCPU", "spread"):
            vals = {m: split.get((size, m, where), []) for m in modes}
            if not any(vals.values()):
                continue
            row = f"| {size} B | {where} | " + " | ".join(f"{plan.median(v):.1f} <sub>(n={len(v)})</sub>" if v else "–" for v in vals.values())
            if "accel" in modes:
                row += f" | {fx(plan.ratio(plan.median(vals['mesh']), plan.median(vals['accel'])))} |"
            else:
                row += " |"
            L.append(row)
    L.append("")
    return L


def render_reading(summary, prof, modes, runs):
    """A generated closing note: what the mesh costs, what acceleration removed, what is left,
    the most any socket-level accelerator could get here (from the perf areas), and what the
    unpinned runs pay for crossing vCPUs."""
    k = lambda mode: summary.get(("sockperf", 64, "pinned", mode))  # noqa: E731
    plain, meshv, acc = k("plain"), k("mesh"), k("accel")
    if not (plain and meshv):
        return []
    L = ["### Reading the numbers (generated from this run)\n"]
    cost = meshv["p50_us"] - plain["p50_us"]
    line = (f"- Pinned, 64 B: the sidecar path costs **{cost:.1f} µs** of round trip over plain pod-to-pod "
            f"({plain['p50_us']:.1f} → {meshv['p50_us']:.1f} µs p50)")  # fmt: skip
    if acc:
        saved = meshv["p50_us"] - acc["p50_us"]
        line += f"; fastpath removes **{saved:.1f} µs** of it ({saved / cost * 100:.0f} %), {meshv['p50_us'] / acc['p50_us']:.2f}× on p50"
    L.append(line + ".")
    modes_prof = (prof or {}).get("modes", {})
    pm, pa = modes_prof.get("mesh", {}).get("us_per_rt"), modes_prof.get("accel", {}).get("us_per_rt")
    if pm:
        net_m = sum(pm.get(a, 0) for a in NETWORK_AREAS)
        p50m = modes_prof["mesh"]["p50_us"]
        ceiling = p50m / max(1e-9, p50m - net_m)
        sched_m = pm.get("scheduler, context switches, wake-ups", 0)
        proxy_m = pm.get("user space: sidecars (HAProxy)", 0)
        line = (f"- perf, same case: without fastpath the path spends **{net_m:.1f} CPU µs per round trip** in the TCP/IP "
                f"stack, netfilter and copies, **{sched_m:.1f} µs** scheduling (four processes hand every message on: about "
                f"eight context switches per round trip on one CPU) and **{proxy_m:.1f} µs** in HAProxy's own code.")  # fmt: skip
        if pa:
            net_a = sum(pa.get(a, 0) for a in NETWORK_AREAS) + pa.get("sockmap / BPF", 0)
            line += (f" With fastpath: **{net_a:.1f} µs** in the network stack (sockmap/BPF included), "
                     f"{pa.get('scheduler, context switches, wake-ups', 0):.1f} µs scheduling, "
                     f"{pa.get('user space: sidecars (HAProxy)', 0):.1f} µs HAProxy.")  # fmt: skip
        L.append(line)
        L.append(f"- So even an accelerator that removed **all** of that network-stack time at no cost of its own would "
                 f"reach about **{ceiling:.2f}×** here ({p50m:.1f} µs p50 − {net_m:.1f} µs). The rest belongs to the proxies "
                 f"and the scheduler, which socket-level acceleration does not touch.")  # fmt: skip
    split = plan.unpinned_by_placement(runs)
    spread_plain = split.get((64, "plain", "spread"))
    if spread_plain:
        extra = plan.median(spread_plain) - plain["p50_us"]
        L.append(f"- Unpinned, when the scheduler puts client and server on different vCPUs, plain pod-to-pod takes "
                 f"{plan.median(spread_plain):.1f} µs instead of {plain['p50_us']:.1f}: about **{extra / 2:.0f} µs per "
                 f"cross-vCPU wake-up** (two per round trip) on this VM. The mesh path crosses vCPUs more often, and no "
                 f"socket-level change removes that latency; it is why the unpinned ratios are lower than the pinned ones.")  # fmt: skip
    L.append("- Unpinned runs land in one of two modes (the whole chain on one vCPU, or spread), so their medians "
             "depend on that draw; the split table above compares like with like, and the CDF plots show both modes.")  # fmt: skip
    L.append("")
    return L


def render_profile(prof):
    """The perf breakdown: CPU µs per round trip by category, per column."""
    if not prof:
        return []
    L = ["### Where the time goes (pinned, 64 B ping-pong, perf)\n"]
    if "unavailable" in prof:
        return L + [f"Not measured: {prof['unavailable']}.\n"]
    modes = [m for m in prof["modes"] if "us_per_rt" in prof["modes"][m]]
    L.append(f"`perf record -C <pinned CPU> -F {prof['freq_hz']}` (cpu-clock sampling: this VM exposes no hardware counters) "
             "during one pinned 64 B sockperf run per column; samples of the path's processes (sockperf, HAProxy, softirq "
             "threads, idle-time softirqs), idle left out, in **CPU µs per round trip** by kernel/user area.\n")  # fmt: skip
    cats = sorted({c for m in modes for c in prof["modes"][m]["us_per_rt"]}, key=lambda c: -max(prof["modes"][m]["us_per_rt"].get(c, 0) for m in modes))
    L.append("| area | " + " | ".join(modes) + " |\n|" + "---|" * (len(modes) + 1))
    for c in cats:
        L.append(f"| {c} | " + " | ".join(fmt(prof["modes"][m]["us_per_rt"].get(c), 2) for m in modes) + " |")
    L.append("| **total** | " + " | ".join(f"**{fmt(sum(prof['modes'][m]['us_per_rt'].values()), 2)}**" for m in modes) + " |")
    L.append("| p50 round trip in that run | " + " | ".join(fmt(prof["modes"][m]["p50_us"], 1) for m in modes) + " |")
    L.append("")
    for m in modes:
        top = prof["modes"][m].get("top", [])[:8]
        if top:
            L.append(f"<details><summary>top symbols, {m}</summary>\n\n" + "\n".join(f"- {pct:.1f}% `{sym}`" for sym, pct in top) + "\n</details>\n")
    return L


def render(results, plots_rel):
    runs = results["runs"]
    ok_runs = [r for r in runs if not r.get("error")]
    failed = [r for r in runs if r.get("error")]
    summary = plan.summarise(runs)
    modes = results["config"]["modes"]
    reps = results["config"]["reps"]
    m = results["machine"]
    L = []
    L.append("# Benchmarks\n")
    L.append(
        "<!-- Generated by bench/report.py from bench/results/results.json; `bash scripts/bench.sh` rewrites this file. -->\n"
    )
    L.append("How much faster are the sidecars? Two pods on one node, each with a real L4 proxy as its sidecar, "
             "measured three ways, side by side, interleaved, in one run.\n")  # fmt: skip
    if results["config"].get("quick"):
        L.append("> **Quick run** (`--quick`: 1 repetition of short runs). A smoke test of the pipeline, not numbers to quote.\n")
    L.append("## Reproduce\n")
    L.append("```sh\nbash scripts/bench.sh          # full run, ~15 min: setup, release build, all benches, this file + plots\n"
             "bash scripts/bench.sh --quick  # ~3 min smoke run of the same pipeline, written to bench-out/\n```\n")  # fmt: skip
    L.append(f"Last run: {results['started']}, took {results.get('duration_secs', '?')} s, tree `{m.get('git', '?')}`.\n")
    L.append("## Machine\n")
    L.append("| | |\n|---|---|")
    L.append(f"| kernel | Linux {m['kernel']} |")
    L.append(f"| CPU | {m['cpu']}, {m['cpus']} vCPUs |")
    L.append(f"| memory | {m['mem_gib']} GiB |")
    L.append(f"| load average at start | {' '.join(m['loadavg_at_start'])} |")
    L.append(f"| sidecar | {m['haproxy']} |")
    L.append(f"| load | {m['sockperf']}; {m['iperf3']}; {m['wrk']}; {m['nginx']} |")
    L.append("")

    L.append("## The mesh path: app → own sidecar → peer sidecar → peer app\n")
    L.append("- **Pods**: network namespaces made through the real CNI chain (reference `bridge` + `host-local` "
             "in 10.246.0.0/24, `loopback`), one client pod and one server pod per column.")  # fmt: skip
    L.append(f"- **Redirection**: {results['redirection']}.")
    L.append("- **Sidecars**: HAProxy in TCP mode as uid 1337 in every meshed pod, one thread, no splice: "
             "15001 outbound connects to the original destination (`server 0.0.0.0:0`, read with `SO_ORIGINAL_DST`), "
             "15006 inbound connects to the app from 127.0.0.6, as Envoy's passthrough does. "
             "Every run checks both sidecars' session counters went up, and the set-up checks the server app sees "
             "127.0.0.6 (meshed) or the client pod IP (plain).")  # fmt: skip
    L.append("- **Load**: `sockperf ping-pong --tcp --mps=max --full-rtt` (round trip, one connection) at 64 B, 1 KiB, 16 KiB; "
             "`iperf3` one stream; `wrk -t1 -c{c} --latency` against nginx (HTTP/1.1 keep-alive, small body).".replace("{c}", str(results["config"]["wrk_connections"])))  # fmt: skip
    L.append("- **Columns**: " + "; ".join(f"*{plan.MODE_TITLES[x]}*" for x in modes) + ". Each column has its own client "
             "and server pod on the same bridge.")  # fmt: skip
    if "accel" in modes:
        L.append("- **The accelerated column** is fastpath as deployed: `install-cni` installed the plugin and loaded, "
                 "self-tested and pinned the probes; the plugin enrolled the pods on ADD. The iptables-only column runs "
                 "on the same node at the same time, its pods opted out with `fastpath.io/accelerate: \"false\"` (checked: "
                 "not enrolled), so for it the probes only run at connection set-up, as for any pod outside fastpath.")  # fmt: skip
    L.append(f"- **Placement**: *pinned* = every process of the path (apps, sidecars, load generator) on CPU {results['config']['pinned_cpu']}; "
             "*unpinned* = the scheduler decides.")  # fmt: skip
    L.append(f"- **Repetition**: {reps} repetitions of {results['config']['secs']} s runs; inside each repetition every test runs in every "
             "column back to back, with the columns' order rotating. Tables show **medians over repetitions**, "
             "with <sub>(min–max)</sub> when there is more than one.")  # fmt: skip
    if failed:
        L.append(f"- **{len(failed)} run(s) failed** and are left out of the medians: see *Runs that failed* below.")
    L.append("")
    if failed:
        L.append("### Runs that failed\n")
        L.append("A failed run is an error the application itself saw (the load generator's own message), so it is a "
                 "finding, not noise. The medians above use only the runs that completed; `n` shows how many.\n")  # fmt: skip
        L.append("| test | placement | column | rep | error |\n|---|---|---|---|---|")
        for r in failed:
            name = f"{r['test']} {r['size']} B" if r["test"] == "sockperf" else r["test"]
            L.append(f"| {name} | {r['placement']} | {r['mode']} | {r['rep']} | `{r['error'][:200]}` |")
        L.append("")

    if "accel" in modes:
        L.append("### Against the goal (issue 6): redirection + fastpath vs redirection only\n")
        L.append("| what | measured | goal | |\n|---|---|---|---|")
        L[-1] = "| what | measured | goal | | runs (mesh / accel) |\n|---|---|---|---|---|"
        for what, r, goal, met, key in plan.goal_checks(summary, with_keys=True):
            ns = " / ".join(str((summary.get((*key, m)) or {}).get("n", 0)) for m in ("mesh", "accel"))
            L.append(f"| {what} | {fx(r, 3)} | ≥ {goal}× | {'met' if met else '**not met**'} | {ns} of {reps} |")
        L.append("")
    else:
        L.append("### Against the goal (issue 6)\n")
        L.append("Not measurable in this run: there is no accelerated column (see the notes below).\n")

    L.append("### Latency: sockperf ping-pong round trip (µs)\n")
    hdr = "| placement | size | " + " | ".join(f"{x} p50" for x in modes) + " | " + " | ".join(f"{x} p99" for x in modes) + " | mesh cost vs plain (p50) |"
    if "accel" in modes:
        hdr += " **mesh → accel p50** | **mesh → accel p99** |"
    L.append(hdr)
    L.append("|" + "---|" * (hdr.count("|") - 1))
    for placement in plan.PLACEMENTS:
        for size in plan.SOCKPERF_SIZES:
            k = lambda mode: ("sockperf", size, placement, mode)  # noqa: E731
            row = f"| {placement} | {size} B | " + " | ".join(cell(summary, runs, k(x), "p50_us") for x in modes)
            row += " | " + " | ".join(cell(summary, runs, k(x), "p99_us") for x in modes)
            plain, meshv = summary.get(k("plain")), summary.get(k("mesh"))
            cost = (meshv["p50_us"] - plain["p50_us"]) if plain and meshv else None
            row += f" | {'+' if cost is not None and cost >= 0 else ''}{fmt(cost)} µs |"
            if "accel" in modes:
                acc = summary.get(k("accel"))
                row += f" {fx(plan.ratio(meshv and meshv['p50_us'], acc and acc['p50_us']))} | {fx(plan.ratio(meshv and meshv['p99_us'], acc and acc['p99_us']))} |"
            L.append(row)
    L.append("")

    L.extend(render_unpinned_split(runs, modes))

    L.append("### Throughput\n")
    hdr = "| test | placement | " + " | ".join(modes) + " | mesh / plain |"
    if "accel" in modes:
        hdr += " **accel / mesh** |"
    L.append(hdr)
    L.append("|" + "---|" * (hdr.count("|") - 1))
    for test, metric, unit, digits in (("iperf3", "gbit_per_sec", "Gbit/s", 2), ("wrk", "requests_per_sec", "req/s", 0)):
        for placement in plan.PLACEMENTS:
            k = lambda mode: (test, 0, placement, mode)  # noqa: E731
            row = f"| {'iperf3 stream (Gbit/s)' if test == 'iperf3' else 'wrk HTTP keep-alive (req/s)'} | {placement} | "
            row += " | ".join(cell(summary, runs, k(x), metric, digits) for x in modes)
            plain, meshv = summary.get(k("plain")), summary.get(k("mesh"))
            r = plan.ratio(plain and plain[metric], meshv and meshv[metric], higher_is_better=True)
            row += f" | {fmt(r, 2)}× |"
            if "accel" in modes:
                acc = summary.get(k("accel"))
                row += f" {fx(plan.ratio(meshv and meshv[metric], acc and acc[metric], higher_is_better=True))} |"
            L.append(row)
    L.append("")
    L.append("wrk latency (µs, p50 / p99):\n")
    L.append("| placement | " + " | ".join(modes) + " |\n|" + "---|" * (len(modes) + 1))
    for placement in plan.PLACEMENTS:
        row = f"| {placement} | "
        for x in modes:
            s = summary.get(("wrk", 0, placement, x))
            row += (f"{fmt(s.get('p50_us'), 0)} / {fmt(s.get('p99_us'), 0)}" if s else "–") + " | "
        L.append(row)
    L.append("")

    L.append("### CPU time per request\n")
    L.append("CPU time (user + system) of the load generator (its rusage), the server app and both sidecars "
             "(`/proc/<pid>/task/*/schedstat`), divided by the round trips or requests of the whole run. "
             "Softirq work done on another task's time is not attributed; pinned runs are the cleanest.\n")  # fmt: skip
    has_accel = "accel" in modes
    L.append("| test | placement | " + " | ".join(f"{x} total" for x in modes) + " | " + " | ".join(f"{x} sidecars" for x in modes if x != "plain")
             + (" | **mesh → accel (total)** |" if has_accel else " |"))  # fmt: skip
    L.append("|" + "---|" * (2 + len(modes) + len([x for x in modes if x != "plain"]) + (1 if has_accel else 0)))
    for test, size, unit, metric in [("sockperf", s, "µs/round trip", "cpu_us_per_req") for s in plan.SOCKPERF_SIZES] + [("wrk", 0, "µs/request", "cpu_us_per_req"), ("iperf3", 0, "ms/GiB", "cpu_ms_per_gib")]:
        for placement in plan.PLACEMENTS:
            name = f"{test} {size} B ({unit})" if test == "sockperf" else f"{test} ({unit})"
            row = f"| {name} | {placement} | " + " | ".join(fmt((summary.get((test, size, placement, x)) or {}).get(metric)) for x in modes)
            per = "cpu_proxies_us_per_req" if metric == "cpu_us_per_req" else None
            if per:
                row += " | " + " | ".join(fmt((summary.get((test, size, placement, x)) or {}).get(per)) for x in modes if x != "plain")
            else:
                row += " | " + " | ".join("–" for x in modes if x != "plain")
            if has_accel:
                m_, a_ = (summary.get((test, size, placement, x)) or {} for x in ("mesh", "accel"))
                row += f" | {fx(plan.ratio(m_.get(metric), a_.get(metric)))}"
            L.append(row + " |")
    L.append("")

    L.append("### Plots\n")
    for p in plots_rel:
        L.append(f"![{Path(p).stem}]({p})\n")

    L.extend(render_profile(results.get("profile")))
    L.extend(render_reading(summary, results.get("profile"), modes, runs))

    accel_runs = [r for r in ok_runs if r.get("accel_counters") is not None]
    if accel_runs:
        L.extend(render_hops(accel_runs))
    acc = results.get("accelerator")
    if acc:
        L.append(f"Accelerator: `{acc.get('installer')}`, pins under `{acc.get('pins')}`.")
        if acc.get("self_test"):
            L.append(f"Its start-up self-test said: *{acc['self_test']}*\n")
        status = acc.get("status_after_runs") or acc.get("status", "")
        when = "after the runs, with every pod still up" if acc.get("status_after_runs") else "once it was ready"
        L.append(f"`install-cni accel-status` {when}:\n")
        L.append("```text\n" + status.strip() + "\n```\n")

    if results.get("notes") or results.get("analysis"):
        L.append("### Notes\n")
        for n in results.get("notes", []):
            L.append(f"- {n}")
        for n in results.get("analysis", []):
            L.append(f"- {n}")
        L.append("")

    L.append("## The other benchmarks\n")
    L.append("Run by the same command after the mesh runs (release builds of the `tests` crate's bench binaries).\n")
    L.append(render_other(results.get("other", {})))
    extra = ROOT / "bench/ANALYSIS.md"
    if extra.exists():
        L.append(extra.read_text())
    return "\n".join(L).rstrip() + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=str(ROOT / "bench/results/results.json"))
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args()
    results = json.loads(Path(args.results).read_text())
    res_dir = Path(args.results).parent
    out = Path(args.out)
    plots = [] if args.no_plots else plot(results, res_dir)
    rel = [str(Path(p).resolve().relative_to(out.resolve().parent)) if Path(p).resolve().is_relative_to(out.resolve().parent) else str(p) for p in plots]
    out.write_text(render(results, rel))
    print(f"wrote {out} and {len(plots)} plots in {res_dir}")


if __name__ == "__main__":
    main()
