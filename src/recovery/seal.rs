//! Durable points: what the write path and the shutdown leave on disk so that recovery can tell
//! a torn tail (never acknowledged, may be cut) from damage to data that was durable (must be
//! reported, never cut). The rule and the encodings are specified in docs/FORMAT.md ("Durable
//! points").
//!
//! - [`SyncPoint`]: after each fdatasync of the active segment, the next write into that segment
//!   is preceded by a sync marker saying up to where the segment had been synced.
//! - [`seal_clean_shutdown`]: at a clean shutdown, after the final fsync, a marker declaring the
//!   whole segment durable (fsynced too), and a `SEAL` file naming the segment and its sealed
//!   length (temp file, fsync, rename, directory fsync). Either one alone proves the segment
//!   durable, so a single damaged byte or file cannot make recovery cut acknowledged data.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::codec::{encode_sync_marker, SyncMarker, SYNC_MARKER_LEN};
use crate::error::{Error, Result};
use crate::fs::{FileSystem, FsFile};
use crate::segment::{segment_name, SEGMENT_HEADER_LEN};

/// Name of the seal file.
pub const SEAL_NAME: &str = "SEAL";
/// Name of the seal file while it is written.
pub(crate) const SEAL_TMP: &str = "SEAL.tmp";
const SEAL_MAGIC: [u8; 8] = *b"MRWALSEL";
const SEAL_VERSION: u32 = 1;
/// Bytes of the seal file.
pub(crate) const SEAL_LEN: usize = 36;

/// What a seal file says: bytes `[0, len)` of segment `segment` were durable at a clean
/// shutdown, and so was every segment before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seal {
    pub(crate) segment: u64,
    pub(crate) len: u64,
}

impl Seal {
    pub(crate) fn encode(&self) -> [u8; SEAL_LEN] {
        let mut out = [0u8; SEAL_LEN];
        let mut body = Vec::with_capacity(SEAL_LEN);
        body.extend_from_slice(&SEAL_MAGIC);
        body.extend_from_slice(&SEAL_VERSION.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&self.segment.to_le_bytes());
        body.extend_from_slice(&self.len.to_le_bytes());
        let crc = crc32c::crc32c(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        out.copy_from_slice(&body);
        out
    }

    pub(crate) fn decode(b: &[u8]) -> std::result::Result<Seal, &'static str> {
        let b: &[u8; SEAL_LEN] = b.try_into().map_err(|_| "wrong size")?;
        let (body, crc) = b.split_at(SEAL_LEN - 4);
        let crc = crc.first_chunk::<4>().map(|c| u32::from_le_bytes(*c));
        if crc != Some(crc32c::crc32c(body)) {
            return Err("checksum mismatch");
        }
        let u64_at = |at: usize| {
            body.get(at..at + 8)
                .and_then(|s| s.first_chunk::<8>())
                .map(|c| u64::from_le_bytes(*c))
        };
        if body.get(..8) != Some(&SEAL_MAGIC[..]) {
            return Err("bad magic");
        }
        if body.get(8..12) != Some(&SEAL_VERSION.to_le_bytes()[..]) {
            return Err("unsupported version");
        }
        let (Some(segment), Some(len)) = (u64_at(16), u64_at(24)) else {
            return Err("truncated");
        };
        if len < SEGMENT_HEADER_LEN {
            return Err("sealed length inside the segment header");
        }
        Ok(Seal { segment, len })
    }
}

/// Reads the seal file, if there is one. A damaged seal file is ignored (the reason is returned
/// for the report): the sync marker it duplicates still speaks for the segment.
pub(crate) fn load(
    fs: &dyn FileSystem,
    dir: &Path,
    names: &[String],
) -> Result<std::result::Result<Option<Seal>, String>> {
    if !names.iter().any(|n| n == SEAL_NAME) {
        return Ok(Ok(None));
    }
    let file = fs
        .open(&dir.join(SEAL_NAME))
        .map_err(|e| Error::io("opening the seal file", e))?;
    let len = file
        .len()
        .map_err(|e| Error::io("reading the seal file's size", e))?;
    if len != SEAL_LEN as u64 {
        return Ok(Err(format!("seal file of {len} bytes, want {SEAL_LEN}")));
    }
    let mut buf = [0u8; SEAL_LEN];
    file.read_exact_at(&mut buf, 0)
        .map_err(|e| Error::io("reading the seal file", e))?;
    Ok(Seal::decode(&buf)
        .map(Some)
        .map_err(|e| format!("seal file: {e}")))
}

