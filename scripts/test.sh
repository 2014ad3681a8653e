#!/usr/bin/env bash
# The full test suite: unit + integration tests with both crypto providers,
# then the kTLS suite inside qemu on Debian's 6.1 and 6.18 kernels.
set -euo pipefail
cd "$(dirname "$0")/.."

# The HTTP/2 interop clients of tests/h2.rs: nghttp and h2load (Debian's
# nghttp2-client) and Python's h2 (PyPI; Debian's python3-h2 serves the
# system python only).
if ! command -v h2load >/dev/null; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo -n"
  $sudo_cmd apt-get install -y -qq --no-install-recommends nghttp2-client ||
    { $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq --no-install-recommends nghttp2-client; }
fi
python3 -c 'import h2' 2>/dev/null || python3 -m pip install -q h2

echo "=== cargo test (aws-lc-rs, the default provider) ==="
cargo test --all-targets
echo "=== cargo test (ring provider) ==="
cargo test --no-default-features --features ring --all-targets
echo "=== kTLS suite in the VM ==="
scripts/vm-tests.sh
