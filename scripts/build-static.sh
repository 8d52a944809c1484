#!/usr/bin/env bash
# Builds the static (musl) release binaries of install-cni and istio-cni that the image ships, for
# each architecture asked for (default: both), and leaves them in the offline image's build context:
#   bash scripts/build-static.sh [amd64] [arm64]        (or FASTPATH_ARCHES="amd64 arm64")
#   -> target/image/linux/<arch>/install-cni, target/image/linux/<arch>/istio-cni
# In the Dockerfile's builder stage (one architecture) it also copies them to $FASTPATH_OUT.
#
# This machine's own architecture builds ring's C (rustls) with musl-gcc; the other one with
# Debian's cross gcc, which also links (scripts/setup.sh installs both, and the rustup targets).
# installer/build.rs builds the eBPF object (bpfel) for each target: each install-cni must embed it
# as built, and a copy is kept in target/build-static-<arch>.bpf.o (scripts/check-image.sh compares
# the architectures' objects).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
ARCHES=${*:-${FASTPATH_ARCHES:-amd64 arm64}}
die() { echo "build-static: $*" >&2; exit 1; }
# The eBPF toolchain (rust-src, bpf-linker), the rustup targets and the C compilers.
FASTPATH_ARCHES="$ARCHES" FASTPATH_SETUP_ONLY_TOOLCHAIN=1 bash scripts/setup.sh
HOST_ARCH=$(dpkg --print-architecture)
CONTEXT=target/image
mkdir -p "$CONTEXT"
for arch in $ARCHES; do
  case $arch in
    amd64) triple=x86_64-unknown-linux-musl gnu=x86_64-linux-gnu machine=x86-64 ;;
    arm64) triple=aarch64-unknown-linux-musl gnu=aarch64-linux-gnu machine="ARM aarch64" ;;
    *) die "no static build for architecture '$arch' (amd64, arm64)" ;;
  esac
  t=${triple//-/_}
  if [ "$arch" = "$HOST_ARCH" ]; then
    export "CC_$t=musl-gcc"
  else
    export "CC_$t=$gnu-gcc" "AR_$t=$gnu-ar" "CARGO_TARGET_${t^^}_LINKER=$gnu-gcc"
  fi
  echo "build-static: $arch ($triple)"
  start=$(date +%s)
  # musl links statically by default (+crt-static). The JSON messages name the installer's
  # OUT_DIR, where build.rs left the eBPF object it embedded.
  cargo build --release --locked --target "$triple" -p fastpath-installer -p fastpath-cni-plugin \
    --message-format=json-render-diagnostics >"target/build-static-$arch.json"
  out_dir=$(sed -n 's/.*"reason":"build-script-executed","package_id":"[^"]*installer[^"]*".*"out_dir":"\([^"]*\)".*/\1/p' \
    "target/build-static-$arch.json" | tail -1)
  [ -f "$out_dir/fastpath-probes" ] || die "$arch: no eBPF object in the installer's OUT_DIR ('$out_dir')"
  OUT=target/$triple/release
  for b in install-cni istio-cni; do
    what=$(file -b "$OUT/$b")
    echo "$what" | grep -Eq "(statically|static-pie) linked" || die "$arch: $b is not static: $what"
    echo "$what" | grep -q ", $machine," || die "$arch: $b is not for $machine: $what"
  done
  # The object must be in the binary as it is (an empty one means AYA_BUILD_SKIP: no accelerator).
  [ -s "$out_dir/fastpath-probes" ] || die "$arch: the eBPF object is empty (AYA_BUILD_SKIP set?)"
  perl -e 'local $/; open(O, "<", $ARGV[0]) or die; open(B, "<", $ARGV[1]) or die;
           my ($o, $b) = (scalar <O>, scalar <B>); exit(index($b, $o) >= 0 ? 0 : 1)' \
    "$out_dir/fastpath-probes" "$OUT/install-cni" || die "$arch: install-cni does not embed $out_dir/fastpath-probes"
  cp "$out_dir/fastpath-probes" "target/build-static-$arch.bpf.o"
  mkdir -p "$CONTEXT/linux/$arch"
  cp "$OUT/install-cni" "$OUT/istio-cni" "$CONTEXT/linux/$arch/"
  echo "build-static: $arch in $(( $(date +%s) - start )) s: $CONTEXT/linux/$arch/{install-cni,istio-cni}" \
    "($(stat -c %s "$OUT/install-cni") and $(stat -c %s "$OUT/istio-cni") bytes; eBPF object $(stat -c %s "$out_dir/fastpath-probes") bytes)"
  # In the image's builder stage, hand the binaries to the runtime stage.
  if [ -n "${FASTPATH_OUT:-}" ]; then mkdir -p "$FASTPATH_OUT" && cp "$OUT/install-cni" "$OUT/istio-cni" "$FASTPATH_OUT/"; fi
done
