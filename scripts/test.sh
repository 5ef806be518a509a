#!/usr/bin/env bash
# THE test command: installs pinned test tools (nats-server, PostgreSQL) into
# .tools/, then runs every test (lib unit tests + tests/main.rs). Each
# integration test starts its own throwaway Postgres and nats-server on random
# ports, so nothing already running on the machine is touched.
# Extra arguments go to `cargo test`, e.g. `scripts/test.sh --test main harness`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install-deps.sh
# shellcheck disable=SC1091
source .tools/env

locked=()
if [ -f Cargo.lock ]; then
    locked=(--locked)
fi
exec cargo test ${locked[@]+"${locked[@]}"} --workspace --features walcast/failpoints "$@"
