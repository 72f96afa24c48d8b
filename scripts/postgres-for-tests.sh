# Source me (scripts/run-tests.sh does): starts a throwaway PostgreSQL server on 127.0.0.1 for the test run,
# exports GRACEFUL_TEST_POSTGRES_URL, and stops and removes the server when the sourcing shell exits (an EXIT
# trap). Returns 1, having started nothing and exported nothing, when PostgreSQL is not installed or does not
# start; each step is checked here, so this works whether or not the sourcing shell has `set -e`.
_graceful_pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$_graceful_pg_bin" ] && command -v initdb >/dev/null 2>&1; then
  _graceful_pg_bin=$(dirname "$(command -v initdb)")
fi
if [ -z "$_graceful_pg_bin" ]; then
  echo "PostgreSQL is not installed (apt-get install postgresql)" >&2
  return 1 2>/dev/null || exit 1
fi
_graceful_pg_dir=$(mktemp -d /tmp/graceful-pg.XXXXXX)
_graceful_pg_port=${GRACEFUL_TEST_PG_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
_graceful_pg_run=()
if [ "$(id -u)" -eq 0 ]; then
  # initdb refuses to run as root: the cluster belongs to the postgres system user.
  chown postgres "$_graceful_pg_dir" 2>/dev/null && _graceful_pg_run=(runuser -u postgres --)
fi

_graceful_pg_stop() {
  "${_graceful_pg_run[@]}" "$_graceful_pg_bin/pg_ctl" -D "$_graceful_pg_dir/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$_graceful_pg_dir"
}
_graceful_pg_failed() {  # $1: what failed, $2: its log
  echo "PostgreSQL for the tests did not start: $1 failed:" >&2
  tail -n 20 "$2" >&2 2>/dev/null || true
  _graceful_pg_stop
}

if ! "${_graceful_pg_run[@]}" "$_graceful_pg_bin/initdb" -D "$_graceful_pg_dir/data" -U graceful --auth=trust -E UTF8 \
  >"$_graceful_pg_dir/initdb.log" 2>&1; then
  _graceful_pg_failed initdb "$_graceful_pg_dir/initdb.log"
  return 1 2>/dev/null || exit 1
fi
if ! "${_graceful_pg_run[@]}" "$_graceful_pg_bin/pg_ctl" -D "$_graceful_pg_dir/data" -l "$_graceful_pg_dir/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $_graceful_pg_port -k $_graceful_pg_dir -c fsync=off -c max_connections=200" \
  start >/dev/null 2>&1; then
  _graceful_pg_failed "pg_ctl start" "$_graceful_pg_dir/server.log"
  return 1 2>/dev/null || exit 1
fi
trap _graceful_pg_stop EXIT
if ! "${_graceful_pg_run[@]}" "$_graceful_pg_bin/createdb" -h 127.0.0.1 -p "$_graceful_pg_port" -U graceful graceful_test \
  >"$_graceful_pg_dir/createdb.log" 2>&1; then
  _graceful_pg_failed createdb "$_graceful_pg_dir/createdb.log"
  trap - EXIT
  return 1 2>/dev/null || exit 1
fi
export GRACEFUL_TEST_POSTGRES_URL="postgresql+psycopg://graceful@127.0.0.1:$_graceful_pg_port/graceful_test"
echo "PostgreSQL for the tests: $GRACEFUL_TEST_POSTGRES_URL (stopped and removed when the run ends)"
