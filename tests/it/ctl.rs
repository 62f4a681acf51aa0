//! `mrwal-ctl` and `multiraft_wal::inspect` (issue 13 item 1): the read-only subcommands never
//! change a directory (every file hashed before and after, on clean, killed, torn and corrupt
//! inputs); `check` passes clean directories and finds every single fault of the corruption
//! sweep, naming the damaged segment; `repair --dry-run` changes nothing and `repair` makes a
//! normal open succeed and `check` pass; a mistyped path creates nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use multiraft_wal::inspect::{self, Inspection, ProblemKind, RepairPlan, ScanProgress};
use multiraft_wal::{Engine, Options, RecoveryMode, WriteBatch};

use crate::corruption::{read_image, single_faults, write_image, Image};

const BIN: &str = env!("CARGO_BIN_EXE_mrwal-ctl");

fn options() -> Options {
    Options::default()
        .segment_size(4096)
        .compression_threshold(256)
        .recovery_threads(2)
        .prefill_segments(false)
        .gc_rewrite_max_entries(0)
}

/// A directory written by the engine: several segments, a checkpoint (after a purge and a GC),
/// votes, keys; closed cleanly. Returns (clean image, image as a process kill leaves it).
fn fixture() -> (Image, Image) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let engine = Engine::open(&dir, options()).unwrap();
    let mut next = [1u64; 4];
    let write = |engine: &Engine, next: &mut [u64; 4], round: u64| {
        let mut b = WriteBatch::new();
        for g in 1..=3u64 {
            let i = &mut next[g as usize];
            let e: Vec<Vec<u8>> = (0..3)
                .map(|k| {
                    format!(
                        "group {g} entry {} round {round} {}",
                        *i + k,
                        "x".repeat(20)
                    )
                    .into_bytes()
                })
                .collect();
            b.append(g, *i, &e);
            *i += 3;
        }
        b.put(1, format!("key{round}").as_bytes(), b"value");
        b.set_vote(2, format!("vote {round}").as_bytes());
        b.set_committed(3, format!("committed {round}").as_bytes());
        engine.write(b).unwrap();
    };
    for round in 0..40 {
        write(&engine, &mut next, round);
    }
    let mut b = WriteBatch::new();
    for g in 1..=3u64 {
        b.purge_to(g, next[g as usize] - 10);
    }
    engine.write(b).unwrap();
    engine.gc().unwrap();
    for round in 40..50 {
        write(&engine, &mut next, round);
    }
    let unclean = read_image(&dir);
    drop(engine);
    let clean = read_image(&dir);
    assert!(clean.contains_key("CHECKPOINT") && clean.contains_key("SEAL"));
    (clean, unclean)
}

fn seg_name(id: u64) -> String {
    format!("{id:016x}.wal")
}

fn segment_id(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".wal")?;
    (stem.len() == 16).then(|| u64::from_str_radix(stem, 16).ok())?
}

/// Every entry of a directory (files and directories, LOCK included): name, kind, size,
/// contents.
fn snapshot(dir: &Path) -> BTreeMap<String, (bool, u64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let meta = e.metadata().unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let bytes = if meta.is_file() {
            std::fs::read(e.path()).unwrap()
        } else {
            Vec::new()
        };
        out.insert(name, (meta.is_dir(), meta.len(), bytes));
    }
    out
}

