//! Recovery from an arbitrary directory image. Input: a mode byte, then files, each a name byte
//! (picks one of the engine's names), a flag byte (bit 0: starts with a valid segment header) and a
//! two-byte little-endian length followed by that many bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

const NAMES: [&str; 7] = [
    "0000000000000001.wal",
    "0000000000000002.wal",
    "0000000000000003.wal",
    "CHECKPOINT",
    "CHECKPOINT.tmp",
    "0000000000000002.wal.tmp",
    "SEAL",
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let mut files = Vec::new();
    while rest.len() >= 4 && files.len() < 8 {
        let name = NAMES[usize::from(rest[0]) % NAMES.len()];
        let with_header = rest[1] & 1 == 1 && name.ends_with(".wal");
        let len = usize::from(u16::from_le_bytes([rest[2], rest[3]])).min(rest.len() - 4);
        let mut bytes = if with_header {
            common::header()
        } else {
            Vec::new()
        };
        bytes.extend_from_slice(&rest[4..4 + len]);
        files.push((name.to_string(), bytes));
        rest = &rest[4 + len..];
    }
    common::recover(&files, common::MODES[usize::from(mode) % 3]);
});
