//! Shared by the fuzz targets: plant files in a fresh directory, recover, read everything.
//! The seeded proptest twin of these targets is tests/it/prop_recovery.rs.

use std::path::Path;

use multiraft_wal::{Engine, Options, RecoveryMode};

pub const MODES: [RecoveryMode; 3] = [
    RecoveryMode::TolerateTail,
    RecoveryMode::Strict,
    RecoveryMode::TolerateAny,
];

/// A valid header of segment 1, from a segment the engine itself created.
pub fn header() -> Vec<u8> {
    static HEADER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    HEADER
        .get_or_init(|| {
            let tmp = tempfile::tempdir().unwrap();
            let engine = Engine::open(tmp.path(), Options::default().segment_size(4096)).unwrap();
            drop(engine);
            let bytes = std::fs::read(tmp.path().join("0000000000000001.wal")).unwrap();
            bytes[..32].to_vec()
        })
        .clone()
}

fn scratch_root() -> &'static Path {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        Path::new("/tmp")
    }
}

/// Writes `files` into a fresh directory, opens it in `mode` and reads every group. Panics (the
/// fuzzer's signal) only if the engine does.
pub fn recover(files: &[(String, Vec<u8>)], mode: RecoveryMode) {
    let tmp = tempfile::tempdir_in(scratch_root()).unwrap();
    for (name, bytes) in files {
        std::fs::write(tmp.path().join(name), bytes).unwrap();
    }
    let options = Options::default()
        .segment_size(4096)
        .recovery_threads(2)
        .recovery_mode(mode);
    let Ok(engine) = Engine::open(tmp.path(), options) else {
        return;
    };
    for g in engine.groups() {
        if let (Some(first), Some(last)) = (engine.first_index(g), engine.last_index(g)) {
            assert!(first <= last, "group {g}: first {first} > last {last}");
            let end = last.min(first.saturating_add(10_000)).saturating_add(1);
            let _ = engine.entries(g, first..end, 1 << 24);
        }
        let _ = (engine.vote(g), engine.committed(g));
    }
}
