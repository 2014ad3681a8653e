#!/usr/bin/env bash
# Instructions per full and per resumed TLS 1.3 handshake inside the kTLS VM
# under `-icount shift=0` (guest time counts instructions, so the figures
# have no noise): one vCPU runs the client (`ktern-load handshakes`, one
# thread, X25519, browsers' suite order), an echo backend and the servers
# under test: nginx (the host's, stream module: `ssl` + `proxy_pass`) and
# ktern (`tcp` routes: ktls = "auto", whose connections of one byte stay on
# rustls' records, `ktls_after`; "kernel", auto with ktls_after = "0", which
# hands the keys to the kernel at the handshake; and "off"), the same ECDSA
# P-256 certificate.
# Each connection sends one byte through the echo backend and waits for it,
# as in bench/compare.sh. The floor: nginx proxying the same connection and
# byte over plain TCP. Each row takes two runs of --conns/4 and --conns
# connections; the difference of the server's run time (schedstat, all
# threads) over the difference of the counts cancels what does not repeat
# per connection (a resuming run's first, full handshake, warm-up).
# The guest's CPU is QEMU's emulated one: crypto runs the code paths its
# features select (no AVX-512 or VAES), so this compares code paths, not
# a given machine's times.
# --perf profiles a third resumed run of each server in the guest with the
# host's perf (the top symbols).
# Usage: bench/vm-handshake.sh [--kernel 6.18] [--conns 400] [--perf]
set -euo pipefail
cd "$(dirname "$0")/.."
kernel=6.18 conns=400 perf=()
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) kernel=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --perf) perf=(--file /usr/bin/perf:/opt/perf); shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$conns" -ge 8 ] || { echo "--conns must be at least 8" >&2; exit 2; }
for p in nginx libnginx-mod-stream; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
    apt-get install -y -qq --no-install-recommends "$p" > /dev/null
done
bench_name=vm-handshake
# shellcheck source=bench/common.sh
. bench/common.sh

# nginx for the guest, files under $1 (/tmp/b there), with the stream
# module $2: common.sh's nginx_vm_head, and compare.sh's stream servers.
nginx_vm_conf() {
  echo "load_module $2;"
  nginx_vm_head "$1"
  cat <<CONF
stream {
  ssl_certificate $1/cert.pem;
  ssl_certificate_key $1/key.pem;
  ssl_protocols TLSv1.3;
  ssl_ecdh_curve X25519:prime256v1;
  server { listen 127.0.0.1:19540 ssl; proxy_pass 127.0.0.1:19001; }
  server { listen 127.0.0.1:19541; proxy_pass 127.0.0.1:19001; }
}
CONF
}
module=/usr/lib/nginx/modules/ngx_stream_module.so
nginx_vm_conf "$work" "$module" > "$work/nginx-check.conf"
nginx -t -q -p "$work" -c "$work/nginx-check.conf" -e "$work/nginx-check.log" ||
  { cat "$work/nginx-check.log" >&2; exit 1; }
nginx_vm_conf /tmp/b /opt/ngx_stream_module.so > "$work/nginx-vm.conf"
for k in auto:19542 off:19543 kernel:19544; do
  case ${k%%:*} in
    kernel) runtime='ktls = "auto"\nktls_after = "0"' ;;
    *) runtime="ktls = \"${k%%:*}\"" ;;
  esac
  { printf '[runtime]\ncpus = [0]\n%b\n' "$runtime"
    ktern_tcp_listener "127.0.0.1:${k#*:}" 127.0.0.1:19001
  } > "$work/ktern-${k%%:*}.toml"
  "$bin/ktern" check -c "$work/ktern-${k%%:*}.toml" > "$work/check.log" 2>&1 ||
    { cat "$work/check.log" >&2; exit 1; }
done

n1=$((conns / 4)) n2=$conns
start=$(date +%s)
KTERN_VM_QEMU_ARGS="-icount shift=0" scripts/ktls-vm.sh --kernel "$kernel" --mem 2048 --timeout 3000 \
  --file "$bin/ktern:/opt/ktern" --file "$bin/ktern-load:/opt/ktern-load" --file /usr/sbin/nginx:/opt/nginx \
  --file "$module:/opt/ngx_stream_module.so" "${perf[@]}" --file "$work:/tmp/b" \
  -- "$PWD/bench/vm-handshake-guest.sh" "$n1" "$n2" > "$work/guest.log" ||
  { grep -v '^\[' "$work/guest.log" | tail -40 >&2; exit 1; }
echo "VM run: $(($(date +%s) - start)) s (guest log: $work/guest.log)"
grep -E '^(hs|ktls|tlsstat|perf|crypto) |KTERN-VM-EXIT' "$work/guest.log"
python3 - "$work/guest.log" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
rows = {}
for m in re.finditer(r"^hs (\S+) (\S+) (.*)$", text, re.M):
    r = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(3))}
    rows[(m.group(1), m.group(2))] = (r["ns2"] - r["ns1"]) / (r["n2"] - r["n1"])
floor = rows.get(("floor", "plain"))
# The crypto a handshake cannot avoid, per handshake: the key exchange
# (full and resumed, psk_dhe_ke) and the signature (full only).
crypto = {}
m = re.search(r"^crypto (.*)$", text, re.M)
if m:
    c = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}
    kx = (c["kx_ns2"] - c["kx_ns1"]) / (c["n2"] - c["n1"])
    sign = (c["sign_ns2"] - c["sign_ns1"]) / (c["n2"] - c["n1"])
    crypto = {"full": kx + sign, "resumed": kx}
    print(f"\ncrypto per handshake: X25519 share and agreement {kx / 1e3:.1f} k,"
          f" ECDSA P-256 signature {sign / 1e3:.1f} k instructions")
print(f"\n{'server':12} {'kind':8} {'instr/conn':>11} {'vs nginx':>9} {'vs floor':>9} {'vs floor+crypto':>16}")
for (name, kind), v in rows.items():
    base = rows.get(("nginx", kind))
    vs = f"{v / base:8.2f}x" if base else f"{'':>9}"
    fl = f"{v / floor:8.2f}x" if floor else f"{'':>9}"
    fc = f"{v / (floor + crypto[kind]):15.2f}x" if floor and kind in crypto else ""
    print(f"{name:12} {kind:8} {v / 1e3:9.1f} k {vs} {fl} {fc}")
print("instr/conn: the server's run time (schedstat, ns = instructions under icount) over the"
      " difference of two runs' connections; floor: nginx proxying the same connection and byte"
      " over plain TCP; floor+crypto: that plus the handshake's own crypto (ktern-load crypto:"
      " X25519 share and agreement, and for a full handshake an ECDSA P-256 signature)")
PY
