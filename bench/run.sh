#!/usr/bin/env bash
# The whole side-by-side comparison in one command, for your own hardware:
# ktern against nginx and HAProxy (Debian's packages, installed if missing)
# on full and resumed TLS 1.3 handshakes, idle connections, L4 bulk,
# keep-alive HTTP/1.1 and HTTP/2 proxying and static files, with the floors
# (a plain-TCP connection, the handshake's crypto, AES-GCM per byte) measured
# in the same run. Several rounds; the report takes each figure's median and
# writes bench/RESULTS.md (machine, kernel, CPU model, crypto speed per core,
# date, every round's figures), and, once, each server's userspace
# instructions per request under callgrind. Each server runs on CPU 1 and the client on
# CPU 0, so the machine needs 2 CPUs; the backends share CPU 0 on 2 or 3
# CPUs and have CPU 2 from 4 on (bench/common.sh says why). Every load is
# bounded in count and time.
# Usage:
#   bench/run.sh [--rounds 3] [--seconds 10] [--idle 2000] [--vm] [--out bench/RESULTS.md]
# --vm adds the kTLS VM's instruction counts (bench/vm-http.sh over HTTP/1.1 and HTTP/2,
# bench/vm-l4-tls.sh and bench/vm-handshake.sh under qemu -icount; needs
# scripts/ktls-vm.sh's kernels).
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3 seconds=10 idle=2000 vm=0 out=bench/RESULTS.md
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --idle) idle=$2; shift 2 ;;
    --vm) vm=1; shift ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs (servers on 1, load on 0)" >&2; exit 1; }

missing=()
for p in nginx libnginx-mod-stream haproxy nghttp2-client openssl python3 valgrind; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
fi
python3 -c 'import h2' 2>/dev/null || python3 -m pip install -q h2 2>/dev/null ||
  apt-get install -y -qq --no-install-recommends python3-h2 >/dev/null

# One build for every script (or the prebuilt binaries KTERN_BENCH_BIN
# names, as bench/common.sh takes them).
if [ -z "${KTERN_BENCH_BIN:-}" ]; then
  cargo build --release --quiet --bins
  export KTERN_BENCH_BIN=$PWD/target/release
fi
# The backends' CPU, fixed once for every script (bench/common.sh's rule),
# so that machine.txt says what they used.
export KTERN_BENCH_BACKEND_CPU=${KTERN_BENCH_BACKEND_CPU:-$([ "$(nproc)" -ge 4 ] && echo 2 || echo 0)}
data=$(mktemp -d /tmp/ktern-run.XXXXXX)
echo "raw results in $data"

# The machine and the crypto floors, once.
{
  echo "date=$(date -u +%Y-%m-%dT%H:%MZ)"
  echo "cpu=$(lscpu | sed -nE 's/^Model name: +//p' | head -1)"
  echo "cpus=$(nproc)"
  echo "backend_cpu=$KTERN_BENCH_BACKEND_CPU"
  echo "memory=$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
  echo "kernel=$(uname -r)"
  echo "ktls=$( (modprobe tls 2>/dev/null; [ -e /proc/net/tls_stat ]) && echo yes || echo no)"
  echo "ktern=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo +changes)"
  echo "nginx=$(nginx -v 2>&1 | sed 's/.*nginx\///')"
  echo "haproxy=$(haproxy -v | head -1 | awk '{print $3}')"
  echo "openssl=$(openssl version | awk '{print $2}')"
  speed() { taskset -c 1 openssl speed -seconds 2 "$@" 2>/dev/null; }
  for c in aes-128-gcm aes-256-gcm; do
    echo "$c=$(speed -bytes 16384 -evp $c | awk -v c=$c 'tolower($1) == c {v=$NF; sub(/k$/, "", v); printf "%.0f", v * 1000}')"
  done
  echo "ecdsa_p256_sign=$(speed ecdsap256 | awk '/nistp256/ {print $(NF-1)}')"
  echo "x25519=$(speed ecdhx25519 | awk '/X25519/ {print $NF}')"
} > "$data/machine.txt"
cat "$data/machine.txt"

for r in $(seq 1 "$rounds"); do
  echo "=== round $r of $rounds ==="
  bench/compare.sh --seconds "$seconds" --idle "$idle" --downloads 8 --json "$data/l4.$r.json"
  bench/compare-http.sh --seconds "$seconds" --json "$data/http.$r.json"
  bench/compare-h2.sh --seconds "$seconds" --json "$data/h2.$r.json"
  bench/compare-files.sh --json "$data/files.$r.json"
done
# Userspace instructions and allocations per request, ktern's and nginx's,
# counted by callgrind: exact, so once, not per round (bench/callgrind.sh;
# valgrind is installed if missing).
echo "=== userspace instructions per request (callgrind) ==="
for s in ktern nginx; do
  flag=()
  [ "$s" = ktern ] || flag=(--nginx)
  # A failure here leaves its section out of the report, not the report.
  bench/callgrind.sh "${flag[@]}" --top 0 | tee "$data/cg-$s-http.txt" ||
    echo "warning: callgrind.sh ${flag[*]} failed; RESULTS.md will lack it" >&2
  bench/callgrind.sh "${flag[@]}" --h2 --top 0 | tee "$data/cg-$s-h2.txt" ||
    echo "warning: callgrind.sh ${flag[*]} --h2 failed; RESULTS.md will lack it" >&2
done
if [ "$vm" = 1 ]; then
  echo "=== kTLS VM ==="
  bench/vm-http.sh --requests 20000 | tee "$data/vm-http.txt"
  bench/vm-http.sh --h2 --requests 20000 | tee "$data/vm-h2.txt"
  bench/vm-http.sh --requests 8 --body 33554432 --conns 2 | tee "$data/vm-bulk.txt"
  bench/vm-http.sh --requests 8 --body 33554432 --conns 2 --static --perf | tee "$data/vm-static.txt"
  bench/vm-l4-tls.sh --downloads 2 --mib 32 | tee "$data/vm-l4.txt"
  bench/vm-l4-tls.sh --downloads 2 --mib 32 --plain-backend | tee "$data/vm-l4-plain.txt"
  bench/vm-handshake.sh | tee "$data/vm-handshake.txt"
fi
python3 bench/report.py "$data" "$rounds" > "$out"
echo "wrote $out"
