//! Record framing and the multi-group batch body (the byte layout is specified once, in
//! docs/FORMAT.md).
//!
//! A record is a 16-byte header followed by a body. The CRC32C in the header covers the id of the
//! segment the record lives in, the rest of the header and the stored body, so a record copied
//! into (or left over in) another segment never passes. Decoding never trusts a length: every
//! length is checked against the bytes actually present before anything is sliced or allocated.

#![deny(clippy::indexing_slicing, clippy::cast_possible_truncation)]

use crate::options::MAX_RECORD_BYTES;

/// Bytes of a record header.
pub const RECORD_HEADER_LEN: usize = 16;
/// Header flag: the body is lz4 block-compressed.
pub const FLAG_LZ4: u8 = 1;
/// Header flag: the record is a sync marker (see [`encode_sync_marker`]), not a batch.
pub const FLAG_SYNC_MARKER: u8 = 2;
/// Magic bytes opening a sync marker's body.
pub const SYNC_MARKER_MAGIC: [u8; 8] = *b"MRWALSYN";
/// Bytes of a sync marker's body: the magic, `synced_to` and `prev_sealed_len`.
pub const SYNC_MARKER_BODY_LEN: usize = 24;
/// Bytes of a whole sync marker record.
pub const SYNC_MARKER_LEN: usize = RECORD_HEADER_LEN + SYNC_MARKER_BODY_LEN;

const OP_APPEND: u8 = 1;
const OP_TRUNCATE: u8 = 2;
const OP_PURGE: u8 = 3;
const OP_PUT: u8 = 4;
const OP_DELETE: u8 = 5;
const OP_VOTE: u8 = 6;
const OP_COMMITTED: u8 = 7;
const OP_REMOVE_GROUP: u8 = 8;

/// Why a record or body failed to decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the structure needs.
    Truncated,
    /// The CRC does not match.
    Checksum,
    /// A field holds a value the format does not allow.
    Invalid(&'static str),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("truncated"),
            DecodeError::Checksum => f.write_str("checksum mismatch"),
            DecodeError::Invalid(what) => write!(f, "invalid {what}"),
        }
    }
}

/// Appends `v` as LEB128.
pub fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push(low7(v) | 0x80);
        v >>= 7;
    }
    buf.push(low7(v));
}

/// The low 7 bits of `v`.
fn low7(v: u64) -> u8 {
    u8::try_from(v & 0x7f).unwrap_or(0)
}

/// Bytes `v` takes as LEB128.
pub fn varint_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// A cursor over a byte slice that never reads past its end.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Current position.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = *self.buf.get(self.pos).ok_or(DecodeError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    /// Reads a LEB128 u64, rejecting overlong or overflowing encodings.
    pub fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            let low = u64::from(b & 0x7f);
            if shift == 63 && low > 1 {
                return Err(DecodeError::Invalid("varint"));
            }
            v |= low << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Invalid("varint"))
    }

    /// Reads a varint length and then that many bytes.
    pub fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.varint()?;
        self.take(len)
    }

    /// Takes `len` bytes.
    pub fn take(&mut self, len: u64) -> Result<&'a [u8], DecodeError> {
        let end = usize::try_from(len)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .ok_or(DecodeError::Truncated)?;
        let bytes = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(bytes)
    }
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Stored body length.
    pub body_len: u32,
    /// CRC32C over segment id, header bytes 8..16 and the stored body.
    pub crc: u32,
    /// Flags ([`FLAG_LZ4`]).
    pub flags: u8,
    /// Length of the body once decompressed (equal to `body_len` when not compressed).
    pub raw_len: u32,
}

