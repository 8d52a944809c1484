# fastpath: drop-in image for Istio's istio-cni DaemonSet (image name `install-cni`).
#
# The image holds exactly what Istio's does at the same paths: /opt/cni/bin/istio-cni (the
# plugin, copied to the host by the agent) and /usr/local/bin/install-cni (the agent, the chart's
# `command: ["install-cni"]`). Both are static (musl), so the plugin runs on any host's libc, and
# the runtime stage needs no distribution: no shell, no package manager, nothing else to patch.
#
# One file, two ways to build it:
#
# 1. On a host with network access, the builder stage builds everything (it pulls the Rust image
#    and fetches the nightly, Debian's compilers and the crates):
#      buildah build -t my.reg/team/install-cni:fastpath .              (or: docker build)
#    The builder runs on the build host's own platform and cross-compiles for the target's, so
#    arm64, or both architectures in one manifest list, need no emulator:
#      buildah build --platform linux/amd64,linux/arm64 --manifest my.reg/team/install-cni:fastpath .
#      docker buildx build --platform linux/amd64,linux/arm64 -t my.reg/team/install-cni:fastpath .
#
# 2. Offline (--network=none, nothing pulled), from the static binaries that scripts/build-static.sh
#    leaves in target/image/linux/<arch>/; the stage is `prebuilt`, the build context target/image
#    (what CI builds):
#      bash scripts/build-static.sh arm64
#      buildah build --network=none --target prebuilt --platform linux/arm64 \
#        -f Dockerfile -t my.reg/team/install-cni:fastpath-arm64 target/image
#    scripts/image.sh does that for linux/amd64 and linux/arm64 and puts both in a manifest list.
#
# Build stages:
#   builder  - stable Rust for userspace (musl targets, Debian's cross gcc for the other
#              architecture), nightly + rust-src + bpf-linker for the eBPF probes (the recipe of
#              scripts/setup.sh).
#   base     - FROM scratch: what the image is besides the binaries (PATH, workdir, user, CMD).
#   prebuilt - base + the binaries in the build context's linux/$TARGETARCH/ (--target prebuilt).
#   runtime  - base + the builder's binaries (the default: the last stage).

ARG RUST_IMAGE=docker.io/library/rust:1.95

FROM --platform=$BUILDPLATFORM ${RUST_IMAGE} AS builder
ARG TARGETARCH
WORKDIR /src
RUN rustup toolchain install nightly --profile minimal --component rust-src
COPY . .
RUN rm -rf .tools target && FASTPATH_OUT=/out bash scripts/build-static.sh "${TARGETARCH:-$(dpkg --print-architecture)}"

# What both images share.
FROM scratch AS base
ENV PATH=/usr/local/bin:/opt/cni/bin
WORKDIR /opt/cni/bin
USER 0
CMD ["/usr/local/bin/install-cni"]

# --target prebuilt: the binaries in the build context's linux/$TARGETARCH/.
FROM base AS prebuilt
ARG TARGETARCH
COPY linux/${TARGETARCH}/istio-cni /opt/cni/bin/istio-cni
COPY linux/${TARGETARCH}/install-cni /usr/local/bin/install-cni

# The default (last) stage: the binaries the builder stage built.
FROM base AS runtime
COPY --from=builder /out/istio-cni /opt/cni/bin/istio-cni
COPY --from=builder /out/install-cni /usr/local/bin/install-cni
