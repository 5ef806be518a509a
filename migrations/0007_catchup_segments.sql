-- Exact stream positions of recent events, saved by `walcast run` about once
-- a second, so a restart loads the catch-up index in seconds instead of
-- reading the stream back (SPEC §6 "Restart"; docs/ARCHITECTURE.md, catchup).
-- A cache only: any row may be deleted at any time, walcast then reads that
-- range of the stream back. Each row covers stream sequences
-- first_seq..=last_seq of `stream` for the run holding `slot`.
CREATE TABLE IF NOT EXISTS walcast.catchup_segments (
    slot text NOT NULL,
    stream text NOT NULL,
    first_seq bigint NOT NULL,
    last_seq bigint NOT NULL,
    positions bigint NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (slot, first_seq)
);
-- Varint-packed already: compressing it again only costs CPU.
ALTER TABLE walcast.catchup_segments ALTER COLUMN data SET STORAGE EXTERNAL;
GRANT SELECT, INSERT, UPDATE, DELETE ON walcast.catchup_segments TO walcast;
