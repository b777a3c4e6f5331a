//! `ringblk-nbd -c` and `-d` with the Linux NBD client, in a guest booted by
//! the harness in scripts/vm (the host has no nbd module). The guest serves
//! qcow2 images that sit on emulated NVMe namespaces backed by host files;
//! after it powers off, qemu-img checks the files and compares their
//! contents with what the guest was asked to write. The guest half is
//! tests/vm/kernel-nbd.sh.

use std::process::Command;

use ringblk_tests::{bin, run, run_guest, Rng};

const MIB: usize = 1 << 20;

#[test]
fn the_kernel_nbd_client_reads_and_writes_through_ringblk_nbd_c() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = Rng::new(1);
    let (pattern, discard, payload) = (rng.bytes(MIB), rng.bytes(MIB), rng.bytes(MIB));
    std::fs::write(d.join("pattern.bin"), &pattern).unwrap();
    std::fs::write(d.join("discard.bin"), &discard).unwrap();
    std::fs::write(d.join("payload.bin"), &payload).unwrap();

    // Image A: 32 MiB, the pattern at 0 and the discard region at 8 MiB.
    // Metadata preallocation, since an NVMe namespace cannot grow.
    let mut expect = vec![0u8; 32 * MIB];
    expect[..MIB].copy_from_slice(&pattern);
    expect[8 * MIB..9 * MIB].copy_from_slice(&discard);
    let src = d.join("a.raw");
    std::fs::write(&src, &expect).unwrap();
    let a = d.join("a.qcow2");
    let b = d.join("b.qcow2");
    run(Command::new("qemu-img").args(["convert", "-O", "qcow2", "-o", "preallocation=metadata"]).arg(&src).arg(&a));
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "preallocation=metadata"])
        .arg(&b)
        .arg("64M"));

    run_guest(d, "tests/vm/kernel-nbd.sh", "kernel-nbd: all checks passed", |c| {
        c.arg("--bin")
            .arg(bin("ringblk-nbd"))
            .args(["--modules", "nbd nvme ext4 crc32c_generic"])
            .args(["--timeout", "240"])
            .args(["--file", "pattern.bin", "--file", "discard.bin", "--file", "payload.bin"])
            .args(["--nvme", "a.qcow2", "--nvme", "b.qcow2"])
    });

    // What the guest wrote, as the host's qemu-img sees it: the payload at
    // 4 MiB (direct writes) and its first 256 KiB at 20 MiB (buffered,
    // fsync), the discarded MiB reading as zeroes, the rest untouched.
    expect[4 * MIB..5 * MIB].copy_from_slice(&payload);
    expect[20 * MIB..20 * MIB + 256 * 1024].copy_from_slice(&payload[..256 * 1024]);
    expect[8 * MIB..9 * MIB].fill(0);
    std::fs::write(&src, &expect).unwrap();
    for img in [&a, &b] {
        let out = run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(img));
        assert!(out.contains("No errors were found"), "{}: {out}", img.display());
    }
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2"]).arg(&src).arg(&a));
    let map = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "qcow2"]).arg(&a));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let discarded = map
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["start"].as_u64() == Some(8 * MIB as u64) && e["data"] == false && e["zero"] == true);
    assert!(discarded, "the guest's discard freed no clusters at 8 MiB: {map}");

    // Image B holds the guest's ext2 filesystem: clean to e2fsck.
    let fs = d.join("b.raw");
    run(Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&b).arg(&fs));
    run(Command::new("e2fsck").args(["-f", "-n"]).arg(&fs));
}
