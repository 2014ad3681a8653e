#!/usr/bin/env bash
# Side-by-side keep-alive HTTP benchmark: ktern's `http` route vs nginx
# (Debian's package, http module, `proxy_pass` to a keep-alive upstream) and
# HAProxy (Debian's, mode http, `http-reuse always`), each
# pinned to CPU 1 and loaded from CPU 0 by the same client (ktern-load http,
# TLS 1.3, X25519, `--conns` keep-alive connections). Both proxy to the same
# HTTP/1.1 backend (ktern-load backend --kind http), 1 KiB response bodies.
# Reports server CPU per request and peak requests/s (closed loop), and p99
# latency in an open-loop run at half of nginx's peak rate, with ratios; the
# floor (nginx without TLS) both ways. The backend runs on CPU 0 too, or on
# CPU 2 from 4 CPUs on (bench/common.sh).
# Every load is bounded in count and time. Usage:
#   bench/compare-http.sh [--seconds 10] [--conns 50] [--json FILE]
# KTERN_RUNTIME adds lines to ktern's [runtime] section (for example
# 'uring_taskrun = "off"', to compare io_uring setups).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=10 conns=50 json=
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --json) json=$(realpath "$2"); shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs (server on 1, client on 0)" >&2; exit 1; }

dpkg-query -W -f='${Status}' nginx 2>/dev/null | grep -q "ok installed" ||
  apt-get install -y -qq --no-install-recommends nginx >/dev/null
bench_name=bench-http
. bench/common.sh

body=1024
backend=127.0.0.1:19003 ktern_addr=127.0.0.1:19445 nginx_addr=127.0.0.1:19545 haproxy_addr=127.0.0.1:19645
floor_addr=127.0.0.1:19546
taskset -c "$backend_cpu" "$bin/ktern-load" backend --listen "$backend" --kind http --body-bytes $body --seconds 3600 & pids+=($!)

ktern_http_conf "$ktern_addr" "$backend" 64 > "$work/ktern.toml"
# pool_size = 64 matches nginx's `keepalive 64` below. With ktern's default (32), below the
# 50 client connections, one 5 s closed-loop run here opened and closed about 430 backend
# connections/s and peaked about 10% lower.
# No [access_log] section: ktern writes no access log, as nginx with access_log off.
RUST_LOG=warn taskset -c 1 "$bin/ktern" run -c "$work/ktern.toml" > "$work/ktern.out" 2> "$work/ktern.log" & pids+=($!)
ktern_pid=$!

# nginx's server also listens without TLS on $floor_addr: the floor, the same
# proxied request over plain TCP (the exchange's TCP work and nginx's HTTP
# work, which no TLS terminator can shed).
nginx_conf "$nginx_addr ssl; listen $floor_addr" "$backend" > "$work/nginx.conf"
taskset -c 1 nginx -p "$work" -c "$work/nginx.conf"

# HAProxy keeps up to 64 idle backend connections too, and shares them
# between client connections (`http-reuse always`, as ktern's pool and
# nginx's upstream keepalive do).
{ haproxy_conf http
  cat <<CONF
frontend fe
  bind $haproxy_addr ssl crt $work/haproxy.pem
  default_backend be
backend be
  http-reuse always
  server s1 $backend pool-max-conn 64
CONF
} > "$work/haproxy.cfg"
haproxy_start

wait_listening "$ktern_addr" "$nginx_addr" "$haproxy_addr" "$floor_addr" "$backend"
nginx_master=$(cat "$work/nginx.pid")
nginx_pids() { echo "$nginx_master $(pgrep -P "$nginx_master" | tr '\n' ' ')"; }

hz=$(getconf CLK_TCK)
field() { sed -nE "s/.*(^| )$1=([0-9.]+).*/\2/p" <<<"$2"; }
# The client's own bound is --seconds (plus 5 s read timeouts); this is a backstop.
load() { timeout -k 5 $((seconds + 60)) taskset -c 0 "$bin/ktern-load" http --conns "$conns" --body-bytes $body "$@"; }

