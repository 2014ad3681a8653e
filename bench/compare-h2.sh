#!/usr/bin/env bash
# Side-by-side HTTP/2 benchmark: ktern's `http` route vs nginx (`listen ...
# ssl http2`, proxy_pass to a keep-alive upstream) and HAProxy (`alpn h2`,
# `http-reuse always`), each pinned to CPU 1 and
# loaded from CPU 0 by the same client: h2load -c 50 -m 10 (TLS 1.3, ALPN
# h2), 1 KiB responses from the same HTTP/1.1 backend (ktern-load backend).
# Reports server CPU per request and peak requests/s (closed loop), p99 in
# an open-loop run at half of nginx's peak (h2load --rps per client), the
# floor both ways (nginx serving cleartext h2c: the same proxying without
# TLS), and the memory one idle HTTP/2 connection costs each server. The
# backend shares CPU 0 with h2load, or has CPU 2 from 4 CPUs on. Bounded in count
# and time. Usage: bench/compare-h2.sh [--seconds 10] [--conns 50] [--idle 500] [--json FILE]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=10 conns=50 idle=500 json=
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --idle) idle=$2; shift 2 ;;
    --json) json=$(realpath "$2"); shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs (server on 1, client on 0)" >&2; exit 1; }
for p in nginx nghttp2-client; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
    apt-get install -y -qq --no-install-recommends "$p" >/dev/null
done
python3 -c 'import h2' 2>/dev/null || python3 -m pip install -q h2
bench_name=bench-h2
. bench/common.sh

body=1024
# 50 connections x 10 streams = 500 requests in flight: both servers keep
# up to 512 idle backend connections (nginx's `keepalive`), or each would
# open and close hundreds of backend connections per second (with 64, about
# 20% of ktern's CPU went to connect()'s port search past TIME_WAITs).
pool=512
backend=127.0.0.1:19013 ktern_addr=127.0.0.1:19455 nginx_addr=127.0.0.1:19555 haproxy_addr=127.0.0.1:19655
floor_addr=127.0.0.1:19556
taskset -c "$backend_cpu" "$bin/ktern-load" backend --listen "$backend" --kind http --body-bytes $body --seconds 3600 & pids+=($!)
ktern_http_conf "$ktern_addr" "$backend" "$pool" > "$work/ktern.toml"
RUST_LOG=warn taskset -c 1 "$bin/ktern" run -c "$work/ktern.toml" > "$work/ktern.out" 2> "$work/ktern.log" & pids+=($!)
ktern_pid=$!
# nginx also serves cleartext HTTP/2 (h2c, prior knowledge) on $floor_addr:
# the floor, the same streams and proxying without TLS.
nginx_conf "$nginx_addr ssl http2; listen $floor_addr http2" "$backend" "$pool" > "$work/nginx.conf"
taskset -c 1 nginx -p "$work" -c "$work/nginx.conf"
{ haproxy_conf http
  cat <<CONF
frontend fe
  bind $haproxy_addr ssl crt $work/haproxy.pem alpn h2,http/1.1
  default_backend be
backend be
  http-reuse always
  server s1 $backend pool-max-conn $pool
CONF
} > "$work/haproxy.cfg"
haproxy_start
wait_listening "$ktern_addr" "$nginx_addr" "$haproxy_addr" "$floor_addr" "$backend"
nginx_master=$(cat "$work/nginx.pid")
nginx_pids() { echo "$nginx_master $(pgrep -P "$nginx_master" | tr '\n' ' ')"; }

