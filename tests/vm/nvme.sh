# Guest half of tests/vm_nvme.rs: the userspace NVMe driver over VFIO.
# Three emulated controllers, in PCI order: A (512-byte blocks) for the
# workload (MSI-X interrupts, SGLs), B (4096-byte blocks) for the workload
# with a controller reset, completions polled, PRPs,
# C holding a qcow2 image the host made, which ringblk fills over nvme://
# and ringblk-nbd serves from there,
# D left to the kernel's nvme driver: ringblk bench compares every path to
# it (threads, native, io_uring, io_uring_cmd passthrough, vfio), then
# /data/src.raw is written through passthrough and read back through the
# block device.
# /data/params.sh says how big and how long (the host replays the same
# streams to know what A and B must hold afterwards).
set -eu
fail() { echo "FAIL: $*"; exit 1; }
. /data/params.sh

nvmes=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/class")" = 0x010802 ] && nvmes="$nvmes $(basename "$d")"
done
set -- $nvmes
[ $# = 4 ] || fail "expected 4 NVMe controllers, found: $nvmes"
A=$1 B=$2 C=$3 D=$4
for d in $A $B $C; do
    if [ -e "/sys/bus/pci/devices/$d/driver" ]; then
        echo "$d" > "/sys/bus/pci/devices/$d/driver/unbind"
    fi
    echo vfio-pci > "/sys/bus/pci/devices/$d/driver_override"
    echo "$d" > /sys/bus/pci/drivers_probe
    drv=$(basename "$(readlink "/sys/bus/pci/devices/$d/driver")")
    [ "$drv" = vfio-pci ] || fail "$d bound to $drv, not vfio-pci"
done

nvme-guest identify "$A"
nvme-guest refuse "$A"
nvme-guest workload "$A" "$SIZE" "$SHARDS" "$WORKERS" "$OPS" "$SEED"
nvme-guest workload "$B" "$SIZE" "$SHARDS" "$WORKERS" "$OPS" "$SEED_B" reset poll prp

# qcow2 over the nvme protocol driver, with the CLI.
ringblk info "nvme://$C/1"
ringblk convert -n -f raw -O qcow2 /data/src.raw "nvme://$C/1"
ringblk check "nvme://$C/1"
ringblk compare -f raw -F qcow2 /data/src.raw "nvme://$C/1" || fail "compare over nvme:// failed"
# Served over NBD from the nvme driver (two shards, two queue pairs).
ringblk-nbd -f qcow2 -k /tmp/nbd.sock --pid-file /tmp/nbd.pid "nvme://$C/1" &
for _ in $(seq 100); do [ -S /tmp/nbd.sock ] && break; sleep 0.1; done
ringblk compare -f raw -F raw /data/src.raw "nbd+unix:///?socket=/tmp/nbd.sock" || fail "compare over NBD from nvme:// failed"
kill "$(cat /tmp/nbd.pid)"
wait
# D: one workload over every path, one table.
ctrl=$(ls "/sys/bus/pci/devices/$D/nvme/")
ns=${ctrl}n1
[ -e "/dev/$ns" ] || fail "no /dev/$ns for $D ($ctrl) under the nvme driver"
ringblk bench --aio threads,native,io_uring,io_uring_cmd,vfio -c 3000 -d 8 --pattern rand -w \
    --output=json "/dev/$ns" > /tmp/bench.json || fail "bench over every path failed"
cat /tmp/bench.json
for b in threads native io_uring io_uring_cmd vfio; do
    grep -q "\"backend\": \"$b\"" /tmp/bench.json || fail "no $b row in the bench table"
done
# Back with the nvme driver the controller may have a new number.
nsname() { ctrl=$(ls "/sys/bus/pci/devices/$D/nvme/"); echo "${ctrl}n1"; }
ns=$(nsname)
[ -e "/dev/$ns" ] || fail "/dev/$ns did not come back after the vfio run"
ringblk bench --aio io_uring,io_uring_cmd,vfio -c 3000 -d 8 --pattern rand "/dev/$ns" || fail "bench table"
ns=$(nsname)
# Passthrough writes land where the block device reads them.
ng=/dev/ng${ns#nvme}
ringblk convert -n -f raw -O raw /data/src.raw --target-image-opts "driver=raw,file.driver=nvme-passthru,file.filename=$ng"
dd if="/dev/$ns" of=/tmp/back.raw bs=1M count=16 iflag=direct 2>/dev/null
cmp /tmp/back.raw /data/src.raw || fail "passthrough writes do not read back through /dev/$ns"
echo "nvme: all checks passed"
