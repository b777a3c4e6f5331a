//! The userspace NVMe driver (drivers/src/protocol/nvme) against QEMU's
//! emulated NVMe controller, in a guest booted by scripts/vm with an
//! emulated IOMMU: bring-up and Identify, a refused unmapped buffer, a
//! randomized workload over several queue pairs checked against a model,
//! the same with a controller reset halfway, and a qcow2 image filled over
//! nvme:// by the CLI and served from there by ringblk-nbd, and `ringblk bench` over every path to a namespace
//! left to the kernel (threads, native, io_uring, io_uring_cmd passthrough,
//! vfio) with passthrough writes read back through the block device. After
//! the guest powers off the host checks the
//! backing files: the workloads' final contents, replayed on the host by
//! `nvme-guest expect`, and the qcow2 image with qemu-img. The harness
//! fails the run on any IOMMU (DMAR) fault the guest kernel logs. The guest
//! half is tests/vm/nvme.sh.

use std::path::{Path, PathBuf};
use std::process::Command;

use ringblk_tests::{bin, run, run_guest, Rng};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
const SHARDS: u64 = 3;
const WORKERS: u64 = 2;
const OPS: u64 = 250;

fn expect(dir: &Path, name: &str, block: u64, seed: u64) -> PathBuf {
    let out = dir.join(name);
    let (size, shards, workers, ops) = (SIZE.to_string(), SHARDS.to_string(), WORKERS.to_string(), OPS.to_string());
    run(Command::new(env!("CARGO_BIN_EXE_nvme-guest"))
        .args(["expect", &size, &block.to_string(), &shards, &workers, &ops, &seed.to_string()])
        .arg(&out));
    out
}

#[test]
fn the_nvme_driver_runs_a_guest_s_controllers_over_vfio() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (seed, seed_b) = (7u64, 8u64);
    std::fs::write(
        d.join("params.sh"),
        format!("SIZE={SIZE} SHARDS={SHARDS} WORKERS={WORKERS} OPS={OPS} SEED={seed} SEED_B={seed_b}\n"),
    )
    .unwrap();
    let a = d.join("a.raw");
    let b = d.join("b.raw");
    for f in [&a, &b] {
        std::fs::File::create(f).unwrap().set_len(SIZE).unwrap();
    }
    let src = d.join("src.raw");
    let mut data = Rng::new(3).bytes(16 * MIB as usize);
    data[4 * MIB as usize..6 * MIB as usize].fill(0);
    std::fs::write(&src, &data).unwrap();
    // An NVMe namespace cannot grow: the image is made whole up front.
    let c = d.join("c.qcow2");
    std::fs::File::create(d.join("d.raw")).unwrap().set_len(64 * MIB).unwrap();
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "preallocation=metadata"])
        .arg(&c)
        .arg("16M"));

    run_guest(d, "tests/vm/nvme.sh", "nvme: all checks passed", |c| {
        c.arg("--bin")
            .arg(env!("CARGO_BIN_EXE_nvme-guest"))
            .arg("--bin")
            .arg(bin("ringblk"))
            .arg("--bin")
            .arg(bin("ringblk-nbd"))
            .args(["--iommu", "--modules", "nvme vfio vfio_iommu_type1 vfio_pci", "--smp", "2"])
            .args(["--timeout", "300"])
            .args(["--file", "params.sh", "--file", "src.raw"])
            .args(["--nvme", "a.raw", "--nvme-4k", "b.raw", "--nvme", "c.qcow2", "--nvme", "d.raw"])
    });

    // What the guest's acknowledged writes left on the namespaces.
    for (img, block, seed) in [(&a, 512, seed), (&b, 4096, seed_b)] {
        let want = expect(d, "want.raw", block, seed);
        run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&want).arg(img));
    }
    let out = run(Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&c));
    assert!(out.contains("No errors were found"), "{out}");
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2"]).arg(&src).arg(&c));
}
