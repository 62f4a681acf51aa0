//! The reference key-value store's requests, responses and how a request changes the map: the
//! same for every openraft version.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

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

/// Applies `request` to `map`.
pub(crate) fn apply_request(map: &mut BTreeMap<String, String>, request: KvRequest) -> KvResponse {
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
