#!/usr/bin/env bash
# Two builds of the balancer, A and B, side by side in front of the same node
# and Redis on loopback, measured in interleaved rounds so that the machine's
# drift is shared: idle memory per WebSocket (a fresh balancer for each
# count), then keep-alive `GET /health`, SignalR connection setups, saturated
# Echo, Echo at a fixed rate and sequential Echo over one WebSocket (direct,
# A and B in turn). A and B are directories holding a switchboard-balancer;
# the node and the load generator come from target/release. Needs:
#   cargo build --release -p switchboard-node -p switchboard-balancer -p switchboard-bench
# Usage: scripts/bench-ab.sh A_DIR B_DIR [ROUNDS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: scripts/bench-ab.sh A_DIR B_DIR [ROUNDS] [SECONDS]" >&2; exit 2; }
declare -A dirs=([A]="$1" [B]="$2")
rounds=${3:-2}
secs=${4:-6}
. scripts/lib/loopback-node.sh
# One value out of a subcommand's JSON: a dotted path such as latency.p50_us.
field() { python3 -c 'import json,sys
v = json.load(sys.stdin)
for k in sys.argv[1].split("."):
    v = v[int(k)] if isinstance(v, list) else v[k]
print(v)' "$1"; }

# Starts balancer $1 (A or B) as instance $2; sets $url and $pid.
start() { start_balancer "${dirs[$1]}" "$2"; }

echo "| measure | A | B |"
echo "|---|---|---|"
for count in 1000 3000; do
  row="| bytes per idle WebSocket at $count"
  for side in A B; do
    start "$side" "idle-$side-$count"
    out=$("$bin/switchboard-bench" idle --url "$url" --count "$count" --pid "$pid" --settle-secs 2 2>/dev/null)
    row="$row | $(printf '%s' "$out" | field processes.0.bytes_per_connection)"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
  done
  echo "$row |"
done

declare -A urls
for side in A B; do
  start "$side" "$side"
  urls[$side]=$url
done
for r in $(seq 1 "$rounds"); do
  for workload in http setups throughput latency; do
    row="| $workload (round $r)"
    for side in A B; do
      u=${urls[$side]}
      case $workload in
        http) v=$("$bin/switchboard-bench" http --url "$u" --duration-secs "$secs" 2>/dev/null | field requests_per_sec)" req/s" ;;
        setups) v=$("$bin/switchboard-bench" setups --url "$u" --duration-secs "$secs" 2>/dev/null | field connections_per_sec)" conn/s" ;;
        throughput) v=$("$bin/switchboard-bench" throughput --url "$u" --duration-secs "$secs" 2>/dev/null | field messages_per_sec)" msg/s" ;;
        latency)
          out=$("$bin/switchboard-bench" latency --url "$u" --rate 2000 --duration-secs "$secs" 2>/dev/null)
          v="p50 $(printf '%s' "$out" | field latency.p50_us) / p99 $(printf '%s' "$out" | field latency.p99_us) µs" ;;
      esac
      row="$row | $v"
    done
    echo "$row |"
  done
  out=$("$bin/switchboard-bench" sequential --url "$node" --url "${urls[A]}" --url "${urls[B]}" 2>/dev/null)
  p() { printf '%s' "$out" | field "$1.latency.$2"; }
  echo "| sequential Echo p50 / p99, direct $(p 0 p50_us) / $(p 0 p99_us) µs (round $r) | $(p 1 p50_us) / $(p 1 p99_us) µs | $(p 2 p50_us) / $(p 2 p99_us) µs |"
done
