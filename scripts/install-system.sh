#!/usr/bin/env bash
# System packages graceful needs, from Debian's archive (apt-get; as root, or through passwordless sudo).
#   install-system.sh          what `make demo` needs: the Fashion-MNIST dataset (IDX files)
#   install-system.sh --tests  and what the test suite needs: PostgreSQL (`make test` starts a throwaway server),
#                              Chromium and its WebDriver (the page's browser test), nginx (the compose
#                              test runs the replicas' proxy with docker/nginx.conf)
#   install-system.sh --ci     and what only CI needs: docker-compose (the compose file check in .ci/run)
# Packages already there are skipped, so a second run installs nothing and takes no time. Without --ci, a
# machine that cannot install (no apt-get, not root and no passwordless sudo, no network) gets one line
# saying what to install by hand, and the script succeeds: the tests that need the package then skip and say
# so. With --ci that is an error: CI must run everything.
set -euo pipefail

mode=demo
case "${1:-}" in
  "") ;;
  --tests) mode=tests ;;
  --ci) mode=ci ;;
  *) echo "usage: $0 [--tests|--ci]" >&2; exit 2 ;;
esac

have_postgres() {
  command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

packages=()
[ -d /usr/share/datasets/fashion-mnist ] || packages+=(dataset-fashion-mnist)
if [ "$mode" != demo ]; then
  have_postgres || packages+=(postgresql)
  command -v chromium >/dev/null 2>&1 || packages+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || packages+=(chromium-driver)
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || packages+=(nginx)
fi
if [ "$mode" = ci ]; then
  command -v docker-compose >/dev/null 2>&1 || packages+=(docker-compose)
fi
[ ${#packages[@]} -eq 0 ] && exit 0

cannot_install() {
  echo "install-system: cannot install ${packages[*]} ($1); install them yourself:" \
    "apt-get install ${packages[*]}" >&2
  if [ "$mode" = ci ]; then exit 1; fi
  echo "install-system: continuing without them; the tests that need them will be skipped, each saying why" >&2
  exit 0
}

command -v apt-get >/dev/null 2>&1 || cannot_install "no apt-get on this machine"
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
  else
    cannot_install "not root, and no passwordless sudo"
  fi
fi

echo "installing system packages: ${packages[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get install -y --no-install-recommends "${packages[@]}" \
  || { "${sudo[@]}" apt-get update && "${sudo[@]}" apt-get install -y --no-install-recommends "${packages[@]}"; } \
  || cannot_install "apt-get failed, see above"
