//! Engine options with defaults, a builder, validation, and (feature `serde`) a configuration
//! file form.
//!
//! Invariant: an [`Options`] accepted by [`Options::validate`] never lets a segment file or a
//! record offset outgrow the 32-bit positions kept in the in-memory index.

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::fs::{FileSystem, StdFs};

/// Largest record (one write batch, encoded) the engine writes or accepts on recovery.
pub const MAX_RECORD_BYTES: u64 = 1 << 30;
/// Largest segment target size (records start below 2 GiB, end below 4 GiB).
pub const MAX_SEGMENT_SIZE: u64 = 2 << 30;
/// Default byte budget of the entry cache ([`Options::cache_bytes`]).
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;
/// Default of [`Options::recycle_segments`].
pub const DEFAULT_RECYCLE_SEGMENTS: usize = 2;
/// Largest [`Options::recycle_segments`].
pub const MAX_RECYCLE_SEGMENTS: usize = 64;
/// Smallest segment target size.
pub const MIN_SEGMENT_SIZE: u64 = 4096;

/// What recovery does with damaged records. In a configuration file: `"tolerate-tail"`,
/// `"strict"` or `"tolerate-any"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize, serde::Serialize),
    serde(rename_all = "kebab-case")
)]
pub enum RecoveryMode {
    /// A torn or garbage tail of the last segment is cut off; corruption anywhere else is an
    /// error naming the segment and offset. The default.
    #[default]
    TolerateTail,
    /// Any damaged byte, a torn tail included, makes `open` fail.
    Strict,
    /// Damaged records anywhere are skipped and reported in
    /// [`RecoveryReport::skipped`](crate::RecoveryReport).
    TolerateAny,
}

/// Engine options. Build with [`Options::default`] and the builder methods; each method documents
/// its option's default and range, and [`Options::validate`] (also run by
/// [`Engine::open`](crate::Engine::open)) rejects values out of range.
///
/// ```
/// use multiraft_wal::{Options, RecoveryMode};
///
/// let options = Options::default()
///     .segment_size(64 << 20)
///     .recovery_mode(RecoveryMode::Strict);
/// assert!(options.validate().is_ok());
/// assert!(Options::default().segment_size(1).validate().is_err());
/// ```
///
/// With the feature `serde`, options also deserialize from (and serialize to) any serde format,
/// for example a TOML configuration file. Keys are the builder methods' names in kebab-case;
/// every key is optional (missing ones take their defaults) and unknown keys are refused.
/// Sizes accept a number of bytes or a human size (`"128MiB"`, `"64 KiB"`, `"1GB"`). The file
/// system cannot be configured from a file.
///
#[cfg_attr(feature = "serde", doc = "```")]
#[cfg_attr(not(feature = "serde"), doc = "```ignore")]
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use multiraft_wal::Options;
///
/// let options: Options = serde_json::from_str(r#"{
///     "segment-size": "64MiB",
///     "compression-threshold": 8192,
///     "recovery-mode": "tolerate-any",
///     "recovery-threads": 4,
///     "prefill-segments": false,
///     "recycle-segments": 4,
///     "gc-rewrite-max-entries": 128,
///     "auto-gc": true
/// }"#)?;
/// options.validate()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize, serde::Serialize),
    serde(rename_all = "kebab-case", default, deny_unknown_fields)
)]
pub struct Options {
    #[cfg_attr(feature = "serde", serde(with = "size"))]
    pub(crate) segment_size: u64,
    #[cfg_attr(feature = "serde", serde(with = "size"))]
    pub(crate) compression_threshold: usize,
    pub(crate) recovery_mode: RecoveryMode,
    pub(crate) recovery_threads: usize,
    pub(crate) prefill_segments: bool,
    pub(crate) recycle_segments: usize,
    pub(crate) gc_rewrite_max_entries: u64,
    pub(crate) auto_gc: bool,
    #[cfg_attr(feature = "serde", serde(with = "size"))]
    pub(crate) cache_bytes: u64,
    pub(crate) mmap_reads: bool,
    #[cfg_attr(feature = "serde", serde(with = "size"))]
    pub(crate) bytes_per_sync: u64,
    #[cfg_attr(feature = "serde", serde(skip))]
    pub(crate) file_system: Arc<dyn FileSystem>,
}

