#!/usr/bin/env bash
# Hostile-load soak: floods of half-open handshakes, idle TLS connections and
# slow readers of a 1 MiB response, one after another, against one ktern
# (http route, shard pinned to CPU 1; clients and backend on CPU 0). Prints
# RSS and open fds before each flood, at its peak (while held), and 10 s
# after it ended. With --compare, runs the whole soak twice, with
# runtime.memory_trim off and on, side by side. Loopback only, bounded in
# count and time. Usage:
#   bench/soak.sh [--halfopen 5000] [--idle 5000] [--slow 500] [--compare]
set -euo pipefail
cd "$(dirname "$0")/.."

halfopen=5000 idle=5000 slow=500 compare=0
while [ $# -gt 0 ]; do
  case "$1" in
    --halfopen) halfopen=$2; shift 2 ;;
    --idle) idle=$2; shift 2 ;;
    --slow) slow=$2; shift 2 ;;
    --compare) compare=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
bench_name=soak
# shellcheck source=bench/common.sh
. bench/common.sh
backend=127.0.0.1:19023
taskset -c 0 "$bin/ktern-load" backend --listen "$backend" --kind http --body-bytes 1048576 --seconds 3600 & pids+=($!)

rss() { awk '/VmRSS/ { print int($2 / 1024) " MB" }' "/proc/$1/status"; }
fds() { ls "/proc/$1/fd" | wc -l; }
state() { echo "rss=$(rss "$1") fds=$(fds "$1")"; }

soak() { # $1: memory_trim value
  local addr=127.0.0.1:19465 admin=127.0.0.1:19466
  cat > "$work/ktern.toml" <<TOML
[runtime]
cpus = [1]
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
  RUST_LOG=warn "$bin/ktern" run -c "$work/ktern.toml" > "$work/ktern.out" 2> "$work/ktern.log" &
  local k=$!
  for _ in $(seq 100); do grep -q '^admin ' "$work/ktern.out" 2>/dev/null && break; sleep 0.1; done
  sleep 1
  echo "## memory_trim = $1: start $(state $k)"
  flood() { # $1 label, then the ktern-load arguments
    local label=$1; shift
    local before peak after
    before=$(state $k)
    taskset -c 0 "$bin/ktern-load" "$@" --addr "$addr" --hold 4 > "$work/load.out" 2>&1 &
    local l=$!
    for _ in $(seq 300); do grep -q '^open=' "$work/load.out" 2>/dev/null && break; sleep 0.1; done
    sleep 1
    peak=$(state $k)
    wait $l || true
    sleep 10
    after=$(state $k)
    echo "$label ($(grep -o 'open=[0-9]*' "$work/load.out")): before $before | peak $peak | 10 s after $after"
  }
  flood "half-open handshakes" halfopen --conns "$halfopen"
  flood "half-open handshakes" halfopen --conns "$halfopen"
  flood "idle TLS connections" idle --no-echo --conns "$idle"
  flood "slow readers of 1 MiB" slowread --conns "$slow" --path /
  echo "trims: $(printf 'GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n' | timeout 2 bash -c "exec 3<>/dev/tcp/${admin%:*}/${admin#*:}; cat >&3; cat <&3" | grep '^ktern_memory_trims_total ' | cut -d' ' -f2)"
  kill $k; wait $k 2>/dev/null || true
}

if [ $compare = 1 ]; then soak false; fi
soak true