hz=$(getconf CLK_TCK)
declare -A res
measure() { # name addr label rate(0: closed loop) pids...
  local name=$1 addr=$2 label=$3 rate=$4; shift 4
  local u0 s0 u1 s1 out n args=() scheme=https
  [ "$rate" = 0 ] || args=(--rps "$(python3 -c "print(max(1, round($rate / $conns)))")")
  [ "$name" != floor ] || scheme=http
  read -r u0 s0 <<<"$(ticks "$@")"
  out=$(timeout -k 5 $((seconds + 60)) taskset -c 0 h2load -c "$conns" -m 10 -D "$seconds" --warm-up-time=1 \
    --log-file="$work/$name.$label.log" "${args[@]}" "$scheme://${addr}/" 2>&1)
  read -r u1 s1 <<<"$(ticks "$@")"
  n=$(sed -nE 's/^requests: .* ([0-9]+) succeeded.*/\1/p' <<<"$out")
  res[$name.$label.rps]=$(python3 -c "print(f'{$n/$seconds:.0f}')")
  res[$name.$label.p99]=$(python3 -c "
import sys
d = sorted(int(l.split()[2]) for l in open('$work/$name.$label.log') if l.strip())
print(d[int(len(d) * 0.99)] if d else 0)")
  per() { python3 -c "print(f'{($1)/$hz/max($n,1)*1e6:.2f}')"; }
  res[$name.$label.cpu]=$(per "$u1+$s1-$u0-$s0")
  res[$name.$label.user]=$(per "$u1-$u0")
  res[$name.$label.sys]=$(per "$s1-$s0")
  echo "$name $label: $(grep -E '^requests:' <<<"$out"); ${res[$name.$label.rps]} req/s; p99 ${res[$name.$label.p99]} us;" \
    "server ${res[$name.$label.cpu]} us/request (user ${res[$name.$label.user]}, kernel ${res[$name.$label.sys]})"
  grep -q " 0 failed, 0 errored" <<<"$out" || echo "  WARNING: $name $label had failures: $out"
}

# Memory per idle HTTP/2 connection (after one request): RSS growth over
# $idle held connections, a first batch warming each server's allocator.
# Measured first, on fresh processes: after the load runs both allocators
# hold freed memory that new connections reuse without growing.
idle_cost() { # addr pid
  local before after
  python3 bench/h2-hold.py "${1%:*}" "${1#*:}" 100 1 >/dev/null
  sleep 0.5
  before=$(rss "$2")
  python3 bench/h2-hold.py "${1%:*}" "${1#*:}" "$idle" 3 > "$work/hold.out" &
  local holder=$!
  for _ in $(seq 1 100); do grep -q held "$work/hold.out" 2>/dev/null && break; sleep 0.1; done
  after=$(rss "$2")
  wait "$holder"
  python3 -c "print(f'{($after - $before) / $idle:.0f}')"
}
res[ktern.idle]=$(idle_cost "$ktern_addr" "$ktern_pid")
nginx_worker=$(pgrep -P "$nginx_master" | head -1)
res[nginx.idle]=$(idle_cost "$nginx_addr" "$nginx_worker")
res[haproxy.idle]=$(idle_cost "$haproxy_addr" "$haproxy_pid")

echo "ktern: $(grep -m1 -o 'kTLS[^;]*' "$work/ktern.log" || echo 'kTLS in use')"
measure ktern "$ktern_addr" peak 0 "$ktern_pid"
# shellcheck disable=SC2046
measure nginx "$nginx_addr" peak 0 $(nginx_pids)
measure haproxy "$haproxy_addr" peak 0 "$haproxy_pid"
# shellcheck disable=SC2046
measure floor "$floor_addr" peak 0 $(nginx_pids)
half=$(python3 -c "print(f'{${res[nginx.peak.rps]}/2:.0f}')")
echo "open loop at half of nginx's peak: $half requests/s"
measure ktern "$ktern_addr" half "$half" "$ktern_pid"
# shellcheck disable=SC2046
measure nginx "$nginx_addr" half "$half" $(nginx_pids)
measure haproxy "$haproxy_addr" half "$half" "$haproxy_pid"
# The floor's tail at the same rate: less work than any server above, so a
# p99 of its above theirs is the load generator's (bench/README.md, "p99").
# shellcheck disable=SC2046
measure floor "$floor_addr" half "$half" $(nginx_pids)
res[half.rate]=$half

res_json "$json"
args=()
for m in peak.cpu peak.user peak.sys peak.rps half.p99 half.cpu idle; do
  args+=("${res[ktern.$m]}" "${res[nginx.$m]}" "${res[haproxy.$m]}")
done
python3 - "$half" "${res[floor.peak.cpu]}" "${res[floor.half.p99]}" "${args[@]}" <<'PY'
import sys
half = sys.argv[1]
floor = list(map(float, sys.argv[2:4]))
v = list(map(float, sys.argv[4:]))
rows = [v[i:i + 3] for i in range(0, len(v), 3)]
labels = [("server CPU per request, peak (us)", "<= 0.8", 2), ("  of which user (us)", "(info)", 2),
          ("  of which kernel (us)", "(info)", 2), ("peak requests/s (closed loop)", "", 0),
          (f"p99 at {half}/s, half nginx peak (us)", "ktern <= nginx", 0),
          (f"server CPU per request at {half}/s (us)", "(info)", 2),
          ("memory per idle h2 connection (bytes)", "ktern <= nginx", 0)]
r = lambda a, b: a / b if b else float("nan")
print(f"\n{'metric':44} {'ktern':>10} {'nginx':>10} {'haproxy':>10} {'ktern/nginx':>12} {'ktern/haproxy':>14}  target (ktern/nginx)")
for (name, t, d), (k, n, h) in zip(labels, rows):
    print(f"{name:44} {k:10.{d}f} {n:10.{d}f} {h:10.{d}f} {r(k, n):12.2f} {r(k, h):14.2f}  {t}")
print(f"\nfloor (nginx proxying the same streams over cleartext h2c): {floor[0]:.2f} us per request at the peak;"
      f" ktern {r(rows[0][0], floor[0]):.2f}x the floor, nginx {r(rows[0][1], floor[0]):.2f}x")
print(f"floor's p99 at {half}/s: {floor[1]:.0f} us ({r(floor[1], rows[4][1]):.2f}x nginx's"
      + ("; above it, so this run's p99 measures the load generator more than the servers)" if floor[1] > rows[4][1] else ")"))
PY
