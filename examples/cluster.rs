//! A replicated key-value store: three openraft nodes over TCP on loopback, each hosting many
//! Raft groups (default 16) whose logs share the node's ONE multiraft-wal engine.
//!
//! ```text
//! # three nodes (or: scripts/run_cluster.sh)
//! cargo run --release --example cluster -- node --id 1 --port 9001 --peers 127.0.0.1:9002,127.0.0.1:9003 --data-dir data/1
//! cargo run --release --example cluster -- node --id 2 --port 9002 --peers 127.0.0.1:9001,127.0.0.1:9003 --data-dir data/2
//! cargo run --release --example cluster -- node --id 3 --port 9003 --peers 127.0.0.1:9001,127.0.0.1:9002 --data-dir data/3
//! # a client: any node's address; requests are routed to the leader of the key's group
//! cargo run --release --example cluster -- client --addr 127.0.0.1:9001 put greeting hello
//! cargo run --release --example cluster -- client --addr 127.0.0.1:9001 get greeting
//! cargo run --release --example cluster -- client --addr 127.0.0.1:9001 status
//! # reads/s, batched writes/s and a 20 %-write mix, with median and p99 latency
//! cargo run --release --example cluster -- bench --addr 127.0.0.1:9001 --ops 100000
//! ```
//!
//! Node ids: `--peers` lists the other nodes as `host:port` (ids given to them in order from
//! the ids 1, 2, 3, ... other than `--id`) or as `id@host:port`. Node 1 initializes every group
//! with all nodes as voters the first time it starts, then spreads the groups' leadership over
//! the nodes. Only loopback addresses are accepted.
//!
//! `--memory-log` keeps the Raft logs in memory instead of the engine (nothing survives a
//! restart): the same cluster with the log store's cost removed, the ceiling to compare with.
//!
//! Protocol: every message is a little-endian u32 length and a bincode-encoded [`Request`] or
//! [`Response`]; a connection carries one request at a time.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::io;
use std::net::SocketAddr;
use std::ops::{Bound, RangeBounds};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use multiraft_wal::raft::kv::{KvRequest, KvSnapshotData, KvStateMachine, KvTypeConfig};
use multiraft_wal::raft::{GroupLogStore, SnapshotStore};
use multiraft_wal::{Engine, Options};
use openraft::error::{
    ClientWriteError, LinearizableReadError, RPCError, RaftError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::{
    BasicNode, Config, OptionalSend, Raft, RaftLogReader, RaftNetworkFactory, RaftNetworkV2,
    ReadPolicy, Snapshot, SnapshotPolicy,
};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type C = KvTypeConfig;
type Rf = Raft<C, KvStateMachine>;

// ---------------------------------------------------------------------------------------------
// Command line.

#[derive(Parser)]
#[command(about = "A 3-node replicated key-value store on multiraft-wal + openraft")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a node.
    Node(NodeArgs),
    /// Sends one request to the cluster.
    Client {
        /// Address of any node.
        #[arg(long, default_value = "127.0.0.1:9001")]
        addr: String,
        #[command(subcommand)]
        op: ClientOp,
    },
    /// Measures reads/s, batched writes/s and a 20 %-write mix.
    Bench(BenchArgs),
}

#[derive(Parser)]
struct NodeArgs {
    /// This node's id (1, 2, 3, ...).
    #[arg(long)]
    id: u64,
    /// Port to listen on (127.0.0.1 only).
    #[arg(long)]
    port: u16,
    /// The other nodes: `host:port` or `id@host:port`, comma-separated.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Data directory of this node's engine.
    #[arg(long, default_value = "cluster-data")]
    data_dir: PathBuf,
    /// Segment size of the engine, in bytes (suffixes k, m, g accepted).
    #[arg(long, default_value = "128m", value_parser = parse_size)]
    segment_size: u64,
    /// Number of Raft groups on this node.
    #[arg(long, default_value_t = 16)]
    groups: u64,
    /// Log filter (error, warn, info, debug, trace, or a tracing filter).
    #[arg(long, default_value = "warn")]
    log_level: String,
    /// Keep Raft logs in memory instead of the engine (the ceiling for benchmarks; nothing
    /// survives a restart).
    #[arg(long)]
    memory_log: bool,
}

