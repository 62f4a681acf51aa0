//! Verification for the read-only inspection (`crate::inspect`): every record of every given
//! segment checked with the scan recovery uses, and each damaged range classified against the
//! same durable points recovery computes.
//!
//! Invariants:
//! - Reads only: segments are scanned through the file system it is given (the inspection
//!   passes one that cannot write), nothing is changed.
//! - The classification is recovery's own: a damaged range starting at offset 0 or below the
//!   segment's proven-durable point ([`super::durable_points`]) is damage to durable data; one
//!   at or past it is a torn tail. Recovery's sealed-length rule
//!   ([`super::check_sealed_lengths`]) is applied too.
//! - Every damaged range is listed, not only the first: a damaged segment is scanned a second
//!   time as [`RecoveryMode::TolerateAny`] would, which skips each bad record and goes on.
//! - No input makes it panic; no length read from disk sizes an allocation (the scan's rule).

use std::path::Path;

use crate::error::{Error, Result};
use crate::fs::FileSystem;
use crate::options::{Options, RecoveryMode};
use crate::segment::SEGMENT_HEADER_LEN;

use super::scan::{scan_all, SegmentScan};
use super::seal::Seal;
use super::{check_sealed_lengths, durable_points, raise_to_checkpoint};

/// One damaged range of a segment.
#[derive(Debug, Clone)]
pub(crate) struct BadRange {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) reason: String,
    /// Past the segment's last proven-durable point (a torn tail) rather than inside data that
    /// was proven durable.
    pub(crate) torn: bool,
}

/// What verifying one segment found.
#[derive(Debug, Clone)]
pub(crate) struct SegmentCheck {
    pub(crate) id: u64,
    pub(crate) file_len: u64,
    /// End of the last good record before the first damage (or of all records).
    pub(crate) valid_end: u64,
    /// Good batch records (in a damaged segment: those before the first damage).
    pub(crate) records: u64,
    /// Intact sync markers read in order.
    pub(crate) markers: u64,
    /// Up to where the segment is proven durable (`u64::MAX`: all of it).
    pub(crate) durable_to: u64,
    pub(crate) bad: Vec<BadRange>,
    /// A scan that could not run (an I/O error, an implausible size): the segment is unchecked.
    pub(crate) unreadable: Option<String>,
}

/// Scans `ids` (in log order, as recovery would: the live segments) and classifies every damaged
/// range. `seal` is the seal recovery would use, `covered` the checkpoint's covered position.
/// Returns one entry per id, and the error of
/// recovery's sealed-length rule, if it fails.
pub(crate) fn verify_segments(
    fs: &dyn FileSystem,
    dir: &Path,
    ids: &[u64],
    seal: Option<Seal>,
    covered: Option<(u64, u64)>,
    opts: &Options,
) -> (Vec<SegmentCheck>, Option<Error>) {
    let strict = opts.clone().recovery_mode(RecoveryMode::TolerateTail);
    // All at once (parallel); if one segment cannot be scanned, one at a time to find it.
    let scans: Vec<std::result::Result<SegmentScan, Error>> = match scan_all(fs, dir, ids, &strict)
    {
        Ok(scans) => scans.into_iter().map(Ok).collect(),
        Err(_) => ids
            .iter()
            .map(|&id| {
                scan_all(fs, dir, &[id], &strict).and_then(|mut v| {
                    v.pop()
                        .ok_or_else(|| Error::corruption(id, 0, "segment was not scanned"))
                })
            })
            .collect(),
    };
    let mut ok = Vec::with_capacity(ids.len());
    let mut failed = Vec::with_capacity(ids.len());
    for r in scans {
        match r {
            Ok(s) => {
                ok.push(s);
                failed.push(None);
            }
            Err(e) => failed.push(Some(e.to_string())),
        }
    }
    let mut points = durable_points(&ok, seal);
    raise_to_checkpoint(&ok, &mut points, covered);
    let sealed_rule = check_sealed_lengths(&ok, &points).err();
    let mut good = ok.into_iter().zip(points);
    let mut out = Vec::with_capacity(ids.len());
    for (failure, &id) in failed.into_iter().zip(ids) {
        let next = match failure {
            None => good.next(),
            Some(_) => None,
        };
        let Some((s, point)) = next else {
            out.push(SegmentCheck {
                id,
                file_len: 0,
                valid_end: 0,
                records: 0,
                markers: 0,
                durable_to: 0,
                bad: Vec::new(),
                unreadable: Some(failure.unwrap_or_else(|| "not scanned".into())),
            });
            continue;
        };
        let mut check = SegmentCheck {
            id,
            file_len: s.file_len,
            valid_end: s.parts.valid_end,
            records: s.parts.records.recs.len() as u64,
            markers: s.parts.records.markers as u64,
            durable_to: point,
            bad: Vec::new(),
            unreadable: None,
        };
        let torn = |start: u64| start != 0 && start >= point;
        if let Some(d) = &s.parts.damage {
            // Every damaged range, as TolerateAny would skip them.
            let any = opts.clone().recovery_mode(RecoveryMode::TolerateAny);
            let ranges = scan_all(fs, dir, &[id], &any)
                .ok()
                .and_then(|mut v| v.pop())
                .map(|a| a.parts.skipped)
                .unwrap_or_default();
            // The first range is the damage the strict scan stopped at (a whole bad header
            // is skipped from 0): keep the strict scan's offset and reason for it.
            check.bad.push(BadRange {
                start: d.offset,
                end: ranges
                    .first()
                    .filter(|r| r.start == d.offset || d.offset == 0)
                    .map_or(s.file_len, |r| r.end),
                reason: d.reason.clone(),
                torn: torn(d.offset),
            });
            for r in ranges.iter().filter(|r| r.start > d.offset) {
                check.bad.push(BadRange {
                    start: r.start,
                    end: r.end,
                    reason: r.reason.clone(),
                    torn: torn(r.start),
                });
            }
        }
        out.push(check);
    }
    (out, sealed_rule)
}

/// Bytes after the end a valid seal names, in the segment it names: a sealed segment never
/// grows (the engine writes into later segments), so they are not a torn write.
pub(crate) fn past_seal(checks: &[SegmentCheck], seal: Option<Seal>) -> Option<(u64, u64, u64)> {
    let seal = seal?;
    let c = checks.iter().find(|c| c.id == seal.segment)?;
    (c.unreadable.is_none()
        && c.bad.is_empty()
        && c.file_len > seal.len
        && seal.len > SEGMENT_HEADER_LEN)
        .then(|| (c.id, seal.len, c.file_len - seal.len))
}

/// The seal recovery would read, or why it is ignored.
pub(crate) fn load_seal(
    fs: &dyn FileSystem,
    dir: &Path,
    names: &[String],
) -> Result<std::result::Result<Option<Seal>, String>> {
    super::seal::load(fs, dir, names)
}
