#!/usr/bin/env bash
# Builds the image from binaries built on this machine (no registry needed):
#   bash scripts/image.sh [TAG]        default TAG: localhost/fastpath/install-cni:dev
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TAG=${1:-localhost/fastpath/install-cni:dev}
bash scripts/build-static.sh
buildah build --network=none --pull=never --build-arg BINARIES=prebuilt -t "$TAG" .
echo "image: $TAG"
