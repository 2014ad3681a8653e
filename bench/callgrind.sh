#!/usr/bin/env bash
# ktern's own instructions per keep-alive proxied HTTPS request, counted by
# callgrind (valgrind): userspace only, exact, no noise from the machine,
# and with each function's share, so a change to the request path reads as
# instructions gained or lost. The same set-up as compare-http.sh (an
# `http` route, pool_size 64, `ktern-load backend --kind http`, 1 KiB
# bodies, TLS 1.3, 20 keep-alive connections), one ktern shard under
# callgrind. Two measured runs of --requests/5 and --requests requests,
# each on 20 fresh connections: their difference over the difference of the
# counts cancels the handshakes. The kernel's share of each request is not
# counted here (bench/vm-http.sh counts both, under qemu's -icount).
# --h2: the same over HTTP/2 (h2load, 20 connections with 10 streams each,
# as compare-h2.sh's load scaled down). --handshakes: full TLS 1.3
# handshakes instead, each a connection through a `tcp` route to an echo
# backend with one byte each way (compare.sh's and vm-handshake.sh's unit);
# --resumed: the same, resumed with ktern's tickets. --requests then counts
# handshakes. --rate R (with --h2): each connection sends R requests/s
# (h2load --rps), so requests arrive one at a time as in compare-h2.sh's
# open-loop run, not in the closed loop's batches.
# --nginx: nginx (Debian's, one process: master_process off) under
# callgrind instead of ktern, with compare-http.sh's and compare-h2.sh's
# config (the same backend pools): the noise-free side of the user-time
# ratio the host benchmarks time. Instructions are not time (the two
# servers' instructions per cycle differ), but they do not jitter.
# Usage: bench/callgrind.sh [--nginx] [--requests 5000] [--top 25] [--h2 [--rate R] | --handshakes | --resumed]
set -euo pipefail
cd "$(dirname "$0")/.."
requests=5000 top=25 h2= hs= rate= server=ktern
while [ $# -gt 0 ]; do
  case "$1" in
    --requests) requests=$2; shift 2 ;;
    --top) top=$2; shift 2 ;;
    --h2) h2=1; shift ;;
    --nginx) server=nginx; shift ;;
    --rate) rate=$2; shift 2 ;;
    --handshakes) hs=full; shift ;;
    --resumed) hs=resumed resume_flag=--resume; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$requests" -ge 100 ] || { echo "--requests must be at least 100" >&2; exit 2; }
[ -z "$h2" ] || [ -z "$hs" ] || { echo "--h2 and --handshakes/--resumed exclude each other" >&2; exit 2; }
[ -z "$rate" ] || [ -n "$h2" ] || { echo "--rate needs --h2" >&2; exit 2; }
[ "$server" = ktern ] || [ -z "$hs" ] ||
  { echo "--nginx measures requests: not with --handshakes/--resumed" >&2; exit 2; }
command -v valgrind > /dev/null ||
  apt-get install -y -qq --no-install-recommends valgrind > /dev/null
[ -z "$h2" ] || command -v h2load > /dev/null ||
  apt-get install -y -qq --no-install-recommends nghttp2-client > /dev/null
[ "$server" = ktern ] || dpkg-query -W -f='${Status}' nginx 2>/dev/null | grep -q "ok installed" ||
  apt-get install -y -qq --no-install-recommends nginx > /dev/null
bench_name=callgrind
# shellcheck source=bench/common.sh
. bench/common.sh

backend=127.0.0.1:19013 addr=127.0.0.1:19455
if [ -n "$hs" ]; then
  "$bin/ktern-load" backend --listen "$backend" --kind echo --seconds 3600 & pids+=($!)
  { printf '[runtime]\ncpus = [0]\n'; ktern_tcp_listener "$addr" "$backend"; } > "$work/ktern.toml"
else
  "$bin/ktern-load" backend --listen "$backend" --kind http --body-bytes 1024 --seconds 3600 & pids+=($!)
  # The backend pools of compare-http.sh (64) and compare-h2.sh (512).
  pool=64
  [ -z "$h2" ] || pool=512
  KTERN_CPU=0 ktern_http_conf "$addr" "$backend" $pool > "$work/ktern.toml"
  nginx_conf "$addr ssl${h2:+ http2}" "$backend" $pool > "$work/nginx.conf"
fi
if [ "$server" = nginx ]; then
  # In the foreground, one process: the pid valgrind runs is the one
  # serving, and `nginx -s stop` in common.sh's cleanup finds it.
  (cd "$work" && exec valgrind --tool=callgrind --callgrind-out-file="$work/cg.%p" \
    nginx -p "$work" -c "$work/nginx.conf" -g 'daemon off; master_process off;' \
    > nginx.out 2> nginx.log) &
else
  (cd "$work" && exec valgrind --tool=callgrind --callgrind-out-file="$work/cg.%p" \
    "$bin/ktern" run -c ktern.toml > ktern.out 2> ktern.log) &
