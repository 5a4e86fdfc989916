//! A proxy's snapshot: the chains and cluster endpoints that select it, as of one config
//! version, with a content hash so that an unchanged snapshot is never sent twice.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::model::{Endpoint, FilterSpec};

/// A chain as a proxy runs it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SnapshotChain {
    /// The resource's name.
    pub name: String,
    /// The listener.
    pub listener: String,
    /// The default cluster; empty keeps the proxy's.
    pub default_cluster: String,
    /// The filters, modules as digests.
    pub filters: Vec<FilterSpec>,
}

/// A cluster as of the snapshot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SnapshotCluster {
    /// The cluster.
    pub name: String,
    /// Fixed endpoints and live registry instances, sorted.
    pub endpoints: Vec<Endpoint>,
    /// Its settings, if its resource has some.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settings: Option<serde_json::Value>,
    /// Made for a registry service no Cluster resource names.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub implicit: bool,
}

/// A listener as of the snapshot.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SnapshotListener {
    /// The listener.
    pub name: String,
    /// Its settings.
    pub settings: serde_json::Value,
}

/// Everything one proxy should run.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The config version it was made at.
    pub version: u64,
    /// sha256 (hex) of the content.
    pub hash: String,
    /// The chains.
    pub chains: Vec<SnapshotChain>,
    /// The clusters.
    pub clusters: Vec<SnapshotCluster>,
    /// The listeners.
    pub listeners: Vec<SnapshotListener>,
}

impl Snapshot {
    /// A snapshot and its hash.
    pub fn new(
        version: u64,
        chains: Vec<SnapshotChain>,
        clusters: Vec<SnapshotCluster>,
        listeners: Vec<SnapshotListener>,
    ) -> Self {
        // Listeners hash only when there are some: snapshots without them keep the hash
        // they had before listeners could be in one.
        let content = if listeners.is_empty() {
            serde_json::to_vec(&(&chains, &clusters))
        } else {
            serde_json::to_vec(&(&chains, &clusters, &listeners))
        }
        .unwrap_or_default();
        Snapshot {
            version,
            hash: hex::encode(Sha256::digest(content)),
            chains,
            clusters,
            listeners,
        }
    }
}
