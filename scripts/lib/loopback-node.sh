# Sourced by the side-by-side benchmark scripts: a scratch directory removed
# on exit with every process started into `pids`, `free_port`, Redis plus
# one node from target/release on loopback ($redis_port, $node_port, $node),
# and `start_balancer` to put a balancer in front of them.
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
node_port=$(free_port)
node="http://127.0.0.1:$node_port"
"$bin/switchboard-node" --listen "127.0.0.1:$node_port" --redis "redis://127.0.0.1:$redis_port" \
  --node-id bench-node --advertise-url "$node" >"$work/node.log" 2>&1 &
pids+=($!)

# Starts the switchboard-balancer in directory $1 as instance $2, with any
# further arguments as its own, and waits until it routes to the node; sets
# $url and $pid.
start_balancer() {
  local dir=$1 name=$2 port admin
  shift 2
  port=$(free_port)
  admin=$(free_port)
  "$dir/switchboard-balancer" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    --redis "redis://127.0.0.1:$redis_port" --pid-file "$work/$name.pid" --upgrade-sock "$work/$name.sock" \
    "$@" >"$work/balancer-$name.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  url="http://127.0.0.1:$port"
  for _ in $(seq 1 100); do
    [ "$(curl -fsS "$url/nodes" 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null)" = 1 ] && return
    sleep 0.2
  done
}
