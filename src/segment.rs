//! Segment files: naming, the 32-byte header, creating a ready-to-use segment, and recycling a
//! dead one from the pool.
//!
//! A segment is named `<id as 16 hex digits>.wal`, starts with a header naming its id, and holds
//! records back to back from byte 32. A segment is only ever given its final name once its header
//! (and preallocated space) is durable, through a `.tmp` name (or a pool name, for a recycled
//! file), a rename and a directory fsync, so every `.wal` file recovery sees has a valid header
//! unless the media corrupted it.
//!
//! Recycling: a dead segment may be renamed `<old id>.wal.free` (a *pool* file) instead of being
//! deleted. A pool file is never read as a segment. Turning it into segment `id` writes the new
//! header with [`FLAG_RECYCLED`] set and a 16-byte zero terminator right after it (one write),
//! extends the file to the wanted size if it is shorter, fdatasyncs, renames it to
//! `<id>.wal` and fsyncs the directory: a crash at any point leaves either a pool file (reused
//! or deleted at open) or a recycled segment whose durable header says where its data ends.
//! The bytes after the terminator are stale records of older segments, which fail their CRC
//! (seeded with another segment id): recovery's end rule for a recycled segment is in
//! `recovery::scan` and docs/FORMAT.md.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::fs::{FileSystem, FsFile};

/// Bytes of the segment header; the first record starts here.
pub const SEGMENT_HEADER_LEN: u64 = 32;
/// Magic bytes at the start of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"MRWALSEG";
/// Format version written in segment headers.
pub const FORMAT_VERSION: u32 = 1;
/// Segment file extension.
pub const SEGMENT_EXT: &str = ".wal";
/// Extension of a segment being prepared.
pub const TMP_EXT: &str = ".tmp";
/// Extension (after [`SEGMENT_EXT`]) of a dead segment file kept for recycling.
pub const POOL_EXT: &str = ".free";
/// Header flag: the file was recycled from a dead segment, so stale bytes of older segments may
/// follow the end of its data (see docs/FORMAT.md, "Segment").
pub const FLAG_RECYCLED: u32 = 1;
/// Every header flag this version knows; a header with another bit set is refused.
pub const KNOWN_FLAGS: u32 = FLAG_RECYCLED;
/// Zero bytes written right after the last record of every write into a segment (the
/// *terminator*): a completed write always ends in a zero record header.
pub const TERMINATOR_LEN: u64 = 16;

/// The file name of segment `id`.
pub fn segment_name(id: u64) -> String {
    format!("{id:016x}{SEGMENT_EXT}")
}

/// The id of a segment file name, if it is one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(SEGMENT_EXT)?;
    if stem.len() != 16 {
        return None;
    }
    u64::from_str_radix(stem, 16).ok()
}

/// The file name of the pool file kept from dead segment `id`.
pub fn pool_name(id: u64) -> String {
    format!("{id:016x}{SEGMENT_EXT}{POOL_EXT}")
}

/// The id of a pool file name, if it is one.
pub fn parse_pool_name(name: &str) -> Option<u64> {
    parse_segment_name(name.strip_suffix(POOL_EXT)?)
}

/// Encodes the header of segment `id` (no flags).
pub fn encode_header(id: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    encode_header_flags(id, 0)
}

/// Encodes the header of segment `id` with `flags`.
pub fn encode_header_flags(id: u64, flags: u32) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&flags.to_le_bytes());
    h[16..24].copy_from_slice(&id.to_le_bytes());
    let crc = crc32c::crc32c(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Whether the segment behind `file` has the recycled flag (false if its header cannot be read).
pub(crate) fn is_recycled(file: &dyn FsFile) -> bool {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    file.read_exact_at(&mut h, 0).is_ok()
        && u32::from_le_bytes([h[12], h[13], h[14], h[15]]) & FLAG_RECYCLED != 0
}

/// Checks the header of segment `id` and returns its flags; the error names what failed.
pub fn check_header(id: u64, bytes: &[u8]) -> std::result::Result<u32, &'static str> {
    let h = bytes
        .get(..SEGMENT_HEADER_LEN as usize)
        .ok_or("segment shorter than its header")?;
    let crc = u32::from_le_bytes([h[28], h[29], h[30], h[31]]);
    if crc32c::crc32c(&h[..28]) != crc {
        return Err("segment header checksum mismatch");
    }
    if h[0..8] != SEGMENT_MAGIC {
        return Err("bad segment magic");
    }
    if u32::from_le_bytes([h[8], h[9], h[10], h[11]]) != FORMAT_VERSION {
        return Err("unsupported segment format version");
    }
    let mut idb = [0u8; 8];
    idb.copy_from_slice(&h[16..24]);
    if u64::from_le_bytes(idb) != id {
        return Err("segment header names another segment");
    }
    let flags = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if flags & !KNOWN_FLAGS != 0 {
        return Err("unknown segment header flags");
    }
    Ok(flags)
}

