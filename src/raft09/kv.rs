//! The reference key-value state machine for openraft 0.9: the same map, requests and snapshot
//! store as the 0.10 one ([`crate::raft::kv`]), on 0.9's `RaftStateMachine`.
//!
//! Invariants: a persisted snapshot is durable (file fsynced, renamed, directory fsynced) before
//! `build_snapshot` or `install_snapshot` returns; no lock is held while a snapshot is encoded
//! or decoded (the map is shared copy-on-write); with a store, encoding, decoding and file I/O
//! run on the store's worker threads, never on a runtime thread.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Cursor};
use std::sync::Arc;

use openraft09::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot, SnapshotMeta};
use openraft09::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, StorageError, StorageIOError,
    StoredMembership,
};
use parking_lot::Mutex;

use crate::raft_shared::codec::{bincode_decode as decode, bincode_encode};
use crate::raft_shared::kv::apply_request;
pub use crate::raft_shared::kv::{KvRequest, KvResponse};
use crate::raft_shared::snapshot::{SnapshotError, SnapshotStore};

openraft09::declare_raft_types!(
    /// The type config of the reference key-value store on openraft 0.9: `u64` node ids,
    /// `BasicNode`, Tokio, `Cursor<Vec<u8>>` snapshots, [`KvRequest`]/[`KvResponse`].
    pub KvTypeConfig:
        D = KvRequest,
        R = KvResponse,
);

type Nid = u64;
type Meta = SnapshotMeta<Nid, openraft09::BasicNode>;
type Map = BTreeMap<String, String>;

#[derive(Default)]
struct State {
    last_applied: Option<LogId<Nid>>,
    last_membership: StoredMembership<Nid, openraft09::BasicNode>,
    map: Arc<Map>,
    snapshot_meta: Option<Meta>,
    /// The current snapshot's data, kept in memory only when there is no store.
    snapshot_data: Option<Arc<Vec<u8>>>,
    /// Snapshots built so far (for unique snapshot ids).
    built: u64,
}

/// The reference key-value state machine for openraft 0.9. Cheap to clone; clones share the
/// map.
#[derive(Clone, Default)]
pub struct KvStateMachine {
    state: Arc<Mutex<State>>,
    home: Option<(SnapshotStore, u64)>,
}

impl fmt::Debug for KvStateMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        f.debug_struct("KvStateMachine09")
            .field("keys", &state.map.len())
            .field("last_applied", &state.last_applied)
            .finish()
    }
}

fn encode<T: serde::Serialize>(value: &T) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    bincode_encode(value, &mut out)?;
    Ok(out)
}

fn sm_err(e: impl std::error::Error + 'static) -> StorageError<Nid> {
    StorageIOError::write_state_machine(AnyError::new(&e)).into()
}

fn snap_err(e: impl std::error::Error + 'static) -> StorageError<Nid> {
    StorageIOError::write_snapshot(None, AnyError::new(&e)).into()
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
    /// snapshot there. Reads it on the store's worker threads.
    ///
    /// # Errors
    ///
    /// An I/O error reading the snapshot, `InvalidData` if the stored snapshot does not decode.
    pub async fn open_async(store: SnapshotStore, group: u64) -> io::Result<Self> {
        let stored = store.load_async(group).await?;
        let mut state = State::default();
        if let Some(stored) = stored {
            let meta: Meta = decode(&stored.meta, "snapshot meta")?;
            let map: Map = decode(&stored.data, "snapshot data")?;
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

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.state.lock().map.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.state.lock().map.is_empty()
    }

    /// The log id of the last applied entry.
    pub fn last_applied(&self) -> Option<LogId<Nid>> {
        self.state.lock().last_applied
    }

    fn set_current(&self, meta: Meta, data: Option<Arc<Vec<u8>>>) {
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
    async fn build_snapshot(&mut self) -> Result<Snapshot<KvTypeConfig>, StorageError<Nid>> {
        let (meta, map) = {
            let mut state = self.state.lock();
            state.built += 1;
            let snapshot_id = match &state.last_applied {
                Some(id) => format!("{}-{}-{}", id.leader_id, id.index, state.built),
                None => format!("none-{}", state.built),
            };
            let meta = Meta {
                last_log_id: state.last_applied,
                last_membership: state.last_membership.clone(),
                snapshot_id,
            };
            (meta, state.map.clone())
        };
        let data = match &self.home {
            Some((store, group)) => {
                let (store, group, m) = (store.clone(), *group, meta.clone());
                store
                    .clone()
                    .run(move || {
                        let meta_bytes = encode(&m).map_err(to_store_err)?;
                        let data = encode(&*map).map_err(to_store_err)?;
                        store.save(group, &meta_bytes, &data)?;
                        Ok(data)
                    })
                    .await
                    .map_err(snap_err)?
            }
            None => encode(&*map).map_err(snap_err)?,
        };
        let data = Arc::new(data);
        self.set_current(meta.clone(), Some(data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(Arc::unwrap_or_clone(data))),
        })
    }
}

impl RaftStateMachine<KvTypeConfig> for KvStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<Nid>>,
            StoredMembership<Nid, openraft09::BasicNode>,
        ),
        StorageError<Nid>,
    > {
        let state = self.state.lock();
        Ok((state.last_applied, state.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<KvResponse>, StorageError<Nid>>
    where
        I: IntoIterator<Item = Entry<KvTypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        let mut state = self.state.lock();
        for entry in entries {
            state.last_applied = Some(entry.log_id);
            responses.push(match entry.payload {
                EntryPayload::Blank => KvResponse::default(),
                EntryPayload::Normal(request) => {
                    apply_request(Arc::make_mut(&mut state.map), request)
                }
                EntryPayload::Membership(membership) => {
                    state.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                    KvResponse::default()
                }
            });
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<Nid>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<Nid>> {
        let bytes = snapshot.into_inner();
        let meta = meta.clone();
        let (map, data) = match &self.home {
            Some((store, group)) => {
                let (store, group, m) = (store.clone(), *group, meta.clone());
                store
                    .clone()
                    .run(move || {
                        let map: Map = decode(&bytes, "snapshot data").map_err(to_store_err)?;
                        let meta_bytes = encode(&m).map_err(to_store_err)?;
                        store.save(group, &meta_bytes, &bytes)?;
                        Ok((map, None))
                    })
                    .await
                    .map_err(snap_err)?
            }
            None => {
                let map: Map = decode(&bytes, "snapshot data").map_err(sm_err)?;
                (map, Some(Arc::new(bytes)))
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
    ) -> Result<Option<Snapshot<KvTypeConfig>>, StorageError<Nid>> {
        match &self.home {
            Some((store, group)) => {
                let Some(stored) = store.load_async(*group).await.map_err(snap_err)? else {
                    return Ok(None);
                };
                let meta: Meta = decode(&stored.meta, "snapshot meta").map_err(snap_err)?;
                Ok(Some(Snapshot {
                    meta,
                    snapshot: Box::new(Cursor::new(stored.data)),
                }))
            }
            None => {
                let state = self.state.lock();
                Ok(match (&state.snapshot_meta, &state.snapshot_data) {
                    (Some(meta), Some(data)) => Some(Snapshot {
                        meta: meta.clone(),
                        snapshot: Box::new(Cursor::new((**data).clone())),
                    }),
                    _ => None,
                })
            }
        }
    }
}