/// Sizes in configuration files: a number of bytes or a human size; written back as the shortest
/// exact human form (`"128MiB"`), or as a number of bytes when no binary unit divides it.
#[cfg(feature = "serde")]
mod size {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// The integer types options use for sizes.
    pub(super) trait Size: Copy + TryFrom<u64> + TryInto<u64> {}
    impl Size for u64 {}
    impl Size for usize {}

    pub(super) fn serialize<T: Size, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        let Ok(n) = (*v).try_into() else {
            return Err(serde::ser::Error::custom("size does not fit in 64 bits"));
        };
        for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            if n != 0 && n % (1u64 << shift) == 0 {
                return format!("{}{unit}", n >> shift).serialize(s);
            }
        }
        n.serialize(s)
    }

    pub(super) fn deserialize<'de, T: Size, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let n = bytesize::ByteSize::deserialize(d)?.as_u64();
        T::try_from(n).map_err(|_| serde::de::Error::custom(format!("size {n} is too large")))
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("segment_size", &self.segment_size)
            .field("compression_threshold", &self.compression_threshold)
            .field("recovery_mode", &self.recovery_mode)
            .field("recovery_threads", &self.recovery_threads)
            .field("prefill_segments", &self.prefill_segments)
            .field("recycle_segments", &self.recycle_segments)
            .field("gc_rewrite_max_entries", &self.gc_rewrite_max_entries)
            .field("auto_gc", &self.auto_gc)
            .field("cache_bytes", &self.cache_bytes)
            .field("mmap_reads", &self.mmap_reads)
            .field("bytes_per_sync", &self.bytes_per_sync)
            .field("file_system", &self.file_system)
            .finish()
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_size: 128 << 20,
            compression_threshold: 8 << 10,
            recovery_mode: RecoveryMode::TolerateTail,
            recovery_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            prefill_segments: true,
            recycle_segments: DEFAULT_RECYCLE_SEGMENTS,
            gc_rewrite_max_entries: u64::MAX,
            auto_gc: true,
            cache_bytes: DEFAULT_CACHE_BYTES,
            mmap_reads: true,
            bytes_per_sync: 8 << 20,
            file_system: Arc::new(StdFs),
        }
    }
}

impl Options {
    /// Target size of a segment file. A record never spans two segments, so a segment can end a
    /// little short of, or (for one record larger than the target) beyond, this size.
    /// Default: 128 MiB. Range: 4 KiB to 2 GiB.
    pub fn segment_size(mut self, bytes: u64) -> Self {
        self.segment_size = bytes;
        self
    }

    /// Batches whose encoded body is at least this many bytes are lz4-compressed (kept raw if
    /// compression does not save an eighth). `usize::MAX` disables compression. Default: 8 KiB.
    pub fn compression_threshold(mut self, bytes: usize) -> Self {
        self.compression_threshold = bytes;
        self
    }

    /// What recovery does with damaged records. Default: [`RecoveryMode::TolerateTail`].
    pub fn recovery_mode(mut self, mode: RecoveryMode) -> Self {
        self.recovery_mode = mode;
        self
    }

    /// Threads that scan segments in parallel on open. Default: the number of cores. Minimum: 1.
    pub fn recovery_threads(mut self, threads: usize) -> Self {
        self.recovery_threads = threads;
        self
    }

