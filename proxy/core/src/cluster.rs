//! Clusters and endpoints: the state every worker shares about upstreams.
//!
//! Everything here is updated with relaxed atomics from all workers; nothing takes a lock.
//! Per-worker state (connection pools, round-robin positions) lives in [`crate::worker`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::Notify;

use crate::clock;
use crate::config::{
    ClusterConfig, EndpointConfig, LbPolicy, LimitsConfig, OutlierConfig, UpstreamProtocol,
};
use crate::metrics::ClusterMetrics;

pub use crate::config::EndpointAddress;

/// Peak-EWMA decay time constant: how fast a latency spike is forgotten.
const EWMA_DECAY_NS: f64 = 10e9;
/// Latency assumed for an endpoint with no observation yet (linkerd's default).
const EWMA_DEFAULT_RTT_NS: f64 = 30e6;

/// Source of endpoint ids.
static NEXT_ENDPOINT_ID: AtomicU64 = AtomicU64::new(1);

/// Source of endpoint set generations.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// One upstream endpoint and the live statistics shared by all workers.
#[derive(Debug)]
pub struct Endpoint {
    /// Unique in the process: workers key their connection pools on it, so a pool never
    /// outlives its endpoint's removal.
    pub id: u64,
    /// Where it lives.
    pub address: EndpointAddress,
    /// Relative weight (at least 1).
    pub weight: u32,
    /// Requests in flight to it, across workers.
    active: AtomicU32,
    /// Requests sent to it since start.
    total: AtomicU64,
    /// Peak-EWMA latency estimate in nanoseconds, as f64 bits.
    ewma_ns: AtomicU64,
    /// When `ewma_ns` was last updated, in nanoseconds of [`clock`].
    ewma_stamp_ns: AtomicU64,
    /// Failures since the last success.
    consecutive_failures: AtomicU32,
    /// Ejected until this [`clock`] millisecond; 0 when not ejected.
    ejected_until_ms: AtomicU64,
    /// Number of back-to-back ejections, which lengthens the next one.
    ejection_streak: AtomicU32,
    /// Ejections since start.
    ejections_total: AtomicU64,
}

impl Endpoint {
    /// A fresh endpoint with no history.
    pub fn new(address: EndpointAddress, weight: u32) -> Self {
        Self {
            id: NEXT_ENDPOINT_ID.fetch_add(1, Relaxed),
            address,
            weight: weight.max(1),
            active: AtomicU32::new(0),
            total: AtomicU64::new(0),
            ewma_ns: AtomicU64::new(0f64.to_bits()),
            ewma_stamp_ns: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejection_streak: AtomicU32::new(0),
            ejections_total: AtomicU64::new(0),
        }
    }

    /// Requests in flight to this endpoint.
    pub fn active_requests(&self) -> u32 {
        self.active.load(Relaxed)
    }

