//! Quickstart for openraft 0.9 (feature `openraft09`): one openraft 0.9 node whose log lives in
//! a multiraft-wal engine.
//!
//! Opens an engine and a snapshot store, runs a one-node Raft group on them, writes a few keys,
//! shuts everything down, reopens both from the same directory with a new node, and reads the
//! keys back. Exits with an error if any key is missing.
//!
//! ```text
//! cargo run --release --features openraft09 --example quickstart09            # temp directory
//! cargo run --release --features openraft09 --example quickstart09 -- ./data  # kept afterwards
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use multiraft_wal::raft09::kv::{KvRequest, KvStateMachine, KvTypeConfig};
use multiraft_wal::raft09::{GroupLogStore, SnapshotStore};
use multiraft_wal::{Engine, Options};
use openraft09::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft09::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft09::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft09::{BasicNode, Config, Raft};

type C = KvTypeConfig;
type Node = Raft<C>;
type Nid = u64;

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

fn no_peer() -> Unreachable {
    Unreachable::new(&std::io::Error::other("a one-node group has no peers"))
}

impl RaftNetwork<C> for NoPeers {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<C>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<Nid>, RPCError<Nid, BasicNode, RaftError<Nid>>> {
        Err(RPCError::Unreachable(no_peer()))
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<C>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<Nid>,
        RPCError<Nid, BasicNode, RaftError<Nid, InstallSnapshotError>>,
    > {
        Err(RPCError::Unreachable(no_peer()))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<Nid>,
        _option: RPCOption,
    ) -> Result<VoteResponse<Nid>, RPCError<Nid, BasicNode, RaftError<Nid>>> {
        Err(RPCError::Unreachable(no_peer()))
    }
}

/// Opens the engine (`dir/wal`) and the snapshot store (`dir/snapshots`), starts the node.
async fn start(dir: &Path) -> anyhow::Result<(Engine, Node, KvStateMachine)> {
    let engine = Engine::open(dir.join("wal"), Options::default())
        .with_context(|| format!("opening {dir:?}"))?;
    let snapshots = SnapshotStore::open(dir.join("snapshots"))?;
    let config = Config {
        heartbeat_interval: 100,
        election_timeout_min: 200,
        election_timeout_max: 400,
        ..Default::default()
    };
    let log = GroupLogStore::<C>::new(engine.clone(), GROUP);
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
    // Each run gets its own Tokio runtime, as a process would: dropping it ends every task
    // openraft spawned, so the engine (and its directory lock) is released in between.
    tokio::runtime::Runtime::new()?.block_on(write(&dir, &wanted))?;
    tokio::runtime::Runtime::new()?.block_on(read_back(&dir, &wanted))
}

async fn write(dir: &Path, wanted: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let (engine, raft, _sm) = start(dir).await?;
    if !raft.is_initialized().await? {
        raft.initialize(BTreeMap::from([(NODE_ID, BasicNode::new("in-process"))]))
            .await?;
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
        "shut down: engine holds {} entries of {} group(s)",
        stats.entries, stats.groups
    );
    Ok(())
}

async fn read_back(dir: &Path, wanted: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let (_engine, raft, sm) = start(dir).await?;
    raft.wait(Some(Duration::from_secs(10)))
        .current_leader(NODE_ID, "the single node leads again")
        .await?;
    // Waits until the state machine has applied everything committed before the restart.
    let read_at = raft.ensure_linearizable().await?;
    println!("reopened: linearizable read at {read_at:?}");
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