/// Seals the log at a clean shutdown; `file` is the active segment `segment`, `len` the end of
/// its last record. In order: cut the segment to `len` and fdatasync it (every write is now
/// durable); append a sync marker declaring `[.., len)` synced and fdatasync again; then store
/// `SEAL` naming the segment and its sealed length (temp file, fsync, rename, directory fsync).
/// If the segment holds no record, `SEAL` names the one before it (when it is still there) at
/// its length instead. Stops at the first failure: nothing is declared durable that was not
/// synced.
pub(crate) fn seal_clean_shutdown(
    fs: &dyn FileSystem,
    dir: &Path,
    segment: u64,
    file: &dyn FsFile,
    len: u64,
) -> Result<()> {
    let what = |w: &str| format!("{w} segment {segment} at shutdown");
    file.set_len(len)
        .map_err(|e| Error::io(what("cutting"), e))?;
    file.sync_data()
        .map_err(|e| Error::io(what("syncing"), e))?;
    if len <= SEGMENT_HEADER_LEN {
        // An empty segment gets no marker: it stays empty, so the next open reuses it. The
        // seal then pins the segment before it (sealed by its rotation, or by the recovery
        // that preceded this run), which no marker of this segment pins.
        let prev = segment.checked_sub(1).filter(|&p| p > 0).and_then(|p| {
            let file = fs.open(&dir.join(segment_name(p))).ok()?;
            Some((p, file.len().ok()?))
        });
        if let Some((prev, prev_len)) = prev.filter(|&(_, l)| l >= SEGMENT_HEADER_LEN) {
            return store(
                fs,
                dir,
                Seal {
                    segment: prev,
                    len: prev_len,
                },
            );
        }
    }
    let mut sealed = len;
    if len > SEGMENT_HEADER_LEN {
        let marker = SyncMarker {
            synced_to: len,
            prev_sealed_len: 0,
        };
        file.write_all_at(&encode_sync_marker(segment, marker), len)
            .map_err(|e| Error::io(what("writing the final sync marker of"), e))?;
        file.sync_data()
            .map_err(|e| Error::io(what("syncing the final sync marker of"), e))?;
        sealed = len + SYNC_MARKER_LEN as u64;
    }
    store(
        fs,
        dir,
        Seal {
            segment,
            len: sealed,
        },
    )
}

/// Writes `SEAL` durably: temp file, fsync, rename over the old one, fsync the directory.
pub(crate) fn store(fs: &dyn FileSystem, dir: &Path, seal: Seal) -> Result<()> {
    let tmp = dir.join(SEAL_TMP);
    let _ = fs.remove(&tmp);
    let file = fs
        .create(&tmp)
        .map_err(|e| Error::io("creating the seal file", e))?;
    file.write_all_at(&seal.encode(), 0)
        .map_err(|e| Error::io("writing the seal file", e))?;
    file.sync_data()
        .map_err(|e| Error::io("syncing the seal file", e))?;
    drop(file);
    fs.rename(&tmp, &dir.join(SEAL_NAME))
        .map_err(|e| Error::io("renaming the seal file", e))?;
    fs.sync_dir(dir)
        .map_err(|e| Error::io("syncing the directory after the seal file", e))
}

/// The write path's durable points: the highest (segment, offset) a successful fdatasync has
/// covered, the last segment sealed by a rotation and its length, and what markers already
/// declared. Lock-free: `synced` is raised by whichever thread ran the fdatasync, `sealed` by the
/// rotation; `marker_due` is called by the writer holding the log lock.
#[derive(Debug, Default)]
pub(crate) struct SyncPoint {
    synced: AtomicU64,
    marked: AtomicU64,
    sealed: AtomicU64,
    /// The segment whose marker has declared the previous segment's sealed length.
    sealed_declared_in: AtomicU64,
}

/// (segment, offset) packed so that packed order is (segment, offset) order. Segment ids and
/// offsets both fit in 32 bits (the index stores them as u32); anything else packs as 0, which
/// never yields a marker.
fn pack(segment: u64, offset: u64) -> u64 {
    match (u32::try_from(segment), u32::try_from(offset)) {
        (Ok(s), Ok(o)) => (u64::from(s) << 32) | u64::from(o),
        _ => 0,
    }
}

fn unpack(p: u64) -> (u64, u64) {
    (p >> 32, p & u64::from(u32::MAX))
}

