#!/usr/bin/env bash
# The hostile-load soak (bench/soak-run.sh) inside the kTLS VM, so that the
# offloaded path's memory and fds are measured too: floods of half-open
# handshakes, idle TLS connections and slow readers against one ktern with
# `ktls = "required"`. Smaller floods than on the host by default: under
# qemu's TCG every handshake's crypto is emulated. Prints /proc/net/tls_stat
# at the end (the kernel did the record crypto). Each flood gets 30 s to
# settle: a ktern under TCG is still working through a flood's queue well
# after the load tool has closed its connections.
# Usage: bench/vm-soak.sh [--kernel 6.18] [--halfopen 2000] [--idle 2000] [--slow 200] [--compare]
set -euo pipefail
cd "$(dirname "$0")/.."
kernel=6.18 halfopen=2000 idle=2000 slow=200 compare=0
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) kernel=$2; shift 2 ;;
    --halfopen) halfopen=$2; shift 2 ;;
    --idle) idle=$2; shift 2 ;;
    --slow) slow=$2; shift 2 ;;
    --compare) compare=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
cargo build --release --quiet --bins
bin=$PWD/target/release
work=$(mktemp -d /tmp/ktern-vmsoak.XXXXXX)
trap 'rm -rf "$work"' EXIT
openssl ecparam -name prime256v1 -genkey -noout -out "$work/key.pem"
openssl req -x509 -new -key "$work/key.pem" -subj /CN=localhost -addext subjectAltName=DNS:localhost \
  -days 2 -out "$work/cert.pem" 2>/dev/null
# The guest is busybox: bash (and its libraries) is the program, the script
# its argument.
scripts/ktls-vm.sh --kernel "$kernel" --mem 3072 --timeout 3000 \
  --file "$bin/ktern:/opt/bin/ktern" --file "$bin/ktern-load:/opt/bin/ktern-load" \
  --file "$PWD/bench/soak-run.sh:/opt/soak-run.sh" \
  --file "$work/cert.pem:/tmp/soak/cert.pem" --file "$work/key.pem:/tmp/soak/key.pem" \
  --env BIN=/opt/bin --env WORK=/tmp/soak --env KTLS=required \
  --env HALFOPEN="$halfopen" --env IDLE="$idle" --env SLOW="$slow" --env COMPARE="$compare" \
  --env SETTLE=30 \
  -- bash /opt/soak-run.sh |
  grep -E '^##|^half-open|^idle|^slow|^trims|^kernel TLS|KTERN-VM-EXIT|rror'
