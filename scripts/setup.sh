#!/usr/bin/env bash
# One idempotent set-up step for a fresh machine of this kind (Debian, root, rustup stable + nightly).
# Installs the Debian packages the demo, tests and benchmarks use, the nightly's rust-src, and
# bpf-linker built against the nightly's own libLLVM into $FASTPATH_TOOLS (default: <repo>/.tools).
# A second run only checks and takes seconds. A step that cannot work stops with one line naming it.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${FASTPATH_TOOLS:-$ROOT/.tools}
LOG=$TOOLS/setup.log
mkdir -p "$TOOLS"
: >"$LOG"

fail() { echo "setup: step '$1' failed: $2 (details: $LOG)" >&2; exit 1; }

# --- step: apt packages -------------------------------------------------------------------------
# Binaries each package must provide; a package is installed only when one of them is missing.
declare -A PKG_PROBE=(
  [iptables]=/usr/sbin/iptables-legacy-restore
  [nftables]=/usr/sbin/nft
  [iproute2]=/usr/bin/ip
  [containernetworking-plugins]=/usr/lib/cni/bridge
  [containerd]=/usr/bin/containerd
  [runc]=/usr/sbin/runc
  [bpftool]=/usr/sbin/bpftool
  [busybox-static]=/bin/busybox
  [haproxy]=/usr/sbin/haproxy
  [sockperf]=/usr/bin/sockperf
  [iperf3]=/usr/bin/iperf3
  [nginx-light]=/usr/sbin/nginx
  [wrk]=/usr/bin/wrk
  [python3-grpcio]=/usr/lib/python3/dist-packages/grpc/__init__.py
  [python3-grpc-tools]=/usr/lib/python3/dist-packages/grpc_tools/protoc.py
  [python3-matplotlib]=/usr/lib/python3/dist-packages/matplotlib/__init__.py
  [openssl]=/usr/bin/openssl
  [gcc]=/usr/bin/gcc
  [libc6-dev]=/usr/lib/x86_64-linux-gnu/libc.a
  [buildah]=/usr/bin/buildah
)
missing=()
# scripts/build-static.sh and the image's builder stage need only the toolchain steps below and,
# for the static (musl) binaries of each architecture in FASTPATH_ARCHES, a C compiler for ring
# (rustls): musl-gcc on this machine's own architecture; Debian's cross gcc (also the linker) and
# that architecture's libc headers for the other one.
if [ "${FASTPATH_SETUP_ONLY_TOOLCHAIN:-0}" = 1 ]; then
  PKG_PROBE=()
  HOST_ARCH=$(dpkg --print-architecture)
  for arch in ${FASTPATH_ARCHES:-}; do
    case $arch in
      amd64) gnu=x86_64-linux-gnu gcc=gcc-x86-64-linux-gnu ;;
      arm64) gnu=aarch64-linux-gnu gcc=gcc-aarch64-linux-gnu ;;
      *) fail static-targets "no static build for architecture '$arch' (amd64, arm64)" ;;
    esac
    if [ "$arch" = "$HOST_ARCH" ]; then
      PKG_PROBE[musl-tools]=/usr/bin/musl-gcc
    else
      PKG_PROBE[$gcc]=/usr/bin/$gnu-gcc
      PKG_PROBE[libc6-dev-$arch-cross]=/usr/$gnu/include/string.h
    fi
  done