impl RecordHeader {
    /// Parses a header; `None` if the 16 bytes are all zero (the clean end of a segment).
    pub fn parse(b: &[u8; RECORD_HEADER_LEN]) -> Result<Option<RecordHeader>, DecodeError> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let h = RecordHeader {
            body_len: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            crc: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            flags: b[8],
            raw_len: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        };
        if h.body_len == 0 || u64::from(h.body_len) > MAX_RECORD_BYTES {
            return Err(DecodeError::Invalid("record length"));
        }
        if u64::from(h.raw_len) > MAX_RECORD_BYTES || h.raw_len == 0 {
            return Err(DecodeError::Invalid("record raw length"));
        }
        if !matches!(h.flags, 0 | FLAG_LZ4 | FLAG_SYNC_MARKER)
            || b[9] != 0
            || b[10] != 0
            || b[11] != 0
        {
            return Err(DecodeError::Invalid("record flags"));
        }
        if h.flags & FLAG_LZ4 == 0 && h.raw_len != h.body_len {
            return Err(DecodeError::Invalid("record raw length"));
        }
        if h.is_sync_marker() && h.body_len as usize != SYNC_MARKER_BODY_LEN {
            return Err(DecodeError::Invalid("sync marker length"));
        }
        Ok(Some(h))
    }

    /// Whether the record is a sync marker rather than a batch.
    pub fn is_sync_marker(&self) -> bool {
        self.flags == FLAG_SYNC_MARKER
    }

    /// Total bytes of the record, header included.
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.body_len)
    }
}

/// CRC of a record in segment `segment`: covers the segment id (8 bytes, little-endian), then
/// the record from byte 8 on (the rest of the header and the stored body).
pub fn record_crc(segment: u64, record: &[u8]) -> u32 {
    let seed = crc32c::crc32c(&segment.to_le_bytes());
    crc32c::crc32c_append(seed, record.get(8..).unwrap_or_default())
}

/// What a sync marker declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncMarker {
    /// Bytes `[SEGMENT_HEADER_LEN, synced_to)` of the marker's segment had been fdatasynced
    /// (successfully) before the marker was written.
    pub synced_to: u64,
    /// If not 0: the previous segment (id - 1) was sealed at exactly this length (cut to its
    /// last record and fdatasynced) before this segment took its first record.
    pub prev_sealed_len: u64,
}

/// A complete, sealed sync marker record for segment `segment` (see [`SyncMarker`]). Recovery
/// never cuts damage below an intact marker's `synced_to`, and checks the previous segment's
/// length against `prev_sealed_len`.
pub(crate) fn encode_sync_marker(segment: u64, marker: SyncMarker) -> Vec<u8> {
    let mut out = Vec::with_capacity(SYNC_MARKER_LEN);
    #[expect(clippy::cast_possible_truncation, reason = "a constant of 24 bytes")]
    let body_len = SYNC_MARKER_BODY_LEN as u32;
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&[FLAG_SYNC_MARKER, 0, 0, 0]);
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(&SYNC_MARKER_MAGIC);
    out.extend_from_slice(&marker.synced_to.to_le_bytes());
    out.extend_from_slice(&marker.prev_sealed_len.to_le_bytes());
    seal_record(&mut out, segment);
    out
}

/// Decodes a verified sync marker's body found at offset `at`; `synced_to` must lie between the
/// segment header and `at` (a marker cannot vouch for bytes written after it).
pub fn parse_sync_marker(body: &[u8], at: u64) -> Result<SyncMarker, DecodeError> {
    let mut r = Reader::new(body);
    if r.take(8)? != SYNC_MARKER_MAGIC {
        return Err(DecodeError::Invalid("sync marker magic"));
    }
    let mut u64_le = || -> Result<u64, DecodeError> {
        let b = r
            .take(8)?
            .first_chunk::<8>()
            .ok_or(DecodeError::Truncated)?;
        Ok(u64::from_le_bytes(*b))
    };
    let synced_to = u64_le()?;
    let prev_sealed_len = u64_le()?;
    if synced_to < crate::segment::SEGMENT_HEADER_LEN || synced_to > at {
        return Err(DecodeError::Invalid("sync marker offset"));
    }
    if prev_sealed_len != 0 && prev_sealed_len < crate::segment::SEGMENT_HEADER_LEN {
        return Err(DecodeError::Invalid("sync marker sealed length"));
    }
    Ok(SyncMarker {
        synced_to,
        prev_sealed_len,
    })
}

