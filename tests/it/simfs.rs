//! A simulated file system for crash and fault tests (test-only).
//!
//! Fault model (see docs/TESTING.md):
//! - Every file has a *live* image (what reads see) and a *durable* image (what survives a power
//!   cut). `write_all_at`, `allocate` and `set_len` change the live image at once and queue a
//!   pending operation; `sync_data` applies the file's pending operations to its durable image.
//! - `create`, `rename`, `remove` (and the file a `lock` creates) change the live namespace at once
//!   and queue a pending directory operation; `sync_dir` makes the directory's pending operations
//!   durable. Directories themselves (`create_dir_all`) are durable at once.
//! - A failed `sync_data` drops the file's pending operations from the durable path for good while
//!   the live image keeps them (the kernel marks failed pages clean: "fsyncgate").
//! - A crash freezes the system: every later call, through the file system or through any handle
//!   opened before, fails, so a leaked engine thread cannot touch the image. [`SimFs::crash_image`]
//!   builds the file system a reboot would see: the durable state plus a subset of the pending
//!   operations chosen by a [`CrashVariant`], writes optionally torn at 512 B or 4 KiB boundaries.
//! - Any operation kind can fail with EIO or ENOSPC on its Nth occurrence, once or from then on.
//! - Every mutating call is an *I/O point*, numbered from 0; [`SimFs::crash_at`] cuts the power
//!   just before point K (a write at point K is left in flight: a crash variant may keep, drop or
//!   tear it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use multiraft_wal::fs::{DirLock, FileSystem, FsFile};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The kinds of calls, each with its own occurrence counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    CreateDirAll,
    Create,
    Open,
    Rename,
    Remove,
    List,
    SyncDir,
    Lock,
    Read,
    Write,
    SyncData,
    Allocate,
    SetLen,
    Len,
}

impl Op {
    /// Whether the call changes state (and so is an I/O point).
    pub fn is_mutating(self) -> bool {
        matches!(
            self,
            Op::CreateDirAll
                | Op::Create
                | Op::Rename
                | Op::Remove
                | Op::SyncDir
                | Op::Lock
                | Op::Write
                | Op::SyncData
                | Op::Allocate
                | Op::SetLen
        )
    }
}

/// An injected error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Eio,
    Enospc,
    /// Disk quota exceeded: as full a disk as ENOSPC for the writer.
    Edquot,
}

impl Fault {
    fn to_error(self) -> io::Error {
        match self {
            Fault::Eio => io::Error::from_raw_os_error(libc::EIO),
            Fault::Enospc => io::Error::from_raw_os_error(libc::ENOSPC),
            Fault::Edquot => io::Error::from_raw_os_error(libc::EDQUOT),
        }
    }
}

/// Which unsynced operations a crash keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashVariant {
    /// Only what was made durable survives.
    DropAll,
    /// Every pending operation reached the disk.
    KeepAll,
    /// Everything reached the disk except the last data write, which is torn.
    TearLast,
    /// A seeded random subset: each data write kept or not (some torn), each directory's
    /// pending operations cut at a random point.
    Random,
}

impl CrashVariant {
    pub const ALL: [CrashVariant; 4] = [
        CrashVariant::DropAll,
        CrashVariant::KeepAll,
        CrashVariant::TearLast,
        CrashVariant::Random,
    ];
}

type Ino = u64;

#[derive(Debug, Clone)]
enum DataOp {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    SetLen(u64),
    /// `allocate`: the size grows to at least this.
    Grow(u64),
}

#[derive(Debug, Clone, Default)]
struct Inode {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Pending operations with their global sequence numbers.
    pending: Vec<(u64, DataOp)>,
}

#[derive(Debug, Clone)]
enum DirOp {
    Link {
        name: String,
        ino: Ino,
    },
    Unlink {
        name: String,
    },
    /// A rename inside one directory: one atomic step.
    Rename {
        from: String,
        to: String,
        ino: Ino,
    },
}

#[derive(Debug, Clone, Default)]
struct Dir {
    live: BTreeMap<String, Ino>,
    durable: BTreeMap<String, Ino>,
    pending: Vec<DirOp>,
}

#[derive(Debug, Clone, Copy)]
struct Injection {
    op: Op,
    nth: u64,
    fault: Fault,
    sticky: bool,
}

