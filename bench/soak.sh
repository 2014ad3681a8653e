#!/usr/bin/env bash
# Hostile-load soak: floods of half-open handshakes, idle TLS connections and
# slow readers of a 1 MiB response, one after another, against one ktern
# (http route, shard pinned to CPU 1; clients and backend on CPU 0). Prints
# RSS and open fds before each flood, at its peak (while held), and 10 s
# after it ended. With --compare, runs the whole soak twice, with
# runtime.memory_trim off and on, side by side. Loopback only, bounded in
# count and time. The floods themselves are bench/soak-run.sh (also run in
# the kTLS VM by bench/vm-soak.sh). Usage:
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
BIN=$bin WORK=$work HALFOPEN=$halfopen IDLE=$idle SLOW=$slow COMPARE=$compare PIN=1 \
  bench/soak-run.sh
