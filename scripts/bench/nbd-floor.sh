#!/usr/bin/env bash
# The kernel's floor under an NBD server's CPU per 4 KiB request on this
# machine: builds scripts/bench/nbd-floor.c with cc and runs each of its
# modes RUNS times on a page-cached file of IMAGE_SIZE random bytes, printing
# the median. Compare with the "server CPU per request" table of
# scripts/bench/nbd.sh: no server can go below these figures with the same
# system calls, and a target under them is out of reach on this machine.
# Usage: scripts/bench/nbd-floor.sh [workdir]   RUNS=5 IMAGE_SIZE=1G REQUESTS=400000 BATCH=32
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-$(mktemp -d /var/tmp/ringblk-floor.XXXX)}
mkdir -p "$W"
RUNS=${RUNS:-5}
IMAGE_SIZE=${IMAGE_SIZE:-1G}
REQUESTS=${REQUESTS:-400000}
cc -O2 -Wall -DBATCH="${BATCH:-32}" -o "$W/nbd-floor" scripts/bench/nbd-floor.c -lpthread
img=$W/floor.raw
if [ ! -f "$img" ]; then
  head -c "$IMAGE_SIZE" /dev/urandom >"$img"
fi
cat "$img" >/dev/null
for mode in read-copy read-splice read-map read-vmsplice read-vmsplice-arena write; do
  for _ in $(seq "$RUNS"); do
    "$W/nbd-floor" "$mode" "$img" "$REQUESTS" | awk '{print $2}'
  done | sort -n | awk -v m="$mode" '{v[NR]=$1} END {printf "%-12s %s us/request (median of %d)\n", m, v[int((NR+1)/2)], NR}'
done
