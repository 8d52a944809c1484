# fastpath: drop-in image for Istio's istio-cni DaemonSet (image name `install-cni`).
#
#   buildah build -t my.reg/team/install-cni:fastpath .        (or docker build)
#
# The image holds exactly what Istio's does at the same paths: /opt/cni/bin/istio-cni (the
# plugin, copied to the host by the agent) and /usr/local/bin/install-cni (the agent, the chart's
# `command: ["install-cni"]`). Both are static, so the plugin runs on any host's libc, and the
# runtime stage needs no distribution: no shell, no package manager, nothing else to patch.
#
# Build stages:
#   builder  - stable Rust for userspace, nightly + rust-src + bpf-linker for the eBPF probes
#              (the same recipe as scripts/setup.sh).
#   runtime  - FROM scratch with the two binaries.
# To package binaries built on the host instead (no network needed):
#   buildah build --build-arg BINARIES=prebuilt -t install-cni:fastpath .
# with target/x86_64-unknown-linux-gnu/release/{install-cni,istio-cni} built by scripts/image.sh.

ARG RUST_IMAGE=docker.io/library/rust:1.95
ARG BINARIES=builder

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
RUN rustup toolchain install nightly --profile minimal --component rust-src
COPY . .
RUN rm -rf .tools target && FASTPATH_OUT=/out bash scripts/build-static.sh

FROM scratch AS prebuilt
COPY target/x86_64-unknown-linux-gnu/release/install-cni /out/install-cni
COPY target/x86_64-unknown-linux-gnu/release/istio-cni /out/istio-cni

FROM ${BINARIES} AS binaries

FROM scratch AS runtime
COPY --from=binaries /out/istio-cni /opt/cni/bin/istio-cni
COPY --from=binaries /out/install-cni /usr/local/bin/install-cni
ENV PATH=/usr/local/bin:/opt/cni/bin
WORKDIR /opt/cni/bin
USER 0
CMD ["/usr/local/bin/install-cni"]
