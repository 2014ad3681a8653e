#!/bin/busybox sh
# Guest half of bench/vm-http.sh (runs inside the kTLS VM): one HTTP backend
# and four servers proxying to it (nginx, ktern with ktls off, auto,
# required), each measured in turn by two closed-loop runs of the same
# client, then the floor: nginx proxying the same requests over plain TCP. Prints each server's CPU ticks and run time in ns for both runs
# and their requests (ktern-load's count: up to CONNS-1 past --max), and
# /proc/net/tls_stat before and after each server's runs; under `-icount
# shift=0` a ns is one guest instruction, a tick 10^7.
# H2=1: the client is h2load, ten streams per connection (HTTPS with ALPN
# h2; the floor in cleartext, prior knowledge).
# STATIC=1: every request is for /files/f.bin (BODY bytes), which nginx
# and ktern serve from /tmp/b/www; the floor sends it over plain HTTP.
# Usage: vm-http-guest.sh N1 N2 BODY CONNS [H2] [STATIC]
bb=/bin/busybox
n1=$1 n2=$2 body=$3 conns=$4 h2=${5:-0} static=${6:-0}
path=/
[ "$static" = 0 ] || path=/files/f.bin
cd /tmp/b || exit 1
# nginx resolves `user root root` at start; the initramfs has no user database.
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > /etc/passwd
printf 'root:x:0:\nnogroup:x:65534:\nnobody:x:65534:\n' > /etc/group
printf 'passwd: files\ngroup: files\n' > /etc/nsswitch.conf
$bb mkdir -p /tmp/b/tmp

/opt/ktern-load backend --listen 127.0.0.1:19702 --kind http --body-bytes "$body" --seconds 3600 &
/opt/nginx -p /tmp/b -c /tmp/b/nginx-vm.conf -e /tmp/b/nginx-error.log &
nginx=$!
for k in off auto required; do
  # shellcheck disable=SC2046 # one NAME=VALUE word per line
  $bb env $($bb cat ktern.env) /opt/ktern run -c "ktern-$k.toml" > /dev/null 2> "$k.log" &
  eval "ktern_$k=\$!"
done

# Waits (bounded) until PORT is listening: /proc/net/tcp, state 0A.
listening() {
  hex=$(printf '%04X' "$1")
  i=0
  while ! $bb grep -q ":$hex 00000000:0000 0A" /proc/net/tcp; do
    i=$((i + 1))
    [ "$i" -lt 300 ] || { echo "nothing listening on port $1"; return 1; }
    $bb sleep 0.1
  done
}
for p in 19702 19440 19441 19442 19443 19444; do
  listening "$p" || { $bb tail -5 /tmp/b/nginx-error.log *.log; exit 1; }
done
for k in off auto required; do
  echo "ktls $k: $($bb grep -m1 -o 'kTLS[^;]*' "$k.log")"
done

