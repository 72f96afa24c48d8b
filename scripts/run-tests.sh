#!/usr/bin/env bash
# `make test`: the whole suite, as CI runs it. Starts the throwaway servers the suite needs on 127.0.0.1
# (PostgreSQL now), runs pytest with the given arguments, stops the servers, and exits with pytest's status.
# The system packages come first from `bash scripts/install-system.sh --tests` (the Makefile runs it).
#
#   bash scripts/run-tests.sh [pytest args...]    e.g. tests/index/test_migrations.py -k upgrade
#
# Environment:
#   PY                          the Python to run pytest with (default .venv/bin/python)
#   GRACEFUL_TEST_POSTGRES_URL  already set: use that server, start none (its gallery tables get dropped)
#   GRACEFUL_TEST_NO_POSTGRES=1 start no PostgreSQL: the postgres cases skip, saying what to install
#   GRACEFUL_TEST_REQUIRE_POSTGRES=1  fail if PostgreSQL cannot be started (.ci/run sets it: CI skips nothing)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

# A Ctrl-C or kill still ends in `exit`, so the EXIT traps stop the servers.
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -n "${GRACEFUL_TEST_POSTGRES_URL:-}" ]; then
  echo "PostgreSQL for the tests: $GRACEFUL_TEST_POSTGRES_URL (given; none started)"
elif [ -n "${GRACEFUL_TEST_NO_POSTGRES:-}" ]; then
  echo "GRACEFUL_TEST_NO_POSTGRES is set: starting no PostgreSQL; the postgres cases will be skipped"
else
  # shellcheck source=scripts/postgres-for-tests.sh
  if ! source scripts/postgres-for-tests.sh; then
    if [ -n "${GRACEFUL_TEST_REQUIRE_POSTGRES:-}" ]; then
      echo "GRACEFUL_TEST_REQUIRE_POSTGRES is set and PostgreSQL did not start: not running the tests" >&2
      exit 1
    fi
    echo "running the tests without PostgreSQL: the postgres cases will be skipped" >&2
  fi
fi

"$PY" -m pytest "$@"
exit $?
