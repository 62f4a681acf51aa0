//! A reference state machine: an ordered string map with snapshots.
//!
//! It exists for the tests and examples of this crate (and as a starting point for users); it
//! is the only state machine in the repository. The map lives in memory. Snapshots can
//! optionally be kept in the engine, in the key space of the group they belong to, so that a
//! node restarted from its data directory resumes from its last snapshot and openraft re-applies
//! the log after it (which is why the adapter persists the committed log id).
//!
//! Invariant: a persisted snapshot is durable (synced write) before `build_snapshot` or
//! `install_snapshot` returns, so openraft's purge of the log it covers, which comes after, can
//! never leave the group with neither the log nor the snapshot.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{EntryPayload, OptionalSend, StoredMembership};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::codec::bincode_decode as decode;
use crate::{Engine, WriteBatch};

openraft::declare_raft_types!(
    /// The type config of the reference key-value store: `u64` node ids, [`openraft::BasicNode`]
    /// (an address) for nodes, Tokio, and [`KvRequest`]/[`KvResponse`] as the application data.
    pub KvTypeConfig:
        D = KvRequest,
        R = KvResponse,
);

/// The key, in a group's key space, under which [`KvStateMachine::open`] keeps the snapshot.
pub const SNAPSHOT_KEY: &[u8] = b"kv/snapshot";

/// A change to the map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvRequest {
    /// Sets `key` to `value`.
    Set {
        /// The key.
        key: String,
        /// The new value.
        value: String,
    },
    /// Sets many keys at once (one log entry).
    SetMany {
        /// `(key, value)` pairs, applied in order.
        pairs: Vec<(String, String)>,
    },
    /// Removes `key`.
    Delete {
        /// The key.
        key: String,
    },
}

impl fmt::Display for KvRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvRequest::Set { key, value } => write!(f, "set {key}={value}"),
            KvRequest::SetMany { pairs } => write!(f, "set {} keys", pairs.len()),
            KvRequest::Delete { key } => write!(f, "delete {key}"),
        }
    }
}

/// The answer to a [`KvRequest`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvResponse {
    /// The previous value of the key (`Set`, `Delete`); `None` for `SetMany`.
    pub previous: Option<String>,
}

/// The snapshot data: the map, encoded with bincode 2.
pub type KvSnapshotData = Vec<u8>;

#[derive(Clone)]
struct StoredSnapshot {
    meta: SnapshotMetaOf<KvTypeConfig>,
    data: KvSnapshotData,
}

#[derive(Default)]
struct State {
    last_applied: Option<LogIdOf<KvTypeConfig>>,
    last_membership: StoredMembershipOf<KvTypeConfig>,
    map: BTreeMap<String, String>,
    snapshot: Option<StoredSnapshot>,
}

/// The reference key-value state machine. Cheap to clone; clones share the map, so keep one to
/// read while openraft owns another.
#[derive(Clone, Default)]
pub struct KvStateMachine {
    state: Arc<Mutex<State>>,
    /// Where snapshots are persisted, if anywhere.
    home: Option<(Engine, u64)>,
}

impl fmt::Debug for KvStateMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        f.debug_struct("KvStateMachine")
            .field("keys", &state.map.len())
            .field("last_applied", &state.last_applied)
            .field("persistent_group", &self.home.as_ref().map(|(_, g)| *g))
            .finish()
    }
}

fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    super::codec::bincode_encode(value, &mut out)?;
    Ok(out)
}

impl KvStateMachine {
    /// An empty, purely in-memory state machine (its snapshots are not persisted).
    pub fn new() -> Self {
        Self::default()
    }

