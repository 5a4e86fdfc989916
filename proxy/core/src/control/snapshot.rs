//! What the control service sends: a whole, versioned, content-hashed snapshot of what this
//! proxy should run (converted from its protobuf form at the edge), and [`overlay`], which
//! turns it into this proxy's config over the bootstrap file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use weft_proto::v1;

use super::state_dir::StateDir;
use crate::config::{
    ClusterConfig, Config, EndpointConfig, FailurePolicy, FilterConfig, FilterLimits,
    ListenerConfig,
};

/// A filter of a control snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotFilter {
    /// Name in the chain.
    pub name: String,
    /// `sha256:<hex>` of the module.
    pub digest: String,
    /// Root context id.
    pub root_id: String,
    /// VM id (filters of a chain with the same one share an instance).
    pub vm_id: String,
    /// Configuration for `on_configure`.
    pub config: serde_json::Value,
    /// What a failure of the filter does.
    pub failure_policy: FailurePolicy,
}

/// A chain of a control snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotChain {
    /// The resource's name.
    pub name: String,
    /// The listener it runs on.
    pub listener: String,
    /// The default cluster; empty keeps the bootstrap one.
    pub default_cluster: String,
    /// The filters.
    pub filters: Vec<SnapshotFilter>,
}

/// A cluster in a control snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotCluster {
    /// The cluster.
    pub name: String,
    /// Its endpoints.
    pub endpoints: Vec<EndpointConfig>,
    /// Its settings (a cluster of the config file without `name` and `endpoints`); `None`:
    /// the bootstrap's cluster of that name keeps its own, a new one gets the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<serde_json::Value>,
    /// Made by the control service for a registry service: left out, with a warning, where
    /// it cannot run (mesh TLS without an identity) or where the bootstrap has a cluster of
    /// that name.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub implicit: bool,
}

/// A listener in a control snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotListener {
    /// The listener.
    pub name: String,
    /// Its settings (a listener of the config file without `name` and `filters`).
    pub settings: serde_json::Value,
}

/// What the control service says this proxy should run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlSnapshot {
    /// Config version.
    pub version: u64,
    /// Content hash.
    pub hash: String,
    /// Chains.
    pub chains: Vec<SnapshotChain>,
    /// Clusters.
    pub clusters: Vec<SnapshotCluster>,
    /// Listeners.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<SnapshotListener>,
}

