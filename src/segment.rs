//! Segment files: naming, the 32-byte header, and creating a ready-to-use segment.
//!
//! A segment is named `<id as 16 hex digits>.wal`, starts with a header naming its id, and holds
//! records back to back from byte 32. A segment is only ever given its final name once its header
//! (and preallocated space) is durable, through a `.tmp` name, a rename and a directory fsync, so
//! every `.wal` file recovery sees has a valid header unless the media corrupted it.

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

/// Encodes the header of segment `id`.
pub fn encode_header(id: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&id.to_le_bytes());
    let crc = crc32c::crc32c(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks the header of segment `id`; the error names what failed.
pub fn check_header(id: u64, bytes: &[u8]) -> std::result::Result<(), &'static str> {
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
    Ok(())
}

/// Creates segment `id` in `dir`: writes the header under a temporary name, reserves `size`
/// bytes, fsyncs the file, renames it into place and fsyncs the directory. Returns the open
/// file. Zero-filling, when the workload wants it, comes after ([`prefill_segment`]). A failure
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

/// Zero-fills an existing, still empty segment (whose space was only reserved) so that
/// fdatasync into it skips the file system's metadata journal. Its content does not change:
/// reserved space reads as zeros already. Writes 1 MiB chunks and syncs each before the next,
/// so the zero-fill never puts a large flush in the disk's queue ahead of a writer's fdatasync
/// (measured in docs/BENCHMARKS.md: one 128 MiB flush at the end stalled synced writers for
/// 40–58 ms; chunk by chunk their max latency stays under 10 ms at the same throughput). Stops
/// between chunks once `cancel` is set (a rotation takes the segment as it is; the zeros written
/// so far are synced with its data). Returns whether the whole segment was zero-filled.
pub fn prefill_segment(file: &dyn FsFile, id: u64, size: u64, cancel: &AtomicBool) -> Result<bool> {
    const CHUNK: usize = 1 << 20;
    let err = |e| Error::io(format!("prefilling segment {id}"), e);
    let zeros = vec![0u8; CHUNK];
    let mut off = SEGMENT_HEADER_LEN;
    while off < size {
        if cancel.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let n = (size - off).min(CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], off).map_err(err)?;
        file.sync_data().map_err(err)?;
        off += n as u64;
    }
    Ok(true)
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
    }
}
