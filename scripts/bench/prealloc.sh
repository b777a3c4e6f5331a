#!/usr/bin/env bash
# The preallocate filter's benchmark: a sequential growing write of a new
# qcow2 image (depth 16), side by side in one run, on filesystems made on
# loop devices for the run (and torn down after):
#   ringblk        ringblk bench -w (one shard, so depth 16 is the total), qcow2 straight on the file
#   ringblk+pre    ringblk bench -w through driver=preallocate
#   qemu           qemu-img bench -w, qcow2 straight on the file
#   qemu+pre       qemu-img bench -w through QEMU's preallocate filter
#   ceiling        fio (io_uring, O_DIRECT, depth 16) overwriting an already
#                  allocated file of the same size (cache=none only): what the
#                  disk does
# for 64k and 1M requests, cache=none and cache=writeback, the contenders
# taking turns run by run. Prints MB/s (median of RUNS), then the ratios the
# issue asks for.
#
# Usage: scripts/bench/prealloc.sh [workdir]   (root; release build of
#   ringblk; qemu-img; fio; mkfs.ext4/mkfs.xfs/mkfs.btrfs for the filesystems)
#   RUNS=3 SIZE=2G FS_SIZE=6G FILESYSTEMS="ext4 xfs btrfs" SIZES="64k 1M"
#   CACHES="none writeback" RINGBLK=target/release/ringblk
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-$(mktemp -d /var/tmp/ringblk-prealloc.XXXX)}
mkdir -p "$W"
RUNS=${RUNS:-3}
SIZE=${SIZE:-2G}
FS_SIZE=${FS_SIZE:-6G}
FILESYSTEMS=${FILESYSTEMS:-ext4 xfs btrfs}
SIZES=${SIZES:-64k 1M}
CACHES=${CACHES:-none writeback}
R=${RINGBLK:-target/release/ringblk}
[ -x "$R" ] || { echo "build first: cargo build --release -p ringblk-cli" >&2; exit 1; }
bytes() { numfmt --from=iec "${1^^}"; }
TOTAL=$(bytes "$SIZE")

MNT=$W/mnt
LOOP=
cleanup() {
  if mountpoint -q "$MNT" 2>/dev/null; then umount "$MNT"; fi
  if [ -n "$LOOP" ]; then losetup -d "$LOOP" 2>/dev/null || true; fi
  rm -f "$W/fs.img"
}
trap cleanup EXIT

mkfs_for() {
  case $1 in
    ext4) mkfs.ext4 -q -F "$2" ;;
    xfs) mkfs.xfs -q -f "$2" ;;
    btrfs) mkfs.btrfs -q -f "$2" >/dev/null 2>&1 ;;
    *) echo "unknown filesystem $1" >&2; exit 1 ;;
  esac
}

# seconds for one contender's write of $TOTAL bytes in requests of $2 at cache $3
one() { # contender size cache
  local img=$MNT/t.qcow2 count=$((TOTAL / $(bytes "$2"))) t
  rm -f "$MNT"/t.*
  sync
  echo 3 > /proc/sys/vm/drop_caches
  local pre="driver=qcow2,file.driver=preallocate,file.file.driver=file,file.file.filename=$img"
  case $1 in
    ceiling)
      img=$MNT/t.raw
      fallocate -l "$TOTAL" "$img"
      dd if=/dev/zero of="$img" bs=1M count=$((TOTAL >> 20)) oflag=direct conv=notrunc status=none
      sync
      # fio's own bandwidth: its start-up (a second process) is no part of
      # what the disk does.
      t=$(fio --name=ceiling --filename="$img" --rw=write --bs="$2" --iodepth=16 --ioengine=io_uring \
        --direct=1 --size="$TOTAL" --fallocate=none --output-format=json |
        python3 -c 'import json,sys; j=json.load(sys.stdin); print(int(sys.argv[1]) / j["jobs"][0]["write"]["bw_bytes"])' "$TOTAL") ;;
    ringblk)
      qemu-img create -q -f qcow2 "$img" "$((TOTAL * 2))"
      t=$( { /usr/bin/time -f %e "$R" bench -w -f qcow2 -t "$3" --pattern seq -s "$2" -c "$count" --shards 1 -d 16 "$img" >/dev/null; } 2>&1 | tail -1) ;;
    ringblk+pre)
      qemu-img create -q -f qcow2 "$img" "$((TOTAL * 2))"
      t=$( { /usr/bin/time -f %e "$R" bench -w -t "$3" --pattern seq -s "$2" -c "$count" --shards 1 -d 16 --image-opts "$pre" >/dev/null; } 2>&1 | tail -1) ;;
    qemu)
      qemu-img create -q -f qcow2 "$img" "$((TOTAL * 2))"
      t=$( { /usr/bin/time -f %e qemu-img bench -w -f qcow2 -t "$3" -i io_uring -s "$2" -c "$count" -d 16 "$img" >/dev/null; } 2>&1 | tail -1) ;;
    qemu+pre)
      qemu-img create -q -f qcow2 "$img" "$((TOTAL * 2))"
      t=$( { /usr/bin/time -f %e qemu-img bench -w -t "$3" -i io_uring -s "$2" -c "$count" -d 16 --image-opts "$pre" >/dev/null; } 2>&1 | tail -1) ;;
  esac
  echo "$t"
}

median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
mbps() { awk -v b="$TOTAL" -v t="$1" 'BEGIN {printf "%.0f", b / t / 1e6}'; }

echo "### Sequential growing write of a new qcow2 image, $SIZE, depth 16, median of $RUNS (MB/s)"
echo
echo "| fs | request | cache | ringblk | ringblk+pre | qemu | qemu+pre | ceiling | pre/ringblk | ringblk+pre/qemu+pre | ringblk+pre/ceiling |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for fs in $FILESYSTEMS; do
  truncate -s "$FS_SIZE" "$W/fs.img"
  LOOP=$(losetup -f --show --direct-io=on "$W/fs.img")
  mkfs_for "$fs" "$LOOP"
  mkdir -p "$MNT"
  mount "$LOOP" "$MNT"
  for size in $SIZES; do
    for cache in $CACHES; do
      declare -A res=()
      contenders="ringblk ringblk+pre qemu qemu+pre"
      [ "$cache" = none ] && contenders="$contenders ceiling"
      # Round-robin, so that no contender always runs first or last.
      for c in $contenders; do : >"$W/times.$c"; done
      for _ in $(seq "$RUNS"); do
        for c in $contenders; do one $c "$size" "$cache" >>"$W/times.$c"; done
      done
      for c in ringblk ringblk+pre qemu qemu+pre ceiling; do
        if [ ! -f "$W/times.$c" ]; then res[$c]=; continue; fi
        res[$c]=$(mbps "$(median <"$W/times.$c")")
        echo "# $fs $size $cache $c: ${res[$c]} MB/s ($(tr '\n' ' ' <"$W/times.$c")s)" >&2
        rm -f "$W/times.$c"
      done
      ratio() { [ -n "$1" ] && [ -n "$2" ] && awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}' || echo -; }
      echo "| $fs | $size | $cache | ${res[ringblk]} | ${res[ringblk+pre]} | ${res[qemu]} | ${res[qemu+pre]} | ${res[ceiling]:--} | $(ratio "${res[ringblk+pre]}" "${res[ringblk]}") | $(ratio "${res[ringblk+pre]}" "${res[qemu+pre]}") | $(ratio "${res[ringblk+pre]}" "${res[ceiling]}") |"
      unset res
    done
  done
  rm -f "$MNT"/t.*
  umount "$MNT"
  losetup -d "$LOOP"
  LOOP=
done