fn ctl(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The end of a segment image's records: walked record by record from byte 32 to the first
/// zero record header (a recycled segment holds stale bytes after it, so the last non-zero byte
/// is not the end).
fn data_end(b: &[u8]) -> usize {
    let mut pos = 32;
    while let Some(h) = b.get(pos..pos + 16) {
        if h.iter().all(|&x| x == 0) {
            break;
        }
        let body = u32::from_le_bytes(h[..4].try_into().unwrap()) as usize;
        if pos + 16 + body > b.len() {
            break;
        }
        pos += 16 + body;
    }
    pos
}

/// The last record-holding segment of an image and its size.
fn last_data_segment(img: &Image) -> (String, usize) {
    img.iter()
        .filter(|(n, b)| segment_id(n).is_some() && data_end(b) > 32)
        .map(|(n, b)| (n.clone(), b.len()))
        .next_back()
        .unwrap()
}

/// Inputs: (name, image, whether `check` must pass).
fn inputs(clean: &Image, unclean: &Image) -> Vec<(&'static str, Image, bool)> {
    let mut torn = unclean.clone();
    let (name, len) = last_data_segment(unclean);
    // The killed image's active segment is preallocated: cut inside its last record instead,
    // by finding the end of its data.
    let data_end = data_end(&torn[&name]);
    torn.get_mut(&name).unwrap().truncate(data_end - 7);
    assert!(data_end <= len);
    let mut corrupt = clean.clone();
    let first = clean
        .keys()
        .find(|n| segment_id(n).is_some())
        .unwrap()
        .clone();
    corrupt.get_mut(&first).unwrap()[100] ^= 0x10;
    let mut garbage = clean.clone();
    let (last, _) = last_data_segment(clean);
    garbage
        .get_mut(&last)
        .unwrap()
        .extend_from_slice(b"not a record");
    let mut leftovers = clean.clone();
    leftovers.insert("CHECKPOINT.tmp".into(), vec![0x55; 64]);
    leftovers.insert(format!("{}.tmp", seg_name(99)), vec![0xAB; 100]);
    vec![
        ("clean", clean.clone(), true),
        ("killed", unclean.clone(), true),
        ("leftover temp files", leftovers, true),
        ("torn tail", torn, false),
        ("garbage after the sealed end", garbage, false),
        ("corrupt durable record", corrupt, false),
    ]
}

#[test]
fn ctl_read_only_subcommands_never_change_a_directory() {
    let (clean, unclean) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("case");
    let commands: &[&[&str]] = &[
        &["stat"],
        &["groups"],
        &["dump", "--group", "1", "--count", "5"],
        &["dump", "--group", "3", "--from", "1", "--count", "1000"],
        &["check"],
        &["repair", "--dry-run"],
    ];
    for (what, img, clean_expected) in inputs(&clean, &unclean) {
        write_image(&dir, &img);
        // A LOCK file as an engine leaves it: a shared lock on it is taken, nothing else.
        std::fs::write(dir.join("LOCK"), b"").unwrap();
        for cmd in commands {
            for json in [false, true] {
                let mut args = cmd.to_vec();
                if json {
                    args.push("--json");
                }
                let before = snapshot(&dir);
                let (code, out, err) = ctl(&dir, &args);
                let after = snapshot(&dir);
                assert!(before == after, "{what}: `{args:?}` changed the directory");
                let ctx = format!("{what}: {args:?} exited {code}: {out}{err}");
                match cmd[0] {
                    "check" => assert_eq!(code, if clean_expected { 0 } else { 1 }, "{ctx}"),
                    "repair" => assert!(code == 0 || code == 1, "{ctx}"),
                    // A directory a normal open refuses has no groups to list or dump.
                    "groups" | "dump" if what == "corrupt durable record" => {
                        assert_eq!(code, 2, "{ctx}")
                    }
                    _ => assert_eq!(code, 0, "{ctx}"),
                }
                if json && code != 2 {
                    let v: serde_json::Value = serde_json::from_str(&out)
                        .unwrap_or_else(|e| panic!("{ctx}: not JSON: {e}"));
                    if cmd[0] == "check" {
                        assert_eq!(v["clean"], clean_expected, "{ctx}");
                    }
                }
            }
        }
    }
}

/// Whether a "truncate NAME at N" fault cuts into the 32-byte segment header.
fn truncated_into_header(ctx: &str) -> bool {
    ctx.rsplit(' ')
        .next()
        .and_then(|n| n.parse::<u64>().ok())
        .is_some_and(|at| at < 32)
}

#[test]
fn ctl_check_passes_clean_and_finds_every_single_fault() {
    let (clean, unclean) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("case");
    for img in [&clean, &unclean] {
        write_image(&dir, img);
        let r = inspect::check(&dir, &ScanProgress::new()).unwrap();
        assert!(r.is_clean(), "{:?}", r.problems);
    }
    let empty: Vec<String> = clean
        .iter()
        // Header only, or header and the zeroed space a clean shutdown leaves reserved.
        .filter(|(n, b)| {
            segment_id(n).is_some() && b.get(32..).is_some_and(|t| t.iter().all(|&x| x == 0))
        })
        .map(|(n, _)| n.clone())
        .collect();
    let (mut cases, mut skipped) = (0, 0);
    for (ctx, img) in single_faults(&clean, 0xC7_1001, 200) {
        // Not damage: the seal file is a redundant copy of the final sync marker (a directory
        // without one is simply one not closed cleanly since), and an empty segment deleted or
        // grown with zeros looks like one never created or preallocated (and one cut within its
        // reserved zeros like one reserved less).
        let on_empty = empty.iter().any(|n| ctx.contains(n.as_str()));
        if ctx == "delete SEAL"
            || (on_empty
                && (ctx.starts_with("delete")
                    || ctx.starts_with("append 4 KiB of zeros")
                    || (ctx.starts_with("truncate")
                        && !ctx.ends_with(" at 0")
                        && !truncated_into_header(&ctx))))
        {
            skipped += 1;
            continue;
        }
        // A fault that changes no byte (zeroing reserved zeros) is no fault.
        if img == clean {
            skipped += 1;
            continue;
        }
        cases += 1;
        write_image(&dir, &img);
        let r = inspect::check(&dir, &ScanProgress::new()).unwrap();
        assert!(!r.is_clean(), "{ctx}: check found nothing");
        if let Some(seg) = ctx.split(' ').find_map(segment_id) {
            assert!(
                r.problems.iter().any(|p| p.segment == Some(seg)),
                "{ctx}: no problem names segment {seg}: {:?}",
                r.problems
            );
        }
        if cases % 50 == 0 {
            // Now and then through the binary: exit code 1 and the segment named.
            write_image(&dir, &img);
            let (code, out, _) = ctl(&dir, &["check", "--json"]);
            assert_eq!(code, 1, "{ctx}: {out}");
        }
    }
    println!(
        "ctl: check flagged all {cases} single faults ({skipped} undetectable by design skipped)"
    );
    assert!(cases > 100);
}

#[test]
fn ctl_repair_dry_run_changes_nothing_then_repair_opens_and_checks_clean() {
    let (clean, unclean) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("case");
    let mut faults: Vec<(String, Image)> = inputs(&clean, &unclean)
        .into_iter()
        .filter(|(_, _, ok)| !ok)
        .map(|(w, img, _)| (w.to_owned(), img))
        .collect();
    // A sample of the sweep's segment faults: flips, zeroed blocks, truncations.
    faults.extend(
        single_faults(&clean, 0xC7_1002, 12)
            .into_iter()
            .filter(|(ctx, _)| ctx.contains(".wal") && !ctx.starts_with("delete"))
            .step_by(7),
    );
    let (mut rebuilt, mut impossible) = (0, 0);
    for (what, img) in &faults {
        write_image(&dir, img);
        let before = snapshot(&dir);
        let (code, out, err) = ctl(&dir, &["repair", "--dry-run"]);
        assert!(
            snapshot(&dir) == before,
            "{what}: repair --dry-run changed the directory"
        );
        let plan = inspect::plan_repair(&dir, &ScanProgress::new()).unwrap();
        if matches!(plan, RepairPlan::Nothing) {
            // Nothing a normal open would drop: it must open as it is.
            assert_eq!(code, 0, "{what}: {out}{err}");
            drop(Engine::open(&dir, options()).unwrap());
            continue;
        }
        assert_eq!(code, 1, "{what}: {out}{err}");
        if let RepairPlan::Impossible { reason, .. } = &plan {
            // TolerateAny recovery itself refuses a checkpoint whose entries the damaged
            // segments no longer hold: repair says so and changes nothing.
            assert!(reason.contains("checkpoint claims"), "{what}: {plan:?}");
            let (code, out, err) = ctl(&dir, &["repair"]);
            assert_eq!(code, 2, "{what}: {out}{err}");
            assert!(
                snapshot(&dir) == before,
                "{what}: a refused repair changed the directory"
            );
            impossible += 1;
            continue;
        }
        rebuilt += usize::from(matches!(plan, RepairPlan::Rebuild { .. }));
        let (code, out, err) = ctl(&dir, &["repair"]);
        assert_eq!(code, 0, "{what}: repair: {out}{err}");
        let engine = Engine::open(&dir, options().recovery_mode(RecoveryMode::Strict))
            .unwrap_or_else(|e| panic!("{what}: no strict open after repair: {e}"));
        assert!(engine.groups().len() >= 3, "{what}");
        drop(engine);
        let (code, out, _) = ctl(&dir, &["check"]);
        assert_eq!(code, 0, "{what}: check after repair: {out}");
        // A rebuild keeps the damaged original, unchanged, beside it.
        if let RepairPlan::Rebuild { .. } = plan {
            let backup = backups(tmp.path());
            assert_eq!(backup.len(), 1, "{what}");
            assert_eq!(
                read_image(&backup[0]),
                *img,
                "{what}: the backup is not the original"
            );
            std::fs::remove_dir_all(&backup[0]).unwrap();
        }
    }
    println!(
        "ctl: {} faults repaired ({rebuilt} rebuilds), {impossible} refused",
        faults.len() - impossible
    );
    assert!(rebuilt >= 2, "the sample must exercise rebuilds");
}

fn backups(parent: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".damaged-"))
        .collect()
}