/// Checks a whole record (header + stored body) read from segment `segment` and returns its raw
/// (decompressed) body.
pub fn verify_record<'a>(
    segment: u64,
    header: &RecordHeader,
    record: &'a [u8],
) -> Result<std::borrow::Cow<'a, [u8]>, DecodeError> {
    if record.len() as u64 != header.record_len() {
        return Err(DecodeError::Truncated);
    }
    if record_crc(segment, record) != header.crc {
        return Err(DecodeError::Checksum);
    }
    let body = record
        .get(RECORD_HEADER_LEN..)
        .ok_or(DecodeError::Truncated)?;
    if header.flags & FLAG_LZ4 != 0 {
        // `raw_len` was checked against the largest record (1 GiB) by `RecordHeader::parse`.
        let raw_len = usize::try_from(header.raw_len)
            .map_err(|_| DecodeError::Invalid("record raw length"))?;
        let raw = lz4_flex::block::decompress(body, raw_len)
            .map_err(|_| DecodeError::Invalid("lz4 block"))?;
        if raw.len() != raw_len {
            return Err(DecodeError::Invalid("lz4 block length"));
        }
        Ok(std::borrow::Cow::Owned(raw))
    } else {
        Ok(std::borrow::Cow::Borrowed(body))
    }
}

/// Where an entry's payload sits inside a record's raw body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntrySpan {
    /// Offset in the raw body.
    pub off: u32,
    /// Payload length.
    pub len: u32,
}

/// One operation of a batch: the one operation type of the crate. Decoding yields
/// `Op<&[u8]>` borrowing the record's body; replay keeps `Op<Box<[u8]>>`
/// ([`Op::into_owned`]); both are applied to the index by `index::apply_op`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<B> {
    /// Entries `first..first + spans.len()` of `group`.
    Append {
        /// Group id.
        group: u64,
        /// Index of the first entry.
        first: u64,
        /// Where the entries' payload positions are in the span list the decoder filled.
        spans: std::ops::Range<usize>,
    },
    /// Remove entries `index..`.
    Truncate {
        /// Group id.
        group: u64,
        /// First index removed.
        index: u64,
    },
    /// Remove entries `..=index`.
    Purge {
        /// Group id.
        group: u64,
        /// Last index removed.
        index: u64,
    },
    /// Set a key.
    Put {
        /// Group id.
        group: u64,
        /// Key.
        key: B,
        /// Value.
        value: B,
    },
    /// Delete a key.
    Delete {
        /// Group id.
        group: u64,
        /// Key.
        key: B,
    },
    /// Set the vote.
    Vote {
        /// Group id.
        group: u64,
        /// Opaque vote bytes.
        value: B,
    },
    /// Set the committed marker.
    Committed {
        /// Group id.
        group: u64,
        /// Opaque committed bytes.
        value: B,
    },
    /// Drop the whole group.
    RemoveGroup {
        /// Group id.
        group: u64,
    },
}

impl Op<Box<[u8]>> {
    /// The same op, borrowing its bytes.
    pub(crate) fn borrowed(&self) -> Op<&[u8]> {
        match self {
            Op::Append {
                group,
                first,
                spans,
            } => Op::Append {
                group: *group,
                first: *first,
                spans: spans.clone(),
            },
            Op::Truncate { group, index } => Op::Truncate {
                group: *group,
                index: *index,
            },
            Op::Purge { group, index } => Op::Purge {
                group: *group,
                index: *index,
            },
            Op::Put { group, key, value } => Op::Put {
                group: *group,
                key,
                value,
            },
            Op::Delete { group, key } => Op::Delete { group: *group, key },
            Op::Vote { group, value } => Op::Vote {
                group: *group,
                value,
            },
            Op::Committed { group, value } => Op::Committed {
                group: *group,
                value,
            },
            Op::RemoveGroup { group } => Op::RemoveGroup { group: *group },
        }
    }
}

impl<B> Op<B> {
    /// The group the op acts on.
    pub fn group(&self) -> u64 {
        match *self {
            Op::Append { group, .. }
            | Op::Truncate { group, .. }
            | Op::Purge { group, .. }
            | Op::Put { group, .. }
            | Op::Delete { group, .. }
            | Op::Vote { group, .. }
            | Op::Committed { group, .. }
            | Op::RemoveGroup { group } => group,
        }
    }
}

impl Op<&[u8]> {
    /// The op with its byte fields copied out of the record body.
    pub fn into_owned(self) -> Op<Box<[u8]>> {
        match self {
            Op::Append {
                group,
                first,
                spans,
            } => Op::Append {
                group,
                first,
                spans,
            },
            Op::Truncate { group, index } => Op::Truncate { group, index },
            Op::Purge { group, index } => Op::Purge { group, index },
            Op::Put { group, key, value } => Op::Put {
                group,
                key: key.into(),
                value: value.into(),
            },
            Op::Delete { group, key } => Op::Delete {
                group,
                key: key.into(),
            },
            Op::Vote { group, value } => Op::Vote {
                group,
                value: value.into(),
            },
            Op::Committed { group, value } => Op::Committed {
                group,
                value: value.into(),
            },
            Op::RemoveGroup { group } => Op::RemoveGroup { group },
        }
    }
}

