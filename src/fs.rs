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
    /// Writes all of `buf` at `offset`, growing the file if needed.
    ///
    /// # Errors
    ///
    /// The OS error (`StorageFull` on a full disk); part of `buf` may have been written.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
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
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

#[derive(Debug)]
struct StdFile {
    file: std::fs::File,
}

#[derive(Debug)]
struct StdLock {
    _file: std::fs::File,
}

impl DirLock for StdLock {}

impl FsFile for StdFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
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
        Ok(Arc::new(StdFile { file }))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(Arc::new(StdFile { file }))
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
