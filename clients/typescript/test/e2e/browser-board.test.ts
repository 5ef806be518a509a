// Browser straight on NATS (SPEC §9): Postgres → walcast run (also the auth
// callout) → nats-server with the shipped deploy/nats/auth-callout.conf →
// NATS over WebSocket → examples/browser-board in headless Chromium, served
// by a plain static file server (no gateway). Tenant A's page shows A's
// board, loaded from the state and then live with lock badges; tenant B's
// page shows only B's.
import assert from "node:assert/strict";
import { createReadStream, existsSync, mkdirSync, statSync } from "node:fs";
import { createServer } from "node:http";
import type { Server } from "node:http";
import { extname, join, normalize } from "node:path";
import { after, before, describe, it } from "node:test";

import type pg from "pg";
import type { BrowserContext, Page } from "playwright-core";
import { chromium } from "playwright-core";

import { calloutEnv, startCalloutNats, token } from "../support/callout.js";
import { OUTPUT_DIR, PACKAGE_ROOT, makeTempDir } from "../support/env.js";
import type { NatsServer } from "../support/nats.js";
import { PostgresServer } from "../support/postgres.js";
import { WalcastDaemon } from "../support/walcast.js";
import { Workload } from "../support/workload.js";

const A = "acme";
const B = "globex";
const CHROMIUM = process.env["CHROMIUM_PATH"] ?? "/usr/bin/chromium";
const SHOTS = join(OUTPUT_DIR, "e2e");
const EXAMPLES = join(PACKAGE_ROOT, "examples");
const PATIENCE_MS = 10_000;

let postgres: PostgresServer;
let nats: NatsServer;
let wsPort: number;
let walcast: WalcastDaemon;
let db: pg.Client;
let work: Workload;
let files: Server;
let filesPort: number;
let browser: BrowserContext;

const TYPES: Record<string, string> = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css" };

/** A static file server over examples/ (what a CDN would serve). */
function serveExamples(): Promise<[Server, number]> {
  const server = createServer((req, res) => {
    const path = normalize(join(EXAMPLES, decodeURIComponent(new URL(req.url ?? "/", "http://x").pathname)));
    if (!path.startsWith(EXAMPLES) || !existsSync(path) || !statSync(path).isFile()) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": TYPES[extname(path)] ?? "application/octet-stream" });
    createReadStream(path).pipe(res);
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve([server, (server.address() as { port: number }).port])));
}

async function openBoard(tenant: string): Promise<Page> {
  const page = await browser.newPage();
  page.on("console", (m) => console.log(`[page ${tenant}] ${m.text()}`));
  const query = new URLSearchParams({ ws: `ws://127.0.0.1:${wsPort}`, tenant, token: token(tenant) });
  await page.goto(`http://127.0.0.1:${filesPort}/browser-board/index.html?${query}`);
  await page.waitForFunction(() => document.getElementById("connection")?.dataset["state"] === "live", undefined, {
    timeout: PATIENCE_MS,
  });
  return page;
}

const titles = (page: Page) =>
  page.evaluate(() => Array.from(document.querySelectorAll(".task-title, [data-project-id] h2"), (e) => e.firstChild?.textContent ?? ""));

describe("examples/browser-board in Chromium, straight on NATS with a tenant token", { timeout: 150_000 }, () => {
  before(async () => {
    mkdirSync(SHOTS, { recursive: true });
    let walcastUrl: string;
    [postgres, { nats, wsPort, walcastUrl }] = await Promise.all([PostgresServer.start(), startCalloutNats()]);
    walcast = await WalcastDaemon.migrated(postgres.url, walcastUrl);
    Object.assign(walcast.env, calloutEnv());
    await walcast.start();
    db = await postgres.client();
    work = new Workload(db);
    [files, filesPort] = await serveExamples();
    browser = await chromium.launchPersistentContext(makeTempDir("chromium"), {
      executablePath: CHROMIUM,
      headless: true,
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
    });
  });

  after(async () => {
    await browser?.close().catch(() => {});
    files?.close();
    await db?.end().catch(() => {});
    await walcast?.destroy();
    await nats?.destroy();
    await postgres?.destroy();
  });

  it("A's page shows A's board live with lock badges; B's page shows only B's", async () => {
    const aProject = await work.createProject(A, "A board");
    await work.createTask(A, aProject, "A first task");
    const bProject = await work.createProject(B, "B board");
    await work.createTask(B, bProject, "B secret task");

    const pageA = await openBoard(A);
    const pageB = await openBoard(B);
    try {
      await pageA.waitForFunction(() => document.body.textContent?.includes("A first task"), undefined, { timeout: PATIENCE_MS });
      const taskId = await work.createTask(A, aProject, "A live task");
      await pageA.waitForFunction(() => document.body.textContent?.includes("A live task"), undefined, { timeout: PATIENCE_MS });
      await work.lock(A, "task", taskId, "alice");
      await pageA.waitForFunction(
        (id) => document.querySelector(`[data-task-id="${id}"] .lock-badge`)?.textContent === "editing by alice",
        taskId,
        { timeout: PATIENCE_MS },
      );
      // A task whose id changes: the board drops its old id (the event's before-image).
      const oldId = await work.createTask(A, aProject, "A renumbered task");
      await pageA.waitForSelector(`[data-task-id="${oldId}"]`, { timeout: PATIENCE_MS });
      const newId = "b0000000-0000-4000-8000-000000000001";
      await db.query("UPDATE tasks SET id = $1 WHERE id = $2", [newId, oldId]);
      await pageA.waitForSelector(`[data-task-id="${newId}"]`, { timeout: PATIENCE_MS });
      assert.equal(await pageA.$(`[data-task-id="${oldId}"]`), null, "the task's old id left the board");
      assert.equal((await titles(pageA)).filter((t) => t === "A renumbered task").length, 1);
      await work.createTask(B, bProject, "B live task");
      await pageB.waitForFunction(() => document.body.textContent?.includes("B live task"), undefined, { timeout: PATIENCE_MS });
      await pageA.screenshot({ path: join(SHOTS, "browser-board-a.png"), fullPage: true });
      await pageB.screenshot({ path: join(SHOTS, "browser-board-b.png"), fullPage: true });

      const onA = await titles(pageA);
      const onB = await titles(pageB);
      assert.ok(onA.every((t) => !t.startsWith("B ")), `A's page shows B's rows: ${onA.join(", ")}`);
      assert.ok(onB.every((t) => !t.startsWith("A ")), `B's page shows A's rows: ${onB.join(", ")}`);
      assert.deepEqual(onB.sort(), ["B board", "B live task", "B secret task"]);
    } finally {
      await pageA.close();
      await pageB.close();
    }
  });
});