    /// Whether outlier detection has this endpoint out of rotation at `now_ms`.
    #[inline]
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Relaxed) > now_ms
    }

    /// The peak-EWMA cost used by the latency-aware balancer: estimated latency times
    /// (active requests + 1), divided by weight.
    pub fn ewma_cost(&self, now_ns: u64) -> f64 {
        let ewma = f64::from_bits(self.ewma_ns.load(Relaxed));
        let rtt = if ewma == 0.0 {
            EWMA_DEFAULT_RTT_NS
        } else {
            let elapsed = now_ns.saturating_sub(self.ewma_stamp_ns.load(Relaxed)) as f64;
            // Decay towards nothing while no response arrives, so a slow endpoint gets
            // probed again eventually.
            ewma * (-elapsed / EWMA_DECAY_NS).exp()
        };
        rtt * (self.active_requests() as f64 + 1.0) / self.weight as f64
    }

    /// Records a response latency into the peak-EWMA estimate: a higher sample replaces the
    /// estimate at once, a lower one is averaged in with a time-based decay.
    pub fn observe_latency(&self, now_ns: u64, rtt_ns: u64) {
        let rtt = rtt_ns as f64;
        let prev = f64::from_bits(self.ewma_ns.load(Relaxed));
        let stamp = self.ewma_stamp_ns.swap(now_ns, Relaxed);
        let next = if rtt > prev {
            rtt
        } else {
            let elapsed = now_ns.saturating_sub(stamp) as f64;
            let w = (-elapsed / EWMA_DECAY_NS).exp();
            prev * w + rtt * (1.0 - w)
        };
        self.ewma_ns.store(next.to_bits(), Relaxed);
    }

    /// Test hook: eject until `ms`.
    #[cfg(test)]
    pub(crate) fn test_eject_until(&self, ms: u64) {
        self.ejected_until_ms.store(ms, Relaxed);
    }

    /// Test hook: count one more active request.
    #[cfg(test)]
    pub(crate) fn test_begin_request(&self) {
        self.active.fetch_add(1, Relaxed);
    }

    /// Snapshot for `/clusters`.
    pub fn snapshot(&self, now_ms: u64) -> EndpointSnapshot {
        let until = self.ejected_until_ms.load(Relaxed);
        EndpointSnapshot {
            address: self.address.to_string(),
            weight: self.weight,
            healthy: until <= now_ms,
            ejected_for_ms: until.saturating_sub(now_ms),
            active_requests: self.active_requests(),
            total_requests: self.total.load(Relaxed),
            consecutive_failures: self.consecutive_failures.load(Relaxed),
            ejections: self.ejections_total.load(Relaxed),
            ewma_latency_ms: f64::from_bits(self.ewma_ns.load(Relaxed)) / 1e6,
        }
    }
}

/// An endpoint as `/clusters` shows it.
#[derive(Debug, Serialize)]
pub struct EndpointSnapshot {
    /// Address as configured.
    pub address: String,
    /// Weight.
    pub weight: u32,
    /// False while ejected by outlier detection.
    pub healthy: bool,
    /// Remaining ejection time.
    pub ejected_for_ms: u64,
    /// Requests in flight.
    pub active_requests: u32,
    /// Requests sent since start.
    pub total_requests: u64,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Times ejected since start.
    pub ejections: u64,
    /// Peak-EWMA latency estimate.
    pub ewma_latency_ms: f64,
}

/// Which circuit-breaker limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `limits.max_connections`.
    MaxConnections,
    /// `limits.max_pending_requests`.
    MaxPendingRequests,
    /// `limits.max_requests`.
    MaxRequests,
}

impl Limit {
    /// The config field name, used in the `x-weft-overloaded` header and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::MaxPendingRequests => "max_pending_requests",
            Self::MaxRequests => "max_requests",
        }
    }
}

/// A cluster's endpoints at one moment.
#[derive(Debug)]
pub struct EndpointSet {
    /// Changes with every replacement: workers rebuild their balancers when it does.
    pub generation: u64,
    /// The endpoints.
    pub list: Vec<Arc<Endpoint>>,
}

