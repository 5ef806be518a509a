-- Positions of stream messages walcast did not publish ("foreign": a tenant
-- user's pull reply or push delivery into the stream's subjects, or a
-- publish by hand), recorded by `walcast run` when it finds them at the
-- stream's tail, before it publishes again, so every later run skips them
-- when it counts what the stream holds past the checkpoint
-- (docs/ARCHITECTURE.md, pipeline::foreign). Rows the checkpoint has passed
-- are deleted.
CREATE TABLE IF NOT EXISTS walcast.foreign_messages (
    slot text NOT NULL,
    first_seq bigint NOT NULL,
    last_seq bigint NOT NULL,
    PRIMARY KEY (slot, first_seq)
);
GRANT SELECT, INSERT, UPDATE, DELETE ON walcast.foreign_messages TO walcast;
