//! Proxy metrics in the Prometheus text format, served by the admin endpoint.
//!
//! Label lookups happen once, when listeners and clusters are built: the request path only
//! increments pre-resolved atomic handles. prometheus-client's own histogram takes a mutex on
//! every observation, so latency goes into [`AtomicHistogram`], a lock-free equivalent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::cluster::Limit;

/// Upper bounds of the latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram of durations with fixed buckets, updated with relaxed atomics.
#[derive(Clone, Debug, Default)]
pub struct AtomicHistogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug, Default)]
struct HistogramInner {
    /// One count per bucket of `LATENCY_BUCKETS`, plus +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl AtomicHistogram {
    /// Records one duration.
    #[inline]
    pub fn observe_ns(&self, ns: u64) {
        let secs = ns as f64 * 1e-9;
        let i = LATENCY_BUCKETS.partition_point(|&b| b < secs);
        self.inner.buckets[i].fetch_add(1, Relaxed);
        self.inner.sum_ns.fetch_add(ns, Relaxed);
        self.inner.count.fetch_add(1, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.inner.count.load(Relaxed)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len() + 1);
        for (i, b) in LATENCY_BUCKETS
            .iter()
            .chain([f64::INFINITY].iter())
            .enumerate()
        {
            buckets.push((*b, self.inner.buckets[i].load(Relaxed)));
        }
        encoder.encode_histogram::<NoLabelSet>(
            self.inner.sum_ns.load(Relaxed) as f64 * 1e-9,
            self.inner.count.load(Relaxed),
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    listener: String,
    cluster: String,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FilterFailureLabels {
    filter: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OverflowLabels {
    cluster: String,
    limit: &'static str,
}

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The proxy's metric families. Building listener and cluster handles registers their label
/// sets; encoding walks the registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    downstream_cx_active: Family<ListenerLabels, Gauge>,
    downstream_cx_total: Family<ListenerLabels, Counter>,
    downstream_rq_active: Family<ListenerLabels, Gauge>,
    upstream_latency: Family<ClusterLabels, AtomicHistogram>,
    upstream_rq_active: Family<ClusterLabels, Gauge>,
    upstream_cx_active: Family<ClusterLabels, Gauge>,
    upstream_connect_failures: Family<ClusterLabels, Counter>,
    upstream_timeouts: Family<ClusterLabels, Counter>,
    upstream_resets: Family<ClusterLabels, Counter>,
    ejections: Family<ClusterLabels, Counter>,
    endpoints_ejected: Family<ClusterLabels, Gauge>,
    overflows: Family<OverflowLabels, Counter>,
    filter_failures: Family<FilterFailureLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family under the `weft_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weft");
        let m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            downstream_cx_active: Family::default(),
            downstream_cx_total: Family::default(),
            downstream_rq_active: Family::default(),
            upstream_latency: Family::default(),
            upstream_rq_active: Family::default(),
            upstream_cx_active: Family::default(),
            upstream_connect_failures: Family::default(),
            upstream_timeouts: Family::default(),
            upstream_resets: Family::default(),
            ejections: Family::default(),
            endpoints_ejected: Family::default(),
            overflows: Family::default(),
            filter_failures: Family::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by listener, cluster and status class",
            m.requests.clone(),
        );
        registry.register(
            "downstream_connections_active",
            "Open downstream connections",
            m.downstream_cx_active.clone(),
        );
        registry.register(
            "downstream_connections",
            "Downstream connections accepted",
            m.downstream_cx_total.clone(),
        );
        registry.register(
            "downstream_requests_active",
            "Requests in flight, by listener",
            m.downstream_rq_active.clone(),
        );
        registry.register(
            "upstream_request_duration_seconds",
            "Time from sending a request upstream to its response headers",
            m.upstream_latency.clone(),
        );
        registry.register(
            "upstream_requests_active",
            "Requests in flight to the cluster",
            m.upstream_rq_active.clone(),
        );
        registry.register(
            "upstream_connections_active",
            "Open upstream connections",
            m.upstream_cx_active.clone(),
        );
        registry.register(
            "upstream_connect_failures",
            "Upstream connection attempts that failed or timed out",
            m.upstream_connect_failures.clone(),
        );
        registry.register(
            "upstream_request_timeouts",
            "Requests answered 504 because the upstream did not respond in time",
            m.upstream_timeouts.clone(),
        );
        registry.register(
            "upstream_resets",
            "Requests whose upstream connection failed after it was established",
            m.upstream_resets.clone(),
        );
        registry.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection",
            m.ejections.clone(),
        );
        registry.register(
            "endpoints_ejected",
            "Endpoints currently ejected",
            m.endpoints_ejected.clone(),
        );
        registry.register(
            "circuit_breaker_overflows",
            "Requests refused by a circuit-breaker limit",
            m.overflows.clone(),
        );
        registry.register(
            "filter_failures",
            "WASM filter failures, by filter and kind (trap, deadline, memory, start)",
            m.filter_failures.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Handles for one cluster.
    pub fn cluster(&self, name: &str) -> ClusterMetrics {
        let l = ClusterLabels {
            cluster: name.to_owned(),
        };
        let overflow = |limit: Limit| {
            self.overflows
                .get_or_create(&OverflowLabels {
                    cluster: name.to_owned(),
                    limit: limit.as_str(),
                })
                .clone()
        };
        ClusterMetrics {
            latency: self.upstream_latency.get_or_create(&l).clone(),
            upstream_requests_active: self.upstream_rq_active.get_or_create(&l).clone(),
            upstream_connections_active: self.upstream_cx_active.get_or_create(&l).clone(),
            connect_failures: self.upstream_connect_failures.get_or_create(&l).clone(),
            timeouts: self.upstream_timeouts.get_or_create(&l).clone(),
            resets: self.upstream_resets.get_or_create(&l).clone(),
            ejections_total: self.ejections.get_or_create(&l).clone(),
            endpoints_ejected: self.endpoints_ejected.get_or_create(&l).clone(),
            overflows: [
                overflow(Limit::MaxConnections),
                overflow(Limit::MaxPendingRequests),
                overflow(Limit::MaxRequests),
            ],
        }
    }

    /// `weft_filter_failures_total` handles of one filter: trap, deadline, memory, start.
    pub fn filter_failures(&self, filter: &str) -> [Counter; 4] {
        ["trap", "deadline", "memory", "start"].map(|kind| {
            self.filter_failures
                .get_or_create(&FilterFailureLabels {
                    filter: filter.to_owned(),
                    kind,
                })
                .clone()
        })
    }

    /// Handles for one listener, with request counters for each cluster it may route to.
    pub fn listener(&self, name: &str, clusters: &[&str]) -> ListenerMetrics {
        let l = ListenerLabels {
            listener: name.to_owned(),
        };
        let by_class = |cluster: &str| {
            STATUS_CLASSES.map(|class| {
                self.requests
                    .get_or_create(&RequestLabels {
                        listener: name.to_owned(),
                        cluster: cluster.to_owned(),
                        status_class: class,
                    })
                    .clone()
            })
        };
        ListenerMetrics {
            connections_active: self.downstream_cx_active.get_or_create(&l).clone(),
            connections_total: self.downstream_cx_total.get_or_create(&l).clone(),
            requests_active: self.downstream_rq_active.get_or_create(&l).clone(),
            requests: clusters.iter().map(|c| by_class(c)).collect(),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Pre-resolved metric handles of one cluster.
#[derive(Clone, Debug)]
pub struct ClusterMetrics {
    /// Time to response headers.
    pub latency: AtomicHistogram,
    /// Requests in flight to the cluster.
    pub upstream_requests_active: Gauge,
    /// Open connections to the cluster.
    pub upstream_connections_active: Gauge,
    /// Failed connection attempts.
    pub connect_failures: Counter,
    /// Requests that timed out.
    pub timeouts: Counter,
    /// Requests whose connection failed mid-exchange.
    pub resets: Counter,
    /// Outlier ejections.
    pub ejections_total: Counter,
    /// Endpoints ejected now (refreshed on each scrape).
    pub endpoints_ejected: Gauge,
    overflows: [Counter; 3],
}

impl ClusterMetrics {
    /// Handles not registered anywhere, for tests and benchmarks.
    pub fn detached() -> Self {
        Metrics::new().cluster("detached")
    }

    /// Counts a request refused by `limit`.
    pub fn overflow(&self, limit: Limit) {
        let i = match limit {
            Limit::MaxConnections => 0,
            Limit::MaxPendingRequests => 1,
            Limit::MaxRequests => 2,
        };
        self.overflows[i].inc();
    }
}

/// Pre-resolved metric handles of one listener.
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    /// Open downstream connections.
    pub connections_active: Gauge,
    /// Accepted downstream connections.
    pub connections_total: Counter,
    /// Requests in flight.
    pub requests_active: Gauge,
    /// Per cluster index, per status class (1xx..5xx).
    requests: Vec<[Counter; 5]>,
}

impl ListenerMetrics {
    /// Counts an answered request.
    #[inline]
    pub fn count_response(&self, cluster: usize, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        if let Some(c) = self.requests.get(cluster) {
            c[class].inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_families_labels_and_histogram_buckets() {
        let m = Metrics::new();
        let c = m.cluster("svc");
        let l = m.listener("outbound", &["svc"]);
        l.count_response(0, 204);
        l.count_response(0, 503);
        l.count_response(0, 503);
        c.latency.observe_ns(3_000_000); // 3 ms
        c.latency.observe_ns(20_000_000_000); // 20 s: only +Inf
        c.overflow(Limit::MaxPendingRequests);
        let text = m.encode();
        assert!(
            text.contains(
                "weft_requests_total{listener=\"outbound\",cluster=\"svc\",status_class=\"5xx\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains(
            "weft_requests_total{listener=\"outbound\",cluster=\"svc\",status_class=\"2xx\"} 1"
        ));
        assert!(text.contains("# TYPE weft_upstream_request_duration_seconds histogram"));
        // Buckets are cumulative: 3 ms is under 5 ms, not under 2.5 ms.
        assert!(
            text.contains(
                "weft_upstream_request_duration_seconds_bucket{le=\"0.0025\",cluster=\"svc\"} 0"
            ),
            "{text}"
        );
        assert!(text.contains(
            "weft_upstream_request_duration_seconds_bucket{le=\"0.005\",cluster=\"svc\"} 1"
        ));
        assert!(text.contains(
            "weft_upstream_request_duration_seconds_bucket{le=\"+Inf\",cluster=\"svc\"} 2"
        ));
        assert!(text.contains("weft_upstream_request_duration_seconds_count{cluster=\"svc\"} 2"));
        assert!(text.contains(
            "weft_circuit_breaker_overflows_total{cluster=\"svc\",limit=\"max_pending_requests\"} 1"
        ));
    }
}
