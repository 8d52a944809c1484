#!/usr/bin/env bash
# The stress harness's long pass: at least 20,000 randomized cases (tests/src/stress.rs) over
# paired sockets and the full sidecar path, as root. Extra arguments go to the harness:
#   --cases N   --seed BASE   --minutes M   --direct-only   --plain (nothing enrolled: the control)
# STRESS_REPLAY=<seed> replays one case that failed. For a replay: STRESS_PCAP=<dir> captures both
# mesh pods' handshakes, FINs and resets (tcpdump); STRESS_SIDECAR_POLLING=default runs HAProxy
# with its own level-triggered polling instead of edge-triggered.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
cargo build --release -p fastpath-tests --bin stress
if [ -n "${STRESS_REPLAY:-}" ]; then
  exec target/release/stress --replay "$STRESS_REPLAY" "$@"
fi
exec target/release/stress "$@"
