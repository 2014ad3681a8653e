# Shared set-up for the benchmark scripts that source it: a release build
# (or $KTERN_BENCH_BIN's binaries), a scratch directory ($work) with an ECDSA
# P-256 certificate for localhost (cert.pem, key.pem), $bin for the binaries,
# and a $pids list killed on exit.
# Sourced from the repository root.
dpkg-query -W -f='${Status}' openssl 2>/dev/null | grep -q "ok installed" ||
  apt-get install -y -qq --no-install-recommends openssl >/dev/null
# KTERN_BENCH_BIN names a directory of prebuilt binaries (ktern, ktern-load)
# to use instead of building, e.g. while another build holds the machine.
if [ -n "${KTERN_BENCH_BIN:-}" ]; then
  # Absolute: some scripts start the servers from inside $work.
  bin=$(realpath "$KTERN_BENCH_BIN")
else
  cargo build --release --quiet --bins
  bin=$PWD/target/release
fi
work=$(mktemp -d "/tmp/ktern-${bench_name:-bench}.XXXXXX")
# Where the backends run. The server under test has CPU 1 (each script's
# taskset, nginx_head's worker_cpu_affinity) and the client CPU 0. On two
# CPUs the backend shares CPU 0 with the client; from four on it gets
# CPU 2: on this project's 2-CPU machine the open-loop p99 of the floor
# (nginx without TLS, less work than any server measured) was often above
# nginx's with TLS, so the tail there was mostly the load generator's side
# (bench/README.md, "p99"), and a backend off the client's CPU is the first
# thing to try against that. KTERN_BENCH_BACKEND_CPU overrides (run.sh sets
# it, by the same rule, for every script); where CPU 2 is CPU 0's
# hyperthread sibling, name another.
backend_cpu=${KTERN_BENCH_BACKEND_CPU:-$([ "$(nproc)" -ge 4 ] && echo 2 || echo 0)}
pids=()
# A second signal ends ktern's drain at once, so the next run can bind the
# same address (ktern refuses to start on an address another process
# holds); an nginx started with $work's config is stopped. $work (its
# servers' logs, compare-files.sh's 64 MiB files, callgrind's dumps) is
# removed after a run that succeeded, unless KTERN_BENCH_KEEP is set, and
# kept, named on stderr, after one that failed.
cleanup() {
  local status=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.2
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ ! -f "$work/nginx.conf" ] || nginx -p "$work" -c "$work/nginx.conf" -s stop 2>/dev/null || true
  if [ "$status" -eq 0 ] && [ -z "${KTERN_BENCH_KEEP:-}" ]; then
    rm -rf "$work"
  else
    echo "scratch directory kept: $work" >&2
  fi
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"
openssl ecparam -name prime256v1 -genkey -noout -out "$work/key.pem"
openssl req -x509 -new -key "$work/key.pem" -subj /CN=localhost -addext subjectAltName=DNS:localhost \
  -days 90 -out "$work/cert.pem" 2>/dev/null

# A TLS backend's certificate for localhost, issued by a CA of its own:
# $work/backend.pem and backend.key, trusted through $work/ca.pem (WebPKI
# refuses a self-signed CA certificate such as cert.pem as a server's).
ca_issued_cert() {
  openssl ecparam -name prime256v1 -genkey -noout -out "$work/ca.key"
  openssl req -x509 -new -key "$work/ca.key" -subj /CN=bench-ca -days 90 -out "$work/ca.pem" 2>/dev/null
  openssl ecparam -name prime256v1 -genkey -noout -out "$work/backend.key"
  openssl req -new -key "$work/backend.key" -subj /CN=localhost -out "$work/backend.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$work/backend.ext"
  openssl x509 -req -in "$work/backend.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
    -days 90 -extfile "$work/backend.ext" -out "$work/backend.pem" 2>/dev/null
}

# "utime stime" (clock ticks) summed over the given pids, all threads.
ticks() {
  local u=0 s=0 p a b
  for p in "$@"; do read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat"); u=$((u + a)) s=$((s + b)); done
  echo "$u $s"
}

# Resident bytes of a pid.
rss() { echo $(( $(awk '/VmRSS/ {print $2}' "/proc/$1/status") * 1024 )); }

