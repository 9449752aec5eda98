#!/usr/bin/env bash
# Creates a self-signed certificate for localhost and 127.0.0.1 in ./certs
# (cert.pem, key.pem) for docker-compose.https.yml, with Debian's openssl.
# For development only: browsers will warn about it until you trust it.
# Usage: scripts/make-dev-cert.sh [DIR] [DAYS]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-certs}
days=${2:-30}
command -v openssl >/dev/null || { . scripts/lib/apt-install.sh; apt_install openssl; }
mkdir -p "$dir"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" -days "$days" \
  -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" 2>/dev/null
# The balancer runs as an unprivileged user in its container.
chmod 0644 "$dir/key.pem" "$dir/cert.pem"
echo "wrote $dir/cert.pem and $dir/key.pem (self-signed, $days days)"
