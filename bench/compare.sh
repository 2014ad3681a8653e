#!/usr/bin/env bash
# Side-by-side benchmark: ktern vs nginx (Debian's package, stream module)
# and HAProxy (Debian's, mode tcp), each pinned to CPU 1 and loaded from CPU
# 0 by the same client (ktern-load).
# Reports server CPU per full and per resumed TLS 1.3 handshake (ECDSA P-256,
# X25519), RSS per idle TLS connection, and L4 bulk transfer per CPU-second,
# with ratios.
# Every load is bounded in count and time. Usage:
#   bench/compare.sh [--seconds 10] [--idle 10000] [--downloads 8] [--json FILE]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=10 idle=10000 downloads=8 json=
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --idle) idle=$2; shift 2 ;;
    --downloads) downloads=$2; shift 2 ;;
    --json) json=$(realpath "$2"); shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs (server on 1, client on 0)" >&2; exit 1; }

for p in nginx libnginx-mod-stream openssl; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
    apt-get install -y -qq --no-install-recommends "$p" >/dev/null
done
. bench/common.sh

bytes=$((64 << 20))
taskset -c "$backend_cpu" "$bin/ktern-load" backend --listen 127.0.0.1:19001 --kind echo --seconds 3600 & pids+=($!)
taskset -c "$backend_cpu" "$bin/ktern-load" backend --listen 127.0.0.1:19002 --kind source --bytes $bytes --seconds 3600 & pids+=($!)

{ printf '[runtime]\ncpus = [1]\nktls = "auto"\n'
  ktern_tcp_listener 127.0.0.1:19443 127.0.0.1:19001
  ktern_tcp_listener 127.0.0.1:19444 127.0.0.1:19002
} > "$work/ktern.toml"
RUST_LOG=warn taskset -c 1 "$bin/ktern" run -c "$work/ktern.toml" > "$work/ktern.out" 2> "$work/ktern.log" & pids+=($!)
ktern_pid=$!

cat > "$work/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
worker_cpu_affinity 10;
worker_rlimit_nofile 200000;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 60000; }
stream {
  ssl_certificate $work/cert.pem;
  ssl_certificate_key $work/key.pem;
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_ecdh_curve X25519:prime256v1;
  server { listen 127.0.0.1:19543 ssl; proxy_pass 127.0.0.1:19001; }
  server { listen 127.0.0.1:19544 ssl; proxy_pass 127.0.0.1:19002; }
  # The floor: the same proxied connection and byte with no TLS at all.
  server { listen 127.0.0.1:19545; proxy_pass 127.0.0.1:19001; }
}
CONF
taskset -c 1 nginx -p "$work" -c "$work/nginx.conf"

{ haproxy_conf tcp
  cat <<CONF
frontend hs
  bind 127.0.0.1:19643 ssl crt $work/haproxy.pem
  default_backend echo
backend echo
  server e 127.0.0.1:19001
frontend l4
  bind 127.0.0.1:19644 ssl crt $work/haproxy.pem
  default_backend source
backend source
  server s 127.0.0.1:19002
CONF
} > "$work/haproxy.cfg"
haproxy_start
wait_listening 127.0.0.1:19443 127.0.0.1:19543 127.0.0.1:19643 127.0.0.1:19001 127.0.0.1:19002
nginx_pids() { pgrep -f "nginx: (master|worker) process.*" | tr '\n' ' '; }
nginx_workers() { pgrep -f "nginx: worker process" | tr '\n' ' '; }

# utime + stime (clock ticks) summed over the given pids, all threads.
cpu_ticks() { local u s; read -r u s <<<"$(ticks "$@")"; echo $((u + s)); }
rss_kib() { local t=0 p; for p in "$@"; do t=$((t + $(awk '/VmRSS/ {print $2}' "/proc/$p/status"))); done; echo $t; }
hz=$(getconf CLK_TCK)

