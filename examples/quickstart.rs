//! Quickstart: one openraft node whose log lives in a multiraft-wal engine.
//!
//! Opens an engine, runs a one-node Raft group on it, writes a few keys, shuts everything down,
//! reopens the engine and a new node from the same directory, and reads the keys back. Exits
//! with an error if any key is missing.
//!
//! ```text
//! cargo run --release --example quickstart            # in a temporary directory
//! cargo run --release --example quickstart -- ./data  # in ./data (kept afterwards)
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use multiraft_wal::raft::kv::{KvRequest, KvSnapshotData, KvStateMachine, KvTypeConfig};
use multiraft_wal::raft::{GroupLogStore, SnapshotStore};
use multiraft_wal::{Engine, Options};
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotOf, VoteOf};
use openraft::{BasicNode, Config, Raft, RaftNetworkFactory, RaftNetworkV2};

type C = KvTypeConfig;
type Node = Raft<C, KvStateMachine>;

const NODE_ID: u64 = 1;
const GROUP: u64 = 1;

/// A one-node group never sends a message; this network refuses all of them.
struct NoPeers;

impl RaftNetworkFactory<C> for NoPeers {
    type Network = NoPeers;
    async fn new_client(&mut self, _target: u64, _node: &BasicNode) -> NoPeers {
        NoPeers
    }
}

fn no_peer() -> Unreachable<C> {
    Unreachable::new(&std::io::Error::other("a one-node group has no peers"))
}

impl RaftNetworkV2<C> for NoPeers {
    type SnapshotData = KvSnapshotData;

    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<C>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        Err(RPCError::Unreachable(no_peer()))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<C>,
        _option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        Err(RPCError::Unreachable(no_peer()))
    }

    async fn full_snapshot(
        &mut self,
        _vote: VoteOf<C>,
        _snapshot: SnapshotOf<C, KvSnapshotData>,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        Err(StreamingError::Unreachable(no_peer()))
    }
}

/// Opens the engine in `dir` and starts the node of group [`GROUP`] on it.
async fn start(dir: &Path) -> anyhow::Result<(Engine, Node, KvStateMachine)> {
    let engine =
        Engine::open(dir, Options::default()).with_context(|| format!("opening {dir:?}"))?;
    let config = Config {
        heartbeat_interval: 100,
        election_timeout_min: 200,
        election_timeout_max: 400,
        ..Default::default()
    };
    let log = GroupLogStore::<C>::new(engine.clone(), GROUP);
    // Snapshots go to files of their own, beside (not inside) the log.
    let snapshots = SnapshotStore::open(dir.join("snapshots"))?;
    let sm = KvStateMachine::open_async(snapshots, GROUP).await?;
    let raft = Raft::new(
        NODE_ID,
        Arc::new(config.validate()?),
        NoPeers,
        log,
        sm.clone(),
    )
    .await?;
    Ok((engine, raft, sm))
}

fn main() -> anyhow::Result<()> {
    let arg = std::env::args().nth(1).map(PathBuf::from);
    let _temp;
    let dir = match arg {
        Some(dir) => dir,
        None => {
            _temp = tempfile::tempdir()?;
            _temp.path().to_path_buf()
        }
    };
    println!("data directory: {}", dir.display());
    let wanted: BTreeMap<String, String> = (1..=5)
        .map(|i| (format!("key-{i}"), format!("value-{i}")))
        .collect();

    // Each run gets its own Tokio runtime, as a process would: dropping the runtime ends every
    // task openraft spawned, so the engine (and its directory lock) is released when the first
    // run is over.
    tokio::runtime::Runtime::new()?.block_on(write(&dir, &wanted))?;
    tokio::runtime::Runtime::new()?.block_on(read_back(&dir, &wanted))
}

/// First run: creates (or resumes) the group and writes `wanted`.
async fn write(dir: &Path, wanted: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let (engine, raft, _sm) = start(dir).await?;
    if !raft.is_initialized().await? {
        let members = BTreeMap::from([(
            NODE_ID,
            BasicNode {
                addr: "in-process".into(),
            },
        )]);
        raft.initialize(members).await?;
    }
    raft.wait(Some(Duration::from_secs(10)))
        .current_leader(NODE_ID, "the single node becomes leader")
        .await?;
    for (key, value) in wanted {
        let resp = raft
            .client_write(KvRequest::Set {
                key: key.clone(),
                value: value.clone(),
            })
            .await?;
        println!("wrote {key} = {value} at log index {}", resp.log_id.index);
    }
    raft.shutdown().await?;
    let stats = engine.stats();
    println!(
        "shut down: engine holds {} entries of {} group(s) in {} segment(s)",
        stats.entries, stats.groups, stats.segments
    );
    Ok(())
}

/// Second run: reopens the directory; the node re-applies its log to a fresh state machine.
async fn read_back(dir: &Path, wanted: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let (_engine, raft, sm) = start(dir).await?;
    let metrics = raft
        .wait_for_recovery(Some(Duration::from_secs(10)))
        .await?;
    println!("reopened: last applied log id {:?}", metrics.last_applied);
    let mut missing = 0;
    for (key, value) in wanted {
        match sm.get(key) {
            Some(got) if &got == value => println!("read {key} = {got}"),
            other => {
                println!("MISSING {key}: expected {value}, found {other:?}");
                missing += 1;
            }
        }
    }
    raft.shutdown().await?;
    if missing > 0 {
        bail!("{missing} key(s) were lost across the restart");
    }
    println!("all {} keys survived the restart", wanted.len());
    Ok(())
}
