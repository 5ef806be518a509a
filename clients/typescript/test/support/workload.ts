/**
 * Row changes on the reference schema (migrations/0001), each in its own
 * transaction, returning the events walcast must publish for them
 * (`entity`/`action` per SPEC §2), in order.
 */

import { randomUUID } from "node:crypto";

import type pg from "pg";

import { Action, Entity } from "../../src/index.js";

export interface Expected {
  tenant: string;
  entity: Entity;
  action: Action;
  entityId: string;
}

export class Workload {
  /** Expected events per tenant, in commit order. */
  readonly expected = new Map<string, Expected[]>();

  constructor(readonly db: pg.Client) {}

  expectedFor(tenant: string): Expected[] {
    return this.expected.get(tenant) ?? [];
  }

  #expect(tenant: string, entity: Entity, action: Action, entityId: string): void {
    const list = this.expected.get(tenant) ?? [];
    list.push({ tenant, entity, action, entityId });
    this.expected.set(tenant, list);
  }

  async #tx(fn: () => Promise<void>): Promise<void> {
    await this.db.query("BEGIN");
    try {
      await fn();
      await this.db.query("COMMIT");
    } catch (err) {
      await this.db.query("ROLLBACK").catch(() => {});
      throw err;
    }
  }

  async createProject(tenant: string, name: string): Promise<string> {
    const id = randomUUID();
    await this.#tx(async () => {
      await this.db.query("INSERT INTO projects (id, tenant_id, name) VALUES ($1, $2, $3)", [id, tenant, name]);
    });
    this.#expect(tenant, Entity.PROJECT, Action.CREATED, id);
    return id;
  }

  async archiveProject(tenant: string, id: string): Promise<void> {
    await this.#tx(async () => {
      await this.db.query("UPDATE projects SET status = 'archived', version = version + 1 WHERE id = $1", [id]);
    });
    this.#expect(tenant, Entity.PROJECT, Action.ARCHIVED, id);
  }

  async createTask(tenant: string, projectId: string | null, title: string, priority = 1): Promise<string> {
    const id = randomUUID();
    await this.#tx(async () => {
      await this.db.query(
        "INSERT INTO tasks (id, tenant_id, project_id, title, priority) VALUES ($1, $2, $3, $4, $5)",
        [id, tenant, projectId, title, priority],
      );
    });
    this.#expect(tenant, Entity.TASK, Action.CREATED, id);
    return id;
  }

  /** Several tasks in one transaction (contiguous events, tx_index 0..n-1). */
  async createTasks(tenant: string, projectId: string | null, titles: string[]): Promise<string[]> {
    const ids = titles.map(() => randomUUID());
    await this.#tx(async () => {
      for (const [i, title] of titles.entries()) {
        await this.db.query("INSERT INTO tasks (id, tenant_id, project_id, title) VALUES ($1, $2, $3, $4)", [
          ids[i],
          tenant,
          projectId,
          title,
        ]);
      }
    });
    for (const id of ids) {
      this.#expect(tenant, Entity.TASK, Action.CREATED, id);
    }
    return ids;
  }

  async updateTask(tenant: string, id: string, changes: { title?: string; status?: string; assignee?: string }): Promise<void> {
    await this.#tx(async () => {
      await this.db.query(
        `UPDATE tasks SET title = COALESCE($2, title), status = COALESCE($3, status),
           assignee = COALESCE($4, assignee), version = version + 1, updated_at = now() WHERE id = $1`,
        [id, changes.title ?? null, changes.status ?? null, changes.assignee ?? null],
      );
    });
    this.#expect(tenant, Entity.TASK, changes.status === "done" ? Action.COMPLETED : Action.UPDATED, id);
  }

  async completeTask(tenant: string, id: string): Promise<void> {
    await this.#tx(async () => {
      await this.db.query(
        "UPDATE tasks SET status = 'done', completed_at = now(), version = version + 1 WHERE id = $1",
        [id],
      );
    });
    this.#expect(tenant, Entity.TASK, Action.COMPLETED, id);
  }

  async deleteTask(tenant: string, id: string): Promise<void> {
    await this.#tx(async () => {
      await this.db.query("DELETE FROM tasks WHERE id = $1", [id]);
    });
    this.#expect(tenant, Entity.TASK, Action.DELETED, id);
  }

  /** Takes an editing lock for `ttlSeconds` (negative: already expired). */
  async lock(tenant: string, recordType: "task" | "project", recordId: string, by: string, ttlSeconds = 60): Promise<void> {
    await this.#tx(async () => {
      await this.db.query(
        `INSERT INTO editing_locks (tenant_id, record_type, record_id, locked_by, locked_at, expires_at)
         VALUES ($1, $2, $3, $4, now(), now() + make_interval(secs => $5))`,
        [tenant, recordType, recordId, by, ttlSeconds],
      );
    });
    this.#expect(tenant, Entity.LOCK, Action.ACQUIRED, `${recordType}:${recordId}`);
  }

  async refreshLock(tenant: string, recordType: "task" | "project", recordId: string): Promise<void> {
    await this.#tx(async () => {
      await this.db.query(
        `UPDATE editing_locks SET expires_at = now() + interval '60 seconds'
         WHERE tenant_id = $1 AND record_type = $2 AND record_id = $3`,
        [tenant, recordType, recordId],
      );
    });
    this.#expect(tenant, Entity.LOCK, Action.REFRESHED, `${recordType}:${recordId}`);
  }

  async transferLock(tenant: string, recordType: "task" | "project", recordId: string, to: string): Promise<void> {
    await this.#tx(async () => {
      await this.db.query(
        `UPDATE editing_locks SET locked_by = $4, locked_at = now()
         WHERE tenant_id = $1 AND record_type = $2 AND record_id = $3`,
        [tenant, recordType, recordId, to],
      );
    });
    this.#expect(tenant, Entity.LOCK, Action.TRANSFERRED, `${recordType}:${recordId}`);
  }

  /** Deletes the lock: RELEASED before its expiry, EXPIRED at or after it. */
  async unlock(tenant: string, recordType: "task" | "project", recordId: string, expired: boolean): Promise<void> {
    await this.#tx(async () => {
      await this.db.query("DELETE FROM editing_locks WHERE tenant_id = $1 AND record_type = $2 AND record_id = $3", [
        tenant,
        recordType,
        recordId,
      ]);
    });
    this.#expect(tenant, Entity.LOCK, expired ? Action.EXPIRED : Action.RELEASED, `${recordType}:${recordId}`);
  }

  /** A mixed round of changes for `tenant`: 13 events. */
  async round(tenant: string, label: string): Promise<void> {
    const project = await this.createProject(tenant, `${label} project`);
    const [t1, t2] = (await this.createTasks(tenant, project, [`${label} one`, `${label} two`])) as [string, string];
    await this.updateTask(tenant, t1, { title: `${label} one (renamed)`, assignee: "ada" });
    await this.lock(tenant, "task", t2, "ada");
    await this.refreshLock(tenant, "task", t2);
    await this.transferLock(tenant, "task", t2, "bob");
    await this.unlock(tenant, "task", t2, false);
    await this.completeTask(tenant, t2);
    await this.lock(tenant, "project", project, "cy", -1);
    await this.unlock(tenant, "project", project, true);
    await this.deleteTask(tenant, t1);
    await this.archiveProject(tenant, project);
  }
}
