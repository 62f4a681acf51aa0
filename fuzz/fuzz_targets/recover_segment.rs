//! The record decoder, through recovery: a valid segment header followed by the fuzzer's bytes.
//! The first byte picks the recovery mode.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let mut segment = common::header();
    segment.extend_from_slice(body);
    common::recover(
        &[("0000000000000001.wal".to_string(), segment)],
        common::MODES[usize::from(mode) % 3],
    );
});
