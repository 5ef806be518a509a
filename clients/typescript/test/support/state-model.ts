/**
 * A tenant's rows changed by random creates, updates and deletes of tasks and
 * locks, numbered 1, 2, 3... like walcast: the model `loadAndFollow()` is
 * compared against (snapshot + following events = the model's rows).
 */

import { create } from "@bufbuild/protobuf";

import type { ChangeEvent } from "../../src/index.js";
import { Action, ChangeEventSchema, Entity } from "../../src/index.js";

/** One row change: the state key it writes and its event (`after` empty for a delete). */
export interface Change {
  readonly key: string;
  readonly event: ChangeEvent;
}

/** A small seeded PRNG (mulberry32): `next()` in [0, 1). Print the seed to replay. */
export class Rng {
  #state: number;
  constructor(readonly seed: number) {
    this.#state = seed >>> 0;
  }
  next(): number {
    this.#state = (this.#state + 0x6d2b79f5) >>> 0;
    let t = this.#state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  below(n: number): number {
    return Math.floor(this.next() * n);
  }
}

/** Applies one event to rows keyed by state key, as an application does. */
export function applyEvent(rows: Map<string, ChangeEvent>, key: string, event: ChangeEvent): void {
  if (event.after.case === undefined) {
    rows.delete(key);
  } else {
    rows.set(key, event);
  }
}

/** The state key of an event's row (SPEC §8). */
export function stateKey(event: ChangeEvent): string {
  const entity = Entity[event.entity].toLowerCase();
  return `${event.tenantId}.${entity}.${event.entityId.replace(":", ".")}`;
}

export class Model {
  seq = 0n;
  readonly rows = new Map<string, ChangeEvent>();
  #nextId = 0;

  constructor(readonly tenant: string) {}

  /** A row copied by the backfill (seq 0, the create action), added to the rows. */
  backfilled(): Change {
    const change = this.#create(0n);
    const event = create(ChangeEventSchema, { ...change.event, eventId: `backfill-0/1A2B3C4-${change.key}` });
    applyEvent(this.rows, change.key, event);
    return { key: change.key, event };
  }

  /** The tenant's next change (a create when there are few rows), applied to the rows. */
  nextChange(rng: Rng): Change {
    this.seq++;
    const roll = rng.below(10);
    let change: Change;
    if (this.rows.size < 3 || roll < 4) {
      change = this.#create(this.seq);
    } else {
      const keys = [...this.rows.keys()];
      const key = keys[rng.below(keys.length)] as string;
      change = roll < 8 ? this.#update(key) : this.#delete(key);
    }
    applyEvent(this.rows, change.key, change.event);
    return change;
  }

  /** The tenant's next change: deleting `key`'s row. */
  deleteRow(key: string): Change {
    this.seq++;
    const change = this.#delete(key);
    applyEvent(this.rows, key, change.event);
    return change;
  }

  #create(seq: bigint): Change {
    this.#nextId++;
    const id = `${String(this.#nextId).padStart(8, "0")}-0000-4000-8000-${seq.toString().padStart(12, "0")}`;
    if (this.#nextId % 3 === 0) {
      return {
        key: `${this.tenant}.lock.task.${id}`,
        event: this.#event(seq, Entity.LOCK, Action.ACQUIRED, `task:${id}`, {
          case: "lock",
          value: { tenantId: this.tenant, recordType: "task", recordId: id, lockedBy: "user-1" },
        }),
      };
    }
    return {
      key: `${this.tenant}.task.${id}`,
      event: this.#event(seq, Entity.TASK, Action.CREATED, id, {
        case: "task",
        value: { id, tenantId: this.tenant, title: `task ${id}`, status: "todo", version: 1n },
      }),
    };
  }

  #update(key: string): Change {
    const row = this.rows.get(key) as ChangeEvent;
    const after = row.after;
    if (after.case === "task") {
      const version = after.value.version + 1n;
      const value = { ...after.value, version, title: `${after.value.id} v${version}` };
      return { key, event: this.#event(this.seq, row.entity, Action.UPDATED, row.entityId, { case: "task", value }) };
    }
    if (after.case === "lock") {
      const value = { ...after.value, lockedBy: `user-${this.seq}` };
      return { key, event: this.#event(this.seq, row.entity, Action.TRANSFERRED, row.entityId, { case: "lock", value }) };
    }
    throw new Error(`no update for ${key}`);
  }

  #delete(key: string): Change {
    const row = this.rows.get(key) as ChangeEvent;
    const action = row.entity === Entity.LOCK ? Action.RELEASED : Action.DELETED;
    return { key, event: this.#event(this.seq, row.entity, action, row.entityId, { case: undefined }) };
  }

  #event(seq: bigint, entity: Entity, action: Action, entityId: string, after: unknown): ChangeEvent {
    return create(ChangeEventSchema, {
      eventId: `${this.tenant}-${seq}`,
      tenantId: this.tenant,
      seq,
      entity,
      action,
      entityId,
      commitLsn: 1000n + seq,
      xid: 700n + seq,
      table: "public.tasks",
      after: after as ChangeEvent["after"],
    });
  }
}
