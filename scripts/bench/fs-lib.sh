# Shared by the preallocate benchmarks (sourced, not run): filesystems made
# for a run on a loop device, and the slow-allocation rig.

# mkfs_for FS DEV: make FS on DEV.
mkfs_for() {
  case $1 in
    # No lazy initialisation: ext4lazyinit zeroing inode tables in the
    # background turned a run in ten into a 10 s outlier.
    # No discard at mkfs either: it would punch the backing file (see
    # loop_backing) back into holes.
    ext4) mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0,nodiscard "$2" ;;
    xfs) mkfs.xfs -q -f -K "$2" ;;
    btrfs) mkfs.btrfs -q -f -K "$2" >/dev/null 2>&1 ;;
    *) echo "unknown filesystem $1" >&2; exit 1 ;;
  esac
}

# loop_backing FILE SIZE: make FILE, SIZE long, written through, and print
# the loop device (direct I/O) over it.
loop_backing() {
  # The loop device stands in for a disk, and a disk allocates nothing: the
  # backing file is written through before mkfs. Left sparse, the first
  # write to each block of it made the host filesystem (or tmpfs) allocate,
  # which charged whichever contender first wrote a block the ceiling's
  # pre-written file never covered: the ceiling ratio on ext4 64k read
  # 0.72 on a sparse tmpfs file, and 1.0 once the blocks were there.
  truncate -s "$2" "$1"
  dd if=/dev/zero of="$1" bs=1M count=$(($(numfmt --from=iec "${2^^}") >> 20)) conv=notrunc,fsync oflag=direct status=none
  losetup -f --show --direct-io=on "$1"
}

# mount_slowfs SLOWFS BACKING_DIR MNT LOG US_PER_MIB: mount the rig (in the
# background; it exits once unmounted) and wait for it.
mount_slowfs() {
  "$1" --alloc-us-per-mib "$5" "$2" "$3" 2>>"$4" &
  for _ in $(seq 50); do mountpoint -q "$3" && return; sleep 0.1; done
  echo "slowfs did not mount (see $4)" >&2; exit 1
}

# written_file FILE BYTES: FILE allocated and written through (zeroes), on
# stable storage: what an overwrite runs into once allocation is done.
# With "falloc" as a third argument only allocated (unwritten extents).
written_file() {
  fallocate -l "$2" "$1"
  [ "${3:-}" = falloc ] || dd if=/dev/zero of="$1" bs=1M count=$(($2 >> 20)) oflag=direct conv=notrunc status=none
  sync
}

# fio_write_secs FILE BS BYTES: seconds fio (io_uring, O_DIRECT, depth 16)
# takes to write BYTES sequentially in BS requests, from its own bandwidth
# (its start-up is no part of what the storage does).
fio_write_secs() {
  fio --name=ceiling --filename="$1" --rw=write --bs="$2" --iodepth=16 --ioengine=io_uring \
    --direct=1 --size="$3" --fallocate=none --output-format=json |
    python3 -c 'import json,sys; j=json.load(sys.stdin); print("%.6f" % (int(sys.argv[1]) / j["jobs"][0]["write"]["bw_bytes"]))' "$3"
}