fi
vg=$!
pids+=("$vg")
# ktern drains on SIGTERM, slowly under valgrind: killed outright at the
# end (its counts are dumped by then).
trap 'status=$?; kill -9 "$vg" 2>/dev/null || true; (exit "$status"); cleanup' EXIT
wait_listening "$addr" "$backend"
# The client's own bound is --seconds; this is a backstop.
# Each prints one line with requests=N (the requests served) and errors=E.
load() {
  if [ -n "$hs" ]; then
    local out n r f
    out=$(timeout -k 5 900 "$bin/ktern-load" handshakes --addr "$addr" --threads 1 --max "$1" \
      --seconds 600 ${resume_flag:-})
    n=$(sed -nE 's/.*handshakes=([0-9]+).*/\1/p' <<<"$out")
    r=$(sed -nE 's/.*resumed=([0-9]+).*/\1/p' <<<"$out")
    f=$(sed -nE 's/.*failed=([0-9]+).*/\1/p' <<<"$out")
    # The count of the kind measured. A resuming run's first handshake is
    # full; any other that did not resume is an error here, or its full
    # handshake's instructions would count as a resumed one's.
    if [ "$hs" = resumed ]; then
      echo "requests=${r:-0} errors=$(( ${f:-1} + ${n:-0} - 1 - ${r:-0} )) (resumed handshakes)"
    else
      echo "requests=${n:-0} errors=${f:-1} (handshakes)"
    fi
  elif [ -n "$h2" ]; then
    local out ok bad
    out=$(timeout -k 5 900 h2load -c 20 -m 10 ${rate:+--rps "$rate"} -n "$1" "https://$addr/" 2>&1)
    ok=$(sed -nE 's/^requests: .* ([0-9]+) succeeded.*/\1/p' <<<"$out")
    bad=$(sed -nE 's/^requests: .* ([0-9]+) failed, ([0-9]+) errored.*/\1+\2/p' <<<"$out")
    echo "requests=${ok:-0} errors=$(( ${bad:-1} )) (h2load)"
  else
    timeout -k 5 900 "$bin/ktern-load" http --addr "$addr" --conns 20 --body-bytes 1024 \
      --max "$1" --seconds 600
  fi
}
check() { case "$1" in *" errors=0 "*) ;; *) echo "client errors: $1" >&2; exit 1 ;; esac; }
# Warm-up (the backend pool, first allocations), then zeroed counters.
out=$(load 200); check "$out"
callgrind_control -z "$vg" > /dev/null
n1=$((requests / 5))
out1=$(load "$n1"); check "$out1"
callgrind_control -d "$vg" > /dev/null
callgrind_control -z "$vg" > /dev/null
out2=$(load "$requests"); check "$out2"
callgrind_control -d "$vg" > /dev/null
echo "run 1: $out1"
echo "run 2: $out2"
python3 - "$work" "$out1" "$out2" "$top" "$server" <<'PY'
import collections, glob, re, sys
work, out1, out2, top, server = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]

def profile(path):
    """Self cost (Ir) per function, and calls per callee, from a dump."""
    names, cost, calls = {}, collections.Counter(), collections.Counter()
    fn, skip = None, False
    def name(s):
        m = re.match(r"\((\d+)\)(?: (.*))?", s)
        if not m:
            return s
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), s)
    cfn = None
    for line in open(path):
        if line.startswith("fn="):
            fn = name(line[3:].strip())
        elif line.startswith("cfn="):
            cfn = name(line[4:].strip())
        elif line.startswith("calls="):
            calls[cfn] += int(line[6:].split()[0])
            skip = True  # the next cost line is the call's, not fn's own
        elif line[:1].isdigit() or line[:1] in "+-*":
            parts = line.split()
            if len(parts) >= 2:
                if not skip:
                    cost[fn] += int(parts[-1])
                skip = False
    return cost, calls

dumps = sorted(glob.glob(f"{work}/cg.*.[0-9]*"), key=lambda p: int(p.rsplit(".", 1)[1]))
if len(dumps) < 2:
    sys.exit(f"expected two callgrind dumps in {work}, found {dumps}")
(c1, k1), (c2, k2) = profile(dumps[-2]), profile(dumps[-1])
count = lambda out: int(re.search(r"requests=(\d+)", out).group(1))
dn = count(out2) - count(out1)
per = lambda a, b: (b - a) / dn
total = per(sum(c1.values()), sum(c2.values()))
allocs = per(sum(k1[f] for f in ("malloc", "posix_memalign", "realloc", "calloc")),
             sum(k2[f] for f in ("malloc", "posix_memalign", "realloc", "calloc")))
aligned = per(k1["posix_memalign"], k2["posix_memalign"])
unit = {"handshakes": "full TLS 1.3 handshake", "resumed": "resumed TLS 1.3 handshake"}.get(
    re.search(r"\((\w+)", out2).group(1) if "(" in out2 else "", "keep-alive request")
print(f"\n{server}'s userspace instructions per {unit}: {total:,.0f}"
      f" ({dn} more in the second run than in the first: what both runs share cancels)")
print(f"allocations per {unit}: {allocs:.1f} (of which posix_memalign: {aligned:.1f})")
print(f"\n{'instructions':>12} {'share':>6}  function (self cost per {unit})")
rows = sorted(((per(c1.get(f, 0), c2[f]), f) for f in c2), reverse=True)[:top]
for v, f in rows:
    print(f"{v:12,.0f} {100 * v / total:5.1f}%  {f[:110]}")
PY
