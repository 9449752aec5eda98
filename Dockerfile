# Switchboard: one image with both programs. The compose file runs the
# balancer and the nodes from it with different commands.
#
# Base images are the official ones; on a machine that cannot pull images,
# scripts/build-base-images.sh builds local images under the same names.

FROM rust:1.95-slim-bookworm AS builder
# cmake builds zlib-ng for Pingora's compression support.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake make g++ pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# No debug info in the image's binaries (the workspace keeps it for profiling).
ENV CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols
# Dependencies first, from the manifests alone, so a source change rebuilds
# only the project's own crates.
COPY Cargo.toml Cargo.lock ./
COPY common/Cargo.toml common/
COPY node/Cargo.toml node/
COPY balancer/Cargo.toml balancer/
COPY tests/Cargo.toml tests/
COPY bench/Cargo.toml bench/
RUN for crate in common node balancer tests bench; do mkdir -p "$crate/src"; done \
 && for bin in node balancer bench; do echo 'fn main() {}' > "$bin/src/main.rs"; done \
 && touch common/src/lib.rs tests/src/lib.rs \
 && cargo build --release --locked -p switchboard-node -p switchboard-balancer \
 && rm -rf common/src node/src balancer/src bench/src tests/src \
      target/release/.fingerprint/switchboard-* target/release/deps/*switchboard*
COPY . .
RUN cargo build --release --locked -p switchboard-node -p switchboard-balancer \
 && install -m 0755 target/release/switchboard-node target/release/switchboard-balancer /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates bind9-host \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home switchboard
COPY --from=builder /usr/local/bin/switchboard-node /usr/local/bin/switchboard-balancer /usr/local/bin/
COPY config/node.toml config/balancer.toml /etc/switchboard/
COPY deploy/docker/node-start.sh /usr/local/bin/switchboard-node-start
USER switchboard
EXPOSE 5000 8888 8080
# The node's health; the compose file gives the balancer its own check.
HEALTHCHECK --interval=5s --timeout=2s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:5000/health >/dev/null || exit 1
CMD ["switchboard-node"]
