#!/usr/bin/env bash
# Tests of the TypeScript client (clients/typescript) and its Socket.IO
# gateway example, from a clean `npm ci`:
#   1. unit tests (node:test; dedup, gap repair, re-sync, against a real
#      nats-server and a fake walcast),
#   2. integration test against real Postgres, NATS and `walcast run`,
#   3. browser end-to-end test in headless Chromium (Debian's package,
#      driven by playwright-core; no browser download).
# Idempotent. Installs what it needs: nats-server/PostgreSQL via
# scripts/install-deps.sh, Chromium via apt (pinned, when root), Node
# packages via `npm ci`; builds target/debug/walcast with cargo.
# Every test starts its own Postgres and nats-server on random ports.
# Screenshots: clients/typescript/test-output/e2e/.
#
# Environment:
#   WALCAST_CHROMIUM_VERSION  Debian version of chromium to install
#                             (default below; "any" takes apt's candidate)
#   CHROMIUM_PATH             browser binary (default /usr/bin/chromium)
#   WALCAST_BIN               use this walcast binary instead of building one
set -euo pipefail

CHROMIUM_VERSION="${WALCAST_CHROMIUM_VERSION:-156.0.8078.129-1~deb12u1}"
CHROMIUM_PATH="${CHROMIUM_PATH:-/usr/bin/chromium}"
# 20.14: node --test's --test-force-exit (a failing test that leaves a
# handle open must not hang the run).
NODE_MIN="20.14"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLIENT="$ROOT/clients/typescript"
log() { echo "test-typescript: $*" >&2; }

# --- Node ------------------------------------------------------------------
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    log "node and npm are required (Node >= ${NODE_MIN})"
    exit 1
fi
if ! node -e '
    const [want, have] = [process.argv[1], process.versions.node].map((v) => v.split(".").map(Number));
    process.exit(have[0] > want[0] || (have[0] === want[0] && have[1] >= want[1]) ? 0 : 1);
' "$NODE_MIN"; then
    log "Node >= ${NODE_MIN} required, found $(node --version)"
    exit 1
fi

# --- nats-server, PostgreSQL ------------------------------------------------
bash "$ROOT/scripts/install-deps.sh"
# shellcheck disable=SC1091
source "$ROOT/.tools/env"

# --- Chromium (Debian package, pinned) ---------------------------------------
installed_chromium() { dpkg-query -W -f='${Version}' chromium 2>/dev/null || true; }
have="$(installed_chromium)"
if [ "$CHROMIUM_PATH" != /usr/bin/chromium ]; then
    [ -x "$CHROMIUM_PATH" ] || { log "CHROMIUM_PATH=$CHROMIUM_PATH is not executable"; exit 1; }
elif [ -x /usr/bin/chromium ] && { [ "$CHROMIUM_VERSION" = any ] || [ "$have" = "$CHROMIUM_VERSION" ]; }; then
    :
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    spec=(chromium)
    if [ "$CHROMIUM_VERSION" != any ]; then
        spec=("chromium=$CHROMIUM_VERSION" "chromium-common=$CHROMIUM_VERSION")
    fi
    log "installing ${spec[*]} with apt-get"
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades "${spec[@]}" >/dev/null
    }
    if ! apt_install; then
        apt-get update -qq
        if ! apt_install; then
            # Debian's security archive keeps only the newest chromium, so a
            # pin goes stale within weeks: fall back to the current package
            # rather than failing CI (the tests need a recent headless browser,
            # not one exact build).
            log "WARNING: Debian no longer ships chromium ${CHROMIUM_VERSION}; installing its current chromium (update CHROMIUM_VERSION in scripts/test-typescript.sh)"
            spec=(chromium chromium-common)
            if ! apt_install; then
                log "cannot install chromium with apt-get; install it by hand or set CHROMIUM_PATH"
                exit 1
            fi
        fi
    fi
elif [ -x /usr/bin/chromium ]; then
    log "WARNING: chromium ${have:-?} is installed, not the pinned ${CHROMIUM_VERSION} (not root: cannot change it); using it"
else
    log "chromium is missing: run this script as root (it installs Debian's chromium ${CHROMIUM_VERSION}) or set CHROMIUM_PATH"
    exit 1
fi
export CHROMIUM_PATH
log "browser: $("$CHROMIUM_PATH" --version 2>/dev/null | head -n 1)"

# --- walcast binary -----------------------------------------------------------
if [ -z "${WALCAST_BIN:-}" ]; then
    locked=()
    if [ -f "$ROOT/Cargo.lock" ]; then
        locked=(--locked)
    fi
    # Same features as scripts/test.sh, so the two share build artifacts.
    (cd "$ROOT" && cargo build ${locked[@]+"${locked[@]}"} --bin walcast --features walcast/failpoints)
    target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
    case "$target_dir" in /*) ;; *) target_dir="$ROOT/$target_dir" ;; esac
    export WALCAST_BIN="$target_dir/debug/walcast"
fi

# --- Node packages, build -----------------------------------------------------
cd "$CLIENT"
npm ci --no-audit --no-fund
npm run --silent check:generated
npm run --silent build:all
rm -rf test-output

# --- tests ----------------------------------------------------------------------
failed=()
run() {
    local name="$1"
    shift
    log "== $name =="
    if ! "$@"; then
        failed+=("$name")
    fi
}
run unit node --test --test-force-exit --test-reporter=spec build/test/unit/*.test.js
run integration node --test --test-force-exit --test-reporter=spec --test-concurrency=1 build/test/integration/*.test.js
run e2e node --test --test-force-exit --test-reporter=spec --test-concurrency=1 build/test/e2e/*.test.js

if [ "${#failed[@]}" -gt 0 ]; then
    log "FAILED: ${failed[*]}"
    exit 1
fi
log "all TypeScript tests passed (screenshots in clients/typescript/test-output/e2e/)"
