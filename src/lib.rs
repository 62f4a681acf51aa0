#![doc = include_str!("../README.md")]
#![warn(missing_docs, clippy::missing_errors_doc)]
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod batch;
mod cache;
mod checkpoint;
mod codec;
mod commit;
mod durable;
mod engine;
mod error;
pub mod fs;
mod gc;
mod index;
pub mod inspect;
mod options;
mod pipeline;
mod pool;
#[cfg(feature = "openraft")]
#[cfg_attr(docsrs, doc(cfg(feature = "openraft")))]
pub mod raft;
#[cfg(feature = "openraft09")]
#[cfg_attr(docsrs, doc(cfg(feature = "openraft09")))]
pub mod raft09;
#[cfg(any(feature = "openraft", feature = "openraft09"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "openraft", feature = "openraft09"))))]
pub mod raft_shared;
mod recovery;
mod segment;
mod telemetry;
mod verified;

pub use batch::WriteBatch;
/// The shared byte buffer [`Engine::entry_bytes`] and [`Engine::entries_bytes`] return.
pub use bytes::Bytes;
pub use durable::DurableWrite;
pub use engine::{Engine, Stats};
pub use error::{Error, Result};
pub use gc::{GcHolder, GcReport};
pub use options::{
    Options, RecoveryMode, DEFAULT_CACHE_BYTES, MAX_RECORD_BYTES, MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE,
};
pub use recovery::{RecoveryReport, SkippedRange, TailCut};

/// Entry points for fuzzers and property tests: decoding arbitrary bytes must never panic.
#[doc(hidden)]
pub mod fuzzing {
    /// Scans the records of segment `id` from its whole contents; returns the end of the last
    /// good record and the number of good records.
    pub fn scan_segment(id: u64, data: &[u8], tolerate_any: bool) -> (u64, usize) {
        let (end, n, _, _) = crate::recovery::scan_records(id, data, tolerate_any);
        (end, n)
    }

    /// Decodes a raw batch body; returns the number of operations.
    pub fn decode_body(raw: &[u8]) -> Option<usize> {
        crate::codec::decode_body(raw)
            .ok()
            .map(|(ops, _)| ops.len())
    }
}
