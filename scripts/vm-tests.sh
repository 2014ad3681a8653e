#!/usr/bin/env bash
# Runs ktern's kTLS suite (tests/ktls_vm.rs) and the HTTP suite
# (tests/http.rs, over kTLS there) inside qemu on each kTLS kernel
# (Debian 12's 6.1: no rekey; trixie-backports' 6.18: rekey), via
# scripts/ktls-vm.sh. Usage: scripts/vm-tests.sh [6.1] [6.18] [-- TEST-ARGS]
# Exit status: 0 only if every kernel's run passed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
cd "$repo"

kernels=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; break ;;
    *) kernels+=("$1"); shift ;;
  esac
done
[ ${#kernels[@]} -gt 0 ] || kernels=(6.1 6.18)

# Build the ktern binary and the test binary; find both paths from cargo
# (they move with CARGO_TARGET_DIR).
artifacts() {
  python3 -c 'import json,sys
want = sys.argv[1]
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == want:
        print(m["executable"])' "$1"
}
ktern_bin=$(cargo build --quiet --bin ktern --message-format=json | artifacts ktern)
[ -x "$ktern_bin" ] || { echo "vm-tests: ktern binary not found" >&2; exit 1; }
suites=(ktls_vm http)
test_bins=()
for t in "${suites[@]}"; do
  bin=$(cargo test --quiet --no-run --test "$t" --message-format=json 2>/dev/null | artifacts "$t")
  [ -x "$bin" ] || { echo "vm-tests: test binary $t not found" >&2; exit 1; }
  test_bins+=("$bin")
done

status=0
for k in "${kernels[@]}"; do
  for test_bin in "${test_bins[@]}"; do
    name=$(basename "$test_bin")
    echo "=== $name on kernel $k ==="
    # The test spawns ktern by its absolute build path: copy it to the same path.
    if "$here/ktls-vm.sh" --kernel "$k" --mem 1024 --timeout 1800 \
        --file "$ktern_bin:$ktern_bin" -- "$test_bin" --test-threads=1 "$@"; then
      echo "=== $name on kernel $k: PASS ==="
    else
      rc=$?
      echo "=== $name on kernel $k: FAIL (exit $rc) ===" >&2
      status=1
    fi
  done
done
exit $status
