#!/usr/bin/env bash
# RSS per idle TLS connection once offloaded to kTLS: runs `ktern-load rss`
# (ktern + echo backend + N idle connections) inside the kTLS VM.
# Usage: bench/vm-idle.sh [--kernel 6.18] [--conns 10000]
set -euo pipefail
cd "$(dirname "$0")/.."
kernel=6.18 conns=10000
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) kernel=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
cargo build --release --quiet --bins
work=$(mktemp -d /tmp/ktern-vmidle.XXXXXX)
trap 'rm -rf "$work"' EXIT
openssl ecparam -name prime256v1 -genkey -noout -out "$work/key.pem"
openssl req -x509 -new -key "$work/key.pem" -subj /CN=localhost -days 2 -out "$work/cert.pem" 2>/dev/null
for mode in required off; do
cat > "$work/ktern-$mode.toml" <<TOML
[runtime]
ktls = "$mode"
[[listener]]
address = "127.0.0.1:19443"
[[listener.certificate]]
cert = "cert.pem"
key = "key.pem"
[listener.route]
kind = "tcp"
backends = ["127.0.0.1:19001"]
TOML
done
bin=$PWD/target/release
for mode in required off; do
  echo "=== ktls = $mode, $conns idle connections, kernel $kernel ==="
  scripts/ktls-vm.sh --kernel "$kernel" --mem 2048 --timeout 1800 \
    --file "$bin/ktern:/opt/ktern" --file "$work/cert.pem:/tmp/b/cert.pem" --file "$work/key.pem:/tmp/b/key.pem" \
    --file "$work/ktern-$mode.toml:/tmp/b/ktern.toml" \
    -- "$bin/ktern-load" rss --ktern /opt/ktern --config /tmp/b/ktern.toml --conns "$conns" |
    grep -E '^idle_connections=|KTERN-VM-EXIT|error|failed'
done
