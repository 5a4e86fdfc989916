//! Clusters: a cluster's settings, its endpoint set (behind an atomic pointer, replaced whole)
//! and the counters its limits are enforced on — the state every worker shares about an
//! upstream service.
//!
//! Everything here is updated with relaxed atomics from all workers; nothing takes a lock.
//! Per-worker state (connection pools, round-robin positions) lives in [`crate::upstream::pool`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use crate::config::SpiffeId;
use crate::config::{
    ClusterConfig, EndpointConfig, LbPolicy, LimitsConfig, OutlierConfig, UpstreamProtocol,
};
use crate::metrics::ClusterMetrics;
use crate::tls::ClientTls;

pub use super::endpoint::{Endpoint, EndpointAddress, EndpointSet, EndpointSnapshot};
#[cfg(doc)]
use super::limits::{ConnectionSlot, EndpointRequest, PendingSlot};
pub use super::limits::{Limit, RequestPermit};

/// The SPIFFE ID an endpoint's config names, if any (validated with the config).
fn identity_of(e: &EndpointConfig) -> Option<SpiffeId> {
    e.identity.as_deref().and_then(|i| SpiffeId::parse(i).ok())
}

/// Whether `endpoint` is what `e` describes: the same address, weight and identity.
fn is(endpoint: &Endpoint, e: &EndpointConfig) -> bool {
    endpoint.address == e.address
        && endpoint.weight == e.weight.max(1)
        && endpoint.identity == identity_of(e)
}

/// Endpoints by address: where [`new_endpoint`] looks for one to keep (a map, so that an
/// update of a cluster of thousands of endpoints stays linear).
type ByAddress<'a> = HashMap<&'a EndpointAddress, Vec<&'a Arc<Endpoint>>>;

/// The endpoint for `e`: the one of `existing` that is what `e` describes, or a new one.
fn new_endpoint(e: &EndpointConfig, existing: &ByAddress<'_>) -> Arc<Endpoint> {
    if let Some(old) = existing
        .get(&e.address)
        .and_then(|same| same.iter().find(|o| is(o, e)))
    {
        return Arc::clone(old);
    }
    Arc::new(Endpoint::new(e.address.clone(), e.weight).with_identity(identity_of(e)))
}

/// Process-unique cluster ids (per-worker state is keyed by them).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A cluster: its endpoints, policy and the counters its limits are enforced on.
#[derive(Debug)]
pub struct Cluster {
    /// Process-unique id: per-worker balancers and pools are keyed by it. A cluster whose
    /// settings change is a new cluster with a new id.
    pub id: u64,
    /// Name from the config.
    pub name: String,
    /// The settings it was built from (endpoints as at build time), to tell a change of
    /// settings (a new cluster) from a change of endpoints (the same one).
    settings: ClusterConfig,
    /// Protocol to the endpoints.
    pub protocol: UpstreamProtocol,
    /// Balancing policy (each worker runs its own balancer of this policy).
    pub lb_policy: LbPolicy,
    /// The endpoints now; replaced whole when the control service changes them.
    endpoints: ArcSwap<EndpointSet>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Time to response headers; `None` for no limit.
    pub request_timeout: Option<Duration>,
    /// Idle time after which a pooled connection is not reused.
    pub idle_timeout_ms: u64,
    /// Outlier detection settings.
    pub outlier: OutlierConfig,
    /// Circuit-breaker limits.
    pub limits: LimitsConfig,
    /// Open connections, across workers (held by [`ConnectionSlot`]s).
    pub(super) connections: AtomicUsize,
    /// Requests waiting for a connection, across workers (held by [`PendingSlot`]s).
    pub(super) pending: AtomicUsize,
    /// Requests in flight, across workers (held by [`RequestPermit`]s).
    pub(super) active: AtomicUsize,
    /// Woken when a connection closes or returns to a pool, for requests pending on
    /// `max_connections`.
    pub(crate) connection_freed: Notify,
    /// While too few endpoints are healthy (below `outlier.panic_threshold_percent`): when
    /// the earliest ejection ends, to look again then; 0 when not in panic.
    panic_until_ms: AtomicU64,
    /// Prometheus handles.
    pub metrics: ClusterMetrics,
    /// TLS towards the endpoints, if the cluster has it.
    pub tls: Option<Arc<ClientTls>>,
}

