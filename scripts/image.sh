#!/usr/bin/env bash
# Builds the image offline (--network=none, nothing pulled) from static binaries built on this
# machine, for linux/amd64 and linux/arm64, and a manifest list of the two:
#   bash scripts/image.sh [TAG]          default TAG: localhost/fastpath/install-cni:dev
# The list is TAG; each architecture's image is TAG-<arch> (e.g. ...:dev-arm64).
# FASTPATH_ARCHES="amd64" builds a list of that one only. To publish the list and its images:
#   buildah manifest push --all TAG docker://TAG
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TAG=${1:-localhost/fastpath/install-cni:dev}
case ${TAG##*/} in *:*) ;; *) TAG=$TAG:latest ;; esac
ARCHES=${FASTPATH_ARCHES:-amd64 arm64}
if ! command -v buildah >/dev/null; then
  echo "image: installing buildah"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y --no-install-recommends buildah || { apt-get update && apt-get install -y --no-install-recommends buildah; }; } >/dev/null
fi
# target/image/linux/<arch>/{install-cni,istio-cni}: the build context of the prebuilt stage.
bash scripts/build-static.sh $ARCHES
# A list (or an image) left under TAG by an earlier run is replaced.
buildah manifest rm "$TAG" >/dev/null 2>&1 || buildah rmi "$TAG" >/dev/null 2>&1 || true
buildah manifest create "$TAG" >/dev/null
for arch in $ARCHES; do
  buildah build --network=none --pull=never --platform "linux/$arch" --target prebuilt \
    -f Dockerfile -t "$TAG-$arch" target/image
  buildah manifest add "$TAG" "containers-storage:$TAG-$arch" >/dev/null
done
buildah manifest inspect "$TAG" | python3 -c '
import json, sys
for m in json.load(sys.stdin)["manifests"]:
    p = m["platform"]
    print("image: %s/%s %s" % (p["os"], p["architecture"], m["digest"]))'
echo "image: $TAG (manifest list; the images: $(printf "$TAG-%s " $ARCHES))"
