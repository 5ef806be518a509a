#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 600), one after another,
# seeded with fuzz/seeds/<target>; findings land in fuzz/artifacts/<target>/.
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
cargo +nightly fuzz build -s none
for t in decode assemble timestamp; do
  mkdir -p "corpus/$t" "artifacts/$t"
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  echo "== $t: ${secs}s"
  ./target/x86_64-unknown-linux-gnu/release/$t -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=512 \
    -timeout=10 -print_final_stats=1 -artifact_prefix="artifacts/$t/" "corpus/$t" "${seeds[@]}" 2>&1 | grep -v "^#[0-9]*.*\(NEW\|REDUCE\|pulse\)"
  echo "== $t: exit ${PIPESTATUS[0]}"
done