impl Cluster {
    /// Builds a cluster from its config.
    pub fn new(c: &ClusterConfig, metrics: ClusterMetrics) -> Self {
        let endpoints = ArcSwap::from_pointee(EndpointSet::new(
            c.endpoints
                .iter()
                .map(|e| new_endpoint(e, &ByAddress::new()))
                .collect(),
        ));
        Self {
            id: NEXT_ID.fetch_add(1, Relaxed),
            name: c.name.clone(),
            settings: ClusterConfig {
                endpoints: Vec::new(),
                ..c.clone()
            },
            protocol: c.protocol,
            lb_policy: c.lb_policy,
            endpoints,
            connect_timeout: Duration::from_millis(c.connect_timeout_ms),
            request_timeout: (c.request_timeout_ms > 0)
                .then(|| Duration::from_millis(c.request_timeout_ms)),
            idle_timeout_ms: c.idle_timeout_ms,
            outlier: c.outlier.clone(),
            limits: c.limits.clone(),
            connections: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            connection_freed: Notify::new(),
            panic_until_ms: AtomicU64::new(0),
            metrics,
            tls: None,
        }
    }

    /// The cluster with its TLS (built at startup, where bad files stop the proxy).
    pub fn with_tls(mut self, tls: Option<Arc<ClientTls>>) -> Self {
        self.tls = tls;
        self
    }

    /// The service's virtual addresses (`addresses`), which capture listeners route by.
    pub fn addresses(&self) -> &[std::net::SocketAddr] {
        &self.settings.addresses
    }

    /// Whether `c` has this cluster's settings (its endpoints aside): then the cluster
    /// follows `c` by [`Cluster::set_endpoints`], keeping its pools, statistics and counts.
    pub fn same_settings(&self, c: &ClusterConfig) -> bool {
        let Self { settings, .. } = self;
        settings.name == c.name
            && serde_json::to_value(settings).ok()
                == serde_json::to_value(ClusterConfig {
                    endpoints: Vec::new(),
                    ..c.clone()
                })
                .ok()
    }

    /// Whether the cluster is in panic at `now_ms` (too few healthy endpoints: the balancer
    /// ignores ejections). One relaxed load while it is not; looked at again, by scanning
    /// the endpoints, only when an ejection that caused it ends.
    #[inline]
    pub fn in_panic(&self, now_ms: u64) -> bool {
        let until = self.panic_until_ms.load(Relaxed);
        if until == 0 {
            return false;
        }
        if now_ms < until {
            return true;
        }
        self.update_panic(now_ms);
        self.panic_until_ms.load(Relaxed) != 0
    }

    /// Decides again whether the cluster is in panic (after an ejection, an endpoint change,
    /// or the end of an ejection that caused it).
    pub(super) fn update_panic(&self, now_ms: u64) {
        let threshold = u64::from(self.outlier.panic_threshold_percent);
        let set = self.endpoints.load();
        let n = set.list.len() as u64;
        let mut ejected = 0u64;
        let mut earliest_end = u64::MAX;
        for e in set.list.iter() {
            let until = e.ejected_until_ms.load(Relaxed);
            if until > now_ms {
                ejected += 1;
                earliest_end = earliest_end.min(until);
            }
        }
        let panic = n > 0 && (n - ejected) * 100 < n * threshold;
        self.panic_until_ms
            .store(if panic { earliest_end } else { 0 }, Relaxed);
    }

    /// Open connections across workers.
    pub fn open_connections(&self) -> usize {
        self.connections.load(Relaxed)
    }

    /// Requests in flight across workers.
    pub fn active_requests(&self) -> usize {
        self.active.load(Relaxed)
    }

    /// The endpoints now.
    #[inline]
    pub fn endpoints(&self) -> arc_swap::Guard<Arc<EndpointSet>> {
        self.endpoints.load()
    }