#[derive(Debug, Default)]
struct State {
    dirs: BTreeMap<PathBuf, Dir>,
    inodes: HashMap<Ino, Inode>,
    next_ino: Ino,
    seq: u64,
    locks: BTreeSet<PathBuf>,
    counts: HashMap<Op, u64>,
    io_points: u64,
    crash_at: Option<u64>,
    crashed: bool,
    injections: Vec<Injection>,
    full: bool,
    /// The disk fills up at the nth call of this kind.
    full_from: Option<(Op, u64)>,
    /// The most bytes of file contents the disk holds (see [`SimFs::set_capacity`]).
    capacity: Option<u64>,
    /// Injected faults that fired: the call and the live name(s) of the file it hit.
    fired: Vec<(Op, String)>,
    /// The write left in flight at the crash point: (file, sequence number).
    in_flight: Option<(Ino, u64)>,
}

/// The simulated file system. Clones share one state.
#[derive(Clone, Default)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for SimFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock_state();
        f.debug_struct("SimFs")
            .field("files", &s.inodes.len())
            .field("io_points", &s.io_points)
            .field("crashed", &s.crashed)
            .finish()
    }
}

fn crashed_error() -> io::Error {
    io::Error::other("simfs: the machine lost power (this handle belongs to a dead process)")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("simfs: {} not found", path.display()),
    )
}

fn split(path: &Path) -> io::Result<(PathBuf, String)> {
    let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "simfs: bad file name"))?;
    Ok((parent, name.to_owned()))
}

impl State {
    fn used_bytes(&self) -> u64 {
        let linked: BTreeSet<Ino> = self
            .dirs
            .values()
            .flat_map(|d| d.live.values().copied())
            .collect();
        linked
            .iter()
            .filter_map(|ino| self.inodes.get(ino))
            .map(|i| i.live.len() as u64)
            .sum()
    }

    /// Whether growing file `ino` to `len` bytes would pass the capacity.
    fn over_capacity(&self, ino: Ino, len: u64) -> bool {
        let Some(cap) = self.capacity else {
            return false;
        };
        let cur = self.inodes.get(&ino).map_or(0, |i| i.live.len() as u64);
        len > cur && self.used_bytes() + (len - cur) > cap
    }

    /// Counts the call, applies the crash point and injected faults.
    fn enter(&mut self, op: Op) -> io::Result<()> {
        if self.crashed {
            return Err(crashed_error());
        }
        let count = self.counts.entry(op).or_default();
        *count += 1;
        let nth = *count;
        if op.is_mutating() {
            if self.crash_at == Some(self.io_points) {
                self.crashed = true;
                return Err(crashed_error());
            }
            self.io_points += 1;
        }
        if self.full_from.is_some_and(|(o, n)| o == op && nth >= n) {
            self.full = true;
            self.full_from = None;
        }
        for inj in &self.injections {
            if inj.op == op && (nth == inj.nth || (inj.sticky && nth > inj.nth)) {
                let fault = inj.fault;
                self.fired.push((op, String::new()));
                return Err(fault.to_error());
            }
        }
        if self.full && matches!(op, Op::Write | Op::Allocate | Op::Create) {
            return Err(Fault::Enospc.to_error());
        }
        Ok(())
    }

    /// Names the file a just-fired fault hit.
    fn name_fired(&mut self, ino: Ino) {
        let names: Vec<String> = self
            .dirs
            .values()
            .flat_map(|d| d.live.iter())
            .filter(|(_, &i)| i == ino)
            .map(|(n, _)| n.clone())
            .collect();
        if let Some(last) = self.fired.last_mut() {
            if last.1.is_empty() {
                last.1 = names.join("|");
            }
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn dir_mut(&mut self, dir: &Path) -> io::Result<&mut Dir> {
        self.dirs.get_mut(dir).ok_or_else(|| not_found(dir))
    }

    fn lookup(&self, path: &Path) -> io::Result<Ino> {
        let (parent, name) = split(path)?;
        self.dirs
            .get(&parent)
            .and_then(|d| d.live.get(&name))
            .copied()
            .ok_or_else(|| not_found(path))
    }

    fn create_file(&mut self, path: &Path) -> io::Result<Ino> {
        let (parent, name) = split(path)?;
        let ino = self.next_ino;
        let dir = self.dir_mut(&parent)?;
        if dir.live.contains_key(&name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("simfs: {} exists", path.display()),
            ));
        }
        dir.live.insert(name.clone(), ino);
        dir.pending.push(DirOp::Link { name, ino });
        self.next_ino += 1;
        self.inodes.insert(ino, Inode::default());
        Ok(ino)
    }
}

