#!/usr/bin/env bash
# Runs ktern's kTLS suite (tests/ktls_vm.rs), the HTTP suite (tests/http.rs,
# over kTLS there) and the live-operations suite's reload and drain tests
# (tests/live.rs), and the HTTP/2 and certificate suites (tests/h2.rs,
# tests/certs.rs: SNI store, fleet tickets; tests/proxy_protocol.rs) inside
# qemu on each kTLS kernel (Debian 12's 6.1: no rekey;
# trixie-backports' 6.18: rekey), via scripts/ktls-vm.sh: one boot per kernel.
# Usage: scripts/vm-tests.sh [6.1] [6.18] [-- TEST-ARGS]
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
. scripts/lib.sh
ktern_bin=$(ktern_binary)
# Suite and test filters (empty: every test). The live suite's reload and
# drain tests run here so that offloaded connections are shown to survive a
# reload and to be drained with close_notify; l4's idle-memory test (on the
# release build, below) holds offloaded connections to their 4 KiB budget.
# KTERN_VM_SUITES narrows the run to some suites (a quicker loop while
# working on one; CI runs them all).
read -r -a suites <<< "${KTERN_VM_SUITES:-ktls_vm http live l4 h2 certs proxy_protocol}"
# The offloaded memory budgets run against the release build only (below):
# what operators run, and in the guest each budget takes one to two minutes
# (1500 handshakes under TCG). The host checks both builds.
declare -A filters=([live]="reload_under_load drain_ resumption metrics_ old_keep_alive" [l4]="passthrough upstream_tls tcp_connection_moves a_record_cut_by an_empty_record tls12_records a_client_that_closes_with a_fin_alone_goes_on" [h2]="--skip idle_http2_connections_stay_within_their_memory_budget")
test_bins=()
for t in "${suites[@]}"; do
  # Compile errors reach the terminal (stderr); a failed build is said so.
  bin=$(cargo test --quiet --no-run --test "$t" --message-format=json | artifacts "$t") ||
    { echo "vm-tests: building test binary $t failed" >&2; exit 1; }
  [ -x "$bin" ] || { echo "vm-tests: test binary $t not found" >&2; exit 1; }
  test_bins+=("$bin")
done

# The offloaded memory budgets again against the release build (as
# scripts/test.sh does on the host): an idle connection's size depends on
# the build's future layouts.
# Built only when a suite that has them runs (KTERN_VM_SUITES may leave
# both out): a fat-LTO release build takes minutes.
declare -A release_filters=([l4]="idle_connections_stay" [h2]="idle_http2")
base_files=(--file "$ktern_bin:$ktern_bin")
release_wanted=
for t in "${suites[@]}"; do
  [ -z "${release_filters[$t]:-}" ] || release_wanted=1
done
if [ -n "$release_wanted" ]; then
  release_bin=$(ktern_binary --release)
  base_files+=(--file "$release_bin:$release_bin")
fi

# One boot per kernel runs every suite (scripts/vm-suites.sh in the guest).
# The kernels boot side by side: each guest is one TCG vCPU, one host
# thread, so on a 2-core host two guests take the time of the slower one
# instead of the sum (CI, 2026-12-05: 950 s and 757 s one after the other).
# Each kernel's output goes to its own file and is printed whole, in order,
# when that guest is done. The kernel caches are prepared one at a time
# first: a cold cache downloads with apt, which takes a lock.
for k in "${kernels[@]}"; do
  "$here/ktls-vm.sh" --kernel "$k" --prepare-only
done
out=$(mktemp -d)
pids=()
# An interrupted run takes its guests with it.
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$out"' EXIT
for k in "${kernels[@]}"; do
  files=("${base_files[@]}")
  args=()
  for i in "${!suites[@]}"; do
    t=${suites[$i]}
    bin=${test_bins[$i]}
    # The tests spawn ktern by its absolute build path: same paths inside.
    files+=(--file "$bin:$bin")
    [ ${#args[@]} -eq 0 ] || args+=("::")
    # shellcheck disable=SC2206 # filters are words
    args+=("$bin" ${filters[$t]:-} "$@")
  done
  for i in "${!suites[@]}"; do
    t=${suites[$i]}
    [ -n "${release_filters[$t]:-}" ] || continue
    # shellcheck disable=SC2206 # filters are words
    args+=("::" "KTERN_TEST_BIN=$release_bin" "${test_bins[$i]}" ${release_filters[$t]})
  done
  "$here/ktls-vm.sh" --kernel "$k" --mem 3072 --timeout 2400 "${files[@]}" \
    -- "$here/vm-suites.sh" "${args[@]}" >"$out/$k.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!kernels[@]}"; do
  k=${kernels[$i]}
  rc=0
  wait "${pids[$i]}" || rc=$?
  echo "=== kTLS suites on kernel $k ==="
  cat "$out/$k.log"
  if [ $rc -eq 0 ]; then
    echo "=== kernel $k: PASS ==="
  else
    echo "=== kernel $k: FAIL (exit $rc) ===" >&2
    status=1
  fi
done
exit $status
