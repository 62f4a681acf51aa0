//! A reference state machine: an ordered string map with snapshots.
//!
//! It exists for the tests and examples of this crate (and as a starting point for users); it
//! is the only state machine in the repository. The map lives in memory. Snapshots can
//! optionally be kept in a [`SnapshotStore`] (files apart from the engine), so that a node
//! restarted from its data directory resumes from its last snapshot and openraft re-applies
//! the log after it (which is why the adapter persists the committed log id).
//!
//! Invariants:
//! - A persisted snapshot is durable (file fsynced, renamed, directory fsynced) before
//!   `build_snapshot` or `install_snapshot` returns, so openraft's purge of the log it covers,
//!   which comes after, can never leave the group with neither the log nor the snapshot.
//! - No lock is held while a snapshot is encoded or decoded: the map is shared copy-on-write
//!   (`Arc`), so `build_snapshot` takes a reference under the lock and encodes after releasing
//!   it; an `apply` meanwhile copies the map once instead of waiting.
//! - With a store, encoding, decoding and file I/O run on the store's worker threads: no async
//!   runtime thread blocks on them. Without one (`KvStateMachine::new`), encoding runs inline.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{EntryPayload, OptionalSend, StoredMembership};
use parking_lot::Mutex;
use serde::Serialize;

use crate::raft_shared::codec::bincode_decode as decode;
use crate::raft_shared::kv::apply_request;
use crate::raft_shared::snapshot::{SnapshotError, SnapshotStore};

openraft::declare_raft_types!(
    /// The type config of the reference key-value store: `u64` node ids, [`openraft::BasicNode`]
    /// (an address) for nodes, Tokio, and [`KvRequest`]/[`KvResponse`] as the application data.
    pub KvTypeConfig:
        D = KvRequest,
        R = KvResponse,
);

pub use crate::raft_shared::kv::{KvRequest, KvResponse};

/// The snapshot data: the map, encoded with bincode 2.
pub type KvSnapshotData = Vec<u8>;

type Meta = SnapshotMetaOf<KvTypeConfig>;
type Map = BTreeMap<String, String>;

#[derive(Default)]
struct State {
    last_applied: Option<LogIdOf<KvTypeConfig>>,
    last_membership: StoredMembershipOf<KvTypeConfig>,
    /// Copy-on-write: a snapshot being encoded holds a clone of the `Arc`.
    map: Arc<Map>,
    /// The meta of the current snapshot.
    snapshot_meta: Option<Meta>,
    /// The current snapshot's data, kept in memory only when there is no store.
    snapshot_data: Option<Arc<KvSnapshotData>>,
}

/// The reference key-value state machine. Cheap to clone; clones share the map, so keep one to
/// read while openraft owns another.
#[derive(Clone, Default)]
pub struct KvStateMachine {
    state: Arc<Mutex<State>>,
    /// Where snapshots are persisted, if anywhere: the store and this machine's group.
    home: Option<(SnapshotStore, u64)>,
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
    crate::raft_shared::codec::bincode_encode(value, &mut out)?;
    Ok(out)
}

/// Encodes the map and the meta (CPU work: run it off the runtime when there is a store).
fn encode_snapshot(meta: &Meta, map: &Map) -> io::Result<(Vec<u8>, KvSnapshotData)> {
    Ok((encode(meta)?, encode(map)?))
}

fn to_store_err(e: io::Error) -> SnapshotError {
    SnapshotError::Io {
        context: "encoding or decoding a snapshot".into(),
        source: e,
    }
}

impl KvStateMachine {
    /// An empty, purely in-memory state machine (its snapshots are not persisted).
    pub fn new() -> Self {
        Self::default()
    }

    /// A state machine whose snapshots are kept in `store` for `group`; starts from the newest
    /// snapshot found there, if any. Blocks to read it: from async code use
    /// [`KvStateMachine::open_async`].
    ///
    /// # Errors
    ///
    /// An I/O error reading the snapshot, `InvalidData` if the stored snapshot does not decode.
    pub fn open(store: SnapshotStore, group: u64) -> io::Result<Self> {
        let stored = store.load(group)?;
        Self::from_stored(store, group, stored.map(|s| (s.meta, s.data)))
    }

    /// [`KvStateMachine::open`] without blocking the caller's thread: the snapshot is read on
    /// the store's worker threads.
    ///
    /// # Errors
    ///
    /// An I/O error reading the snapshot, `InvalidData` if the stored snapshot does not decode.
    pub async fn open_async(store: SnapshotStore, group: u64) -> io::Result<Self> {
        let stored = store.load_async(group).await?;
        Self::from_stored(store, group, stored.map(|s| (s.meta, s.data)))
    }

