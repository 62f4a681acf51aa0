//! The checkpoint: every group's metadata (entry range, vote, committed marker, keys) as of one
//! position of the log, written atomically (temp file, fsync, rename, fsync directory).
//!
//! A checkpoint *covers* the log below a position `(S, O)`: every record of the segments below
//! `S`, and the records of segment `S` that start below offset `O` (version 2; a version 1 file
//! covers whole segments, read as `O` = the segment header's length).
//!
//! Invariants:
//! - A checkpoint covering the log below `(S, O)` reflects exactly the state after every record
//!   below that position, and lists which segments below `S` still exist (`survivors`).
//! - It is stored only once every record below `(S, O)` is durable (its effects are in it), and
//!   it is made durable before any segment it makes deletable is removed, so whatever recovery
//!   needs from a deleted segment (first index, vote, committed, keys) is in the checkpoint.
//! - A failed store leaves no temporary file behind (a full disk must not fill up further).

#![deny(clippy::indexing_slicing, clippy::cast_possible_truncation)]

use std::path::Path;

use crate::codec::Reader;
use crate::error::{Error, Result};
use crate::fs::FileSystem;
use crate::index::Range;
use crate::segment::SEGMENT_HEADER_LEN;

/// File name of the checkpoint.
pub const CHECKPOINT_NAME: &str = "CHECKPOINT";
const CHECKPOINT_TMP: &str = "CHECKPOINT.tmp";
const MAGIC: [u8; 8] = *b"MRWALCKP";
/// The version written: 2 adds the offset inside the covering segment.
const VERSION: u32 = 2;
/// The first version, still read (whole segments covered).
const VERSION_1: u32 = 1;

/// Keys and values of a group.
pub(crate) type KeyValues = Vec<(Box<[u8]>, Box<[u8]>)>;

/// One group's metadata in a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct GroupMeta {
    pub(crate) range: Range,
    pub(crate) vote: Option<Box<[u8]>>,
    pub(crate) committed: Option<Box<[u8]>>,
    pub(crate) kv: KeyValues,
}

/// A decoded checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// The segment `S` of the covered position.
    pub(crate) covers_below: u64,
    /// The offset `O` in segment `S`: its records starting below `O` are covered
    /// (`SEGMENT_HEADER_LEN`: none of them, the version 1 meaning).
    pub(crate) covers_offset: u64,
    pub(crate) survivors: Vec<u64>,
    pub(crate) groups: Vec<(u64, GroupMeta)>,
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "keys, values, votes and committed markers came from records of at most 1 GiB"
    )]
    let len = b.len() as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(b);
}

fn put_opt(out: &mut Vec<u8>, b: &Option<Box<[u8]>>) {
    match b {
        Some(b) => {
            out.push(1);
            put_bytes(out, b);
        }
        None => out.push(0),
    }
}

fn u32_at(r: &mut Reader<'_>) -> std::result::Result<u32, String> {
    let b = r.take(4).map_err(|e| e.to_string())?;
    let b = b.first_chunk::<4>().ok_or("truncated")?;
    Ok(u32::from_le_bytes(*b))
}

fn u64_at(r: &mut Reader<'_>) -> std::result::Result<u64, String> {
    let b = r.take(8).map_err(|e| e.to_string())?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(u64::from_le_bytes(a))
}

fn bytes_at(r: &mut Reader<'_>) -> std::result::Result<Box<[u8]>, String> {
    let len = u32_at(r)?;
    Ok(r.take(u64::from(len)).map_err(|e| e.to_string())?.into())
}

fn opt_at(r: &mut Reader<'_>) -> std::result::Result<Option<Box<[u8]>>, String> {
    match r.u8().map_err(|e| e.to_string())? {
        0 => Ok(None),
        1 => Ok(Some(bytes_at(r)?)),
        _ => Err("bad option tag".into()),
    }
}