impl EndpointSet {
    /// A set with a new generation.
    pub fn new(list: Vec<Arc<Endpoint>>) -> Self {
        Self {
            generation: NEXT_GENERATION.fetch_add(1, Relaxed),
            list,
        }
    }
}

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
    /// Open connections, across workers.
    connections: AtomicUsize,
    /// Requests waiting for a connection, across workers.
    pending: AtomicUsize,
    /// Requests in flight, across workers.
    active: AtomicUsize,
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

    /// Admits a request under `max_requests`; the guard releases it.
    pub fn admit_request(self: &Arc<Self>) -> Result<RequestPermit, Limit> {
        if self.active.fetch_add(1, Relaxed) >= self.limits.max_requests {
            self.active.fetch_sub(1, Relaxed);
            self.metrics.overflow(Limit::MaxRequests);
            return Err(Limit::MaxRequests);
        }
        self.metrics.upstream_requests_active.inc();
        Ok(RequestPermit {
            cluster: self.clone(),
        })
    }

    /// Reserves a connection slot under `max_connections`.
    pub(crate) fn try_reserve_connection(&self) -> bool {
        if self.connections.fetch_add(1, Relaxed) >= self.limits.max_connections {
            self.connections.fetch_sub(1, Relaxed);
            return false;
        }
        self.metrics.upstream_connections_active.inc();
        true
    }

    /// Releases a connection slot taken by [`Cluster::try_reserve_connection`].
    pub(crate) fn release_connection(&self) {
        self.connections.fetch_sub(1, Relaxed);
        self.metrics.upstream_connections_active.dec();
        self.connection_freed.notify_one();
    }

    /// Enters the pending queue under `max_pending_requests`.
    pub(crate) fn try_enter_pending(&self) -> bool {
        if self.pending.fetch_add(1, Relaxed) >= self.limits.max_pending_requests {
            self.pending.fetch_sub(1, Relaxed);
            return false;
        }
        true
    }

    /// Leaves the pending queue.
    pub(crate) fn leave_pending(&self) {
        self.pending.fetch_sub(1, Relaxed);
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

    /// Records that a request was sent to `ep`.
    #[inline]
    pub(crate) fn begin_endpoint_request(&self, ep: &Endpoint) {
        ep.active.fetch_add(1, Relaxed);
        ep.total.fetch_add(1, Relaxed);
    }

    /// Records that a request to `ep` finished (in whatever way).
    #[inline]
    pub(crate) fn end_endpoint_request(&self, ep: &Endpoint) {
        ep.active.fetch_sub(1, Relaxed);
    }

    /// Records a success for outlier detection.
    #[inline]
    pub fn record_success(&self, ep: &Endpoint) {
        if ep.consecutive_failures.load(Relaxed) != 0 {
            ep.consecutive_failures.store(0, Relaxed);
        }
    }

    /// Records a failure (5xx, connect failure, reset, timeout); ejects the endpoint when it
    /// reaches `outlier.consecutive_failures` and the ejection cap allows it.
    pub fn record_failure(&self, ep: &Endpoint) {
        let threshold = self.outlier.consecutive_failures;
        if threshold == 0 {
            return;
        }
        let failures = ep.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if failures < threshold {
            return;
        }
        let now = clock::now_ms();
        if ep.is_ejected(now) {
            return;
        }
        let max_ejected =
            ((self.endpoints.load().list.len() * self.outlier.max_ejection_percent as usize) / 100)
                .max(1);
        if self.ejected_count(now) >= max_ejected {
            return;
        }
        // A long healthy stretch since the last ejection resets the streak.
        let last_until = ep.ejected_until_ms.load(Relaxed);
        let mut streak = ep.ejection_streak.load(Relaxed);
        if last_until != 0 && now.saturating_sub(last_until) > self.outlier.max_ejection_ms {
            streak = 0;
        }
        streak = streak.saturating_add(1);
        let duration = self
            .outlier
            .base_ejection_ms
            .saturating_mul(streak as u64)
            .min(
                self.outlier
                    .max_ejection_ms
                    .max(self.outlier.base_ejection_ms),
            );
        ep.ejection_streak.store(streak, Relaxed);
        ep.ejected_until_ms.store(now + duration, Relaxed);
        ep.consecutive_failures.store(0, Relaxed);
        ep.ejections_total.fetch_add(1, Relaxed);
        self.metrics.ejections_total.inc();
        tracing::warn!(
            cluster = %self.name,
            endpoint = %ep.address,
            duration_ms = duration,
            "endpoint ejected after {failures} consecutive failures"
        );
    }
}

/// A request admitted under a cluster's `max_requests`; dropping it releases the slot.
#[derive(Debug)]
pub struct RequestPermit {
    cluster: Arc<Cluster>,
}

