# Source me: starts a throwaway PostgreSQL server on 127.0.0.1 for the test run, exports
# GRACEFUL_TEST_POSTGRES_URL, and stops and removes the server when the sourcing shell exits.
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$pg_bin" ]; then
  echo "PostgreSQL is not installed (apt-get install -y postgresql)" >&2
  return 1 2>/dev/null || exit 1
fi
pg_dir=$(mktemp -d /tmp/graceful-pg.XXXXXX)
pg_port=${GRACEFUL_TEST_PG_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pg_run=()
if [ "$(id -u)" -eq 0 ]; then
  # initdb refuses to run as root: the cluster belongs to the postgres system user.
  chown postgres "$pg_dir"
  pg_run=(runuser -u postgres --)
fi
"${pg_run[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -U graceful --auth=trust -E UTF8 >"$pg_dir/initdb.log"
"${pg_run[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $pg_dir -c fsync=off -c max_connections=200" start >/dev/null
"${pg_run[@]}" "$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U graceful graceful_test
export GRACEFUL_TEST_POSTGRES_URL="postgresql+psycopg://graceful@127.0.0.1:$pg_port/graceful_test"
echo "PostgreSQL for the tests: $GRACEFUL_TEST_POSTGRES_URL"
_graceful_pg_stop() {
  "${pg_run[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$pg_dir"
}
trap _graceful_pg_stop EXIT
