//! Corruption sweeps on real files (a tempdir and `StdFs`): truncation at every byte of the last
//! three records, every byte of every segment header flipped, 10,000 random record bits flipped,
//! each segment deleted in turn, stray and stale files added. Each case must recover (tail cases,
//! TolerateTail) with exactly the data written, or fail with a typed error naming the segment
//! (and offset): never a panic, never wrong data, never data from before a truncate or purge.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use multiraft_wal::fs::{DirLock, FileSystem, FsFile, StdFs};
use multiraft_wal::{Engine, Error, Options, RecoveryMode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::crash_explorer::{
    generate, observe, print_failures, to_batch, MOp, ModelState, Script, Step,
};

const SEED: u64 = 0xC022_0000;
const SEGMENT_SIZE: u64 = 4096;
const HEADER_LEN: u64 = 32;
/// Bytes of a sync marker record (docs/FORMAT.md).
const MARKER_LEN: u64 = 40;

/// One write into a segment file, as recorded.
#[derive(Debug, Clone)]
struct Rec {
    segment: u64,
    offset: u64,
    len: u64,
    /// The number of batches written when this write happened (the batch it belongs to is
    /// `batch` if it was made by a write step; gc rewrites carry the count so far).
    batch: usize,
    from_write: bool,
}

#[derive(Debug, Default)]
struct Log {
    recs: Vec<Rec>,
    batch: usize,
    from_write: bool,
}

/// `StdFs` with every segment write recorded, so the sweeps know where each record lies.
#[derive(Clone, Default)]
struct RecordingFs {
    log: Arc<Mutex<Log>>,
}

impl fmt::Debug for RecordingFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecordingFs")
    }
}

#[derive(Debug)]
struct RecFile {
    inner: Arc<dyn FsFile>,
    segment: Option<u64>,
    log: Arc<Mutex<Log>>,
}

fn segment_id(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let name = name.strip_suffix(".tmp").unwrap_or(name);
    let stem = name.strip_suffix(".wal")?;
    (stem.len() == 16).then(|| u64::from_str_radix(stem, 16).ok())?
}

impl FsFile for RecFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_all_at(buf, offset)?;
        if let Some(segment) = self.segment {
            // Header and prefill writes are not records.
            if offset >= HEADER_LEN && buf.iter().any(|&b| b != 0) {
                let mut log = self.log.lock().unwrap();
                let (batch, from_write) = (log.batch, log.from_write);
                log.recs.push(Rec {
                    segment,
                    offset,
                    len: buf.len() as u64,
                    batch,
                    from_write,
                });
            }
        }
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        self.inner.allocate(len)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
}

impl RecordingFs {
    fn wrap(&self, path: &Path, inner: Arc<dyn FsFile>) -> Arc<dyn FsFile> {
        Arc::new(RecFile {
            inner,
            segment: segment_id(path),
            log: self.log.clone(),
        })
    }
}

impl FileSystem for RecordingFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        StdFs.create_dir_all(dir)
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        Ok(self.wrap(path, StdFs.create(path)?))
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        Ok(self.wrap(path, StdFs.open(path)?))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        StdFs.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        StdFs.remove(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        StdFs.list(dir)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        StdFs.sync_dir(dir)
    }
    fn lock(&self, path: &Path) -> io::Result<Box<dyn DirLock>> {
        StdFs.lock(path)
    }
}

/// A directory image: file name -> bytes.
pub type Image = BTreeMap<String, Vec<u8>>;

pub fn read_image(dir: &Path) -> Image {
    let mut img = Image::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name != "LOCK" && e.file_type().unwrap().is_file() {
            // An open engine may rename a prepared segment (`.wal.tmp`) meanwhile.
            match std::fs::read(e.path()) {
                Ok(bytes) => {
                    img.insert(name, bytes);
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => panic!("reading {:?}: {err}", e.path()),
            }
        }
    }
    img
}

