#!/usr/bin/env bash
# The main job: a local demo node with throwaway host dirs and netns pods, no cluster.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
cargo build --release --workspace --exclude fastpath-probes
exec "$ROOT/target/release/cnirun" --help 2>/dev/null || true
