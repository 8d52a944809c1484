#!/usr/bin/env bash
# Fuzzes what fastpath reads from outside (cargo-fuzz, libFuzzer, on the nightly toolchain):
# the plugin's stdin config and prevResult, pod annotations to rules, the conflist merge, the
# kubeconfig reader, the config template, and the log socket's lines. Corpora: fuzz/corpus/.
#   bash scripts/fuzz.sh                 # every target for 20 s (the CI pass)
#   bash scripts/fuzz.sh 600             # every target for 10 min
#   bash scripts/fuzz.sh 600 kubeconfig  # one target
# A crash stops the run and names its input under fuzz/artifacts/<target>/; replay it with
#   cargo +nightly fuzz run -O <target> fuzz/artifacts/<target>/<file>
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
secs=${1:-20}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(plugin_config annotations_to_rules conflist_merge kubeconfig template_render log_lines)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
# The targets use the parsers only: the eBPF object is not built.
export AYA_BUILD_SKIP=1
cargo +nightly fuzz build -O
for t in "${targets[@]}"; do
  echo "== fuzz $t (${secs} s)"
  cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" -max_len=8192 2>&1 |
    grep -E "^(Done|INFO: Seed|==|SUMMARY|thread|panicked|artifact_prefix|Test unit written)" || true
  # grep hides the exit status: a crash leaves an artifact.
  if compgen -G "fuzz/artifacts/$t/*" >/dev/null; then
    echo "fuzz: $t crashed; inputs: $(ls fuzz/artifacts/$t)" >&2
    exit 1
  fi
done