    /// Replaces the endpoints. An endpoint whose address, weight and identity stay keeps its
    /// statistics, ejection and pooled connections; requests in flight to a removed one
    /// finish, and its connections close as they come back. Returns whether anything
    /// changed.
    pub fn set_endpoints(&self, endpoints: &[EndpointConfig]) -> bool {
        let current = self.endpoints.load();
        let same = current.list.len() == endpoints.len()
            && current.list.iter().zip(endpoints).all(|(a, b)| is(a, b));
        if same {
            return false;
        }
        let mut existing = ByAddress::with_capacity(current.list.len());
        for old in &current.list {
            existing.entry(&old.address).or_default().push(old);
        }
        let list = endpoints
            .iter()
            .map(|e| new_endpoint(e, &existing))
            .collect();
        self.endpoints.store(Arc::new(EndpointSet::new(list)));
        self.update_panic(crate::clock::now_ms());
        tracing::info!(cluster = %self.name, endpoints = endpoints.len(), "endpoints updated");
        true
    }

    /// Endpoints ejected at `now_ms`.
    pub fn ejected_count(&self, now_ms: u64) -> usize {
        self.endpoints
            .load()
            .list
            .iter()
            .filter(|e| e.is_ejected(now_ms))
            .count()
    }
}

/// The proxy's clusters at one moment: what a stream routes over, from its start to its
/// end. Replaced whole (behind a [`ClusterTable`]) when clusters are added, changed or
/// removed; a stream keeps the one it started with, so its cluster index stays valid.
#[derive(Debug, Default)]
pub struct Clusters {
    /// The clusters, by index.
    pub list: Vec<Arc<Cluster>>,
    /// Their names, by the same index.
    pub names: Arc<[String]>,
    /// Index by name (filters and authorities name clusters).
    by_name: std::collections::HashMap<String, usize>,
}

impl Clusters {
    /// The table of `list`.
    pub fn new(list: Vec<Arc<Cluster>>) -> Self {
        let names: Arc<[String]> = list.iter().map(|c| c.name.clone()).collect();
        let by_name = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        Self {
            list,
            names,
            by_name,
        }
    }

    /// The index of the cluster named `name`.
    #[inline]
    pub fn find(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The cluster named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.find(name).map(|i| &self.list[i])
    }
}

/// The proxy's clusters now, shared by listeners, callouts, the admin endpoint and the
/// filter host; swapped whole by a reload.
pub type ClusterTable = ArcSwap<Clusters>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn config(endpoints: &[(&str, u32)]) -> ClusterConfig {
        let eps: Vec<serde_json::Value> = endpoints
            .iter()
            .map(|(a, w)| serde_json::json!({ "address": a, "weight": w }))
            .collect();
        serde_json::from_value(serde_json::json!({ "name": "c", "endpoints": eps }))
            .expect("cluster config")
    }

    #[test]
    fn an_endpoint_set_update_keeps_the_endpoints_that_stay_and_only_those() {
        let mut addresses: Vec<(String, u32)> = (0..5_000)
            .map(|i| (format!("10.0.{}.{}:80", i / 250, i % 250), 1))
            .collect();
        let refs: Vec<(&str, u32)> = addresses.iter().map(|(a, w)| (a.as_str(), *w)).collect();
        let cluster = Cluster::new(&config(&refs), Metrics::new().cluster("c"));
        let before = cluster.endpoints().list.clone();

        // One endpoint changes weight, one leaves, one arrives; the rest stay.
        addresses[10].1 = 3;
        addresses.remove(20);
        addresses.push(("10.9.9.9:80".to_owned(), 1));
        let refs: Vec<(&str, u32)> = addresses.iter().map(|(a, w)| (a.as_str(), *w)).collect();
        assert!(cluster.set_endpoints(&config(&refs).endpoints));
        let after = cluster.endpoints().list.clone();
        assert_eq!(after.len(), 5_000);
        let same = |a: &Arc<Endpoint>| before.iter().any(|b| Arc::ptr_eq(a, b));
        assert!(
            Arc::ptr_eq(&after[0], &before[0]),
            "kept: its state goes on"
        );
        assert!(!same(&after[10]), "a new weight is a new endpoint");
        assert_eq!(after[10].weight, 3);
        assert!(
            Arc::ptr_eq(&after[20], &before[21]),
            "the one after the removed one stays"
        );
        assert!(!same(&after[4_999]), "the new one is new");
        assert_eq!(after.iter().filter(|e| same(e)).count(), 4_998);
        assert!(
            !cluster.set_endpoints(&config(&refs).endpoints),
            "the same list again changes nothing"
        );
    }
}
