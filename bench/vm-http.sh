#!/usr/bin/env bash
# Instructions per keep-alive proxied HTTPS request inside the kTLS VM under
# `-icount shift=0` (guest time counts instructions): one vCPU runs the
# client, one HTTP backend and the servers under test, all TLS 1.3 with the
# same ECDSA P-256 certificate, proxying to that backend over keep-alive
# connections: nginx (the host's, copied in), then ktern with ktls = "off",
# "auto", "required".
# Each server takes two closed-loop runs of --requests/4 and --requests
# requests on 20 connections; the difference of its run time (schedstat, in
# ns; utime + stime ticks as a check) over the difference of the counts
# cancels the handshakes and connection set-up. Not noise-free: the kTLS
# figures moved by up to 8% between boots at 4000 requests, 2% at 20000.
# /proc/net/tls_stat is read around each server's runs: its counters show
# which servers had the kernel do the record crypto.
# The whole guest's non-idle ticks over the same requests are shown too: they
# include work the kernel defers to its own threads.
# --ktern-env NAME=VALUE (repeatable) sets a variable for the three ktern
# only (for example an allocator experiment: LD_PRELOAD, GLIBC_TUNABLES).
# Bulk: --body 33554432 --requests 8 --conns 2 (32 MiB responses; under
# kTLS ktern splices them from the backend, see ktern_http_spliced_bytes_total).
# --h2: the clients speak HTTP/2 (h2load -m 10: ten streams in flight on
# each connection, as bench/compare-h2.sh), to nginx with `http2` and to
# ktern (ALPN h2), both still proxying to the HTTP/1.1 backend; the floor is
# nginx proxying cleartext HTTP/2 (h2c, prior knowledge). Both servers keep
# up to 256 idle backend connections (200 requests in flight at the default
# --conns), or each would open and close backend connections per request.
# --static: a static file of --body bytes instead of the backend's
# responses (ktern's `static` rule, nginx's `root` with `sendfile on`):
# under kTLS ktern sends it with `sendfile`, so the kernel seals it; `off`
# reads and seals it in userspace. The ratio of `auto` to `off` is issue
# 13's static-file figure (target 0.35x); the floor is nginx sending the
# same file over plain HTTP with sendfile (the page cache and TCP work no
# TLS server can shed). For example --static --body 33554432 --requests 8
# --conns 2. nginx asks OpenSSL for kTLS (`ssl_conf_command Options KTLS`),
# which it uses where OpenSSL was built with it (tls_stat says).
# --no-init-on-alloc boots the guest without the kernel's page zeroing on
# allocation (Debian's default `init_on_alloc=1` zeroes every page the
# kernel allocates for a kTLS record).
# --perf profiles a third run of each server in the guest with the host's perf
# (the AES-GCM share: the record crypto floor; the kernel's page zeroing;
# the top symbols).
# Usage: bench/vm-http.sh [--kernel 6.18] [--requests 20000] [--body 1024] [--conns 20] [--h2 | --static] [--no-init-on-alloc] [--ktern-env N=V] [--perf]
set -euo pipefail
cd "$(dirname "$0")/.."
kernel=6.18 requests=20000 body=1024 conns=20 ktern_env=() perf=() h2=0 static=0
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) kernel=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    --body) body=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --ktern-env) ktern_env+=("$2"); shift 2 ;;
    --perf) perf=(--file /usr/bin/perf:/opt/perf); shift ;;
    --h2) h2=1; shift ;;
    --static) static=1; shift ;;
    --no-init-on-alloc) export KTERN_VM_APPEND="${KTERN_VM_APPEND:-} init_on_alloc=0"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$requests" -ge 8 ] || { echo "--requests must be at least 8" >&2; exit 2; }
[ "$h2" = 0 ] || [ "$static" = 0 ] || { echo "--h2 and --static exclude each other" >&2; exit 2; }
command -v nginx > /dev/null ||
  apt-get install -y -qq --no-install-recommends nginx > /dev/null
h2load=() pool=64 http2=
if [ "$h2" = 1 ]; then
  command -v h2load > /dev/null ||
    apt-get install -y -qq --no-install-recommends nghttp2-client > /dev/null
  h2load=(--file "$(command -v h2load):/opt/h2load") pool=256 http2=" http2"
fi
bench_name=vm-http
# shellcheck source=bench/common.sh
. bench/common.sh
backend=127.0.0.1:19702

