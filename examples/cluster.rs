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
//! the ids 1, 2, 3, ... other than `--id`) or as `id@host:port`. On its first start each node
//! waits until every member answers, then initializes the groups it is to lead (group g: the
//! ((g - 1) mod n)-th member) with all nodes as voters, so leadership is spread from the first
//! election on. Groups start concurrently. Only loopback addresses are accepted.
//!
//! Raft timing (`--heartbeat-ms`, `--election-min-ms`, `--election-max-ms`; defaults 500,
//! 1500, 3000): every group sends its own heartbeats, so the idle cost grows with the number of
//! groups; docs/ADAPTER.md has the measured idle CPU per 1,000 groups for several settings.
//!
//! `--memory-log` keeps the Raft logs in memory instead of the engine (nothing survives a
//! restart): the same cluster with the log store's cost removed, the ceiling to compare with.
//!
//! Transport: openraft-multi's `GroupNetworkAdapter` over a `GroupRouter` that keeps ONE TCP
//! connection per pair of nodes (and per client), shared by all groups. Frames are
//! length-delimited (tokio-util's `LengthDelimitedCodec`); each is a bincode-encoded
//! `(request id, Request)` or `(request id, Response)`, so any number of requests are in flight
//! on a connection and answers are matched by id. Snapshots travel in 1 MiB chunks. Accept and
//! connect errors are logged and retried (openraft retries RPCs), never fatal.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::io;
use std::net::SocketAddr;
use std::ops::{Bound, RangeBounds};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures::{SinkExt, StreamExt};
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
    BasicNode, Config, OptionalSend, Raft, RaftLogReader, RaftNetworkFactory, ReadPolicy, Snapshot,
    SnapshotPolicy,
};
use openraft_multi::{GroupNetworkAdapter, GroupNetworkFactory, GroupRouter};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

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
    /// Writes unique keys through the cluster until stopped or `--duration-s` passes; appends
    /// each acknowledged write to `--acked` (used by scripts/crash_cluster.sh).
    Load {
        /// Address of any node.
        #[arg(long, default_value = "127.0.0.1:9001")]
        addr: String,
        /// File to append "key value" lines to, one per acknowledged write.
        #[arg(long)]
        acked: PathBuf,
        #[arg(long, default_value_t = 60)]
        duration_s: u64,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// Reads back every write listed in `--acked` (linearizable reads on the leaders); exits
    /// with status 1 if any is missing or different.
    Verify {
        /// Address of any node.
        #[arg(long, default_value = "127.0.0.1:9001")]
        addr: String,
        #[arg(long)]
        acked: PathBuf,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// Waits until every node reports the same leader for every group; prints how long it took
    /// (used by scripts/election_storm.sh).
    WaitLeaders {
        /// Addresses of all nodes, comma-separated.
        #[arg(long, value_delimiter = ',')]
        addrs: Vec<String>,
        /// Give up after this many seconds (exit status 1).
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
    },
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
    /// Log filter (error, warn, info, debug, trace, or a tracing filter). Default: the
    /// `RUST_LOG` environment variable, else `warn`.
    #[arg(long)]
    log_level: Option<String>,
    /// Keep Raft logs in memory instead of the engine (the ceiling for benchmarks; nothing
    /// survives a restart).
    #[arg(long)]
    memory_log: bool,
    /// Heartbeat interval of every group, in ms.
    #[arg(long, default_value_t = 500)]
    heartbeat_ms: u64,
    /// Election timeout range of every group, in ms.
    #[arg(long, default_value_t = 1500)]
    election_min_ms: u64,
    #[arg(long, default_value_t = 3000)]
    election_max_ms: u64,
    /// Build a snapshot (and purge the log before it, keeping 1,000 entries) every this many
    /// log entries of a group.
    #[arg(long, default_value_t = 10_000)]
    snapshot_every: u64,
    /// Size of the chunks a snapshot is sent in, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    snapshot_chunk: usize,
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
// Wire protocol: one multiplexed TCP connection per pair of nodes (and per client).
//
// Frames are length-delimited (tokio-util's `LengthDelimitedCodec`: a big-endian u32 length,
// then the body). A body is a bincode-encoded `(id, Request)` or `(id, Response)`: any number
// of requests are in flight on one connection and each answer names the request it answers.
// Snapshots travel in chunks (`--snapshot-chunk`, 1 MiB by default), so a large one never holds the
// connection for long while the other groups' heartbeats wait behind it.

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
    PreVote {
        group: u64,
        rpc: VoteRequest<C>,
    },
    /// One chunk of a snapshot; the last one (`last` set) carries the vote and the meta and
    /// makes the receiver install what it assembled.
    SnapshotChunk {
        group: u64,
        /// Identifies the transfer (unique per sending node).
        transfer: u64,
        from: u64,
        offset: u64,
        data: Vec<u8>,
        last: Option<(VoteOf<C>, SnapshotMetaOf<C>)>,
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
    /// A chunk was stored (`None`) or the snapshot installed (`Some`).
    Snapshot(Result<Option<SnapshotResponse<C>>, String>),
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
    /// Current term of each group on this node.
    terms: BTreeMap<u64, u64>,
    /// Groups this node leads with a quorum acknowledgement since it became leader.
    confirmed: Vec<u64>,
    memory_log: bool,
}

const MAX_FRAME: usize = 64 << 20;
/// How long a request waits for its answer when the caller gives no deadline.
const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(10);

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

fn encode_frame<T: Serialize>(id: u64, msg: &T) -> io::Result<Bytes> {
    bincode::serde::encode_to_vec((id, msg), bincode::config::standard())
        .map(Bytes::from)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

fn decode_frame<T: serde::de::DeserializeOwned>(body: &[u8]) -> io::Result<(u64, T)> {
    bincode::serde::decode_from_slice(body, bincode::config::standard())
        .map(|(m, _)| m)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Sends the frames queued on `rx` to `sink`, flushing whenever the queue runs dry (so a burst
/// of requests leaves in few writes).
async fn write_frames(
    mut sink: FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
) -> io::Result<()> {
    while let Some(frame) = rx.recv().await {
        sink.feed(frame).await?;
        while let Ok(more) = rx.try_recv() {
            sink.feed(more).await?;
        }
        SinkExt::<Bytes>::flush(&mut sink).await?;
    }
    Ok(())
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

/// One live, multiplexed connection.
#[derive(Clone)]
struct Conn {
    tx: mpsc::UnboundedSender<Bytes>,
    pending: Pending,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The connection to one address, opened on first use and again after it breaks. Connect
/// errors are returned to the caller (openraft retries with backoff), never fatal.
#[derive(Clone)]
struct Peer {
    addr: String,
    conn: Arc<tokio::sync::Mutex<Option<Conn>>>,
    next_id: Arc<AtomicU64>,
}

impl Peer {
    fn new(addr: String) -> Self {
        Self {
            addr,
            conn: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    async fn connection(&self) -> io::Result<Conn> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let stream = TcpStream::connect(&self.addr).await?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let pending: Pending = Arc::default();
        let conn = Conn {
            tx,
            pending: pending.clone(),
        };
        let addr = self.addr.clone();
        tokio::spawn(async move {
            if let Err(e) = write_frames(FramedWrite::new(write, codec()), rx).await {
                tracing::debug!(%addr, "connection write: {e}");
            }
        });
        let addr = self.addr.clone();
        let closer = conn.tx.clone();
        tokio::spawn(async move {
            let mut frames = FramedRead::new(read, codec());
            loop {
                let body = match frames.next().await {
                    Some(Ok(b)) => b,
                    Some(Err(e)) => {
                        tracing::debug!(%addr, "connection read: {e}");
                        break;
                    }
                    None => break,
                };
                match decode_frame::<Response>(&body) {
                    Ok((id, resp)) => {
                        if let Some(waiter) = pending.lock().remove(&id) {
                            let _ = waiter.send(resp);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%addr, "undecodable response: {e}");
                        break;
                    }
                }
            }
            // Broken: fail every request still waiting, and make the next call reconnect.
            drop(closer);
            pending.lock().clear();
        });
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Sends `req` and waits at most `timeout` for its answer.
    async fn call_within(&self, req: &Request, timeout: Duration) -> io::Result<Response> {
        let conn = self.connection().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(id, req)?;
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().insert(id, tx);
        if conn.tx.send(frame).is_err() {
            conn.pending.lock().remove(&id);
            *self.conn.lock().await = None;
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("connection to {} closed", self.addr),
            ));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(_)) => {
                // The reader task ended: drop the connection so the next call reconnects.
                let mut slot = self.conn.lock().await;
                if slot.as_ref().is_some_and(|c| c.tx.same_channel(&conn.tx)) {
                    *slot = None;
                }
                Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("connection to {} broke", self.addr),
                ))
            }
            Err(_) => {
                conn.pending.lock().remove(&id);
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer from {} within {timeout:?}", self.addr),
                ))
            }
        }
    }

    async fn call(&self, req: &Request) -> io::Result<Response> {
        self.call_within(req, DEFAULT_RPC_TIMEOUT).await
    }
}

/// Serves one incoming connection: every request is handled in its own task, so a slow one
/// (a client write waiting for its commit) never holds up the heartbeats behind it.
async fn serve_connection(node: Arc<NodeState>, stream: TcpStream) {
    let (read, write) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_frames(FramedWrite::new(write, codec()), rx));
    let mut frames = FramedRead::new(read, codec());
    while let Some(Ok(body)) = frames.next().await {
        let (id, req) = match decode_frame::<Request>(&body) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("undecodable request, closing the connection: {e}");
                break;
            }
        };
        let node = node.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let resp = node.handle(req).await;
            match encode_frame(id, &resp) {
                Ok(frame) => {
                    let _ = tx.send(frame);
                }
                Err(e) => tracing::warn!("cannot encode a response: {e}"),
            }
        });
    }
    drop(tx);
    // Answers of requests still running go out as they finish; the writer ends after the last.
    let _ = writer.await;
}

