//! `mrwal-ctl`: inspect, check and repair a multiraft-wal data directory.
//!
//! `stat`, `groups`, `dump` and `check` are read-only: they never create, cut, trim, rotate,
//! preallocate or sync anything and take no lock that creates a file (see
//! `multiraft_wal::inspect`). Only `repair` (without `--dry-run`) and `gc` write.
//!
//! Exit codes: 0 success (for `check`: no problem); 1 `check` found problems, or `repair
//! --dry-run` found something to repair; 2 the command failed (bad path, I/O error, usage).

/// `println!` that ends the process quietly (exit 0) when stdout is a closed pipe (`mrwal-ctl
/// dump | head`), instead of panicking; other write errors end it with exit 2.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("mrwal-ctl: writing to stdout: {e}");
            std::process::exit(2);
        }
    }};
}

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use multiraft_wal::inspect::{
    check, plan_repair, repair, CheckReport, CheckpointState, GroupSummary, Inspection,
    OpenFindings, PlannedChange, RepairOutcome, RepairPlan, ScanProgress, SealState,
};
use multiraft_wal::{Engine, Options, RecoveryMode};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "mrwal-ctl",
    version,
    about = "Inspect, check and repair a multiraft-wal data directory (read-only unless a command says otherwise)"
)]
struct Cli {
    /// The data directory (must exist: it is never created).
    #[arg(long)]
    dir: PathBuf,
    /// Machine-readable output (JSON on stdout).
    #[arg(long, global = true)]
    json: bool,
    /// The recovery mode whose view `stat`, `groups` and `dump` show (what an open in that
    /// mode would serve, cut and skip). `check` and `repair` always judge by the default.
    #[arg(long, global = true, value_enum, default_value = "tolerate-tail")]
    mode: Mode,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    TolerateTail,
    Strict,
    TolerateAny,
}

impl From<Mode> for RecoveryMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::TolerateTail => RecoveryMode::TolerateTail,
            Mode::Strict => RecoveryMode::Strict,
            Mode::TolerateAny => RecoveryMode::TolerateAny,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Segments, sizes, groups, entries, checkpoint, seal, and what a normal open would do
    /// (read-only).
    Stat,
    /// Every group: first/last index, entries, bytes, oldest segment (read-only).
    Groups,
    /// Entries of one group, decoded where a codec is known, hex otherwise (read-only).
    Dump {
        /// Group id.
        #[arg(long)]
        group: u64,
        /// First index (default: the group's first).
        #[arg(long)]
        from: Option<u64>,
        /// How many entries.
        #[arg(long, default_value_t = 20)]
        count: u64,
        /// Always print hex, never decode.
        #[arg(long)]
        hex: bool,
    },
    /// Verify every record of every segment, the checkpoint and the seal (read-only). Exit
    /// code 0: clean; 1: problems.
    Check,
    /// Show what will be removed (a torn tail, or damaged records as TolerateAny recovery
    /// drops them), then do it. Writes unless --dry-run.
    Repair {
        /// Show the plan and change nothing (exit code 1 if there is something to repair).
        #[arg(long)]
        dry_run: bool,
    },
    /// Open the engine normally (this writes: recovery, a new segment) and run a GC pass.
    Gc,
}

