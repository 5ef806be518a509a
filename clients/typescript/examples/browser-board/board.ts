/**
 * The live board in a browser, straight from NATS (SPEC §9): the page
 * connects over NATS WebSocket with the application's login token, which
 * walcast's auth callout turns into a NATS user confined to the token's
 * tenant, then `loadAndFollow` yields the tenant's rows (from walcast's
 * state bucket) and every later event. No gateway of the application's own.
 *
 * Open it as `index.html?ws=ws://127.0.0.1:8080&tenant=acme&token=<JWT>`.
 * The tenant names the subjects the page asks for; the server only lets the
 * token's own tenant through, whatever the page says.
 */
import { wsconnect } from "@nats-io/nats-core";
import type { ChangeEvent } from "@walcast/client";
import { loadAndFollow, toJSON } from "@walcast/client";

type Json = Record<string, unknown> & { id?: string };

const params = new URLSearchParams(location.search);
const tenant = params.get("tenant") ?? "";
const token = params.get("token") ?? "";
const ws = params.get("ws") ?? `ws://${location.hostname}:8080`;

const projects = new Map<string, Json>();
const tasks = new Map<string, Json>();
/** Locks by `<record_type>:<record_id>`. */
const locks = new Map<string, Json>();
let lastSeq = 0n;

const $ = (id: string) => document.getElementById(id) as HTMLElement;

function setConnection(state: string, text: string): void {
  const node = $("connection");
  node.dataset["state"] = state;
  node.textContent = text;
}

/** Puts the row an event leaves (or its absence) into the board's maps. */
function setRow(event: ChangeEvent): void {
  const json = toJSON(event) as Json;
  const action = String(json["action"]);
  const gone = action === "ACTION_DELETED" || action === "ACTION_RELEASED" || action === "ACTION_EXPIRED";
  const maps: Record<string, [Map<string, Json>, string]> = {
    ENTITY_TASK: [tasks, "task"],
    ENTITY_PROJECT: [projects, "project"],
    ENTITY_LOCK: [locks, "lock"],
  };
  const target = maps[String(json["entity"])];
  if (target === undefined) return;
  const [map, field] = target;
  const id = event.entityId;
  // An update that changed the row's id (a lock's record) leaves the old one.
  const before = json[`${field}Before`] as Json | undefined;
  if (before !== undefined) {
    const beforeId = field === "lock" ? `${String(before["recordType"])}:${String(before["recordId"])}` : String(before["id"]);
    if (beforeId !== id) map.delete(beforeId);
  }
  const row = json[field] as Json | undefined;
  if (gone) map.delete(id);
  else if (row !== undefined) map.set(id, row);
}

function el(tag: string, className: string, text?: string): HTMLElement {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function lockBadge(recordType: string, id: string): HTMLElement | null {
  const lock = locks.get(`${recordType}:${id}`);
  const expires = lock?.["expiresAt"];
  if (lock === undefined || (typeof expires === "string" && Date.parse(expires) <= Date.now())) return null;
  const badge = el("span", "lock-badge", `editing by ${String(lock["lockedBy"])}`);
  badge.dataset["testid"] = "lock";
  return badge;
}

function render(): void {
  const columns: HTMLElement[] = [];
  for (const [projectId, project] of projects) {
    const section = el("section", "project");
    section.dataset["projectId"] = projectId;
    const h2 = el("h2", "", String(project["name"] ?? ""));
    const projectLock = lockBadge("project", projectId);
    if (projectLock) h2.append(projectLock);
    const ul = el("ul", "");
    for (const [taskId, task] of tasks) {
      if (task["projectId"] !== projectId) continue;
      const li = el("li", "task");
      li.dataset["taskId"] = taskId;
      li.append(el("span", "task-title", String(task["title"] ?? "")));
      const status = String(task["status"] ?? "todo");
      li.append(el("span", `pill status status-${status}`, status.replace("_", " ")));
      const taskLock = lockBadge("task", taskId);
      if (taskLock) li.append(taskLock);
      ul.append(li);
    }
    section.append(h2, ul);
    columns.push(section);
  }
  $("board").replaceChildren(...columns);
  $("seq").textContent = `seq ${lastSeq}`;
  document.body.dataset["seq"] = String(lastSeq);
}

async function main(): Promise<void> {
  $("tenant").textContent = `· ${tenant}`;
  // The tenant's own inbox prefix: the only inboxes its NATS user may use.
  const nc = await wsconnect({ servers: ws, token, inboxPrefix: `_INBOX_${tenant}`, maxReconnectAttempts: -1 });
  setConnection("syncing", "syncing…");
  const board = loadAndFollow({ connection: nc, tenant });
  for await (const item of board) {
    if (item.type === "snapshot") {
      projects.clear();
      tasks.clear();
      locks.clear();
      for (const row of item.rows.values()) setRow(row);
      lastSeq = item.asOfSeq;
    } else if (item.type === "event") {
      setRow(item.event);
      lastSeq = item.event.seq;
    } else if (item.type === "live") {
      setConnection("live", "live");
    }
    render();
  }
}

main().catch((err: unknown) => {
  const message = err instanceof Error ? err.message : String(err);
  setConnection(/authorization/i.test(message) ? "unauthorized" : "error", message);
});
