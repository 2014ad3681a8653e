#!/bin/bash
# The soak itself (see bench/soak.sh, which runs it on the host, and
# bench/vm-soak.sh, which runs it inside the kTLS VM). Environment:
#   BIN   directory holding ktern and ktern-load
#   WORK  scratch directory holding cert.pem and key.pem
#   HALFOPEN IDLE SLOW  flood sizes; COMPARE=1 runs memory_trim off, then on
#   KTLS  runtime.ktls (auto, required, off)
#   PIN=1 pins ktern to CPU 1 and the load to CPU 0 (taskset; host only)
#   SETTLE seconds to wait after each flood before the "after" reading (10)
set -euo pipefail
# Both ends hold every connection: lift the fd limit (as root, past the
# hard one; else up to it).
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
: "${BIN:?}" "${WORK:?}"
halfopen=${HALFOPEN:-5000} idle=${IDLE:-5000} slow=${SLOW:-500} compare=${COMPARE:-0}
ktls=${KTLS:-auto} settle=${SETTLE:-10}
if [ "${PIN:-0}" = 1 ]; then
  on_load() { taskset -c 0 "$@"; }
  ktern_cpu=1
else
  on_load() { "$@"; }
  ktern_cpu=0
fi
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
backend=127.0.0.1:19023
on_load "$BIN/ktern-load" backend --listen "$backend" --kind http --body-bytes 1048576 --seconds 3600 & pids+=($!)

rss() { awk '/VmRSS/ { print int($2 / 1024) " MB" }' "/proc/$1/status"; }
fds() { ls "/proc/$1/fd" | wc -l; }
state() { echo "rss=$(rss "$1") fds=$(fds "$1")"; }
metric() { # $1 admin address, $2 metric name
  printf 'GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n' |
    timeout 2 bash -c "exec 3<>/dev/tcp/${1%:*}/${1#*:}; cat >&3; cat <&3" |
    grep "^$2 " | cut -d' ' -f2
}

soak() { # $1: memory_trim value
  local addr=127.0.0.1:19465 admin=127.0.0.1:19466
  cat > "$WORK/ktern.toml" <<TOML
[runtime]
cpus = [$ktern_cpu]
ktls = "$ktls"
log_format = "text"
memory_trim = $1
[admin]
address = "$admin"
[[listener]]
address = "$addr"
[[listener.certificate]]
cert = "cert.pem"
key = "key.pem"
[listener.route]
kind = "http"
send_timeout = "60s"
[[listener.route.rule]]
upstream = "app"
[upstream.app]
backends = ["$backend"]
TOML
  RUST_LOG=warn "$BIN/ktern" run -c "$WORK/ktern.toml" > "$WORK/ktern.out" 2> "$WORK/ktern.log" &
  local k=$!
  for _ in $(seq 100); do grep -q '^admin ' "$WORK/ktern.out" 2>/dev/null && break; sleep 0.1; done
  sleep 1
  echo "## memory_trim = $1, ktls = $ktls: start $(state $k)"
  flood() { # $1 label, then the ktern-load arguments
    local label=$1; shift
    local before peak after
    before=$(state $k)
    on_load "$BIN/ktern-load" "$@" --addr "$addr" --hold 4 > "$WORK/load.out" 2>&1 &
    local l=$!
    for _ in $(seq 3000); do grep -q '^open=' "$WORK/load.out" 2>/dev/null && break; sleep 0.1; done
    sleep 1
    peak=$(state $k)
    wait $l || true
    sleep "$settle"
    after=$(state $k)
    echo "$label ($(grep -o 'open=[0-9]*' "$WORK/load.out")): before $before | peak $peak | $settle s after $after"
  }
  flood "half-open handshakes" halfopen --conns "$halfopen"
  flood "half-open handshakes" halfopen --conns "$halfopen"
  flood "idle TLS connections" idle --no-echo --conns "$idle"
  flood "slow readers of 1 MiB" slowread --conns "$slow" --path /
  echo "trims: $(metric "$admin" ktern_memory_trims_total)," \
    "offloaded: $(metric "$admin" ktern_ktls_offloaded_total)," \
    "userspace: $(metric "$admin" ktern_ktls_userspace_total)"
  kill $k; wait $k 2>/dev/null || true
}

if [ "$compare" = 1 ]; then soak false; fi
soak true
if [ -r /proc/net/tls_stat ]; then
  echo "kernel TLS: $(awk '$1 ~ /^Tls(Tx|Rx)(Sw|Device)$/ { printf "%s=%s ", $1, $2 }' /proc/net/tls_stat)"
fi