    /// Whether segments that will serve durable writes are filled with zeros ahead of time,
    /// in the background. fdatasync into blocks that are already written skips the file
    /// system's metadata journal, which roughly halves synced-write latency on ext4; the price
    /// is writing those bytes twice. The engine zero-fills only where that pays: once a segment
    /// has seen 16 fdatasyncs for waiters covering at most 64 KiB each on average (small
    /// synced or asynchronous writes; a bulk load, or syncs of large batches, write each byte
    /// once). The first zero-filled segment holds 8 MiB of records and the writer moves to it
    /// as soon as it is ready; each next one is twice as long, up to the segment size, so the
    /// zeros written grow with the workload (a few MiB for a workload that writes a few MiB).
    /// Recycled segments (see [`Options::recycle_segments`]) are already written and are never
    /// zero-filled. With `false`, space is only reserved (fallocate). Default: true.
    pub fn prefill_segments(mut self, prefill: bool) -> Self {
        self.prefill_segments = prefill;
        self
    }

    /// How many dead segment files GC keeps (renamed `<id>.wal.free`) to be reused as new
    /// segments instead of deleting them. A reused file is already written whole, so it serves
    /// fdatasync as cheaply as a zero-filled one without being zero-filled again: under steady
    /// churn with synced writes, segments are neither created nor zero-filled any more (see
    /// docs/BENCHMARKS.md, W11). Files a reader still holds are deleted, not kept. Kept files
    /// count as disk usage (at most this many segments beyond the log), are the first thing
    /// deleted on a full disk, and are deleted at a clean shutdown (an idle directory keeps
    /// none). 0 turns recycling off (dead segments are deleted). Default: 2:
    /// steady churn frees about one segment per rotation and prepares one per rotation, so one
    /// kept file serves it; the second covers a GC that frees two at once. Range: 0 to 64.
    pub fn recycle_segments(mut self, files: usize) -> Self {
        self.recycle_segments = files;
        self
    }

    /// During [`Engine::gc`](crate::Engine::gc), the groups that keep a sealed segment alive are
    /// rewritten into the active segment (so the old one can be deleted) when together they
    /// copy at most a quarter of the bytes the deletion frees; a group holding more than this
    /// many entries is never rewritten (it is reported in
    /// [`GcReport::holders`](crate::GcReport) instead). 0 disables rewriting. Default: no limit
    /// (`u64::MAX`): the byte rule alone decides.
    pub fn gc_rewrite_max_entries(mut self, entries: u64) -> Self {
        self.gc_rewrite_max_entries = entries;
        self
    }

    /// Whether each segment rotation also deletes the sealed segments no group references any
    /// more (checkpoint first). Rewriting lagging groups happens only in an explicit
    /// [`Engine::gc`](crate::Engine::gc). Default: true.
    pub fn auto_gc(mut self, on: bool) -> Self {
        self.auto_gc = on;
        self
    }

    /// Byte budget of the entry cache: the entries written most recently are served from
    /// memory (no system call, no checksum) until this many bytes of newer writes push them
    /// out, oldest first. The bytes counted are the cached payloads, a fixed 64 bytes per
    /// cached append, and the unused capacity of the batches' payload buffers; see
    /// [`Stats::cache_bytes`](crate::Stats). 0 turns the cache off. Default: 64 MiB, enough for
    /// a leader to replicate and apply what it wrote in the last seconds at a few hundred MB/s
    /// of appends.
    pub fn cache_bytes(mut self, bytes: u64) -> Self {
        self.cache_bytes = bytes;
        self
    }

    /// Whether reads of sealed segments (every segment but the one receiving writes) may come
    /// from a read-only memory mapping of the file ([`FsFile::read_sealed_vec_at`]): a copy
    /// out of the page cache instead of a `pread` system call. A record's checksum is verified
    /// on its first read; with the mapping, later single-entry gets (`Engine::entry`,
    /// `Engine::entry_bytes`) of an uncompressed record already verified since open copy just
    /// their entry out of the mapping without checking the whole record again (a sealed
    /// segment's bytes never change while the engine runs; range reads still check every
    /// record). `false` checks every record on every read. With [`StdFs`], a disk error while
    /// a mapped page is read in raises SIGBUS (the process dies) instead of returning
    /// [`Error::Io`](crate::Error), and another process truncating a live segment file does
    /// the same; set `false` where a failing disk must surface as an error. Default: true.
    ///
    /// [`FsFile::read_sealed_vec_at`]: crate::fs::FsFile::read_sealed_vec_at
    /// [`StdFs`]: crate::fs::StdFs
    pub fn mmap_reads(mut self, on: bool) -> Self {
        self.mmap_reads = on;
        self
    }

