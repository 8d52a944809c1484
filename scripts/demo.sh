#!/usr/bin/env bash
# The main job: a local demo node with throwaway host dirs and netns pods, no cluster.
# Sets up the machine, builds fastpath, and runs the demo (tests/src/bin/fastpath-demo.rs).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
echo "building fastpath (release)..."
cargo build --release --quiet -p fastpath-installer -p fastpath-cni-plugin -p fastpath-tests 2>&1 \
  | grep -v '^warning: fastpath-installer@' || true
exec "$ROOT/target/release/fastpath-demo"
