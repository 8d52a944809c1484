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
