#!/usr/bin/env bash
# What the balancer's access log costs: one node and Redis on loopback, and
# three balancers in front of the node, started together: access log off, on
# as JSON lines to a file, and on in the common format to a file. Keep-alive
# `GET /health` requests per second (`switchboard-bench http`) and new
# connections per second (`switchboard-bench handshakes`) are measured
# against each in turn, ROUNDS times, interleaved, so that the machine's
# drift is shared. Needs a release build:
#   cargo build --release -p switchboard-node -p switchboard-balancer -p switchboard-bench
# Usage: scripts/bench-access-log.sh [ROUNDS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
secs=${2:-8}
. scripts/lib/loopback-node.sh

declare -A base
for mode in off json common; do
  extra=()
  case $mode in
    json) extra=(--access-log "$work/access-json.log" --access-log-format json) ;;
    common) extra=(--access-log "$work/access-common.log" --access-log-format common) ;;
  esac
  start_balancer "$bin" "$mode" ${extra[@]+"${extra[@]}"}
  base[$mode]=$url
done

echo "| round | workload | off | json | common |"
echo "|---|---|---|---|---|"
for r in $(seq 1 "$rounds"); do
  for workload in http handshakes; do
    row="| $r | $workload"
    for mode in off json common; do
      out=$("$bin/switchboard-bench" "$workload" --url "${base[$mode]}" --duration-secs "$secs" 2>/dev/null)
      # http prints {"requests_per_sec": …}; handshakes a list of {"per_second": …}.
      rate=$(printf '%s' "$out" | python3 -c 'import json,sys
v = json.load(sys.stdin)
v = v[0] if isinstance(v, list) else v
print(int(v.get("requests_per_sec", v.get("per_second", 0))), "/s, failed", v.get("failed", "?"))')
      row="$row | $rate"
    done
    echo "$row |"
  done
done
echo
for mode in json common; do
  echo "$mode: $(wc -l <"$work/access-$mode.log") lines, $(wc -c <"$work/access-$mode.log") bytes; last line:"
  tail -n 1 "$work/access-$mode.log"
done
