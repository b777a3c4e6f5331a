#!/usr/bin/env bash
# The preallocate filter's benchmark: a sequential growing write of a new
# qcow2 image (depth 16), side by side in one run, on filesystems made for
# the run (and torn down after):
#   ringblk        ringblk bench -w (one shard, so depth 16 is the total), qcow2 straight on the file
#   ringblk+pre    ringblk bench -w through driver=preallocate
#   qemu           qemu-img bench -w, qcow2 straight on the file
#   qemu+pre       qemu-img bench -w through QEMU's preallocate filter
#   ceiling        an O_DIRECT overwrite (depth 16) of an already allocated
#                  file of the same size (cache=none only): what the storage
#                  does once allocation is out of the way. The better of
#                  fio (io_uring, its own bandwidth) and ringblk bench on raw
#                  (medians taken apart).
# for 64k and 1M requests, cache=none and cache=writeback, the contenders
# taking turns run by run (each round in a random order). Prints MB/s (median of RUNS), then the ratios the
# issue asks for. The contenders' MB/s and their ratios come from wall times
# of the whole command, open and close (the filter's final trim and flush)
# included. The ceiling has no open or close to speak of (fio's bandwidth
# counts its I/O only), so the last ratio compares I/O phases: the time
# ringblk bench reports for its requests ("Run completed in"), against the
# ceiling's.
#
# Filesystems: ext4, xfs and btrfs on a loop device over a file (BACKING=disk:
# in the work directory; BACKING=ram: in /dev/shm, which takes the host
# disk's noise out and leaves the filesystem's own costs), and slowfs, the
# slow-allocation rig (target/release/slowfs, a FUSE passthrough over a
# directory in /dev/shm whose allocations cost SLOW_US_PER_MIB microseconds
# per MiB, standing in for NFS, GPFS or Lustre).
#
# Usage: scripts/bench/prealloc.sh [workdir]   (root; release build of
#   ringblk and slowfs; qemu-img; fio; mkfs.ext4/mkfs.xfs/mkfs.btrfs;
#   fusermount3 from fuse3)
#   RUNS=5 SIZE=2G FS_SIZE=6G FILESYSTEMS="ext4 xfs btrfs slowfs" SIZES="64k 1M"
#   CACHES="none writeback" BACKING=disk SLOW_US_PER_MIB=1000
#   RINGBLK=target/release/ringblk SLOWFS=target/release/slowfs
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/fs-lib.sh
W=${1:-$(mktemp -d /var/tmp/ringblk-prealloc.XXXX)}
mkdir -p "$W"
rm -f "$W/slowfs.log"
RUNS=${RUNS:-5}
SIZE=${SIZE:-2G}
FS_SIZE=${FS_SIZE:-6G}
FILESYSTEMS=${FILESYSTEMS:-ext4 xfs btrfs slowfs}
SIZES=${SIZES:-64k 1M}
CACHES=${CACHES:-none writeback}
BACKING=${BACKING:-disk}
SLOW_US_PER_MIB=${SLOW_US_PER_MIB:-1000}
R=${RINGBLK:-target/release/ringblk}
SLOWFS=${SLOWFS:-target/release/slowfs}
[ -x "$R" ] || { echo "build first: cargo build --release -p ringblk-cli" >&2; exit 1; }
bytes() { numfmt --from=iec "${1^^}"; }
TOTAL=$(bytes "$SIZE")

MNT=$W/mnt
LOOP=
FSIMG=
SLOWDIR=
cleanup() {
  if mountpoint -q "$MNT" 2>/dev/null; then umount "$MNT"; fi
  if [ -n "$LOOP" ]; then losetup -d "$LOOP" 2>/dev/null || true; fi
  [ -n "$FSIMG" ] && rm -f "$FSIMG"
  [ -n "$SLOWDIR" ] && rm -rf "$SLOWDIR"
  return 0
}
trap cleanup EXIT

mount_fs() { # fs
  mkdir -p "$MNT"
  if [ "$1" = slowfs ]; then
    [ -x "$SLOWFS" ] || { echo "build first: cargo build --release -p ringblk-bench --bin slowfs" >&2; exit 1; }
    SLOWDIR=$(mktemp -d /dev/shm/ringblk-slowfs.XXXX)
    mount_slowfs "$SLOWFS" "$SLOWDIR" "$MNT" "$W/slowfs.log" "$SLOW_US_PER_MIB"
    return
  fi
  case $BACKING in
    disk) FSIMG=$W/fs.img ;;
    ram) FSIMG=$(mktemp /dev/shm/ringblk-fs.XXXX) ;;
    *) echo "BACKING is disk or ram" >&2; exit 1 ;;
  esac
  LOOP=$(loop_backing "$FSIMG" "$FS_SIZE")
  mkfs_for "$1" "$LOOP"
  mount "$LOOP" "$MNT"
}

umount_fs() {
  rm -f "$MNT"/t.*
  umount "$MNT"
  if [ -n "$LOOP" ]; then losetup -d "$LOOP"; LOOP=; fi
  if [ -n "$FSIMG" ]; then rm -f "$FSIMG"; FSIMG=; fi
  if [ -n "$SLOWDIR" ]; then
    # slowfs exits once unmounted; let it print what it charged.
    sleep 0.5
    rm -rf "$SLOWDIR"; SLOWDIR=
  fi
}

timed() { # command...: "wall io": its wall time, and the time of its
  # I/O phase as it reports it ("Run completed in X seconds.")
  local out
  out=$( { /usr/bin/time -f 'wall %e' "$@"; } 2>&1 )
  awk '/^Run completed in/ {io=$4} /^wall / {w=$2} END {print w, io}' <<<"$out"
}

