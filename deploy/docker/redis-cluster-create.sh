#!/bin/sh
# Makes the compose profile's six Redis servers one Redis Cluster (three
# masters, three replicas), once: a cluster already formed is left alone, so
# `up` may run again. `redis-cli --cluster create` wants addresses, so every
# member's name is resolved on the compose network first. Run by the
# `redis-cluster-create` one-shot service (docker-compose.yml).
set -eu
members="redis-cluster-1 redis-cluster-2 redis-cluster-3 redis-cluster-4 redis-cluster-5 redis-cluster-6"
if redis-cli -h redis-cluster-1 cluster info | grep -q '^cluster_state:ok'; then
  echo "redis-cluster-create: the cluster exists"
  exit 0
fi
addrs=""
for m in $members; do
  ip=$(getent hosts "$m" | cut -d' ' -f1)
  if [ -z "$ip" ]; then
    echo "redis-cluster-create: $m does not resolve" >&2
    exit 1
  fi
  addrs="$addrs $ip:6379"
done
# shellcheck disable=SC2086 # one argument per member
redis-cli --cluster create $addrs --cluster-replicas 1 --cluster-yes
