#!/usr/bin/env bash
# Runs a Switchboard cluster as plain processes, for machines without Docker:
# a redis-server, the balancer on :8888 (admin/dashboard on :8080) and N chat
# nodes on 127.0.0.1:5001… Ctrl-C stops everything it started.
#
#   scripts/run-local.sh [N]          # N nodes, default 3
#   REDIS_URL=redis://host:6379 scripts/run-local.sh   # use an existing Redis
set -euo pipefail
cd "$(dirname "$0")/.."
nodes=${1:-3}
redis_port=${REDIS_PORT:-6390}
command -v redis-server >/dev/null || [ -n "${REDIS_URL:-}" ] || {
  echo "run-local: redis-server is missing (apt-get install redis-server) or set REDIS_URL" >&2; exit 1; }

cargo build --release -p switchboard-node -p switchboard-balancer
bin=target/release
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if [ -z "${REDIS_URL:-}" ]; then
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
  pids+=($!)
  REDIS_URL="redis://127.0.0.1:$redis_port"
  sleep 0.5
fi
for i in $(seq 1 "$nodes"); do
  port=$((5000 + i))
  "$bin/switchboard-node" --listen "127.0.0.1:$port" --redis "$REDIS_URL" \
    --node-id "local-$i" --advertise-url "http://127.0.0.1:$port" &
  pids+=($!)
done
"$bin/switchboard-balancer" --listen 0.0.0.0:8888 --admin-listen 0.0.0.0:8080 --redis "$REDIS_URL" &
pids+=($!)
echo "run-local: chat on http://localhost:8888, dashboard on http://localhost:8080/dashboard (Ctrl-C stops)"
wait
