//! Per-operation overhead of the runtime: one IORING_OP_NOP round trip through a
//! shard's ring (submit, reap, wake the task), alone and 32 at a time.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use engine::runtime::{nop, spawn_local, Runtime};

fn nop_round_trip(c: &mut Criterion) {
    let rt = Runtime::single().expect("io_uring runtime");
    let mut g = c.benchmark_group("runtime");
    g.throughput(Throughput::Elements(1));
    g.bench_function("nop_round_trip", |b| {
        b.iter_custom(|iters| {
            rt.block_on(move || async move {
                let t = std::time::Instant::now();
                for _ in 0..iters {
                    nop().await;
                }
                t.elapsed()
            })
        })
    });
    g.throughput(Throughput::Elements(32));
    g.bench_function("nop_batch_32", |b| {
        b.iter_custom(|iters| {
            rt.block_on(move || async move {
                let t = std::time::Instant::now();
                for _ in 0..iters {
                    let hs: Vec<_> = (0..32).map(|_| spawn_local(nop())).collect();
                    for h in hs {
                        h.await;
                    }
                }
                t.elapsed()
            })
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("block_on_cross_thread", |b| {
        b.iter_batched(|| (), |()| rt.block_on(|| async { nop().await }), BatchSize::SmallInput)
    });
    g.finish();
}

criterion_group!(benches, nop_round_trip);
criterion_main!(benches);
