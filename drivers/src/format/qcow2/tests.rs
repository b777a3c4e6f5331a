//! Driver-internal behaviour that the block interface cannot show.

use std::sync::Arc;
use std::time::Duration;

use engine::block::{BlockNode, OpenCtx, OpenFlags, WriteFlags};
use engine::options::OptionTree;
use engine::runtime::{IoBuf, Runtime};

use super::{Qcow2, Qcow2Driver};

/// With `cache-clean-interval=1`, an idle image's L2 slices and refcount
/// blocks leave the cache within two rounds; without it (0) they stay.
#[test]
fn cache_clean_interval_empties_idle_caches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.qcow2").to_str().unwrap().to_string();
    let rt = Runtime::single().unwrap();
    let counts = rt.block_on(move || async move {
        let reg = crate::registry();
        let ctx = OpenCtx::new(reg.clone(), OpenFlags { write: true, ..Default::default() });
        let mut o = OptionTree::new();
        o.set("size", (256u64 << 20).to_string());
        o.set("cluster_size", "65536");
        reg.get("qcow2").unwrap().create(&ctx, &path, o).await.unwrap();
        let mut nodes = Vec::new();
        for interval in ["1", "0"] {
            let mut fo = OptionTree::new();
            fo.set("filename", format!("{path}.{interval}"));
            std::fs::copy(&path, format!("{path}.{interval}")).unwrap();
            let file = ctx.open_protocol(fo).await.unwrap();
            let mut qo = OptionTree::new();
            qo.set("cache-clean-interval", interval);
            qo.set("l2-cache-entry-size", "4096");
            let q: Arc<Qcow2> = Qcow2Driver.open(&ctx, qo, file).await.unwrap();
            // Touch L2 slices all over the disk, then write the metadata back
            // so nothing is dirty.
            for i in 0..64u64 {
                let (r, _) = q.write(i * (4 << 20), IoBuf::zeroed(4096).tap_fill(i as u8 + 1), WriteFlags::default()).await;
                r.unwrap();
            }
            q.flush().await.unwrap();
            nodes.push(q);
        }
        let occupancy = |q: &Qcow2| (q.cache.len(), q.refs.state.lock().unwrap().blocks.len());
        let before: Vec<_> = nodes.iter().map(|q| occupancy(q)).collect();
        engine::runtime::sleep(Duration::from_millis(2600)).await;
        let mut out = Vec::new();
        for (q, b) in nodes.iter().zip(before) {
            out.push((b, occupancy(q)));
            q.close().await.unwrap();
        }
        out
    });
    let [(before, after), (kept_before, kept_after)] = counts[..] else { panic!("{counts:?}") };
    assert!(before.0 >= 8 && before.1 >= 1, "caches filled: {before:?}");
    assert_eq!(after, (0, 0), "idle caches emptied after two rounds (was {before:?})");
    assert_eq!(kept_before, kept_after, "interval 0 never cleans");
}

trait TapFill {
    fn tap_fill(self, b: u8) -> IoBuf;
}

impl TapFill for IoBuf {
    fn tap_fill(mut self, b: u8) -> IoBuf {
        self.fill(b);
        self
    }
}