/// A decoded body: its ops (borrowing the body) and the entry spans their appends point into.
pub type Decoded<'a> = (Vec<Op<&'a [u8]>>, Vec<EntrySpan>);

/// Decodes a raw body into its operations. Entry spans are checked to lie inside the payload
/// area, in order and without overlap.
pub fn decode_body(raw: &[u8]) -> Result<Decoded<'_>, DecodeError> {
    let mut ops = Vec::new();
    let mut spans = Vec::new();
    decode_body_into(raw, &mut spans, |op| ops.push(op))?;
    Ok((ops, spans))
}

/// Decodes a raw body, appending entry spans to `spans` (an append op names its spans by their
/// positions there) and handing each op to `sink`. On error, ops already handed over belong to
/// a bad body: the caller must drop them, and `spans` is restored to its length on entry.
pub fn decode_body_into<'a>(
    raw: &'a [u8],
    spans: &mut Vec<EntrySpan>,
    sink: impl FnMut(Op<&'a [u8]>),
) -> Result<(), DecodeError> {
    let start = spans.len();
    let r = decode_inner(raw, spans, sink);
    if r.is_err() {
        spans.truncate(start);
    }
    r
}

fn decode_inner<'a>(
    raw: &'a [u8],
    spans: &mut Vec<EntrySpan>,
    mut sink: impl FnMut(Op<&'a [u8]>),
) -> Result<(), DecodeError> {
    if raw.len() > u32::MAX as usize {
        return Err(DecodeError::Invalid("body length"));
    }
    let spans_start = spans.len();
    let mut r = Reader::new(raw);
    let count = r.varint()?;
    // Every op takes at least two bytes.
    if count > r.remaining() as u64 / 2 {
        return Err(DecodeError::Invalid("op count"));
    }
    let mut payload_total: u64 = 0;
    for _ in 0..count {
        let tag = r.u8()?;
        let group = r.varint()?;
        let op = match tag {
            OP_APPEND => {
                let first = r.varint()?;
                let n = r.varint()?;
                if n == 0 || n > r.remaining() as u64 {
                    return Err(DecodeError::Invalid("entry count"));
                }
                if first.checked_add(n - 1).is_none() {
                    return Err(DecodeError::Invalid("entry index"));
                }
                let at = spans.len();
                // `n` is at most the bytes left in the body (checked above).
                spans.reserve(usize::try_from(n).map_err(|_| DecodeError::Invalid("entry count"))?);
                for _ in 0..n {
                    let len = r.varint()?;
                    // Offsets are fixed up below, once the payload area's start is known.
                    let (Ok(off), Ok(len32)) = (u32::try_from(payload_total), u32::try_from(len))
                    else {
                        return Err(DecodeError::Invalid("entry length"));
                    };
                    spans.push(EntrySpan { off, len: len32 });
                    payload_total += len;
                    if payload_total > raw.len() as u64 {
                        return Err(DecodeError::Invalid("entry length"));
                    }
                }
                Op::Append {
                    group,
                    first,
                    spans: at..spans.len(),
                }
            }
            OP_TRUNCATE => Op::Truncate {
                group,
                index: r.varint()?,
            },
            OP_PURGE => Op::Purge {
                group,
                index: r.varint()?,
            },
            OP_PUT => {
                let key = r.bytes()?;
                let value = r.bytes()?;
                Op::Put { group, key, value }
            }
            OP_DELETE => Op::Delete {
                group,
                key: r.bytes()?,
            },
            OP_VOTE => Op::Vote {
                group,
                value: r.bytes()?,
            },
            OP_COMMITTED => Op::Committed {
                group,
                value: r.bytes()?,
            },
            OP_REMOVE_GROUP => Op::RemoveGroup { group },
            _ => return Err(DecodeError::Invalid("op tag")),
        };
        sink(op);
    }
    let base = r.pos() as u64;
    if base + payload_total != raw.len() as u64 {
        return Err(DecodeError::Invalid("payload area length"));
    }
    // The body is at most 4 GiB (checked on entry), so every offset fits a u32.
    let base = u32::try_from(base).map_err(|_| DecodeError::Invalid("body length"))?;
    for s in spans.iter_mut().skip(spans_start) {
        s.off = s
            .off
            .checked_add(base)
            .ok_or(DecodeError::Invalid("entry offset"))?;
    }
    Ok(())
}

