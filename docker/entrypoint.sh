#!/bin/sh
# Entry point of the graceful image. The compose file's services run exactly these commands, and
# tests/service/system/test_compose.py runs them outside containers, so a broken command or env name fails CI.
#   serve            the HTTP API on 0.0.0.0:${GRACEFUL_PORT:-8000}
#   demo             the one-shot story against the running API at ${GRACEFUL_API_URL}
#   anything else    executed as given
set -eu
cmd="${1:-serve}"
[ $# -gt 0 ] && shift
case "$cmd" in
  serve)
    exec graceful serve --host "${GRACEFUL_HOST:-0.0.0.0}" --port "${GRACEFUL_PORT:-8000}" "$@" ;;
  demo)
    : "${GRACEFUL_API_URL:?GRACEFUL_API_URL must point at the graceful API}"
    exec graceful demo --api "$GRACEFUL_API_URL" --models-dir "${GRACEFUL_MODELS_DIR:?}" \
      --workdir "${GRACEFUL_DEMO_DIR:-/var/lib/graceful/demo}" "$@" ;;
  *)
    exec "$cmd" "$@" ;;
esac