impl Drop for RequestPermit {
    fn drop(&mut self) {
        self.cluster.active.fetch_sub(1, Relaxed);
        self.cluster.metrics.upstream_requests_active.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClusterConfig;

    fn cluster(n: usize, threshold: u32, percent: u32) -> Cluster {
        let yaml = format!(
            "name: c\nendpoints: [{}]\noutlier: {{ consecutive_failures: {threshold}, base_ejection_ms: 1000, max_ejection_ms: 2500, max_ejection_percent: {percent} }}",
            (0..n)
                .map(|i| format!("{{ address: \"127.0.0.1:{}\" }}", 9000 + i))
                .collect::<Vec<_>>()
                .join(",")
        );
        let cfg: ClusterConfig = serde_yaml_ng::from_str(&yaml).unwrap();
        Cluster::new(0, &cfg, ClusterMetrics::detached())
    }

    #[test]
    fn consecutive_failures_eject_and_success_resets_the_count() {
        let c = cluster(4, 3, 50);
        let eps = c.endpoints();
        let ep = &eps.list[0];
        c.record_failure(ep);
        c.record_failure(ep);
        c.record_success(ep);
        c.record_failure(ep);
        c.record_failure(ep);
        assert!(!ep.is_ejected(clock::now_ms()), "a success resets the run");
        c.record_failure(ep);
        assert!(ep.is_ejected(clock::now_ms()));
        assert_eq!(c.ejected_count(clock::now_ms()), 1);
        // Ejection ends after base_ejection_ms.
        assert!(!ep.is_ejected(clock::now_ms() + 1001));
    }

    #[test]
    fn ejection_percent_caps_ejections_but_one_is_always_allowed() {
        let c = cluster(4, 1, 50);
        for ep in &c.endpoints().list {
            c.record_failure(ep);
        }
        assert_eq!(c.ejected_count(clock::now_ms()), 2, "50% of 4");

        let c = cluster(2, 1, 10);
        for ep in &c.endpoints().list {
            c.record_failure(ep);
        }
        assert_eq!(
            c.ejected_count(clock::now_ms()),
            1,
            "10% of 2 still ejects one"
        );
    }

    #[test]
    fn repeated_ejections_last_longer_up_to_the_cap() {
        let c = cluster(1, 1, 100);
        let eps = c.endpoints();
        let ep = &eps.list[0];
        let mut lengths = Vec::new();
        for _ in 0..4 {
            let now = clock::now_ms();
            c.record_failure(ep);
            let until = ep.ejected_until_ms.load(Relaxed);
            lengths.push(until - now);
            // Pretend the ejection ended.
            ep.ejected_until_ms.store(now, Relaxed);
        }
        let approx: Vec<u64> = lengths.iter().map(|l| (l + 50) / 100 * 100).collect();
        assert_eq!(approx, vec![1000, 2000, 2500, 2500]);
    }

    #[test]
    fn peak_ewma_jumps_to_peaks_and_decays_slowly() {
        let ep = Endpoint::new(EndpointAddress::parse("127.0.0.1:1").unwrap(), 1);
        let t0 = 1_000_000_000;
        // No data: the default estimate.
        assert_eq!(ep.ewma_cost(t0), EWMA_DEFAULT_RTT_NS);
        ep.observe_latency(t0, 1_000_000);
        ep.observe_latency(t0 + 1_000, 50_000_000);
        let peak = ep.ewma_cost(t0 + 1_000);
        assert!(
            (peak - 50e6).abs() < 1e3,
            "a spike is taken at once: {peak}"
        );
        // A fast response 1 ms later barely moves it.
        ep.observe_latency(t0 + 1_000_000, 1_000_000);
        assert!(ep.ewma_cost(t0 + 1_000_000) > 49e6);
        // Active requests multiply the cost.
        ep.active.fetch_add(1, Relaxed);
        assert!(ep.ewma_cost(t0 + 1_000_000) > 98e6);
    }
}
