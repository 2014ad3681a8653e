#!/usr/bin/env bash
# Side-by-side static files over TLS: ktern's `static` rule vs nginx's
# `root` (Debian's package), each pinned to CPU 1 and loaded from CPU 0 by
# the same client (ktern-load http, TLS 1.3, AES-128-GCM as browsers
# prefer). Reports server CPU-seconds per GB for 1 MiB and 64 MiB files, and
# the AES-128-GCM floor of this CPU (`openssl speed`, one core), so every
# figure also reads as a multiple of the record crypto alone. HAProxy serves
# no files, so it has no column here. On a kernel without kTLS both servers
# seal records in userspace. The floor beside them: the same nginx serving
# the same files over plain HTTP with `sendfile off` (the file read into
# userspace and written to the socket: the copies and TCP work that any
# server sealing records in userspace does besides the crypto) plus the
# AES-128-GCM of every byte: a reference floor for such a server on this
# machine (measured, not a proven bound). Bounded in count and time. Usage:
#   bench/compare-files.sh [--small 2000] [--large 32] [--json FILE]
set -euo pipefail
cd "$(dirname "$0")/.."

small=2000 large=32 json=
while [ $# -gt 0 ]; do
  case "$1" in
    --small) small=$2; shift 2 ;;
    --large) large=$2; shift 2 ;;
    --json) json=$(realpath "$2"); shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs (server on 1, client on 0)" >&2; exit 1; }
dpkg-query -W -f='${Status}' nginx 2>/dev/null | grep -q "ok installed" ||
  apt-get install -y -qq --no-install-recommends nginx >/dev/null
bench_name=bench-files
. bench/common.sh

# nginx's workers run as www-data: the files must be readable by it.
chmod 755 "$work"
mkdir -p "$work/www/files"
head -c $((1 << 20)) /dev/urandom > "$work/www/files/1m.bin"
head -c $((64 << 20)) /dev/urandom > "$work/www/files/64m.bin"
chmod -R a+rX "$work/www"

ktern_addr=127.0.0.1:19446 nginx_addr=127.0.0.1:19546 floor_addr=127.0.0.1:19547
# Only /files/ is requested: the catch-all rule's upstream is never used.
KTERN_RULES=$(printf '[[listener.route.rule]]\npath = "/files/"\nstatic = "%s"' "$work/www") \
  ktern_http_conf "$ktern_addr" 127.0.0.1:9 0 > "$work/ktern.toml"
RUST_LOG=warn taskset -c 1 "$bin/ktern" run -c "$work/ktern.toml" > "$work/ktern.out" 2> "$work/ktern.log" & pids+=($!)
ktern_pid=$!

{ nginx_head
  cat <<CONF
  sendfile on;
  server {
    listen $nginx_addr ssl;
    ssl_certificate $work/cert.pem;
    ssl_certificate_key $work/key.pem;
    ssl_protocols TLSv1.3;
    location /files/ { root $work/www; }
  }
  server {
    listen $floor_addr;
    sendfile off;
    location /files/ { root $work/www; }
  }
}
CONF
} > "$work/nginx.conf"
taskset -c 1 nginx -p "$work" -c "$work/nginx.conf"
wait_listening "$ktern_addr" "$nginx_addr" "$floor_addr"
nginx_master=$(cat "$work/nginx.pid")
nginx_pids() { echo "$nginx_master $(pgrep -P "$nginx_master" | tr '\n' ' ')"; }
hz=$(getconf CLK_TCK)
field() { sed -nE "s/.*(^| )$1=([0-9.]+).*/\2/p" <<<"$2"; }

