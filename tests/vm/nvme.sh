# Guest half of tests/vm_nvme.rs: the userspace NVMe driver over VFIO.
# Three emulated controllers, in PCI order: A (512-byte blocks) for the
# workload (MSI-X interrupts), B (4096-byte blocks) for the workload with a
# controller reset, completions polled,
# C holding a qcow2 image the host made, which ringblk fills over nvme://.
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
[ $# = 3 ] || fail "expected 3 NVMe controllers, found: $nvmes"
A=$1 B=$2 C=$3
for d in $A $B $C; do
    echo vfio-pci > "/sys/bus/pci/devices/$d/driver_override"
    echo "$d" > /sys/bus/pci/drivers_probe
    drv=$(basename "$(readlink "/sys/bus/pci/devices/$d/driver")")
    [ "$drv" = vfio-pci ] || fail "$d bound to $drv, not vfio-pci"
done

nvme-guest identify "$A"
nvme-guest refuse "$A"
nvme-guest workload "$A" "$SIZE" "$SHARDS" "$WORKERS" "$OPS" "$SEED"
nvme-guest workload "$B" "$SIZE" "$SHARDS" "$WORKERS" "$OPS" "$SEED_B" reset poll

# qcow2 over the nvme protocol driver, with the CLI.
ringblk info "nvme://$C/1"
ringblk convert -n -f raw -O qcow2 /data/src.raw "nvme://$C/1"
ringblk check "nvme://$C/1"
ringblk compare -f raw -F qcow2 /data/src.raw "nvme://$C/1" || fail "compare over nvme:// failed"
echo "nvme: all checks passed"