fn apply(data: &mut Vec<u8>, op: &DataOp) {
    match op {
        DataOp::Write {
            offset,
            data: bytes,
        } => {
            let offset = *offset as usize;
            let end = offset + bytes.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[offset..end].copy_from_slice(bytes);
        }
        DataOp::SetLen(len) => data.resize(*len as usize, 0),
        DataOp::Grow(len) => {
            if (data.len() as u64) < *len {
                data.resize(*len as usize, 0);
            }
        }
    }
}

/// Splits a write at multiples of `sector` (in file offsets) into pieces.
fn pieces(offset: u64, data: &[u8], sector: u64) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let pos = offset + at as u64;
        let room = (sector - pos % sector) as usize;
        let take = room.min(data.len() - at);
        out.push((pos, data[at..at + take].to_vec()));
        at += take;
    }
    out
}

impl SimFs {
    pub fn new() -> SimFs {
        SimFs::default()
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cuts the power just before I/O point `k` (0-based).
    pub fn crash_at(&self, k: u64) {
        self.lock_state().crash_at = Some(k);
    }

    /// Cuts the power now.
    pub fn power_cut(&self) {
        self.lock_state().crashed = true;
    }

    pub fn is_crashed(&self) -> bool {
        self.lock_state().crashed
    }

    /// The number of I/O points (mutating calls) so far.
    pub fn io_points(&self) -> u64 {
        self.lock_state().io_points
    }

    /// How many calls of this kind were made.
    pub fn count(&self, op: Op) -> u64 {
        self.lock_state().counts.get(&op).copied().unwrap_or(0)
    }

    /// Fails the `nth` (1-based, counted since this file system was made) call of kind `op`.
    pub fn fail_nth(&self, op: Op, nth: u64, fault: Fault) {
        self.lock_state().injections.push(Injection {
            op,
            nth,
            fault,
            sticky: false,
        });
    }

    /// Fails the `nth` call of kind `op` and every later one until [`SimFs::clear_faults`].
    pub fn fail_from(&self, op: Op, nth: u64, fault: Fault) {
        self.lock_state().injections.push(Injection {
            op,
            nth,
            fault,
            sticky: true,
        });
    }

    pub fn clear_faults(&self) {
        self.lock_state().injections.clear();
    }

    /// While set, writes, preallocations and creations fail with ENOSPC.
    pub fn set_full(&self, full: bool) {
        let mut s = self.lock_state();
        s.full = full;
        s.full_from = None;
    }

    /// With `Some(bytes)`, the disk holds at most `bytes` of file contents (the live lengths of
    /// the files that have a name): a write, preallocation or length change that would grow a
    /// file past it fails with ENOSPC (writing nothing); one within a file's current length
    /// always succeeds, as into blocks already allocated. `None`: unlimited.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.lock_state().capacity = bytes;
    }

    /// Bytes of file contents held now (the live lengths of the files that have a name).
    pub fn used_bytes(&self) -> u64 {
        self.lock_state().used_bytes()
    }

    /// The disk becomes full at the `nth` call of kind `op` (that call fails with ENOSPC if it
    /// is a write, preallocation or creation) until [`SimFs::set_full`]`(false)`.
    pub fn fill_at(&self, op: Op, nth: u64) {
        self.lock_state().full_from = Some((op, nth));
    }

    /// The injected faults that fired so far: the call and the name of the file it hit (empty
    /// for calls not on an open file).
    pub fn fired(&self) -> Vec<(Op, String)> {
        self.lock_state().fired.clone()
    }

