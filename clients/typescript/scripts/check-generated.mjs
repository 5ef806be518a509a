// Fails when src/gen/ is not what `npm run generate` makes from ../../proto:
// regenerates into a temp dir (same buf.gen.yaml, local plugin, no network)
// and compares file by file.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const out = mkdtempSync(join(tmpdir(), "walcast-gen-"));

function files(dir) {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    return statSync(path).isDirectory() ? files(path) : [path];
  });
}

try {
  execFileSync(join(root, "node_modules/.bin/buf"), ["generate", "--output", out], {
    cwd: root,
    stdio: "inherit",
    env: { ...process.env, PATH: `${join(root, "node_modules/.bin")}:${process.env.PATH}` },
  });
  const fresh = join(out, "src/gen");
  const committed = join(root, "src/gen");
  const a = files(fresh).map((f) => relative(fresh, f)).sort();
  const b = files(committed).map((f) => relative(committed, f)).sort();
  const stale = [
    ...a.filter((f) => !b.includes(f)).map((f) => `missing: src/gen/${f}`),
    ...b.filter((f) => !a.includes(f)).map((f) => `extra: src/gen/${f}`),
    ...a
      .filter((f) => b.includes(f))
      .filter((f) => !readFileSync(join(fresh, f)).equals(readFileSync(join(committed, f))))
      .map((f) => `differs: src/gen/${f}`),
  ];
  if (stale.length > 0) {
    console.error(`src/gen is stale (run \`npm run generate\` and commit):\n  ${stale.join("\n  ")}`);
    process.exit(1);
  }
  console.log(`src/gen is up to date with proto/ (${a.length} file${a.length === 1 ? "" : "s"})`);
} finally {
  rmSync(out, { recursive: true, force: true });
}