impl SyncPoint {
    /// Records that an fdatasync of `segment`, started when its data ended at `offset`, has
    /// returned `Ok` (and no earlier fsync failed: the caller only calls this for a believed
    /// fsync).
    pub(crate) fn synced(&self, segment: u64, offset: u64) {
        self.synced
            .fetch_max(pack(segment, offset), Ordering::AcqRel);
    }

    /// The sync point of an engine opened after `recovered` (the last segment recovery found
    /// records in, and its length once repaired and synced): its first write into the next
    /// segment declares that length, as after a rotation.
    pub(crate) fn after_recovery(recovered: Option<(u64, u64)>) -> SyncPoint {
        let p = SyncPoint::default();
        if let Some((segment, len)) = recovered {
            p.rotated(segment, len);
        }
        p
    }

    /// Records that a rotation cut `segment` to `len` bytes and fdatasynced it; the first
    /// write into the next segment then declares that length.
    pub(crate) fn rotated(&self, segment: u64, len: u64) {
        self.sealed.fetch_max(pack(segment, len), Ordering::AcqRel);
    }

    /// Called by the writer holding the log lock, about to write at `offset` of `segment`: the
    /// sync marker to write first (a complete, sealed record), if an fsync has advanced this
    /// segment's durable point since the last marker, or if this segment has not yet declared
    /// the sealed length of the one before it.
    pub(crate) fn marker_due(&self, segment: u64, offset: u64) -> Option<Vec<u8>> {
        let synced = self.synced.load(Ordering::Acquire);
        let (synced_seg, synced_to) = unpack(synced);
        let here = synced_seg == segment && synced_to > SEGMENT_HEADER_LEN && synced_to <= offset;
        let advanced = here && synced > self.marked.load(Ordering::Relaxed);
        let (sealed_seg, sealed_len) = unpack(self.sealed.load(Ordering::Acquire));
        let declare_prev = sealed_len > 0
            && sealed_seg.checked_add(1) == Some(segment)
            && self.sealed_declared_in.load(Ordering::Relaxed) != segment;
        if !advanced && !declare_prev {
            return None;
        }
        if advanced {
            self.marked.store(synced, Ordering::Relaxed);
        }
        if declare_prev {
            self.sealed_declared_in.store(segment, Ordering::Relaxed);
        }
        let marker = SyncMarker {
            synced_to: if here { synced_to } else { SEGMENT_HEADER_LEN },
            prev_sealed_len: if declare_prev { sealed_len } else { 0 },
        };
        Some(encode_sync_marker(segment, marker))
    }
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    reason = "tests index known fixtures"
)]
mod tests {
    use super::*;

    #[test]
    fn seal_roundtrip_and_damage() {
        let s = Seal {
            segment: 7,
            len: 4096,
        };
        let b = s.encode();
        assert_eq!(Seal::decode(&b), Ok(s));
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut bad = b;
                bad[i] ^= 1 << bit;
                assert!(Seal::decode(&bad).is_err(), "flip {i}.{bit} passed");
            }
        }
        for cut in 0..b.len() {
            assert!(Seal::decode(&b[..cut]).is_err());
        }
    }

    #[test]
    fn the_first_write_after_a_rotation_declares_the_sealed_length() {
        let p = SyncPoint::default();
        p.rotated(3, 4000);
        assert!(p.marker_due(5, 32).is_none(), "not the next segment");
        let m = p.marker_due(4, 32).unwrap();
        let body = &m[crate::codec::RECORD_HEADER_LEN..];
        let got = crate::codec::parse_sync_marker(body, 32).unwrap();
        assert_eq!(
            got,
            SyncMarker {
                synced_to: 32,
                prev_sealed_len: 4000
            }
        );
        assert!(p.marker_due(4, 100).is_none(), "declared once");
    }

    #[test]
    fn a_marker_is_due_once_per_advance_in_the_same_segment() {
        let p = SyncPoint::default();
        assert!(p.marker_due(1, 100).is_none());
        p.synced(1, 80);
        assert!(p.marker_due(2, 100).is_none(), "another segment");
        assert!(p.marker_due(1, 100).is_some());
        assert!(p.marker_due(1, 140).is_none(), "already declared");
        p.synced(1, 60);
        assert!(p.marker_due(1, 140).is_none(), "the point never goes back");
        p.synced(1, 140);
        assert!(p.marker_due(1, 172).is_some());
        p.synced(1, u64::from(u32::MAX) + 1);
        assert!(p.marker_due(1, 200).is_none());
    }
}