pub fn write_image(dir: &Path, img: &Image) {
    if dir.exists() {
        std::fs::remove_dir_all(dir).unwrap();
    }
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in img {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

fn options(prefill: bool) -> Options {
    Options::default()
        .segment_size(SEGMENT_SIZE)
        .compression_threshold(256)
        .recovery_threads(2)
        .prefill_segments(prefill)
        .gc_rewrite_max_entries(8)
}

/// The written directory, its records and the model.
struct Fixture {
    script: Script,
    /// The directory after a clean shutdown (sealed).
    img: Image,
    /// The directory as a process kill would leave it: taken with the engine still open, after
    /// the last acknowledged write (no seal, the active segment still preallocated).
    unclean: Image,
    recs: Vec<Rec>,
    /// How many of `recs` the unclean image holds (the rest were written by the shutdown).
    unclean_recs: usize,
    /// Snapshots of the directory taken before each gc, to plant stale segments.
    before_gc: Vec<Image>,
    _tmp: tempfile::TempDir,
}

/// Writes the script (all synced); with `purge_all`, then a batch purging every group to its
/// last entry and a gc (so whole segments die); then three small final batches to one group.
fn build(seed: u64, prefill: bool, purge_all: bool) -> Fixture {
    let mut script = generate(seed, 60, &[1, 2, 3, 40], 160);
    let push = |script: &mut Script, ops: Vec<MOp>| {
        let mut st = script.states.last().unwrap().clone();
        for op in &ops {
            st.apply(op);
        }
        script.states.push(st);
        script.steps.push(Step::Write {
            ops,
            mode: crate::crash_explorer::Mode::Sync,
        });
    };
    if purge_all {
        let st = script.states.last().unwrap().clone();
        let ops = st
            .groups
            .iter()
            .filter(|(_, g)| !g.entries.is_empty())
            .map(|(&group, g)| MOp::Purge {
                group,
                index: g.first + g.entries.len() as u64 - 2,
            })
            .collect();
        push(&mut script, ops);
        script.steps.push(Step::Gc);
    }
    for _ in 0..3 {
        let st = script.states.last().unwrap().clone();
        let g = 2;
        let first = st
            .groups
            .get(&g)
            .and_then(|g| (!g.entries.is_empty()).then(|| g.first + g.entries.len() as u64))
            .unwrap_or(1);
        script.groups.entry(g).or_default();
        push(
            &mut script,
            vec![MOp::Append {
                group: g,
                first,
                entries: vec![format!("tail entry {first}").into_bytes()],
            }],
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let fs = RecordingFs::default();
    let engine = Engine::open(&dir, options(prefill).file_system(Arc::new(fs.clone()))).unwrap();
    let mut before_gc = Vec::new();
    for step in &script.steps {
        match step {
            Step::Write { ops, .. } => {
                {
                    let mut log = fs.log.lock().unwrap();
                    log.batch += 1;
                    log.from_write = true;
                }
                engine.write(to_batch(ops)).unwrap();
            }
            Step::Sync => engine.sync().unwrap(),
            Step::Gc => {
                before_gc.push(read_image(&dir));
                fs.log.lock().unwrap().from_write = false;
                engine.gc().unwrap();
            }
        }
    }
    let n = script.states.len() - 1;
    assert_eq!(observe(&engine, &script.groups).unwrap(), script.states[n]);
    let unclean = read_image(&dir);
    let unclean_recs = fs.log.lock().unwrap().recs.len();
    drop(engine);
    let img = read_image(&dir);
    let recs = fs.log.lock().unwrap().recs.clone();
    Fixture {
        script,
        img,
        unclean,
        recs,
        unclean_recs,
        before_gc,
        _tmp: tmp,
    }
}

fn seg_name(id: u64) -> String {
    format!("{id:016x}.wal")
}

/// What opening a damaged image did.
enum Outcome {
    /// Opened; the state read back (or the read error) and the report's tail cut.
    Opened(Result<ModelState, String>, Option<(u64, u64, u64)>),
    Failed(Error),
    Panicked,
}

fn open_and_read(dir: &Path, script: &Script, mode: RecoveryMode, prefill: bool) -> Outcome {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let engine = Engine::open(dir, options(prefill).recovery_mode(mode))?;
        let seen = observe(&engine, &script.groups);
        let cut = engine
            .recovery_report()
            .tail_cut
            .map(|c| (c.segment, c.offset, c.bytes));
        Ok::<_, Error>((seen, cut))
    }));
    match r {
        Ok(Ok((seen, cut))) => Outcome::Opened(seen, cut),
        Ok(Err(e)) => Outcome::Failed(e),
        Err(_) => Outcome::Panicked,
    }
}

fn names_segment(e: &Error, segment: u64) -> bool {
    match e {
        Error::Corruption { segment: s, .. }
        | Error::TornTail { segment: s, .. }
        | Error::MissingSegment { segment: s } => *s == segment,
        Error::Checkpoint { .. } | Error::Inconsistent { .. } => true,
        _ => false,
    }
}

struct Sweep {
    name: &'static str,
    cases: u64,
    recovered: u64,
    errors: u64,
    failures: Vec<String>,
}

impl Sweep {
    fn new(name: &'static str) -> Self {
        Sweep {
            name,
            cases: 0,
            recovered: 0,
            errors: 0,
            failures: Vec::new(),
        }
    }

    fn finish(self, started: Instant) {
        println!(
            "corruption: {}: {} cases, {} recovered, {} typed errors, {} failures, {:.1}s (seed {SEED:#x})",
            self.name,
            self.cases,
            self.recovered,
            self.errors,
            self.failures.len(),
            started.elapsed().as_secs_f64()
        );
        print_failures(&self.failures);
        assert!(
            self.failures.is_empty(),
            "{}: {} failures; first: {}",
            self.name,
            self.failures.len(),
            self.failures[0]
        );
    }
}

/// The newest segment holding records (the engine keeps an empty next segment prepared).
fn last_segment(img: &Image, recs: &[Rec]) -> u64 {
    recs.iter()
        .map(|r| r.segment)
        .filter(|&s| img.contains_key(&seg_name(s)))
        .max()
        .unwrap()
}

/// On the image a process kill leaves (no clean seal): every cut in the last records is a torn
/// tail past the last proven-durable point (each record's sync marker vouches only for the
/// records before it), so TolerateTail recovers the batches before the cut.
#[test]
fn truncate_at_every_byte_of_the_last_three_records() {
    let started = Instant::now();
    let fx = build(SEED, false, false);
    let n = fx.script.states.len() - 1;
    let recs = &fx.recs[..fx.unclean_recs];
    let last = last_segment(&fx.unclean, recs);
    let tail: Vec<&Rec> = recs.iter().rev().take(3).collect();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("case");
    let mut sweep = Sweep::new("truncate at every byte of the last 3 records");
    for rec in tail.iter().rev() {
        assert!(
            rec.from_write && rec.batch >= n - 2,
            "the last records are the final batches"
        );
        let name = seg_name(rec.segment);
        // A write may open with a sync marker (40 bytes, flags byte 2) before its record: a cut
        // right after the marker is a clean record boundary.
        let bytes = &fx.unclean[&name];
        let marked = rec.len > MARKER_LEN && bytes[rec.offset as usize + 8] == 2;
        let body_at = rec.offset + if marked { MARKER_LEN } else { 0 };
        for cut in rec.offset..rec.offset + rec.len {
            sweep.cases += 1;
            let ctx = format!(
                "segment {} cut at byte {cut} (record {}+{})",
                rec.segment, rec.offset, rec.len
            );
            let mut img = fx.unclean.clone();
            img.get_mut(&name).unwrap().truncate(cut as usize);
            write_image(&dir, &img);
            // Cutting the record of batch k leaves the first k-1 batches.
            let want = &fx.script.states[rec.batch - 1];
            match open_and_read(&dir, &fx.script, RecoveryMode::TolerateTail, false) {
                Outcome::Opened(Ok(seen), cut_report) => {
                    sweep.recovered += 1;
                    if rec.segment != last {
                        sweep.failures.push(format!("{ctx}: a damaged record before the last segment was taken for a torn tail"));
                    } else if &seen != want {
                        sweep
                            .failures
                            .push(format!("{ctx}: recovered wrong data: {}", seen.diff(want)));
                    }
                    if rec.segment == last
                        && cut > rec.offset
                        && cut != body_at
                        && cut_report.is_none()
                    {
                        sweep.failures.push(format!(
                            "{ctx}: a torn record was cut but the report shows no tail cut"
                        ));
                    }
                }
                Outcome::Opened(Err(e), _) => sweep
                    .failures
                    .push(format!("{ctx}: reading after recovery: {e}")),
                Outcome::Failed(e) => {
                    sweep.errors += 1;
                    if rec.segment == last || !names_segment(&e, rec.segment) {
                        sweep.failures.push(format!("{ctx}: open failed: {e}"));
                    }
                }
                Outcome::Panicked => sweep.failures.push(format!("{ctx}: open panicked")),
            }
            // Strict mode refuses a torn tail with the segment and the record's offset.
            if cut % 7 == 0 && cut > rec.offset && cut != body_at && rec.segment == last {
                write_image(&dir, &img);
                let torn_at = if cut < body_at { rec.offset } else { body_at };
                match open_and_read(&dir, &fx.script, RecoveryMode::Strict, false) {
                    Outcome::Failed(Error::TornTail { segment, offset })
                        if segment == last && offset == torn_at => {}
                    Outcome::Failed(e) => sweep.failures.push(format!(
                        "{ctx}: strict mode: {e:?}, want TornTail at {torn_at}"
                    )),
                    _ => sweep
                        .failures
                        .push(format!("{ctx}: strict mode opened a torn tail")),
                }
            }
            // Every tenth case: the engine appends after the cut and the result survives a reopen.
            if cut % 10 == 0 {
                write_image(&dir, &img);
                if let Err(e) = append_then_reopen(&dir, &fx.script, want) {
                    sweep.failures.push(format!("{ctx}: {e}"));
                }
            }
        }
    }
    sweep.finish(started);
}

fn append_then_reopen(dir: &Path, script: &Script, want: &ModelState) -> Result<(), String> {
    let engine = Engine::open(dir, options(false)).map_err(|e| e.to_string())?;
    let g = 3;
    let first = want
        .groups
        .get(&g)
        .and_then(|g| (!g.entries.is_empty()).then(|| g.first + g.entries.len() as u64))
        .unwrap_or(1);
    let op = MOp::Append {
        group: g,
        first,
        entries: vec![b"after the cut".to_vec()],
    };
    engine
        .write(to_batch(std::slice::from_ref(&op)))
        .map_err(|e| format!("write after the cut: {e}"))?;
    drop(engine);
    let mut want = want.clone();
    want.apply(&op);
    let engine = Engine::open(dir, options(false))
        .map_err(|e| format!("reopen after writing past the cut: {e}"))?;
    let seen = observe(&engine, &script.groups)?;
    if seen != want {
        return Err(format!(
            "after writing past the cut and reopening: {}",
            seen.diff(&want)
        ));
    }
    Ok(())
}

#[test]
fn flip_every_header_byte() {
    let started = Instant::now();
    let fx = build(SEED + 1, true, false);
    let n = fx.script.states.len() - 1;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("case");
    let mut sweep = Sweep::new("flip every byte of every segment header");
    let segments: Vec<u64> = fx
        .img
        .keys()
        .filter_map(|k| segment_id(Path::new(k)))
        .collect();
    assert!(segments.len() >= 3, "the fixture spans at least 3 segments");
    for &seg in &segments {
        for byte in 0..HEADER_LEN as usize {
            sweep.cases += 1;
            let ctx = format!("segment {seg} header byte {byte} flipped");
            let mut img = fx.img.clone();
            img.get_mut(&seg_name(seg)).unwrap()[byte] ^= 0xff;
            write_image(&dir, &img);
            match open_and_read(&dir, &fx.script, RecoveryMode::TolerateTail, true) {
                Outcome::Opened(Ok(seen), _) => {
                    sweep.recovered += 1;
                    if seen != fx.script.states[n] {
                        sweep.failures.push(format!(
                            "{ctx}: opened with wrong data: {}",
                            seen.diff(&fx.script.states[n])
                        ));
                    }
                }
                Outcome::Opened(Err(e), _) => sweep.failures.push(format!("{ctx}: reading: {e}")),
                Outcome::Failed(e) => {
                    sweep.errors += 1;
                    let ok = matches!(e, Error::Corruption { segment, offset, .. } if segment == seg && offset < HEADER_LEN);
                    if !ok {
                        sweep.failures.push(format!(
                            "{ctx}: {e:?}, want Corruption naming segment {seg} within its header"
                        ));
                    }
                }
                Outcome::Panicked => sweep.failures.push(format!("{ctx}: open panicked")),
            }
        }
    }
    sweep.finish(started);
}

/// Flips random bits of records of a cleanly closed directory. A flip is caught at open (a typed
/// error naming the segment and the record) or, for a record made dead by later batches,
/// ignored; never cut as a torn tail (the log was sealed: every record is proven durable), never
/// wrong data.
#[test]
fn flip_ten_thousand_record_bits() {
    let started = Instant::now();
    let fx = build(SEED + 2, false, false);
    let n = fx.script.states.len() - 1;
    let last = last_segment(&fx.img, &fx.recs);
    let flips: u64 = std::env::var("MRWAL_FLIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut rng = StdRng::seed_from_u64(SEED + 2);
    // Ten thousand opens: on tmpfs when there is one (still real files through StdFs), so the
    // fsyncs of each open do not dominate.
    let shm = Path::new("/dev/shm");
    let tmp = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let dir = tmp.path().join("case");
    let live: Vec<&Rec> = fx
        .recs
        .iter()
        .filter(|r| fx.img.contains_key(&seg_name(r.segment)))
        .collect();
    let mut sweep = Sweep::new("flip random record bits");
    let mut tail_cuts = 0u64;
    write_image(&dir, &fx.img);
    for _ in 0..flips {
        sweep.cases += 1;
        let rec = live[rng.gen_range(0..live.len())];
        let at = rec.offset + rng.gen_range(0..rec.len);
        let bit = rng.gen_range(0..8);
        let name = seg_name(rec.segment);
        let ctx = format!(
            "segment {} byte {at} bit {bit} (record {}+{}, batch {})",
            rec.segment, rec.offset, rec.len, rec.batch
        );
        let path = dir.join(&name);
        // Flip in place and restore afterwards: cheaper than rewriting the directory.
        let mut bytes = fx.img[&name].clone();
        bytes[at as usize] ^= 1 << bit;
        std::fs::write(&path, &bytes).unwrap();
        let outcome = open_and_read(&dir, &fx.script, RecoveryMode::TolerateTail, false);
        let mut dirty = false;
        match outcome {
            Outcome::Opened(Ok(seen), cut) => {
                sweep.recovered += 1;
                dirty = cut.is_some();
                if cut.is_some() {
                    tail_cuts += 1;
                    sweep.failures.push(format!(
                        "{ctx}: a sealed log was cut as a torn tail ({cut:?})"
                    ));
                } else if seen == fx.script.states[n] {
                    // The flipped record was dead (superseded or purged): fine.
                } else {
                    sweep.failures.push(format!(
                        "{ctx}: opened with wrong data (tail cut {cut:?}): {}",
                        seen.diff(&fx.script.states[n])
                    ));
                }
            }
            Outcome::Opened(Err(e), _) => {
                if !e.contains("corruption in segment") {
                    sweep.failures.push(format!("{ctx}: reading returned {e}"));
                }
                sweep.errors += 1;
            }
            Outcome::Failed(e) => {
                sweep.errors += 1;
                let ok = matches!(&e, Error::Corruption { segment, offset, .. }
                    if *segment == rec.segment && *offset >= rec.offset && *offset < rec.offset + rec.len);
                if !ok {
                    sweep.failures.push(format!("{ctx}: {e:?}, want Corruption naming segment {} and an offset in the record", rec.segment));
                }
            }
            Outcome::Panicked => sweep.failures.push(format!("{ctx}: open panicked")),
        }
        if dirty || !sweep.failures.is_empty() {
            write_image(&dir, &fx.img);
        } else {
            std::fs::write(&path, &fx.img[&name]).unwrap();
        }
        if sweep.failures.len() > 50 {
            break;
        }
    }
    println!("corruption: {tail_cuts} flips cut as a torn tail (last segment {last}; must be 0)");
    sweep.finish(started);
}

#[test]
fn delete_each_segment_and_add_stray_and_stale_files() {
    let started = Instant::now();
    let fx = build(SEED + 3, false, true);
    let n = fx.script.states.len() - 1;
    let full = &fx.script.states[n];
    let last = last_segment(&fx.img, &fx.recs);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("case");
    let mut sweep = Sweep::new("delete each segment; stray and stale files");
    let segments: Vec<u64> = fx
        .img
        .keys()
        .filter_map(|k| segment_id(Path::new(k)))
        .collect();
    let mut undetectable = 0;
    for &seg in &segments {
        sweep.cases += 1;
        let ctx = format!("segment {seg} of {segments:?} deleted");
        let mut img = fx.img.clone();
        img.remove(&seg_name(seg));
        write_image(&dir, &img);
        match open_and_read(&dir, &fx.script, RecoveryMode::TolerateTail, false) {
            Outcome::Opened(Ok(seen), _) if &seen == full => sweep.recovered += 1,
            Outcome::Opened(Ok(seen), _)
                if seg == last && (0..n).any(|k| fx.script.states[k] == seen) =>
            {
                // Without a manifest the newest segment's absence cannot be seen.
                undetectable += 1;
                sweep.recovered += 1;
            }
            Outcome::Opened(Ok(seen), _) => sweep.failures.push(format!(
                "{ctx}: opened with wrong data: {}",
                seen.diff(full)
            )),
            Outcome::Opened(Err(e), _) => sweep.failures.push(format!("{ctx}: reading: {e}")),
            Outcome::Failed(e) => {
                sweep.errors += 1;
                if !matches!(e, Error::MissingSegment { segment } if segment == seg) {
                    sweep.failures.push(format!(
                        "{ctx}: {e:?}, want MissingSegment {{ segment: {seg} }}"
                    ));
                }
            }
            Outcome::Panicked => sweep.failures.push(format!("{ctx}: open panicked")),
        }
    }

    // Stray files next to the segments: ignored.
    let strays: Vec<(&str, Vec<u8>)> = vec![
        ("notes.txt", b"hello".to_vec()),
        ("0000000000000001.wal.tmp", vec![0xAB; 100]),
        ("CHECKPOINT.tmp", vec![0x55; 64]),
        ("00000001.wal", b"not a segment name".to_vec()),
        (".hidden", Vec::new()),
    ];
    for (name, bytes) in &strays {
        sweep.cases += 1;
        let mut img = fx.img.clone();
        img.insert(name.to_string(), bytes.clone());
        write_image(&dir, &img);
        std::fs::create_dir_all(dir.join("lost+found")).unwrap();
        check_full(
            &mut sweep,
            &format!("stray file {name:?}"),
            &dir,
            &fx.script,
            full,
            None,
        );
    }

    // A future segment holding a copy of the last one (its header names another id).
    sweep.cases += 1;
    let mut img = fx.img.clone();
    img.insert(seg_name(last + 1), fx.img[&seg_name(last)].clone());
    write_image(&dir, &img);
    check_full(
        &mut sweep,
        "a copy of the last segment under the next id",
        &dir,
        &fx.script,
        full,
        Some(last + 1),
    );

    // Stale segments: every segment gc deleted, put back with its old contents.
    let mut stale = 0;
    for snap in &fx.before_gc {
        for (name, bytes) in snap {
            if segment_id(Path::new(name)).is_some() && !fx.img.contains_key(name) {
                stale += 1;
                sweep.cases += 1;
                let mut img = fx.img.clone();
                img.insert(name.clone(), bytes.clone());
                write_image(&dir, &img);
                let seg = segment_id(Path::new(name));
                check_full(
                    &mut sweep,
                    &format!("stale segment {name} put back"),
                    &dir,
                    &fx.script,
                    full,
                    seg,
                );
                // The stale checkpoint of that time next to today's segments: must not resurrect.
            }
            if name == "CHECKPOINT" && fx.img.get(name) != Some(bytes) {
                sweep.cases += 1;
                let mut img = fx.img.clone();
                img.insert(name.clone(), bytes.clone());
                write_image(&dir, &img);
                check_full(
                    &mut sweep,
                    "an older CHECKPOINT put back",
                    &dir,
                    &fx.script,
                    full,
                    None,
                );
            }
        }
    }
    println!("corruption: {} segments deleted in turn ({undetectable} newest-segment deletions undetectable without a manifest), {stale} stale segments planted", segments.len());
    assert!(
        stale > 0,
        "gc deleted no segment: the fixture must make some dead"
    );
    sweep.finish(started);
}

/// Opens and accepts the full state, or a typed error naming `seg` (when given).
fn check_full(
    sweep: &mut Sweep,
    ctx: &str,
    dir: &Path,
    script: &Script,
    full: &ModelState,
    seg: Option<u64>,
) {
    match open_and_read(dir, script, RecoveryMode::TolerateTail, false) {
        Outcome::Opened(Ok(seen), _) => {
            sweep.recovered += 1;
            if &seen != full {
                sweep.failures.push(format!(
                    "{ctx}: opened with wrong data: {}",
                    seen.diff(full)
                ));
            }
        }
        Outcome::Opened(Err(e), _) => sweep.failures.push(format!("{ctx}: reading: {e}")),
        Outcome::Failed(e) => {
            sweep.errors += 1;
            if !seg.is_some_and(|s| names_segment(&e, s)) {
                sweep.failures.push(format!("{ctx}: open failed: {e:?}"));
            }
        }
        Outcome::Panicked => sweep.failures.push(format!("{ctx}: open panicked")),
    }
}

/// Every single fault the sweeps of a cleanly closed directory try, on `img`: `flips` random
/// bit flips anywhere in any file (segments, CHECKPOINT, SEAL), each file truncated at 0 and at
/// 6 random points, every 512-byte sector and 4 KiB block of every file zeroed, garbage or zeros appended to
/// each file, each file deleted. Returns (description, damaged image).
pub fn single_faults(img: &Image, seed: u64, flips: usize) -> Vec<(String, Image)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let names: Vec<&String> = img.keys().filter(|n| !img[*n].is_empty()).collect();
    let total: usize = names.iter().map(|n| img[*n].len()).sum();
    for _ in 0..flips {
        let mut at = rng.gen_range(0..total);
        let name = names
            .iter()
            .find(|n| {
                let len = img[**n].len();
                if at < len {
                    true
                } else {
                    at -= len;
                    false
                }
            })
            .unwrap();
        let bit = rng.gen_range(0..8);
        let mut d = img.clone();
        d.get_mut(*name).unwrap()[at] ^= 1 << bit;
        out.push((format!("flip bit {bit} at {at} of {name}"), d));
    }
    for name in &names {
        let len = img[*name].len();
        let mut cuts = vec![0];
        cuts.extend((0..6).map(|_| rng.gen_range(0..len)));
        for cut in cuts {
            let mut d = img.clone();
            d.get_mut(*name).unwrap().truncate(cut);
            out.push((format!("truncate {name} at {cut}"), d));
        }
        for block in [512, 4096] {
            for i in 0..len.div_ceil(block) {
                let mut d = img.clone();
                let f = d.get_mut(*name).unwrap();
                let end = (i * block + block).min(len);
                f[i * block..end].fill(0);
                out.push((format!("zero block {i} ({block} B) of {name}"), d));
            }
        }
        let mut d = img.clone();
        let garbage: Vec<u8> = (0..rng.gen_range(1..100)).map(|_| rng.gen()).collect();
        d.get_mut(*name).unwrap().extend_from_slice(&garbage);
        out.push((
            format!("append {} garbage bytes to {name}", garbage.len()),
            d,
        ));
        let mut d = img.clone();
        d.get_mut(*name).unwrap().extend_from_slice(&[0; 4096]);
        out.push((format!("append 4 KiB of zeros to {name}"), d));
        let mut d = img.clone();
        d.remove(*name);
        out.push((format!("delete {name}"), d));
    }
    out
}

/// Counts of a sweep's outcomes by kind.
#[derive(Debug, Default)]
pub struct Tally {
    pub cases: u64,
    pub unchanged: u64,
    pub errors: BTreeMap<&'static str, u64>,
    pub failures: Vec<String>,
}

impl Tally {
    pub fn error(&mut self, e: &Error) {
        let kind = match e {
            Error::Corruption { .. } => "Corruption",
            Error::TornTail { .. } => "TornTail",
            Error::Checkpoint { .. } => "Checkpoint",
            Error::MissingSegment { .. } => "MissingSegment",
            Error::Inconsistent { .. } => "Inconsistent",
            Error::Io { .. } => "Io",
            _ => "other",
        };
        *self.errors.entry(kind).or_default() += 1;
    }

    pub fn print(&self, what: &str, started: Instant) {
        let errors: u64 = self.errors.values().sum();
        println!(
            "{what}: {} single faults: {} opened unchanged, {errors} typed errors {:?}, {} failures, {:.1}s",
            self.cases,
            self.unchanged,
            self.errors,
            self.failures.len(),
            started.elapsed().as_secs_f64()
        );
        print_failures(&self.failures);
    }
}

/// The reported bug: a cleanly closed directory, one fault at a time. Every fault must give a
/// typed error or the exact state acknowledged (nothing cut, nothing truncated comes back).
#[test]
fn every_single_fault_on_a_cleanly_closed_directory() {
    let started = Instant::now();
    let fx = build(SEED + 4, false, true);
    let n = fx.script.states.len() - 1;
    let full = &fx.script.states[n];
    assert!(fx.img.contains_key("SEAL") && fx.img.contains_key("CHECKPOINT"));
    let flips = std::env::var("MRWAL_SWEEP_FLIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("case");
    let mut t = Tally::default();
    for (ctx, img) in single_faults(&fx.img, SEED + 4, flips) {
        t.cases += 1;
        write_image(&dir, &img);
        for mode in [RecoveryMode::TolerateTail, RecoveryMode::Strict] {
            match open_and_read(&dir, &fx.script, mode, false) {
                Outcome::Opened(Ok(seen), cut) => {
                    if &seen != full {
                        t.failures.push(format!(
                            "{ctx} ({mode:?}): served a state that was not acknowledged (tail cut {cut:?}): {}",
                            seen.diff(full)
                        ));
                    } else if mode == RecoveryMode::TolerateTail {
                        t.unchanged += 1;
                    }
                }
                Outcome::Opened(Err(e), _) => {
                    if !e.contains("corruption in segment") {
                        t.failures.push(format!("{ctx} ({mode:?}): reading: {e}"));
                    } else if mode == RecoveryMode::TolerateTail {
                        *t.errors.entry("Corruption (at read)").or_default() += 1;
                    }
                }
                Outcome::Failed(e) => {
                    if mode == RecoveryMode::TolerateTail {
                        t.error(&e);
                    }
                }
                Outcome::Panicked => t.failures.push(format!("{ctx} ({mode:?}): panicked")),
            }
            // A repaired directory (a cut of garbage) must still hold the state: rewrite it.
            write_image(&dir, &img);
        }
    }
    t.print("corruption: clean directory, through the engine", started);
    assert!(t.failures.is_empty(), "{} failures", t.failures.len());
}
