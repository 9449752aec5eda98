#!/usr/bin/env bash
# Builds, without any container registry, the base images that Dockerfile and
# docker-compose.yml name, so the same files users run are the ones tested on
# machines that can reach Debian's package archive but pull no image:
#
#   debian:bookworm-slim       debootstrap (minbase) + docker import, plus this
#                              machine's locally added CA certificates
#   rust:1.95-slim-bookworm    that + gcc/libc headers + this machine's Rust toolchain
#   redis:7-bookworm           that + Debian's redis-server
#   prom/prometheus:latest     that + Debian's prometheus (only with --monitoring)
#
# An image that already exists, or can be pulled, is left alone, so users with
# registry access never need this script.
set -euo pipefail
cd "$(dirname "$0")/.."
rust_version=1.95
with_monitoring=0
[ "${1:-}" = "--monitoring" ] && with_monitoring=1

# Present already, or pulled from a registry where one is reachable.
have() { docker image inspect "$1" >/dev/null 2>&1 || docker pull -q "$1" >/dev/null 2>&1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! have debian:bookworm-slim; then
  if ! docker image inspect switchboard/bookworm-rootfs >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || {
      [ "$(id -u)" -eq 0 ] || { echo "build-base-images: debootstrap needed (apt-get install debootstrap)" >&2; exit 1; }
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }
    echo "build-base-images: debootstrapping Debian bookworm (minbase)…"
    debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" \
      || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    rm -rf "$work/rootfs"/var/lib/apt/lists/* "$work/rootfs"/var/cache/apt/archives/*.deb
    tar -C "$work/rootfs" -c . | docker import -c 'CMD ["bash"]' -c 'ENV LANG=C.UTF-8' - switchboard/bookworm-rootfs >/dev/null
    rm -rf "$work/rootfs"
  fi
  # The local stand-in trusts what this machine trusts: certificate authorities
  # added under /usr/local/share/ca-certificates (a TLS-inspecting egress proxy's,
  # for instance) are needed for cargo to reach crates.io from a build.
  mkdir -p "$work/base/certs"
  cp /usr/local/share/ca-certificates/*.crt "$work/base/certs/" 2>/dev/null || true
  cat >"$work/base/Dockerfile" <<'DOCKERFILE'
FROM switchboard/bookworm-rootfs
COPY certs/ /usr/local/share/ca-certificates/
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && update-ca-certificates >/dev/null \
 && rm -rf /var/lib/apt/lists/*
DOCKERFILE
  docker build -q -t debian:bookworm-slim "$work/base" >/dev/null
fi

if ! have "rust:$rust_version-slim-bookworm"; then
  sysroot=$(rustc +"$rust_version" --print sysroot 2>/dev/null || rustc --print sysroot)
  case "$(rustc --version)" in
    "rustc $rust_version"*) ;;
    *) echo "build-base-images: the host's rustc is not $rust_version" >&2; exit 1 ;;
  esac
  echo "build-base-images: rust:$rust_version-slim-bookworm from $sysroot…"
  mkdir -p "$work/rust"
  # The toolchain without its HTML docs and sources: what cargo build needs.
  tar -C "$sysroot" --exclude=./share/doc --exclude=./lib/rustlib/src -c . | tar -C "$work/rust" -x
  mkdir -p "$work/rust-ctx" && mv "$work/rust" "$work/rust-ctx/toolchain"
  cat >"$work/rust-ctx/Dockerfile" <<'DOCKERFILE'
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY toolchain /usr/local/rust
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN cargo --version && rustc --version
DOCKERFILE
  docker build -q -t "rust:$rust_version-slim-bookworm" "$work/rust-ctx" >/dev/null
  rm -rf "$work/rust-ctx"
fi

# Like the official image: a /data working directory owned by redis, where
# the append-only file lives (compose mounts a named volume there). An older
# local build without it is rebuilt.
if ! have redis:7-bookworm \
   || [ "$(docker image inspect -f '{{.Config.WorkingDir}}' redis:7-bookworm 2>/dev/null)" != /data ]; then
  echo "build-base-images: redis:7-bookworm…"
  docker build -q -t redis:7-bookworm - >/dev/null <<'DOCKERFILE'
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
VOLUME /data
WORKDIR /data
EXPOSE 6379
USER redis
CMD ["redis-server", "--protected-mode", "no"]
DOCKERFILE
fi

if [ "$with_monitoring" = 1 ] && ! have prom/prometheus:latest; then
  echo "build-base-images: prom/prometheus:latest…"
  docker build -q -t prom/prometheus:latest - >/dev/null <<'DOCKERFILE'
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/*
EXPOSE 9090
ENTRYPOINT ["prometheus"]
DOCKERFILE
fi
echo "build-base-images: ready"
