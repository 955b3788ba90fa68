#!/usr/bin/env bash
# Runs every fuzz target for $1 seconds (default 60) from its committed seeds,
# and prints each target's executions. Fails on the first crash.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
cargo +nightly fuzz build
for t in core_ops pool parsers manager; do
  work=$(mktemp -d)
  cp corpus/"$t"/seed-* "$work"/
  log=$(mktemp)
  if ! cargo +nightly fuzz run "$t" "$work" -- -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "fuzz target $t crashed: its input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  runs=$(grep -m1 -oE 'Done [0-9]+ runs in [0-9]+ second' "$log" || echo "?")
  echo "fuzz $t: $runs(s)"
  rm -rf "$work" "$log"
done
