"""Pure decisions of the bench: what runs in which order, and how runs are summarised."""

import statistics
from dataclasses import dataclass

MODES = ("plain", "mesh", "accel")
MODE_TITLES = {
    "plain": "plain (no mesh)",
    "mesh": "iptables redirection (Istio)",
    "accel": "redirection + fastpath",
}
PLACEMENTS = ("pinned", "unpinned")
SOCKPERF_SIZES = (64, 1024, 16384)


@dataclass(frozen=True)
class Cell:
    rep: int
    placement: str
    test: str  # "sockperf" | "iperf3" | "wrk"
    size: int  # message size for sockperf, 0 otherwise
    mode: str

    @property
    def key(self):
        return (self.test, self.size, self.placement, self.mode)


def tests():
    return [("sockperf", s) for s in SOCKPERF_SIZES] + [("iperf3", 0), ("wrk", 0)]


def schedule(reps, modes, placements=PLACEMENTS):
    """Every (placement, test, mode), `reps` times, interleaved: each repetition runs every test
    in every mode back to back, and the modes' order rotates per repetition and per test, so a
    slow spell of the machine lands on different modes, not always on the same one."""
    cells = []
    modes = list(modes)
    for rep in range(reps):
        for p_i, placement in enumerate(placements):
            for t_i, (test, size) in enumerate(tests()):
                shift = (rep + t_i + p_i) % len(modes)
                for mode in modes[shift:] + modes[:shift]:
                    cells.append(Cell(rep, placement, test, size, mode))
    return cells


def median(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarise(runs):
    """Medians over repetitions per (test, size, placement, mode) of every numeric metric."""
    groups = {}
    for r in runs:
        if r.get("error"):
            continue
        k = (r["test"], r["size"], r["placement"], r["mode"])
        groups.setdefault(k, []).append(r["metrics"])
    out = {}
    for k, ms in groups.items():
        keys = {key for m in ms for key, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        out[k] = {key: median([m.get(key) for m in ms]) for key in keys}
        out[k]["n"] = len(ms)
    return out


def ratio(before, after, higher_is_better=False):
    """How many times better `after` is than `before` (>1 = better)."""
    if before is None or after is None or before == 0 or after == 0:
        return None
    return after / before if higher_is_better else before / after


# The goal of issue 6: acceleration against iptables-only on the sidecar path.
GOALS = {
    ("pinned", "p50"): 1.5,
    ("unpinned", "p50"): 1.45,
    "stream": 1.65,
}


def goal_checks(summary, with_keys=False):
    """Each goal line as (what, measured ratio or None, goal, met?[, (test, size, placement)])."""
    checks = []
    for placement in PLACEMENTS:
        goal = GOALS[(placement, "p50")]
        for size in (64, 1024):
            mesh = summary.get(("sockperf", size, placement, "mesh"))
            accel = summary.get(("sockperf", size, placement, "accel"))
            for pct in ("p50", "p99"):
                r = ratio(mesh and mesh[f"{pct}_us"], accel and accel[f"{pct}_us"])
                checks.append((f"{pct} round trip, {size} B, {placement}", r, goal, r is not None and r >= goal, ("sockperf", size, placement)))
        mesh = summary.get(("iperf3", 0, placement, "mesh"))
        accel = summary.get(("iperf3", 0, placement, "accel"))
        r = ratio(mesh and mesh["gbit_per_sec"], accel and accel["gbit_per_sec"], higher_is_better=True)
        checks.append((f"stream throughput, {placement}", r, GOALS["stream"], r is not None and r >= GOALS["stream"], ("iperf3", 0, placement)))
    return checks if with_keys else [c[:4] for c in checks]


# An unpinned run whose p50 is within this factor of the pinned median of its column and size
# ran with the whole chain on one vCPU; above it the scheduler spread the chain over both.
COLOCATED_FACTOR = 1.3


def unpinned_by_placement(runs):
    """Unpinned sockperf runs split by where the scheduler put the chain, judged from each run's
    p50 against the pinned median of the same column and size: {(size, mode, "one vCPU" |
    "spread")): [p50, ...]}."""
    summary = summarise(runs)
    out = {}
    for r in runs:
        if r.get("error") or r["test"] != "sockperf" or r["placement"] != "unpinned":
            continue
        pinned = summary.get(("sockperf", r["size"], "pinned", r["mode"]))
        if not pinned:
            continue
        where = "one vCPU" if r["metrics"]["p50_us"] <= COLOCATED_FACTOR * pinned["p50_us"] else "spread"
        out.setdefault((r["size"], r["mode"], where), []).append(r["metrics"]["p50_us"])
    return out
