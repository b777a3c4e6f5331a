#!/usr/bin/env bash
# qcow2 against raw (both through ringblk) and against qemu-img, side by side in
# one run on a warm page cache. This VM's numbers move by +-20% between runs,
# so every figure is the median of RUNS runs, with the contenders interleaved.
#   1. 4k random reads and writes at depth 32: ringblk bench on a fully
#      allocated 1 GiB qcow2 image vs the same data as raw.
#   2. qemu-img bench (aio=io_uring, its sequential pattern) vs ringblk bench
#      (same pattern) on the same qcow2 image, reads and writes.
#   3. convert of a 4 GiB mixed raw image (random data, zero blocks, holes) to
#      qcow2, and with -c (zlib), against qemu-img convert (hyperfine).
#   4. the floor under 3: writing the same 1 GiB of data to a new file with dd
#      (page-cache writes to one file run one at a time under its inode lock).
# Usage: scripts/bench/qcow2.sh [workdir]   (release build, qemu-img, hyperfine)
#   ONLY=convert runs 3 and 4 alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-$(mktemp -d /var/tmp/ringblk-bench.XXXX)}
R=$PWD/target/release/ringblk
RUNS=${RUNS:-5}
cargo build --release -p ringblk-cli >/dev/null
RAW=$W/bench.raw
Q=$W/bench.qcow2
[ -f "$RAW" ] || dd if=/dev/urandom of="$RAW" bs=1M count=1024 status=none
[ -f "$Q" ] || qemu-img convert -O qcow2 "$RAW" "$Q"
cat "$RAW" "$Q" >/dev/null

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# Each run starts with no dirty data: writeback left by the previous run
# halved the write rates of whichever contender came next.
rb_iops() { # fmt file pattern [-w] count
  sync
  "$R" bench -f "$1" -c "$5" -d 32 --pattern "$3" $4 --output=json "$2" |
    python3 -c "import json,sys; print(round(json.load(sys.stdin)[0]['iops']))"
}
qi_iops() { # [-w] count
  sync
  local t; t=$( { /usr/bin/time -f %e qemu-img bench $1 -f qcow2 -i io_uring -c "$2" -d 32 "$Q" >/dev/null; } 2>&1 )
  echo "$2 / $t" | bc
}

# Median wall time in ms of each command, runs interleaved, "$W/out.qcow2"
# removed and the disk synced before each: timed NAME CMD [NAME CMD ...]
timed() {
  local -a names cmds; local i r s e
  while [ $# -gt 0 ]; do names+=("$1"); cmds+=("$2"); shift 2; done
  for i in "${!names[@]}"; do : >"$W/t.$i"; done
  for r in $(seq "$RUNS"); do
    for i in "${!names[@]}"; do
      rm -f "$W/out.qcow2" "$W/floor.img"; sync
      s=$(date +%s%N); eval "${cmds[$i]}" >/dev/null; e=$(date +%s%N)
      echo $(( (e - s) / 1000000 )) >>"$W/t.$i"
    done
  done
  for i in "${!names[@]}"; do
    echo "${names[$i]}: median $(median <"$W/t.$i") ms, min $(sort -n "$W/t.$i" | head -1) ms"
  done
}

if [ "${ONLY:-}" != convert ]; then
echo "== 4k at depth 32, median of $RUNS interleaved runs =="
for mode in "" "-w"; do
  n=2000000; [ -n "$mode" ] && n=500000
  : >"$W/raw.txt"; : >"$W/q.txt"
  for _ in $(seq "$RUNS"); do
    rb_iops raw "$RAW" rand "$mode" $n >>"$W/raw.txt"
    rb_iops qcow2 "$Q" rand "$mode" $n >>"$W/q.txt"
  done
  r=$(median <"$W/raw.txt"); q=$(median <"$W/q.txt")
  echo "random ${mode:--r}: raw $r IOPS, qcow2 $q IOPS, qcow2/raw $(echo "scale=2; $q/$r" | bc)"
done
for mode in "" "-w"; do
  n=2000000; [ -n "$mode" ] && n=500000
  : >"$W/qi.txt"; : >"$W/rq.txt"
  for _ in $(seq "$RUNS"); do
    qi_iops "$mode" $n >>"$W/qi.txt"
    rb_iops qcow2 "$Q" seq "$mode" $n >>"$W/rq.txt"
  done
  a=$(median <"$W/qi.txt"); b=$(median <"$W/rq.txt")
  echo "qcow2 seq ${mode:--r}: qemu-img bench $a IOPS, ringblk bench $b IOPS, ratio $(echo "scale=2; $b/$a" | bc)"
done

fi

echo "== convert 4 GiB mixed raw -> qcow2 =="
# Not compare.sh's mixed.raw (half random, no text): a shared workdir must
# not hand one script the other's image.
MIX=$W/mixed-text.raw
if [ ! -f "$MIX" ]; then
  truncate -s 4G "$MIX"
  for i in $(seq 0 63); do
    case $((i % 4)) in
      0) dd if=/dev/urandom of="$MIX" bs=1M count=32 seek=$((i*64)) conv=notrunc status=none ;;
      1) # compressible: text-like
         python3 -c "import sys; sys.stdout.buffer.write((b'ringblk qcow2 cluster $i refcount table block ' * 800000)[:32<<20])" |
           dd of="$MIX" bs=1M seek=$((i*64)) conv=notrunc iflag=fullblock status=none ;;
      2) dd if=/dev/zero of="$MIX" bs=1M count=32 seek=$((i*64)) conv=notrunc status=none ;;
      3) ;; # hole
    esac
  done
fi
cat "$MIX" >/dev/null
echo "-m 16 -W, median of $RUNS interleaved runs:"
timed "qemu-img convert" "qemu-img convert -m 16 -W -f raw -O qcow2 $MIX $W/out.qcow2" \
  "ringblk convert" "$R convert -m 16 -W -f raw -O qcow2 $MIX $W/out.qcow2" \
  "floor: dd 1 GiB to a new file" "dd if=/dev/zero of=$W/floor.img bs=2M count=512 status=none"
$R convert -m 16 -W -f raw -O qcow2 "$MIX" "$W/out.qcow2"
qemu-img compare "$MIX" "$W/out.qcow2"
hyperfine -w 1 -r "$RUNS" -p "rm -f $W/outc.qcow2; sync" \
  "qemu-img convert -c -f raw -O qcow2 $MIX $W/outc.qcow2" \
  "$R convert -c -f raw -O qcow2 $MIX $W/outc.qcow2" 2>&1 | grep -E "Benchmark|Time|faster|±"
qemu-img compare "$MIX" "$W/outc.qcow2"
qemu-img convert -c -f raw -O qcow2 "$MIX" "$W/outc-qemu.qcow2"
echo "compressed sizes: qemu-img $(stat -c %s "$W/outc-qemu.qcow2"), ringblk $(stat -c %s "$W/outc.qcow2")"
