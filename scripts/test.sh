#!/usr/bin/env bash
# Runs Switchboard's whole test suite on a fresh Debian machine: installs what
# is missing (cmake for Pingora's zlib-ng, redis-server for the tests,
# chromium and chromium-driver for the web-page tests, iproute2's `ss` to cut
# connections, prometheus for `promtool` (the alerting rules' tests),
# python3-venv for the PyPI SignalR clients), checks formatting and lints,
# builds the programs the tests start, and runs every test. Tests start their
# own redis-server on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v cc >/dev/null || missing+=(build-essential)
command -v pkg-config >/dev/null || missing+=(pkg-config)
[ -x /usr/lib/chromium/chromium ] || [ -x /usr/bin/chromium ] || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v ss >/dev/null || missing+=(iproute2)
command -v promtool >/dev/null || missing+=(prometheus)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
. scripts/lib/apt-install.sh
apt_install ${missing[@]+"${missing[@]}"}
command -v cargo >/dev/null || { echo "scripts/test.sh: cargo is required (https://rustup.rs)" >&2; exit 1; }

# The compose test builds the project's image; where this Docker engine cannot
# pull base images, build them locally first (it skips what is present).
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  scripts/build-base-images.sh
fi

# From PyPI, pinned, in their own environment: third-party SignalR clients
# (tests/tests/python_clients.rs runs them against the cluster) and
# kubernetes-validate with the Kubernetes schemas (tests/tests/deploy_manifests.rs).
venv=target/py-clients
if ! cmp -s tests/python/requirements.txt "$venv/requirements.txt" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r tests/python/requirements.txt
  cp tests/python/requirements.txt "$venv/requirements.txt"
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests start these binaries from target/debug.
cargo build --workspace --bins
cargo test --workspace
