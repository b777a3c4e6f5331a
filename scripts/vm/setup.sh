#!/bin/bash
# Fetch what the guest harness boots, into a private folder (no install):
# Debian bookworm's QEMU 7.2 system emulator (it cannot be installed beside
# qemu-utils 10, so its .debs are unpacked), its firmware and the libraries it
# lacks, busybox-static, and Debian's 6.1 kernel with its modules. The
# kernel's uncompressed vmlinux is extracted for a PVH boot (about 5 s
# quicker than booting the bzImage through the BIOS).
#
#   scripts/vm/setup.sh [DIR]     (default: $RINGBLK_VM_DIR or target/vm)
#
# Idempotent: a finished DIR has a .ready stamp naming what it holds.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
dir=${1:-${RINGBLK_VM_DIR:-$repo/target/vm}}
pkgs=(qemu-system-x86 qemu-system-common qemu-system-data seabios busybox-static
      libcapstone4 libfdt1 libslirp0 libvdeplug2)

kernel_pkg() {
    apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

if ! apt-cache show qemu-system-x86 >/dev/null 2>&1; then
    apt-get update -qq
fi
kpkg=$(kernel_pkg)
[ -n "$kpkg" ] || { echo "setup.sh: no linux-image package for linux-image-amd64" >&2; exit 1; }
want="$kpkg ${pkgs[*]}"
if [ -f "$dir/.ready" ] && [ "$(cat "$dir/.ready")" = "$want" ]; then
    exit 0
fi

rm -rf "$dir"
mkdir -p "$dir/debs" "$dir/root"
# apt-get download writes into the working directory; _apt cannot write
# into root-owned folders, which only costs a warning.
(cd "$dir/debs" && apt-get download -q $want 2>&1 | grep -v -e '^W: Download is performed unsandboxed' -e '^Get:' -e '^Fetched' || true)
for d in "$dir"/debs/*.deb; do
    dpkg-deb -x "$d" "$dir/root"
done

# The bzImage's payload is xz: find its magic and decompress up to the end
# of the stream (xz complains about what follows; the ELF check below is
# what counts).
vmlinuz=$(ls "$dir"/root/boot/vmlinuz-*)
off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | head -1 | cut -d: -f1)
[ -n "$off" ] || { echo "setup.sh: no xz payload in $vmlinuz" >&2; exit 1; }
tail -c +$((off + 1)) "$vmlinuz" | xz -dc > "$dir/vmlinux" 2>/dev/null || true
if [ "$(head -c 4 "$dir/vmlinux" | od -An -tx1 | tr -d ' ')" != "7f454c46" ]; then
    echo "setup.sh: could not extract vmlinux from $vmlinuz" >&2
    exit 1
fi

qemu=$dir/root/usr/bin/qemu-system-x86_64
LD_LIBRARY_PATH=$dir/root/usr/lib/x86_64-linux-gnu "$qemu" --version | head -1
if LD_LIBRARY_PATH=$dir/root/usr/lib/x86_64-linux-gnu ldd "$qemu" | grep -q 'not found'; then
    echo "setup.sh: $qemu still lacks libraries:" >&2
    LD_LIBRARY_PATH=$dir/root/usr/lib/x86_64-linux-gnu ldd "$qemu" | grep 'not found' >&2
    exit 1
fi
rm -rf "$dir/debs"
echo "$want" > "$dir/.ready"
echo "guest harness ready in $dir ($kpkg)"