declare -A res
measure() { # name addr label rate(0: closed loop) pids...
  local name=$1 addr=$2 label=$3 rate=$4; shift 4
  local u0 s0 u1 s1 out n e args=()
  [ "$rate" = 0 ] || args=(--rate "$rate")
  [ "$name" != floor ] || args+=(--plain)
  read -r u0 s0 <<<"$(ticks "$@")"
  out=$(load --addr "$addr" --seconds "$seconds" "${args[@]}")
  read -r u1 s1 <<<"$(ticks "$@")"
  n=$(field requests "$out") e=$(field errors "$out")
  res[$name.$label.rps]=$(field rps "$out")
  res[$name.$label.p99]=$(field p99_us "$out")
  per() { python3 -c "print(f'{($1)/$hz/max($n,1)*1e6:.2f}')"; }
  res[$name.$label.cpu]=$(per "$u1+$s1-$u0-$s0")
  res[$name.$label.user]=$(per "$u1-$u0")
  res[$name.$label.sys]=$(per "$s1-$s0")
  echo "$name $label: $out; server cpu $(( (u1+s1-u0-s0) * 1000 / hz )) ms -> ${res[$name.$label.cpu]} us/request" \
    "(user ${res[$name.$label.user]}, kernel ${res[$name.$label.sys]})"
  [ "$e" = 0 ] || echo "  WARNING: $name $label had $e errors (see above)"
}

echo "ktern: $(grep -m1 -o 'kTLS[^;]*' "$work/ktern.log" || echo 'see log')"
# Warm-up (page faults, first allocations, backend pools), then the closed-loop peak.
load --addr "$ktern_addr" --seconds 1 > /dev/null
measure ktern "$ktern_addr" peak 0 "$ktern_pid"
load --addr "$nginx_addr" --seconds 1 > /dev/null
# shellcheck disable=SC2046
measure nginx "$nginx_addr" peak 0 $(nginx_pids)
load --addr "$haproxy_addr" --seconds 1 > /dev/null
measure haproxy "$haproxy_addr" peak 0 "$haproxy_pid"
load --addr "$floor_addr" --seconds 1 --plain > /dev/null
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

[ -s "$work/nginx-error.log" ] && { echo "nginx error log:"; tail -5 "$work/nginx-error.log"; }
sed 's/\x1b\[[0-9;]*m//g' "$work/ktern.log" | grep -E 'WARN|ERROR' | grep -v 'kTLS unavailable' | tail -5 |
  sed 's/^/ktern log: /' || true

res_json "$json"
args=()
for m in peak.cpu peak.user peak.sys peak.rps half.p99 half.cpu; do
  args+=("${res[ktern.$m]}" "${res[nginx.$m]}" "${res[haproxy.$m]}")
done
python3 - "$half" "${res[floor.peak.cpu]}" "${res[floor.peak.user]}" "${res[floor.peak.sys]}" "${res[floor.half.p99]}" "${args[@]}" <<'PY'
import sys
half = sys.argv[1]
floor = list(map(float, sys.argv[2:6]))
v = list(map(float, sys.argv[6:]))
rows = [v[i:i + 3] for i in range(0, len(v), 3)]
labels = [("server CPU per request, peak (us)", "<= 0.75", 2), ("  of which user (us)", "<= 0.5", 2),
          ("  of which kernel (us)", "<= 0.9", 2), ("peak requests/s (closed loop)", "", 0),
          (f"p99 at {half}/s, half nginx peak (us)", "ktern <= nginx", 0),
          (f"server CPU per request at {half}/s (us)", "(info)", 2)]
r = lambda a, b: a / b if b else float("nan")
print(f"\n{'metric':44} {'ktern':>10} {'nginx':>10} {'haproxy':>10} {'ktern/nginx':>12} {'ktern/haproxy':>14}  target (ktern/nginx)")
for (name, t, d), (k, n, h) in zip(labels, rows):
    print(f"{name:44} {k:10.{d}f} {n:10.{d}f} {h:10.{d}f} {r(k, n):12.2f} {r(k, h):14.2f}  {t}")
print(f"\nfloor (nginx proxying the same requests over plain TCP): {floor[0]:.2f} us per request"
      f" (user {floor[1]:.2f}, kernel {floor[2]:.2f}); ktern {r(rows[0][0], floor[0]):.2f}x the floor"
      f" (kernel {r(rows[2][0], floor[2]):.2f}x), nginx {r(rows[0][1], floor[0]):.2f}x (kernel {r(rows[2][1], floor[2]):.2f}x)")
print(f"floor's p99 at {half}/s: {floor[3]:.0f} us ({r(floor[3], rows[4][1]):.2f}x nginx's"
      + ("; above it, so this run's p99 measures the load generator more than the servers)" if floor[3] > rows[4][1] else ")"))
PY