    /// The live names in a directory, sorted.
    pub fn live_names(&self, dir: &Path) -> Vec<String> {
        let s = self.lock_state();
        s.dirs
            .get(dir)
            .map(|d| d.live.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The live contents of a file (test inspection; works after a crash too).
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        let s = self.lock_state();
        let ino = s.lookup(path).ok()?;
        s.inodes.get(&ino).map(|i| i.live.clone())
    }

    /// Replaces a file's contents, live and durable (used to plant corruption).
    pub fn overwrite_file(&self, path: &Path, bytes: Vec<u8>) -> io::Result<()> {
        let mut s = self.lock_state();
        let ino = match s.lookup(path) {
            Ok(ino) => ino,
            Err(_) => {
                let ino = s.create_file(path)?;
                let (parent, _) = split(path)?;
                let dir = s.dir_mut(&parent)?;
                dir.durable = dir.live.clone();
                dir.pending.clear();
                ino
            }
        };
        let inode = s.inodes.get_mut(&ino).ok_or_else(|| not_found(path))?;
        inode.live = bytes.clone();
        inode.durable = bytes;
        inode.pending.clear();
        Ok(())
    }

    /// The file system the next process sees after this one was killed (SIGKILL, no power
    /// cut): the live image survives, and what was not synced is still not durable (the page
    /// cache holds it), so a later power cut ([`SimFs::crash_image`]) can still lose it. Handles
    /// of the killed process fail from now on; fresh: no locks, no faults, counters at zero.
    /// A write in flight at a crash point did not happen (the killed process never saw it
    /// return, and the live image never showed it).
    pub fn kill_image(&self) -> SimFs {
        let mut s = self.lock_state();
        s.crashed = true;
        let mut inodes = s.inodes.clone();
        if let Some((ino, seq)) = s.in_flight {
            if let Some(inode) = inodes.get_mut(&ino) {
                inode.pending.retain(|(q, _)| *q != seq);
            }
        }
        SimFs {
            state: Arc::new(Mutex::new(State {
                dirs: s.dirs.clone(),
                inodes,
                next_ino: s.next_ino,
                seq: s.seq,
                ..State::default()
            })),
        }
    }

    /// The file system a reboot after the crash (or after now, if no crash happened) would see.
    /// Fresh: no handles, no locks, no faults, counters at zero.
    pub fn crash_image(&self, variant: CrashVariant, seed: u64) -> SimFs {
        let s = self.lock_state();
        let mut rng = StdRng::seed_from_u64(seed);
        let sector: u64 = if rng.gen_bool(0.5) { 512 } else { 4096 };

        // The last data write of all, for TearLast.
        let last_write_seq = s
            .inodes
            .values()
            .flat_map(|i| i.pending.iter())
            .filter(|(_, op)| matches!(op, DataOp::Write { .. }))
            .map(|(seq, _)| *seq)
            .max();

        let mut dirs = BTreeMap::new();
        let mut reachable = BTreeSet::new();
        for (path, dir) in &s.dirs {
            let keep = match variant {
                CrashVariant::DropAll => 0,
                CrashVariant::KeepAll | CrashVariant::TearLast => dir.pending.len(),
                CrashVariant::Random => rng.gen_range(0..=dir.pending.len()),
            };
            let mut entries = dir.durable.clone();
            for op in &dir.pending[..keep] {
                match op {
                    DirOp::Link { name, ino } => {
                        entries.insert(name.clone(), *ino);
                    }
                    DirOp::Unlink { name } => {
                        entries.remove(name);
                    }
                    DirOp::Rename { from, to, ino } => {
                        entries.remove(from);
                        entries.insert(to.clone(), *ino);
                    }
                }
            }
            reachable.extend(entries.values().copied());
            dirs.insert(
                path.clone(),
                Dir {
                    live: entries.clone(),
                    durable: entries,
                    pending: Vec::new(),
                },
            );
        }

        let mut inodes = HashMap::new();
        // Deterministic order for the random choices.
        for ino in reachable {
            let Some(inode) = s.inodes.get(&ino) else {
                continue;
            };
            let mut data = inode.durable.clone();
            for (seq, op) in &inode.pending {
                match (variant, op) {
                    (CrashVariant::DropAll, _) => {}
                    (CrashVariant::KeepAll, _) => apply(&mut data, op),
                    (
                        CrashVariant::TearLast,
                        DataOp::Write {
                            offset,
                            data: bytes,
                        },
                    ) if Some(*seq) == last_write_seq => {
                        let parts = pieces(*offset, bytes, sector);
                        // Keep a strict prefix of the sectors: the write is torn.
                        let keep = rng.gen_range(0..parts.len());
                        for (pos, piece) in &parts[..keep] {
                            apply(
                                &mut data,
                                &DataOp::Write {
                                    offset: *pos,
                                    data: piece.clone(),
                                },
                            );
                        }
                    }
                    (CrashVariant::TearLast, _) => apply(&mut data, op),
                    (
                        CrashVariant::Random,
                        DataOp::Write {
                            offset,
                            data: bytes,
                        },
                    ) => {
                        if rng.gen_bool(0.5) {
                            continue;
                        }
                        if rng.gen_bool(0.3) {
                            for (pos, piece) in pieces(*offset, bytes, sector) {
                                if rng.gen_bool(0.5) {
                                    apply(
                                        &mut data,
                                        &DataOp::Write {
                                            offset: pos,
                                            data: piece,
                                        },
                                    );
                                }
                            }
                        } else {
                            apply(&mut data, op);
                        }
                    }
                    (CrashVariant::Random, _) => {
                        if rng.gen_bool(0.5) {
                            apply(&mut data, op);
                        }
                    }
                }
            }
            inodes.insert(
                ino,
                Inode {
                    live: data.clone(),
                    durable: data,
                    pending: Vec::new(),
                },
            );
        }

        SimFs {
            state: Arc::new(Mutex::new(State {
                dirs,
                inodes,
                next_ino: s.next_ino,
                ..State::default()
            })),
        }
    }
}

#[derive(Debug)]
struct SimFile {
    state: Arc<Mutex<State>>,
    ino: Ino,
}

impl SimFile {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn data_op(&self, kind: Op, op: DataOp) -> io::Result<()> {
        let mut s = self.lock_state();
        let crash_point = s.crash_at == Some(s.io_points) && !s.crashed;
        match s.enter(kind) {
            Ok(()) => {}
            Err(e) => {
                s.name_fired(self.ino);
                if crash_point && kind == Op::Write {
                    // The write was in flight when the power went: leave it pending.
                    let seq = s.next_seq();
                    s.in_flight = Some((self.ino, seq));
                    if let Some(inode) = s.inodes.get_mut(&self.ino) {
                        inode.pending.push((seq, op));
                    }
                } else if kind == Op::Write && !s.crashed {
                    // A failed write may have written a prefix (half, sector-aligned down).
                    if let DataOp::Write { offset, data } = &op {
                        let half = (data.len() / 2) & !511;
                        if half > 0 {
                            let prefix = DataOp::Write {
                                offset: *offset,
                                data: data[..half].to_vec(),
                            };
                            let seq = s.next_seq();
                            if let Some(inode) = s.inodes.get_mut(&self.ino) {
                                apply(&mut inode.live, &prefix);
                                inode.pending.push((seq, prefix));
                            }
                        }
                    }
                }
                return Err(e);
            }
        }
        let grows_to = match &op {
            DataOp::Write { offset, data } => offset + data.len() as u64,
            DataOp::SetLen(len) | DataOp::Grow(len) => *len,
        };
        if s.over_capacity(self.ino, grows_to) {
            return Err(Fault::Enospc.to_error());
        }
        let seq = s.next_seq();
        let inode = s.inodes.get_mut(&self.ino).ok_or_else(crashed_error)?;
        apply(&mut inode.live, &op);
        inode.pending.push((seq, op));
        Ok(())
    }
}

impl FsFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut s = self.lock_state();
        s.enter(Op::Read)?;
        let inode = s.inodes.get(&self.ino).ok_or_else(crashed_error)?;
        let start = offset as usize;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "simfs: overflow"))?;
        if end > inode.live.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "simfs: read past the end of the file",
            ));
        }
        buf.copy_from_slice(&inode.live[start..end]);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.data_op(
            Op::Write,
            DataOp::Write {
                offset,
                data: buf.to_vec(),
            },
        )
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.lock_state();
        if let Err(e) = s.enter(Op::SyncData) {
            s.name_fired(self.ino);
            if !s.crashed {
                // fsyncgate: the pages are marked clean; their data never reaches the disk.
                if let Some(inode) = s.inodes.get_mut(&self.ino) {
                    inode.pending.clear();
                }
            }
            return Err(e);
        }
        let inode = s.inodes.get_mut(&self.ino).ok_or_else(crashed_error)?;
        for (_, op) in std::mem::take(&mut inode.pending) {
            apply(&mut inode.durable, &op);
        }
        Ok(())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        self.data_op(Op::Allocate, DataOp::Grow(len))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.data_op(Op::SetLen, DataOp::SetLen(len))
    }

    fn len(&self) -> io::Result<u64> {
        let mut s = self.lock_state();
        s.enter(Op::Len)?;
        let inode = s.inodes.get(&self.ino).ok_or_else(crashed_error)?;
        Ok(inode.live.len() as u64)
    }
}

