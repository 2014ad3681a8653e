#!/usr/bin/env bash
# The full test suite: unit + integration tests with both crypto providers,
# then the kTLS suite inside qemu on Debian's 6.1 and 6.18 kernels.
set -euo pipefail
cd "$(dirname "$0")/.."

# The HTTP/2 interop clients of tests/h2.rs: nghttp and h2load (Debian's
# nghttp2-client) and Python's h2: from PyPI, or Debian's python3-h2 when
# `python3` is the system one (whose pip refuses installs, PEP 668).
sudo_cmd=""
[ "$(id -u)" -eq 0 ] || sudo_cmd="sudo -n"
apt_install() {
  $sudo_cmd apt-get install -y -qq --no-install-recommends "$@" ||
    { $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq --no-install-recommends "$@"; }
}
# What the suites assert is there (each panics without it, so that a
# missing tool cannot pass for a passing test): curl and openssl (the
# interop clients), pebble (tests/acme.rs's ACME server), prometheus
# (promtool checks /metrics), iproute2 (tests/fleet.rs's network
# namespaces).
missing=()
for p in curl openssl pebble prometheus iproute2; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
command -v h2load >/dev/null || apt_install nghttp2-client
# strace: tests/http.rs counts the syscalls of a keep-alive request with it.
command -v strace >/dev/null || apt_install strace
# testssl.sh: tests/http.rs audits a listener's TLS with it.
command -v testssl >/dev/null || apt_install testssl.sh
# python3-seccomp: tests/http.rs serves static files under a seccomp filter
# that refuses openat2, as old container profiles do.
/usr/bin/python3 -c 'import seccomp' 2>/dev/null || apt_install python3-seccomp
# nginx: the PROXY-protocol backend of tests/proxy_protocol.rs.
[ -x /usr/sbin/nginx ] || apt_install nginx
python3 -c 'import h2' 2>/dev/null ||
  python3 -m pip install -q h2 2>/dev/null ||
  apt_install python3-h2 ||
  echo "warning: could not install Python's h2; tests/h2.rs's hostile-client test will fail" >&2

t0=$SECONDS
stamp() { echo "=== $* === [$((SECONDS - t0)) s into scripts/test.sh]"; }
stamp "cargo test (aws-lc-rs, the default provider)"
cargo test --all-targets
# The ring pass runs what the provider changes: the unit tests, and the
# suites whose handshakes, tickets, certificates, key exports and ACME
# account signatures (instant-acme, rcgen) go through it. The HTTP/1.1 and
# HTTP/2 suites work on the established session, the same code under either
# provider, and are left to the default pass (they are half its time).
# clippy builds every target with ring, so none stops compiling unseen.
stamp "cargo test (ring provider)"
cargo test --no-default-features --features ring --lib --bins --test acme \
  --test certs --test fleet --test handshake_cost --test l4 --test live --test proxy_protocol
# The memory budgets again, against the release build: what operators run,
# and what an idle connection's size depends on (a future's layout differs
# between builds; one change once passed these in debug and failed them in
# release, tests/h2.rs's idle budget by 0.4 KB).
stamp "memory budgets against the release build"
. scripts/lib.sh
release_bin=$(ktern_binary --release)
KTERN_TEST_BIN=$release_bin cargo test --test l4 --test http --test h2 --test live -- \
  idle_connections_stay_within_their_memory_budget \
  memory_freed_by_a_flood_goes_back_to_the_kernel \
  slow_readers_hold_at_most_a_read_buffer_and_a_record \
  idle_http2_connections_stay_within_their_memory_budget \
  sighup_flood_ends_with_the_last_config_live_and_no_leak
stamp "kTLS suite in the VM"
scripts/vm-tests.sh
stamp "done"
