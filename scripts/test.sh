#!/usr/bin/env bash
# Run every test: build the binaries the interop tests drive, then the suite,
# then print one closing "N passed, N failed" line over all test binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$rc"
