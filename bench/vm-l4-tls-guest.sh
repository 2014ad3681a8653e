#!/bin/busybox sh
# Guest half of bench/vm-l4-tls.sh (runs inside the kTLS VM): a source
# backend, a TLS backend (ktern terminating TLS in front of it), and two
# ktern under test, each a `tcp` route with `tls` to that backend: one with
# ktls = "required" (both legs in the kernel, spliced), one with "off"
# (both legs on rustls). Prints each one's CPU ticks for the same
# downloads; under `-icount shift=0` a tick is 10^7 guest instructions.
# Usage: vm-l4-tls-guest.sh DOWNLOADS BYTES
bb=/bin/busybox
downloads=$1 bytes=$2
cd /tmp/b
/opt/ktern-load backend --listen 127.0.0.1:19702 --kind source --bytes "$bytes" --seconds 3600 &
/opt/ktern run -c backend.toml > /dev/null 2> backend.log &
/opt/ktern run -c ktern-required.toml > /dev/null 2> required.log &
required=$!
/opt/ktern run -c ktern-off.toml > /dev/null 2> off.log &
off=$!
$bb sleep 3
ticks() { $bb awk '{print $14 + $15}' "/proc/$1/stat"; }
for run in required:19443:$required off:19444:$off; do
  name=${run%%:*} rest=${run#*:}
  port=${rest%%:*} pid=${rest#*:}
  /opt/ktern-load download --addr "127.0.0.1:$port" --times 1 --bytes "$bytes" > /dev/null
  t0=$(ticks "$pid")
  out=$(/opt/ktern-load download --addr "127.0.0.1:$port" --times "$downloads" --bytes "$bytes")
  t1=$(ticks "$pid")
  echo "l4tls $name ticks=$((t1 - t0)) $out"
done
echo "tls_stat:"
$bb cat /proc/net/tls_stat
