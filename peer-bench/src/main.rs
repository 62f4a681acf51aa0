//! multiraft-wal and raft-engine 0.4.2 side by side (issue 7, "Benchmarks").
//!
//! Both engines run every workload in the same process, with the same driver (writer threads
//! each owning their groups: group `g` belongs to thread `g % threads`, visited round-robin;
//! the batch is built before the clock starts, the clock covers the write call only),
//! interleaved per workload, compression off on both sides, each run on a fresh directory that
//! is deleted afterwards, with `sync(2)` and a pause between runs. raft-engine stores protobuf
//! `raft::eraftpb::Entry` values (as its own examples and benches do); multiraft-wal stores the
//! payload bytes. See README.md.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use raft_proto::eraftpb::Entry;

#[derive(Parser, Debug, Clone)]
#[command(about = "multiraft-wal vs raft-engine 0.4.2, same process shape, one table")]
struct Args {
    /// Parent directory of the engine directories (one fresh directory per run, deleted
    /// afterwards). Default: `peer-bench` under the system temp dir. Use a real disk.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Workloads to run, comma-separated: W1, W8, W2p (or W2'), W5, W5p (or W5'), W10.
    /// Default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Duration of each timed run (W1, W8, W2', W10), seconds.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Writer threads of the W1 scaling sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64,256")]
    threads: Vec<usize>,
    /// Writer threads of W8 (100,000 groups, one entry per synced write).
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    w8_threads: Vec<usize>,
    /// Raft groups of W1, W2', W5 and W10.
    #[arg(long, default_value_t = 1000)]
    groups: u64,
    /// Payload bytes W5 fills (256 B entries) before the reopen (suffixes KiB, MiB, GiB).
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    w5_bytes: u64,
    /// Random single-entry gets of W5 after the reopen (page cache as the fill left it), and
    /// hot gets of W5'.
    #[arg(long, default_value_t = 200_000)]
    gets: usize,
    /// Random single-entry gets of W5 after a second reopen, the engine's files evicted from
    /// the page cache (posix_fadvise DONTNEED) before that reopen and again after it, so the
    /// gets read from the disk; 0 skips that part.
    #[arg(long, default_value_t = 5_000)]
    cold_gets: usize,
    /// multiraft-wal's single-entry get (W5, W5'): `entry` (a `Vec` copy, the default and what
    /// the tables report) or `entry_bytes` (shared `Bytes`: a slice of the cached payload).
    #[arg(long, default_value = "entry", value_parser = ["entry", "entry_bytes"])]
    mrwal_get: String,
    /// Rounds of every workload; each figure is the median over rounds, and the engine that
    /// runs first alternates between rounds and workloads.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Pause after each run (after `sync(2)`), seconds.
    #[arg(long, default_value_t = 2.0)]
    settle_secs: f64,
}

fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .replace('_', "")
        .parse()
        .map_err(|e| format!("bad byte count {s:?}: {e}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        u => return Err(format!("unknown unit {u:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} overflows u64"))
}

// ---------------------------------------------------------------------------------------------
// The two engines behind one interface.

/// What the driver needs from an engine. `Batch` is built before the clock starts.
trait Wal: Send + Sync + Sized + 'static {
    const NAME: &'static str;
    type Batch: Send;
    fn open(dir: &Path) -> Result<Self>;
    fn batch(group: u64, first_index: u64, entries: &[&[u8]]) -> Self::Batch;
    fn write(&self, batch: Self::Batch, sync: bool) -> Result<()>;
    /// Payload length of entry `index` of `group`, `None` when absent.
    fn get(&self, group: u64, index: u64) -> Result<Option<usize>>;
    /// Reads entries `begin..end` of `group`; returns how many came back.
    fn read_range(&self, group: u64, begin: u64, end: u64) -> Result<usize>;
}

struct Mrwal(multiraft_wal::Engine);

