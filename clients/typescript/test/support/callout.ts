/**
 * walcast's auth callout as docker-compose.yml ships it (SPEC §9):
 * nats-server with deploy/nats/auth-callout.conf and the demo keys, walcast
 * with the matching `WALCAST_AUTH_*` settings, and application tokens
 * signed with the demo secret (HS256).
 */

import { createHmac } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";

import { freePort, REPO_ROOT } from "./env.js";
import { NatsServer } from "./nats.js";

const PASSWORD = "walcast-nats-demo-password";
const demo = (file: string) => join(REPO_ROOT, "deploy/compose", file);

/** The server, its WebSocket port, and walcast's NATS URL (an auth user). */
export async function startCalloutNats(): Promise<{ nats: NatsServer; wsPort: number; walcastUrl: string }> {
  const wsPort = await freePort();
  const config = readFileSync(join(REPO_ROOT, "deploy/nats/auth-callout.conf"), "utf8").replace(
    "port: 8080",
    `port: ${wsPort}`,
  );
  const nats = await NatsServer.startWithConfig(config, {
    NATS_PASSWORD_FOR_WALCAST: PASSWORD,
    NATS_AUTH_ISSUER: "AB55UPPUI64SJ7EKPGEIWITLFL6XPGFRCQHSAHYDHN7DWGYHLRJSPPWH",
    NATS_AUTH_XKEY: "XDXRJIZ3PITAXQGY53FYD6CZOFWM7AVUVHPMMS2KEQVWR2JMBDYTK5FW",
  });
  return { nats, wsPort, walcastUrl: `nats://walcast:${PASSWORD}@127.0.0.1:${nats.port}` };
}

/** walcast's callout settings, as the compose file gives them. */
export const calloutEnv = (): Record<string, string> => ({
  WALCAST_AUTH_ISSUER_SEED_FILE: demo("demo-auth-issuer.nk"),
  WALCAST_AUTH_XKEY_SEED_FILE: demo("demo-auth-xkey.xk"),
  WALCAST_AUTH_TOKEN_SECRET_FILE: demo("demo-app-jwt-secret"),
  WALCAST_AUTH_ACCOUNT: "APP",
});

const base64url = (data: string | Buffer) => Buffer.from(data).toString("base64url");

/** An application token for `tenant`, signed with the demo secret (HS256). */
export function token(tenant: string): string {
  const secret = readFileSync(demo("demo-app-jwt-secret"), "utf8").trimEnd();
  const head = base64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = base64url(JSON.stringify({ tenant_id: tenant, exp: Math.floor(Date.now() / 1000) + 600 }));
  const signature = createHmac("sha256", secret).update(`${head}.${body}`).digest();
  return `${head}.${body}.${base64url(signature)}`;
}
