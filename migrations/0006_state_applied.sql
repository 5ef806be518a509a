-- The state bucket's trusted position (SPEC §8): every stream message up to
-- it was applied to the bucket at least the broker's loss horizon ago, so a
-- restart re-checks the bucket's keys from here (a broker that restarts can
-- lose writes it acknowledged more recently).
ALTER TABLE walcast.checkpoints ADD COLUMN IF NOT EXISTS state_applied bigint NOT NULL DEFAULT 0;