/// `--mrwal-get entry_bytes`: multiraft-wal's gets call `Engine::entry_bytes`.
static MRWAL_GET_BYTES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Wal for Mrwal {
    const NAME: &'static str = "multiraft-wal";
    type Batch = multiraft_wal::WriteBatch;

    fn open(dir: &Path) -> Result<Self> {
        // Compression off (the default threshold is 8 KiB); everything else default.
        let opts = multiraft_wal::Options::default().compression_threshold(usize::MAX);
        Ok(Mrwal(
            multiraft_wal::Engine::open(dir, opts).context("opening multiraft-wal")?,
        ))
    }

    fn batch(group: u64, first_index: u64, entries: &[&[u8]]) -> Self::Batch {
        let mut b = multiraft_wal::WriteBatch::new();
        b.append(group, first_index, entries.iter().copied());
        b
    }

    fn write(&self, batch: Self::Batch, sync: bool) -> Result<()> {
        if sync {
            self.0.write(batch)?;
        } else {
            self.0.write_unsynced(batch)?;
        }
        Ok(())
    }

    fn get(&self, group: u64, index: u64) -> Result<Option<usize>> {
        if MRWAL_GET_BYTES.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(self.0.entry_bytes(group, index)?.map(|e| e.len()));
        }
        Ok(self.0.entry(group, index)?.map(|e| e.len()))
    }

    fn read_range(&self, group: u64, begin: u64, end: u64) -> Result<usize> {
        // The range read the openraft adapters make (`limited_get_log_entries`): shared
        // slices of the cached payload or of each record read, no per-entry copy.
        Ok(self.0.entries_bytes(group, begin..end, usize::MAX)?.len())
    }
}

/// raft-engine's entry type, as in its own examples and benches.
#[derive(Clone)]
struct MessageExtTyped;

impl raft_engine::MessageExt for MessageExtTyped {
    type Entry = Entry;

    fn index(e: &Entry) -> u64 {
        e.index
    }
}

struct RaftEngine(raft_engine::Engine);

impl Wal for RaftEngine {
    const NAME: &'static str = "raft-engine";
    type Batch = raft_engine::LogBatch;

    fn open(dir: &Path) -> Result<Self> {
        let cfg = raft_engine::Config {
            dir: dir.to_str().context("non-UTF-8 directory")?.to_owned(),
            // 0 turns batch compression off (the default threshold is 8 KiB).
            batch_compression_threshold: raft_engine::ReadableSize(0),
            ..Default::default()
        };
        Ok(RaftEngine(
            raft_engine::Engine::open(cfg).context("opening raft-engine")?,
        ))
    }

    fn batch(group: u64, first_index: u64, entries: &[&[u8]]) -> Self::Batch {
        let entries: Vec<Entry> = entries
            .iter()
            .enumerate()
            .map(|(i, data)| Entry {
                index: first_index + i as u64,
                term: 1,
                data: bytes::Bytes::copy_from_slice(data),
                ..Default::default()
            })
            .collect();
        let mut b = raft_engine::LogBatch::with_capacity(entries.len());
        b.add_entries::<MessageExtTyped>(group, &entries)
            .expect("encoding entries");
        b
    }

    fn write(&self, mut batch: Self::Batch, sync: bool) -> Result<()> {
        self.0.write(&mut batch, sync)?;
        Ok(())
    }

    fn get(&self, group: u64, index: u64) -> Result<Option<usize>> {
        Ok(self
            .0
            .get_entry::<MessageExtTyped>(group, index)?
            .map(|e| e.data.len()))
    }

