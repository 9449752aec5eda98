# Sourced by the side-by-side benchmark scripts: a scratch directory removed
# on exit with every process started into `pids`, `free_port`, and Redis plus
# one node from target/release on loopback ($redis_port, $node_port, $node).
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