#[derive(Subcommand)]
enum ClientOp {
    /// Sets a key.
    Put { key: String, value: String },
    /// Reads a key (linearizable, on the leader).
    Get { key: String },
    /// Shows members and the leader of every group.
    Status,
}

#[derive(Parser)]
struct BenchArgs {
    /// Address of any node.
    #[arg(long, default_value = "127.0.0.1:9001")]
    addr: String,
    /// Operations per workload (keys for the batched writes).
    #[arg(long, default_value_t = 100_000)]
    ops: usize,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Keys per batched write (one log entry).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Random seed.
    #[arg(long)]
    seed: Option<u64>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim().to_ascii_lowercase();
    let (digits, mult) = match s.trim_end_matches(['b', 'i']).chars().last() {
        Some('k') => (&s[..s.find('k').unwrap_or(0)], 1u64 << 10),
        Some('m') => (&s[..s.find('m').unwrap_or(0)], 1 << 20),
        Some('g') => (&s[..s.find('g').unwrap_or(0)], 1 << 30),
        _ => (s.as_str(), 1),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|e| format!("bad size {s:?}: {e}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

/// Accepts only loopback addresses; `localhost` becomes 127.0.0.1.
fn loopback(addr: &str) -> anyhow::Result<String> {
    let addr = addr.replace("localhost", "127.0.0.1");
    let sock: SocketAddr = addr
        .parse()
        .with_context(|| format!("bad address {addr:?}"))?;
    if !sock.ip().is_loopback() {
        bail!("{addr}: this example only talks to 127.0.0.1");
    }
    Ok(sock.to_string())
}

// ---------------------------------------------------------------------------------------------
// Wire protocol.

#[derive(Serialize, Deserialize)]
enum Request {
    Append {
        group: u64,
        rpc: AppendEntriesRequest<C>,
    },
    Vote {
        group: u64,
        rpc: VoteRequest<C>,
    },
    Snapshot {
        group: u64,
        vote: VoteOf<C>,
        meta: SnapshotMetaOf<C>,
        data: KvSnapshotData,
    },
    TransferLeader {
        group: u64,
        req: TransferLeaderRequest<C>,
    },
    Put {
        group: u64,
        key: String,
        value: String,
    },
    PutMany {
        group: u64,
        pairs: Vec<(String, String)>,
    },
    Get {
        group: u64,
        key: String,
    },
    Status,
}

#[derive(Serialize, Deserialize)]
enum Response {
    Append(Result<AppendEntriesResponse<C>, String>),
    Vote(Result<VoteResponse<C>, String>),
    Snapshot(Result<SnapshotResponse<C>, String>),
    TransferLeader(Result<TransferLeaderResponse<C>, String>),
    Value(Option<String>),
    /// This node does not lead the group; try the leader's address if known.
    NotLeader(Option<String>),
    Error(String),
    Status(Status),
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Status {
    id: u64,
    groups: u64,
    members: BTreeMap<u64, String>,
    /// Leader node id of each group, if known.
    leaders: BTreeMap<u64, Option<u64>>,
    memory_log: bool,
}

const MAX_FRAME: usize = 256 << 20;

async fn write_frame<T: Serialize>(stream: &mut TcpStream, msg: &T) -> io::Result<()> {
    let body = bincode::serde::encode_to_vec(msg, bincode::config::standard())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let len = u32::try_from(body.len()).map_err(|_| io::Error::other("frame too large"))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&body);
    stream.write_all(&buf).await
}

async fn read_frame<T: serde::de::DeserializeOwned>(stream: &mut TcpStream) -> io::Result<T> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    let (msg, _) = bincode::serde::decode_from_slice(&body, bincode::config::standard())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(msg)
}

/// A pool of connections to one address; each request takes a connection for its round trip.
#[derive(Clone)]
struct Peer {
    addr: String,
    idle: Arc<Mutex<Vec<TcpStream>>>,
}

impl Peer {
    fn new(addr: String) -> Self {
        Self {
            addr,
            idle: Arc::default(),
        }
    }

    async fn call(&self, req: &Request) -> io::Result<Response> {
        let pooled = self.idle.lock().pop();
        let mut stream = match pooled {
            Some(s) => s,
            None => {
                let s = TcpStream::connect(&self.addr).await?;
                s.set_nodelay(true)?;
                s
            }
        };
        write_frame(&mut stream, req).await?;
        let resp = read_frame(&mut stream).await?;
        self.idle.lock().push(stream);
        Ok(resp)
    }
}

// ---------------------------------------------------------------------------------------------
// Raft network over the wire protocol.

#[derive(Clone, Default)]
struct Peers {
    by_addr: Arc<Mutex<HashMap<String, Peer>>>,
}

impl Peers {
    fn get(&self, addr: &str) -> Peer {
        self.by_addr
            .lock()
            .entry(addr.to_string())
            .or_insert_with(|| Peer::new(addr.to_string()))
            .clone()
    }
}

struct Net {
    peers: Peers,
    group: u64,
}

impl RaftNetworkFactory<C> for Net {
    type Network = NetConn;
    async fn new_client(&mut self, _target: u64, node: &BasicNode) -> NetConn {
        NetConn {
            peer: self.peers.get(&node.addr),
            group: self.group,
        }
    }
}

struct NetConn {
    peer: Peer,
    group: u64,
}

fn unreachable(e: impl std::fmt::Display) -> Unreachable<C> {
    Unreachable::new(&io::Error::other(e.to_string()))
}

impl RaftNetworkV2<C> for NetConn {
    type SnapshotData = KvSnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        match self
            .peer
            .call(&Request::Append {
                group: self.group,
                rpc,
            })
            .await
        {
            Ok(Response::Append(Ok(r))) => Ok(r),
            Ok(Response::Append(Err(e))) => Err(RPCError::Unreachable(unreachable(e))),
            Ok(_) => Err(RPCError::Unreachable(unreachable("unexpected response"))),
            Err(e) => Err(RPCError::Unreachable(unreachable(e))),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<C>,
        _option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        match self
            .peer
            .call(&Request::Vote {
                group: self.group,
                rpc,
            })
            .await
        {
            Ok(Response::Vote(Ok(r))) => Ok(r),
            Ok(Response::Vote(Err(e))) => Err(RPCError::Unreachable(unreachable(e))),
            Ok(_) => Err(RPCError::Unreachable(unreachable("unexpected response"))),
            Err(e) => Err(RPCError::Unreachable(unreachable(e))),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<C>,
        _option: RPCOption,
    ) -> Result<TransferLeaderResponse<C>, RPCError<C>> {
        match self
            .peer
            .call(&Request::TransferLeader {
                group: self.group,
                req,
            })
            .await
        {
            Ok(Response::TransferLeader(Ok(r))) => Ok(r),
            Ok(Response::TransferLeader(Err(e))) => Err(RPCError::Unreachable(unreachable(e))),
            Ok(_) => Err(RPCError::Unreachable(unreachable("unexpected response"))),
            Err(e) => Err(RPCError::Unreachable(unreachable(e))),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, KvSnapshotData>,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let req = Request::Snapshot {
            group: self.group,
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot,
        };
        match self.peer.call(&req).await {
            Ok(Response::Snapshot(Ok(r))) => Ok(r),
            Ok(Response::Snapshot(Err(e))) => Err(StreamingError::Unreachable(unreachable(e))),
            Ok(_) => Err(StreamingError::Unreachable(unreachable(
                "unexpected response",
            ))),
            Err(e) => Err(StreamingError::Unreachable(unreachable(e))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The in-memory log store (`--memory-log`): the ceiling.

#[derive(Default)]
struct MemLogInner {
    log: BTreeMap<u64, EntryOf<C>>,
    vote: Option<VoteOf<C>>,
    committed: Option<LogIdOf<C>>,
    purged: Option<LogIdOf<C>>,
}

/// A log store that keeps everything in memory and reports appends durable at once.
#[derive(Clone, Default)]
struct MemLog {
    inner: Arc<Mutex<MemLogInner>>,
}

impl RaftLogReader<C> for MemLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<C>>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(&s) => Bound::Included(s),
            Bound::Excluded(&s) => Bound::Excluded(s),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => Bound::Included(e),
            Bound::Excluded(&e) => Bound::Excluded(e),
            Bound::Unbounded => Bound::Unbounded,
        };
        Ok(self
            .inner
            .lock()
            .log
            .range((start, end))
            .map(|(_, e)| e.clone())
            .collect())
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        Ok(self.inner.lock().vote)
    }
}

impl RaftLogStorage<C> for MemLog {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let inner = self.inner.lock();
        let last = inner
            .log
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(inner.purged);
        Ok(LogState {
            last_purged_log_id: inner.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        self.inner.lock().vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        self.inner.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        Ok(self.inner.lock().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        {
            let mut inner = self.inner.lock();
            for e in entries {
                inner.log.insert(e.log_id.index, e);
            }
        }
        callback.io_completed(Ok(()));
        Ok(())
    }

    async fn truncate_after(&mut self, last: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let from = last.map_or(0, |id| id.index + 1);
        self.inner.lock().log.split_off(&from);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        let mut inner = self.inner.lock();
        inner.log = inner.log.split_off(&(log_id.index + 1));
        inner.purged = Some(log_id);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Node.

/// The group a key belongs to: FNV-1a of the key, modulo the number of groups, plus one.
fn group_of(key: &str, groups: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h % groups + 1
}

struct NodeState {
    id: u64,
    groups: u64,
    rafts: BTreeMap<u64, Rf>,
    sms: BTreeMap<u64, KvStateMachine>,
    memory_log: bool,
}

impl NodeState {
    fn raft(&self, group: u64) -> Result<&Rf, String> {
        self.rafts
            .get(&group)
            .ok_or_else(|| format!("no group {group} on node {}", self.id))
    }

    fn leader_addr(&self, group: u64, leader: Option<u64>) -> Option<String> {
        let raft = self.rafts.get(&group)?;
        let m = raft.metrics();
        let m = openraft::async_runtime::watch::WatchReceiver::borrow_watched(&m);
        let id = leader.or(m.current_leader)?;
        m.membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    }

    async fn write(&self, group: u64, req: KvRequest) -> Response {
        let raft = match self.raft(group) {
            Ok(r) => r,
            Err(e) => return Response::Error(e),
        };
        match raft.client_write(req).await {
            Ok(resp) => Response::Value(resp.data.previous),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Response::NotLeader(self.leader_addr(group, f.leader_id))
            }
            Err(e) => Response::Error(e.to_string()),
        }
    }

    async fn handle(&self, req: Request) -> Response {
        match req {
            Request::Append { group, rpc } => match self.raft(group) {
                Ok(raft) => {
                    Response::Append(raft.append_entries(rpc).await.map_err(|e| e.to_string()))
                }
                Err(e) => Response::Append(Err(e)),
            },
            Request::Vote { group, rpc } => match self.raft(group) {
                Ok(raft) => Response::Vote(raft.vote(rpc).await.map_err(|e| e.to_string())),
                Err(e) => Response::Vote(Err(e)),
            },
            Request::Snapshot {
                group,
                vote,
                meta,
                data,
            } => match self.raft(group) {
                Ok(raft) => {
                    let snapshot = Snapshot {
                        meta,
                        snapshot: data,
                    };
                    Response::Snapshot(
                        raft.install_full_snapshot(vote, snapshot)
                            .await
                            .map_err(|e| e.to_string()),
                    )
                }
                Err(e) => Response::Snapshot(Err(e)),
            },
            Request::TransferLeader { group, req } => match self.raft(group) {
                Ok(raft) => Response::TransferLeader(
                    raft.handle_transfer_leader(req)
                        .await
                        .map_err(|e| e.to_string()),
                ),
                Err(e) => Response::TransferLeader(Err(e)),
            },
            Request::Put { group, key, value } => {
                self.write(group, KvRequest::Set { key, value }).await
            }
            Request::PutMany { group, pairs } => {
                self.write(group, KvRequest::SetMany { pairs }).await
            }
            Request::Get { group, key } => {
                let raft = match self.raft(group) {
                    Ok(r) => r,
                    Err(e) => return Response::Error(e),
                };
                match raft.ensure_linearizable(ReadPolicy::LeaseRead).await {
                    Ok(_) => Response::Value(self.sms.get(&group).and_then(|sm| sm.get(&key))),
                    Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f))) => {
                        Response::NotLeader(self.leader_addr(group, f.leader_id))
                    }
                    Err(e) => Response::Error(e.to_string()),
                }
            }
            Request::Status => {
                let mut members = BTreeMap::new();
                let mut leaders = BTreeMap::new();
                for (&group, raft) in &self.rafts {
                    let m = raft.metrics();
                    let m = openraft::async_runtime::watch::WatchReceiver::borrow_watched(&m);
                    leaders.insert(group, m.current_leader);
                    for (id, node) in m.membership_config.membership().nodes() {
                        members.insert(*id, node.addr.clone());
                    }
                }
                Response::Status(Status {
                    id: self.id,
                    groups: self.groups,
                    members,
                    leaders,
                    memory_log: self.memory_log,
                })
            }
        }
    }
}

async fn serve_connection(node: Arc<NodeState>, mut stream: TcpStream) {
    loop {
        let req: Request = match read_frame(&mut stream).await {
            Ok(r) => r,
            Err(_) => return, // closed or garbage: drop the connection
        };
        let resp = node.handle(req).await;
        if write_frame(&mut stream, &resp).await.is_err() {
            return;
        }
    }
}

fn parse_peers(me: u64, peers: &[String]) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut free = (1..).filter(|&i| i != me);
    let mut out = BTreeMap::new();
    for p in peers.iter().filter(|p| !p.is_empty()) {
        let (id, addr) = match p.split_once('@') {
            Some((id, addr)) => (
                id.parse()
                    .with_context(|| format!("bad peer id in {p:?}"))?,
                addr,
            ),
            None => (free.next().context("ids exhausted")?, p.as_str()),
        };
        if id == me || out.insert(id, loopback(addr)?).is_some() {
            bail!("peer id {id} is used twice");
        }
    }
    Ok(out)
}

async fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level).context("--log-level")?;
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let me = loopback(&format!("127.0.0.1:{}", args.port))?;
    let mut members = parse_peers(args.id, &args.peers)?;
    members.insert(args.id, me.clone());
    if args.groups == 0 {
        bail!("--groups must be at least 1");
    }

    let config = Arc::new(
        Config {
            cluster_name: "multiraft-wal-example".into(),
            heartbeat_interval: 100,
            election_timeout_min: 500,
            election_timeout_max: 1000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(10_000),
            max_in_snapshot_log_to_keep: 1_000,
            ..Default::default()
        }
        .validate()?,
    );

    let engine = if args.memory_log {
        None
    } else {
        let options = Options::default().segment_size(args.segment_size);
        let engine = Engine::open(&args.data_dir, options)
            .with_context(|| format!("opening {:?}", args.data_dir))?;
        let report = engine.recovery_report();
        println!(
            "node {}: engine opened in {:?}: {report:?}",
            args.id, args.data_dir
        );
        Some(engine)
    };

    let snapshots = SnapshotStore::open(args.data_dir.join("snapshots"))?;
    let peers = Peers::default();
    let mut rafts = BTreeMap::new();
    let mut sms = BTreeMap::new();
    for group in 1..=args.groups {
        let net = Net {
            peers: peers.clone(),
            group,
        };
        let (raft, sm) = match &engine {
            Some(engine) => {
                let sm = KvStateMachine::open_async(snapshots.clone(), group).await?;
                let log = GroupLogStore::<C>::new(engine.clone(), group);
                (
                    Raft::new(args.id, config.clone(), net, log, sm.clone()).await?,
                    sm,
                )
            }
            None => {
                let sm = KvStateMachine::new();
                (
                    Raft::new(args.id, config.clone(), net, MemLog::default(), sm.clone()).await?,
                    sm,
                )
            }
        };
        rafts.insert(group, raft);
        sms.insert(group, sm);
    }
    let node = Arc::new(NodeState {
        id: args.id,
        groups: args.groups,
        rafts,
        sms,
        memory_log: args.memory_log,
    });

    let listener = TcpListener::bind(&me)
        .await
        .with_context(|| format!("binding {me}"))?;
    println!(
        "node {} listening on {me}, {} groups, log in {}",
        args.id,
        args.groups,
        if args.memory_log {
            "memory".to_string()
        } else {
            format!("{:?}", args.data_dir)
        }
    );

    if args.id == 1 {
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(e) = initialize(&node, &members).await {
                eprintln!("initialization: {e:#}");
            }
        });
    }
    if let Some(engine) = engine.clone() {
        // Deletes segments every group has purged past (openraft purges after snapshots).
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                let engine = engine.clone();
                match tokio::task::spawn_blocking(move || engine.gc()).await {
                    Ok(Ok(report)) => tracing::debug!(?report, "engine gc"),
                    Ok(Err(e)) => tracing::warn!("engine gc: {e}"),
                    Err(e) => tracing::warn!("engine gc task: {e}"),
                }
            }
        });
    }

    let accept = async {
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            tokio::spawn(serve_connection(node.clone(), stream));
        }
        #[allow(unreachable_code)]
        io::Result::Ok(())
    };
    tokio::select! {
        r = accept => r?,
        _ = tokio::signal::ctrl_c() => println!("node {}: shutting down", args.id),
    }
    for raft in node.rafts.values() {
        let _ = raft.shutdown().await;
    }
    if let Some(engine) = engine {
        engine.sync()?;
    }
    Ok(())
}