    fn read_range(&self, group: u64, begin: u64, end: u64) -> Result<usize> {
        let mut out = Vec::with_capacity((end - begin) as usize);
        Ok(self
            .0
            .fetch_entries_to::<MessageExtTyped>(group, begin, end, None, &mut out)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers: rng, payloads, latency summaries, directories, progress.

/// xorshift64*: fast, deterministic; picks groups, offsets and indexes.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
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

/// 8 MiB of pseudo-random (incompressible) bytes; an entry is a slice at a random offset.
struct Payload(Vec<u8>);

impl Payload {
    fn new() -> Self {
        let mut rng = Rng::new(0x5EED);
        Payload(
            (0..1 << 20)
                .flat_map(|_| rng.next().to_le_bytes())
                .collect(),
        )
    }
    fn entry(&self, rng: &mut Rng, len: usize) -> &[u8] {
        let off = rng.below((self.0.len() - len) as u64) as usize;
        &self.0[off..off + len]
    }
}

/// Latency summary, microseconds.
#[derive(Debug, Clone, Copy, Default)]
struct Lat {
    mean: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

fn summarize(mut ns: Vec<u64>) -> Lat {
    if ns.is_empty() {
        return Lat::default();
    }
    ns.sort_unstable();
    let pick = |q: f64| ns[((ns.len() as f64 * q) as usize).min(ns.len() - 1)] as f64 / 1e3;
    Lat {
        mean: ns.iter().sum::<u64>() as f64 / ns.len() as f64 / 1e3,
        p50: pick(0.50),
        p99: pick(0.99),
        p999: pick(0.999),
        max: *ns.last().unwrap_or(&0) as f64 / 1e3,
    }
}

macro_rules! progress {
    ($($arg:tt)*) => {{
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        eprintln!(
            "{:02}:{:02}:{:02} {}",
            secs / 3600 % 24,
            secs / 60 % 60,
            secs % 60,
            format_args!($($arg)*)
        );
    }};
}

/// A fresh engine directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(base: &Path, name: &str) -> Result<Self> {
        let path = base.join(name);
        if path.exists() {
            std::fs::remove_dir_all(&path).with_context(|| format!("removing {path:?}"))?;
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {path:?}"))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Flushes the whole system's dirty data, then pauses, so the next run starts on a quiet disk.
fn settle(args: &Args) {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_secs_f64(args.settle_secs));
}

/// Drops every file under `dir` from the page cache (they were synced first).
fn evict_page_cache(dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            evict_page_cache(&path)?;
            continue;
        }
        let f = std::fs::File::open(&path).with_context(|| format!("opening {path:?}"))?;
        f.sync_all()?;
        // SAFETY: a valid descriptor; the call only drops clean cached pages.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        ensure!(rc == 0, "posix_fadvise({path:?}) failed: {rc}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// W1, W8, W2': timed writers.

#[derive(Debug, Clone, Copy, Default)]
struct Timed {
    writes_per_sec: f64,
    /// Mean time per write over the run (wall time × threads / writes), nanoseconds.
    ns_per_write: f64,
    lat: Lat,
}

/// `threads` writers for `args.secs`, each write `entries` × `entry_len` bytes appended to one
/// group; thread `t` owns the groups `g` with `g % threads == t` and visits them round-robin.
fn timed_writes<W: Wal>(
    args: &Args,
    dir: &Path,
    threads: usize,
    entries: usize,
    entry_len: usize,
    sync: bool,
    groups: u64,
) -> Result<Timed> {
    let engine = Arc::new(W::open(dir)?);
    let payload = Arc::new(Payload::new());
    let barrier = Arc::new(Barrier::new(threads + 1));
    let dur = Duration::from_secs_f64(args.secs);
    let mut handles = Vec::new();
    for t in 0..threads {
        let engine = engine.clone();
        let payload = payload.clone();
        let barrier = barrier.clone();
        handles.push(std::thread::spawn(
            move || -> Result<(Vec<u64>, Instant, Instant)> {
                let mut rng = Rng::new(t as u64 + 1);
                let owned: Vec<u64> = (0..groups)
                    .filter(|g| g % threads as u64 == t as u64)
                    .collect();
                ensure!(!owned.is_empty(), "thread {t} owns no group");
                let mut next = vec![1u64; owned.len()];
                let mut lat = Vec::with_capacity(1 << 16);
                let mut slot = 0usize;
                let mut data: Vec<&[u8]> = Vec::with_capacity(entries);
                barrier.wait();
                let start = Instant::now();
                let deadline = start + dur;
                loop {
                    data.clear();
                    data.extend((0..entries).map(|_| payload.entry(&mut rng, entry_len)));
                    let batch = W::batch(owned[slot] + 1, next[slot], &data);
                    let t0 = Instant::now();
                    if t0 >= deadline {
                        return Ok((lat, start, t0));
                    }
                    engine.write(batch, sync)?;
                    lat.push(t0.elapsed().as_nanos() as u64);
                    next[slot] += entries as u64;
                    slot = (slot + 1) % owned.len();
                }
            },
        ));
    }
    barrier.wait();
    let mut all = Vec::new();
    let mut busy = 0.0;
    let mut first = None::<Instant>;
    let mut end = None::<Instant>;
    for h in handles {
        let (lat, s, e) = h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        all.extend(lat);
        busy += e.duration_since(s).as_secs_f64();
        first = Some(first.map_or(s, |f| f.min(s)));
        end = Some(end.map_or(e, |x| x.max(e)));
    }
    let secs = match (first, end) {
        (Some(f), Some(e)) => e.duration_since(f).as_secs_f64(),
        _ => bail!("no writer"),
    };
    let writes = all.len() as f64;
    drop(engine);
    Ok(Timed {
        writes_per_sec: writes / secs,
        ns_per_write: busy * 1e9 / writes,
        lat: summarize(all),
    })
}

// ---------------------------------------------------------------------------------------------
// W5: fill, reopen, random gets.

#[derive(Debug, Clone, Copy, Default)]
struct Gets {
    fill_secs: f64,
    reopen_secs: f64,
    warm: Lat,
    cold_reopen_secs: f64,
    cold: Lat,
}

const W5_ENTRY: usize = 256;
const W5_BATCH: usize = 8;

fn random_gets<W: Wal>(engine: &W, last: &[u64], gets: usize, seed: u64) -> Result<Lat> {
    let mut rng = Rng::new(seed);
    let mut lat = Vec::with_capacity(gets);
    for _ in 0..gets {
        let g = rng.below(last.len() as u64);
        let index = 1 + rng.below(last[g as usize]);
        let t0 = Instant::now();
        let len = engine.get(g + 1, index)?;
        lat.push(t0.elapsed().as_nanos() as u64);
        ensure!(
            len == Some(W5_ENTRY),
            "{}: entry {index} of group {} came back as {len:?}",
            W::NAME,
            g + 1
        );
    }
    Ok(summarize(lat))
}

/// Fills `args.w5_bytes` of 256 B entries (unsynced batches of 8 entries of one group,
/// round-robin over the groups, 1 thread), syncs and closes; reopens and runs `args.gets`
/// random single-entry gets (page cache as the fill left it); closes, evicts the files from
/// the page cache, reopens (timed), evicts them again and runs `args.cold_gets` random gets.
fn w5<W: Wal>(args: &Args, dir: &Path) -> Result<Gets> {
    let payload = Payload::new();
    let batches = (args.w5_bytes / (W5_ENTRY * W5_BATCH) as u64).max(1);
    let mut last = vec![0u64; args.groups as usize];
    let mut rng = Rng::new(5);
    let start = Instant::now();
    {
        let engine = W::open(dir)?;
        let mut data: Vec<&[u8]> = Vec::with_capacity(W5_BATCH);
        for b in 0..batches {
            let g = (b % args.groups) as usize;
            data.clear();
            data.extend((0..W5_BATCH).map(|_| payload.entry(&mut rng, W5_ENTRY)));
            engine.write(W::batch(g as u64 + 1, last[g] + 1, &data), false)?;
            last[g] += W5_BATCH as u64;
        }
        // One synced (empty-payload) write would differ between engines; a synced batch of one
        // more entry makes everything durable on both.
        data.truncate(1);
        engine.write(W::batch(1, last[0] + 1, &data), true)?;
        last[0] += 1;
    }
    let fill_secs = start.elapsed().as_secs_f64();
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };

    let t0 = Instant::now();
    let engine = W::open(dir)?;
    let reopen_secs = t0.elapsed().as_secs_f64();
    let warm = random_gets(&engine, &last, args.gets, 7)?;
    drop(engine);

    let (cold_reopen_secs, cold) = if args.cold_gets > 0 {
        evict_page_cache(dir)?;
        let t0 = Instant::now();
        let engine = W::open(dir)?;
        let reopen = t0.elapsed().as_secs_f64();
        // Recovery read the files back into the page cache: evict them again, so the gets
        // read from the disk.
        evict_page_cache(dir)?;
        (reopen, random_gets(&engine, &last, args.cold_gets, 11)?)
    } else {
        (0.0, Lat::default())
    };
    Ok(Gets {
        fill_secs,
        reopen_secs,
        warm,
        cold_reopen_secs,
        cold,
    })
}

// ---------------------------------------------------------------------------------------------
// W5': hot gets while a writer appends.

const W5P_TAIL: u64 = 64;

/// Every group first gets 64 entries of 256 B; then one writer thread appends unsynced batches
/// of 8 × 256 B round-robin over the groups while this thread runs `args.gets` gets of one of
/// the last 64 entries of a random group (as the writer last published it).
fn w5_hot<W: Wal>(args: &Args, dir: &Path) -> Result<Lat> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let engine = Arc::new(W::open(dir)?);
    let payload = Arc::new(Payload::new());
    let groups = args.groups as usize;
    let last: Arc<Vec<AtomicU64>> = Arc::new((0..groups).map(|_| AtomicU64::new(0)).collect());
    {
        let mut rng = Rng::new(55);
        for (g, l) in last.iter().enumerate() {
            let data: Vec<&[u8]> = (0..W5P_TAIL)
                .map(|_| payload.entry(&mut rng, W5_ENTRY))
                .collect();
            engine.write(W::batch(g as u64 + 1, 1, &data), false)?;
            l.store(W5P_TAIL, Ordering::Release);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (engine, payload, last, stop) =
            (engine.clone(), payload.clone(), last.clone(), stop.clone());
        std::thread::spawn(move || -> Result<u64> {
            let mut rng = Rng::new(56);
            let mut data: Vec<&[u8]> = Vec::with_capacity(W5_BATCH);
            let mut writes = 0u64;
            let mut g = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let l = last[g].load(Ordering::Relaxed);
                data.clear();
                data.extend((0..W5_BATCH).map(|_| payload.entry(&mut rng, W5_ENTRY)));
                engine.write(W::batch(g as u64 + 1, l + 1, &data), false)?;
                last[g].store(l + W5_BATCH as u64, Ordering::Release);
                writes += 1;
                g = (g + 1) % last.len();
            }
            Ok(writes)
        })
    };
    let mut rng = Rng::new(57);
    let mut lat = Vec::with_capacity(args.gets);
    let mut result = Ok(());
    for _ in 0..args.gets {
        let g = rng.below(groups as u64) as usize;
        let index = last[g].load(Ordering::Acquire) - rng.below(W5P_TAIL);
        let t0 = Instant::now();
        let len = engine.get(g as u64 + 1, index);
        lat.push(t0.elapsed().as_nanos() as u64);
        match len {
            Ok(Some(W5_ENTRY)) => {}
            other => {
                result = Err(anyhow::anyhow!(
                    "{}: hot entry {index} of group {} came back as {other:?}",
                    W::NAME,
                    g + 1
                ));
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    result?;
    progress!("W5' {}: {writes} writes during the gets", W::NAME);
    Ok(summarize(lat))
}

// ---------------------------------------------------------------------------------------------
// W10: read back what was just appended.

#[derive(Debug, Clone, Copy, Default)]
struct ReadBack {
    entries_per_sec: f64,
    /// Mean time of one range read, microseconds.
    us_per_read: f64,
}

/// 1 thread, round-robin over the groups: append 8–64 entries of 256 B to the group (one
/// unsynced write), then read exactly those entries back with one range read. Only the reads
/// are timed; entries/s = entries read / time spent reading.
fn w10<W: Wal>(args: &Args, dir: &Path) -> Result<ReadBack> {
    let engine = W::open(dir)?;
    let payload = Payload::new();
    let mut rng = Rng::new(10);
    let mut next = vec![1u64; args.groups as usize];
    let mut data: Vec<&[u8]> = Vec::with_capacity(64);
    let (mut read_ns, mut read_entries, mut reads) = (0u128, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs_f64(args.secs);
    let mut g = 0usize;
    while Instant::now() < deadline {
        let k = 8 + rng.below(57) as usize;
        data.clear();
        data.extend((0..k).map(|_| payload.entry(&mut rng, 256)));
        engine.write(W::batch(g as u64 + 1, next[g], &data), false)?;
        let t0 = Instant::now();
        let n = engine.read_range(g as u64 + 1, next[g], next[g] + k as u64)?;
        read_ns += t0.elapsed().as_nanos();
        ensure!(n == k, "{}: read {n} of {k} entries", W::NAME);
        read_entries += k as u64;
        reads += 1;
        next[g] += k as u64;
        g = (g + 1) % next.len();
    }
    let secs = read_ns as f64 / 1e9;
    Ok(ReadBack {
        entries_per_sec: read_entries as f64 / secs,
        us_per_read: read_ns as f64 / 1e3 / reads as f64,
    })
}

// ---------------------------------------------------------------------------------------------
// Driver and table.

/// One table row: a workload, a metric, the two engines' values (medians over rounds).
struct Row {
    workload: String,
    metric: &'static str,
    higher_is_better: bool,
    mrwal: Vec<f64>,
    re: Vec<f64>,
}

struct Table(Vec<Row>);

impl Table {
    fn add(&mut self, workload: &str, metric: &'static str, hib: bool, engine: &str, v: f64) {
        let pos = self
            .0
            .iter()
            .position(|r| r.workload == workload && r.metric == metric);
        let row = match pos {
            Some(i) => &mut self.0[i],
            None => {
                self.0.push(Row {
                    workload: workload.to_owned(),
                    metric,
                    higher_is_better: hib,
                    mrwal: Vec::new(),
                    re: Vec::new(),
                });
                self.0.last_mut().expect("just pushed")
            }
        };
        if engine == Mrwal::NAME {
            row.mrwal.push(v);
        } else {
            row.re.push(v);
        }
    }

    fn add_timed(&mut self, workload: &str, engine: &str, t: &Timed, ns_per_write: bool) {
        if ns_per_write {
            self.add(
                workload,
                "ns per append (wall / appends)",
                false,
                engine,
                t.ns_per_write,
            );
            self.add(
                workload,
                "ns per write call (mean)",
                false,
                engine,
                t.lat.mean * 1e3,
            );
        }
        self.add(workload, "writes/s", true, engine, t.writes_per_sec);
        self.add(workload, "p50 µs", false, engine, t.lat.p50);
        self.add(workload, "p99 µs", false, engine, t.lat.p99);
        self.add(workload, "p99.9 µs", false, engine, t.lat.p999);
        self.add(workload, "max µs", false, engine, t.lat.max);
    }

    fn print(&self) {
        println!("| workload | metric | multiraft-wal | raft-engine | ratio mrwal / raft-engine | better |");
        println!("|---|---|---:|---:|---:|---|");
        let mut last = "";
        for r in &self.0 {
            let (a, b) = (median(&r.mrwal), median(&r.re));
            let ratio = a / b;
            let better = if !ratio.is_finite() {
                "n/a"
            } else if (ratio > 1.0) == r.higher_is_better && ratio != 1.0 {
                "multiraft-wal"
            } else if ratio == 1.0 {
                "tie"
            } else {
                "raft-engine"
            };
            let dir = if r.higher_is_better {
                "higher is better"
            } else {
                "lower is better"
            };
            let name = if r.workload == last {
                ""
            } else {
                r.workload.as_str()
            };
            last = &r.workload;
            println!(
                "| {name} | {} ({dir}) | {} | {} | {ratio:.2}× | {better} |",
                r.metric,
                fmt(a),
                fmt(b)
            );
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn fmt(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v >= 100_000.0 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The first three fields of /proc/loadavg (other work on the machine skews every figure).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".into(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

fn wanted(args: &Args, w: &str) -> bool {
    args.only.is_empty()
        || args.only.iter().any(|o| {
            let o = o.trim().replace('\'', "p");
            o.eq_ignore_ascii_case(w)
        })
}

/// Runs `f` once per engine, the engine that goes first alternating with `turn`, each on a
/// fresh directory deleted afterwards, with `settle` after each.
fn both(
    args: &Args,
    base: &Path,
    turn: &mut usize,
    mut f: impl FnMut(&str, &Path) -> Result<()>,
) -> Result<()> {
    let order = if turn.is_multiple_of(2) {
        [Mrwal::NAME, RaftEngine::NAME]
    } else {
        [RaftEngine::NAME, Mrwal::NAME]
    };
    *turn += 1;
    for name in order {
        let dir = TempDir::new(base, name)?;
        f(name, &dir.0)?;
        drop(dir);
        settle(args);
    }
    Ok(())
}

/// Calls `$f::<Mrwal>` or `$f::<RaftEngine>` by engine name.
macro_rules! dispatch {
    ($name:expr, $f:ident($($arg:expr),*)) => {
        if $name == Mrwal::NAME {
            $f::<Mrwal>($($arg),*)
        } else {
            $f::<RaftEngine>($($arg),*)
        }
    };
}

fn main() -> Result<()> {
    let args = Args::parse();
    MRWAL_GET_BYTES.store(
        args.mrwal_get == "entry_bytes",
        std::sync::atomic::Ordering::Relaxed,
    );
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let base = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("peer-bench"));
    std::fs::create_dir_all(&base).with_context(|| format!("creating {base:?}"))?;
    let load_before = loadavg();
    let mut table = Table(Vec::new());
    let mut turn = 0usize;
    for round in 1..=args.rounds {
        if wanted(&args, "W1") {
            for &t in &args.threads {
                let w = format!("W1 synced, {} groups, 8 × 256 B, threads: {t}", args.groups);
                both(&args, &base, &mut turn, |e, dir| {
                    progress!("round {round}: W1, threads: {t}, {e} ...");
                    let r = dispatch!(e, timed_writes(&args, dir, t, 8, 256, true, args.groups))?;
                    table.add_timed(&w, e, &r, false);
                    Ok(())
                })?;
            }
        }
        if wanted(&args, "W8") {
            for &t in &args.w8_threads {
                let w = format!("W8 synced, 100,000 groups, 1 × 256 B, threads: {t}");
                both(&args, &base, &mut turn, |e, dir| {
                    progress!("round {round}: W8, threads: {t}, {e} ...");
                    let r = dispatch!(e, timed_writes(&args, dir, t, 1, 256, true, 100_000))?;
                    table.add_timed(&w, e, &r, false);
                    Ok(())
                })?;
            }
        }
        if wanted(&args, "W2p") {
            let w = format!("W2' unsynced, 1 × 128 B, 1 thread, {} groups", args.groups);
            both(&args, &base, &mut turn, |e, dir| {
                progress!("round {round}: W2' {e} ...");
                let r = dispatch!(e, timed_writes(&args, dir, 1, 1, 128, false, args.groups))?;
                table.add_timed(&w, e, &r, true);
                Ok(())
            })?;
        }
        if wanted(&args, "W5") {
            let w = format!(
                "W5 fill {} MiB of 256 B over {} groups, reopen, random gets",
                args.w5_bytes >> 20,
                args.groups
            );
            both(&args, &base, &mut turn, |e, dir| {
                progress!("round {round}: W5 {e} ...");
                let r = dispatch!(e, w5(&args, dir))?;
                table.add(&w, "fill s (unsynced, 1 thread)", false, e, r.fill_secs);
                table.add(&w, "reopen s", false, e, r.reopen_secs);
                table.add(&w, "get µs mean (page cache warm)", false, e, r.warm.mean);
                table.add(&w, "get µs p50 (page cache warm)", false, e, r.warm.p50);
                table.add(&w, "get µs p99 (page cache warm)", false, e, r.warm.p99);
                if args.cold_gets > 0 {
                    table.add(
                        &w,
                        "reopen s (files evicted first)",
                        false,
                        e,
                        r.cold_reopen_secs,
                    );
                    table.add(
                        &w,
                        "get µs mean (files evicted, from disk)",
                        false,
                        e,
                        r.cold.mean,
                    );
                    table.add(
                        &w,
                        "get µs p50 (files evicted, from disk)",
                        false,
                        e,
                        r.cold.p50,
                    );
                }
                Ok(())
            })?;
        }
        if wanted(&args, "W5p") {
            let w = format!(
                "W5' hot get of one of the last 64 entries, {} groups, 1 writer appending",
                args.groups
            );
            both(&args, &base, &mut turn, |e, dir| {
                progress!("round {round}: W5' {e} ...");
                let r = dispatch!(e, w5_hot(&args, dir))?;
                table.add(&w, "get µs mean", false, e, r.mean);
                table.add(&w, "get µs p50", false, e, r.p50);
                table.add(&w, "get µs p99", false, e, r.p99);
                Ok(())
            })?;
        }
        if wanted(&args, "W10") {
            let w = format!(
                "W10 read back the 8–64 entries just appended, {} groups, 1 thread",
                args.groups
            );
            both(&args, &base, &mut turn, |e, dir| {
                progress!("round {round}: W10 {e} ...");
                let r = dispatch!(e, w10(&args, dir))?;
                table.add(&w, "entries/s read", true, e, r.entries_per_sec);
                table.add(&w, "µs per range read (mean)", false, e, r.us_per_read);
                Ok(())
            })?;
        }
    }
    println!(
        "peer-bench: {} round(s) (medians), --secs {}, compression off on both, raft-engine \
         0.4.2 (default config otherwise), multiraft-wal default options otherwise; dir {}; \
         {} cores; load average (1, 5, 15 min) before {}, after {}",
        args.rounds,
        args.secs,
        base.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_before,
        loadavg()
    );
    println!();
    table.print();
    Ok(())
}