/// Creates segment `id` in `dir`: writes the header under a temporary name, reserves `size`
/// bytes, fsyncs the file, renames it into place and fsyncs the directory. Returns the open
/// file. Zero-filling, when the workload wants it, comes after ([`zero_fill_range`]). A failure
/// removes the temporary file (best effort), and a full disk's error names the bytes wanted.
pub fn create_segment(
    fs: &dyn FileSystem,
    dir: &Path,
    id: u64,
    size: u64,
) -> Result<Arc<dyn FsFile>> {
    let name = segment_name(id);
    let tmp = dir.join(format!("{name}{TMP_EXT}"));
    let path = dir.join(&name);
    let ctx = |what: &str| format!("{what} segment {id}");
    // A leftover from a crash during an earlier preparation is garbage: replace it.
    let _ = fs.remove(&tmp);
    let made = (|| {
        let file = fs.create(&tmp).map_err(|e| Error::io(ctx("creating"), e))?;
        file.write_all_at(&encode_header(id), 0)
            .map_err(|e| Error::io(ctx("writing header of"), e))?;
        if size > SEGMENT_HEADER_LEN {
            file.allocate(size).map_err(|e| {
                Error::io(format!("preallocating {size} bytes for segment {id}"), e)
            })?;
        }
        file.sync_data()
            .map_err(|e| Error::io(ctx("syncing new"), e))?;
        fs.rename(&tmp, &path)
            .map_err(|e| Error::io(ctx("renaming new"), e))?;
        Ok(file)
    })();
    let file = match made {
        Ok(file) => file,
        Err(e) => {
            let _ = fs.remove(&tmp);
            return Err(e);
        }
    };
    fs.sync_dir(dir)
        .map_err(|e| Error::io(ctx("syncing directory after creating"), e))?;
    Ok(file)
}

/// Turns pool file `pool_id` (a dead segment kept for reuse) into segment `id` of at least
/// `size` bytes: writes the header (with [`FLAG_RECYCLED`]) and a zero terminator after it in one
/// write, extends the file if it is shorter than `size` (writing zeros when `zero_fill`, else
/// reserving the space; a full disk only stops the extension: the file is usable at the length
/// it has), fdatasyncs, renames it to `<id>.wal` and fsyncs the directory. Returns the open file
/// and how many bytes from its start are written (an fdatasync into them needs no metadata).
///
/// Crash safety: until the rename is durable the file is a pool file, which recovery never
/// reads (the engine reuses or deletes it at open); the rename comes only after the new header
/// and terminator are durable. On an error the pool file is removed (best effort): its state is
/// unknown.
pub fn recycle_segment(
    fs: &dyn FileSystem,
    dir: &Path,
    pool_id: u64,
    id: u64,
    size: u64,
    zero_fill: bool,
    cancel: &AtomicBool,
) -> Result<(Arc<dyn FsFile>, u64)> {
    let from = dir.join(pool_name(pool_id));
    let path = dir.join(segment_name(id));
    let ctx = |what: &str| format!("{what} segment {id} (recycled from {pool_id})");
    let made = (|| {
        let file = fs.open(&from).map_err(|e| Error::io(ctx("opening"), e))?;
        let mut head = [0u8; (SEGMENT_HEADER_LEN + TERMINATOR_LEN) as usize];
        head[..SEGMENT_HEADER_LEN as usize]
            .copy_from_slice(&encode_header_flags(id, FLAG_RECYCLED));
        file.write_all_at(&head, 0)
            .map_err(|e| Error::io(ctx("writing the header of"), e))?;
        let len = file
            .len()
            .map_err(|e| Error::io(ctx("reading the size of"), e))?;
        let mut written = len.max(head.len() as u64);
        if written < size {
            let grown = if zero_fill {
                zero_fill_range(file.as_ref(), written, size, cancel).map(|end| {
                    written = end;
                })
            } else {
                file.allocate(size)
            };
            match grown {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => {
                    tracing::debug!(segment = id, "full disk: recycled segment not extended");
                }
                Err(e) => return Err(Error::io(ctx("extending"), e)),
            }
        }
        file.sync_data().map_err(|e| Error::io(ctx("syncing"), e))?;
        fs.rename(&from, &path)
            .map_err(|e| Error::io(ctx("renaming"), e))?;
        Ok((file, written))
    })();
    let made = match made {
        Ok(made) => made,
        Err(e) => {
            let _ = fs.remove(&from);
            return Err(e);
        }
    };
    fs.sync_dir(dir)
        .map_err(|e| Error::io(ctx("syncing directory after renaming"), e))?;
    Ok(made)
}