// ---------------------------------------------------------------------------------------------
// Raft network: openraft-multi's `GroupNetworkAdapter` over a router sharing the connections.

/// The connections of this node, shared by every group: `GroupRouter` sends a group's RPC to
/// a node over the one connection to that node.
#[derive(Clone, Default)]
struct Router {
    by_addr: Arc<Mutex<HashMap<String, Peer>>>,
    /// Node id -> address, from the command line.
    members: Arc<BTreeMap<u64, String>>,
    me: u64,
    next_transfer: Arc<AtomicU64>,
    snapshot_chunk: usize,
}

impl Router {
    fn get(&self, addr: &str) -> Peer {
        self.by_addr
            .lock()
            .entry(addr.to_string())
            .or_insert_with(|| Peer::new(addr.to_string()))
            .clone()
    }

    fn peer_of(&self, target: u64) -> Result<Peer, Unreachable<C>> {
        let addr = self
            .members
            .get(&target)
            .ok_or_else(|| unreachable(format!("unknown node {target}")))?;
        Ok(self.get(addr))
    }

    async fn rpc(
        &self,
        target: u64,
        req: Request,
        option: &RPCOption,
    ) -> Result<Response, Unreachable<C>> {
        let peer = self.peer_of(target)?;
        peer.call_within(&req, option.hard_ttl())
            .await
            .map_err(unreachable)
    }
}

