-- Workload generators for the benchmark harness (bench/run.py).
-- Installed into the benchmark database after `walcast migrate`; the helper
-- tables below are NOT in the walcast publication, so they never produce events.

-- bench_load: writes row changes on tasks / projects / editing_locks in
-- transactions of 1..10 row changes (uniform), each transaction for one
-- tenant picked uniformly from <prefix><lo>..<prefix><hi-1> (or <prefix>hot with probability
-- hot_frac). Mix per row change: 5 % project insert, 5 % project update,
-- 35 % task insert, 40 % task update (status cycles, ~1/5 become `done`), 15 %
-- lock upsert/delete. Every statement touches exactly one existing row or
-- inserts one, except a lock delete when the tenant holds no lock (then 0 rows;
-- `changes` counts real row changes, which is the number of events walcast
-- publishes). Deterministic for a given seed. Commits every transaction
-- (CALL it outside a transaction block). Concurrent callers writing the same
-- tenant (the catch-up scenario's hot tenant) pass different `salt`s so their
-- row ids never collide.
CREATE OR REPLACE PROCEDURE bench_load(
    n_changes bigint,
    prefix text,
    tenant_lo int,
    tenant_hi int,
    seed double precision,
    hot_frac double precision DEFAULT 0,
    salt text DEFAULT '',
    INOUT changes bigint DEFAULT 0,
    INOUT transactions bigint DEFAULT 0)
LANGUAGE plpgsql AS $$
DECLARE
    k int;
    i int;
    t int;
    c int;
    r double precision;
    tid text;
    rid uuid;
    nt int[];   -- tasks inserted so far, per tenant slot (0 = hot)
    np int[];   -- projects inserted so far
    width int := tenant_hi - tenant_lo;
    statuses text[] := ARRAY['todo', 'in_progress', 'blocked', 'done', 'cancelled'];
    pad text := repeat('lorem ipsum dolor sit amet ', 8);
BEGIN
    PERFORM setseed(seed);
    nt := array_fill(0, ARRAY[width + 1], ARRAY[0]);
    np := array_fill(0, ARRAY[width + 1], ARRAY[0]);
    WHILE changes < n_changes LOOP
        k := 1 + floor(random() * 10)::int;
        IF hot_frac > 0 AND random() < hot_frac THEN
            t := 0;
            tid := prefix || 'hot';
        ELSE
            t := 1 + floor(random() * width)::int;
            tid := prefix || (tenant_lo + t - 1);
        END IF;
        i := 0;
        WHILE i < k AND changes < n_changes LOOP
            r := random();
            IF r < 0.05 OR np[t] = 0 THEN
                np[t] := np[t] + 1;
                INSERT INTO projects (id, tenant_id, name, description, updated_by, actor_type, metadata)
                VALUES (md5(salt || tid || ':p:' || np[t])::uuid, tid, 'Project ' || np[t],
                        left(pad, (random() * 200)::int), 'user-' || (random() * 50)::int, 'user',
                        jsonb_build_object('color', 'blue', 'n', np[t]));
            ELSIF r < 0.10 THEN
                -- ids go through a variable: random() in a WHERE clause is
                -- volatile and would turn the lookup into a sequential scan.
                rid := md5(salt || tid || ':p:' || (1 + floor(random() * np[t])::int))::uuid;
                UPDATE projects SET version = version + 1, updated_at = now(),
                       name = 'Project ' || np[t] || ' v' || (random() * 1000)::int,
                       updated_by = 'user-' || (random() * 50)::int
                 WHERE id = rid;
            ELSIF r < 0.45 OR nt[t] = 0 THEN
                nt[t] := nt[t] + 1;
                INSERT INTO tasks (id, tenant_id, project_id, title, description, priority, assignee,
                                   due_at, updated_by, actor_type, client_id, metadata)
                VALUES (md5(salt || tid || ':t:' || nt[t])::uuid, tid,
                        md5(salt || tid || ':p:' || (1 + floor(random() * np[t])::int))::uuid,
                        'Task number ' || nt[t], left(pad, (random() * 200)::int),
                        (random() * 4)::int, 'user-' || (random() * 50)::int,
                        now() + interval '7 days', 'user-' || (random() * 50)::int, 'user',
                        md5(salt || tid)::uuid, '{"labels": ["bench"], "estimate": 3}');
            ELSIF r < 0.85 THEN
                rid := md5(salt || tid || ':t:' || (1 + floor(random() * nt[t])::int))::uuid;
                UPDATE tasks SET status = statuses[1 + floor(random() * 5)::int],
                       version = version + 1, updated_at = now(),
                       updated_by = 'user-' || (random() * 50)::int,
                       priority = (random() * 4)::int
                 WHERE id = rid;
            ELSIF r < 0.96 THEN
                INSERT INTO editing_locks (tenant_id, record_type, record_id, locked_by, locked_at, expires_at)
                VALUES (tid, 'task', md5(salt || tid || ':t:' || (1 + floor(random() * nt[t])::int))::uuid,
                        'user-' || (random() * 5)::int, now(), now() + interval '30 seconds')
                ON CONFLICT (tenant_id, record_type, record_id)
                DO UPDATE SET locked_by = excluded.locked_by, expires_at = excluded.expires_at;
            ELSE
                DELETE FROM editing_locks
                 WHERE ctid = (SELECT ctid FROM editing_locks WHERE tenant_id = tid LIMIT 1);
            END IF;
            GET DIAGNOSTICS c = ROW_COUNT;
            changes := changes + c;
            i := i + 1;
        END LOOP;
        COMMIT;
        transactions := transactions + 1;
    END LOOP;
END
$$;