/// Node 1, first start: initialize every group with all members, then move the leadership of
/// group g to member (g - 1) mod n, so that every node leads some groups.
async fn initialize(node: &NodeState, members: &BTreeMap<u64, String>) -> anyhow::Result<()> {
    let nodes: BTreeMap<u64, BasicNode> = members
        .iter()
        .map(|(&id, addr)| (id, BasicNode { addr: addr.clone() }))
        .collect();
    let ids: Vec<u64> = nodes.keys().copied().collect();
    for (&group, raft) in &node.rafts {
        if raft.is_initialized().await? {
            continue;
        }
        raft.initialize(nodes.clone()).await?;
        let Some(&target) = ids.get(((group - 1) % ids.len() as u64) as usize) else {
            continue;
        };
        if target == node.id {
            continue;
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let wait = raft.wait(Some(Duration::from_secs(60)));
            // Hand over once the target has the log (so the transfer can succeed).
            let ready = wait
                .metrics(
                    |m| {
                        m.replication
                            .as_ref()
                            .is_some_and(|r| r.get(&target).is_some_and(|x| x.is_some()))
                    },
                    "target replicated",
                )
                .await;
            if ready.is_ok() {
                let _ = raft.trigger().transfer_leader(target).await;
            }
        });
    }
    println!(
        "node {}: initialized groups with members {members:?}",
        node.id
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Client.

/// Routes each request to the leader of its group, learning leaders from the nodes' answers.
#[derive(Clone)]
struct Client {
    peers: Peers,
    members: BTreeMap<u64, String>,
    groups: u64,
    /// Leader address per group, when known.
    leaders: HashMap<u64, String>,
    seed: String,
}

impl Client {
    async fn connect(addr: &str) -> anyhow::Result<(Self, Status)> {
        let seed = loopback(addr)?;
        let peers = Peers::default();
        let status = match peers.get(&seed).call(&Request::Status).await? {
            Response::Status(s) => s,
            _ => bail!("unexpected answer to status"),
        };
        let leaders = status
            .leaders
            .iter()
            .filter_map(|(&g, l)| {
                l.and_then(|l| status.members.get(&l))
                    .map(|a| (g, a.clone()))
            })
            .collect();
        let client = Self {
            peers,
            members: status.members.clone(),
            groups: status.groups,
            leaders,
            seed,
        };
        Ok((client, status))
    }

    /// Sends `req` to the leader of `group`, following redirects and waiting out elections.
    async fn call(&mut self, group: u64, req: Request) -> anyhow::Result<Option<String>> {
        let mut last = String::new();
        for attempt in 0..50u32 {
            let addr = self.leaders.get(&group).cloned().unwrap_or_else(|| {
                // Unknown leader: try the members in turn.
                let ids: Vec<&String> = self.members.values().collect();
                ids.get(attempt as usize % ids.len().max(1))
                    .map_or(self.seed.clone(), |a| (*a).clone())
            });
            match self.peers.get(&addr).call(&req).await {
                Ok(Response::Value(v)) => {
                    self.leaders.insert(group, addr);
                    return Ok(v);
                }
                Ok(Response::NotLeader(Some(leader))) if leader != addr && attempt % 4 != 3 => {
                    // Follow the redirect at once (but not forever: leadership may be moving).
                    self.leaders.insert(group, leader);
                    continue;
                }
                Ok(Response::NotLeader(l)) => last = format!("{addr}: not the leader (hint {l:?})"),
                Ok(Response::Error(e)) => last = format!("{addr}: {e}"),
                Ok(_) => last = format!("{addr}: unexpected response"),
                Err(e) => last = format!("{addr}: {e}"),
            }
            self.leaders.remove(&group);
            // An election is under way or a node is down: back off briefly before retrying.
            tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt.min(10) + 1))).await;
        }
        bail!("group {group}: giving up after 50 attempts; last error: {last}")
    }

    async fn put(&mut self, key: String, value: String) -> anyhow::Result<Option<String>> {
        let group = group_of(&key, self.groups);
        self.call(group, Request::Put { group, key, value }).await
    }

    async fn put_many(&mut self, group: u64, pairs: Vec<(String, String)>) -> anyhow::Result<()> {
        self.call(group, Request::PutMany { group, pairs })
            .await
            .map(|_| ())
    }

    async fn get(&mut self, key: String) -> anyhow::Result<Option<String>> {
        let group = group_of(&key, self.groups);
        self.call(group, Request::Get { group, key }).await
    }
}