    fn from_stored(
        store: SnapshotStore,
        group: u64,
        stored: Option<(Vec<u8>, Vec<u8>)>,
    ) -> io::Result<Self> {
        let mut state = State::default();
        if let Some((meta, data)) = stored {
            let meta: Meta = decode(&meta, "snapshot meta")?;
            let map: Map = decode(&data, "snapshot data")?;
            state.map = Arc::new(map);
            state.last_applied = meta.last_log_id;
            state.last_membership = meta.last_membership.clone();
            state.snapshot_meta = Some(meta);
        }
        Ok(Self {
            state: Arc::new(Mutex::new(state)),
            home: Some((store, group)),
        })
    }

    /// The value of `key`, as of the last applied entry.
    pub fn get(&self, key: &str) -> Option<String> {
        self.state.lock().map.get(key).cloned()
    }

    /// A copy of the whole map.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let map = self.state.lock().map.clone();
        (*map).clone()
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

    /// The meta of the current snapshot, if any.
    pub fn snapshot_meta(&self) -> Option<SnapshotMetaOf<KvTypeConfig>> {
        self.state.lock().snapshot_meta.clone()
    }

    /// Records `meta` as the current snapshot unless a newer one is already current.
    fn set_current(&self, meta: Meta, data: Option<Arc<KvSnapshotData>>) {
        let mut state = self.state.lock();
        let newer = state
            .snapshot_meta
            .as_ref()
            .is_some_and(|m| m.last_log_id > meta.last_log_id);
        if !newer {
            state.snapshot_meta = Some(meta);
            if self.home.is_none() {
                state.snapshot_data = data;
            }
        }
    }
}

impl RaftSnapshotBuilder<KvTypeConfig> for KvStateMachine {
    type SnapshotData = KvSnapshotData;

    async fn build_snapshot(
        &mut self,
    ) -> Result<SnapshotOf<KvTypeConfig, KvSnapshotData>, io::Error> {
        // Under the lock: an `Arc` clone and the meta, nothing proportional to the map.
        let (meta, map) = {
            let state = self.state.lock();
            let meta = Meta {
                last_log_id: state.last_applied,
                last_membership: state.last_membership.clone(),
            };
            (meta, state.map.clone())
        };
        let data = match &self.home {
            Some((store, group)) => {
                let (store, group) = (store.clone(), *group);
                let meta = meta.clone();
                // Encode and store on the store's workers; durable when this resolves.
                store
                    .clone()
                    .run(move || {
                        let (meta_bytes, data) =
                            encode_snapshot(&meta, &map).map_err(to_store_err)?;
                        store.save(group, &meta_bytes, &data)?;
                        Ok(data)
                    })
                    .await?
            }
            None => encode(&*map)?,
        };
        let data = Arc::new(data);
        self.set_current(meta.clone(), Some(data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Arc::unwrap_or_clone(data),
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
                    EntryPayload::Normal(request) => {
                        // Copies the map only if a snapshot is being encoded from it right now.
                        apply_request(Arc::make_mut(&mut state.map), request)
                    }
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
        let meta = meta.clone();
        let (map, data) = match &self.home {
            Some((store, group)) => {
                let (store, group) = (store.clone(), *group);
                let meta = meta.clone();
                // Decode (checks the bytes before anything is replaced), then store durably.
                store
                    .clone()
                    .run(move || {
                        let map: Map = decode(&snapshot, "snapshot data").map_err(to_store_err)?;
                        let meta_bytes = encode(&meta).map_err(to_store_err)?;
                        store.save(group, &meta_bytes, &snapshot)?;
                        Ok((map, None))
                    })
                    .await?
            }
            None => {
                let map: Map = decode(&snapshot, "snapshot data")?;
                (map, Some(Arc::new(snapshot)))
            }
        };
        {
            let mut state = self.state.lock();
            state.map = Arc::new(map);
            state.last_applied = meta.last_log_id;
            state.last_membership = meta.last_membership.clone();
        }
        self.set_current(meta, data);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<KvTypeConfig, KvSnapshotData>>, io::Error> {
        match &self.home {
            Some((store, group)) => {
                let Some(stored) = store.load_async(*group).await? else {
                    return Ok(None);
                };
                let meta: Meta = decode(&stored.meta, "snapshot meta")?;
                Ok(Some(Snapshot {
                    meta,
                    snapshot: stored.data,
                }))
            }
            None => {
                let state = self.state.lock();
                Ok(match (&state.snapshot_meta, &state.snapshot_data) {
                    (Some(meta), Some(data)) => Some(Snapshot {
                        meta: meta.clone(),
                        snapshot: (**data).clone(),
                    }),
                    _ => None,
                })
            }
        }
    }
}
