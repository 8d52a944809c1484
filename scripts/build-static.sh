#!/usr/bin/env bash
# Builds static release binaries of install-cni and istio-cni (glibc, +crt-static), the ones the
# image ships. In the builder stage it also leaves them in /out.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# The eBPF toolchain (rust-src, bpf-linker) without Debian packages: the image build needs none.
FASTPATH_SETUP_ONLY_TOOLCHAIN=1 bash scripts/setup.sh
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --locked \
  --target x86_64-unknown-linux-gnu -p fastpath-installer -p fastpath-cni-plugin
OUT=target/x86_64-unknown-linux-gnu/release
for b in install-cni istio-cni; do
  file "$OUT/$b" | grep -Eq "static(-pie)? linked" || { echo "build-static: $b is not static: $(file "$OUT/$b")" >&2; exit 1; }
done
# In the image's builder stage, hand the binaries to the runtime stage.
if [ -n "${FASTPATH_OUT:-}" ]; then mkdir -p "$FASTPATH_OUT" && cp "$OUT/install-cni" "$OUT/istio-cni" "$FASTPATH_OUT/"; fi
echo "build-static: $OUT/install-cni $OUT/istio-cni"