#[test]
fn ctl_torn_tail_repair_keeps_every_acknowledged_entry() {
    let (clean, unclean) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("case");
    write_image(&dir, &clean);
    let want = Inspection::open(&dir, RecoveryMode::TolerateTail, &ScanProgress::new())
        .unwrap()
        .groups();
    let (_, torn, _) = inputs(&clean, &unclean)
        .into_iter()
        .find(|(w, _, _)| *w == "garbage after the sealed end")
        .unwrap();
    write_image(&dir, &torn);
    let r = inspect::check(&dir, &ScanProgress::new()).unwrap();
    assert!(
        r.problems.iter().all(|p| p.kind == ProblemKind::TornTail),
        "{:?}",
        r.problems
    );
    let plan = inspect::plan_repair(&dir, &ScanProgress::new()).unwrap();
    assert!(matches!(plan, RepairPlan::Open { .. }), "{plan:?}");
    inspect::repair(&dir, &plan, &ScanProgress::new()).unwrap();
    let got = Inspection::open(&dir, RecoveryMode::Strict, &ScanProgress::new()).unwrap();
    assert!(got.recovery.is_ok());
    let strip = |g: Vec<inspect::GroupSummary>| -> Vec<_> {
        g.into_iter()
            .map(|g| (g.id, g.first, g.last, g.bytes))
            .collect()
    };
    assert_eq!(strip(got.groups()), strip(want));
    assert!(inspect::check(&dir, &ScanProgress::new())
        .unwrap()
        .is_clean());
}