fn unreachable(e: impl std::fmt::Display) -> Unreachable<C> {
    Unreachable::new(&io::Error::other(e.to_string()))
}

impl GroupRouter<C, u64> for Router {
    type SnapshotData = KvSnapshotData;

    async fn append_entries(
        &self,
        target: u64,
        group: u64,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        match self
            .rpc(target, Request::Append { group, rpc }, &option)
            .await?
        {
            Response::Append(Ok(r)) => Ok(r),
            Response::Append(Err(e)) => Err(RPCError::Unreachable(unreachable(e))),
            _ => Err(RPCError::Unreachable(unreachable("unexpected response"))),
        }
    }

    async fn vote(
        &self,
        target: u64,
        group: u64,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        match self
            .rpc(target, Request::Vote { group, rpc }, &option)
            .await?
        {
            Response::Vote(Ok(r)) => Ok(r),
            Response::Vote(Err(e)) => Err(RPCError::Unreachable(unreachable(e))),
            _ => Err(RPCError::Unreachable(unreachable("unexpected response"))),
        }
    }

    async fn pre_vote(
        &self,
        target: u64,
        group: u64,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        match self
            .rpc(target, Request::PreVote { group, rpc }, &option)
            .await?
        {
            Response::Vote(Ok(r)) => Ok(r),
            Response::Vote(Err(e)) => Err(RPCError::Unreachable(unreachable(e))),
            _ => Err(RPCError::Unreachable(unreachable("unexpected response"))),
        }
    }

