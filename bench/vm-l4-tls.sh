#!/usr/bin/env bash
# Instructions per GB on a `tcp` route with TLS on both legs, inside the
# kTLS VM under `-icount shift=0` (guest time counts instructions, so the
# figures have no noise): both legs in the kernel (kTLS to kTLS by splice)
# against both legs on rustls, in one boot, the same downloads. The ratio
# is the issue 10 target (at most 0.35x).
# Usage: bench/vm-l4-tls.sh [--kernel 6.18] [--downloads 4] [--mib 32]
set -euo pipefail
cd "$(dirname "$0")/.."
kernel=6.18 downloads=4 mib=32
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) kernel=$2; shift 2 ;;
    --downloads) downloads=$2; shift 2 ;;
    --mib) mib=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
bench_name=vm-l4-tls
# shellcheck source=bench/common.sh
. bench/common.sh
ca_issued_cert
listener() { # port ktls backend extra [cert key]
  cat <<TOML
[runtime]
ktls = "$2"
cpus = [0]
[[listener]]
address = "127.0.0.1:$1"
[[listener.certificate]]
cert = "${5:-cert.pem}"
key = "${6:-key.pem}"
[listener.route]
kind = "tcp"
backends = ["$3"]
$4
TOML
}
listener 19700 auto 127.0.0.1:19702 "" backend.pem backend.key > "$work/backend.toml"
tls='tls = { ca = "ca.pem", server_name = "localhost" }'
listener 19443 required 127.0.0.1:19700 "$tls" > "$work/ktern-required.toml"
listener 19444 off 127.0.0.1:19700 "$tls" > "$work/ktern-off.toml"
bytes=$((mib << 20))
out=$(KTERN_VM_QEMU_ARGS="-icount shift=0" scripts/ktls-vm.sh --kernel "$kernel" --mem 2048 --timeout 3000 \
  --file "$bin/ktern:/opt/ktern" --file "$bin/ktern-load:/opt/ktern-load" --file "$work:/tmp/b" \
  -- "$PWD/bench/vm-l4-tls-guest.sh" "$downloads" "$bytes")
echo "$out" | grep -E '^l4tls|^Tls(Curr|Tx|Rx)|KTERN-VM-EXIT'
python3 - "$downloads" "$bytes" <<PY
import re, sys
downloads, nbytes = map(int, sys.argv[1:])
text = """$out"""
t = {m.group(1): int(m.group(2)) for m in re.finditer(r"^l4tls (\w+) ticks=(\d+)", text, re.M)}
gb = downloads * nbytes / 1e9
# -icount shift=0: one instruction per ns of guest time; a tick is 10 ms.
per_gb = {k: v * 1e7 / gb for k, v in t.items()}
for k, v in per_gb.items():
    print(f"{k:10} {v / 1e9:6.2f} G instructions per GB (ktern's utime + stime, kernel record crypto included)")
if "required" in per_gb and "off" in per_gb:
    print(f"kTLS-to-kTLS / userspace: {per_gb['required'] / per_gb['off']:.2f}  (target <= 0.35)")
PY