    /// A state machine whose snapshots are kept in `engine` under [`SNAPSHOT_KEY`] of `group`;
    /// starts from the snapshot found there, if any.
    pub fn open(engine: Engine, group: u64) -> io::Result<Self> {
        let mut state = State::default();
        if let Some(bytes) = engine.get(group, SNAPSHOT_KEY) {
            let (meta, data): (SnapshotMetaOf<KvTypeConfig>, KvSnapshotData) =
                decode(&bytes, "stored snapshot")?;
            state.map = decode(&data, "snapshot data")?;
            state.last_applied = meta.last_log_id;
            state.last_membership = meta.last_membership.clone();
            state.snapshot = Some(StoredSnapshot { meta, data });
        }
        Ok(Self {
            state: Arc::new(Mutex::new(state)),
            home: Some((engine, group)),
        })
    }

    /// The value of `key`, as of the last applied entry.
    pub fn get(&self, key: &str) -> Option<String> {
        self.state.lock().map.get(key).cloned()
    }

    /// A copy of the whole map.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.state.lock().map.clone()
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.state.lock().map.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.state.lock().map.is_empty()
    }

    /// The log id of the last applied entry.
    pub fn last_applied(&self) -> Option<LogIdOf<KvTypeConfig>> {
        self.state.lock().last_applied
    }

    fn persist(&self, snapshot: &StoredSnapshot) -> io::Result<()> {
        let Some((engine, group)) = &self.home else {
            return Ok(());
        };
        let bytes = encode(&(&snapshot.meta, &snapshot.data))?;
        let mut batch = WriteBatch::new();
        batch.put(*group, SNAPSHOT_KEY, &bytes);
        engine
            .write(batch)
            .map_err(|e| io::Error::other(format!("persisting snapshot of group {group}: {e}")))
    }
}

fn apply_request(map: &mut BTreeMap<String, String>, request: KvRequest) -> KvResponse {
    match request {
        KvRequest::Set { key, value } => KvResponse {
            previous: map.insert(key, value),
        },
        KvRequest::SetMany { pairs } => {
            map.extend(pairs);
            KvResponse { previous: None }
        }
        KvRequest::Delete { key } => KvResponse {
            previous: map.remove(&key),
        },
    }
}

impl RaftSnapshotBuilder<KvTypeConfig> for KvStateMachine {
    type SnapshotData = KvSnapshotData;

    async fn build_snapshot(
        &mut self,
    ) -> Result<SnapshotOf<KvTypeConfig, KvSnapshotData>, io::Error> {
        let snapshot = {
            let state = self.state.lock();
            let data = encode(&state.map)?;
            let meta = SnapshotMetaOf::<KvTypeConfig> {
                last_log_id: state.last_applied,
                last_membership: state.last_membership.clone(),
            };
            StoredSnapshot { meta, data }
        };
        self.persist(&snapshot)?;
        self.state.lock().snapshot = Some(snapshot.clone());
        Ok(Snapshot {
            meta: snapshot.meta,
            snapshot: snapshot.data,
        })
    }
}

impl RaftStateMachine<KvTypeConfig> for KvStateMachine {
    type SnapshotData = KvSnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogIdOf<KvTypeConfig>>,
            StoredMembershipOf<KvTypeConfig>,
        ),
        io::Error,
    > {
        let state = self.state.lock();
        Ok((state.last_applied, state.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<KvTypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let response = {
                let mut state = self.state.lock();
                state.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => KvResponse::default(),
                    EntryPayload::Normal(request) => apply_request(&mut state.map, request),
                    EntryPayload::Membership(membership) => {
                        state.last_membership =
                            StoredMembership::new(Some(entry.log_id), membership);
                        KvResponse::default()
                    }
                }
            };
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<KvTypeConfig>,
        snapshot: KvSnapshotData,
    ) -> Result<(), io::Error> {
        let map: BTreeMap<String, String> = decode(&snapshot, "snapshot data")?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot,
        };
        self.persist(&stored)?;
        let mut state = self.state.lock();
        state.map = map;
        state.last_applied = meta.last_log_id;
        state.last_membership = meta.last_membership.clone();
        state.snapshot = Some(stored);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<KvTypeConfig, KvSnapshotData>>, io::Error> {
        let state = self.state.lock();
        Ok(state.snapshot.clone().map(|s| Snapshot {
            meta: s.meta,
            snapshot: s.data,
        }))
    }
}