/// Builds the ops section and payload area of a batch body.
#[derive(Debug, Default, Clone)]
pub(crate) struct BodyBuilder {
    pub(crate) op_count: u64,
    pub(crate) ops: Vec<u8>,
    pub(crate) payload: Vec<u8>,
}

/// An entry larger than the largest record: its index and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooLargeEntry {
    pub(crate) index: u64,
    pub(crate) bytes: u64,
}

impl BodyBuilder {
    /// Appends entries `first..` of `group`: their bytes to the payload area, and one
    /// [`EntrySpan`] per entry to `spans` (offsets from the start of the payload area). An
    /// entry too large for a record refuses the whole append and changes nothing.
    pub(crate) fn append<E: AsRef<[u8]>>(
        &mut self,
        group: u64,
        first: u64,
        entries: impl IntoIterator<Item = E>,
        spans: &mut Vec<EntrySpan>,
    ) -> Result<(), TooLargeEntry> {
        let start = spans.len();
        let payload_start = self.payload.len();
        for (i, e) in entries.into_iter().enumerate() {
            let e = e.as_ref();
            // The payload area never exceeds a record (the write path refuses larger batches),
            // so offsets fit u32 for every batch that can be written.
            let (Some(len), Ok(off)) = (
                u32::try_from(e.len())
                    .ok()
                    .filter(|&l| u64::from(l) <= MAX_RECORD_BYTES),
                u32::try_from(self.payload.len()),
            ) else {
                self.payload.truncate(payload_start);
                spans.truncate(start);
                return Err(TooLargeEntry {
                    index: first.saturating_add(i as u64),
                    bytes: e.len() as u64,
                });
            };
            spans.push(EntrySpan { off, len });
            self.payload.extend_from_slice(e);
        }
        let added = spans.get(start..).unwrap_or_default();
        if added.is_empty() {
            return Ok(());
        }
        self.op_count += 1;
        self.ops.push(OP_APPEND);
        put_varint(&mut self.ops, group);
        put_varint(&mut self.ops, first);
        put_varint(&mut self.ops, added.len() as u64);
        for s in added {
            put_varint(&mut self.ops, u64::from(s.len));
        }
        Ok(())
    }

    pub(crate) fn index_op(&mut self, tag: u8, group: u64, index: u64) {
        self.op_count += 1;
        self.ops.push(tag);
        put_varint(&mut self.ops, group);
        put_varint(&mut self.ops, index);
    }

    pub(crate) fn bytes_op(&mut self, tag: u8, group: u64, fields: &[&[u8]]) {
        self.op_count += 1;
        self.ops.push(tag);
        put_varint(&mut self.ops, group);
        for f in fields {
            put_varint(&mut self.ops, f.len() as u64);
            self.ops.extend_from_slice(f);
        }
    }

    pub(crate) fn remove_group(&mut self, group: u64) {
        self.op_count += 1;
        self.ops.push(OP_REMOVE_GROUP);
        put_varint(&mut self.ops, group);
    }

    /// Offset of the payload area in the raw body.
    pub(crate) fn payload_base(&self) -> usize {
        varint_len(self.op_count) + self.ops.len()
    }

    pub(crate) fn raw_len(&self) -> usize {
        self.payload_base() + self.payload.len()
    }

