#!/usr/bin/env bash
# HTTPS at the balancer against plain HTTP, in one run on loopback: the
# balancer's memory per idle WebSocket (wss:// against ws://, each on a fresh
# balancer in front of one node) and new connections per second (a full TLS
# handshake each, against plain TCP). Prints JSON lines; docs/benchmarks.md
# has a run.
#
#   scripts/bench-tls.sh [IDLE_CONNECTIONS] [SECONDS]     # defaults: 5000, 10
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-5000}
secs=${2:-10}
cargo build --release -q -p switchboard-node -p switchboard-balancer -p switchboard-bench
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

scripts/make-dev-cert.sh "$work/certs" 1 >/dev/null
redis_port=$(free_port)
redis-server --port "$redis_port" --save "" --appendonly no --daemonize yes >/dev/null
node_port=$(free_port)
"$bin/switchboard-node" --listen "127.0.0.1:$node_port" --node-id bench-tls --redis "redis://127.0.0.1:$redis_port" \
  --advertise-url "http://127.0.0.1:$node_port" >"$work/node.log" 2>&1 &
pids+=($!)

# A fresh balancer per measurement, so each starts from the same memory.
start_balancer() {
  plain=$(free_port); tls=$(free_port); admin=$(free_port)
  "$bin/switchboard-balancer" --redis "redis://127.0.0.1:$redis_port" --listen "127.0.0.1:$plain" \
    --admin-listen "127.0.0.1:$admin" --tls-listen "127.0.0.1:$tls" \
    --tls-cert "$work/certs/cert.pem" --tls-key "$work/certs/key.pem" \
    --pid-file "$work/b$plain.pid" --upgrade-sock "$work/b$plain.sock" >"$work/balancer-$plain.log" 2>&1 &
  balancer=$!
  pids+=("$balancer")
  for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$plain/health" >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "balancer did not start" >&2; exit 1
}

ulimit -n "$(ulimit -Hn)"
start_balancer
"$bin/switchboard-bench" idle --url "http://127.0.0.1:$plain" --count "$count" --pid "$balancer"
kill "$balancer"
start_balancer
"$bin/switchboard-bench" idle --url "https://127.0.0.1:$tls" --count "$count" --pid "$balancer"
"$bin/switchboard-bench" handshakes --url "http://127.0.0.1:$plain" --url "https://127.0.0.1:$tls" \
  --concurrency 16 --duration-secs "$secs"
