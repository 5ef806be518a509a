#!/usr/bin/env bash
# THE benchmark command (issue 7, SPEC §6): installs the pinned tools like
# scripts/test.sh, builds walcast in release mode, then runs bench/run.py, which
# starts its own PostgreSQL and nats-server on random ports, runs every
# scenario and writes bench/results/latest.json and bench/results/latest.md.
#
#   scripts/bench.sh                 # default scenarios, 2 interleaved rounds per drain (~15 min on 2 cores)
#   scripts/bench.sh --quick         # smoke test of the harness (~3 min)
#   scripts/bench.sh --catchup       # also the catch-up scenario (issue 9)
#   scripts/bench.sh --scenarios ws_fanout,gateway_fanout --fanout-clients 1000,5000
#                                    # live clients on NATS WebSocket / the Socket.IO gateway (Node >= 20, npm)
#   scripts/bench.sh --help          # every option (sizes, --scale, --repeat, --scenarios, --profile)
#
# Method, results and what limits each figure: docs/BENCHMARKS.md.
#
# Set WALCAST_BIN to benchmark an existing binary instead of building one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! deps=$(bash scripts/install-deps.sh 2>&1); then echo "$deps" >&2; exit 1; fi
# shellcheck disable=SC1091
source .tools/env

if [ -z "${WALCAST_BIN:-}" ]; then
    locked=()
    [ -f Cargo.lock ] && locked=(--locked)
    echo "building walcast (release)..." >&2
    cargo build --quiet ${locked[@]+"${locked[@]}"} --release -p walcast
    # The state_load scenario's loader and the latency scenario's receiver (the Rust client).
    cargo build --quiet ${locked[@]+"${locked[@]}"} --release -p walcast-client --example state_load --example latency_probe
    WALCAST_BIN="$PWD/target/release/walcast"
fi
# The state_load scenario's TypeScript loader (the client, built).
if command -v npm >/dev/null 2>&1; then
    echo "building the TypeScript client..." >&2
    (cd clients/typescript && npm ci --no-audit --no-fund --silent && npm run --silent build) >&2
fi

exec python3 bench/run.py --walcast-bin "$WALCAST_BIN" "$@"