async fn run_client(addr: String, op: ClientOp) -> anyhow::Result<()> {
    let (mut client, status) = Client::connect(&addr).await?;
    match op {
        ClientOp::Put { key, value } => {
            let prev = client.put(key.clone(), value).await?;
            println!(
                "ok (group {}, previous value {prev:?})",
                group_of(&key, client.groups)
            );
        }
        ClientOp::Get { key } => match client.get(key.clone()).await? {
            Some(v) => println!("{v}"),
            None => {
                println!("(not found)");
                std::process::exit(1);
            }
        },
        ClientOp::Status => {
            println!(
                "asked node {}; log in {}",
                status.id,
                if status.memory_log {
                    "memory"
                } else {
                    "engine"
                }
            );
            println!("members: {:?}", status.members);
            for (g, l) in &status.leaders {
                println!("group {g}: leader {l:?}");
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Benchmark.

struct Report {
    name: &'static str,
    ops: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Report {
    fn print(mut self, unit: &str) {
        self.latencies.sort_unstable();
        let pick = |q: f64| {
            let i = ((self.latencies.len() as f64 * q) as usize)
                .min(self.latencies.len().saturating_sub(1));
            self.latencies.get(i).copied().unwrap_or_default()
        };
        println!(
            "{:<28} {:>10.0} {unit}/s   requests {:>7}   p50 {:>8.3} ms   p99 {:>8.3} ms   ({:.2} s)",
            self.name,
            self.ops as f64 / self.elapsed.as_secs_f64(),
            self.latencies.len(),
            pick(0.50).as_secs_f64() * 1e3,
            pick(0.99).as_secs_f64() * 1e3,
            self.elapsed.as_secs_f64(),
        );
    }
}

/// Runs `requests` requests over `concurrency` tasks; `make(i)` says what request `i` is.
async fn drive<F, Fut>(
    client: &Client,
    requests: usize,
    concurrency: usize,
    make: F,
) -> anyhow::Result<(Duration, Vec<Duration>)>
where
    F: Fn(Client, usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = anyhow::Result<Client>> + Send,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    let concurrency = concurrency.max(1);
    for t in 0..concurrency {
        let mut client = client.clone();
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = t;
            while i < requests {
                let t0 = Instant::now();
                client = make(client, i).await?;
                lat.push(t0.elapsed());
                i += concurrency;
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::with_capacity(requests);
    for task in tasks {
        all.extend(task.await??);
    }
    Ok((start.elapsed(), all))
}

async fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    let (client, status) = Client::connect(&args.addr).await?;
    let seed = args.seed.unwrap_or_else(rand::random);
    println!(
        "bench: {} ops, {} connections, batch {}, values {} B, {} groups, log in {}, seed {seed}",
        args.ops,
        args.concurrency,
        args.batch,
        args.value_size,
        client.groups,
        if status.memory_log {
            "MEMORY (ceiling)"
        } else {
            "multiraft-wal engine"
        }
    );
    let value: Arc<str> = "v".repeat(args.value_size).into();
    let groups = client.groups;
    let batch = args.batch.max(1);

    // Keys bucketed by group, so that a batch is one entry of one group.
    let mut buckets: Vec<Vec<String>> = vec![Vec::new(); groups as usize];
    let mut n = 0usize;
    let per_group = args.ops.div_ceil(groups as usize).div_ceil(batch) * batch;
    while buckets.iter().any(|b| b.len() < per_group) {
        let key = format!("bench-{seed}-{n}");
        n += 1;
        let g = (group_of(&key, groups) - 1) as usize;
        if let Some(b) = buckets.get_mut(g) {
            if b.len() < per_group {
                b.push(key);
            }
        }
    }
    let buckets = Arc::new(buckets);
    let batches_per_group = per_group / batch;
    let requests = batches_per_group * groups as usize;

    // 1. Batched writes: `batch` keys of one group per request (one log entry).
    let (elapsed, latencies) = {
        let buckets = buckets.clone();
        let value = value.clone();
        drive(&client, requests, args.concurrency, move |mut c, i| {
            let buckets = buckets.clone();
            let value = value.clone();
            async move {
                let g = i % groups as usize;
                let b = i / groups as usize;
                let keys = &buckets[g][b * batch..(b + 1) * batch];
                let pairs = keys
                    .iter()
                    .map(|k| (k.clone(), value.to_string()))
                    .collect();
                c.put_many(g as u64 + 1, pairs).await?;
                Ok(c)
            }
        })
        .await?
    };
    Report {
        name: "batched writes",
        ops: requests * batch,
        elapsed,
        latencies,
    }
    .print("keys");

    // 2. Reads of written keys (linearizable lease reads on the leaders).
    let all_keys: Arc<Vec<String>> = Arc::new(buckets.iter().flatten().cloned().collect());
    let (elapsed, latencies) = {
        let keys = all_keys.clone();
        drive(&client, args.ops, args.concurrency, move |mut c, i| {
            let keys = keys.clone();
            async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ i as u64);
                let key = keys[rng.gen_range(0..keys.len())].clone();
                if c.get(key.clone()).await?.is_none() {
                    bail!("key {key} was written but is missing");
                }
                Ok(c)
            }
        })
        .await?
    };
    Report {
        name: "reads",
        ops: args.ops,
        elapsed,
        latencies,
    }
    .print("reads");

    // 3. Mix: 20 % single-key writes, 80 % reads.
    let (elapsed, latencies) = {
        let keys = all_keys.clone();
        let value = value.clone();
        drive(&client, args.ops, args.concurrency, move |mut c, i| {
            let keys = keys.clone();
            let value = value.clone();
            async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (i as u64).rotate_left(17));
                let key = keys[rng.gen_range(0..keys.len())].clone();
                if rng.gen_bool(0.2) {
                    c.put(key, value.to_string()).await?;
                } else {
                    c.get(key).await?;
                }
                Ok(c)
            }
        })
        .await?
    };
    Report {
        name: "mixed (20% writes)",
        ops: args.ops,
        elapsed,
        latencies,
    }
    .print("ops");

    // 4. Unbatched writes, for reference: one key per request.
    let (elapsed, latencies) = {
        let keys = all_keys.clone();
        let value = value.clone();
        let ops = (args.ops / 4).max(1);
        drive(&client, ops, args.concurrency, move |mut c, i| {
            let keys = keys.clone();
            let value = value.clone();
            async move {
                c.put(keys[i % keys.len()].clone(), value.to_string())
                    .await?;
                Ok(c)
            }
        })
        .await?
    };
    let ops = latencies.len();
    Report {
        name: "single-key writes",
        ops,
        elapsed,
        latencies,
    }
    .print("writes");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Node(args) => rt.block_on(run_node(args)),
        Command::Client { addr, op } => rt.block_on(run_client(addr, op)),
        Command::Bench(args) => rt.block_on(run_bench(args)),
    }
}
