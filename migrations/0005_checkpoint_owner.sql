-- Fencing: the run that holds the replication slot writes its token here
-- when it starts, and every checkpoint write requires it. An instance that
-- lost the slot (and does not know it yet) can no longer move the checkpoint.
ALTER TABLE walcast.checkpoints ADD COLUMN IF NOT EXISTS owner text NOT NULL DEFAULT '';
