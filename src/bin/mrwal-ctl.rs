//! `mrwal-ctl`: inspect and maintain a multiraft-wal data directory.
//!
//! Opening a directory runs recovery (in the mode asked for), which may cut a torn tail and
//! always leaves an empty segment ready for writes, exactly as an application's open would.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use multiraft_wal::{Engine, Options, RecoveryMode};

#[derive(Parser)]
#[command(
    name = "mrwal-ctl",
    about = "Inspect and maintain a multiraft-wal data directory"
)]
struct Cli {
    /// The data directory.
    #[arg(long)]
    dir: PathBuf,
    /// Recovery mode used to open the directory.
    #[arg(long, value_enum, default_value = "tolerate-tail")]
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

#[derive(Subcommand)]
enum Cmd {
    /// Recovery report and counters.
    Stat,
    /// Every group with its first and last index.
    Groups,
    /// Entries of one group (length and a hex prefix of each).
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
    },
    /// Delete dead segments and report the groups that hold old ones.
    Gc,
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let mode = match cli.mode {
        Mode::TolerateTail => RecoveryMode::TolerateTail,
        Mode::Strict => RecoveryMode::Strict,
        Mode::TolerateAny => RecoveryMode::TolerateAny,
    };
    let engine = Engine::open(
        &cli.dir,
        Options::default()
            .recovery_mode(mode)
            .prefill_segments(false),
    )?;
    match cli.cmd {
        Cmd::Stat => {
            println!("{:#?}", engine.recovery_report());
            println!("{:#?}", engine.stats());
        }
        Cmd::Groups => {
            for g in engine.groups() {
                let range = match (engine.first_index(g), engine.last_index(g)) {
                    (Some(f), Some(l)) => format!("{f}..={l}"),
                    _ => "empty".to_owned(),
                };
                println!(
                    "group {g}: entries {range}, vote {}, committed {}",
                    engine.vote(g).is_some(),
                    engine.committed(g).is_some()
                );
            }
        }
        Cmd::Dump { group, from, count } => {
            let Some(first) = from.or(engine.first_index(group)) else {
                println!("group {group} holds no entry");
                return Ok(());
            };
            let entries = engine.entries(group, first..first.saturating_add(count), usize::MAX)?;
            for (i, e) in entries.iter().enumerate() {
                let hex: String = e.iter().take(16).map(|b| format!("{b:02x}")).collect();
                println!(
                    "{}: {} bytes {hex}{}",
                    first + i as u64,
                    e.len(),
                    if e.len() > 16 { "…" } else { "" }
                );
            }
        }
        Cmd::Gc => println!("{:#?}", engine.gc()?),
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mrwal-ctl: {e}");
            ExitCode::FAILURE
        }
    }
}
