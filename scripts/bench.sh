#!/usr/bin/env bash
# The one bench command. Makes BENCHMARKS.md and its plots current:
#   set-up (scripts/setup.sh) -> release build -> the mesh bench (plain vs Istio redirection vs
#   redirection + fastpath, HAProxy sidecars, sockperf/iperf3/wrk, pinned and unpinned,
#   interleaved and repeated) -> the plugin/installer/one-hop benches -> BENCHMARKS.md + plots.
# Everything it creates (netns, bridge, processes, pins, host dirs) is removed at the end, also
# when a step fails or the run is interrupted.
#
#   bash scripts/bench.sh            # full run (~15 min on 2 vCPUs)
#   bash scripts/bench.sh --quick    # 1 short repetition, into bench-out/: checks the pipeline (~3 min)
#   Other flags go to bench/run.py (--reps N, --secs S, --no-accel, --no-other; see --help).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
[ "$(id -u)" = 0 ] || { echo "bench: run as root (network namespaces, iptables, bpf)" >&2; exit 1; }
# Debian's python3 has python3-matplotlib; a python3 earlier on PATH (pyenv) may not.
PY=/usr/bin/python3
STATE=${FASTPATH_BENCH_STATE:-/tmp/fastpath-bench}

bash scripts/setup.sh
echo "bench: building release binaries"
cargo build --release --bins -q
# The plugin ADD bench runs the image's static plugin (target/image/linux/<arch>/istio-cni).
bash scripts/build-static.sh "$(case $(uname -m) in aarch64) echo arm64 ;; *) echo amd64 ;; esac)"

child=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
    kill -TERM "$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
  fi
  "$PY" bench/run.py --cleanup-only --state-dir "$STATE" || true
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A quick run is a smoke test of the pipeline: it never overwrites the published numbers.
OUT=bench/results
REPORT=BENCHMARKS.md
for a in "$@"; do
  if [ "$a" = --quick ]; then OUT=bench-out; REPORT=bench-out/BENCHMARKS.md; fi
done

"$PY" bench/run.py --state-dir "$STATE" --out "$OUT" "$@" &
child=$!
wait "$child"
child=
"$PY" bench/report.py --results "$OUT/results.json" --out "$REPORT"
echo "bench: $REPORT and $OUT/*.png are current"
