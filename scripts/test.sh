#!/usr/bin/env bash
# The full test suite: unit + integration tests with both crypto providers,
# then the kTLS suite inside qemu on Debian's 6.1 and 6.18 kernels.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "=== cargo test (aws-lc-rs, the default provider) ==="
cargo test --all-targets
echo "=== cargo test (ring provider) ==="
cargo test --no-default-features --features ring --all-targets
echo "=== kTLS suite in the VM ==="
scripts/vm-tests.sh
