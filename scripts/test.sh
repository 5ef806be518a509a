#!/usr/bin/env bash
# THE test command (what CI runs): installs pinned test tools (nats-server,
# PostgreSQL) into .tools/, runs every test of the workspace (unit, property
# and integration tests; each integration test starts its own throwaway
# Postgres and nats-server on random ports, so nothing already running on the
# machine is touched), then the vendored pgwire-replication's unit tests,
# then the TypeScript client's unit, integration and
# browser tests (scripts/test-typescript.sh), then the version matrix: a core
# subset against PostgreSQL 18 and against nats-server 2.10 and 2.12.
# Extra arguments go to the main `cargo test`, e.g. `scripts/test.sh --test main pipeline`
# (the TypeScript tests and the matrix are skipped when arguments are given).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install-deps.sh
# shellcheck disable=SC1091
source .tools/env

locked=()
if [ -f Cargo.lock ]; then
    locked=(--locked)
fi
cargo test ${locked[@]+"${locked[@]}"} --workspace --features walcast/failpoints "$@"

if [ "$#" -eq 0 ]; then
    echo "== the vendored pgwire-replication's unit tests (its walcast patch: vendor/README.md)"
    cargo test --locked --manifest-path vendor/pgwire-replication/Cargo.toml --target-dir target/vendor --lib
    bash scripts/test-typescript.sh
    core=(pipeline catchup)
    echo "== version matrix: PostgreSQL 18 ($WALCAST_MATRIX_PG_BIN) with the default nats-server"
    WALCAST_PG_BIN="$WALCAST_MATRIX_PG_BIN" cargo test ${locked[@]+"${locked[@]}"} --features failpoints --test main -- "${core[@]}"
    IFS=: read -r -a matrix_nats <<<"$WALCAST_MATRIX_NATS_SERVERS"
    for nats in "${matrix_nats[@]}"; do
        echo "== version matrix: $("$nats" --version) ($nats) with the default PostgreSQL"
        WALCAST_NATS_SERVER="$nats" cargo test ${locked[@]+"${locked[@]}"} --features failpoints --test main -- "${core[@]}"
    done
fi
