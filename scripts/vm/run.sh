#!/bin/bash
# Boot a throwaway guest under full emulation, run one shell script in it as
# root, power off, and exit with the script's status.
#
#   scripts/vm/run.sh --script T.sh [--bin PROG]... [--file F]... [--nvme IMG]... [--nvme-4k IMG]...
#                     [--modules "nbd nvme ..."] [--iommu] [--smp N] [--mem MiB]
#                     [--timeout S] [--log FILE] [--append ARGS] [--plugin SO]
#
# The guest is Debian's 6.1 kernel on a busybox initramfs (scripts/vm/setup.sh
# fetches both). Each --bin is copied in, stripped, with the shared libraries
# ldd names; each --file lands in /data; each --nvme IMG becomes an emulated
# NVMe controller (serial rb0, rb1, ...) over the host file IMG, whose writes
# reach the file by the time the guest has powered off (--nvme-4k: with
# 4096-byte logical blocks instead of 512); the controllers take PCI slots
# in the order given. --modules are loaded
# (with what they depend on) before the script runs. --plugin loads a TCG
# plugin (scripts/vm/insn-count.c) whose output joins the log. --iommu adds an emulated
# Intel IOMMU with interrupt remapping, and the kernel arguments VFIO needs.
#
# Exit status: the script's, or 97 when the guest never reported one (crash,
# panic, timeout), or 98 when the guest kernel logged an IOMMU (DMAR) fault:
# QEMU's NVMe model completes a blocked DMA successfully, so that log is the
# only place such a fault shows.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
vm=${RINGBLK_VM_DIR:-$repo/target/vm}
script= bins=() files=() nvmes=() modules= iommu=0 smp=2 mem=1024 timeout=300 log= append= plugin=
while [ $# -gt 0 ]; do
    case $1 in
        --script) script=$2; shift 2 ;;
        --bin) bins+=("$2"); shift 2 ;;
        --file) files+=("$2"); shift 2 ;;
        --nvme) nvmes+=("$2|512"); shift 2 ;;
        --nvme-4k) nvmes+=("$2|4096"); shift 2 ;;
        --modules) modules=$2; shift 2 ;;
        --iommu) iommu=1; shift ;;
        --smp) smp=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --log) log=$2; shift 2 ;;
        --append) append=$2; shift 2 ;;
        --plugin) plugin=$2; shift 2 ;;
        *) echo "run.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
[ -n "$script" ] || { echo "run.sh: --script is required" >&2; exit 2; }
[ -f "$vm/.ready" ] || { echo "run.sh: no guest harness in $vm: run scripts/vm/setup.sh" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/ringblk-vm.XXXXXX")
trap 'rm -rf "$work"' EXIT
[ -n "$log" ] || log=$work/console.log
ir=$work/initramfs
mkdir -p "$ir"/{bin,data,dev,proc,sys,tmp,run}
cp "$vm/root/bin/busybox" "$ir/bin/busybox"

# Binaries, stripped, and the libraries the loader will look for.
for b in "${bins[@]}"; do
    strip -o "$ir/bin/$(basename "$b")" "$b"
    ldd "$b" | awk '/=> \// {print $3} /^\t\// {print $1}' | while read -r lib; do
        mkdir -p "$ir$(dirname "$lib")"
        cp -L "$lib" "$ir$lib"
    done
done
for f in "${files[@]}"; do
    cp "$f" "$ir/data/"
done
cp "$script" "$ir/test.sh"

# Modules and their dependencies, in load order (a dependency first). The
# names come from each module's own .modinfo, so no depmod is needed.
kmods=$(ls -d "$vm"/root/lib/modules/*)
order=()
add_module() {
    local name=${1//-/_} f dep
    for done_name in "${order[@]}"; do
        [ "$(basename "$done_name" .ko | tr - _)" = "$name" ] && return 0
    done
    f=$(find "$kmods/kernel" \( -name "$name.ko" -o -name "${name//_/-}.ko" \) | head -1)
    [ -n "$f" ] || { echo "run.sh: no module $1 in $kmods" >&2; exit 2; }
    for dep in $(objcopy -O binary --only-section=.modinfo "$f" /dev/stdout | tr '\0' '\n' |
                 sed -n 's/^depends=//p' | tr , ' '); do
        add_module "$dep"
    done
    order+=("$f")
}
for m in $modules; do add_module "$m"; done
: > "$ir/modules"
for f in "${order[@]}"; do
    cp "$f" "$ir/$(basename "$f")"
    echo "$(basename "$f")" >> "$ir/modules"
done

cat > "$ir/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in $(cat /modules); do
    insmod "/$m" || echo "RINGBLK-VM: insmod $m failed"
done
cd /tmp
echo "RINGBLK-VM: running the test script"
sh /test.sh
rc=$?
sync
if dmesg | grep -iE 'DMAR:.*fault|DMAR: \[DMA' ; then
    echo "RINGBLK-VM-DMAR-FAULT"
fi
echo "RINGBLK-VM-EXIT=$rc"
poweroff -f
EOF
chmod +x "$ir/init" "$ir/test.sh"
(cd "$ir" && find . | "$vm/root/bin/busybox" cpio -o -H newc > "$work/initramfs.cpio" 2>/dev/null)

qemu_args=(-accel tcg,thread=multi -cpu max -smp "$smp" -m "$mem"
           -nodefaults -display none -serial stdio -monitor none -no-reboot
           -kernel "$vm/vmlinux" -initrd "$work/initramfs.cpio")
machine=q35
kargs="console=ttyS0 panic=-1 quiet rdinit=/init"
if [ $iommu = 1 ]; then
    machine=q35,kernel-irqchip=split
    qemu_args+=(-device intel-iommu,intremap=on,caching-mode=on)
    kargs+=" intel_iommu=on iommu=pt"
fi
qemu_args+=(-machine "$machine")
i=0
for spec in "${nvmes[@]}"; do
    img=${spec%|*} bs=${spec##*|}
    qemu_args+=(-drive "file=$img,format=raw,if=none,id=nvme$i,cache=writeback"
                -device "nvme,drive=nvme$i,serial=rb$i,logical_block_size=$bs,physical_block_size=$bs")
    i=$((i + 1))
done
[ -z "$append" ] || kargs+=" $append"
[ -z "$plugin" ] || qemu_args+=(-plugin "file=$plugin" -d plugin)

export LD_LIBRARY_PATH=$vm/root/usr/lib/x86_64-linux-gnu
export QEMU_MODULE_DIR=$vm/root/usr/lib/x86_64-linux-gnu/qemu
set +e
timeout --foreground "$timeout" "$vm/root/usr/bin/qemu-system-x86_64" \
    -L "$vm/root/usr/share/qemu" -L "$vm/root/usr/share/seabios" \
    "${qemu_args[@]}" -append "$kargs" < /dev/null 2>&1 | tr -d '\r' | tee "$log"
qrc=${PIPESTATUS[0]}
set -e
if grep -q '^RINGBLK-VM-DMAR-FAULT' "$log"; then
    echo "run.sh: the guest kernel logged IOMMU faults" >&2
    exit 98
fi
rc=$(sed -n 's/^RINGBLK-VM-EXIT=\([0-9]*\)$/\1/p' "$log" | tail -1)
if [ -z "$rc" ]; then
    echo "run.sh: the guest never reported an exit status (qemu exited $qrc; timeout ${timeout}s)" >&2
    exit 97
fi
exit "$rc"
