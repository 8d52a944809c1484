#!/usr/bin/env bash
# Runs every test: unit tests (no root) and the privileged end-to-end tests (root, netns, bpffs,
# iptables, containerd). Does its own set-up first. Extra arguments go to `cargo test`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
# Privileged tests share node-wide state (root cgroup attachment, containerd); they serialise
# themselves with file locks, so the default parallelism is safe.
# The end-to-end tests run the built binaries (istio-cni, install-cni); cargo test builds a
# package's binaries only for that package's own integration tests, so build them first.
cargo build --workspace --exclude fastpath-probes --bins
cargo test --workspace --exclude fastpath-probes "$@"
# The bench's own parsers and report logic.
/usr/bin/python3 -m unittest discover -s bench -p 'test_*.py' 2>&1 | tail -3
# A test that failed half-way must not leave its accelerator attached to the node (it would
# run for every later test, benchmark and pod): every scratch pin directory is gone.
leaked=$(ls -d /sys/fs/bpf/fastpath-test-* 2>/dev/null || true)
if [ -n "$leaked" ]; then
  echo "test: pins left behind under bpffs (programs still attached): $leaked" >&2
  exit 1
fi