#[derive(Debug)]
struct SimLock {
    state: Arc<Mutex<State>>,
    path: PathBuf,
}

impl DirLock for SimLock {}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.locks.remove(&self.path);
    }
}

impl FileSystem for SimFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock_state();
        s.enter(Op::CreateDirAll)?;
        let mut path = PathBuf::new();
        for part in dir.components() {
            path.push(part);
            s.dirs.entry(path.clone()).or_default();
        }
        Ok(())
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let mut s = self.lock_state();
        s.enter(Op::Create)?;
        let ino = s.create_file(path)?;
        Ok(Arc::new(SimFile {
            state: self.state.clone(),
            ino,
        }))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let mut s = self.lock_state();
        s.enter(Op::Open)?;
        let ino = s.lookup(path)?;
        Ok(Arc::new(SimFile {
            state: self.state.clone(),
            ino,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.lock_state();
        s.enter(Op::Rename)?;
        let ino = s.lookup(from)?;
        let (from_dir, from_name) = split(from)?;
        let (to_dir, to_name) = split(to)?;
        s.dir_mut(&to_dir)?;
        let src = s.dir_mut(&from_dir)?;
        src.live.remove(&from_name);
        if from_dir == to_dir {
            // One directory: the replacement and the removal are one atomic step.
            src.live.insert(to_name.clone(), ino);
            src.pending.push(DirOp::Rename {
                from: from_name,
                to: to_name,
                ino,
            });
        } else {
            src.pending.push(DirOp::Unlink { name: from_name });
            let dst = s.dir_mut(&to_dir)?;
            dst.live.insert(to_name.clone(), ino);
            dst.pending.push(DirOp::Link { name: to_name, ino });
        }
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock_state();
        s.enter(Op::Remove)?;
        let (parent, name) = split(path)?;
        let dir = s.dir_mut(&parent)?;
        if dir.live.remove(&name).is_none() {
            return Err(not_found(path));
        }
        dir.pending.push(DirOp::Unlink { name });
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut s = self.lock_state();
        s.enter(Op::List)?;
        let d = s.dirs.get(dir).ok_or_else(|| not_found(dir))?;
        let mut names: Vec<String> = d.live.keys().cloned().collect();
        // Sub-directories are entries too.
        for path in s.dirs.keys() {
            if path.parent() == Some(dir) {
                if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                    names.push(name.to_owned());
                }
            }
        }
        Ok(names)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock_state();
        s.enter(Op::SyncDir)?;
        let d = s.dir_mut(dir)?;
        for op in std::mem::take(&mut d.pending) {
            match op {
                DirOp::Link { name, ino } => {
                    d.durable.insert(name, ino);
                }
                DirOp::Unlink { name } => {
                    d.durable.remove(&name);
                }
                DirOp::Rename { from, to, ino } => {
                    d.durable.remove(&from);
                    d.durable.insert(to, ino);
                }
            }
        }
        Ok(())
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn DirLock>> {
        let mut s = self.lock_state();
        s.enter(Op::Lock)?;
        if s.lookup(path).is_err() {
            s.create_file(path)?;
        }
        if !s.locks.insert(path.to_path_buf()) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "simfs: the lock is held",
            ));
        }
        Ok(Box::new(SimLock {
            state: self.state.clone(),
            path: path.to_path_buf(),
        }))
    }
}

