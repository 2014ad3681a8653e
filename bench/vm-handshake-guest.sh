#!/bin/busybox sh
# Guest half of bench/vm-handshake.sh (runs inside the kTLS VM): an echo
# backend, nginx (stream module: TLS and the plain-TCP floor) and ktern
# (`tcp` routes: ktls = "auto", "off", and auto with the keys to the kernel
# at the handshake, "kernel"), each measured in turn by two
# closed-loop runs of N1 and N2 connections from one client thread: full
# TLS 1.3 handshakes, then resumed ones (every connection of a run but the
# first resumes), then plain TCP on the floor listener. Each connection
# sends one byte through the echo backend and waits for it. Prints each
# server's run time in ns (schedstat, all threads) and CPU ticks for both
# runs; under `-icount shift=0` a ns is one guest instruction.
# Usage: vm-handshake-guest.sh N1 N2
bb=/bin/busybox
n1=$1 n2=$2
cd /tmp/b || exit 1
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > /etc/passwd
printf 'root:x:0:\nnogroup:x:65534:\nnobody:x:65534:\n' > /etc/group
printf 'passwd: files\ngroup: files\n' > /etc/nsswitch.conf

/opt/ktern-load backend --listen 127.0.0.1:19001 --kind echo --seconds 36000 &
/opt/nginx -p /tmp/b -c /tmp/b/nginx-vm.conf -e /tmp/b/nginx-error.log &
nginx=$!
/opt/ktern run -c ktern-auto.toml > /dev/null 2> auto.log &
ktern_auto=$!
/opt/ktern run -c ktern-off.toml > /dev/null 2> off.log &
ktern_off=$!
/opt/ktern run -c ktern-kernel.toml > /dev/null 2> kernel.log &
ktern_kernel=$!

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
for p in 19001 19540 19541 19542 19543 19544; do
  listening "$p" || { $bb tail -5 /tmp/b/nginx-error.log *.log; exit 1; }
done
echo "ktls auto: $($bb grep -m1 -o 'kTLS[^;]*' auto.log)"

ticks() { $bb awk '{print $14 + $15}' "/proc/$1/stat"; }
ns() { $bb cat /proc/"$1"/task/*/schedstat | $bb awk '{ s += $1 } END { printf "%.0f", s }'; }
tlsstat() { echo "tlsstat $1 $2 $($bb awk '{printf "%s=%s ", $1, $2}' /proc/net/tls_stat)"; }
# One client run of $2 connections on port $1 with ktern-load's flags $3.
load() {
  # shellcheck disable=SC2086 # $3: flags, one word each
  /opt/ktern-load handshakes --addr "127.0.0.1:$1" --threads 1 --seconds 36000 --max "$2" $3
  # The server handles the closes before its ticks are read.
  $bb sleep 1
}
count() { echo "$1" | $bb sed -n 's/^handshakes=\([0-9]*\) .*/\1/p'; }
fail=0
for run in nginx:19540:$nginx:full nginx:19540:$nginx:resumed ktern-auto:19542:$ktern_auto:full \
  ktern-auto:19542:$ktern_auto:resumed ktern-off:19543:$ktern_off:full ktern-off:19543:$ktern_off:resumed \
  ktern-kernel:19544:$ktern_kernel:full ktern-kernel:19544:$ktern_kernel:resumed floor:19541:$nginx:plain; do
  name=${run%%:*} rest=${run#*:}
  port=${rest%%:*} rest=${rest#*:}
  pid=${rest%%:*} kind=${rest#*:}
  case $kind in full) flags= ;; resumed) flags=--resume ;; plain) flags=--plain ;; esac
  tlsstat "$name-$kind" before
  load "$port" 20 "$flags" > /dev/null
  t0=$(ticks "$pid") s0=$(ns "$pid")
  out1=$(load "$port" "$n1" "$flags")
  t1=$(ticks "$pid") s1=$(ns "$pid")
  out2=$(load "$port" "$n2" "$flags")
  t2=$(ticks "$pid") s2=$(ns "$pid")
  tlsstat "$name-$kind" after
  echo "hs $name $kind n1=$(count "$out1") ticks1=$((t1 - t0)) ns1=$((s1 - s0))" \
    "n2=$(count "$out2") ticks2=$((t2 - t1)) ns2=$((s2 - s1))"
  echo "  $out1"
  echo "  $out2"
  case "$out1 $out2" in *" failed=0 "*" failed=0 "*) ;; *) echo "client failures on $name $kind"; fail=1 ;; esac
  if [ -x /opt/perf ] && [ "$kind" = resumed ]; then
    # A third, profiled run (after the measured ones, which perf would
    # disturb): cpu-clock samples, which under icount track instructions.
    echo 0 > /proc/sys/kernel/kptr_restrict
    /opt/perf record -e cpu-clock -F 10000 -p "$pid" -o "/tmp/perf-$name.data" > /dev/null 2>&1 &
    perf=$!
    $bb sleep 1
    load "$port" "$n2" "$flags" > /dev/null
    kill -INT "$perf"
    $bb sleep 2
    /opt/perf report -i "/tmp/perf-$name.data" --no-children --sort dso,symbol --stdio 2>/dev/null |
      $bb awk -v n="$name" '/^ +[0-9.]+%/ { if (++i <= 40) print "perf " n " " $0 }'
  fi
done
# The crypto floor: a full handshake's server-side crypto (X25519 share and
# agreement, an ECDSA P-256 signature) in one thread, n1 then n2 times.
c1=$(/opt/ktern-load crypto --count "$n1")
c2=$(/opt/ktern-load crypto --count "$n2")
echo "crypto n1=$n1 $(echo "$c1" | $bb sed 's/handshakes=[0-9]* //; s/_ns=/_ns1=/g')" \
  "n2=$n2 $(echo "$c2" | $bb sed 's/handshakes=[0-9]* //; s/_ns=/_ns2=/g')"
if [ -s /tmp/b/nginx-error.log ]; then
  echo "nginx error log:"
  $bb tail -5 /tmp/b/nginx-error.log
fi
exit "$fail"
