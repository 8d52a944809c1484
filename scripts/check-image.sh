#!/usr/bin/env bash
# Builds the image from this tree (scripts/image.sh) and checks what a DaemonSet relies on:
# the agent at /usr/local/bin/install-cni and the plugin at /opt/cni/bin/istio-cni, both static
# and runnable, and the image's default command.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TAG=localhost/fastpath/install-cni:check-$$
bash "$ROOT/scripts/image.sh" "$TAG" >/dev/null 2>&1 || { echo "image: build failed"; bash "$ROOT/scripts/image.sh" "$TAG" 2>&1 | tail -20; exit 1; }
ctr=$(buildah from --pull=never "$TAG")
mnt=$(buildah mount "$ctr")
cleanup() { buildah umount "$ctr" >/dev/null 2>&1 || true; buildah rm "$ctr" >/dev/null 2>&1 || true; buildah rmi "$TAG" >/dev/null 2>&1 || true; }
trap cleanup EXIT
fail=0
for f in usr/local/bin/install-cni opt/cni/bin/istio-cni; do
  if ! file "$mnt/$f" | grep -Eq 'static(-pie)? linked'; then echo "image: /$f missing or not static"; fail=1; fi
done
"$mnt/usr/local/bin/install-cni" version >/dev/null || { echo "image: install-cni does not run"; fail=1; }
cmd=$(buildah inspect --type image "$TAG" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["OCIv1"]["config"]["Cmd"], separators=(",",":")))')
[ "$cmd" = '["/usr/local/bin/install-cni"]' ] || { echo "image: CMD is $cmd"; fail=1; }
size=$(du -sk "$mnt" | cut -f1)
[ "$fail" = 0 ] && echo "image: ok ($TAG, ${size} KiB: /usr/local/bin/install-cni, /opt/cni/bin/istio-cni, static)"
exit "$fail"
