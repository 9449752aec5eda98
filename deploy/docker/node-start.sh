#!/bin/sh
# Starts a chat node as a Compose replica: it advertises the container's own
# address on the compose network (replicas share one service name, so the
# balancer must dial each by address), and it takes its display name from
# Docker's DNS, which answers a reverse lookup of the address with the
# container's name (switchboard-node-2, or switchboard_node_2 with Compose
# v1): the name `docker compose ps` shows and `docker stop` takes. An
# explicit SWITCHBOARD_NAME wins; without an answer the name stays the
# default ("Node <container id>").
set -eu
ip=$(hostname -i | cut -d' ' -f1)
if [ -z "${SWITCHBOARD_NAME:-}" ] && command -v host >/dev/null 2>&1; then
  # "5.0.18.172.in-addr.arpa domain name pointer switchboard-node-2.switchboard_default."
  name=$(host -W 2 "$ip" 2>/dev/null | sed -n 's/.* pointer \([^.]*\)\..*/\1/p' | head -n 1) || name=""
  if [ -n "$name" ]; then
    export SWITCHBOARD_NAME="$name"
  fi
fi
exec switchboard-node --config /etc/switchboard/node.toml --advertise-url "http://$ip:5000" "$@"
