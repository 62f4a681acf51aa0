//! A file system over the real one that counts fdatasyncs, can hold them at a gate, and can
//! make them fail: how the raft tests see when durability is reported relative to fsyncs.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use multiraft_wal::fs::{DirLock, FileSystem, FsFile, StdFs};
use multiraft_wal::{Engine, Options};
use parking_lot::{Condvar, Mutex};

#[derive(Debug, Default)]
pub struct Probe {
    /// fdatasyncs that returned Ok.
    pub synced: AtomicU64,
    /// When set, every fdatasync fails with EIO.
    pub fail_sync: AtomicBool,
    /// While true, fdatasyncs wait (after announcing themselves on `entered`).
    gate_closed: Mutex<bool>,
    gate: Condvar,
    entered: Mutex<Option<mpsc::Sender<()>>>,
}

impl Probe {
    pub fn close_gate(&self) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel();
        *self.entered.lock() = Some(tx);
        *self.gate_closed.lock() = true;
        rx
    }

    pub fn open_gate(&self) {
        *self.gate_closed.lock() = false;
        *self.entered.lock() = None;
        self.gate.notify_all();
    }
}

#[derive(Debug)]
pub struct ProbeFs {
    pub inner: StdFs,
    pub probe: Arc<Probe>,
}

#[derive(Debug)]
struct ProbeFile {
    inner: Arc<dyn FsFile>,
    probe: Arc<Probe>,
}

impl FsFile for ProbeFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        if let Some(tx) = self.probe.entered.lock().as_ref() {
            let _ = tx.send(());
        }
        {
            let mut closed = self.probe.gate_closed.lock();
            while *closed {
                self.probe.gate.wait(&mut closed);
            }
        }
        if self.probe.fail_sync.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        self.inner.sync_data()?;
        self.probe.synced.fetch_add(1, Ordering::SeqCst);
        Ok(())
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

impl FileSystem for ProbeFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn create(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let inner = self.inner.create(path)?;
        Ok(Arc::new(ProbeFile {
            inner,
            probe: self.probe.clone(),
        }))
    }
    fn open(&self, path: &Path) -> io::Result<Arc<dyn FsFile>> {
        let inner = self.inner.open(path)?;
        Ok(Arc::new(ProbeFile {
            inner,
            probe: self.probe.clone(),
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.remove(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.inner.sync_dir(dir)
    }
    fn lock(&self, path: &Path) -> io::Result<Box<dyn DirLock>> {
        self.inner.lock(path)
    }
}

pub fn open_probed(dir: &Path) -> anyhow::Result<(Engine, Arc<Probe>)> {
    let probe = Arc::new(Probe::default());
    let fs = Arc::new(ProbeFs {
        inner: StdFs,
        probe: probe.clone(),
    });
    let engine = Engine::open(dir, Options::default().file_system(fs))?;
    Ok((engine, probe))
}
