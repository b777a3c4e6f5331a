#!/usr/bin/env bash
# Side-by-side benchmark on one warm-page-cache 1 GiB raw file, 4k requests at
# depth 32: qemu-img bench (aio=io_uring), fio (io_uring, with and without
# SQPOLL) and ringblk bench (all shards, one shard, SQPOLL). Then convert of a
# 4 GiB mixed image: qemu-img convert -m 16 -W against ringblk convert -m 16 -W.
# Usage: scripts/bench/compare.sh [workdir]   (needs release build, qemu-img, fio)
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-$(mktemp -d /var/tmp/ringblk-bench.XXXX)}
R=target/release/ringblk
cargo build --release -p ringblk-cli >/dev/null
IMG=$W/bench.raw
[ -f "$IMG" ] || dd if=/dev/urandom of="$IMG" bs=1M count=1024 status=none
cat "$IMG" >/dev/null   # warm the page cache
N=2000000

echo "== 4k reads, depth 32, $N requests, warm page cache =="
t=$( { /usr/bin/time -f %e qemu-img bench -f raw -i io_uring -c $N -d 32 "$IMG" >/dev/null; } 2>&1 )
echo "qemu-img bench (io_uring, seq):   $(echo "$N / $t" | bc) IOPS"
for p in seq rand; do
  $R bench -f raw -c $N -d 32 --pattern $p --output=json "$IMG" | python3 -c "import json,sys; r=json.load(sys.stdin)[0]; print(f\"ringblk bench ({r['shards']} shards, $p):   {r['iops']:.0f} IOPS\")"
  $R bench -f raw -c $N -d 32 --pattern $p --shards 1 --output=json "$IMG" | python3 -c "import json,sys; r=json.load(sys.stdin)[0]; print(f\"ringblk bench (1 shard, $p):   {r['iops']:.0f} IOPS\")"
  $R bench -f raw -c $N -d 32 --pattern $p --shards 1 --poll --output=json "$IMG" | python3 -c "import json,sys; r=json.load(sys.stdin)[0]; print(f\"ringblk bench (1 shard SQPOLL, $p):   {r['iops']:.0f} IOPS\")"
done
if command -v fio >/dev/null; then
  for sq in 0 1; do
    iops=$(fio --name=r --filename="$IMG" --rw=randread --bs=4k --iodepth=32 --ioengine=io_uring --sqthread_poll=$sq \
      --numjobs=1 --invalidate=0 --time_based --runtime=5 --output-format=json | python3 -c "import json,sys; print(round(json.load(sys.stdin)['jobs'][0]['read']['iops']))")
    echo "fio io_uring randread (sqpoll=$sq): $iops IOPS"
  done
fi

echo "== convert 4 GiB mixed raw -> raw =="
MIX=$W/mixed.raw
if [ ! -f "$MIX" ]; then
  truncate -s 4G "$MIX"
  for i in $(seq 0 63); do
    case $((i % 4)) in
      0|1) dd if=/dev/urandom of="$MIX" bs=1M count=32 seek=$((i*64)) conv=notrunc status=none ;;
      2) dd if=/dev/zero of="$MIX" bs=1M count=32 seek=$((i*64)) conv=notrunc status=none ;;
      3) ;; # hole
    esac
  done
fi
cat "$MIX" >/dev/null
# Both with their default target cache (unsafe: no flush at the end) and with
# -t writeback (flushed). hyperfine runs each several times after a sync.
for t in "" "-t writeback"; do
  hyperfine -w 1 -r 10 -p "rm -f $W/out.raw; sync" \
    "qemu-img convert $t -m 16 -W -f raw -O raw $MIX $W/out.raw" \
    "$R convert $t -m 16 -W -f raw -O raw $MIX $W/out.raw" 2>&1 | grep -E "Benchmark|Time"
done
qemu-img compare "$MIX" "$W/out.raw"
