#!/usr/bin/env bash
# Builds the images and their manifest list from this tree (scripts/image.sh: linux/amd64 and
# linux/arm64, offline) and checks what a DaemonSet relies on, in each architecture's image: the
# agent at /usr/local/bin/install-cni and the plugin at /opt/cni/bin/istio-cni, both static, for
# that architecture, and runnable (`install-cni version` and `--help`, the plugin's `VERSION`
# and its about text; the other architecture's under qemu-user, e.g. qemu-aarch64), the image's
# platform and default command, and that the list names exactly these images.
# Outside CI a missing qemu-user skips the foreign runs (SKIPPED); with CI=true it fails.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TAG=localhost/fastpath/install-cni:check-$$
ARCHES=${FASTPATH_ARCHES:-amd64 arm64}
HOST_ARCH=$(dpkg --print-architecture)
ctrs=()
cleanup() {
  for c in "${ctrs[@]}"; do buildah umount "$c" >/dev/null 2>&1 || true; buildah rm "$c" >/dev/null 2>&1 || true; done
  buildah manifest rm "$TAG" >/dev/null 2>&1 || true
  for arch in $ARCHES; do buildah rmi "$TAG-$arch" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
log=$(mktemp)
start=$(date +%s)
bash "$ROOT/scripts/image.sh" "$TAG" >"$log" 2>&1 || { echo "image: build failed"; tail -30 "$log"; rm -f "$log"; exit 1; }
grep '^build-static: .* in [0-9]* s' "$log" || true
rm -f "$log"
echo "image: built in $(( $(date +%s) - start )) s"
fail=0
tmp=$(mktemp -d)
trap 'cleanup; rm -rf "$tmp"' EXIT
# The eBPF object is bpfel on every host, but each target builds its own: aya-build compiles the
# probes with bpf_target_arch set to the target's architecture, and aya-ebpf-bindings has a module
# per architecture. What the kernel gets must be the same: the objects are byte-identical once
# debug info and BTF are stripped (instructions, maps, relocations, symbols, license), and their
# BTF has the same types, compared with type ids resolved (LLVM may number them in another order).
# What is left differs in the bindings' source path (src/x86_64/, src/aarch64/) in debug and line info.
objs=()
for arch in $ARCHES; do objs+=("$ROOT/target/build-static-$arch.bpf.o"); done
if ! command -v llvm-objcopy >/dev/null || ! command -v bpftool >/dev/null; then
  if [ "${CI:-}" = true ]; then echo "image: no llvm-objcopy or bpftool to compare the eBPF objects"; fail=1
  else echo "image: SKIPPED comparing the eBPF objects (no llvm-objcopy or bpftool)"; fi
elif [ "${#objs[@]}" -gt 1 ]; then
  for o in "${objs[@]}"; do
    llvm-objcopy --strip-debug --remove-section=.BTF --remove-section=.BTF.ext "$o" "$tmp/$(basename "$o")"
    cmp -s "$tmp/$(basename "${objs[0]}")" "$tmp/$(basename "$o")" \
      || { echo "image: $(basename "$o") and $(basename "${objs[0]}") differ in more than debug info and BTF"; fail=1; }
  done
  types=$(python3 - "${objs[@]}" <<'PY'
import json, subprocess, sys
def btf_types(path):
    types = {t["id"]: t for t in json.loads(subprocess.run(["bpftool", "-j", "btf", "dump", "file", path],
                                                           check=True, capture_output=True).stdout)["types"]}
    def ref(i, seen):  # a named type by kind and name, an anonymous one by what it is
        t = types.get(i)
        if t is None: return "void"
        return "%s:%s" % (t["kind"], t["name"]) if t["name"] != "(anon)" or i in seen else body(t, seen | {i})
    def walk(v, seen):
        if isinstance(v, dict):
            return {k: ref(x, seen) if k.endswith("type_id") else walk(x, seen) for k, x in v.items() if k != "id"}
        return [walk(x, seen) for x in v] if isinstance(v, list) else v
    def body(t, seen): return json.dumps(walk(t, seen), sort_keys=True)
    return sorted(body(t, {i}) for i, t in types.items())
first = btf_types(sys.argv[1])
sys.exit("differ" if any(btf_types(p) != first for p in sys.argv[2:]) else print(len(first)))
PY
  ) || { echo "image: the eBPF objects' BTF types differ"; fail=1; }
  [ "$fail" = 0 ] && echo "image: eBPF object: $(printf '%s ' $ARCHES)the same ($(stat -c %s "$tmp/$(basename "${objs[0]}")")" \
    "bytes without debug info and BTF, byte-identical; $types BTF types, the same)"
fi
# The list: one entry per architecture, each the digest of that architecture's image.
listed=$(buildah manifest inspect "$TAG" | python3 -c '
import json, sys
print(" ".join(sorted("%s/%s=%s" % (m["platform"]["os"], m["platform"]["architecture"], m["digest"])
                      for m in json.load(sys.stdin)["manifests"])))')
want=$(for arch in $ARCHES; do
  echo "linux/$arch=$(buildah inspect --type image --format '{{.FromImageDigest}}' "$TAG-$arch")"
done | sort | tr '\n' ' ')
[ "$listed" = "${want% }" ] || { echo "image: manifest list has [$listed], want [${want% }]"; fail=1; }
for arch in $ARCHES; do
  img=$TAG-$arch
  case $arch in amd64) machine=x86-64 qemu=x86_64 ;; arm64) machine="ARM aarch64" qemu=aarch64 ;; esac
  ctr=$(buildah from --pull=never --arch "$arch" "$img"); ctrs+=("$ctr")
  mnt=$(buildah mount "$ctr")
  python3 -c 'import sys; sys.exit(open(sys.argv[1], "rb").read() not in open(sys.argv[2], "rb").read())' \
    "$ROOT/target/build-static-$arch.bpf.o" "$mnt/usr/local/bin/install-cni" \
    || { echo "image $arch: install-cni does not embed target/build-static-$arch.bpf.o"; fail=1; }
  for f in usr/local/bin/install-cni opt/cni/bin/istio-cni; do
    what=$(file -b "$mnt/$f" 2>&1)
    if ! echo "$what" | grep -Eq "(statically|static-pie) linked"; then echo "image $arch: /$f missing or not static: $what"; fail=1; fi
    if ! echo "$what" | grep -q ", $machine,"; then echo "image $arch: /$f is not for $machine: $what"; fail=1; fi
  done
  platform=$(buildah inspect --type image --format '{{.OCIv1.OS}}/{{.OCIv1.Architecture}}' "$img")
  [ "$platform" = "linux/$arch" ] || { echo "image $arch: platform is $platform"; fail=1; }
  cmd=$(buildah inspect --type image "$img" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["OCIv1"]["config"]["Cmd"], separators=(",",":")))')
  [ "$cmd" = '["/usr/local/bin/install-cni"]' ] || { echo "image $arch: CMD is $cmd"; fail=1; }
  # Run the binaries: natively, or the other architecture's under qemu-user.
  run=()
  if [ "$arch" != "$HOST_ARCH" ]; then
    q=$(command -v "qemu-$qemu" || command -v "qemu-$qemu-static" || true)
    if [ -z "$q" ]; then
      if [ "${CI:-}" = true ]; then echo "image $arch: no qemu-$qemu (Debian's qemu-user) to run the binaries"; fail=1
      else echo "image $arch: SKIPPED running the binaries (no qemu-$qemu: apt-get install qemu-user)"; fi
      continue
    fi
    run=("$q")
  fi
  t0=$(date +%s%N)
  agent=$mnt/usr/local/bin/install-cni plugin=$mnt/opt/cni/bin/istio-cni
  v=$("${run[@]}" "$agent" version 2>&1) && echo "$v" | grep -Eq '^install-cni \(fastpath\) [0-9]' \
    || { echo "image $arch: install-cni version: $v"; fail=1; }
  h=$("${run[@]}" "$agent" --help 2>&1) && echo "$h" | grep -q '^Usage: install-cni' \
    || { echo "image $arch: install-cni --help: $(echo "$h" | head -3)"; fail=1; }
  v=$(CNI_COMMAND=VERSION "${run[@]}" "$plugin" </dev/null 2>&1) && echo "$v" | grep -q '"supportedVersions":\[.*"1.1.0"' \
    || { echo "image $arch: CNI_COMMAND=VERSION istio-cni: $v"; fail=1; }
  h=$(env -u CNI_COMMAND "${run[@]}" "$plugin" --help </dev/null 2>&1) && echo "$h" | grep -q '^CNI plugin istio-cni (fastpath)' \
    || { echo "image $arch: istio-cni --help: $(echo "$h" | head -3)"; fail=1; }
  ran="ran ${run[*]:+under $(basename "${run[0]}") }in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  echo "image $arch: $platform, $(du -sk "$mnt" | cut -f1) KiB (install-cni $(stat -c %s "$agent") B," \
    "istio-cni $(stat -c %s "$plugin") B), static, $ran"
done
[ "$fail" = 0 ] && echo "image: ok ($TAG: $(printf 'linux/%s ' $ARCHES)in one manifest list; /usr/local/bin/install-cni, /opt/cni/bin/istio-cni)"
exit "$fail"
