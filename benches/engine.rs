//! Criterion benchmarks of the engine's hot paths (short measurement times so that
//! `cargo bench --bench engine` finishes in a few minutes):
//!
//! - `write/synced_8x256B`: one thread, `Engine::write` of 8 entries × 256 B to one group.
//! - `write/unsynced_8x4KiB`: one thread, `Engine::write_unsynced` of 8 entries × 4 KiB.
//! - `read/entry_256B`: `Engine::entry` of a random entry among 100 groups × 2,000 entries.
//! - `recovery/open_64MiB`: `Engine::open` of a directory holding 64 MiB of 256 B entries across
//!   1,000 groups (16 MiB segments, page cache warm).
//!
//! The workloads of issue 2 with their targets are in `examples/stress.rs`.

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use multiraft_wal::{Engine, Options, WriteBatch};

/// xorshift64*: payload bytes and random picks.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// Incompressible payload pool; entries are slices at random offsets.
fn pool() -> Vec<u8> {
    let mut rng = Rng(0x5EED_1234_5678_9ABC);
    (0..(1 << 20))
        .flat_map(|_| rng.next().to_le_bytes())
        .collect()
}

fn entries<'a>(pool: &'a [u8], rng: &mut Rng, n: usize, len: usize) -> Vec<&'a [u8]> {
    (0..n)
        .map(|_| {
            let off = rng.below((pool.len() - len) as u64) as usize;
            &pool[off..off + len]
        })
        .collect()
}

fn tempdir() -> tempfile::TempDir {
    // Under target/ (a real disk), not a possibly tmpfs /tmp: fdatasync must cost what it costs.
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-tmp");
    std::fs::create_dir_all(&base).expect("create target/bench-tmp");
    tempfile::tempdir_in(base).expect("create temp dir")
}

fn bench_writes(c: &mut Criterion) {
    let pool = pool();
    let mut g = c.benchmark_group("write");

    {
        let dir = tempdir();
        let engine = Engine::open(dir.path(), Options::default()).expect("open");
        let mut rng = Rng(1);
        let mut next = 1u64;
        g.throughput(Throughput::Elements(1));
        g.bench_function("synced_8x256B", |b| {
            b.iter(|| {
                let mut batch = WriteBatch::new();
                batch.append(1, next, entries(&pool, &mut rng, 8, 256));
                engine.write(batch).expect("synced write");
                next += 8;
            })
        });
    }

    {
        let dir = tempdir();
        let engine = Engine::open(dir.path(), Options::default()).expect("open");
        let mut rng = Rng(2);
        let mut next = 1u64;
        g.throughput(Throughput::Bytes(8 * 4096));
        g.bench_function("unsynced_8x4KiB", |b| {
            b.iter(|| {
                let mut batch = WriteBatch::new();
                batch.append(1, next, entries(&pool, &mut rng, 8, 4096));
                engine.write_unsynced(batch).expect("unsynced write");
                next += 8;
            })
        });
    }
    g.finish();
}

fn bench_read(c: &mut Criterion) {
    let pool = pool();
    let dir = tempdir();
    let engine = Engine::open(dir.path(), Options::default()).expect("open");
    let (groups, per_group) = (100u64, 2_000u64);
    let mut rng = Rng(3);
    for first in (1..=per_group).step_by(8) {
        for group in 1..=groups {
            let mut batch = WriteBatch::new();
            batch.append(group, first, entries(&pool, &mut rng, 8, 256));
            engine.write_unsynced(batch).expect("populate");
        }
    }
    engine.sync().expect("sync");
    let mut g = c.benchmark_group("read");
    g.throughput(Throughput::Elements(1));
    g.bench_function("entry_256B", |b| {
        b.iter(|| {
            let group = 1 + rng.below(groups);
            let index = 1 + rng.below(per_group);
            black_box(engine.entry(group, index).expect("get"))
        })
    });
    g.finish();
}

fn bench_recovery(c: &mut Criterion) {
    let pool = pool();
    let dir = tempdir();
    let opts = || {
        Options::default()
            .segment_size(16 << 20)
            .prefill_segments(false)
    };
    let (groups, total) = (1_000u64, 64u64 << 20);
    {
        let engine = Engine::open(dir.path(), opts()).expect("open");
        let mut rng = Rng(4);
        let mut next = vec![1u64; groups as usize];
        for i in 0..total / (8 * 256) {
            let group = i % groups;
            let mut batch = WriteBatch::new();
            batch.append(
                group + 1,
                next[group as usize],
                entries(&pool, &mut rng, 8, 256),
            );
            engine.write_unsynced(batch).expect("populate");
            next[group as usize] += 8;
        }
        engine.sync().expect("sync");
    }
    // An open may leave one more (empty, prepared) segment behind, which the next open would
    // scan (up to commit 8e8e0da every open did); remove the segments an iteration added so
    // that every iteration opens the same directory.
    let segments = |d: &Path| -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .expect("list")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "wal"))
            .collect();
        v.sort();
        v
    };
    drop(Engine::open(dir.path(), opts()).expect("first reopen"));
    let baseline = segments(dir.path());

    let mut g = c.benchmark_group("recovery");
    g.throughput(Throughput::Bytes(total));
    g.bench_function("open_64MiB", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let t0 = Instant::now();
                let engine = Engine::open(dir.path(), opts()).expect("reopen");
                elapsed += t0.elapsed();
                black_box(engine.stats().entries);
                drop(engine);
                for p in segments(dir.path()) {
                    if !baseline.contains(&p) {
                        std::fs::remove_file(&p).expect("remove added segment");
                    }
                }
            }
            elapsed
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_writes, bench_read, bench_recovery
}
criterion_main!(benches);
