#!/bin/busybox sh
# Guest half of bench/vm-l4-tls.sh (runs inside the kTLS VM): a source
# backend, a TLS backend (ktern terminating TLS in front of it), and two
# ktern under test, each a `tcp` route with `tls` to that backend: one with
# ktls = "required" (both legs in the kernel, spliced), one with "off"
# (both legs on rustls). Prints each one's CPU ticks for the same
# downloads; under `-icount shift=0` a tick is 10^7 guest instructions.
# With /opt/perf (the host's perf, copied in), each measured run is also
# sampled on cpu-clock, which under icount tracks instructions: the share
# of the record crypto (the floor) and of page zeroing is printed.
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
  if [ -x /opt/perf ]; then
    echo 0 > /proc/sys/kernel/kptr_restrict
    /opt/perf record -e cpu-clock -F 1000 -p "$pid" -o "/tmp/perf-$name.data" > /dev/null 2>&1 &
    perf=$!
    $bb sleep 1
  fi
  t0=$(ticks "$pid")
  out=$(/opt/ktern-load download --addr "127.0.0.1:$port" --times "$downloads" --bytes "$bytes")
  t1=$(ticks "$pid")
  echo "l4tls $name ticks=$((t1 - t0)) $out"
  if [ -x /opt/perf ]; then
    kill -INT "$perf"
    $bb sleep 2
    # AES-GCM in the kernel (aes_gcm_*_aesni_avx) or in aws-lc
    # (_aesni_ctr32_ghash_6x, aes_hw_*, gcm_*); page zeroing (clear_page_*,
    # init_on_alloc) is the kernel's, counted per byte under TCG.
    /opt/perf report -i "/tmp/perf-$name.data" --no-children --sort symbol --stdio 2>/dev/null |
      $bb awk -v n="$name" '/^ +[0-9.]+%/ { p = $1 + 0; s = $NF == "-" ? $(NF-2) : $NF;
          if (s ~ /aes_gcm|aesni|ghash|gcm_|aes_hw/) c += p; else if (s ~ /clear_page/) z += p;
          if (++i <= 6) top = top sprintf(" %s %.1f%%", s, p) }
        END { printf "perf %s crypto=%.1f zeroing=%.1f top:%s\n", n, c, z, top }'
  fi
done
echo "tls_stat:"
$bb cat /proc/net/tls_stat