/// The hex part of a `sha256:<hex>` digest, if it is one.
pub(super) fn digest_hex(digest: &str) -> Option<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl TryFrom<v1::Snapshot> for ControlSnapshot {
    type Error = String;

    fn try_from(s: v1::Snapshot) -> Result<Self, String> {
        let chains = s
            .chains
            .into_iter()
            .map(|c| {
                let filters = c
                    .filters
                    .into_iter()
                    .map(|f| {
                        digest_hex(&f.digest).ok_or_else(|| {
                            format!("filter `{}`: bad module digest `{}`", f.name, f.digest)
                        })?;
                        let config = if f.config_json.is_empty() {
                            serde_json::Value::Null
                        } else {
                            serde_json::from_str(&f.config_json).map_err(|e| {
                                format!("filter `{}`: config is not JSON: {e}", f.name)
                            })?
                        };
                        let failure_policy: FailurePolicy = f
                            .failure_policy
                            .parse()
                            .map_err(|e| format!("filter `{}`: {e}", f.name))?;
                        Ok(SnapshotFilter {
                            name: f.name,
                            digest: f.digest,
                            root_id: f.root_id,
                            vm_id: f.vm_id,
                            config,
                            failure_policy,
                        })
                    })
                    .collect::<Result<_, String>>()?;
                Ok(SnapshotChain {
                    name: c.name,
                    listener: c.listener,
                    default_cluster: c.default_cluster,
                    filters,
                })
            })
            .collect::<Result<_, String>>()?;
        let clusters =
            s.clusters
                .into_iter()
                .map(|c| {
                    let endpoints =
                        c.endpoints
                            .into_iter()
                            .map(|e| {
                                Ok(EndpointConfig {
                                    identity: (!e.identity.is_empty()).then_some(e.identity),
                                    address: e.address.parse().map_err(|m| {
                                        format!("cluster `{}`: endpoint {m}", c.name)
                                    })?,
                                    weight: e.weight.max(1),
                                })
                            })
                            .collect::<Result<_, String>>()?;
                    let settings = if c.settings_json.is_empty() {
                        None
                    } else {
                        Some(serde_json::from_str(&c.settings_json).map_err(|e| {
                            format!("cluster `{}`: settings are not JSON: {e}", c.name)
                        })?)
                    };
                    Ok(SnapshotCluster {
                        name: c.name,
                        endpoints,
                        settings,
                        implicit: c.implicit,
                    })
                })
                .collect::<Result<_, String>>()?;
        let listeners = s
            .listeners
            .into_iter()
            .map(|l| {
                let settings = serde_json::from_str(&l.settings_json)
                    .map_err(|e| format!("listener `{}`: settings are not JSON: {e}", l.name))?;
                Ok(SnapshotListener {
                    name: l.name,
                    settings,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(ControlSnapshot {
            version: s.version,
            hash: s.hash,
            chains,
            clusters,
            listeners,
        })
    }
}

/// `base` with `snap` over it: each listener replaces the bootstrap's listener of its name
/// (keeping the bootstrap's filters unless a chain replaces them) or is added; each chain
/// replaces its listener's filters (and default cluster, when it names one); each cluster replaces the bootstrap's cluster of its name
/// (its endpoints, and its settings when it has some) or is added. Listeners and clusters
/// the snapshot does not mention keep the bootstrap's. A chain for a listener this proxy
/// does not have, two chains for one listener or two clusters of one name is an error. The
/// module files are not read here: see [`StateDir::check_modules`].
pub fn overlay(base: &Config, snap: &ControlSnapshot, dir: &StateDir) -> Result<Config, String> {
    let mut next = base.clone();
    // Listeners first: chains may run on the snapshot's listeners.
    let mut seen = std::collections::BTreeSet::new();
    for l in &snap.listeners {
        if !seen.insert(l.name.as_str()) {
            return Err(format!("listener `{}` appears twice", l.name));
        }
        let listener =
            ListenerConfig::from_settings(&l.name, Some(&l.settings), base.identity.is_some())
                .map_err(|e| format!("listener `{}`: {e}", l.name))?;
        match next.listeners.iter_mut().find(|k| k.name == l.name) {
            Some(bootstrap) => {
                *bootstrap = ListenerConfig {
                    filters: std::mem::take(&mut bootstrap.filters),
                    ..listener
                }
            }
            None => next.listeners.push(listener),
        }
    }
    let mut seen = BTreeMap::new();
    for c in &snap.chains {
        if let Some(other) = seen.insert(c.listener.as_str(), c.name.as_str()) {
            return Err(format!(
                "chains `{other}` and `{}` both select listener `{}`",
                c.name, c.listener
            ));
        }
        let l = next
            .listeners
            .iter_mut()
            .find(|l| l.name == c.listener)
            .ok_or_else(|| {
                format!(
                    "chain `{}`: this proxy has no listener `{}`",
                    c.name, c.listener
                )
            })?;
        if !c.default_cluster.is_empty() {
            l.default_cluster = c.default_cluster.clone();
        }
        l.filters = c
            .filters
            .iter()
            .map(|f| FilterConfig {
                name: f.name.clone(),
                module: dir.module_path(&f.digest),
                root_id: f.root_id.clone(),
                vm_id: f.vm_id.clone(),
                config: f.config.clone(),
                vm_config: serde_json::Value::Null,
                failure_policy: f.failure_policy,
                limits: FilterLimits::default(),
            })
            .collect();
    }
    let mut seen = std::collections::BTreeSet::new();
    for c in &snap.clusters {
        if !seen.insert(c.name.as_str()) {
            return Err(format!("cluster `{}` appears twice", c.name));
        }
        let bootstrap = next.clusters.iter_mut().find(|k| k.name == c.name);
        if c.implicit {
            let mesh = |k: &ClusterConfig| {
                k.tls
                    .as_ref()
                    .is_some_and(|t| t.mode == crate::config::ClusterTlsMode::Mesh)
            };
            // An identity is assumed here: the check that matters comes next.
            let cluster = ClusterConfig::from_settings(&c.name, c.settings.as_ref(), true)
                .map_err(|e| format!("cluster `{}`: {e}", c.name))?;
            if bootstrap.is_some() {
                tracing::debug!(cluster = %c.name, "the bootstrap's cluster of this name wins over the service's");
            } else if mesh(&cluster) && base.identity.is_none() {
                tracing::warn!(cluster = %c.name, "service left out: it takes mesh TLS and this proxy has no identity");
            } else {
                next.clusters.push(ClusterConfig {
                    endpoints: c.endpoints.clone(),
                    ..cluster
                });
            }
            continue;
        }
        match bootstrap {
            Some(cluster) => {
                if c.settings.is_some() {
                    *cluster = ClusterConfig::from_settings(
                        &c.name,
                        c.settings.as_ref(),
                        base.identity.is_some(),
                    )
                    .map_err(|e| format!("cluster `{}`: {e}", c.name))?;
                }
                cluster.endpoints = c.endpoints.clone();
            }
            None => next.clusters.push(ClusterConfig {
                endpoints: c.endpoints.clone(),
                ..ClusterConfig::from_settings(
                    &c.name,
                    c.settings.as_ref(),
                    base.identity.is_some(),
                )
                .map_err(|e| format!("cluster `{}`: {e}", c.name))?
            }),
        }
    }
    next.validate()
        .map_err(|(field, message)| format!("{field}: {message}"))?;
    Ok(next)
}