/// Writes zeros over `[from, to)` of a segment that is not taking writes yet, so that
/// fdatasync into it skips the file system's metadata journal (its content does not change where
/// space was only reserved: reserved space reads as zeros already). Writes 256 KiB chunks and
/// syncs each before the next, so the zero-fill never puts a large flush in the disk's queue
/// ahead of a writer's fdatasync (measured in docs/BENCHMARKS.md: one 128 MiB flush at the end
/// stalled synced writers for 40–58 ms; chunk by chunk their max latency stays under 10 ms at
/// the same throughput, and 256 KiB chunks give them a lower p99 and p99.9 than 1 MiB ones).
/// Stops between chunks once `cancel` is set (a rotation takes the segment as it
/// is; the zeros written so far are synced with its data). Returns where it stopped.
pub(crate) fn zero_fill_range(
    file: &dyn FsFile,
    from: u64,
    to: u64,
    cancel: &AtomicBool,
) -> std::io::Result<u64> {
    const CHUNK: u64 = 256 << 10;
    // Written a page at a time: a larger write makes the page cache hold large folios, and
    // every later small append that dirties one after an fdatasync is counted (`write_bytes`)
    // as the whole folio again (measured in docs/BENCHMARKS.md, W11); the device writes only
    // the dirty blocks either way.
    const PAGE: u64 = 4096;
    let zeros = [0u8; PAGE as usize];
    let mut off = from;
    while off < to {
        if cancel.load(Ordering::Relaxed) {
            break;
        }
        let end = (off + CHUNK).min(to);
        while off < end {
            // Up to the next page boundary (or `end`).
            let n = (PAGE - off % PAGE).min(end - off) as usize;
            file.write_all_at(&zeros[..n], off)?;
            off += n as u64;
        }
        file.sync_data()?;
    }
    Ok(off)
}

/// The start of a recycled segment as the engine writes it (tests): the header with
/// [`FLAG_RECYCLED`], `records`, the terminator; and the offset where the records end.
#[cfg(test)]
pub(crate) fn recycled_image(id: u64, records: &[Vec<u8>]) -> (Vec<u8>, u64) {
    let mut data = encode_header_flags(id, FLAG_RECYCLED).to_vec();
    for r in records {
        data.extend_from_slice(r);
    }
    let end = data.len() as u64;
    data.extend_from_slice(&[0; TERMINATOR_LEN as usize]);
    (data, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip() {
        for id in [0, 1, 0xabc, u64::MAX] {
            assert_eq!(parse_segment_name(&segment_name(id)), Some(id));
        }
        assert_eq!(parse_segment_name("0001.wal"), None);
        assert_eq!(parse_segment_name("000000000000000g.wal"), None);
        assert_eq!(parse_segment_name("0000000000000001.wal.tmp"), None);
        assert_eq!(parse_segment_name(&pool_name(7)), None);
        assert_eq!(parse_pool_name(&pool_name(7)), Some(7));
        assert_eq!(parse_pool_name(&segment_name(7)), None);
    }

    #[test]
    fn header_checks() {
        let h = encode_header(42);
        assert!(check_header(42, &h).is_ok());
        assert!(check_header(43, &h).is_err());
        for i in 0..h.len() {
            let mut bad = h;
            bad[i] ^= 0x10;
            assert!(check_header(42, &bad).is_err(), "flip at byte {i} passed");
        }
        assert!(check_header(42, &h[..31]).is_err());
        assert_eq!(check_header(42, &h), Ok(0));
        let r = encode_header_flags(42, FLAG_RECYCLED);
        assert_eq!(check_header(42, &r), Ok(FLAG_RECYCLED));
        // A flag this version does not know is refused, not ignored.
        assert!(check_header(42, &encode_header_flags(42, 2)).is_err());
    }
}