fail=0
ticks() { $bb awk '{print $14 + $15}' "/proc/$1/stat"; }
# User ticks alone (utime): with ticks, the user/kernel split.
uticks() { $bb awk '{print $14}' "/proc/$1/stat"; }
# Non-idle ticks of the whole guest (user nice system irq softirq steal):
# client, backend and kernel threads too, such as kTLS work deferred to
# kworkers, which the server's own figures miss.
busy() { $bb awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
# Run time in ns summed over the pid's threads (schedstat's first field, the
# scheduler's sum_exec_runtime, which /proc/PID/stat rounds down to ticks).
ns() { $bb cat /proc/"$1"/task/*/schedstat | $bb awk '{ s += $1 } END { printf "%.0f", s }'; }
tlsstat() { echo "tlsstat $1 $2 $($bb awk '{printf "%s=%s ", $1, $2}' /proc/net/tls_stat)"; }
# One client run of --max $2 requests; prints ktern-load's summary line
# (h2load's counts in the same form under H2).
# $plain: --plain for the floor (nginx's plain-HTTP listener).
plain=
load() {
  if [ "$h2" = 1 ]; then
    scheme=https
    [ -z "$plain" ] || scheme=http
    /opt/h2load -c "$conns" -m 10 -n "$2" "$scheme://127.0.0.1:$1/" |
      $bb awk '/^requests:/ { printf "requests=%s errors=%d client=h2load\n", $8, $10 + $12 + $14 }'
  else
    /opt/ktern-load http --addr "127.0.0.1:$1" --conns "$conns" --max "$2" --seconds 600 --body-bytes "$body" \
      --path "$path" $plain
  fi
  # The server handles the closes before its ticks are read.
  $bb sleep 1
}
count() { echo "$1" | $bb sed -n 's/^requests=\([0-9]*\) .*/\1/p'; }
# The last run is the floor: nginx proxying the same requests over plain
# TCP, no TLS on either side (the TCP work of the exchange and nginx's HTTP
# work alone); under STATIC, nginx sending the same file over plain HTTP
# with sendfile.
for run in nginx:19440:$nginx ktern-off:19441:$ktern_off ktern-auto:19442:$ktern_auto \
  ktern-required:19443:$ktern_required floor:19444:$nginx; do
  name=${run%%:*} rest=${run#*:}
  port=${rest%%:*} pid=${rest#*:}
  plain=
  [ "$name" != floor ] || plain=--plain
  tlsstat "$name" before
  # Warm-up: first allocations, the backend pool (fewer for bulk bodies).
  load "$port" $((n1 < 200 ? n1 : 200)) > /dev/null
  t0=$(ticks "$pid") u0=$(uticks "$pid") s0=$(ns "$pid") b0=$(busy)
  out1=$(load "$port" "$n1")
  t1=$(ticks "$pid") u1=$(uticks "$pid") s1=$(ns "$pid") b1=$(busy)
  out2=$(load "$port" "$n2")
  t2=$(ticks "$pid") u2=$(uticks "$pid") s2=$(ns "$pid") b2=$(busy)
  tlsstat "$name" after
  echo "http $name n1=$(count "$out1") ticks1=$((t1 - t0)) ns1=$((s1 - s0)) busy1=$((b1 - b0))" \
    "n2=$(count "$out2") ticks2=$((t2 - t1)) ns2=$((s2 - s1)) busy2=$((b2 - b1))" \
    "user1=$((u1 - u0)) user2=$((u2 - u1)) threads=$($bb ls /proc/"$pid"/task | $bb wc -l)"
  echo "  $out1"
  echo "  $out2"
  case "$out1 $out2" in *" errors=0 "*" errors=0 "*) ;; *) echo "client errors on $name"; fail=1 ;; esac
  if [ -x /opt/perf ]; then
    # A third, profiled run (after the measured ones, which perf would
    # disturb): cpu-clock samples, which under icount track instructions;
    # the share of AES-GCM (the kernel's aes_gcm_*/aesni, aws-lc's
    # aesni/ghash/gcm_/aes_hw), of the kernel's page zeroing (clear_page_*,
    # init_on_alloc) and the top symbols.
    echo 0 > /proc/sys/kernel/kptr_restrict
    /opt/perf record -e cpu-clock -F 1000 -p "$pid" -o "/tmp/perf-$name.data" > /dev/null 2>&1 &
    perf=$!
    $bb sleep 1
    load "$port" "$n1" > /dev/null
    kill -INT "$perf"
    $bb sleep 2
    /opt/perf report -i "/tmp/perf-$name.data" --no-children --sort symbol --stdio 2>/dev/null |
      $bb awk -v n="$name" '/^ +[0-9.]+%/ { p = $1 + 0; s = $NF == "-" ? $(NF-2) : $NF;
          if (s ~ /aes_gcm|aesni|ghash|gcm_|aes_hw/) c += p; else if (s ~ /clear_page/) z += p;
          if (++i <= 12) top = top sprintf(" %s %.1f%%", s, p) }
        END { printf "perf %s crypto=%.1f zeroing=%.1f top:%s\n", n, c, z, top }'
  fi
done
if [ -s /tmp/b/nginx-error.log ]; then
  echo "nginx error log:"
  $bb tail -5 /tmp/b/nginx-error.log
fi
exit "$fail"