#[test]
fn ctl_mistyped_path_creates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let missing = tmp.path().join("no-such").join("wal");
    for cmd in [
        &["stat"][..],
        &["groups"],
        &["dump", "--group", "1"],
        &["check"],
        &["repair", "--dry-run"],
        &["repair"],
        &["gc"],
    ] {
        let before = snapshot(tmp.path());
        for path in [&missing, &file] {
            let (code, out, err) = ctl(path, cmd);
            assert_eq!(code, 2, "{cmd:?} on {path:?}: {out}{err}");
            assert!(err.contains("mrwal-ctl:"), "{err}");
        }
        assert!(snapshot(tmp.path()) == before, "{cmd:?} changed the parent");
        assert!(!tmp.path().join("no-such").exists());
    }
    // The library refuses too.
    assert!(Inspection::open(&missing, RecoveryMode::TolerateTail, &ScanProgress::new()).is_err());
    assert!(inspect::check(&file, &ScanProgress::new()).is_err());
    assert!(!missing.exists());
}

#[test]
fn ctl_gc_runs_on_a_closed_directory() {
    let (clean, _) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("case");
    write_image(&dir, &clean);
    let (code, out, err) = ctl(&dir, &["gc", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["live_segments"].as_u64().unwrap() > 0);
    assert!(inspect::check(&dir, &ScanProgress::new())
        .unwrap()
        .is_clean());
}

/// A reader that stops early (`mrwal-ctl dump | head -1`) ends the tool quietly with exit 0, not
/// with a panic about a broken pipe.
#[test]
fn ctl_output_into_a_closed_pipe_exits_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("case");
    {
        let e = Engine::open(&dir, options()).unwrap();
        let mut b = WriteBatch::new();
        let entries: Vec<Vec<u8>> = (0..2000u32).map(|i| i.to_le_bytes().repeat(8)).collect();
        b.append(1, 1, &entries);
        e.write(b).unwrap();
    }
    let mut child = Command::new(BIN)
        .arg("--dir")
        .arg(&dir)
        .args(["dump", "--group", "1", "--count", "2000", "--hex"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read one line, then close the pipe: the rest of the 2,000 lines (far more than a pipe
    // buffer holds) meet a closed pipe.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    assert!(!first.is_empty());
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `dump` decodes entries written by the openraft adapter's default codec, and prints hex for
/// bytes that are not one.
#[cfg(feature = "openraft")]
#[test]
fn ctl_dump_decodes_openraft_entries_else_hex() {
    use multiraft_wal::raft::kv::{KvRequest, KvTypeConfig};
    use multiraft_wal::raft::{BincodeCodec, Codec};
    use openraft::type_config::alias::{EntryOf, LogIdOf};
    use openraft::vote::RaftLeaderIdExt;
    use openraft::{Entry, EntryPayload, LogId};

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let engine = Engine::open(&dir, options()).unwrap();
    let log_id: LogIdOf<KvTypeConfig> = LogId::new(
        <openraft::impls::leader_id_adv::LeaderId<u64, u64>>::new_committed(3, 1),
        1,
    );
    let entry: EntryOf<KvTypeConfig> = Entry {
        log_id,
        payload: EntryPayload::Normal(KvRequest::Set {
            key: "dump-key".into(),
            value: "dump-value".into(),
        }),
    };
    let mut bytes = Vec::new();
    <BincodeCodec as Codec<KvTypeConfig>>::encode_entry(&BincodeCodec, &entry, &mut bytes).unwrap();
    let mut b = WriteBatch::new();
    b.append(7, 1, [bytes.clone(), vec![0xff, 0x00, 0xab]]);
    engine.write(b).unwrap();
    drop(engine);
    let (code, out, err) = ctl(&dir, &["dump", "--group", "7"]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].contains("openraft") && lines[0].contains("dump-key"),
        "{out}"
    );
    assert!(lines[1].ends_with("hex ff00ab"), "{out}");
    let (_, out, _) = ctl(&dir, &["dump", "--group", "7", "--hex", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["hex"], hex_of(&bytes));
    assert!(v[0]["decoded"].is_null());
}

#[cfg(feature = "openraft")]
fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Beside a running engine: the read-only commands run, say so, and leave the engine's lock
/// alone; repair and gc refuse (the lock is held).
#[test]
fn ctl_beside_a_running_engine() {
    let (clean, _) = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("case");
    write_image(&dir, &clean);
    let engine = Engine::open(&dir, options()).unwrap();
    let (code, out, err) = ctl(&dir, &["stat", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["engine_running"], true);
    for cmd in [&["repair"][..], &["gc"]] {
        let (code, out, err) = ctl(&dir, cmd);
        assert_eq!(code, 2, "{cmd:?}: {out}{err}");
    }
    // The engine is unaffected.
    let mut b = WriteBatch::new();
    b.append(9, 1, [b"after ctl".to_vec()]);
    engine.write(b).unwrap();
    drop(engine);
    let (code, out, _) = ctl(&dir, &["stat", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["engine_running"], false);
}
