//! libFuzzer target: an arbitrary byte string as a qcow2 image. Header and
//! table parsing, reads through L1/L2 (including compressed clusters) and the
//! consistency check must return errors, never panic or allocate without bound.
//! Run: `cargo fuzz run qcow2_open` from this folder (seed it with images
//! from qemu-img create).
#![no_main]

use engine::block::{open_image, CheckFix, OpenCtx, OpenFlags};
use engine::options::OptionTree;
use engine::runtime::{IoBuf, Runtime};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static RT: Runtime = Runtime::single().expect("io_uring runtime");
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.qcow2");
    std::fs::write(&path, data).unwrap();
    let p = path.to_string_lossy().into_owned();
    RT.with(|rt| {
        rt.block_on(move || async move {
            let ctx = OpenCtx::new(drivers::registry(), OpenFlags { follow_backing: false, ..Default::default() });
            let mut o = OptionTree::new();
            o.set("driver", "qcow2");
            o.set("file.filename", &p);
            o.set("backing", "null");
            let Ok(node) = open_image(&ctx, o).await else { return };
            let size = node.size().min(4 << 20);
            let _ = node.read(0, IoBuf::new(size as usize)).await;
            let _ = node.check(CheckFix::default()).await;
        })
    });
});
