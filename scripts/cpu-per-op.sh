#!/usr/bin/env bash
# The balancer's own CPU per operation, for two builds side by side: each
# build in front of the same node and Redis on loopback, its user and system
# time (from /proc/<pid>/stat) over a workload divided by the operations
# done, in interleaved rounds so the machine's drift is shared. Workloads:
# `setups` (SignalR connection setups: negotiate, WebSocket, handshake,
# close) and `http` (keep-alive GET /health). Per-node admission is off so
# that the setups are not paced. With PERF=1, the last round of each build
# is also recorded with `perf record -g` into
# target/perf-<build>-<workload>.data. Needs:
#   cargo build --release -p switchboard-node -p switchboard-balancer -p switchboard-bench
# Usage: scripts/cpu-per-op.sh A_DIR B_DIR [ROUNDS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: scripts/cpu-per-op.sh A_DIR B_DIR [ROUNDS] [SECONDS]" >&2; exit 2; }
declare -A dirs=([A]="$1" [B]="$2")
rounds=${3:-3}
secs=${4:-8}
. scripts/lib/loopback-node.sh
ticks=$(getconf CLK_TCK)

# Starts balancer $1 (A or B) as instance $2; sets $url and $pid.
start() { start_balancer "${dirs[$1]}" "$2" --node-admission-rate 0; }
cpu() { awk '{print $14, $15}' "/proc/$1/stat"; }

declare -A urls bpids
for side in A B; do
  start "$side" "$side"
  urls[$side]=$url
  bpids[$side]=$pid
  for workload in setups http; do
    "$bin/switchboard-bench" "$workload" --url "$url" --duration-secs 2 >/dev/null 2>&1 # warm-up
  done
done
echo "| round | workload | build | ops | user µs/op | system µs/op |"
echo "|---|---|---|---|---|---|"
for r in $(seq 1 "$rounds"); do
  for workload in setups http; do
    for side in A B; do
      p=${bpids[$side]}
      before=$(cpu "$p")
      perf_pid=
      if [ "${PERF:-0}" = 1 ] && [ "$r" = "$rounds" ]; then
        perf record -F 2999 -g --call-graph dwarf,16384 -p "$p" -o "target/perf-$side-$workload.data" \
          -- sleep "$secs" >/dev/null 2>&1 &
        perf_pid=$!
      fi
      out=$("$bin/switchboard-bench" "$workload" --url "${urls[$side]}" --duration-secs "$secs" 2>/dev/null)
      after=$(cpu "$p")
      [ -z "$perf_pid" ] || wait "$perf_pid" || true
      python3 - "$before" "$after" "$out" "$ticks" "$r" "$workload" "$side" <<'PY'
import json, sys
(u0, s0), (u1, s1) = (map(int, a.split()) for a in sys.argv[1:3])
out, tick = json.loads(sys.argv[3]), int(sys.argv[4])
ops = out.get("connections") or out.get("requests") or 0
us = lambda t: t * 1e6 / tick / ops if ops else float("nan")
print(f"| {sys.argv[5]} | {sys.argv[6]} | {sys.argv[7]} | {ops} | {us(u1 - u0):.1f} | {us(s1 - s0):.1f} |")
PY
    done
  done
done
