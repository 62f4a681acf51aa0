//! Three openraft nodes in one process, each hosting several groups on its one engine, joined
//! by an in-memory network: writes, a node restart from its data directory, a leader change, and
//! then every committed write readable on every node.
//!
//! Each node runs on its own Tokio runtime, so stopping a node (shutting its runtime down) ends
//! every task openraft spawned for it and releases its engine, as a process exit would.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use multiraft_wal::raft::kv::{KvRequest, KvSnapshotData, KvStateMachine, KvTypeConfig};
use multiraft_wal::raft::{GroupLogStore, SnapshotStore};
use multiraft_wal::{Engine, Options};
use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::{
    ClientWriteError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotOf, VoteOf};
use openraft::{
    BasicNode, Config, Raft, RaftNetworkFactory, RaftNetworkV2, ServerState, SnapshotPolicy,
};
use parking_lot::RwLock;
use tempfile::TempDir;

type C = KvTypeConfig;
type Rf = Raft<C, KvStateMachine>;

const NODES: [u64; 3] = [1, 2, 3];
const GROUPS: u64 = 4;
const WAIT: Duration = Duration::from_secs(15);

/// The running Raft of every (node, group); a stopped node is absent.
#[derive(Clone, Default)]
struct Router {
    rafts: Arc<RwLock<HashMap<(u64, u64), Rf>>>,
}

impl Router {
    fn get(&self, node: u64, group: u64) -> Result<Rf, Unreachable<C>> {
        self.rafts
            .read()
            .get(&(node, group))
            .cloned()
            .ok_or_else(|| Unreachable::new(&std::io::Error::other(format!("node {node} is down"))))
    }
}

/// The network of one group on one node.
struct Net {
    router: Router,
    group: u64,
}

impl RaftNetworkFactory<C> for Net {
    type Network = Conn;
    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> Conn {
        Conn {
            router: self.router.clone(),
            group: self.group,
            target,
        }
    }
}

struct Conn {
    router: Router,
    group: u64,
    target: u64,
}

fn unreachable<E: std::error::Error + 'static>(e: E) -> Unreachable<C> {
    Unreachable::new(&e)
}

impl RaftNetworkV2<C> for Conn {
    type SnapshotData = KvSnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        let raft = self.router.get(self.target, self.group)?;
        raft.append_entries(rpc)
            .await
            .map_err(|e| RPCError::Unreachable(unreachable(e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<C>,
        _option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        let raft = self.router.get(self.target, self.group)?;
        raft.vote(rpc)
            .await
            .map_err(|e| RPCError::Unreachable(unreachable(e)))
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, KvSnapshotData>,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let raft = self.router.get(self.target, self.group)?;
        raft.install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| StreamingError::Unreachable(unreachable(e)))
    }
}

struct RunningNode {
    rt: tokio::runtime::Runtime,
    engine: Engine,
    rafts: BTreeMap<u64, Rf>,
    sms: BTreeMap<u64, KvStateMachine>,
}

struct Cluster {
    _root: TempDir,
    dirs: BTreeMap<u64, PathBuf>,
    router: Router,
    nodes: BTreeMap<u64, RunningNode>,
    config: Arc<Config>,
    /// What every node must end up holding, per group.
    expected: BTreeMap<u64, BTreeMap<String, String>>,
    /// The highest log index a write was committed at, per group.
    committed: BTreeMap<u64, u64>,
}

impl Cluster {
    fn new() -> anyhow::Result<Self> {
        let root = TempDir::new()?;
        let dirs = NODES
            .iter()
            .map(|&id| (id, root.path().join(format!("node-{id}"))))
            .collect();
        let config = Config {
            heartbeat_interval: 50,
            election_timeout_min: 300,
            election_timeout_max: 600,
            // Snapshot and purge often, so restarts go through persisted snapshots and a
            // lagging node may be sent one.
            snapshot_policy: SnapshotPolicy::LogsSinceLast(20),
            max_in_snapshot_log_to_keep: 5,
            ..Default::default()
        };
        Ok(Self {
            _root: root,
            dirs,
            router: Router::default(),
            nodes: BTreeMap::new(),
            config: Arc::new(config.validate()?),
            expected: BTreeMap::new(),
            committed: BTreeMap::new(),
        })
    }

