//! Benchmarks live in benches/ (criterion) and scripts/bench/ (peer comparisons).
