-- Reference schema of SPEC §1: the three source tables walcast streams.
-- Idempotent: safe to run again, and safe to run by hand with psql.

CREATE TABLE IF NOT EXISTS public.projects (
    id          uuid PRIMARY KEY,
    tenant_id   text NOT NULL,
    name        text NOT NULL,
    description text,
    status      text NOT NULL DEFAULT 'active',  -- active | archived
    version     bigint NOT NULL DEFAULT 1,
    created_at  timestamptz DEFAULT now(),
    updated_at  timestamptz DEFAULT now(),
    updated_by  text,
    actor_type  text,
    client_id   uuid,
    metadata    jsonb
);

CREATE TABLE IF NOT EXISTS public.tasks (
    id           uuid PRIMARY KEY,
    tenant_id    text NOT NULL,
    project_id   uuid REFERENCES public.projects (id),
    title        text NOT NULL,
    description  text,
    status       text NOT NULL DEFAULT 'todo',  -- todo | in_progress | blocked | done | cancelled
    priority     int,
    assignee     text,
    due_at       timestamptz,
    completed_at timestamptz,
    version      bigint NOT NULL DEFAULT 1,
    created_at   timestamptz DEFAULT now(),
    updated_at   timestamptz DEFAULT now(),
    updated_by   text,
    actor_type   text,
    client_id    uuid,
    metadata     jsonb
);

CREATE TABLE IF NOT EXISTS public.editing_locks (
    tenant_id   text,
    record_type text,  -- task | project
    record_id   uuid,
    locked_by   text NOT NULL,
    locked_at   timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, record_type, record_id)
);

CREATE INDEX IF NOT EXISTS tasks_tenant_idx ON public.tasks (tenant_id);
CREATE INDEX IF NOT EXISTS projects_tenant_idx ON public.projects (tenant_id);

-- Before-images on update and delete (actions, changed_fields, lock expiry,
-- tenant routing of deletes) need the whole old row in the WAL.
ALTER TABLE public.projects REPLICA IDENTITY FULL;
ALTER TABLE public.tasks REPLICA IDENTITY FULL;
ALTER TABLE public.editing_locks REPLICA IDENTITY FULL;
