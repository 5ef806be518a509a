// Browser end to end: Postgres → walcast run → NATS (stream and state
// bucket) → the example Socket.IO gateway → headless Chromium showing the
// board of tenant A, loaded from the state bucket, then live.
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { randomUUID } from "node:crypto";
import { after, before, describe, it } from "node:test";

import type pg from "pg";
import type { BrowserContext, Page } from "playwright-core";
import { chromium } from "playwright-core";
import { jetstreamManager } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";

import { OUTPUT_DIR, makeTempDir } from "../support/env.js";
import { Gateway } from "../support/gateway.js";
import { NatsServer } from "../support/nats.js";
import { PostgresServer } from "../support/postgres.js";
import { TcpProxy } from "../support/proxy.js";
import { WalcastDaemon } from "../support/walcast.js";
import { Workload } from "../support/workload.js";

const A = "acme";
const B = "globex";
const CHROMIUM = process.env["CHROMIUM_PATH"] ?? "/usr/bin/chromium";
const SHOTS = join(OUTPUT_DIR, "e2e");
/** The bound: every change shows on the page within 1 s. */
const WITHIN_MS = 1_000;

let postgres: PostgresServer;
let nats: NatsServer;
let walcast: WalcastDaemon;
let gateway: Gateway;
let proxy: TcpProxy;
let db: pg.Client;
let work: Workload;
let browser: BrowserContext;
let page: Page;
const latencies: number[] = [];
const bTitles: string[] = [];

/** Runs `change`, then waits (at most 1 s from its commit) until `shown` holds on the page. */
async function expectShown<T>(what: string, change: () => Promise<T>, shown: (arg: T) => string): Promise<T> {
  const result = await change();
  const committed = Date.now();
  try {
    await page.waitForFunction(shown(result), undefined, { timeout: WITHIN_MS, polling: 10 });
  } catch (err) {
    await page.screenshot({ path: join(SHOTS, `failed-${what.replace(/\W+/g, "-")}.png`), fullPage: true });
    throw new Error(`"${what}" did not show within ${WITHIN_MS} ms: ${(err as Error).message}`);
  }
  latencies.push(Date.now() - committed);
  return result;
}

const taskSel = (id: string) => `document.querySelector('[data-task-id="${id}"]')`;
const taskTitle = (id: string, title: string) => `${taskSel(id)}?.querySelector('.task-title')?.textContent === ${JSON.stringify(title)}`;
const taskLock = (id: string) => `(${taskSel(id)}?.querySelector('.lock-badge')?.textContent ?? null)`;
const projectLock = (id: string) =>
  `(document.querySelector('[data-project-id="${id}"] h2 .lock-badge')?.textContent ?? null)`;
const boardSeq = () => page.evaluate(() => Number(document.body.dataset["seq"] ?? "0"));
const connection = () => page.evaluate(() => document.getElementById("connection")?.dataset["state"]);

