#!/usr/bin/env bash
# System packages graceful needs, from Debian's archive: the Fashion-MNIST dataset (IDX files), and with
# --ci also PostgreSQL and docker-compose (for the database tests and the compose file check).
set -euo pipefail

packages=()
[ -d /usr/share/datasets/fashion-mnist ] || packages+=(dataset-fashion-mnist)
if [ "${1:-}" = "--ci" ]; then
  command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || packages+=(postgresql)
  command -v docker-compose >/dev/null 2>&1 || packages+=(docker-compose)
fi
[ ${#packages[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing system packages: ${packages[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y --no-install-recommends "${packages[@]}" \
  || { $sudo apt-get update && $sudo apt-get install -y --no-install-recommends "${packages[@]}"; }
