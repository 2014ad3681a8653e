#!/usr/bin/env bash
# Requests/s and p99 latency during continuous reloads (one per second, by
# SIGHUP from the shell's builtin kill, so no process start-up competes with
# the client) against the same load with no
# reloads, side by side in one run: ktern's shard pinned to CPU 1
# (`runtime.cpus`; its control and admin threads, which build each new
# generation, are not pinned, as in production), the client (ktern-load
# http, open loop at a fixed rate, so latency includes any stall) and the
# backend on CPU 0 (CPU 2 from 4 CPUs on: bench/common.sh). Rounds
# alternate baseline and reloads, so drift
# of the shared machine hits both. Bounded in count and time. Usage:
#   bench/reload.sh [--seconds 10] [--rate 4000] [--conns 20] [--rounds 2]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=10 rate=4000 conns=20 rounds=2
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs (server on 1, client on 0)" >&2; exit 1; }
bench_name=reload
# shellcheck source=bench/common.sh
. bench/common.sh

backend=127.0.0.1:19013 addr=127.0.0.1:19455 admin=127.0.0.1:19456
taskset -c "$backend_cpu" "$bin/ktern-load" backend --listen "$backend" --kind http --body-bytes 1024 --seconds 3600 & pids+=($!)
{
  KTERN_RUNTIME='log_format = "text"' ktern_http_conf "$addr" "$backend" 64
  printf '[admin]\naddress = "%s"\n' "$admin"
} > "$work/ktern.toml"
RUST_LOG=warn "$bin/ktern" run -c "$work/ktern.toml" > "$work/ktern.out" 2> "$work/ktern.log" & pids+=($!)
ktern_pid=$!
for _ in $(seq 100); do grep -q '^admin ' "$work/ktern.out" 2>/dev/null && break; sleep 0.1; done

run() { # $1: label; with $2 = reload, one reload per second during the run
  local reloader=""
  if [ "${2:-}" = reload ]; then
    ( for _ in $(seq "$seconds"); do
        sleep 1
        kill -HUP "$ktern_pid"
      done ) &
    reloader=$!
  fi
  local out
  out=$(taskset -c 0 "$bin/ktern-load" http --addr "$addr" --conns "$conns" --seconds "$seconds" --rate "$rate")
  [ -z "$reloader" ] || wait "$reloader"
  echo "$1 $out"
}

gen() { "$bin/ktern" reload --admin "$admin" -c "$work/ktern.toml" | grep -o 'generation [0-9]*'; }
echo "# ktern-load http --conns $conns --rate $rate --seconds $seconds, ${rounds} rounds; start: $(gen)"
results=()
for r in $(seq "$rounds"); do
  results+=("$(run "round$r baseline")")
  results+=("$(run "round$r reloads" reload)")
done
printf '%s\n' "${results[@]}"
echo "# end: $(gen); reload failures: $(grep -c 'reload refused' "$work/ktern.log" || true)"
# What one reload costs ktern (control thread, off the shards).
exec 3<>/dev/tcp/${admin%:*}/${admin#*:}
printf 'GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n' >&3
grep -E '^ktern_reload_duration_seconds_(sum|count) ' <&3 | tr '\n' ' ' | awk '{ printf "# reload duration: mean %.2f ms over %d reloads\n", 1000 * $2 / $4, $4 }'
exec 3>&-
# p99 ratio per round (reloads / baseline), requests/s ratio, and the
# noise floor: the spread of p99 between the baseline rounds themselves.
printf '%s\n' "${results[@]}" | awk '
  { for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    if ($2 == "baseline") {
      b99 = v["p99_us"]; brps = v["rps"]; berr = v["errors"]
      if (lo == "" || b99 < lo) lo = b99; if (b99 > hi) hi = b99
    } else {
      r = v["p99_us"] / b99; ratios[++n] = r
      printf "%s: p99 %d us vs %d us baseline = %.2fx; rps %.0f vs %.0f; errors %d / %d\n",
             $1, v["p99_us"], b99, r, v["rps"], brps, v["errors"], berr
    } }
  END {
    for (i = 2; i <= n; i++) { x = ratios[i]; for (j = i - 1; j >= 1 && ratios[j] > x; j--) ratios[j + 1] = ratios[j]; ratios[j + 1] = x }
    printf "median p99 ratio (reloads / baseline): %.2fx over %d rounds\n", ratios[int((n + 1) / 2)], n
    printf "noise floor: baseline p99 spread %.2fx (max %d / min %d us)\n", hi / lo, hi, lo
  }'