    fn running(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// Opens the node's engine from its directory and starts one Raft per group on the node's
    /// own runtime.
    async fn start(&mut self, id: u64) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("node-{id}"))
            .enable_all()
            .build()?;
        let options = Options::default().segment_size(256 << 10);
        let engine = Engine::open(&self.dirs[&id], options)
            .with_context(|| format!("reopening node {id}"))?;
        let snapshots = SnapshotStore::open(self.dirs[&id].join("snapshots"))?;
        let mut rafts = BTreeMap::new();
        let mut sms = BTreeMap::new();
        for group in 1..=GROUPS {
            let sm = KvStateMachine::open(snapshots.clone(), group)?;
            let log = GroupLogStore::<C>::new(engine.clone(), group);
            let net = Net {
                router: self.router.clone(),
                group,
            };
            let config = self.config.clone();
            let sm2 = sm.clone();
            let raft = rt
                .spawn(async move { Raft::new(id, config, net, log, sm2).await })
                .await??;
            self.router.rafts.write().insert((id, group), raft.clone());
            rafts.insert(group, raft);
            sms.insert(group, sm);
        }
        self.nodes.insert(
            id,
            RunningNode {
                rt,
                engine,
                rafts,
                sms,
            },
        );
        Ok(())
    }

    /// Stops every Raft of the node and its runtime; afterwards nothing holds its engine.
    async fn stop(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.nodes.remove(&id).context("node not running")?;
        for group in 1..=GROUPS {
            self.router.rafts.write().remove(&(id, group));
        }
        for raft in node.rafts.values() {
            raft.shutdown()
                .await
                .map_err(|e| anyhow::anyhow!("shutdown of node {id}: {e}"))?;
        }
        let RunningNode {
            rt,
            engine,
            rafts,
            sms,
        } = node;
        drop((engine, rafts, sms));
        tokio::task::spawn_blocking(move || rt.shutdown_timeout(WAIT)).await?;
        Ok(())
    }

    fn raft(&self, node: u64, group: u64) -> anyhow::Result<Rf> {
        Ok(self.router.get(node, group)?)
    }

    /// A running leader of `group` that a quorum has acknowledged (so it accepts writes). If
    /// leadership moves while waiting (an election under load), follow it.
    async fn leader(&self, group: u64) -> anyhow::Result<u64> {
        let running: BTreeSet<u64> = self.running().into_iter().collect();
        let observer = *running.iter().next().context("no node is running")?;
        let mut last_err = None;
        for _ in 0..5 {
            let m = self
                .raft(observer, group)?
                .wait(Some(WAIT))
                .metrics(
                    |m| m.current_leader.is_some_and(|l| running.contains(&l)),
                    format!("group {group}: a running leader"),
                )
                .await?;
            let leader = m.current_leader.context("no leader")?;
            let m = self
                .raft(leader, group)?
                .wait(Some(WAIT))
                .metrics(
                    |m| {
                        (m.state == ServerState::Leader && m.last_quorum_acked.is_some())
                            || m.current_leader != Some(leader)
                    },
                    format!("group {group}: node {leader} acknowledged as leader, or deposed"),
                )
                .await;
            match m {
                Ok(m) if m.state == ServerState::Leader => return Ok(leader),
                Ok(_) => continue,
                Err(e) => last_err = Some(e),
            }
        }
        bail!("group {group}: no acknowledged leader; last error: {last_err:?}")
    }