// The simulated file system's own tests: the model must be right before it judges the engine.

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

#[test]
fn simfs_unsynced_data_and_names_are_lost() -> anyhow::Result<()> {
    let fs = SimFs::new();
    fs.create_dir_all(&p("/d"))?;
    let f = fs.create(&p("/d/a"))?;
    f.write_all_at(b"hello", 0)?;
    f.sync_data()?;
    // Data synced but the name is not: a crash loses the file.
    let img = fs.crash_image(CrashVariant::DropAll, 1);
    assert!(img.open(&p("/d/a")).is_err());
    fs.sync_dir(&p("/d"))?;
    f.write_all_at(b"world", 5)?;
    let img = fs.crash_image(CrashVariant::DropAll, 1);
    let g = img.open(&p("/d/a"))?;
    assert_eq!(g.len()?, 5);
    let img = fs.crash_image(CrashVariant::KeepAll, 1);
    assert_eq!(img.read_file(&p("/d/a")).unwrap(), b"helloworld");
    Ok(())
}

#[test]
fn simfs_tear_and_random_variants() -> anyhow::Result<()> {
    let fs = SimFs::new();
    fs.create_dir_all(&p("/d"))?;
    let f = fs.create(&p("/d/a"))?;
    fs.sync_dir(&p("/d"))?;
    f.write_all_at(&vec![7u8; 3 * 4096], 0)?;
    let mut seen_lengths = BTreeSet::new();
    for seed in 0..64 {
        let img = fs.crash_image(CrashVariant::TearLast, seed);
        let data = img.read_file(&p("/d/a")).unwrap();
        assert!(data.len() < 3 * 4096, "a torn write is never whole");
        assert_eq!(data.len() % 512, 0);
        assert!(data.iter().all(|&b| b == 7));
        seen_lengths.insert(data.len());
        let img = fs.crash_image(CrashVariant::Random, seed);
        let data = img.read_file(&p("/d/a")).unwrap();
        assert!(data.len() <= 3 * 4096);
    }
    assert!(seen_lengths.len() > 2, "tears land at several boundaries");
    Ok(())
}