# Waits (bounded, no probe connections) until each address is listening.
wait_listening() {
  local addr i
  for addr in "$@"; do
    for i in $(seq 1 100); do
      [ -n "$(ss -Hltn "sport = :${addr#*:}")" ] && break
      [ "$i" -lt 100 ] || { echo "nothing listening on $addr" >&2; exit 1; }
      sleep 0.1
    done
  done
}

# The start of an nginx config for $work: one worker on CPU 1, no access
# log, temp files under $work, keep-alive request limits lifted so no
# client has to reconnect mid-run. The caller closes the http block.
nginx_head() {
  mkdir -p "$work/tmp"
  cat <<CONF
worker_processes 1;
worker_cpu_affinity 10;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/tmp/body;
  proxy_temp_path $work/tmp/proxy;
  fastcgi_temp_path $work/tmp/fastcgi;
  uwsgi_temp_path $work/tmp/uwsgi;
  scgi_temp_path $work/tmp/scgi;
  keepalive_requests 1000000;
CONF
}

# An nginx config for $work (nginx_head): TLS 1.3 on `listen $1`,
# proxy_pass to the keep-alive upstream $2 keeping ${3:-64} idle
# connections; upstream keep-alive request limits lifted too, so neither
# server does handshakes mid-run.
nginx_conf() {
  nginx_head
  cat <<CONF
  upstream b {
    server $2;
    keepalive ${3:-64};
    keepalive_requests 1000000;
  }
  server {
    listen $1;
    ssl_certificate $work/cert.pem;
    ssl_certificate_key $work/key.pem;
    ssl_protocols TLSv1.3;
    ssl_ecdh_curve X25519:prime256v1;
    location / {
      proxy_pass http://b;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
}

# The main context of an nginx config for the kTLS VM's guest, files under
# $1 (/tmp/b there): one process (no master, so one pid's ticks are all of
# nginx's), root (the guest has no other user). Callers name the file
# nginx-vm.conf: the cleanup above would run `nginx -s stop` on the host
# against an nginx.conf.
nginx_vm_head() {
  cat <<CONF
daemon off;
master_process off;
worker_processes 1;
user root root;
pid $1/nginx.pid;
error_log $1/nginx-error.log warn;
events { worker_connections 1024; }
CONF
}

# A ktern listener with TLS on $1 (cert.pem, key.pem under $work), up to
# its route's kind $2.
ktern_listener_head() {
  cat <<TOML
[[listener]]
address = "$1"
[[listener.certificate]]
cert = "cert.pem"
key = "key.pem"
[listener.route]
kind = "$2"
TOML
}

# One ktern listener with TLS on $1 and a `tcp` route to the backend $2.
ktern_tcp_listener() {
  ktern_listener_head "$1" tcp
  echo "backends = [\"$2\"]"
}

# A ktern config for $work: one shard on CPU ${KTERN_CPU:-1}, TLS on $1, an
# `http` route to the upstream $2 keeping ${3:-64} idle backend connections
# and the lines $4 in its table, plus the KTERN_RUNTIME lines in [runtime]
# and the KTERN_RULES rules before the catch-all one.
# No [access_log]: off, as nginx's.
ktern_http_conf() {
  printf '[runtime]\ncpus = [%s]\n%s\n' "${KTERN_CPU:-1}" "${KTERN_RUNTIME:-}"
  ktern_listener_head "$1" http
  cat <<TOML
${KTERN_RULES:-}
[[listener.route.rule]]
upstream = "app"
[upstream.app]
backends = ["$2"]
pool_size = ${3:-64}
${4:-}
TOML
}

# HAProxy (Debian's package) for the side-by-side runs: installed if
# missing; `haproxy_conf MODE` prints a config head (one thread on CPU 1, as
# nginx's one worker; `mode MODE`; long timeouts) and `haproxy_start`
# runs $work/haproxy.cfg in the foreground on CPU 1 (pid in $haproxy_pid).
# HAProxy reads the certificate and key from one file: $work/haproxy.pem.
haproxy_conf() {
  dpkg-query -W -f='${Status}' haproxy 2>/dev/null | grep -q "ok installed" ||
    apt-get install -y -qq --no-install-recommends haproxy >/dev/null
  cat "$work/cert.pem" "$work/key.pem" > "$work/haproxy.pem"
  # Two fds per proxied connection, within the hard limit (HAProxy
  # refuses to start if it cannot raise its own to fit maxconn).
  local maxconn=$(( $(ulimit -Hn) / 2 - 100 ))
  cat <<CONF
global
  nbthread 1
  cpu-map 1/1 1
  maxconn $maxconn
  ssl-default-bind-options ssl-min-ver TLSv1.3
  tune.ssl.cachesize 100000
defaults
  mode $1
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  timeout http-keep-alive 120s
  maxconn $maxconn
CONF
}
haproxy_start() {
  taskset -c 1 haproxy -f "$work/haproxy.cfg" -db > "$work/haproxy.log" 2>&1 & pids+=($!)
  haproxy_pid=$!
}

# With `--json FILE`, a script writes its results (the `res` array: keys
# like ktern.peak.cpu) as one JSON object, for bench/run.sh.
res_json() {
  [ -n "${1:-}" ] || return 0
  for k in "${!res[@]}"; do printf '%s\t%s\n' "$k" "${res[$k]}"; done | python3 -c '
import json, sys
out = {}
for line in sys.stdin:
    k, v = line.rstrip("\n").split("\t")
    try:
        out[k] = float(v)
    except ValueError:
        out[k] = v
json.dump(out, open(sys.argv[1], "w"), indent=1, sort_keys=True)' "$1"
}
