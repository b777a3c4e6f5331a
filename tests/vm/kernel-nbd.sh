# Guest half of tests/vm_kernel_nbd.rs: the Linux NBD client on ringblk-nbd -c.
# /dev/nvme0n1 holds a qcow2 image (host file) whose first MiB is
# /data/pattern.bin and whose MiB at 8 MiB is /data/discard.bin; /dev/nvme1n1
# holds an empty qcow2 image for a filesystem.
set -eu
fail() { echo "FAIL: $*"; exit 1; }

ringblk-nbd -c /dev/nbd0 -f qcow2 --discard=unmap --pid-file /tmp/nbd0.pid /dev/nvme0n1
# -c returns once the device is up: its size is already the image's.
size=$(blockdev --getsize64 /dev/nbd0)
[ "$size" = 33554432 ] || fail "/dev/nbd0 is $size bytes right after -c"
[ -e /sys/block/nbd0/pid ] || fail "no /sys/block/nbd0/pid after -c"
# Its server listens on a private unix socket, not on a TCP port.
if netstat -ltn | grep -q ':10809 '; then fail "-c opened TCP port 10809"; fi
ls /tmp/ringblk-nbd.*/nbd.sock >/dev/null || fail "no private socket for -c"

# Reads: what the host wrote.
dd if=/dev/nbd0 of=/tmp/head.bin bs=64k count=16 2>/dev/null
cmp /tmp/head.bin /data/pattern.bin || fail "first MiB differs from the host's"
dd if=/dev/nbd0 of=/tmp/mid.bin bs=64k skip=128 count=16 2>/dev/null
cmp /tmp/mid.bin /data/discard.bin || fail "MiB at 8 MiB differs from the host's"

# Writes (direct, then buffered with fsync), discard, and reads past the
# page cache.
dd if=/data/payload.bin of=/dev/nbd0 bs=64k seek=64 oflag=direct 2>/dev/null
dd if=/data/payload.bin of=/dev/nbd0 bs=4k seek=5120 count=64 conv=fsync 2>/dev/null
blkdiscard -o 8388608 -l 1048576 /dev/nbd0
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/nbd0 of=/tmp/back.bin bs=64k skip=64 count=16 iflag=direct 2>/dev/null
cmp /tmp/back.bin /data/payload.bin || fail "payload read back at 4 MiB differs"
dd if=/dev/nbd0 of=/tmp/back2.bin bs=4k skip=5120 count=64 2>/dev/null
head -c 262144 /data/payload.bin | cmp /tmp/back2.bin - || fail "payload read back at 20 MiB differs"
dd if=/dev/nbd0 of=/tmp/zero.bin bs=64k skip=128 count=16 2>/dev/null
head -c 1048576 /dev/zero | cmp /tmp/zero.bin - || fail "discarded MiB does not read as zeroes"

# A second device at once, with a filesystem on it.
ringblk-nbd -c /dev/nbd1 -f qcow2 --pid-file /tmp/nbd1.pid /dev/nvme1n1
mke2fs -q /dev/nbd1
mkdir /mnt
mount -t ext2 /dev/nbd1 /mnt
cp /data/payload.bin /mnt/payload.bin
mkdir /mnt/dir
i=0
while [ $i -lt 50 ]; do echo "file $i" > /mnt/dir/f$i; i=$((i + 1)); done
umount /mnt
echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 -o ro /dev/nbd1 /mnt
cmp /mnt/payload.bin /data/payload.bin || fail "file on the filesystem differs"
[ "$(cat /mnt/dir/f49)" = "file 49" ] || fail "small file on the filesystem differs"
umount /mnt

# -d ends each device, and with it its server (which closes the image).
for n in 0 1; do
    p=$(cat /tmp/nbd$n.pid)
    ringblk-nbd -d /dev/nbd$n
    t=0
    while [ -d /proc/$p ]; do
        t=$((t + 1))
        [ $t -lt 200 ] || fail "server of /dev/nbd$n still running 20 s after -d"
        sleep 0.1
    done
    [ ! -e /sys/block/nbd$n/pid ] || fail "/dev/nbd$n still connected after -d"
done
[ "$(blockdev --getsize64 /dev/nbd0)" = 0 ] || fail "/dev/nbd0 keeps a size after -d"

# A device already in use is refused, and the refusal reaches the terminal.
ringblk-nbd -c /dev/nbd0 -f qcow2 --pid-file /tmp/again.pid /dev/nvme0n1
if ringblk-nbd -c /dev/nbd0 -f qcow2 -r /dev/nvme1n1 2>/tmp/busy.err; then
    fail "a second -c on a busy device succeeded"
fi
grep -q "already connected" /tmp/busy.err || fail "busy device error: $(cat /tmp/busy.err)"
ringblk-nbd -d /dev/nbd0
p=$(cat /tmp/again.pid)
while [ -d /proc/$p ]; do sleep 0.1; done
echo "kernel-nbd: all checks passed"