# "wall io" seconds for one contender's write of $TOTAL bytes in requests of
# $2 at cache $3
one() { # contender size cache
  local img=$MNT/t.qcow2 count=$((TOTAL / $(bytes "$2"))) t f
  rm -f "$MNT"/t.*
  sync
  echo 3 > /proc/sys/vm/drop_caches
  local pre="driver=qcow2,file.driver=preallocate,file.file.driver=file,file.file.filename=$img"
  case $1 in
    ceiling)
      img=$MNT/t.raw
      written_file "$img" "$TOTAL"
      # fio's own bandwidth, and the I/O time ringblk bench reports; the
      # faster is the ceiling.
      f=$(fio_write_secs "$img" "$2" "$TOTAL")
      t=$(timed "$R" bench -w -f raw -t none --pattern seq -s "$2" -c "$count" --shards 1 -d 16 "$img")
      # "wall fio ringblk": the better of the two medians is the ceiling
      # (a better-of-two per run would pit a minimum against the
      # contenders' single runs, and the host disk's run-to-run noise,
      # 10-20 %, would then count against every contender).
      t=$(awk -v f="$f" -v t="$t" 'BEGIN {split(t, x, " "); print x[1], f, x[2]}') ;;
    ringblk)
      qemu-img create -q -f qcow2 "$img" "$((TOTAL * 2))"
      t=$(timed "$R" bench -w -f qcow2 -t "$3" --pattern seq -s "$2" -c "$count" --shards 1 -d 16 "$img") ;;
    ringblk+pre)
      qemu-img create -q -f qcow2 "$img" "$((TOTAL * 2))"
      t=$(timed "$R" bench -w -t "$3" --pattern seq -s "$2" -c "$count" --shards 1 -d 16 --image-opts "$pre") ;;
    qemu)
      qemu-img create -q -f qcow2 "$img" "$((TOTAL * 2))"
      t=$(timed qemu-img bench -w -f qcow2 -t "$3" -i io_uring -s "$2" -c "$count" -d 16 "$img") ;;
    qemu+pre)
      qemu-img create -q -f qcow2 "$img" "$((TOTAL * 2))"
      t=$(timed qemu-img bench -w -t "$3" -i io_uring -s "$2" -c "$count" -d 16 --image-opts "$pre") ;;
  esac
  echo "$t"
}

median() { # of column $1
  awk -v c="${1:-1}" '{print $c}' | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'
}
mbps() { awk -v b="$TOTAL" -v t="$1" 'BEGIN {printf "%.0f", b / t / 1e6}'; }
ratio() { [ -n "$1" ] && [ -n "$2" ] && awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}' || echo -; }

echo "### Sequential growing write of a new qcow2 image, $SIZE, depth 16, median of $RUNS (MB/s; loop devices backed by $BACKING)"
echo
echo "| fs | request | cache | ringblk | ringblk+pre | qemu | qemu+pre | ceiling | ringblk+pre, I/O phase | pre/ringblk | ringblk+pre/qemu+pre | ringblk+pre/ceiling (I/O phases) |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
for fs in $FILESYSTEMS; do
  mount_fs "$fs"
  for size in $SIZES; do
    for cache in $CACHES; do
      declare -A res=()
      contenders="ringblk ringblk+pre qemu qemu+pre"
      [ "$cache" = none ] && contenders="$contenders ceiling"
      # One untimed run first: the first write of a cell (after the last
      # cell's files were deleted and the caches dropped) took ~10 s on
      # every filesystem with cache=writeback, against 1-2 s for the rest.
      one ringblk "$size" "$cache" >/dev/null
      # Every round runs each contender once, in a new random order: no
      # contender always runs first or last, or always right after the
      # same other one (whose deleted file the filesystem may still be
      # freeing).
      for c in $contenders; do : >"$W/times.$c"; done
      for _ in $(seq "$RUNS"); do
        for c in $(shuf -e $contenders); do one $c "$size" "$cache" >>"$W/times.$c"; done
      done
      for c in ringblk ringblk+pre qemu qemu+pre ceiling; do
        if [ ! -f "$W/times.$c" ]; then res[$c]=; continue; fi
        res[$c]=$(mbps "$(median 1 <"$W/times.$c")")
        res[$c.io]=$(mbps "$(median 2 <"$W/times.$c")")
        if [ "$c" = ceiling ]; then
          alt=$(mbps "$(median 3 <"$W/times.$c")")
          [ "$alt" -gt "${res[$c.io]}" ] && res[$c.io]=$alt
        fi
        echo "# $fs $size $cache $c: ${res[$c]} MB/s, I/O phase ${res[$c.io]} MB/s (wall, I/O s: $(tr '\n' ',' <"$W/times.$c"))" >&2
        rm -f "$W/times.$c"
      done
      ceil=; [ -n "${res[ceiling]}" ] && ceil=${res[ceiling.io]}
      pre_io=; [ -n "$ceil" ] && pre_io=${res[ringblk+pre.io]}
      echo "| $fs | $size | $cache | ${res[ringblk]} | ${res[ringblk+pre]} | ${res[qemu]} | ${res[qemu+pre]} | ${ceil:--} | ${pre_io:--} | $(ratio "${res[ringblk+pre]}" "${res[ringblk]}") | $(ratio "${res[ringblk+pre]}" "${res[qemu+pre]}") | $(ratio "$pre_io" "$ceil") |"
      unset res
    done
  done
  umount_fs
done
[ -s "$W/slowfs.log" ] && sed 's/^/# /' "$W/slowfs.log" >&2
exit 0