    /// Writes `key = value` through the leader of `group`, retrying on leader changes (a set is
    /// idempotent, so a retry of a write that did commit is harmless).
    async fn put(&mut self, group: u64, key: String, value: String) -> anyhow::Result<()> {
        let request = KvRequest::Set {
            key: key.clone(),
            value: value.clone(),
        };
        let mut target = self.leader(group).await?;
        let mut last = None;
        for _ in 0..50 {
            match self
                .raft(target, group)?
                .client_write(request.clone())
                .await
            {
                Ok(resp) => {
                    self.expected.entry(group).or_default().insert(key, value);
                    let c = self.committed.entry(group).or_default();
                    *c = (*c).max(resp.log_id.index);
                    return Ok(());
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))
                    if f.leader_id.is_some_and(|l| self.nodes.contains_key(&l)) =>
                {
                    target = f.leader_id.context("checked above")?;
                }
                Err(e) => {
                    last = Some(e);
                    // Let the node's Raft state move on (an election, a heartbeat round).
                    let mut metrics = self.raft(target, group)?.metrics();
                    let _ = tokio::time::timeout(WAIT, metrics.changed()).await;
                    target = self.leader(group).await?;
                }
            }
        }
        bail!("group {group}: could not write {key}; last error: {last:?}")
    }

    async fn write_phase(&mut self, phase: &str, per_group: usize) -> anyhow::Result<()> {
        for i in 0..per_group {
            for group in 1..=GROUPS {
                self.put(
                    group,
                    format!("{phase}-{i}"),
                    format!("g{group}-{phase}-{i}"),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Every running node has applied every committed write and holds exactly the expected map.
    async fn check_all(&self) -> anyhow::Result<()> {
        for (&id, node) in &self.nodes {
            for group in 1..=GROUPS {
                let index = self.committed.get(&group).copied();
                node.rafts[&group]
                    .wait(Some(WAIT))
                    .applied_index_at_least(
                        index,
                        format!("node {id} group {group} applies {index:?}"),
                    )
                    .await?;
                let got = node.sms[&group].to_map();
                let want = self.expected.get(&group).cloned().unwrap_or_default();
                assert_eq!(
                    got.len(),
                    want.len(),
                    "node {id} group {group}: number of keys"
                );
                assert_eq!(got, want, "node {id} group {group}: contents");
            }
        }
        Ok(())
    }

    async fn stop_all(&mut self) -> anyhow::Result<()> {
        for id in self.running() {
            self.stop(id).await?;
        }
        Ok(())
    }
}

async fn scenario(cluster: &mut Cluster) -> anyhow::Result<()> {
    for id in NODES {
        cluster.start(id).await?;
    }
    let members: BTreeMap<u64, BasicNode> = NODES
        .iter()
        .map(|&id| {
            (
                id,
                BasicNode {
                    addr: format!("node-{id}"),
                },
            )
        })
        .collect();
    for group in 1..=GROUPS {
        cluster.raft(1, group)?.initialize(members.clone()).await?;
    }

    cluster.write_phase("a", 30).await?;
    cluster.check_all().await?;

    // Node 3 goes down; the others keep serving; it comes back from its data directory.
    cluster.stop(3).await?;
    cluster.write_phase("b", 30).await?;
    cluster.start(3).await?;
    cluster.check_all().await?;

    // The leader of group 1 goes down: group 1 (and any group it led) elects a new leader.
    let old = cluster.leader(1).await?;
    cluster.stop(old).await?;
    let new = cluster.leader(1).await?;
    assert_ne!(old, new, "group 1 kept a stopped leader");
    cluster.write_phase("c", 30).await?;
    cluster.start(old).await?;
    cluster.write_phase("d", 5).await?;
    cluster.check_all().await?;

    // Snapshots were taken and logs purged on the way (the policy asks for one every 20 logs).
    let m = cluster.raft(new, 1)?.metrics().borrow_watched().clone();
    assert!(m.snapshot.is_some(), "no snapshot was built: {m:?}");

    // A full restart of every node loses nothing.
    cluster.stop_all().await?;
    for id in NODES {
        cluster.start(id).await?;
    }
    cluster.write_phase("e", 2).await?;
    cluster.check_all().await?;
    cluster.stop_all().await
}

#[test]
fn three_nodes_many_groups_restart_and_leader_change() -> anyhow::Result<()> {
    let mut cluster = Cluster::new()?;
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let limit = Duration::from_secs(120);
    let result = main.block_on(async { tokio::time::timeout(limit, scenario(&mut cluster)).await });
    // Runtimes of nodes still running are dropped here, outside any async context.
    drop(cluster);
    result.context("the scenario timed out")?
}
