#!/usr/bin/env bash
# L4 bulk with TLS on both legs: ktern's `tcp` route with `tls` against
# nginx's stream module with `proxy_ssl on`, each pinned to CPU 1, the
# same client (ktern-load download, CPU 0), the same TLS backend (a second
# ktern terminating TLS in front of a plain source backend, on CPU 0 or from
# 4 CPUs on CPU 2: bench/common.sh) and
# certificate. Reports MB moved per server CPU-second and the floor measured
# in the same run: the record crypto alone (one AES-128-GCM pass for each
# leg, `openssl speed` on CPU 1: the client offers AES-128-GCM first, and
# the backend ktern's suite order puts it first for ktern's and nginx's
# clients, which offer AES-256-GCM first). On a kernel without kTLS both ktern legs run on userspace records;
# inside the kTLS VM they go kTLS to kTLS.
# Every load is bounded: --downloads transfers of 64 MiB. Usage:
#   bench/compare-l4-tls.sh [--downloads 8]
set -euo pipefail
cd "$(dirname "$0")/.."
downloads=8
while [ $# -gt 0 ]; do
  case "$1" in
    --downloads) downloads=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs (server on 1, client and backends on 0)" >&2; exit 1; }
for p in nginx libnginx-mod-stream; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
    apt-get install -y -qq --no-install-recommends "$p" >/dev/null
done
bench_name=l4-tls
# shellcheck source=bench/common.sh
. bench/common.sh
hz=$(getconf CLK_TCK)
bytes=$((64 << 20))
ca_issued_cert

taskset -c "$backend_cpu" "$bin/ktern-load" backend --listen 127.0.0.1:19702 --kind source --bytes $bytes --seconds 3600 & pids+=($!)
# The TLS backend both servers talk to: ktern terminating TLS on the
# backends' CPU (its runtime.cpus must be one the taskset allows).
cat > "$work/backend.toml" <<TOML
[runtime]
cpus = [$backend_cpu]
[[listener]]
address = "127.0.0.1:19700"
[[listener.certificate]]
cert = "backend.pem"
key = "backend.key"
[listener.route]
kind = "tcp"
backends = ["127.0.0.1:19702"]
TOML
RUST_LOG=warn taskset -c "$backend_cpu" "$bin/ktern" run -c "$work/backend.toml" > /dev/null 2> "$work/backend.log" & pids+=($!)

cat > "$work/ktern.toml" <<TOML
[runtime]
cpus = [1]
[[listener]]
address = "127.0.0.1:19443"
[[listener.certificate]]
cert = "cert.pem"
key = "key.pem"
[listener.route]
kind = "tcp"
backends = ["127.0.0.1:19700"]
tls = { ca = "ca.pem", server_name = "localhost" }
TOML
RUST_LOG=warn taskset -c 1 "$bin/ktern" run -c "$work/ktern.toml" > /dev/null 2> "$work/ktern.log" & pids+=($!)
ktern_pid=$!

cat > "$work/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
worker_cpu_affinity 10;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 1024; }
stream {
  ssl_certificate $work/cert.pem;
  ssl_certificate_key $work/key.pem;
  ssl_protocols TLSv1.2 TLSv1.3;
  server {
    listen 127.0.0.1:19543 ssl;
    proxy_pass 127.0.0.1:19700;
    proxy_ssl on;
    proxy_ssl_verify on;
    proxy_ssl_trusted_certificate $work/ca.pem;
    proxy_ssl_name localhost;
    proxy_ssl_server_name on;
    proxy_ssl_session_reuse on;
  }
}
CONF
taskset -c 1 nginx -p "$work" -c "$work/nginx.conf"
wait_listening 127.0.0.1:19700 127.0.0.1:19443 127.0.0.1:19543
# The master (its pid file) and its workers.
nginx_pids() { local m; m=$(cat "$work/nginx.pid"); echo "$m $(pgrep -P "$m" | tr '\n' ' ')"; }
total() { local u s; read -r u s < <(ticks "$@"); echo $((u + s)); }

declare -A res
measure() { # name port pids...
  local name=$1 port=$2; shift 2
  taskset -c 0 "$bin/ktern-load" download --addr "127.0.0.1:$port" --times 1 --bytes $bytes > /dev/null
  local t0 t1 out
  t0=$(total "$@")
  out=$(taskset -c 0 "$bin/ktern-load" download --addr "127.0.0.1:$port" --times "$downloads" --bytes $bytes)
  t1=$(total "$@")
  res[$name]=$(python3 -c "print(f'{$bytes*$downloads/1e6/max(($t1-$t0)/$hz,1e-9):.0f}')")
  echo "$name: $out; server cpu $(( (t1 - t0) * 1000 / hz )) ms -> ${res[$name]} MB per CPU-second"
}
measure ktern 19443 "$ktern_pid"
# shellcheck disable=SC2046
measure nginx 19543 $(nginx_pids)

# The floor: the record crypto alone, one pass per leg, on the server's CPU.
speed() { taskset -c 1 openssl speed -seconds 2 -bytes 16384 -evp "$1" 2>/dev/null | awk -v a="$1" 'tolower($1) == a {print $NF}' | sed 's/k$//'; }
a128=$(speed aes-128-gcm)
python3 - "${res[ktern]}" "${res[nginx]}" "$a128" <<'PY'
import sys
k, n, a128 = map(float, sys.argv[1:])
# openssl speed prints 1000s of bytes per second; one pass per leg.
floor = a128 * 1e3 / 2 / 1e6
print(f"\n{'L4 64 MiB, TLS both legs':36} {'ktern':>8} {'nginx':>8} {'ktern/nginx':>12}  target")
print(f"{'MB per server CPU-second':36} {k:8.0f} {n:8.0f} {k / n:12.2f}  >= 1.5")
print(f"floor (AES-128-GCM on each leg, openssl speed): {floor:.0f} MB per CPU-second;")
print(f"  ktern reaches {k / floor:.2f} of it, nginx {n / floor:.2f}")
PY
echo "ktern's legs: $(grep -c . "$work/ktern.log") log lines; kTLS: $(grep -m1 -o 'kTLS[^;]*' "$work/ktern.log" || echo 'none')"