/// A progress bar on stderr, shown only when stderr is a terminal and the work lasts more
/// than a moment.
struct Progress {
    counter: ScanProgress,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn start(what: &'static str) -> Progress {
        let counter = ScanProgress::new();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::io::stderr().is_terminal().then(|| {
            let (counter, stop) = (counter.clone(), stop.clone());
            std::thread::spawn(move || {
                // Quiet for the first half second: most scans end before it.
                for _ in 0..10 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let bar = indicatif::ProgressBar::new(counter.bytes_expected().max(1));
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_message(what);
                while !stop.load(Ordering::Relaxed) {
                    bar.set_length(counter.bytes_expected().max(1));
                    bar.set_position(counter.bytes_read().min(counter.bytes_expected()));
                    std::thread::sleep(Duration::from_millis(100));
                }
                bar.finish_and_clear();
            })
        });
        Progress {
            counter,
            stop,
            thread,
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// Prints rows as a table with aligned columns.
fn table(head: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect();
        out!("{}", s.join("  ").trim_end());
    };
    line(head.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::TolerateTail => "tolerate-tail",
        Mode::Strict => "strict",
        Mode::TolerateAny => "tolerate-any",
    }
}

fn change_json(c: &PlannedChange) -> Value {
    let kind = match c {
        PlannedChange::CutTornTail { .. } => "cut-torn-tail",
        PlannedChange::TrimZeroTail { .. } => "trim-zero-tail",
        PlannedChange::SyncSegment { .. } => "sync-segment",
        PlannedChange::RemoveStaleSegment { .. } => "remove-stale-segment",
        PlannedChange::RemoveLeftover { .. } => "remove-leftover",
        PlannedChange::CreateSegment { .. } => "create-segment",
        PlannedChange::RemoveUnusedSegment { .. } => "remove-unused-segment",
        _ => "other",
    };
    json!({ "kind": kind, "description": c.to_string() })
}

fn findings_json(f: &OpenFindings) -> Value {
    let r = &f.report;
    json!({
        "segments": r.segments,
        "records": r.records,
        "entries": r.entries,
        "bytes": r.bytes,
        "tail_cut": r.tail_cut.map(|c| json!({"segment": c.segment, "offset": c.offset, "bytes": c.bytes})),
        "skipped": r.skipped.iter().map(|s| json!({"segment": s.segment, "start": s.start, "end": s.end, "reason": s.reason})).collect::<Vec<_>>(),
        "stale_removed": r.stale_removed,
        "checkpoint": r.checkpoint,
        "clean_seal": r.clean_seal,
        "seal_ignored": r.seal_ignored,
        "synced_segments": r.synced_segments,
        "changes": f.changes.iter().map(change_json).collect::<Vec<_>>(),
    })
}

fn group_json(g: &GroupSummary) -> Value {
    json!({
        "group": g.id, "first": g.first, "last": g.last, "entries": g.entries, "bytes": g.bytes,
        "oldest_segment": g.oldest_segment, "vote": g.has_vote, "committed": g.has_committed, "keys": g.keys,
    })
}

fn checkpoint_json(c: &CheckpointState) -> Value {
    match c {
        CheckpointState::Absent => json!({"state": "absent"}),
        CheckpointState::Valid {
            covers_below,
            covers_offset,
            survivors,
            groups,
            bytes,
        } => {
            json!({"state": "valid", "covers_below": covers_below, "covers_offset": covers_offset, "survivors": survivors, "groups": groups, "bytes": bytes})
        }
        CheckpointState::Damaged { reason } => json!({"state": "damaged", "reason": reason}),
        _ => json!({"state": "unknown"}),
    }
}

fn seal_json(s: &SealState) -> Value {
    match s {
        SealState::Absent => json!({"state": "absent"}),
        SealState::Valid { segment, len } => {
            json!({"state": "valid", "segment": segment, "len": len})
        }
        SealState::Damaged { reason } => json!({"state": "damaged", "reason": reason}),
        _ => json!({"state": "unknown"}),
    }
}

fn describe_checkpoint(c: &CheckpointState) -> String {
    match c {
        CheckpointState::Absent => "none".into(),
        CheckpointState::Valid {
            covers_below,
            covers_offset,
            survivors,
            groups,
            bytes,
        } => format!(
            "covers segments below {covers_below}{} (survivors {survivors:?}), {groups} groups, {bytes} bytes",
            if *covers_offset > 32 {
                format!(" and segment {covers_below} below offset {covers_offset}")
            } else {
                String::new()
            }
        ),
        CheckpointState::Damaged { reason } => format!("DAMAGED: {reason}"),
        _ => "unknown".into(),
    }
}

fn describe_seal(s: &SealState) -> String {
    match s {
        SealState::Absent => "none (not closed cleanly since the last open, or never)".into(),
        SealState::Valid { segment, len } => {
            format!("segment {segment} sealed at {len} bytes by a clean shutdown")
        }
        SealState::Damaged { reason } => format!("DAMAGED (ignored by recovery): {reason}"),
        _ => "unknown".into(),
    }
}

fn stat(dir: &Path, mode: Mode, as_json: bool) -> anyhow::Result<ExitCode> {
    let p = Progress::start("scanning");
    let v = Inspection::open(dir, mode.into(), &p.counter)?;
    drop(p);
    let groups = v.groups();
    if as_json {
        let out = json!({
            "dir": v.dir,
            "engine_running": v.engine_running,
            "segments": v.segments.iter().map(|s| json!({"id": s.id, "name": s.name, "bytes": s.bytes})).collect::<Vec<_>>(),
            "segment_bytes": v.segments.iter().map(|s| s.bytes).sum::<u64>(),
            "other_files": v.other_files,
            "checkpoint": checkpoint_json(&v.checkpoint),
            "seal": seal_json(&v.seal),
            "mode": mode_name(mode),
            "groups": groups.len(),
            "entries": groups.iter().map(|g| g.entries).sum::<u64>(),
            "open": match &v.recovery {
                Ok(f) => json!({"ok": true, "findings": findings_json(f)}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            },
        });
        out!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    out!("directory   {}", v.dir.display());
    if v.engine_running {
        out!(
            "WARNING     an engine holds the directory: the view may include a tail being written"
        );
    }
    let total: u64 = v.segments.iter().map(|s| s.bytes).sum();
    out!("segments    {} files, {total} bytes", v.segments.len());
    out!("checkpoint  {}", describe_checkpoint(&v.checkpoint));
    out!("seal        {}", describe_seal(&v.seal));
    out!(
        "groups      {} ({} entries)",
        groups.len(),
        groups.iter().map(|g| g.entries).sum::<u64>()
    );
    if !v.other_files.is_empty() {
        out!("other files {}", v.other_files.join(", "));
    }
    out!("");
    let rows: Vec<Vec<String>> = v
        .segments
        .iter()
        .map(|s| vec![s.id.to_string(), s.name.clone(), s.bytes.to_string()])
        .collect();
    table(&["segment", "file", "bytes"], &rows);
    out!("");
    match &v.recovery {
        Ok(f) => {
            let r = &f.report;
            out!(
                "an open ({}) would recover {} records, {} entries from {} segments ({} bytes); clean seal: {}",
                mode_name(mode), r.records, r.entries, r.segments, r.bytes, r.clean_seal
            );
            for sk in &r.skipped {
                out!(
                    "  and skip segment {} bytes {}..{}: {}",
                    sk.segment, sk.start, sk.end, sk.reason
                );
            }
            if let Some(reason) = &r.seal_ignored {
                out!("  seal file ignored: {reason}");
            }
            if f.changes.is_empty() {
                out!("  and change nothing");
            } else {
                out!("  and change (not done by this command):");
                for c in &f.changes {
                    out!("  - {c}");
                }
            }
        }
        Err(e) => out!("an open ({}) would FAIL: {e}\n  (run `mrwal-ctl check` for every problem, `repair --dry-run` for a fix)", mode_name(mode)),
    }
    Ok(ExitCode::SUCCESS)
}

fn groups_cmd(dir: &Path, mode: Mode, as_json: bool) -> anyhow::Result<ExitCode> {
    let p = Progress::start("scanning");
    let v = Inspection::open(dir, mode.into(), &p.counter)?;
    drop(p);
    if let Err(e) = &v.recovery {
        bail!(
            "an open ({}) fails, so groups cannot be listed: {e} (see `check`; `--mode tolerate-any` shows what survives)",
            mode_name(mode)
        );
    }
    let groups = v.groups();
    if as_json {
        let out: Vec<Value> = groups.iter().map(group_json).collect();
        out!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            vec![
                g.id.to_string(),
                opt(g.first),
                opt(g.last),
                g.entries.to_string(),
                g.bytes.to_string(),
                opt(g.oldest_segment),
                if g.has_vote { "yes" } else { "no" }.into(),
                if g.has_committed { "yes" } else { "no" }.into(),
                g.keys.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "group",
            "first",
            "last",
            "entries",
            "bytes",
            "oldest-seg",
            "vote",
            "committed",
            "keys",
        ],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

/// The entry decoded as an openraft entry of the adapter's default codec and reference type
/// config, if it parses as one.
#[cfg(feature = "openraft")]
fn decode_entry(bytes: &[u8]) -> Option<String> {
    use multiraft_wal::raft::kv::KvTypeConfig;
    use multiraft_wal::raft::{BincodeCodec, Codec};
    <BincodeCodec as Codec<KvTypeConfig>>::decode_entry(&BincodeCodec, bytes)
        .ok()
        .map(|e| format!("{e:?}"))
}

#[cfg(not(feature = "openraft"))]
fn decode_entry(_bytes: &[u8]) -> Option<String> {
    None
}

fn dump(
    dir: &Path,
    mode: Mode,
    group: u64,
    from: Option<u64>,
    count: u64,
    force_hex: bool,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let p = Progress::start("scanning");
    let v = Inspection::open(dir, mode.into(), &p.counter)?;
    drop(p);
    let entries = v.entries(group, from, count)?;
    let decoded: Vec<(u64, &Vec<u8>, Option<String>)> = entries
        .iter()
        .map(|(i, e)| (*i, e, (!force_hex).then(|| decode_entry(e)).flatten()))
        .collect();
    if as_json {
        let out: Vec<Value> = decoded
            .iter()
            .map(|(i, e, d)| json!({"index": i, "bytes": e.len(), "hex": hex(e), "decoded": d}))
            .collect();
        out!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    if decoded.is_empty() {
        out!("group {group}: no entry in that range");
    }
    for (i, e, d) in decoded {
        match d {
            Some(d) => out!("{i}\t{} bytes\topenraft {d}", e.len()),
            None => out!("{i}\t{} bytes\thex {}", e.len(), hex(e)),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check_json(r: &CheckReport) -> Value {
    json!({
        "dir": r.dir,
        "clean": r.is_clean(),
        "engine_running": r.engine_running,
        "segments": r.segments.iter().map(|s| json!({
            "id": s.id, "bytes": s.bytes, "valid_end": s.valid_end, "records": s.records,
            "markers": s.markers, "durable_to": s.durable_to,
        })).collect::<Vec<_>>(),
        "stale_segments": r.stale_segments,
        "problems": r.problems.iter().map(|p| json!({
            "kind": p.kind.name(), "file": p.file, "segment": p.segment, "offset": p.offset,
            "end": p.end, "reason": p.reason,
        })).collect::<Vec<_>>(),
        "open": r.open.as_ref().map(findings_json),
    })
}

fn check_cmd(dir: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let p = Progress::start("verifying");
    let r = check(dir, &p.counter)?;
    drop(p);
    let code = if r.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    };
    if as_json {
        out!("{}", serde_json::to_string_pretty(&check_json(&r))?);
        return Ok(code);
    }
    if r.engine_running {
        out!("WARNING: an engine holds the directory: a tail being written may show as torn");
    }
    let records: u64 = r.segments.iter().map(|s| s.records).sum();
    out!(
        "checked {} segments, {records} records{}",
        r.segments.len(),
        if r.stale_segments.is_empty() {
            String::new()
        } else {
            format!(
                " ({} stale segments not read: {:?})",
                r.stale_segments.len(),
                r.stale_segments
            )
        }
    );
    if r.is_clean() {
        out!("clean: no problem found");
        return Ok(code);
    }
    let n = r.problems.len();
    out!("{n} problem{}:", if n == 1 { "" } else { "s" });
    let rows: Vec<Vec<String>> = r
        .problems
        .iter()
        .map(|p| {
            vec![
                p.kind.name().into(),
                p.file.clone(),
                p.offset.to_string(),
                opt(p.end),
                p.reason.clone(),
            ]
        })
        .collect();
    table(&["kind", "file", "offset", "end", "reason"], &rows);
    Ok(code)
}

fn plan_json(plan: &RepairPlan) -> Value {
    match plan {
        RepairPlan::Nothing => json!({"action": "nothing"}),
        RepairPlan::Open { changes } => json!({
            "action": "open-tolerate-tail",
            "changes": changes.iter().map(change_json).collect::<Vec<_>>(),
        }),
        RepairPlan::Rebuild {
            refusal,
            dropped,
            tail_cut,
            groups,
            entries,
        } => json!({
            "action": "rebuild-tolerate-any",
            "refusal": refusal,
            "dropped": dropped.iter().map(|s| json!({"segment": s.segment, "start": s.start, "end": s.end, "reason": s.reason})).collect::<Vec<_>>(),
            "tail_cut": tail_cut.map(|c| json!({"segment": c.segment, "offset": c.offset, "bytes": c.bytes})),
            "groups": groups,
            "entries": entries,
        }),
        RepairPlan::Impossible { refusal, reason } => {
            json!({"action": "impossible", "refusal": refusal, "reason": reason})
        }
        _ => json!({"action": "unknown"}),
    }
}

fn print_plan(plan: &RepairPlan) {
    match plan {
        RepairPlan::Nothing => {
            out!("nothing to repair: a normal open succeeds and drops no data")
        }
        RepairPlan::Open { changes } => {
            out!("a normal open (tolerate-tail) will make these changes:");
            for c in changes {
                out!("  - {c}");
            }
        }
        RepairPlan::Rebuild {
            refusal,
            dropped,
            tail_cut,
            groups,
            entries,
        } => {
            out!("a normal open fails: {refusal}");
            out!("tolerate-any recovery drops:");
            for s in dropped {
                if s.segment == 0 {
                    out!("  - {}", s.reason);
                } else {
                    out!(
                        "  - segment {} bytes {}..{}: {}",
                        s.segment,
                        s.start,
                        s.end,
                        s.reason
                    );
                }
            }
            if let Some(multiraft_wal::TailCut {
                segment: s,
                offset: o,
                bytes: b,
                ..
            }) = tail_cut
            {
                out!("  - torn tail of segment {s}: {b} bytes from offset {o}");
            }
            out!(
                "repair writes the remaining {groups} groups ({entries} entries) into a new directory, checks it, \
                 and swaps it in; the damaged directory is kept beside it as <dir>.damaged-<time>"
            );
        }
        RepairPlan::Impossible { refusal, reason } => {
            out!("cannot repair: a normal open fails ({refusal}) and so does tolerate-any recovery ({reason})");
        }
        _ => out!("unknown plan"),
    }
}

fn repair_cmd(dir: &Path, dry_run: bool, as_json: bool) -> anyhow::Result<ExitCode> {
    let p = Progress::start("scanning");
    let plan = plan_repair(dir, &p.counter)?;
    drop(p);
    let needed = !matches!(plan, RepairPlan::Nothing);
    if dry_run || !needed {
        if as_json {
            out!(
                "{}",
                serde_json::to_string_pretty(
                    &json!({"dry_run": dry_run, "plan": plan_json(&plan)})
                )?
            );
        } else {
            print_plan(&plan);
        }
        return Ok(if dry_run && needed {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        });
    }
    if !as_json {
        print_plan(&plan);
    }
    if let RepairPlan::Impossible { .. } = plan {
        bail!("nothing was changed");
    }
    let p = Progress::start("repairing");
    let outcome = repair(dir, &plan, &p.counter)?;
    drop(p);
    let done = match &outcome {
        RepairOutcome::Nothing => json!({"done": "nothing"}),
        RepairOutcome::Opened { changes } => json!({
            "done": "opened-tolerate-tail",
            "changes": changes.iter().map(change_json).collect::<Vec<_>>(),
        }),
        RepairOutcome::Rebuilt {
            backup,
            groups,
            entries,
        } => json!({"done": "rebuilt", "backup": backup, "groups": groups, "entries": entries}),
        _ => json!({"done": "unknown"}),
    };
    if as_json {
        out!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"dry_run": false, "plan": plan_json(&plan), "outcome": done})
            )?
        );
    } else {
        match outcome {
            RepairOutcome::Rebuilt { backup, .. } => out!(
                "repaired; the damaged directory is kept at {} (delete it once satisfied)",
                backup.display()
            ),
            _ => out!("repaired"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn gc_cmd(dir: &Path, as_json: bool) -> anyhow::Result<ExitCode> {
    let engine = Engine::open(dir, Options::default().prefill_segments(false))
        .with_context(|| format!("opening {}", dir.display()))?;
    let r = engine.gc()?;
    drop(engine);
    if as_json {
        out!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "deleted_segments": r.deleted_segments,
                "freed_bytes": r.freed_bytes,
                "rewritten_groups": r.rewritten_groups,
                "live_segments": r.live_segments,
                "holders": r.holders.iter().map(|h| json!({"group": h.group, "oldest_segment": h.oldest_segment, "live_entries": h.live_entries, "live_bytes": h.live_bytes, "would_free_bytes": h.would_free_bytes})).collect::<Vec<_>>(),
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    out!(
        "deleted {} segments ({} bytes freed){}; {} segments live; rewrote groups {:?}",
        r.deleted_segments.len(),
        r.freed_bytes,
        if r.deleted_segments.is_empty() {
            String::new()
        } else {
            format!(" {:?}", r.deleted_segments)
        },
        r.live_segments,
        r.rewritten_groups
    );
    if !r.holders.is_empty() {
        out!("groups holding old segments (purge them to let GC go further):");
        let rows: Vec<Vec<String>> = r
            .holders
            .iter()
            .map(|h| {
                vec![
                    h.group.to_string(),
                    h.oldest_segment.to_string(),
                    h.live_entries.to_string(),
                    h.live_bytes.to_string(),
                    h.would_free_bytes.to_string(),
                ]
            })
            .collect();
        table(
            &["group", "oldest-seg", "entries", "bytes", "would-free"],
            &rows,
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let dir = cli.dir.as_path();
    // Never create the directory, whatever the command.
    let meta = std::fs::metadata(dir).with_context(|| format!("{}", dir.display()))?;
    if !meta.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    match cli.cmd {
        Cmd::Stat => stat(dir, cli.mode, cli.json),
        Cmd::Groups => groups_cmd(dir, cli.mode, cli.json),
        Cmd::Dump {
            group,
            from,
            count,
            hex,
        } => dump(dir, cli.mode, group, from, count, hex, cli.json),
        Cmd::Check => check_cmd(dir, cli.json),
        Cmd::Repair { dry_run } => repair_cmd(dir, dry_run, cli.json),
        Cmd::Gc => gc_cmd(dir, cli.json),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mrwal-ctl: {e:#}");
            ExitCode::from(2)
        }
    }
}
