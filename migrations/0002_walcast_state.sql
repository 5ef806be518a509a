-- walcast's own durable state, in its own schema. The checkpoint lives in
-- Postgres (not in NATS) because it must survive a broker that loses
-- acknowledged messages (SPEC §4.7), and it moves in step with the slot.

CREATE SCHEMA IF NOT EXISTS walcast;

-- One row per replication slot: every event of a transaction that committed
-- before `lsn` is counted in walcast.tenant_seqs and is the stream's message
-- number `stream_seq` or earlier.
CREATE TABLE IF NOT EXISTS walcast.checkpoints (
    slot       text PRIMARY KEY,
    lsn        pg_lsn NOT NULL,
    stream     text NOT NULL,
    stream_seq bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The last published seq of every tenant, as of the slot's checkpoint.
CREATE TABLE IF NOT EXISTS walcast.tenant_seqs (
    slot      text NOT NULL,
    tenant_id text NOT NULL,
    seq       bigint NOT NULL,
    PRIMARY KEY (slot, tenant_id)
);