# --static: nginx serves the file with sendfile and asks OpenSSL for kTLS
# (sendfile through it where OpenSSL was built with it); the other measures
# keep nginx's defaults (sendfile off: with it, the floor's plain listener
# could send a bulk body nginx buffered to a file with sendfile).
static_conf() { # root
  [ "$static" = 0 ] ||
    printf '    sendfile on;\n    ssl_conf_command Options KTLS;\n    location /files/ { root %s/www; }\n' "$1"
}
# nginx for the guest, files under $1 (/tmp/b there): common.sh's
# nginx_vm_head, with the settings of its nginx_conf.
nginx_vm_conf() {
  nginx_vm_head "$1"
  cat <<CONF
http {
  access_log off;
  client_body_temp_path $1/tmp/body;
  proxy_temp_path $1/tmp/proxy;
  fastcgi_temp_path $1/tmp/fastcgi;
  uwsgi_temp_path $1/tmp/uwsgi;
  scgi_temp_path $1/tmp/scgi;
  keepalive_requests 1000000;
  upstream b {
    server $backend;
    keepalive $pool;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:19440 ssl$http2;
    # The floor: the same proxying over plain TCP (no TLS either side).
    listen 127.0.0.1:19444$http2;
    ssl_certificate $1/cert.pem;
    ssl_certificate_key $1/key.pem;
    ssl_protocols TLSv1.3;
$(static_conf "$1")
    location / {
      proxy_pass http://b;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
}
mkdir -p "$work/tmp"
nginx_vm_conf "$work" > "$work/nginx-check.conf"
nginx -t -q -p "$work" -c "$work/nginx-check.conf" -e "$work/nginx-check.log" ||
  { cat "$work/nginx-check.log" >&2; exit 1; }
nginx_vm_conf /tmp/b > "$work/nginx-vm.conf"

# ktern on the guest's one CPU: an `http` route to the backend. pool_size as
# nginx's `keepalive`; pool_idle_timeout as nginx's upstream
# keepalive_timeout (60s), so no pooled connection closes between runs.
# --static: a file of $body bytes under www/files (nginx's `root` and
# ktern's `static` rule serve the same one).
rules=
if [ "$static" = 1 ]; then
  mkdir -p "$work/www/files"
  head -c "$body" /dev/urandom > "$work/www/files/f.bin"
  rules=$(printf '[[listener.route.rule]]\npath = "/files/"\nstatic = "/tmp/b/www"')
fi
for k in off:19441 auto:19442 required:19443; do
  KTERN_CPU=0 KTERN_RUNTIME="ktls = \"${k%%:*}\"" KTERN_RULES="$rules" \
    ktern_http_conf "127.0.0.1:${k#*:}" "$backend" "$pool" 'pool_idle_timeout = "60s"' > "$work/ktern-${k%%:*}.toml"
done
for f in off auto required; do
  # The static rule's root is the guest's path: checked with a copy.
  sed "s|/tmp/b/www|$work/www|" "$work/ktern-$f.toml" > "$work/check-$f.toml"
  "$bin/ktern" check -c "$work/check-$f.toml" > "$work/check-$f.log" 2>&1 ||
    { echo "ktern check $f:" >&2; cat "$work/check-$f.log" >&2; exit 1; }
done

printf '%s\n' "${ktern_env[@]}" > "$work/ktern.env"
preload=()
for e in "${ktern_env[@]}"; do
  case "$e" in LD_PRELOAD=*) preload=(--file "${e#LD_PRELOAD=}:${e#LD_PRELOAD=}") ;; esac
done
n1=$((requests / 4)) n2=$requests
start=$(date +%s)
KTERN_VM_QEMU_ARGS="-icount shift=0" scripts/ktls-vm.sh --kernel "$kernel" --mem 2048 --timeout 3000 \
  --file "$bin/ktern:/opt/ktern" --file "$bin/ktern-load:/opt/ktern-load" --file /usr/sbin/nginx:/opt/nginx \
  "${preload[@]}" "${perf[@]}" "${h2load[@]}" --file "$work:/tmp/b" -- "$PWD/bench/vm-http-guest.sh" "$n1" "$n2" "$body" "$conns" "$h2" "$static" > "$work/guest.log" ||
  { grep -v '^\[' "$work/guest.log" | tail -40 >&2; exit 1; }
echo "VM run: $(($(date +%s) - start)) s (guest log: $work/guest.log)"
grep -E '^(http|tlsstat|ktls|perf) |KTERN-VM-EXIT' "$work/guest.log"
python3 - "$work/guest.log" "$conns" "$body" "$static" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
conns, body, static = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
runs = {m.group(1): {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
        for m in re.finditer(r"^http (\S+) (.*)$", text, re.M)}
# -icount shift=0: one instruction per ns of guest time; a tick is 10 ms.
tick = 1e7
print(f"\n{'server':14} {'instr/request':>13} {'vs nginx':>9} {'vs floor':>9} {'from ticks':>11} {'user/kernel':>13} {'one run':>9}"
      f" {'per connection':>14} {'whole guest':>12}")
def steady_of(r):
    return (r["ns2"] - r["ns1"]) / (r["n2"] - r["n1"])
base = None
floor = steady_of(runs["floor"]) if "floor" in runs else None
for name, r in runs.items():
    n1, n2 = r["n1"], r["n2"]
    steady = steady_of(r)
    base = base or steady
    vs_floor = f"{steady / floor:8.2f}x" if floor else f"{'-':>9}"
    ticks = (r["ticks2"] - r["ticks1"]) * tick / (n2 - n1)
    user = (r["user2"] - r["user1"]) * tick / (n2 - n1) if "user2" in r else float("nan")
    split = f"{user / 1e3:5.1f}/{(ticks - user) / 1e3:5.1f} k"
    fixed = (r["ns2"] - steady * n2) / conns
    guest = (r["busy2"] - r["busy1"]) * tick / (n2 - n1)
    print(f"{name:14} {steady / 1e3:11.1f} k {steady / base:8.2f}x {vs_floor} {ticks / 1e3:9.1f} k {split:>13}"
          f" {r['ns2'] / n2 / 1e3:7.1f} k {fixed / 1e6:12.2f} M {guest / 1e3:10.1f} k")
if runs:
    r = next(iter(runs.values()))
    n1, n2 = r["n1"], r["n2"]
    print(f"instr/request: the server's run time (all threads, schedstat) over the {n2} - {n1} requests"
          f" between its two runs, so handshakes cancel; from ticks: the same from utime + stime,"
          f" and user/kernel that split (utime, stime),"
          f" ±{2 * tick / (n2 - n1) / 1e3:.1f} k (a tick per reading); one run: the {n2}-request run with"
          f" its {conns} handshakes, per request; per connection: that run's instructions beyond"
          f" instr/request, per connection (handshake, accept, close; rough: instr/request's error"
          f" times {n2}); whole guest: all non-idle ticks over the same difference (client, backend,"
          f" kernel threads); floor: "
          + ("nginx sending the same file over plain HTTP with sendfile (the page cache and TCP"
             " work no TLS server can shed)" if static else
             "nginx proxying the same requests over plain TCP, no TLS on either side (the"
             " exchange's TCP work and nginx's HTTP work, the part no TLS server can shed)"))
# Bulk bodies: per GB, the kernel's record paths against ktern's userspace
# one (issue 13: at most 0.35x), and where the instructions go (--perf).
if runs and body >= 1 << 20:
    per = {name: steady_of(r) / (body / 1e9) for name, r in runs.items()}
    print("\nper GB of body: " + ", ".join(f"{n} {v / 1e9:.2f} G" for n, v in per.items()))
    for n in ("nginx", "ktern-auto", "ktern-required"):
        if n in per and "ktern-off" in per:
            # Issue 13's 0.35x is for static files (and the tcp route's
            # splice, bench/vm-l4-tls.sh), not for proxied bodies.
            target = static and n != "nginx"
            print(f"{n} / ktern-off: {per[n] / per['ktern-off']:.2f}" + ("  (target <= 0.35)" if target else ""))
    shares = {m.group(1): (float(m.group(2)), float(m.group(3)))
              for m in re.finditer(r"^perf (\S+) crypto=([\d.]+) zeroing=([\d.]+)", text, re.M)}
    for n, (c, z) in shares.items():
        if n in per:
            print(f"{n:14} record crypto {per[n] * c / 100 / 1e9:5.2f} G/GB ({c:.0f}%),"
                  f" page zeroing {per[n] * z / 100 / 1e9:5.2f} G/GB ({z:.0f}%)")
    if "ktern-auto" in shares and "ktern-off" in per:
        c = per["ktern-auto"] * shares["ktern-auto"][0] / 100
        print(f"the record crypto alone is {c / per['ktern-off']:.2f}x ktern's userspace path"
              " (the kTLS path's AES-GCM over the userspace path's whole cost)")
stats = {}
for m in re.finditer(r"^tlsstat (\S+) (before|after) (.*)$", text, re.M):
    stats.setdefault(m.group(1), {})[m.group(2)] = dict(kv.split("=") for kv in m.group(3).split())
for name, s in stats.items():
    b, a = s.get("before", {}), s.get("after", {})
    moved = [f"{k} +{int(a[k]) - int(b.get(k, 0))}" for k in a if int(a[k]) != int(b.get(k, 0))]
    print(f"tls_stat {name:14} {', '.join(moved) or 'unchanged'}")
PY
