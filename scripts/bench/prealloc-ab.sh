#!/usr/bin/env bash
# Alternating A/B runs for one preallocate question at a time, on a fresh
# filesystem over a written-through loop device (as prealloc.sh makes them):
# RUNS rounds, each running every contender once in a random order
# (ORDER=fixed: as listed); prints each contender's times in seconds, round
# by round.
#
#   scripts/bench/prealloc-ab.sh FS SIZE [RUNS]     (root; release build)
#   FS: ext4, xfs, btrfs or slowfs (the rig; SLOW_US_PER_MIB=1000); SIZE: request size (64k, 1M)
#   CACHE=none|writeback (default none); TOTAL=2G; W=/var/tmp/prealloc-ab
#   CONTENDERS (default "raw-written raw-falloc pre qemu+pre"), any of:
#     raw-written   ringblk bench on raw, into a file written before (I/O phase)
#     raw-falloc    ringblk bench on raw, into a fallocated file (I/O phase)
#     fio           fio (io_uring, direct) into a file written before: its own
#                   bandwidth, as prealloc.sh's ceiling takes it
#     pre           ringblk bench, qcow2 through the filter, defaults (wall)
#     pre-MODE      the same with prealloc-mode=MODE (falloc, sparse, zeroes)
#     pre-nowb      the same with prealloc-write-behind=0
#     pre+KEY=VAL   the same with file.KEY=VAL (pre+prealloc-max-size=128M)
#     plain         ringblk bench, qcow2 without the filter (wall)
#     qemu          qemu-img bench, qcow2 without a filter (wall)
#     qemu+pre      qemu-img bench through QEMU's filter (wall)
#   CONTENDER@AIO the same on the aio backend AIO (threads, native, io_uring; qemu-img's too)
#   CONTENDER:b   the same with the binary RINGBLK_B (an A/B of two builds)
# raw-* report the I/O phase (ringblk's "Run completed in"): they stand for
# what the filesystem does once allocation is out of the way; the others
# report the whole command's wall time, as prealloc.sh does; PHASE=io makes
# ringblk's pre* and plain report their I/O phase too (qemu+pre stays wall).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/bench/fs-lib.sh
FS=$1 SZ=$2 RUNS=${3:-5}
CACHE=${CACHE:-none}
CONTENDERS=${CONTENDERS:-raw-written raw-falloc pre qemu+pre}
TOTAL=$(numfmt --from=iec "${TOTAL:-2G}")
W=${W:-/var/tmp/prealloc-ab}
R=${RINGBLK:-target/release/ringblk}
[ -x "$R" ] || { echo "build first: cargo build --release -p ringblk-cli" >&2; exit 1; }
mkdir -p "$W/mnt"
IMG=$W/fs.img MNT=$W/mnt
if [ "$FS" = slowfs ]; then
  # The slow-allocation rig over a /dev/shm directory, as in prealloc.sh.
  SLOWDIR=$(mktemp -d /dev/shm/ringblk-slowfs.XXXX)
  trap 'umount "$MNT" 2>/dev/null; sleep 0.5; rm -rf "$SLOWDIR"' EXIT
  mount_slowfs "${SLOWFS:-target/release/slowfs}" "$SLOWDIR" "$MNT" "$W/slowfs.log" "${SLOW_US_PER_MIB:-1000}"
else
  LOOP=$(loop_backing "$IMG" 6G)
  trap 'umount "$MNT" 2>/dev/null; losetup -d "$LOOP"; rm -f "$IMG" "$W"/t.*' EXIT
  mkfs_for "$FS" "$LOOP"
  mount "$LOOP" "$MNT"
fi
count=$((TOTAL / $(numfmt --from=iec "${SZ^^}")))
q=$MNT/t.qcow2
pre="driver=qcow2,file.driver=preallocate,file.file.driver=file,file.file.filename=$q"
rb() { "$R" bench -w -t "$CACHE" ${AIO:+-i "$AIO"} --pattern seq -s "$SZ" -c "$count" --shards 1 -d 16 "$@"; }
wall() { local TIMEFORMAT=%R; { time "$@" >/dev/null 2>&1; } 2>&1; }
rbw() { if [ "${PHASE:-wall}" = io ]; then io rb "$@"; else wall rb "$@"; fi; }
io() { "$@" | awk '/^Run completed in/ {print $4}'; }
one() {
  local R=$R AIO=
  if [ "${1%:b}" != "$1" ]; then R=$RINGBLK_B; set -- "${1%:b}"; fi
  if [ "${1#*@}" != "$1" ]; then AIO=${1#*@}; set -- "${1%@*}"; fi
  rm -f "$MNT"/t.*
  sync
  echo 3 > /proc/sys/vm/drop_caches
  case $1 in
    fio)
      written_file "$MNT/t.raw" "$TOTAL"
      fio_write_secs "$MNT/t.raw" "$SZ" "$TOTAL" ;;
    raw-*)
      written_file "$MNT/t.raw" "$TOTAL" "${1#raw-}"
      io rb -f raw "$MNT/t.raw" ;;
    *)
      qemu-img create -q -f qcow2 "$q" $((TOTAL * 2))
      case $1 in
        pre) rbw --image-opts "$pre" ;;
        pre-nowb) rbw --image-opts "$pre,file.prealloc-write-behind=0" ;;
        pre+*) rbw --image-opts "$pre,file.${1#pre+}" ;;
        pre-*) rbw --image-opts "$pre,file.prealloc-mode=${1#pre-}" ;;
        plain) rbw -f qcow2 "$q" ;;
        qemu) wall qemu-img bench -w -f qcow2 -t "$CACHE" -i "${AIO:-io_uring}" -s "$SZ" -c "$count" -d 16 "$q" ;;
        qemu+pre) wall qemu-img bench -w -t "$CACHE" -i "${AIO:-io_uring}" -s "$SZ" -c "$count" -d 16 --image-opts "$pre" ;;
        *) echo "unknown contender $1" >&2; exit 2 ;;
      esac ;;
  esac
}
one plain >/dev/null # untimed warm-up
declare -A t
# Each round in a random order (ORDER=fixed: as listed).
for _ in $(seq "$RUNS"); do
  order=$CONTENDERS
  [ "${ORDER:-random}" = fixed ] || order=$(shuf -e $CONTENDERS)
  for c in $order; do t[$c]="${t[$c]:-} $(one "$c")"; done
done
echo "# $FS $SZ cache=$CACHE, $RUNS rounds, each in ${ORDER:-random} order (s)"
for c in $CONTENDERS; do echo "$c:${t[$c]}"; done
