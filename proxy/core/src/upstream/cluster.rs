//! Clusters: a cluster's settings, its endpoint set (behind an atomic pointer, replaced whole)
//! and the counters its limits are enforced on — the state every worker shares about an
//! upstream service.
//!
//! Everything here is updated with relaxed atomics from all workers; nothing takes a lock.
//! Per-worker state (connection pools, round-robin positions) lives in [`crate::upstream::pool`].

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use crate::config::{
    ClusterConfig, EndpointConfig, LbPolicy, LimitsConfig, OutlierConfig, UpstreamProtocol,
};
use crate::metrics::ClusterMetrics;

pub use super::endpoint::{Endpoint, EndpointAddress, EndpointSet, EndpointSnapshot};
#[cfg(doc)]
use super::limits::{ConnectionSlot, EndpointRequest, PendingSlot};
pub use super::limits::{Limit, RequestPermit};

/// The endpoint for `e`: the one of `existing` with its address and weight, or a new one.
fn new_endpoint(e: &EndpointConfig, existing: &[Arc<Endpoint>]) -> Arc<Endpoint> {
    if let Some(old) = existing
        .iter()
        .find(|o| o.address == e.address && o.weight == e.weight.max(1))
    {
        return old.clone();
    }
    Arc::new(Endpoint::new(e.address.clone(), e.weight))
}

/// A cluster: its endpoints, policy and the counters its limits are enforced on.
#[derive(Debug)]
pub struct Cluster {
    /// Position in the proxy's cluster table (indexes per-worker state).
    pub index: usize,
    /// Name from the config.
    pub name: String,
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
    /// Prometheus handles.
    pub metrics: ClusterMetrics,
}

impl Cluster {
    /// Builds a cluster from its config.
    pub fn new(index: usize, c: &ClusterConfig, metrics: ClusterMetrics) -> Self {
        let endpoints = ArcSwap::from_pointee(EndpointSet::new(
            c.endpoints.iter().map(|e| new_endpoint(e, &[])).collect(),
        ));
        Self {
            index,
            name: c.name.clone(),
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
            metrics,
        }
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

    /// Replaces the endpoints. An endpoint whose address and weight stay keeps its
    /// statistics, ejection and pooled connections; requests in flight to a removed one
    /// finish, and its connections close as they come back. Returns whether anything
    /// changed.
    pub fn set_endpoints(&self, endpoints: &[EndpointConfig]) -> bool {
        let current = self.endpoints.load();
        let same = current.list.len() == endpoints.len()
            && current
                .list
                .iter()
                .zip(endpoints)
                .all(|(a, b)| a.address == b.address && a.weight == b.weight.max(1));
        if same {
            return false;
        }
        let list = endpoints
            .iter()
            .map(|e| new_endpoint(e, &current.list))
            .collect();
        self.endpoints.store(Arc::new(EndpointSet::new(list)));
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
