-- The highest stream sequence walcast saw acknowledged, written about once a
-- second (ahead of the delayed checkpoint), so that after a crash walcast can
-- still tell how much a broker lost and name the range (SPEC §4.7).
ALTER TABLE walcast.checkpoints ADD COLUMN IF NOT EXISTS acked_seq bigint NOT NULL DEFAULT 0;
