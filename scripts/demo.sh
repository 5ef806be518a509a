#!/usr/bin/env bash
# See walcast work in one command, on a fresh Linux machine: starts a
# throwaway PostgreSQL (wal_level=logical) and nats-server with JetStream on
# free ports, applies the migrations, runs the daemon, makes a few changes as
# tenant "acme", prints the events walcast published (as `walcast tail` shows
# them), then stops everything and deletes its temporary files.
# Set WALCAST_BIN to use an existing binary instead of building one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! deps=$(bash scripts/install-deps.sh 2>&1); then echo "$deps" >&2; exit 1; fi
# shellcheck disable=SC1091
source .tools/env

if [ -z "${WALCAST_BIN:-}" ]; then
    echo "building walcast (first time takes a few minutes)..." >&2
    cargo build --quiet --locked
    WALCAST_BIN="$PWD/target/debug/walcast"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/walcast-demo.XXXXXX")
chmod 755 "$work" # the postgres user must reach its data directory
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

pg_port=$(free_port)
nats_port=$(free_port)
mkdir -p "$work/pg" "$work/nats"
[ "$(id -u)" = 0 ] && chown -R postgres "$work/pg"
as_postgres "$WALCAST_PG_BIN/initdb" -D "$work/pg/data" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
as_postgres "$WALCAST_PG_BIN/postgres" -D "$work/pg/data" -p "$pg_port" -c listen_addresses=127.0.0.1 \
    -c unix_socket_directories="$work/pg" -c wal_level=logical >"$work/pg.log" 2>&1 &
pids+=($!)
"$WALCAST_NATS_SERVER" -js -a 127.0.0.1 -p "$nats_port" -sd "$work/nats" >"$work/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do "$WALCAST_PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$pg_port" && break; sleep 0.1; done

export WALCAST_DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
export WALCAST_NATS_URL="nats://127.0.0.1:$nats_port"
export WALCAST_HTTP_ADDR="127.0.0.1:$(free_port)"
export WALCAST_CONFIRM_DELAY=0
"$WALCAST_BIN" migrate >&2
"$WALCAST_BIN" run >"$work/walcast.log" 2>&1 &
pids+=($!)

psql() { "$WALCAST_PG_BIN/psql" -q -o /dev/null -v ON_ERROR_STOP=1 "$WALCAST_DATABASE_URL" "$@"; }
echo "--- making changes as tenant acme" >&2
psql <<'SQL'
BEGIN;
SELECT pg_logical_emit_message(true, 'walcast.actor', '{"actor_type":"user","actor_id":"ann","client_id":"7d5e1c3a-0f1e-4c1e-9a53-0c3b5f1f4a11"}');
INSERT INTO projects (id, tenant_id, name) VALUES ('11111111-1111-4111-8111-111111111111', 'acme', 'Launch');
INSERT INTO tasks (id, tenant_id, project_id, title, priority)
     VALUES ('22222222-2222-4222-8222-222222222222', 'acme', '11111111-1111-4111-8111-111111111111', 'Write the announcement', 1);
COMMIT;
INSERT INTO editing_locks (tenant_id, record_type, record_id, locked_by, locked_at, expires_at)
     VALUES ('acme', 'task', '22222222-2222-4222-8222-222222222222', 'bob', now(), now() + interval '1 minute');
UPDATE tasks SET status = 'done', completed_at = now(), updated_by = 'bob', version = version + 1
 WHERE id = '22222222-2222-4222-8222-222222222222';
DELETE FROM editing_locks WHERE tenant_id = 'acme';
UPDATE projects SET status = 'archived', updated_by = 'ann' WHERE tenant_id = 'acme';
SQL

echo "--- events published for tenant acme (walcast tail --tenant acme):" >&2
for _ in $(seq 100); do
    [ "$("$WALCAST_BIN" tail --tenant acme | wc -l)" -ge 6 ] && break
    sleep 0.2
done
"$WALCAST_BIN" tail --tenant acme
kill -TERM "${pids[2]}"
wait "${pids[2]}" && echo "--- walcast stopped cleanly" >&2