describe("the Socket.IO gateway example in Chromium", { timeout: 150_000 }, () => {
  before(async () => {
    mkdirSync(SHOTS, { recursive: true });
    [postgres, nats] = await Promise.all([PostgresServer.start(), NatsServer.start()]);
    walcast = await WalcastDaemon.migrated(postgres.url, nats.url);
    db = await postgres.client();
    work = new Workload(db);
    // Rows from before walcast: inserted, then the slot dropped and created
    // again by `walcast migrate`, so they have no event in the stream and
    // reach the board only through walcast's backfill of the state bucket.
    await db.query("INSERT INTO projects (id, tenant_id, name) VALUES ($1, $2, 'Backlog'), ($3, $4, 'B old project')", [
      oldProject,
      A,
      randomUUID(),
      B,
    ]);
    await db.query(
      `INSERT INTO tasks (id, tenant_id, project_id, title, priority, created_at)
       VALUES ($1, $2, $3, 'Old task one', 1, now() - interval '2 days'),
              ($4, $2, $3, 'Old task two', 2, now() - interval '1 day'),
              ($5, $6, NULL, 'B old secret', 1, now())`,
      [oldTasks[0], A, oldProject, oldTasks[1], randomUUID(), B],
    );
    bTitles.push("B old project", "B old secret");
    await db.query("SELECT pg_drop_replication_slot('walcast')");
    await walcast.migrate();
    await walcast.start();
    gateway = await Gateway.start({
      NATS_URL: nats.url,
      GATEWAY_TOKENS: `token-a=${A},token-b=${B}`,
    });
    proxy = await TcpProxy.start(gateway.port);
    browser = await chromium.launchPersistentContext(makeTempDir("chromium"), {
      executablePath: CHROMIUM,
      headless: true,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
      viewport: { width: 1280, height: 800 },
    });
    page = browser.pages()[0] ?? (await browser.newPage());
    // What the board shows the first time it shows any task.
    await page.addInitScript(() => {
      const observer = new MutationObserver(() => {
        const titles = Array.from(document.querySelectorAll("[data-task-id] .task-title"), (e) => e.textContent);
        if (titles.length > 0) {
          (window as unknown as { firstPaint: unknown }).firstPaint = {
            titles,
            projects: Array.from(document.querySelectorAll("[data-project-id] h2"), (e) => e.firstChild?.textContent),
          };
          observer.disconnect();
        }
      });
      observer.observe(document, { childList: true, subtree: true });
    });
    page.on("console", (m) => {
      if (m.type() === "warning" || m.type() === "error") console.log(`[page] ${m.text()}`);
    });
  });

  after(async () => {
    if (latencies.length > 0) {
      const sorted = [...latencies].sort((x, y) => x - y);
      console.log(`commit → on screen: ${sorted.length} changes, median ${sorted[Math.floor(sorted.length / 2)]} ms, max ${sorted.at(-1)} ms`);
    }
    await browser?.close().catch(() => {});
    await proxy?.cut();
    await gateway?.stop();
    await db?.end().catch(() => {});
    await walcast?.destroy();
    await nats?.destroy();
    await postgres?.destroy();
  });

  let project = "";
  let docs = "";
  const oldProject = randomUUID();
  const oldTasks = [randomUUID(), randomUUID()];

  it("shows the rows from before walcast on first paint, then each change within 1 s, never another tenant's", async () => {
    // History from before the page opened: in the snapshot with the rows
    // from before walcast (or, if the state lags, in the events after it).
    project = await work.createProject(A, "Launch");
    docs = await work.createTask(A, project, "Write docs", 2);
    const bProject = await work.createProject(B, "B secret project");
    bTitles.push("B secret project", "B secret task");
    await work.createTask(B, bProject, "B secret task");

    await page.goto(`http://127.0.0.1:${proxy.port}/?token=token-a`);
    await page.waitForFunction(`document.getElementById("connection").dataset.state === "live"`, undefined, { timeout: 15_000 });
    await page.waitForFunction(taskTitle(docs, "Write docs"), undefined, { timeout: 5_000 });
    assert.equal(await page.textContent("[data-testid=tenant]"), `· ${A}`);
    // The rows that existed before walcast ran were on the first paint.
    const first = (await page.evaluate(() => (window as unknown as { firstPaint?: unknown }).firstPaint)) as
      | { titles: string[]; projects: string[] }
      | undefined;
    assert.ok(first !== undefined, "the board never showed a task");
    for (const title of ["Old task one", "Old task two"]) {
      assert.ok(first.titles.includes(title), `first paint lacks "${title}": ${JSON.stringify(first)}`);
    }
    assert.ok(first.projects.includes("Backlog"), `first paint lacks the project "Backlog": ${JSON.stringify(first)}`);
    await page.waitForFunction(`${taskTitle(oldTasks[0] as string, "Old task one")} && ${taskTitle(oldTasks[1] as string, "Old task two")}`, undefined, {
      timeout: 1_000,
    });
    assert.ok(
      await page.evaluate(
        (id) => document.querySelector(`[data-project-id="${id}"]`)?.textContent?.includes("Old task two") ?? false,
        oldProject,
      ),
      "the old tasks are in their project's column",
    );
    // A row from before walcast changes live too.
    await expectShown(
      "update of a row from before walcast",
      () => work.updateTask(A, oldTasks[0] as string, { title: "Old task one, revived", status: "in_progress" }),
      () => `${taskTitle(oldTasks[0] as string, "Old task one, revived")} && ${taskSel(oldTasks[0] as string)}.dataset.status === "in_progress"`,
    );

    const ship = await expectShown("insert", () => work.createTask(A, project, "Ship it"), (id) => taskTitle(id, "Ship it"));
    await work.createTask(B, bProject, "B hidden insert");
    bTitles.push("B hidden insert");
    await expectShown(
      "update",
      () => work.updateTask(A, ship, { title: "Ship it now", status: "in_progress", assignee: "ada" }),
      () => `${taskTitle(ship, "Ship it now")} && ${taskSel(ship)}.dataset.status === "in_progress"`,
    );
    await expectShown("complete", () => work.completeTask(A, ship), () => `${taskSel(ship)}?.dataset.status === "done"`);
    await expectShown("lock", () => work.lock(A, "task", docs, "ada"), () => `${taskLock(docs)} === "editing by ada"`);
    await work.lock(B, "project", bProject, "B spy");
    await expectShown("transfer", () => work.transferLock(A, "task", docs, "bob"), () => `${taskLock(docs)} === "editing by bob"`);
    await page.screenshot({ path: join(SHOTS, "board-live.png"), fullPage: true });
    await expectShown("release", () => work.unlock(A, "task", docs, false), () => `${taskLock(docs)} === null`);

    // A lock that runs out: the badge goes at its expiry; the EXPIRED event
    // (the row deleted later) keeps it gone.
    await expectShown("short lock", () => work.lock(A, "project", project, "cy", 2), () => `${projectLock(project)} === "editing by cy"`);
    await page.waitForFunction(`${projectLock(project)} === null`, undefined, { timeout: 4_000 });
    await work.unlock(A, "project", project, true);

    await page.waitForFunction(`Number(document.body.dataset.seq) === ${work.expectedFor(A).length}`, undefined, { timeout: 2_000 });
  });

  it("after the socket is cut and restored, the changes made meanwhile appear", async () => {
    const before = await boardSeq();
    await proxy.cut();
    await page.waitForFunction(`["disconnected", "reconnecting"].includes(document.getElementById("connection").dataset.state)`, undefined, {
      timeout: 5_000,
    });

    const offline = await work.createTask(A, project, "Made while offline");
    await work.completeTask(A, docs);
    await work.lock(A, "task", offline, "dora");
    await work.createTask(B, null, "B while offline");
    bTitles.push("B while offline");
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(await boardSeq(), before, "nothing arrives while cut");
    assert.notEqual(await connection(), "live");
    await page.screenshot({ path: join(SHOTS, "board-offline.png"), fullPage: true });

    await proxy.restore();
    await page.waitForFunction(`document.getElementById("connection").dataset.state === "live"`, undefined, { timeout: 15_000 });
    await page.waitForFunction(
      `${taskTitle(offline, "Made while offline")} && ${taskSel(docs)}?.dataset.status === "done" && ${taskLock(offline)} === "editing by dora"`,
      undefined,
      { timeout: 5_000 },
    );
    // Each event applied once: seq = A's event count, and the events applied
    // after the snapshot are exactly those after its asOfSeq (a resume, no reload).
    const n = work.expectedFor(A).length;
    assert.equal(await boardSeq(), n);
    const snapshotSeq = await page.evaluate(() => Number(document.body.dataset["snapshotSeq"]));
    assert.equal(await page.evaluate(() => Number(document.body.dataset["applied"])), n - snapshotSeq);

    // And live again afterwards.
    await expectShown("insert after resume", () => work.createTask(A, project, "Back online"), (id) => taskTitle(id, "Back online"));
    await page.screenshot({ path: join(SHOTS, "board-after-resume.png"), fullPage: true });
  });

  it("a page too far behind reloads its rows from the state, not the database", async () => {
    await proxy.cut();
    await page.waitForFunction(`document.getElementById("connection").dataset.state !== "live"`, undefined, {
      timeout: 5_000,
    });
    const before = await boardSeq();
    const gone = await work.createTask(A, project, "Made while far behind");
    await work.updateTask(A, gone, { title: "Made while far behind, edited" });
    await work.lock(A, "task", gone, "eve");
    // The events the page needs leave the stream (as with max age): only
    // A's newest event stays, so resuming after `before` is impossible.
    // Purged once walcast has published all three (a purge before that
    // would keep an older event and leave the new ones to resume from).
    const nc = await connect({ servers: nats.url });
    try {
      const jsm = await jetstreamManager(nc);
      const published = work.expectedFor(A).length;
      const inStream = async () => {
        const info = await jsm.streams.info("WALCAST", { subjects_filter: `walcast.${A}.>` });
        return Object.values(info.state.subjects ?? {}).reduce((sum, n) => sum + n, 0);
      };
      const deadline = Date.now() + 10_000;
      while ((await inStream()) < published) {
        assert.ok(Date.now() < deadline, `walcast published ${A}'s ${published} events within 10 s`);
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      await jsm.streams.purge("WALCAST", { filter: `walcast.${A}.>`, keep: 1 });
    } finally {
      await nc.close();
    }
    await proxy.restore();
    await page.waitForFunction(`document.getElementById("connection").dataset.state === "live"`, undefined, { timeout: 15_000 });
    await page.waitForFunction(
      `${taskTitle(gone, "Made while far behind, edited")} && ${taskLock(gone)} === "editing by eve"`,
      undefined,
      { timeout: 5_000 },
    );
    // A reload (a new snapshot past the page's position), told to the user.
    const n = work.expectedFor(A).length;
    assert.equal(await boardSeq(), n);
    assert.ok((await page.evaluate(() => Number(document.body.dataset["snapshotSeq"]))) > before, "a new snapshot");
    assert.match((await page.textContent("#notice")) ?? "", /no longer in the stream/);
    // Every row still on the board, the old ones too, and live afterwards.
    await page.waitForFunction(taskTitle(oldTasks[1] as string, "Old task two"), undefined, { timeout: 1_000 });
    await expectShown("insert after the reload", () => work.createTask(A, project, "After the reload"), (id) => taskTitle(id, "After the reload"));
  });

  it("tenant B's changes never appear, whatever the browser claims", async () => {
    const text = (await page.textContent("body")) ?? "";
    for (const title of bTitles) {
      assert.ok(!text.includes(title), `page shows ${B}'s "${title}"`);
    }
    // A socket with A's token that asks for B gets A's events only.
    const tenants = await page.evaluate(async () => {
      const w = window as unknown as { io: (opts: object) => { on: (e: string, f: (x: never) => void) => void; close: () => void } };
      const seen = new Set<string>();
      let hello = "";
      const s = w.io({ forceNew: true, auth: { token: "token-a", tenant: "globex", tenant_id: "globex", lastSeq: "0" } });
      s.on("hello", (h: { tenant: string }) => (hello = h.tenant));
      s.on("snapshot", (snap: { rows: { tenantId: string }[] }) => snap.rows.forEach((row) => seen.add(row.tenantId)));
      s.on("change", (e: { tenantId: string }) => seen.add(e.tenantId));
      await new Promise<void>((resolve) => s.on("live", () => resolve()));
      s.close();
      return { hello, seen: [...seen] };
    });
    assert.deepEqual(tenants, { hello: A, seen: [A] });

    // A wrong token is refused.
    const other = await browser.newPage();
    await other.goto(`http://127.0.0.1:${proxy.port}/?token=nope`);
    await other.waitForFunction(`document.getElementById("connection").dataset.state === "unauthorized"`, undefined, {
      timeout: 5_000,
    });
    await other.close();
  });
});