impl Checkpoint {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.groups.len() * 48);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.covers_below.to_le_bytes());
        out.extend_from_slice(&self.covers_offset.to_le_bytes());
        out.extend_from_slice(&(self.survivors.len() as u64).to_le_bytes());
        for s in &self.survivors {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out.extend_from_slice(&(self.groups.len() as u64).to_le_bytes());
        for (id, g) in &self.groups {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&g.range.first.to_le_bytes());
            out.extend_from_slice(&g.range.len.to_le_bytes());
            put_opt(&mut out, &g.vote);
            put_opt(&mut out, &g.committed);
            out.extend_from_slice(&(g.kv.len() as u64).to_le_bytes());
            for (k, v) in &g.kv {
                put_bytes(&mut out, k);
                put_bytes(&mut out, v);
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> std::result::Result<Checkpoint, String> {
        if bytes.len() < 36 {
            return Err("shorter than its fixed fields".into());
        }
        let (body, crc) = bytes
            .split_last_chunk::<4>()
            .ok_or("shorter than its checksum")?;
        if crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
            return Err("checksum mismatch".into());
        }
        let mut r = Reader::new(body);
        if r.take(8).map_err(|e| e.to_string())? != MAGIC {
            return Err("bad magic".into());
        }
        let version = u32_at(&mut r)?;
        if version != VERSION && version != VERSION_1 {
            return Err(format!("unsupported version {version}"));
        }
        let _reserved = u32_at(&mut r)?;
        let covers_below = u64_at(&mut r)?;
        let covers_offset = if version == VERSION_1 {
            SEGMENT_HEADER_LEN
        } else {
            u64_at(&mut r)?
        };
        if covers_offset < SEGMENT_HEADER_LEN || covers_offset > u64::from(u32::MAX) {
            return Err(format!("covered offset {covers_offset} outside a segment"));
        }
        let n = u64_at(&mut r)?;
        if n > r.remaining() as u64 / 8 {
            return Err("survivor count exceeds the file".into());
        }
        // Counts are bounded by the bytes present (checked above), so they fit in memory.
        let cap = |n: u64| usize::try_from(n).unwrap_or(0);
        let mut survivors = Vec::with_capacity(cap(n));
        for _ in 0..n {
            survivors.push(u64_at(&mut r)?);
        }
        let n = u64_at(&mut r)?;
        if n > r.remaining() as u64 / 34 {
            return Err("group count exceeds the file".into());
        }
        let mut groups = Vec::with_capacity(cap(n));
        for _ in 0..n {
            let id = u64_at(&mut r)?;
            let first = u64_at(&mut r)?;
            let len = u64_at(&mut r)?;
            if first.checked_add(len).is_none() {
                return Err(format!("group {id} range overflows"));
            }
            let vote = opt_at(&mut r)?;
            let committed = opt_at(&mut r)?;
            let kvs = u64_at(&mut r)?;
            if kvs > r.remaining() as u64 / 8 {
                return Err(format!("group {id} key count exceeds the file"));
            }
            let mut kv = Vec::with_capacity(cap(kvs));
            for _ in 0..kvs {
                let k = bytes_at(&mut r)?;
                let v = bytes_at(&mut r)?;
                kv.push((k, v));
            }
            groups.push((
                id,
                GroupMeta {
                    range: Range { first, len },
                    vote,
                    committed,
                    kv,
                },
            ));
        }
        if r.remaining() != 0 {
            return Err("trailing bytes".into());
        }
        Ok(Checkpoint {
            covers_below,
            covers_offset,
            survivors,
            groups,
        })
    }

    /// Writes the checkpoint durably: temp file, fsync, rename over the old one, fsync the
    /// directory.
    /// A failure before the rename removes the temporary file (best effort), so a full disk is
    /// not left fuller.
    pub(crate) fn store(&self, fs: &dyn FileSystem, dir: &Path) -> Result<()> {
        let bytes = self.encode();
        let tmp = dir.join(CHECKPOINT_TMP);
        let _ = fs.remove(&tmp);
        let written = (|| {
            let file = fs
                .create(&tmp)
                .map_err(|e| Error::io("creating checkpoint", e))?;
            file.write_all_at(&bytes, 0)
                .map_err(|e| Error::io(format!("writing checkpoint ({} bytes)", bytes.len()), e))?;
            file.sync_data()
                .map_err(|e| Error::io("syncing checkpoint", e))?;
            drop(file);
            fs.rename(&tmp, &dir.join(CHECKPOINT_NAME))
                .map_err(|e| Error::io("renaming checkpoint", e))
        })();
        if let Err(e) = written {
            let _ = fs.remove(&tmp);
            return Err(e);
        }
        fs.sync_dir(dir)
            .map_err(|e| Error::io("syncing directory after checkpoint", e))?;
        Ok(())
    }

    /// The packed position `(segment << 32) | offset` this checkpoint covers the log below.
    pub(crate) fn position(&self) -> u64 {
        (self.covers_below << 32) | (self.covers_offset & 0xFFFF_FFFF)
    }

    /// Reads the checkpoint, if there is one.
    pub(crate) fn load(
        fs: &dyn FileSystem,
        dir: &Path,
        names: &[String],
    ) -> Result<Option<Checkpoint>> {
        if !names.iter().any(|n| n == CHECKPOINT_NAME) {
            return Ok(None);
        }
        let path = dir.join(CHECKPOINT_NAME);
        let file = fs
            .open(&path)
            .map_err(|e| Error::io("opening checkpoint", e))?;
        let len = file
            .len()
            .map_err(|e| Error::io("reading checkpoint size", e))?;
        if len > (1 << 34) {
            return Err(Error::Checkpoint {
                path,
                reason: format!("implausible size {len}"),
            });
        }
        let len = usize::try_from(len).map_err(|_| Error::Checkpoint {
            path: path.clone(),
            reason: format!("size {len} does not fit in memory"),
        })?;
        let mut bytes = vec![0u8; len];
        file.read_exact_at(&mut bytes, 0)
            .map_err(|e| Error::io("reading checkpoint", e))?;
        Checkpoint::decode(&bytes)
            .map(Some)
            .map_err(|reason| Error::Checkpoint { path, reason })
    }
}

/// Whether `name` is the checkpoint's temporary file.
pub(crate) fn is_temp(name: &str) -> bool {
    name == CHECKPOINT_TMP
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, reason = "tests index known fixtures")]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_damage() {
        let c = Checkpoint {
            covers_below: 9,
            covers_offset: 4321,
            survivors: vec![3, 7],
            groups: vec![
                (
                    1,
                    GroupMeta {
                        range: Range { first: 5, len: 3 },
                        vote: Some((*b"v").into()),
                        committed: None,
                        kv: vec![((*b"k").into(), (*b"val").into())],
                    },
                ),
                (2, GroupMeta::default()),
            ],
        };
        let bytes = c.encode();
        assert_eq!(Checkpoint::decode(&bytes).unwrap(), c);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(Checkpoint::decode(&bad).is_err(), "flip at {i} passed");
        }
        for cut in 0..bytes.len() {
            assert!(Checkpoint::decode(&bytes[..cut]).is_err());
        }
    }
}
