-- The least-privilege runtime role and the default publication.
-- The role logs in and replicates, reads the three tables and writes only its
-- own checkpoint tables: no superuser at run time. Give it a password with
--   ALTER ROLE walcast PASSWORD '...';

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'walcast') THEN
        CREATE ROLE walcast WITH LOGIN REPLICATION;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO walcast;
GRANT SELECT ON public.projects, public.tasks, public.editing_locks TO walcast;
GRANT USAGE ON SCHEMA walcast TO walcast;
GRANT SELECT, INSERT, UPDATE, DELETE ON walcast.checkpoints, walcast.tenant_seqs TO walcast;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'walcast') THEN
        CREATE PUBLICATION walcast FOR TABLE public.projects, public.tasks, public.editing_locks;
    END IF;
END
$$;
