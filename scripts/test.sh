#!/usr/bin/env bash
# Run every test: build the binaries the interop tests drive, fetch the guest
# harness, then the suite,
# then print one closing "N passed, N failed" line over all test binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
# The guest harness (QEMU's system emulator, a kernel, busybox) for the tests
# that need a kernel module or a device this host lacks: fetched once.
scripts/vm/setup.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$rc"
