//! The file-system seam: the only door from the engine to the operating system.
//!
//! Every byte the engine reads or writes, every file it creates, renames or removes, and every
//! directory it syncs goes through [`FileSystem`] and [`FsFile`]. [`StdFs`] is the real
//! implementation; tests plug in a simulated one to inject crashes and faults.
//!
//! Invariants an implementation must keep:
//! - `write_at` either writes the whole buffer or returns an error (it may have written a prefix).
//! - Data written by `write_at` is durable only after `sync_data` returns `Ok`.
//! - `create`, `rename` and `remove` are durable only after `sync_dir` of the parent returns `Ok`.
//! - A file handle stays readable after its path is removed (POSIX unlink semantics).

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// An open file.
#[expect(
    clippy::len_without_is_empty,
    reason = "a file's length is read, never tested for emptiness"
)]
pub trait FsFile: Send + Sync + fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset`; fails with `UnexpectedEof` past the end.
    ///
    /// # Errors
    ///
    /// The OS error; `UnexpectedEof` if the file ends before `offset + buf.len()`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Reads exactly `len` bytes at `offset` into a new buffer; fails with `UnexpectedEof` past
    /// the end. The default zero-fills the buffer and calls [`FsFile::read_exact_at`]; [`StdFs`]
    /// reads straight into the buffer's uninitialised capacity (the engine's read path).
    ///
    /// # Errors
    ///
    /// The OS error; `UnexpectedEof` if the file ends before `offset + len`.
    fn read_vec_at(&self, len: usize, offset: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
    /// Reads like [`FsFile::read_vec_at`] from a file the caller knows is sealed: its bytes never
    /// change again and it is never cut while this handle lives, except through this handle's
    /// own `set_len`, `write_all_at` or `allocate`. The default is [`FsFile::read_vec_at`];
    /// [`StdFs`] serves it from a read-only memory mapping of the file, made on the first call
    /// (see [`StdFs`] for what that changes on I/O errors).
    ///
    /// # Errors
    ///
    /// As [`FsFile::read_vec_at`].
    fn read_sealed_vec_at(&self, len: usize, offset: u64) -> io::Result<Vec<u8>> {
        self.read_vec_at(len, offset)
    }
    /// Writes all of `buf` at `offset`, growing the file if needed.
    ///
    /// # Errors
    ///
    /// The OS error (`StorageFull` on a full disk); part of `buf` may have been written.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes `bufs` back to back at `offset`, as one write where the file system can
    /// ([`StdFs`]: `pwritev`). The default writes them one after the other with
    /// [`FsFile::write_all_at`] (the same durability: nothing is durable before `sync_data`).
    ///
    /// # Errors
    ///
    /// As [`FsFile::write_all_at`]; a prefix of the bytes may have been written.
    fn write_all_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut at = offset;
        for buf in bufs {
            self.write_all_at(buf, at)?;
            at += buf.len() as u64;
        }
        Ok(())
    }
    /// Makes the file's data (and the size, if it changed) durable: fdatasync.
    ///
    /// # Errors
    ///
    /// The OS error. After a failure the file's durable contents are unknown: the engine poisons itself and never retries.
    fn sync_data(&self) -> io::Result<()>;
    /// Reserves disk space for the first `len` bytes without changing what reads return
    /// (fallocate with `KEEP_SIZE`-free semantics: the size grows to at least `len`).
    ///
    /// # Errors
    ///
    /// The OS error (`StorageFull` when the space is not there).
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// Sets the file's length, cutting or zero-extending it.
    ///
    /// # Errors
    ///
    /// The OS error.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The file's current length.
    ///
    /// # Errors
    ///
    /// The OS error.
    fn len(&self) -> io::Result<u64>;
    /// A hint: the file's cached pages will not be read again (a dead segment going into the
    /// recycling pool), so the page cache may drop the clean ones. Rewriting the file later then
    /// starts from small pages: cached large folios would count a small write that dirties
    /// one as the whole folio. Does nothing by default.
    fn drop_cache(&self) {}
}

/// A lock held on a data directory; released when dropped.
pub trait DirLock: Send + Sync + fmt::Debug {}

/// The operations the engine needs from a file system.
pub trait FileSystem: Send + Sync + fmt::Debug + 'static {
    /// Creates the directory and its parents if missing.
    ///
    /// # Errors
    ///
    /// The OS error; `AlreadyExists` or `NotADirectory` when the path names something else.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Creates a new file, failing if it exists. Durable only after `sync_dir`.
    ///
    /// # Errors
    ///
    /// The OS error; `AlreadyExists` if the file exists.
    fn create(&self, path: &Path) -> io::Result<Arc<dyn FsFile>>;
    /// Opens an existing file for reading and writing.
    ///
    /// # Errors
    ///
    /// The OS error; `NotFound` if the file does not exist.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>>;
    /// Atomically renames `from` to `to`, replacing `to`. Durable only after `sync_dir`.
    ///
    /// # Errors
    ///
    /// The OS error.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file. Durable only after `sync_dir`.
    ///
    /// # Errors
    ///
    /// The OS error; `NotFound` if the file does not exist.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// The names of the entries of a directory (not full paths), in no particular order.
    ///
    /// # Errors
    ///
    /// The OS error.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    ///
    /// # Errors
    ///
    /// The OS error.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes an exclusive lock on `path` (created if missing) without waiting; fails with
    /// `WouldBlock` if another holder has it, in this process or another.
    ///
    /// # Errors
    ///
    /// `WouldBlock` if another holder has the lock; the OS error otherwise.
    fn lock(&self, path: &Path) -> io::Result<Box<dyn DirLock>>;
}

/// The real file system, through `std::fs` (and `fallocate` for preallocation on Linux).
///
/// Reads of sealed segments ([`FsFile::read_sealed_vec_at`]) come from a read-only shared
/// memory mapping of the file, made on the first such read: a copy out of the page cache with
/// no system call. What that means:
/// - Deleting the file (GC) is safe: the mapping keeps the inode alive until the handle is
///   dropped, as an open descriptor does.
/// - Cutting or rewriting it through the same handle is safe: `set_len`, `write_all_at` and
///   `allocate` first wait for the reads in progress and drop the mapping (later reads use
///   `pread`). The engine never cuts or rewrites a sealed segment.
/// - What no process can guard against: another process truncating a segment file while it is
///   mapped makes the next read of the lost pages raise SIGBUS, and a disk error while a page
///   is read in (a page-cache miss) raises SIGBUS instead of returning `EIO`: the process dies
///   instead of getting [`Error::Io`](crate::Error). Other engines are kept out by the
///   directory lock; `Options::mmap_reads(false)` turns the mapping off where a failing disk
///   must surface as an error.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

#[derive(Debug)]
struct StdFile {
    file: std::fs::File,
    /// The read-only mapping serving `read_sealed_vec_at`, once made (`None` inside: mapping
    /// failed or was dropped; reads use `pread`).
    map: parking_lot::RwLock<Option<Option<mapping::Mapping>>>,
}

impl StdFile {
    fn new(file: std::fs::File) -> StdFile {
        StdFile {
            file,
            map: parking_lot::RwLock::new(None),
        }
    }

    /// Drops the mapping (before the file is written or cut), waiting for reads from it.
    fn unmap(&self) {
        let mut map = self.map.write();
        if map.is_some() {
            *map = Some(None);
        }
    }
}

/// The one place with `unsafe` code in the crate: a read-only `mmap` of a file and reads from
/// it.
#[allow(unsafe_code)]
mod mapping {
    use std::ffi::c_void;
    use std::io;

    /// A `PROT_READ`, `MAP_SHARED` mapping of the first `len` bytes of a file.
    #[derive(Debug)]
    pub(super) struct Mapping {
        ptr: *mut c_void,
        len: usize,
    }

    // SAFETY: the mapping is read-only and owned by this value; reading it from several threads
    // at once is reading shared immutable memory.
    unsafe impl Send for Mapping {}
    // SAFETY: as above; `get` hands out shared borrows only.
    unsafe impl Sync for Mapping {}

    impl Mapping {
        /// Maps the first `len` (> 0) bytes of `file` read-only.
        pub(super) fn new(file: &std::fs::File, len: usize) -> io::Result<Mapping> {
            if len == 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty file"));
            }
            // SAFETY: a new mapping at an address the kernel picks (null hint, no MAP_FIXED), so
            // no existing memory is touched; the descriptor is open for reading.
            let ptr = unsafe {
                rustix::mm::mmap(
                    std::ptr::null_mut(),
                    len,
                    rustix::mm::ProtFlags::READ,
                    rustix::mm::MapFlags::SHARED,
                    file,
                    0,
                )
            }?;
            Ok(Mapping { ptr, len })
        }

        /// Bytes `offset .. offset + len` of the mapping, if it covers them.
        pub(super) fn get(&self, offset: u64, len: usize) -> Option<&[u8]> {
            let start = usize::try_from(offset).ok()?;
            if start.checked_add(len)? > self.len {
                return None;
            }
            // SAFETY: `ptr .. ptr + self.len` stays mapped readable until `self` is dropped,
            // which the borrow of `self` prevents; `start + len <= self.len`. The file is not
            // cut below `self.len` while mapped: `StdFile` drops the mapping (under its write
            // lock, which this borrow's read lock excludes) before any `set_len`, `write_all_at`
            // or `allocate`, and the engine maps only sealed segments, which nothing else in
            // the process writes. Another process cutting the file is outside what any mapping
            // can guard (see `StdFs`).
            Some(unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>().add(start), len) })
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: `ptr` and `len` come from the successful `mmap` in `new`; unmapped once,
            // here, and no borrow from `get` outlives `self`.
            if let Err(e) = unsafe { rustix::mm::munmap(self.ptr, self.len) } {
                tracing::warn!(error = %e, "munmap of a segment mapping failed");
            }
        }
    }
}

#[derive(Debug)]
struct StdLock {
    _file: std::fs::File,
}

impl DirLock for StdLock {}

impl FsFile for StdFile {
    fn drop_cache(&self) {
        #[cfg(target_os = "linux")]
        {
            // Only a hint: an error changes nothing that matters.
            let _ = rustix::fs::fadvise(&self.file, 0, None, rustix::fs::Advice::DontNeed);
        }
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }

    fn read_vec_at(&self, len: usize, offset: u64) -> io::Result<Vec<u8>> {
        // pread into the spare capacity: no zero-fill of bytes the read overwrites anyway.
        // `spare_capacity` extends the length by exactly the bytes the kernel wrote (safe API).
        let mut buf = Vec::with_capacity(len);
        while buf.len() < len {
            let at = offset + buf.len() as u64;
            match rustix::io::pread(&self.file, rustix::buffer::spare_capacity(&mut buf), at) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "failed to fill whole buffer",
                    ))
                }
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // A buffer given more capacity than asked may have read past `len`.
        buf.truncate(len);
        Ok(buf)
    }

    fn read_sealed_vec_at(&self, len: usize, offset: u64) -> io::Result<Vec<u8>> {
        {
            let map = self.map.read();
            match &*map {
                Some(Some(m)) => {
                    if let Some(bytes) = m.get(offset, len) {
                        return Ok(bytes.to_vec());
                    }
                    return self.read_vec_at(len, offset);
                }
                Some(None) => return self.read_vec_at(len, offset),
                None => {}
            }
        }
        {
            let mut map = self.map.write();
            if map.is_none() {
                let len = self.file.metadata()?.len();
                let made = usize::try_from(len)
                    .map_err(io::Error::other)
                    .and_then(|len| mapping::Mapping::new(&self.file, len));
                if let Err(e) = &made {
                    tracing::debug!(error = %e, "segment not mapped; reads use pread");
                }
                *map = Some(made.ok());
            }
        }
        self.read_sealed_vec_at(len, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.unmap();
        std::os::unix::fs::FileExt::write_all_at(&self.file, buf, offset)
    }

    fn write_all_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.unmap();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut done = 0usize;
        let mut iov: Vec<io::IoSlice<'_>> = Vec::with_capacity(bufs.len());
        while done < total {
            // The slices from byte `done` on (a short write resumes where it stopped).
            iov.clear();
            let mut skip = done;
            for b in bufs {
                if skip >= b.len() {
                    skip -= b.len();
                    continue;
                }
                iov.push(io::IoSlice::new(b.get(skip..).unwrap_or_default()));
                skip = 0;
            }
            match rustix::io::pwritev(&self.file, &iov, offset + done as u64) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        self.unmap();
        #[cfg(target_os = "linux")]
        {
            match rustix::fs::fallocate(&self.file, rustix::fs::FallocateFlags::empty(), 0, len) {
                Ok(()) => return Ok(()),
                // Some file systems (tmpfs on old kernels, overlays) lack fallocate: fall back.
                Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {}
                Err(e) => return Err(e.into()),
            }
        }
        if self.file.metadata()?.len() < len {
            self.file.set_len(len)?;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.unmap();
        self.file.set_len(len)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

impl FileSystem for StdFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Arc::new(StdFile::new(file)))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(Arc::new(StdFile::new(file)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }

    fn lock(&self, path: &Path) -> io::Result<Box<dyn DirLock>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Box::new(StdLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "the lock is held by another handle",
            )),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_reads_survive_cutting_rewriting_and_deleting_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        let f = StdFs.create(&path).unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        f.write_all_at(&data, 0).unwrap();
        // The first sealed read maps the file; reads past its end fail cleanly.
        assert_eq!(f.read_sealed_vec_at(100, 4000).unwrap(), &data[4000..4100]);
        assert_eq!(f.read_vec_at(100, 4000).unwrap(), &data[4000..4100]);
        let e = f.read_sealed_vec_at(100, 8150).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // Deleting the path keeps the mapping readable.
        StdFs.remove(&path).unwrap();
        assert_eq!(f.read_sealed_vec_at(10, 8000).unwrap(), &data[8000..8010]);
        // Cutting through the handle drops the mapping first: no SIGBUS, a clean EOF.
        f.set_len(100).unwrap();
        assert_eq!(f.read_sealed_vec_at(50, 0).unwrap(), &data[..50]);
        let e = f.read_sealed_vec_at(10, 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // Rewriting through the handle is seen by later reads.
        f.write_all_at(b"new bytes", 10).unwrap();
        assert_eq!(f.read_sealed_vec_at(9, 10).unwrap(), b"new bytes");
        // A rewrite after a fresh mapping drops it too.
        let g = StdFs.create(&dir.path().join("seg2")).unwrap();
        g.write_all_at(&data, 0).unwrap();
        assert_eq!(g.read_sealed_vec_at(4, 0).unwrap(), &data[..4]);
        g.write_all_at(b"XYZW", 0).unwrap();
        assert_eq!(g.read_sealed_vec_at(4, 0).unwrap(), b"XYZW");
        // A vectored write lands back to back, drops the mapping and can grow the file.
        assert_eq!(g.read_sealed_vec_at(4, 4).unwrap(), &data[4..8]);
        g.write_all_vectored_at(&[b"ab", b"", b"cde", &[0u8; 16]], 8190)
            .unwrap();
        assert_eq!(g.len().unwrap(), 8190 + 21);
        assert_eq!(g.read_sealed_vec_at(5, 8190).unwrap(), b"abcde");
        assert_eq!(g.read_vec_at(16, 8195).unwrap(), [0u8; 16]);
    }
}
