// A subscription on a 3-node cluster whose consumer is lost with the node
// that held it, while the client's own connection (to another node) stays
// up: no reconnect and no "consumer deleted", since the server that would
// say so is gone. The subscription must notice by itself and go on, every
// event once and in order.
import assert from "node:assert/strict";
import { after, describe, it } from "node:test";

import { jetstreamManager } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";

import { subscribe } from "../../src/index.js";
import type { Subscription } from "../../src/index.js";
import { Collector } from "../support/collect.js";
import { waitFor } from "../support/env.js";
import { FakeWalcast } from "../support/fake-walcast.js";
import { startCluster } from "../support/nats.js";
import type { NatsServer } from "../support/nats.js";

/**
 * The longest an event stored after the kill may wait for its delivery: two
 * missed 5 s heartbeats, the reopen, a loaded machine. Measured from the
 * stream's ack, so a leader election of the stream itself (the killed node
 * may have led it) is not counted against the subscription.
 */
const WAIT_BOUND_MS = 25_000;

let nodes: NatsServer[] = [];
/** Closed after the test whatever its outcome: an open one keeps the process alive. */
const open: Subscription[] = [];
const fakes: FakeWalcast[] = [];

after(async () => {
  await Promise.all(open.map((s) => s.close()));
  await Promise.all(fakes.map((f) => f.close().catch(() => {})));
  await Promise.all(nodes.map((n) => n.destroy()));
});

/** Every consumer of the stream and the node that holds it. */
async function consumerHosts(url: string): Promise<Map<string, string>> {
  const nc = await connect({ servers: url });
  try {
    const jsm = await jetstreamManager(nc);
    const hosts = new Map<string, string>();
    for await (const info of jsm.consumers.list("WALCAST")) {
      hosts.set(info.name, info.cluster?.leader ?? "");
    }
    return hosts;
  } finally {
    await nc.close();
  }
}

describe("subscribe on a cluster", () => {
  it("goes on when the node holding its consumer dies", { timeout: 180_000 }, async () => {
    nodes = await startCluster();
    // The stream (R3) once the cluster has a JetStream meta leader.
    await waitFor(
      "an R3 stream",
      async () => {
        try {
          fakes.push(await FakeWalcast.start(nodes[0]!.url, { replicas: 3, service: false }));
          return true;
        } catch {
          return false;
        }
      },
      60_000,
    );
    // A subscription on one node whose consumer another node holds
    // (placement is the server's choice), the publisher on the same node.
    let found: { node: number; host: number; fake: FakeWalcast; c: Collector } | undefined;
    for (let attempt = 0; attempt < 20 && found === undefined; attempt++) {
      const node = attempt % nodes.length;
      const url = nodes[node]!.url;
      const known = await consumerHosts(url);
      const fake = await FakeWalcast.start(url, { replicas: 3 });
      fakes.push(fake);
      const s = subscribe({ servers: url, tenant: "*", requestTimeout: 1_000, maxBackoff: 500 });
      open.push(s);
      const c = new Collector(s);
      let host = "";
      await waitFor(
        "the subscription's consumer",
        async () => {
          for (const [name, leader] of await consumerHosts(url)) {
            if (!known.has(name) && leader !== "") {
              host = leader;
              return true;
            }
          }
          return false;
        },
        20_000,
      );
      if (host !== `n${node}`) {
        found = { node, host: Number(host.slice(1)), fake, c };
      }
    }
    assert.ok(found !== undefined, "every consumer landed on its client's node");
    const { host, fake, c } = found;

    let seq = 0;
    let publishing = true;
    const storedAt = new Map<number, number>();
    const publisher = (async () => {
      while (publishing) {
        try {
          await fake.publish("A", seq + 1);
          seq++;
          storedAt.set(seq, Date.now());
        } catch {
          // the stream may be electing a leader: try again
        }
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    await c.untilEvents(20, 30_000);
    await nodes[host]!.kill();
    const atKill = c.events.length;
    // Each event's wait from its ack to its delivery (to within a poll).
    let longest = 0;
    let count = atKill;
    const waited = waitFor(
      "50 events after the kill",
      () => {
        const events = c.events;
        for (; count < events.length; count++) {
          const stored = storedAt.get(Number(events[count]!.split(":")[1]));
          longest = Math.max(longest, Date.now() - (stored ?? Date.now()));
        }
        return count >= atKill + 50 || c.done;
      },
      90_000,
    ).catch((e: unknown) => {
      throw new Error(`${String(e)}: published ${seq}, received ${c.events.length} (${atKill} at the kill), error ${c.error?.message}`);
    });
    try {
      await waited;
    } finally {
      publishing = false;
    }
    await publisher;
    console.log(`[cluster] node n${host} (the consumer's) killed; longest wait of an event after it ${longest} ms`);
    const seqs = c.events.map((e) => Number(e.split(":")[1]));
    assert.deepEqual(seqs, seqs.map((_, i) => seqs[0]! + i), "every event once, in order");
    assert.ok(longest < WAIT_BOUND_MS, `an event waited ${longest} ms for the subscription after its consumer's node died`);
  });
});
