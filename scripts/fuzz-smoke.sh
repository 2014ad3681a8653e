#!/usr/bin/env bash
# Short smoke run of every fuzz target (cargo fuzz, libFuzzer). A crash
# fails the run and leaves the input under fuzz/artifacts/<target>/.
# Usage: scripts/fuzz-smoke.sh [SECONDS_PER_TARGET]   (default 20)
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-20}
command -v cargo-fuzz >/dev/null || cargo install --locked --quiet cargo-fuzz
# cargo fuzz passes -Z flags; RUSTC_BOOTSTRAP lets the stable toolchain take
# them. No sanitizer (-s none): coverage-guided, and panics still abort.
export RUSTC_BOOTSTRAP=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Listed first: a failing `cargo fuzz list` inside the loop's words would
# run no target and pass.
targets=$(cargo fuzz list)
[ -n "$targets" ] || { echo "fuzz-smoke: no fuzz targets listed" >&2; exit 1; }
for target in $targets; do
  echo "=== fuzz $target for ${secs}s ==="
  # A target's dictionary (fuzz/dicts/TARGET.dict), if it has one.
  dict=()
  [ -f "dicts/$target.dict" ] && dict=(-dict="$PWD/dicts/$target.dict")
  if ! cargo fuzz run -s none "$target" -- -max_total_time="$secs" "${dict[@]}" >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz target $target failed (crash inputs, if any, are in fuzz/artifacts/$target/)" >&2
    exit 1
  fi
  grep -E '^Done' "$log" || true
done
