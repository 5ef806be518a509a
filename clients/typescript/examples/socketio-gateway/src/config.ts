/**
 * Gateway settings from the environment. Every variable has a default except
 * GATEWAY_TOKENS, which is the demo's stand-in for real authentication.
 */

export interface Config {
  /** HOST (default 127.0.0.1). */
  host: string;
  /** PORT (default 3000; 0 picks a free port). */
  port: number;
  /** NATS_URL (default nats://127.0.0.1:4222). */
  natsUrl: string;
  /** WALCAST_SUBJECT_PREFIX (default walcast). */
  subjectPrefix: string;
  /**
   * GATEWAY_TOKENS: `token=tenant` pairs, comma-separated. The server maps a
   * socket's token to its tenant; a tenant sent by the browser is never
   * used. Replace with your session or JWT check.
   */
  tokens: Map<string, string>;
  /** WALCAST_STATE_BUCKET: walcast's state bucket (default: the client's, WALCAST_STATE). */
  stateBucket: string | undefined;
  /** HUB_IDLE_MS: keep a tenant's relay this long after its last socket left (default 30000). */
  hubIdleMs: number;
}

const TENANT_ID = /^[A-Za-z0-9_-]{1,128}$/;

export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const tokens = new Map<string, string>();
  for (const pair of (env["GATEWAY_TOKENS"] ?? "").split(",")) {
    if (pair.trim() === "") {
      continue;
    }
    const [token, tenant] = pair.split("=").map((s) => s.trim());
    if (!token || !tenant || !TENANT_ID.test(tenant)) {
      throw new Error(`GATEWAY_TOKENS: expected token=tenant pairs, got ${JSON.stringify(pair)}`);
    }
    tokens.set(token, tenant);
  }
  if (tokens.size === 0) {
    throw new Error("GATEWAY_TOKENS is empty: set token=tenant pairs, e.g. GATEWAY_TOKENS=secret-a=acme,secret-b=globex");
  }
  const port = Number(env["PORT"] ?? "3000");
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`PORT must be a port number, got ${env["PORT"]}`);
  }
  return {
    host: env["HOST"] ?? "127.0.0.1",
    port,
    natsUrl: env["NATS_URL"] ?? "nats://127.0.0.1:4222",
    subjectPrefix: env["WALCAST_SUBJECT_PREFIX"] ?? "walcast",
    tokens,
    stateBucket: env["WALCAST_STATE_BUCKET"] || undefined,
    hubIdleMs: Number(env["HUB_IDLE_MS"] ?? "30000"),
  };
}