declare -A res
run_server() { # name port_echo port_source pids...
  local name=$1 pe=$2 ps=$3; shift 3
  local pids_=("$@")
  # Warm up (page faults, first allocations).
  taskset -c 0 "$bin/ktern-load" handshakes --addr "127.0.0.1:$pe" --threads 2 --seconds 1 > /dev/null
  local t0 t1 out n
  t0=$(cpu_ticks "${pids_[@]}")
  out=$(taskset -c 0 "$bin/ktern-load" handshakes --addr "127.0.0.1:$pe" --threads 4 --seconds "$seconds")
  t1=$(cpu_ticks "${pids_[@]}")
  n=$(sed -E 's/.*handshakes=([0-9]+).*/\1/' <<<"$out")
  res[$name.hs]=$(python3 -c "print(f'{($t1-$t0)/$hz/$n*1e6:.1f}')")
  echo "$name handshakes: $out; server cpu $(( (t1-t0) * 1000 / hz )) ms -> ${res[$name.hs]} us/handshake"

  # Resumed TLS 1.3 handshakes (tickets; X25519, psk_dhe_ke as browsers
  # do): each client thread's first handshake is full, every other one
  # resumes (the output's resumed= says how many did).
  taskset -c 0 "$bin/ktern-load" handshakes --resume --addr "127.0.0.1:$pe" --threads 2 --seconds 1 > /dev/null
  t0=$(cpu_ticks "${pids_[@]}")
  out=$(taskset -c 0 "$bin/ktern-load" handshakes --resume --addr "127.0.0.1:$pe" --threads 4 --seconds "$seconds")
  t1=$(cpu_ticks "${pids_[@]}")
  n=$(sed -E 's/.*handshakes=([0-9]+).*/\1/' <<<"$out")
  res[$name.rs]=$(python3 -c "print(f'{($t1-$t0)/$hz/$n*1e6:.1f}')")
  echo "$name resumed handshakes: $out; server cpu $(( (t1-t0) * 1000 / hz )) ms -> ${res[$name.rs]} us/handshake"

  local r0 r1
  r0=$(rss_kib "${pids_[@]}")
  taskset -c 0 "$bin/ktern-load" idle --addr "127.0.0.1:$pe" --conns "$idle" --hold 8 > "$work/idle-$name.out" &
  local idle_pid=$!
  for _ in $(seq 1 600); do grep -q '^open=' "$work/idle-$name.out" 2>/dev/null && break; sleep 0.5; done
  sleep 2
  r1=$(rss_kib "${pids_[@]}")
  local opened; opened=$(sed -nE 's/^open=([0-9]+).*/\1/p' "$work/idle-$name.out")
  wait $idle_pid || true
  res[$name.rss]=$(python3 -c "print(f'{($r1-$r0)/$opened:.2f}')")
  echo "$name idle: $opened connections, RSS $r0 -> $r1 KiB -> ${res[$name.rss]} KiB/connection"

  t0=$(cpu_ticks "${pids_[@]}")
  out=$(taskset -c 0 "$bin/ktern-load" download --addr "127.0.0.1:$ps" --times "$downloads" --bytes $bytes)
  t1=$(cpu_ticks "${pids_[@]}")
  res[$name.l4]=$(python3 -c "print(f'{$bytes*$downloads/1e6/max(($t1-$t0)/$hz,1e-9):.0f}')")
  echo "$name L4 64 MiB x$downloads: $out; server cpu $(( (t1-t0) * 1000 / hz )) ms -> ${res[$name.l4]} MB per CPU-second"
}

echo "ktern: $(grep -m1 -o 'kTLS[^;]*' "$work/ktern.log" || echo 'see log')"
run_server ktern 19443 19444 "$ktern_pid"
# shellcheck disable=SC2046
run_server nginx 19543 19544 $(nginx_pids)
run_server haproxy 19643 19644 "$haproxy_pid"