    /// Unsynced bytes the active segment may hold before the engine fdatasyncs them in the
    /// background (on its flusher thread, never a writer's). Without it, an unsynced workload
    /// leaves a whole segment of dirty pages for the fdatasync that seals the segment at
    /// rotation, which runs on the thread of the write that fills it (tens of milliseconds for
    /// 128 MiB). A background sync also makes what it covers durable (a later synced write then
    /// finds less to do); it costs one fdatasync per this many bytes. 0 turns it off. Default:
    /// 8 MiB.
    pub fn bytes_per_sync(mut self, bytes: u64) -> Self {
        self.bytes_per_sync = bytes;
        self
    }

    /// The file system all I/O goes through. Default: [`StdFs`].
    pub fn file_system(mut self, fs: Arc<dyn FileSystem>) -> Self {
        self.file_system = fs;
        self
    }

    /// Checks the options for values the engine cannot honour.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidOption`] naming the first option out of its range.
    pub fn validate(&self) -> Result<()> {
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&self.segment_size) {
            return Err(Error::InvalidOption {
                option: "segment_size",
                reason: format!(
                    "{} is outside {MIN_SEGMENT_SIZE}..={MAX_SEGMENT_SIZE}",
                    self.segment_size
                ),
            });
        }
        if self.recycle_segments > MAX_RECYCLE_SEGMENTS {
            return Err(Error::InvalidOption {
                option: "recycle_segments",
                reason: format!("{} is above {MAX_RECYCLE_SEGMENTS}", self.recycle_segments),
            });
        }
        if self.recovery_threads == 0 {
            return Err(Error::InvalidOption {
                option: "recovery_threads",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "serde")]
    #[test]
    fn a_config_file_round_trips_with_human_sizes() {
        let text = r#"
            segment-size = "64 MiB"
            compression-threshold = 4096
            recovery-mode = "strict"
            auto-gc = false
            cache-bytes = "16 MiB"
            mmap-reads = false
        "#;
        let o: Options = toml::from_str(text).expect("parses");
        assert_eq!(o.segment_size, 64 << 20);
        assert_eq!(o.compression_threshold, 4096);
        assert_eq!(o.recovery_mode, RecoveryMode::Strict);
        assert!(!o.auto_gc);
        assert_eq!(o.cache_bytes, 16 << 20);
        assert!(!o.mmap_reads);
        // Missing keys keep their defaults.
        let d = Options::default();
        assert_eq!(o.gc_rewrite_max_entries, d.gc_rewrite_max_entries);
        assert_eq!(o.prefill_segments, d.prefill_segments);
        // Written back in human form and read again to the same options.
        let out = toml::to_string(&o).expect("serializes");
        assert!(out.contains("segment-size = \"64MiB\""), "{out}");
        assert!(out.contains("compression-threshold = \"4KiB\""), "{out}");
        let again: Options = toml::from_str(&out).expect("parses again");
        assert_eq!(format!("{again:?}"), format!("{o:?}"));
        // A size that no binary unit divides stays a number of bytes.
        let odd: Options = toml::from_str("segment-size = 1000000").expect("parses");
        assert!(toml::to_string(&odd)
            .expect("serializes")
            .contains("segment-size = 1000000"));
        // Unknown keys and bad sizes are refused.
        assert!(toml::from_str::<Options>("segment-sise = 4096").is_err());
        assert!(toml::from_str::<Options>("segment-size = \"12 parsecs\"").is_err());
    }

    #[test]
    fn validation() {
        assert!(Options::default().validate().is_ok());
        assert!(Options::default().segment_size(100).validate().is_err());
        assert!(Options::default()
            .segment_size(MAX_SEGMENT_SIZE + 1)
            .validate()
            .is_err());
        assert!(Options::default().recovery_threads(0).validate().is_err());
    }
}