#[test]
fn simfs_crash_point_kills_old_handles_and_rename_is_atomic() -> anyhow::Result<()> {
    let fs = SimFs::new();
    fs.create_dir_all(&p("/d"))?;
    let f = fs.create(&p("/d/cur"))?;
    f.write_all_at(b"v1", 0)?;
    f.sync_data()?;
    fs.sync_dir(&p("/d"))?;
    let t = fs.create(&p("/d/tmp"))?;
    t.write_all_at(b"v2", 0)?;
    t.sync_data()?;
    fs.rename(&p("/d/tmp"), &p("/d/cur"))?;
    let at = fs.io_points();
    fs.crash_at(at + 1);
    f.write_all_at(b"x", 0)?; // point `at`: allowed
    assert!(f.write_all_at(b"y", 0).is_err(), "point at+1 is the crash");
    assert!(fs.is_crashed());
    assert!(f.read_exact_at(&mut [0u8; 1], 0).is_err());
    assert!(fs.list(&p("/d")).is_err());
    for seed in 0..32 {
        for v in CrashVariant::ALL {
            let img = fs.crash_image(v, seed);
            let cur = img.read_file(&p("/d/cur")).unwrap();
            assert!(
                cur == b"v1" || cur == b"v2" || cur == b"x1" || cur == b"y1",
                "{v:?}: {cur:?}"
            );
            if img.read_file(&p("/d/tmp")).is_some() {
                assert!(cur != b"v2", "{v:?}: a rename is atomic");
            }
        }
    }
    Ok(())
}

#[test]
fn simfs_faults_and_locks() -> anyhow::Result<()> {
    let fs = SimFs::new();
    fs.create_dir_all(&p("/d"))?;
    let l = fs.lock(&p("/d/LOCK"))?;
    assert_eq!(
        fs.lock(&p("/d/LOCK")).unwrap_err().kind(),
        io::ErrorKind::WouldBlock
    );
    drop(l);
    let _l = fs.lock(&p("/d/LOCK"))?;
    let f = fs.create(&p("/d/a"))?;
    fs.fail_nth(Op::Write, 2, Fault::Eio);
    f.write_all_at(b"1", 0)?;
    let e = f.write_all_at(b"2", 1).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    f.write_all_at(b"3", 1)?;
    fs.fail_from(Op::SyncData, 1, Fault::Eio);
    assert!(f.sync_data().is_err());
    assert!(f.sync_data().is_err());
    fs.clear_faults();
    // fsyncgate: the pages were marked clean; a later successful sync does not save them.
    f.sync_data()?;
    fs.sync_dir(&p("/d"))?;
    let img = fs.crash_image(CrashVariant::DropAll, 0);
    assert_eq!(img.read_file(&p("/d/a")).unwrap(), b"");
    fs.set_full(true);
    let e = f.write_all_at(b"4", 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    fs.set_full(false);
    f.write_all_at(b"4", 0)?;
    Ok(())
}

#[test]
fn simfs_power_cut_and_planted_files() -> anyhow::Result<()> {
    let fs = SimFs::new();
    fs.create_dir_all(&p("/d"))?;
    fs.overwrite_file(&p("/d/planted"), b"durable at once".to_vec())?;
    let f = fs.open(&p("/d/planted"))?;
    f.write_all_at(b"DURABLE", 0)?;
    fs.power_cut();
    assert!(f.write_all_at(b"x", 0).is_err());
    let img = fs.crash_image(CrashVariant::DropAll, 0);
    assert_eq!(img.read_file(&p("/d/planted")).unwrap(), b"durable at once");
    Ok(())
}