# The floor, in the same run: nginx proxying the same connection and byte
# over plain TCP (accept, backend connect, one byte each way, two closes).
# shellcheck disable=SC2046
t0=$(cpu_ticks $(nginx_pids))
out=$(taskset -c 0 "$bin/ktern-load" handshakes --plain --addr 127.0.0.1:19545 --threads 4 --seconds "$seconds")
# shellcheck disable=SC2046
t1=$(cpu_ticks $(nginx_pids))
n=$(sed -E 's/.*handshakes=([0-9]+).*/\1/' <<<"$out")
res[floor]=$(python3 -c "print(f'{($t1-$t0)/$hz/$n*1e6:.1f}')")
echo "floor (nginx, plain TCP): $out; server cpu $(( (t1-t0) * 1000 / hz )) ms -> ${res[floor]} us/connection"
# The crypto a handshake cannot avoid, on the servers' CPU: an X25519 share
# and agreement (full and resumed) and an ECDSA P-256 signature (full).
out=$(taskset -c 1 "$bin/ktern-load" crypto --count 2000)
res[kx]=$(sed -E 's/.*kx_ns_each=([0-9]+).*/\1/' <<<"$out" | awk '{printf "%.1f", $1 / 1000}')
res[sign]=$(sed -E 's/.*sign_ns_each=([0-9]+).*/\1/' <<<"$out" | awk '{printf "%.1f", $1 / 1000}')
echo "crypto per handshake: $out -> key exchange ${res[kx]} us, signature ${res[sign]} us"

res_json "$json"
python3 - "${res[floor]}" "${res[kx]}" "${res[sign]}" "${res[ktern.hs]}" "${res[nginx.hs]}" "${res[haproxy.hs]}" "${res[ktern.rs]}" "${res[nginx.rs]}" "${res[haproxy.rs]}" \
  "${res[ktern.rss]}" "${res[nginx.rss]}" "${res[haproxy.rss]}" "${res[ktern.l4]}" "${res[nginx.l4]}" "${res[haproxy.l4]}" <<'PY'
import sys
v = list(map(float, sys.argv[1:]))
floor, kx, sign = v[0], v[1], v[2]
rows = [v[i:i + 3] for i in range(3, len(v), 3)]
names = ["server CPU per TLS 1.3 handshake (us)", "server CPU per resumed handshake (us)",
         "RSS per idle TLS connection (KiB)", "L4 64 MiB: MB per server CPU-second"]
targets = ["<= 0.45", "<= 0.5", "ktern <= 10 (userspace), <= 4 (kTLS)", ">= 1.0"]
r = lambda a, b: a / b if b else float("nan")
print(f"\n{'metric':40} {'ktern':>10} {'nginx':>10} {'haproxy':>10} {'ktern/nginx':>12} {'ktern/haproxy':>14}  target (ktern/nginx)")
for name, (k, n, h), t in zip(names, rows, targets):
    print(f"{name:40} {k:10.2f} {n:10.2f} {h:10.2f} {r(k, n):12.2f} {r(k, h):14.2f}  {t}")
print(f"\nfloor: a plain-TCP proxied connection costs nginx {floor:.1f} us; as multiples of it:")
for name, (k, n, h) in zip(["full handshake", "resumed handshake"], rows):
    print(f"  {name:20} ktern {k / floor:5.2f}x   nginx {n / floor:5.2f}x   haproxy {h / floor:5.2f}x")
print(f"floor + the handshake's crypto (key exchange {kx:.1f} us, signature {sign:.1f} us): as multiples of it:")
for name, (k, n, h), c in zip(["full handshake", "resumed handshake"], rows, [kx + sign, kx]):
    f = floor + c
    print(f"  {name:20} ktern {k / f:5.2f}x   nginx {n / f:5.2f}x   haproxy {h / f:5.2f}x   (floor {f:.1f} us)")
PY
