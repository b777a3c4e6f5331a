#!/usr/bin/env bash
# What one 4 KiB read costs the guest's CPUs on each path to an NVMe
# namespace, side by side in one emulated guest (scripts/vm): instructions
# (user and kernel, every vCPU) and system calls per I/O, counted by our
# TCG plugin (scripts/vm/insn-count.c) between markers (vm-mark). Emulation
# makes times meaningless; instruction and system call counts are not.
#
# Each path runs the same `ringblk bench` twice, with N1 and N2 requests;
# (count after N2 - count after N1) / (N2 - N1) is the cost per I/O, with
# start-up, open, rebinding and exit cancelling out.
#
# Paths: io_uring on /dev/nvmeXnY (cache=none), io_uring_cmd (passthrough
# on /dev/ngXnY), vfio with MSI-X interrupts, vfio polled (poll=on).
#
# Usage: scripts/bench/nvme-cost.sh   (release build; scripts/vm/setup.sh
#   done; gcc) N1=4000 N2=100000 DEPTH=16 SIZE=4k RW=read (or write)
#   PATHS="io_uring io_uring_cmd vfio vfio-poll"; the raw counts of each run
#   go to stderr.
set -euo pipefail
cd "$(dirname "$0")/../.."
N1=${N1:-4000} N2=${N2:-100000} DEPTH=${DEPTH:-16} SIZE=${SIZE:-4k} RW=${RW:-read}
PATHS=${PATHS:-io_uring io_uring_cmd vfio vfio-poll}
R=target/release
for b in ringblk vm-mark; do
    [ -x "$R/$b" ] || { echo "build first: cargo build --release --workspace" >&2; exit 1; }
done
work=$(mktemp -d /tmp/nvme-cost.XXXX)
trap 'rm -rf "$work"' EXIT
gcc -shared -fPIC -O2 -o "$work/insn-count.so" scripts/vm/insn-count.c
truncate -s 256M "$work/ns.raw"
w=; [ "$RW" = write ] && w=-w
cat > "$work/guest.sh" <<GUEST
set -eu
d=\$(for x in /sys/bus/pci/devices/*; do if [ "\$(cat \$x/class)" = 0x010802 ]; then basename \$x; fi; done)
ctrl=\$(ls /sys/bus/pci/devices/\$d/nvme/)
dev=/dev/\${ctrl}n1
one() { # name, bench arguments...
    name=\$1; shift
    for n in $N1 $N2; do
        echo "RBPATH \$name \$n"
        vm-mark
        ringblk bench -q --shards 1 -d $DEPTH -s $SIZE --pattern rand $w -c \$n "\$@" \$dev
        vm-mark
    done
}
for p in $PATHS; do
    case \$p in
        io_uring) one io_uring -i io_uring -t none ;;
        io_uring_cmd) one io_uring_cmd -i io_uring_cmd ;;
        vfio) one vfio -i vfio ;;
        vfio-poll) one vfio-poll -i vfio --poll ;;
    esac
done
echo nvme-cost: done
GUEST
scripts/vm/run.sh --script "$work/guest.sh" --bin "$R/ringblk" --bin "$R/vm-mark" \
    --modules "nvme vfio vfio_iommu_type1 vfio_pci" --iommu --smp 2 --timeout 1200 \
    --plugin "$work/insn-count.so" --nvme "$work/ns.raw" --log "$work/log" >/dev/null || true
grep -q "nvme-cost: done" "$work/log" || { tail -30 "$work/log" >&2; exit 1; }
echo "### Cost per $SIZE random $RW, depth $DEPTH, one shard (emulated guest; $N1 and $N2 requests per path)"
echo
echo "| path | instructions per I/O | system calls per I/O |"
echo "|---|---|---|"
# The log interleaves "RBPATH name n" with the marks taken after it: a
# mark before and one after each run.
awk -v n1="$N1" -v n2="$N2" '
  match($0, /RBPATH [^ ]+ [0-9]+/) { split(substr($0, RSTART, RLENGTH), f, " "); name = f[2]; n = f[3]; k = 0; next }
  match($0, /RBMARK insns=[0-9]+ syscalls=[0-9]+/) {
    split(substr($0, RSTART, RLENGTH), f, /[ =]/); ins = f[3]; sys = f[5]
    if (k == 0) { i0 = ins; s0 = sys; k = 1 }
    else {
      di[name, n] = ins - i0; ds[name, n] = sys - s0
      printf "# %s %d requests: %d instructions, %d system calls\n", name, n, ins - i0, sys - s0 > "/dev/stderr"
      if (!(name in seen)) { seen[name] = 1; order[++m] = name }
    }
  }
  END {
    for (j = 1; j <= m; j++) {
      p = order[j]; d = n2 - n1;
      printf "| %s | %.0f | %.3f |\n", p, (di[p, n2] - di[p, n1]) / d, (ds[p, n2] - ds[p, n1]) / d
    }
  }' "$work/log"
