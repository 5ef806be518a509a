#!/usr/bin/env bash
# Captures real pgoutput (protocol 1) messages from a throwaway PostgreSQL as
# seed corpora for the fuzz targets: fuzz/seeds/decode/<n> (one message per
# file) and fuzz/seeds/assemble/<n> (whole transactions, framed as the
# assemble target expects). Needs PostgreSQL binaries (WALCAST_PG_BIN or
# /usr/lib/postgresql/*/bin) and python3.
set -euo pipefail
cd "$(dirname "$0")"
PG_BIN=${WALCAST_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
work=$(mktemp -d)
chmod 755 "$work"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$work"
as_pg "$PG_BIN/initdb" -D "$work/data" -U postgres --auth=trust --encoding=UTF8 --locale=C >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
as_pg "$PG_BIN/pg_ctl" -D "$work/data" -l "$work/log" -o "-p $port -c wal_level=logical -c listen_addresses=127.0.0.1 -k $work" -w start >/dev/null
trap 'as_pg "$PG_BIN/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
psql() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }
for f in ../migrations/*.sql; do psql -f "$f" >/dev/null; done
psql -c "SELECT pg_create_logical_replication_slot('seed', 'pgoutput')" >/dev/null
psql <<'SQL' >/dev/null
INSERT INTO projects (id, tenant_id, name, metadata) VALUES ('11111111-1111-4111-8111-111111111111', 'acme', 'P', '{"a": [1, 2, {"b": null}]}');
INSERT INTO tasks (id, tenant_id, project_id, title, description, priority, due_at, metadata)
  VALUES ('22222222-2222-4222-8222-222222222222', 'acme', '11111111-1111-4111-8111-111111111111', 'emoji 🚀 rtl שלום', NULL, -2147483648, 'infinity', '{}');
BEGIN;
SELECT pg_logical_emit_message(true, 'walcast.actor', '{"actor_type":"user","actor_id":"ann","client_id":"c1"}');
UPDATE tasks SET status = 'done', completed_at = '-infinity', version = 9223372036854775807;
INSERT INTO editing_locks VALUES ('acme', 'task', '22222222-2222-4222-8222-222222222222', 'ann', now(), now() + interval '1 minute');
UPDATE editing_locks SET locked_by = 'bob';
DELETE FROM editing_locks;
COMMIT;
SELECT pg_logical_emit_message(false, 'other', 'non-transactional');
UPDATE tasks SET description = repeat('toast me ', 5000);
UPDATE tasks SET title = 'title only';
ALTER TABLE tasks ADD COLUMN mood text;
UPDATE tasks SET mood = 'happy';
ALTER TABLE tasks REPLICA IDENTITY DEFAULT;
UPDATE tasks SET title = 'default identity';
UPDATE tasks SET id = '33333333-3333-4333-8333-333333333333';
DELETE FROM tasks;
ALTER TABLE tasks REPLICA IDENTITY FULL;
CREATE TYPE mood_t AS ENUM ('happy', 'sad');
ALTER TABLE tasks ALTER COLUMN mood TYPE mood_t USING mood::mood_t;
INSERT INTO tasks (id, tenant_id, title, mood) VALUES ('44444444-4444-4444-8444-444444444444', 'bad.tenant', 't', 'sad');
TRUNCATE tasks, projects RESTART IDENTITY CASCADE;
SQL
rm -rf seeds/decode seeds/assemble
mkdir -p seeds/decode seeds/assemble
psql -At -c "SELECT encode(data, 'hex') FROM pg_logical_slot_peek_binary_changes('seed', NULL, NULL,
  'proto_version', '1', 'publication_names', 'walcast', 'messages', 'true')" > "$work/messages.hex"
python3 - "$work/messages.hex" <<'PY'
import sys, struct
msgs = [bytes.fromhex(l.strip()) for l in open(sys.argv[1]) if l.strip()]
for i, m in enumerate(msgs):
    open(f"seeds/decode/{i:03}", "wb").write(m)
# assemble: mode byte, then [u16 len][message] frames; one seed per transaction
# (Relation messages kept), and one with everything that fits.
def frame(ms):
    return b"".join(struct.pack(">H", len(m)) + m for m in ms if len(m) < 65536)
txs, cur = [], []
for m in msgs:
    cur.append(m)
    if m[:1] == b"C":
        txs.append(cur); cur = []
for i, t in enumerate(txs):
    for mode in (0, 1):
        open(f"seeds/assemble/{i:03}-{mode}", "wb").write(bytes([mode]) + frame(t))
open("seeds/assemble/all", "wb").write(b"\0" + frame(msgs))
print(f"{len(msgs)} messages, {len(txs)} transactions")
PY