    async fn transfer_leader(
        &self,
        target: u64,
        group: u64,
        req: TransferLeaderRequest<C>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<C>, RPCError<C>> {
        match self
            .rpc(target, Request::TransferLeader { group, req }, &option)
            .await?
        {
            Response::TransferLeader(Ok(r)) => Ok(r),
            Response::TransferLeader(Err(e)) => Err(RPCError::Unreachable(unreachable(e))),
            _ => Err(RPCError::Unreachable(unreachable("unexpected response"))),
        }
    }

    async fn full_snapshot(
        &self,
        target: u64,
        group: u64,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, KvSnapshotData>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let peer = self.peer_of(target)?;
        let transfer = self.next_transfer.fetch_add(1, Ordering::Relaxed);
        let data = snapshot.snapshot;
        let send = async {
            let mut offset = 0usize;
            loop {
                let end = (offset + self.snapshot_chunk.max(1)).min(data.len());
                let last = end == data.len();
                let req = Request::SnapshotChunk {
                    group,
                    transfer,
                    from: self.me,
                    offset: offset as u64,
                    data: data[offset..end].to_vec(),
                    last: last.then(|| (vote, snapshot.meta.clone())),
                };
                match peer.call_within(&req, option.hard_ttl()).await {
                    Ok(Response::Snapshot(Ok(Some(r)))) if last => return Ok(r),
                    Ok(Response::Snapshot(Ok(None))) if !last => offset = end,
                    Ok(Response::Snapshot(Err(e))) => {
                        return Err(StreamingError::Unreachable(unreachable(e)))
                    }
                    Ok(_) => {
                        return Err(StreamingError::Unreachable(unreachable(
                            "unexpected response",
                        )))
                    }
                    Err(e) => return Err(StreamingError::Unreachable(unreachable(e))),
                }
            }
        };
        tokio::select! {
            r = send => r,
            closed = cancel => Err(StreamingError::Closed(closed)),
        }
    }
}

type Net = GroupNetworkFactory<Router, u64>;

/// `GroupNetworkFactory` only carries the router and the group: the connection for a target
/// is the router's, bound to (target, group) by openraft-multi's adapter.
struct NetFactory(Net);

impl RaftNetworkFactory<C> for NetFactory {
    type Network = GroupNetworkAdapter<C, u64, Router>;
    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> Self::Network {
        GroupNetworkAdapter::new(self.0.factory.clone(), target, self.0.group_id)
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

/// (sending node, transfer id) of a snapshot being received.
type TransferKey = (u64, u64);
/// A snapshot being received: (group, bytes so far, chunks so far).
type Incoming = (u64, Vec<u8>, u32);

struct NodeState {
    id: u64,
    groups: u64,
    rafts: BTreeMap<u64, Rf>,
    sms: BTreeMap<u64, KvStateMachine>,
    memory_log: bool,
    /// Snapshots being received: (sender, transfer) -> (group, bytes so far).
    incoming: Mutex<HashMap<TransferKey, Incoming>>,
}

impl NodeState {
    /// Stores one chunk of an incoming snapshot; on the last, installs the whole.
    async fn snapshot_chunk(
        &self,
        group: u64,
        key: (u64, u64),
        offset: u64,
        data: Vec<u8>,
        last: Option<(VoteOf<C>, SnapshotMetaOf<C>)>,
    ) -> Result<Option<SnapshotResponse<C>>, String> {
        let raft = self.raft(group)?;
        let assembled = {
            let mut incoming = self.incoming.lock();
            if offset == 0 {
                incoming.insert(key, (group, Vec::new(), 0));
            }
            let Some((g, buf, chunks)) = incoming.get_mut(&key) else {
                return Err(format!(
                    "snapshot transfer {key:?}: chunk at {offset} without a start"
                ));
            };
            if *g != group || buf.len() as u64 != offset {
                incoming.remove(&key);
                return Err(format!("snapshot transfer {key:?}: chunk out of order"));
            }
            buf.extend_from_slice(&data);
            *chunks += 1;
            if last.is_some() {
                incoming.remove(&key).map(|(_, b, n)| (b, n))
            } else {
                None
            }
        };
        match (last, assembled) {
            (Some((vote, meta)), Some((bytes, chunks))) => {
                println!(
                    "node {}: group {group}: installing a snapshot of {} bytes from node {} \
                     (last log id {:?}), received in {chunks} chunks",
                    self.id,
                    bytes.len(),
                    key.0,
                    meta.last_log_id
                );
                let snapshot = Snapshot {
                    meta,
                    snapshot: bytes,
                };
                raft.install_full_snapshot(vote, snapshot)
                    .await
                    .map(Some)
                    .map_err(|e| e.to_string())
            }
            _ => Ok(None),
        }
    }

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
            Request::PreVote { group, rpc } => match self.raft(group) {
                Ok(raft) => Response::Vote(raft.pre_vote(rpc).await.map_err(|e| e.to_string())),
                Err(e) => Response::Vote(Err(e)),
            },
            Request::SnapshotChunk {
                group,
                transfer,
                from,
                offset,
                data,
                last,
            } => Response::Snapshot(
                self.snapshot_chunk(group, (from, transfer), offset, data, last)
                    .await,
            ),
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
                let mut terms = BTreeMap::new();
                let mut confirmed = Vec::new();
                for (&group, raft) in &self.rafts {
                    let m = raft.metrics();
                    let m = openraft::async_runtime::watch::WatchReceiver::borrow_watched(&m);
                    leaders.insert(group, m.current_leader);
                    terms.insert(group, m.current_term);
                    if m.state == openraft::ServerState::Leader && m.last_quorum_acked.is_some() {
                        confirmed.push(group);
                    }
                    for (id, node) in m.membership_config.membership().nodes() {
                        members.insert(*id, node.addr.clone());
                    }
                }
                Response::Status(Status {
                    id: self.id,
                    groups: self.groups,
                    members,
                    leaders,
                    terms,
                    confirmed,
                    memory_log: self.memory_log,
                })
            }
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

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (what `kill` and service managers send), naming it.
/// A node then stops its groups and returns; the engine is sealed when its last handle drops
/// (a clean shutdown, reported as `clean_seal: true` by the next open).
async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

async fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    let filter = match &args.log_level {
        Some(level) => tracing_subscriber::EnvFilter::try_new(level).context("--log-level")?,
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .or_else(|_| tracing_subscriber::EnvFilter::try_new("warn"))
            .context("RUST_LOG")?,
    };
    // Colour codes only on a terminal: node logs usually go to files.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();

    let me = loopback(&format!("127.0.0.1:{}", args.port))?;
    let mut members = parse_peers(args.id, &args.peers)?;
    members.insert(args.id, me.clone());
    if args.groups == 0 {
        bail!("--groups must be at least 1");
    }

    // Raft timing for many groups: every group sends its own heartbeats, so their cost grows
    // with groups x 1/interval (see docs/ADAPTER.md for the measured idle CPU).
    let config = Arc::new(
        Config {
            cluster_name: "multiraft-wal-example".into(),
            heartbeat_interval: args.heartbeat_ms,
            election_timeout_min: args.election_min_ms,
            election_timeout_max: args.election_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(args.snapshot_every),
            max_in_snapshot_log_to_keep: 1_000.min(args.snapshot_every / 2),
            ..Default::default()
        }
        .validate()?,
    );

    let started = Instant::now();
    let (engine, snapshots) = if args.memory_log {
        (None, None)
    } else {
        let options = Options::default().segment_size(args.segment_size);
        let engine = Engine::open(&args.data_dir, options)
            .with_context(|| format!("opening {:?}", args.data_dir))?;
        let report = engine.recovery_report();
        println!(
            "node {}: engine opened in {:?}: {report:?}",
            args.id, args.data_dir
        );
        let snapshots = SnapshotStore::open(args.data_dir.join("snapshots"))?;
        (Some(engine), Some(snapshots))
    };

    let router = Router {
        by_addr: Arc::default(),
        members: Arc::new(members.clone()),
        me: args.id,
        next_transfer: Arc::default(),
        snapshot_chunk: args.snapshot_chunk.max(1),
    };
    // Start the groups concurrently.
    let mut starting = tokio::task::JoinSet::new();
    for group in 1..=args.groups {
        let net = NetFactory(GroupNetworkFactory::new(router.clone(), group));
        let (config, engine, snapshots, id) =
            (config.clone(), engine.clone(), snapshots.clone(), args.id);
        starting.spawn(async move {
            let started: anyhow::Result<(u64, Rf, KvStateMachine)> = match (engine, snapshots) {
                (Some(engine), Some(snapshots)) => {
                    let sm = KvStateMachine::open_async(snapshots, group).await?;
                    let log = GroupLogStore::<C>::new(engine, group);
                    let raft = Raft::new(id, config, net, log, sm.clone()).await?;
                    Ok((group, raft, sm))
                }
                _ => {
                    let sm = KvStateMachine::new();
                    let raft = Raft::new(id, config, net, MemLog::default(), sm.clone()).await?;
                    Ok((group, raft, sm))
                }
            };
            started
        });
    }
    let mut rafts = BTreeMap::new();
    let mut sms = BTreeMap::new();
    while let Some(joined) = starting.join_next().await {
        let (group, raft, sm) = joined??;
        rafts.insert(group, raft);
        sms.insert(group, sm);
    }
    println!(
        "node {}: {} groups started in {:.2} s",
        args.id,
        args.groups,
        started.elapsed().as_secs_f64()
    );
    let node = Arc::new(NodeState {
        id: args.id,
        groups: args.groups,
        rafts,
        sms,
        memory_log: args.memory_log,
        incoming: Mutex::default(),
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

    {
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
            // The first tick after 10 s, not at once: a node that just started has nothing to
            // collect, and a first start is busy electing leaders.
            let every = Duration::from_secs(10);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
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

    // Accept errors (out of file descriptors, a connection reset before accept) are logged and
    // retried: a node never exits because of one.
    let accept = async {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!("set_nodelay: {e}");
                    }
                    tokio::spawn(serve_connection(node.clone(), stream));
                }
                Err(e) => {
                    tracing::warn!("accept: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    };
    tokio::select! {
        _ = accept => {}
        signal = shutdown_signal() => println!("node {}: {signal}, shutting down", args.id),
    }
    for raft in node.rafts.values() {
        let _ = raft.shutdown().await;
    }
    if let Some(engine) = engine {
        engine.sync()?;
    }
    Ok(())
}

/// First start: each node initializes the groups it is to lead (group g goes to the
/// ((g - 1) mod n)-th member), with all members as voters. The leadership is spread over the
/// nodes from the first election on, with no leadership transfers (each would be a second
/// election). Groups already initialized (a restart) are left alone.
async fn initialize(node: &NodeState, members: &BTreeMap<u64, String>) -> anyhow::Result<()> {
    let nodes: BTreeMap<u64, BasicNode> = members
        .iter()
        .map(|(&id, addr)| (id, BasicNode { addr: addr.clone() }))
        .collect();
    let ids: Vec<u64> = nodes.keys().copied().collect();
    let mine: Vec<(u64, Rf)> = node
        .rafts
        .iter()
        .filter(|(&g, _)| ids.get(((g - 1) % ids.len() as u64) as usize) == Some(&node.id))
        .map(|(&g, r)| (g, r.clone()))
        .collect();
    let mut fresh = Vec::new();
    for (g, raft) in mine {
        if !raft.is_initialized().await? {
            fresh.push((g, raft));
        }
    }
    if fresh.is_empty() {
        return Ok(());
    }
    // Wait (up to a minute) until every member answers, so that the groups' first elections
    // do not fail on a node still starting and fall back to election timeouts.
    let probe = Router::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    for (&id, addr) in members.iter().filter(|(&id, _)| id != node.id) {
        while Instant::now() < deadline {
            match probe
                .get(addr)
                .call_within(&Request::Status, Duration::from_secs(1))
                .await
            {
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!("waiting for node {id} at {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    let count = fresh.len();
    let mut inits = tokio::task::JoinSet::new();
    for (_, raft) in fresh {
        let nodes = nodes.clone();
        inits.spawn(async move { raft.initialize(nodes).await });
    }
    while let Some(r) = inits.join_next().await {
        r??;
    }
    println!(
        "node {}: initialized {count} groups with members {members:?}, {:.2} s after start",
        node.id,
        START.get().map_or(0.0, |s| s.elapsed().as_secs_f64())
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Client.

/// Routes each request to the leader of its group, learning leaders from the nodes' answers.
#[derive(Clone)]
struct Client {
    peers: Router,
    members: BTreeMap<u64, String>,
    groups: u64,
    /// Leader address per group, when known.
    leaders: HashMap<u64, String>,
    seed: String,
}

impl Client {
    async fn connect(addr: &str) -> anyhow::Result<(Self, Status)> {
        let seed = loopback(addr)?;
        let peers = Router::default();
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

async fn run_load(
    addr: String,
    acked: PathBuf,
    duration: Duration,
    concurrency: usize,
) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let (client, _) = Client::connect(&addr).await?;
    let run: u64 = rand::random::<u32>().into();
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&acked)
        .await
        .with_context(|| format!("opening {acked:?}"))?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, String)>();
    let deadline = Instant::now() + duration;
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..concurrency.max(1) {
        let (mut c, tx, failed) = (client.clone(), tx.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let key = format!("crash-{run}-{t}-{n}");
                let value = format!("v-{run}-{t}-{n}");
                n += 1;
                match c.put(key.clone(), value.clone()).await {
                    Ok(_) => {
                        let _ = tx.send((key, value));
                    }
                    // Not acknowledged: it may or may not have been applied; not checked.
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    drop(tx);
    let mut count = 0u64;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            item = rx.recv() => match item {
                Some((k, v)) => {
                    // Recorded only after the cluster acknowledged it.
                    file.write_all(format!("{k} {v}\n").as_bytes()).await?;
                    file.flush().await?;
                    count += 1;
                }
                None => break,
            },
            _ = &mut stop => break,
        }
    }
    file.sync_all().await?;
    println!(
        "load: {count} acknowledged writes, {} not acknowledged",
        failed.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn run_verify(addr: String, acked: PathBuf, concurrency: usize) -> anyhow::Result<()> {
    let (client, _) = Client::connect(&addr).await?;
    let text = tokio::fs::read_to_string(&acked)
        .await
        .with_context(|| format!("reading {acked:?}"))?;
    let pairs: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let pairs = Arc::new(pairs);
    let next = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (mut c, pairs, next, bad) = (client.clone(), pairs.clone(), next.clone(), bad.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some((k, v)) = pairs.get(i) else { return };
                match c.get(k.clone()).await {
                    Ok(Some(got)) if got == *v => {}
                    Ok(got) => bad.lock().push(format!("{k}: expected {v}, read {got:?}")),
                    Err(e) => bad.lock().push(format!("{k}: read failed: {e}")),
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let bad = bad.lock();
    println!(
        "verify: {} acknowledged writes checked, {} missing or wrong",
        pairs.len(),
        bad.len()
    );
    for line in bad.iter().take(20) {
        println!("  {line}");
    }
    if !bad.is_empty() {
        bail!("{} acknowledged writes were lost", bad.len());
    }
    Ok(())
}

/// Polls every node's status until all of them know a leader for every group and agree on it.
async fn wait_leaders(addrs: Vec<String>, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    let router = Router::default();
    let addrs = addrs
        .iter()
        .map(|a| loopback(a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut last = String::from("no node answered yet");
    while start.elapsed() < timeout {
        let mut views = Vec::new();
        for addr in &addrs {
            match router
                .get(addr)
                .call_within(&Request::Status, Duration::from_secs(5))
                .await
            {
                Ok(Response::Status(s)) => views.push(s),
                Ok(_) => last = format!("{addr}: unexpected answer"),
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        if views.len() == addrs.len() {
            let groups = views[0].groups;
            let mut without = 0u64;
            let mut disagree = 0u64;
            // A group counts once one node leads it with a quorum acknowledgement since it
            // became leader, and every node names that node as leader in the same term (a
            // leader remembered from before a restart does not count).
            let confirmed: Vec<std::collections::HashSet<u64>> = views
                .iter()
                .map(|v| v.confirmed.iter().copied().collect())
                .collect();
            for g in 1..=groups {
                let seen: Vec<(Option<u64>, Option<u64>)> = views
                    .iter()
                    .map(|v| {
                        (
                            v.leaders.get(&g).copied().flatten(),
                            v.terms.get(&g).copied(),
                        )
                    })
                    .collect();
                let leader = seen[0].0;
                let leader_confirmed = leader.is_some_and(|l| {
                    views
                        .iter()
                        .zip(&confirmed)
                        .any(|(v, c)| v.id == l && c.contains(&g))
                });
                if seen.iter().any(|(l, _)| l.is_none()) || !leader_confirmed {
                    without += 1;
                } else if seen.iter().any(|s| *s != seen[0]) {
                    disagree += 1;
                }
            }
            if without == 0 && disagree == 0 {
                println!(
                    "all {groups} groups have one leader on all {} nodes after {:.2} s",
                    addrs.len(),
                    start.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            last = format!("{without} groups without a leader, {disagree} with disagreeing views");
            if std::env::var_os("WAIT_LEADERS_PROGRESS").is_some() {
                eprintln!("{:7.2} s: {last}", start.elapsed().as_secs_f64());
            }
        }
        // Every poll asks each node for the state of all its groups, which costs the nodes
        // CPU while they elect; the pause keeps that small, at the price of rounding the
        // measured time up by up to one pause.
        tokio::time::sleep(WAIT_LEADERS_POLL).await;
    }
    bail!("not every group had a leader after {timeout:?}: {last}")
}

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Pause between two rounds of `wait-leaders` status requests.
const WAIT_LEADERS_POLL: Duration = Duration::from_millis(100);

fn main() -> anyhow::Result<()> {
    START.get_or_init(Instant::now);
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Node(args) => rt.block_on(run_node(args)),
        Command::Client { addr, op } => rt.block_on(run_client(addr, op)),
        Command::Bench(args) => rt.block_on(run_bench(args)),
        Command::Load {
            addr,
            acked,
            duration_s,
            concurrency,
        } => rt.block_on(run_load(
            addr,
            acked,
            Duration::from_secs(duration_s),
            concurrency,
        )),
        Command::Verify {
            addr,
            acked,
            concurrency,
        } => rt.block_on(run_verify(addr, acked, concurrency)),
        Command::WaitLeaders { addrs, timeout_s } => {
            rt.block_on(wait_leaders(addrs, Duration::from_secs(timeout_s)))
        }
    }
}