    /// Encodes the record: header (CRC left for [`seal_record`]) and body, compressed when the
    /// raw body is at least `threshold` bytes and lz4 saves at least an eighth. Returns the
    /// record bytes.
    pub(crate) fn encode(&self, threshold: usize) -> Vec<u8> {
        let raw_len = self.raw_len();
        let mut out = Vec::with_capacity(RECORD_HEADER_LEN + raw_len);
        out.resize(RECORD_HEADER_LEN, 0);
        let mut flags = 0u8;
        if raw_len >= threshold {
            let mut raw = Vec::with_capacity(raw_len);
            put_varint(&mut raw, self.op_count);
            raw.extend_from_slice(&self.ops);
            raw.extend_from_slice(&self.payload);
            let compressed = lz4_flex::block::compress(&raw);
            if compressed.len() < raw_len - raw_len / 8 {
                out.extend_from_slice(&compressed);
                flags = FLAG_LZ4;
            } else {
                out.extend_from_slice(&raw);
            }
        } else {
            put_varint(&mut out, self.op_count);
            out.extend_from_slice(&self.ops);
            out.extend_from_slice(&self.payload);
        }
        // The write path refuses a body above the largest record (1 GiB) before encoding it;
        // a length beyond u32 here would be a bug, and is written as 0, which never decodes.
        let body_len = u32::try_from(out.len() - RECORD_HEADER_LEN).unwrap_or(0);
        let raw_len = u32::try_from(raw_len).unwrap_or(0);
        let mut header = [0u8; RECORD_HEADER_LEN];
        header[0..4].copy_from_slice(&body_len.to_le_bytes());
        header[8] = flags;
        header[12..16].copy_from_slice(&raw_len.to_le_bytes());
        for (o, h) in out.iter_mut().zip(header) {
            *o = h;
        }
        out
    }
}

/// Op tags used by the batch builder.
pub(crate) mod tag {
    pub(crate) const TRUNCATE: u8 = super::OP_TRUNCATE;
    pub(crate) const PURGE: u8 = super::OP_PURGE;
    pub(crate) const PUT: u8 = super::OP_PUT;
    pub(crate) const DELETE: u8 = super::OP_DELETE;
    pub(crate) const VOTE: u8 = super::OP_VOTE;
    pub(crate) const COMMITTED: u8 = super::OP_COMMITTED;
}

/// Writes a record's CRC (see [`record_crc`]) into its header.
pub(crate) fn set_crc(record: &mut [u8], crc: u32) {
    if let Some(field) = record.get_mut(4..8) {
        field.copy_from_slice(&crc.to_le_bytes());
    }
}

/// Computes and writes the CRC of a record that goes into segment `segment`.
pub(crate) fn seal_record(record: &mut [u8], segment: u64) {
    let crc = record_crc(segment, record);
    set_crc(record, crc);
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    reason = "tests index known fixtures"
)]
mod tests {
    use super::*;

    fn roundtrip(threshold: usize) {
        let mut b = BodyBuilder::default();
        let mut lens: Vec<EntrySpan> = Vec::new();
        b.append(
            7,
            10,
            [b"hello".as_slice(), b"world!".as_slice()],
            &mut lens,
        )
        .unwrap();
        b.index_op(tag::PURGE, 7, 3);
        b.bytes_op(tag::PUT, 9, &[b"k", b"v"]);
        b.remove_group(11);
        b.append(8, 1, [vec![42u8; 20000]], &mut lens).unwrap();
        let mut rec = b.encode(threshold);
        seal_record(&mut rec, 5);
        let mut h = [0u8; RECORD_HEADER_LEN];
        h.copy_from_slice(&rec[..RECORD_HEADER_LEN]);
        let header = RecordHeader::parse(&h).unwrap().unwrap();
        assert_eq!(header.flags & FLAG_LZ4 != 0, threshold < 1000);
        let raw = verify_record(5, &header, &rec).unwrap();
        let (ops, all_spans) = decode_body(&raw).unwrap();
        assert_eq!(ops.len(), 5);
        match &ops[0] {
            Op::Append {
                group: 7,
                first: 10,
                spans,
            } => {
                let s = all_spans[spans.clone()][1];
                assert_eq!(&raw[s.off as usize..(s.off + s.len) as usize], b"world!");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            ops[2],
            Op::Put {
                group: 9,
                key: &b"k"[..],
                value: &b"v"[..]
            }
        );
        // The same bytes in another segment fail.
        assert_eq!(verify_record(6, &header, &rec), Err(DecodeError::Checksum));
    }

    #[test]
    fn record_roundtrip_raw_and_lz4() {
        roundtrip(usize::MAX);
        roundtrip(100);
    }

    #[test]
    fn varints() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v));
            assert_eq!(Reader::new(&b).varint().unwrap(), v);
        }
        assert!(Reader::new(&[0xff; 11]).varint().is_err());
        assert!(Reader::new(&[0x80]).varint().is_err());
    }

    #[test]
    fn garbage_bodies_never_panic() {
        let mut seed = 0x1234_5678_u64;
        for len in 0..400 {
            let mut buf = vec![0u8; len];
            for b in buf.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            let _ = decode_body(&buf);
        }
    }
}