fi
for pkg in "${!PKG_PROBE[@]}"; do
  [ -e "${PKG_PROBE[$pkg]}" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update >>"$LOG" 2>&1 || fail apt-update "apt-get update did not succeed"
  apt-get install -y --no-install-recommends "${missing[@]}" >>"$LOG" 2>&1 \
    || fail apt-install "apt-get install ${missing[*]} did not succeed"
  # Debian's containerd/nginx packages want to start services under systemd; nothing runs here
  # unless a test starts it with its own state dir.
fi

# --- step: nightly rust-src (the probes build core with -Z build-std) ---------------------------
rustup toolchain list | grep -q '^nightly' || fail nightly "no nightly toolchain is installed (rustup cannot fetch one here)"
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  echo "setup: adding rust-src to nightly"
  rustup component add rust-src --toolchain nightly >>"$LOG" 2>&1 || fail rust-src "rustup component add rust-src --toolchain nightly"
fi

# --- step: rustup targets of the static binaries (FASTPATH_ARCHES, set by build-static.sh) ------
for arch in ${FASTPATH_ARCHES:-}; do
  case $arch in amd64) triple=x86_64-unknown-linux-musl ;; arm64) triple=aarch64-unknown-linux-musl ;; esac
  # In the repository, so that the target goes to the toolchain rust-toolchain.toml selects.
  if ! (cd "$ROOT" && rustup target list --installed) | grep -qx "$triple"; then
    echo "setup: adding the $triple target"
    (cd "$ROOT" && rustup target add "$triple") >>"$LOG" 2>&1 || fail rust-target "rustup target add $triple"
  fi
done

# --- step: bpf-linker against the nightly's own libLLVM ------------------------------------------
NIGHTLY_LIB=$(rustc +nightly --print sysroot)/lib
LLVM_LIB=$(cd "$NIGHTLY_LIB" && ls libLLVM.so.*-nightly 2>/dev/null | head -1)
[ -n "$LLVM_LIB" ] || fail bpf-linker "the nightly has no libLLVM.so.*-nightly in $NIGHTLY_LIB"
LLVM_MAJOR=$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
PREFIX=$TOOLS/rust-llvm$LLVM_MAJOR
mkdir -p "$PREFIX/lib"
ln -sf "$NIGHTLY_LIB/$LLVM_LIB" "$PREFIX/lib/libLLVM.so"
ln -sf "$NIGHTLY_LIB/$LLVM_LIB" "$PREFIX/lib/$LLVM_LIB"
# The stamp ties the built linker to this exact libLLVM; a new nightly rebuilds it.
STAMP=$TOOLS/bpf-linker/built-for
if [ "$(cat "$STAMP" 2>/dev/null)" != "$LLVM_LIB" ] || ! "$TOOLS/bpf-linker/bin/bpf-linker" --version >/dev/null 2>&1; then
  echo "setup: building bpf-linker 0.13.0 against $LLVM_LIB (about a minute)"
  LLVM_PREFIX=$PREFIX cargo +nightly install bpf-linker@0.13.0 --locked --force \
    --no-default-features --features "llvm-$LLVM_MAJOR" --root "$TOOLS/bpf-linker" >>"$LOG" 2>&1 \
    || fail bpf-linker "cargo install bpf-linker@0.13.0 with llvm-$LLVM_MAJOR"
  echo "$LLVM_LIB" >"$STAMP"
fi

# --- step: kernel facilities the tests and the demo rely on --------------------------------------
if [ "${FASTPATH_SETUP_ONLY_TOOLCHAIN:-0}" = 1 ]; then echo "setup: toolchain ok"; exit 0; fi

# --- step: the offline Kubernetes schema validator the manifest tests use (PyPI) -----------------
# `--version`, not `command -v`: pyenv keeps a shim after the package is gone.
if ! kubernetes-validate --version >/dev/null 2>&1; then
  echo "setup: installing kubernetes-validate (PyPI)"
  python3 -m pip install --quiet kubernetes-validate >>"$LOG" 2>&1 \
    || python3 -m pip install --quiet --break-system-packages kubernetes-validate >>"$LOG" 2>&1 \
    || fail kubernetes-validate "pip install kubernetes-validate"
  command -v pyenv >/dev/null 2>&1 && pyenv rehash >>"$LOG" 2>&1
  hash -r
  kubernetes-validate --version >/dev/null 2>&1 || fail kubernetes-validate "installed, but it does not run from PATH"
fi
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf 2>>"$LOG" || fail bpffs "mount -t bpf bpf /sys/fs/bpf"
fi
# CRI's bin_dir takes one directory; the reference plugins live in /usr/lib/cni on Debian.
mkdir -p /opt/cni/bin
for p in /usr/lib/cni/*; do [ -e "/opt/cni/bin/$(basename "$p")" ] || ln -s "$p" /opt/cni/bin/; done

echo "setup: ok (tools in $TOOLS)"