declare -A res
measure() { # name addr file bytes count pids...
  local name=$1 addr=$2 file=$3 bytes=$4 count=$5; shift 5
  local u0 s0 u1 s1 out n e gb plain=()
  [ "$name" != floor ] || plain=(--plain)
  # Warm-up: the page cache and the first allocations.
  taskset -c 0 "$bin/ktern-load" http --addr "$addr" --conns 1 --seconds 30 --max 2 --path "/files/$file" \
    --body-bytes "$bytes" "${plain[@]}" > /dev/null
  read -r u0 s0 <<<"$(ticks "$@")"
  out=$(timeout -k 5 300 taskset -c 0 "$bin/ktern-load" http --addr "$addr" --conns 2 --seconds 240 --max "$count" \
    --path "/files/$file" --body-bytes "$bytes" "${plain[@]}")
  read -r u1 s1 <<<"$(ticks "$@")"
  n=$(field requests "$out") e=$(field errors "$out")
  gb=$(python3 -c "print(max($n*$bytes/1e9,1e-12))")
  res[$name.$file]=$(python3 -c "print(f'{($u1+$s1-$u0-$s0)/$hz/$gb:.3f}')")
  res[$name.$file.user]=$(python3 -c "print(f'{($u1-$u0)/$hz/$gb:.3f}')")
  res[$name.$file.sys]=$(python3 -c "print(f'{($s1-$s0)/$hz/$gb:.3f}')")
  echo "$name /files/$file: $out; server cpu $(( (u1+s1-u0-s0) * 1000 / hz )) ms -> ${res[$name.$file]} s/GB" \
    "(user ${res[$name.$file.user]}, kernel ${res[$name.$file.sys]})"
  [ "$e" = 0 ] || echo "  WARNING: $name $file had $e errors"
}

echo "ktern: $(grep -m1 -o 'kTLS[^;]*' "$work/ktern.log" || echo 'kTLS in use')"
for f in "1m.bin $((1 << 20)) $small" "64m.bin $((64 << 20)) $large"; do
  read -r file bytes count <<<"$f"
  measure ktern "$ktern_addr" "$file" "$bytes" "$count" "$ktern_pid"
  # shellcheck disable=SC2046
  measure nginx "$nginx_addr" "$file" "$bytes" "$count" $(nginx_pids)
  # shellcheck disable=SC2046
  measure floor "$floor_addr" "$file" "$bytes" "$count" $(nginx_pids)
done

# The floor: AES-128-GCM over 16 KiB records on one core (a TLS record's
# size), in seconds per GB.
res[aes]=$(taskset -c 1 openssl speed -seconds 2 -bytes 16384 -evp aes-128-gcm 2>/dev/null |
  awk 'tolower($1) == "aes-128-gcm" {v=$NF; sub(/k$/, "", v); printf "%.3f", 1e9 / (v * 1000)}')
echo "AES-128-GCM alone on one core: ${res[aes]} s/GB"
res_json "$json"
python3 - "${res[aes]}" "${res[ktern.1m.bin]}" "${res[nginx.1m.bin]}" "${res[floor.1m.bin]}" \
  "${res[ktern.64m.bin]}" "${res[nginx.64m.bin]}" "${res[floor.64m.bin]}" <<'PY'
import sys
aes, k1, n1, f1, k64, n64, f64 = map(float, sys.argv[1:])
print(f"\n{'CPU-s per GB':16} {'ktern':>7} {'nginx':>7} {'plain':>7} {'floor':>7} {'ktern/nginx':>11}"
      f" {'floor/nginx':>11} {'ktern/AES':>9} {'ktern/floor':>11}  target")
for name, k, n, f in [("1 MiB files", k1, n1, f1), ("64 MiB files", k64, n64, f64)]:
    fl = f + aes
    print(f"{name:16} {k:7.3f} {n:7.3f} {f:7.3f} {fl:7.3f} {k / n:11.2f} {fl / n:11.2f} {k / aes:9.2f} {k / fl:11.2f}"
          "  <= 0.55 nginx, <= 2.5 AES")
print(f"AES: AES-128-GCM alone, one core ({aes:.3f} s/GB); plain: nginx serving the same files over plain HTTP,"
      " sendfile off (read and write: a userspace sealer's copies and TCP work); floor: plain + AES, a reference"
      " floor for a server sealing records in userspace here")
PY
