#!/usr/bin/env bash
# Replays fuzz/regressions/<target>-* (past findings), then runs every fuzz
# target for SECONDS each (default 600), one after another, seeded with
# fuzz/seeds/<target>; new findings land in fuzz/artifacts/<target>/.
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
cargo +nightly fuzz build -s none || exit 1
bin=target/x86_64-unknown-linux-gnu/release
status=0
for t in decode assemble timestamp; do
  for f in regressions/"$t"-*; do
    [ -e "$f" ] || continue
    if ! "$bin/$t" "$f" >/dev/null 2>&1; then
      echo "== $t: regression $f FAILS"; status=1
    fi
  done
done
for t in decode assemble timestamp; do
  mkdir -p "corpus/$t" "artifacts/$t"
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  echo "== $t: ${secs}s"
  "$bin/$t" -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=512 \
    -timeout=10 -print_final_stats=1 -artifact_prefix="artifacts/$t/" "corpus/$t" "${seeds[@]}" 2>&1 |
    grep -v "^#[0-9]*.*\(NEW\|REDUCE\|pulse\)"
  rc=${PIPESTATUS[0]}
  echo "== $t: exit $rc"
  [ "$rc" = 0 ] || status=1
done
exit $status
