//! Proxy metrics in the Prometheus text format, served by the admin endpoint.
//!
//! Label lookups happen once, when listeners and clusters are built: the request path only
//! increments pre-resolved atomic handles. prometheus-client's own histogram takes a mutex on
//! every observation, so latency goes into [`AtomicHistogram`], a lock-free equivalent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::config::Limit;

/// The `kind` label values of `weft_filter_failures_total`, in the order
/// [`Metrics::filter_failures`] returns them.
pub const FILTER_FAILURE_KINDS: [&str; 4] = ["trap", "deadline", "memory", "start"];

/// Upper bounds of the latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds of the buckets of filter-defined histograms (unitless values).
const VALUE_BUCKETS: [f64; 14] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1e3, 1e4, 1e5, 1e6, 1e7,
];

/// A histogram with fixed buckets, updated with relaxed atomics. Observations are integers;
/// `scale` converts them to the exported unit (1e-9 for nanoseconds to seconds).
#[derive(Clone, Debug)]
pub struct AtomicHistogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug)]
struct HistogramInner {
    bounds: &'static [f64],
    scale: f64,
    /// One count per bound, plus +Inf.
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
    count: AtomicU64,
}

impl Default for AtomicHistogram {
    /// A latency histogram fed in nanoseconds, exported in seconds.
    fn default() -> Self {
        Self::new(&LATENCY_BUCKETS, 1e-9)
    }
}

impl AtomicHistogram {
    fn new(bounds: &'static [f64], scale: f64) -> Self {
        Self {
            inner: Arc::new(HistogramInner {
                bounds,
                scale,
                buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum: AtomicU64::new(0),
                count: AtomicU64::new(0),
            }),
        }
    }

    /// Records one duration (for latency histograms).
    #[inline]
    pub fn observe_ns(&self, ns: u64) {
        self.observe(ns);
    }

    /// Records one value in the histogram's own unit.
    #[inline]
    pub fn observe(&self, v: u64) {
        let scaled = v as f64 * self.inner.scale;
        let i = self.inner.bounds.partition_point(|&b| b < scaled);
        self.inner.buckets[i].fetch_add(1, Relaxed);
        self.inner.sum.fetch_add(v, Relaxed);
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
        let bounds = self.inner.bounds.iter().chain([f64::INFINITY].iter());
        let buckets: Vec<(f64, u64)> = bounds
            .enumerate()
            .map(|(i, b)| (*b, self.inner.buckets[i].load(Relaxed)))
            .collect();
        encoder.encode_histogram::<NoLabelSet>(
            self.inner.sum.load(Relaxed) as f64 * self.inner.scale,
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
struct TcpLabels {
    listener: String,
    /// The cluster, or `passthrough` (straight to the original destination).
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DetectionLabels {
    listener: String,
    protocol: &'static str,
}

/// The metric families of opaque TCP connections, by listener and cluster.
#[derive(Clone, Debug, Default)]
struct TcpFamilies {
    connections: Family<TcpLabels, Counter>,
    active: Family<TcpLabels, Gauge>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    duration: Family<TcpLabels, AtomicHistogram>,
    refused: Family<TcpLabels, Counter>,
    detections: Family<DetectionLabels, Counter>,
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
    downstream_header_timeouts: Family<ListenerLabels, Counter>,
    downstream_premature_reset_closes: Family<ListenerLabels, Counter>,
    downstream_tls_handshake_failures: Family<ListenerLabels, Counter>,
    downstream_tls_connections: Family<ListenerLabels, Counter>,
    stream_idle_timeouts: Family<ListenerLabels, Counter>,
    tunnels_active: Family<ListenerLabels, Gauge>,
    tunnels_total: Family<ListenerLabels, Counter>,
    downstream_cx_total: Family<ListenerLabels, Counter>,
    downstream_rq_active: Family<ListenerLabels, Gauge>,
    upstream_latency: Family<ClusterLabels, AtomicHistogram>,
    upstream_rq_active: Family<ClusterLabels, Gauge>,
    upstream_cx_active: Family<ClusterLabels, Gauge>,
    upstream_connect_failures: Family<ClusterLabels, Counter>,
    upstream_tls_failures: Family<ClusterLabels, Counter>,
    upstream_timeouts: Family<ClusterLabels, Counter>,
    upstream_resets: Family<ClusterLabels, Counter>,
    upstream_retries: Family<ClusterLabels, Counter>,
    chain_swaps: Counter,
    otlp: OtlpMetrics,
    overload_shed: Counter,
    overload_level: Gauge,
    chain_swap_failures: Counter,
    ejections: Family<ClusterLabels, Counter>,
    panic_picks: Family<ClusterLabels, Counter>,
    endpoints_ejected: Family<ClusterLabels, Gauge>,
    overflows: Family<OverflowLabels, Counter>,
    filter_failures: Family<FilterFailureLabels, Counter>,
    filter_defined: Arc<FilterMetricSet>,
    tcp: TcpFamilies,
    golden: Arc<crate::golden::Golden>,
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
            downstream_header_timeouts: Family::default(),
            downstream_premature_reset_closes: Family::default(),
            downstream_tls_handshake_failures: Family::default(),
            downstream_tls_connections: Family::default(),
            stream_idle_timeouts: Family::default(),
            tunnels_active: Family::default(),
            tunnels_total: Family::default(),
            downstream_cx_total: Family::default(),
            downstream_rq_active: Family::default(),
            upstream_latency: Family::default(),
            upstream_rq_active: Family::default(),
            upstream_cx_active: Family::default(),
            upstream_connect_failures: Family::default(),
            upstream_tls_failures: Family::default(),
            upstream_timeouts: Family::default(),
            upstream_resets: Family::default(),
            upstream_retries: Family::default(),
            chain_swaps: Counter::default(),
            otlp: OtlpMetrics::default(),
            overload_shed: Counter::default(),
            overload_level: Gauge::default(),
            chain_swap_failures: Counter::default(),
            ejections: Family::default(),
            panic_picks: Family::default(),
            endpoints_ejected: Family::default(),
            overflows: Family::default(),
            filter_failures: Family::default(),
            filter_defined: Arc::default(),
            golden: Arc::default(),
            tcp: TcpFamilies::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by listener, cluster and status class",
            m.requests.clone(),
        );
        registry.register(
            "otlp_spans_exported",
            "Spans the OTLP collector accepted",
            m.otlp.exported.clone(),
        );
        registry.register(
            "otlp_spans_dropped",
            "Spans dropped: the export queue was full, or their export failed or timed out",
            m.otlp.dropped.clone(),
        );
        registry.register(
            "otlp_export_failures",
            "OTLP exports that failed or timed out",
            m.otlp.failures.clone(),
        );
        registry.register(
            "downstream_connections_active",
            "Open downstream connections",
            m.downstream_cx_active.clone(),
        );
        registry.register(
            "downstream_request_headers_timeouts",
            "Downstream connections closed because a request head took longer than the \
             listener's request_headers_timeout_ms",
            m.downstream_header_timeouts.clone(),
        );
        registry.register(
            "downstream_tunnels_active",
            "Upgraded connections (WebSocket and other 101s) open now",
            m.tunnels_active.clone(),
        );
        registry.register(
            "downstream_tunnels",
            "Upgraded connections (WebSocket and other 101s) opened",
            m.tunnels_total.clone(),
        );
        registry.register(
            "stream_idle_timeouts",
            "Request and response bodies and tunnels ended by the listener's \
             stream_idle_timeout_ms",
            m.stream_idle_timeouts.clone(),
        );
        registry.register(
            "downstream_premature_reset_closes",
            "Downstream connections closed because their client cancelled most of its requests \
             right after starting them (HTTP/2 rapid reset)",
            m.downstream_premature_reset_closes.clone(),
        );
        registry.register(
            "downstream_tls_handshake_failures",
            "Downstream TLS handshakes that failed or timed out (bad or missing client \
             certificate, a plaintext client on a strict listener, a peer of another trust \
             domain)",
            m.downstream_tls_handshake_failures.clone(),
        );
        registry.register(
            "downstream_tls_connections",
            "Downstream connections that completed a TLS handshake",
            m.downstream_tls_connections.clone(),
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
            "upstream_tls_failures",
            "Upstream TLS handshakes that failed or timed out, or reached a server that is not \
             the identity expected (also counted in upstream_connect_failures)",
            m.upstream_tls_failures.clone(),
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
            "overload_shed_connections",
            "Downstream connections shed (accepted and closed at once) because the proxy had \
             overload.max_connections open",
            m.overload_shed.clone(),
        );
        registry.register(
            "overload_level",
            "Overload level: 0 normal, 1 keep-alive off, 2 shedding new and idle connections",
            m.overload_level.clone(),
        );
        registry.register(
            "filter_chain_swaps",
            "Filter chain reloads (SIGHUP) that swapped the chains in",
            m.chain_swaps.clone(),
        );
        registry.register(
            "filter_chain_swap_failures",
            "Filter chain reloads refused (bad config or module): the running chains stayed",
            m.chain_swap_failures.clone(),
        );
        registry.register(
            "upstream_retries",
            "Attempts made again because a filter asked for it (weft.retry)",
            m.upstream_retries.clone(),
        );
        registry.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection",
            m.ejections.clone(),
        );
        registry.register(
            "upstream_panic_picks",
            "Endpoints picked while the cluster was in panic (too few healthy endpoints: \
             ejections ignored)",
            m.panic_picks.clone(),
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
        registry.register(
            "tcp_connections",
            "Opaque TCP connections relayed, by listener and cluster (`passthrough`: straight to the original destination)",
            m.tcp.connections.clone(),
        );
        registry.register(
            "tcp_connections_active",
            "Opaque TCP connections open, by listener and cluster",
            m.tcp.active.clone(),
        );
        registry.register(
            "tcp_sent_bytes",
            "Bytes relayed from downstream clients to upstreams on opaque TCP connections",
            m.tcp.sent.clone(),
        );
        registry.register(
            "tcp_received_bytes",
            "Bytes relayed from upstreams to downstream clients on opaque TCP connections",
            m.tcp.received.clone(),
        );
        registry.register(
            "tcp_connection_duration_seconds",
            "Lifetime of opaque TCP connections",
            m.tcp.duration.clone(),
        );
        registry.register(
            "tcp_refused",
            "Opaque TCP connections closed without an upstream (no endpoint answered, a limit, or passthrough off)",
            m.tcp.refused.clone(),
        );
        registry.register(
            "protocol_detections",
            "Connections on capture listeners by the protocol detected (http1, http2, tls, opaque: bytes that are none of these, silent: nothing within the detection timeout, declared: an opaque port)",
            m.tcp.detections.clone(),
        );
        registry.register_collector(Box::new(m.filter_defined.clone()));
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
            tls_failures: self.upstream_tls_failures.get_or_create(&l).clone(),
            timeouts: self.upstream_timeouts.get_or_create(&l).clone(),
            resets: self.upstream_resets.get_or_create(&l).clone(),
            retries: self.upstream_retries.get_or_create(&l).clone(),
            ejections_total: self.ejections.get_or_create(&l).clone(),
            panic_picks: self.panic_picks.get_or_create(&l).clone(),
            endpoints_ejected: self.endpoints_ejected.get_or_create(&l).clone(),
            overflows: [
                overflow(Limit::MaxConnections),
                overflow(Limit::MaxPendingRequests),
                overflow(Limit::MaxRequests),
            ],
        }
    }

    /// Stops exporting the series of cluster `name` (removed from the proxy), its request
    /// counts on `listeners` included. Handles still held (by requests in flight) go on
    /// working, unexported; a cluster of that name added again starts from zero.
    pub fn forget_cluster(&self, name: &str, listeners: &[String]) {
        let l = ClusterLabels {
            cluster: name.to_owned(),
        };
        self.upstream_latency.remove(&l);
        self.upstream_rq_active.remove(&l);
        self.upstream_cx_active.remove(&l);
        self.upstream_connect_failures.remove(&l);
        self.upstream_tls_failures.remove(&l);
        self.upstream_timeouts.remove(&l);
        self.upstream_resets.remove(&l);
        self.upstream_retries.remove(&l);
        self.ejections.remove(&l);
        self.panic_picks.remove(&l);
        self.endpoints_ejected.remove(&l);
        for limit in [
            Limit::MaxConnections,
            Limit::MaxPendingRequests,
            Limit::MaxRequests,
        ] {
            self.overflows.remove(&OverflowLabels {
                cluster: name.to_owned(),
                limit: limit.as_str(),
            });
        }
        for listener in listeners {
            for class in STATUS_CLASSES {
                self.requests.remove(&RequestLabels {
                    listener: listener.clone(),
                    cluster: name.to_owned(),
                    status_class: class,
                });
            }
        }
    }

    /// The metrics WASM filters define.
    pub fn filter_defined(&self) -> Arc<FilterMetricSet> {
        self.filter_defined.clone()
    }

    /// The overload handles: connections shed, and the level.
    pub fn overload(&self) -> (Counter, Gauge) {
        (self.overload_shed.clone(), self.overload_level.clone())
    }

    /// Counts a filter chain reload, swapped in (`true`) or refused.
    pub fn chain_swap(&self, swapped: bool) {
        if swapped {
            self.chain_swaps.inc();
        } else {
            self.chain_swap_failures.inc();
        }
    }

    /// `weft_filter_failures_total` handles of one filter: trap, deadline, memory, start.
    pub fn filter_failures(&self, filter: &str) -> [Counter; 4] {
        FILTER_FAILURE_KINDS.map(|kind| {
            self.filter_failures
                .get_or_create(&FilterFailureLabels {
                    filter: filter.to_owned(),
                    kind,
                })
                .clone()
        })
    }

    /// Handles for one listener (its request counters by cluster are made as clusters are
    /// first used: [`ListenerMetrics::requests`]).
    pub fn listener(&self, name: &str) -> ListenerMetrics {
        let l = ListenerLabels {
            listener: name.to_owned(),
        };
        ListenerMetrics {
            name: name.to_owned(),
            requests: self.requests.clone(),
            connections_active: self.downstream_cx_active.get_or_create(&l).clone(),
            connections_total: self.downstream_cx_total.get_or_create(&l).clone(),
            request_headers_timeouts: self.downstream_header_timeouts.get_or_create(&l).clone(),
            premature_reset_closes: self
                .downstream_premature_reset_closes
                .get_or_create(&l)
                .clone(),
            tls_handshake_failures: self
                .downstream_tls_handshake_failures
                .get_or_create(&l)
                .clone(),
            tls_connections: self.downstream_tls_connections.get_or_create(&l).clone(),
            stream_idle_timeouts: self.stream_idle_timeouts.get_or_create(&l).clone(),
            tunnels_active: self.tunnels_active.get_or_create(&l).clone(),
            tunnels_total: self.tunnels_total.get_or_create(&l).clone(),
            requests_active: self.downstream_rq_active.get_or_create(&l).clone(),
            tcp: self.tcp.clone(),
            golden: self.golden.clone(),
        }
    }

    /// The counters of span export ([`crate::otlp`]).
    pub fn otlp(&self) -> OtlpMetrics {
        self.otlp.clone()
    }

    /// The golden metrics the control follower reports ([`crate::golden`]).
    pub fn golden(&self) -> &Arc<crate::golden::Golden> {
        &self.golden
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Kind of a filter-defined metric (proxy-wasm numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FilterMetricKind {
    /// Only goes up.
    Counter,
    /// Goes up and down, or is set.
    Gauge,
    /// Distribution of recorded values.
    Histogram,
}

/// One metric defined by a filter with `proxy_define_metric`.
#[derive(Debug)]
pub struct FilterMetric {
    /// Kind.
    pub kind: FilterMetricKind,
    /// Exported family name (sanitised, without the `weft_filter_` prefix).
    pub name: String,
    /// Labels, from a name of the form `family{key="value",...}`.
    pub labels: Vec<(String, String)>,
    value: AtomicI64,
    histogram: AtomicHistogram,
}

impl FilterMetric {
    /// Adds `delta` (counters and gauges).
    pub fn add(&self, delta: i64) {
        self.value.fetch_add(delta, Relaxed);
    }

    /// Sets the value (gauges).
    pub fn set(&self, v: i64) {
        self.value.store(v, Relaxed);
    }

    /// Records a value (histograms).
    pub fn record(&self, v: u64) {
        self.histogram.observe(v);
    }

    /// The current value (counters and gauges).
    pub fn value(&self) -> i64 {
        self.value.load(Relaxed)
    }
}

/// The metrics filters define. A name and kind get one id for the whole process, so every
/// instance on every worker adds to the same metric, as in Envoy.
#[derive(Debug, Default)]
pub struct FilterMetricSet {
    inner: RwLock<FilterMetricsInner>,
}

#[derive(Debug, Default)]
struct FilterMetricsInner {
    ids: HashMap<(FilterMetricKind, String), u32>,
    /// Index `id - 1`.
    metrics: Vec<Arc<FilterMetric>>,
}

impl FilterMetricSet {
    /// The id of the metric `name` of `kind`, defining it on first use. A name of the form
    /// `family{key="value",...}` is one labelled series of `family`.
    pub fn define(&self, kind: FilterMetricKind, name: &str) -> u32 {
        let (family, labels) = parse_metric_name(name);
        let key = (kind, name.to_owned());
        if let Ok(inner) = self.inner.read()
            && let Some(id) = inner.ids.get(&key)
        {
            return *id;
        }
        let Ok(mut inner) = self.inner.write() else {
            return 0;
        };
        if let Some(id) = inner.ids.get(&key) {
            return *id;
        }
        inner.metrics.push(Arc::new(FilterMetric {
            kind,
            name: family,
            labels,
            value: AtomicI64::new(0),
            histogram: AtomicHistogram::new(&VALUE_BUCKETS, 1.0),
        }));
        let id = inner.metrics.len() as u32;
        inner.ids.insert(key, id);
        id
    }

    /// The metric with `id`.
    pub fn get(&self, id: u32) -> Option<Arc<FilterMetric>> {
        let inner = self.inner.read().ok()?;
        inner.metrics.get((id as usize).checked_sub(1)?).cloned()
    }
}

/// Splits `family{key="value",...}` into a sanitised family name and its labels (keys
/// sanitised, values kept without quotes and backslashes). A name without braces has no
/// labels.
fn parse_metric_name(name: &str) -> (String, Vec<(String, String)>) {
    let sanitise = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let (family, rest) = match name.split_once('{') {
        Some((f, rest)) if rest.ends_with('}') => (f, &rest[..rest.len() - 1]),
        _ => return (sanitise(name), Vec::new()),
    };
    let mut labels: Vec<(String, String)> = rest
        .split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            let v = v.trim().trim_matches('"').replace(['"', '\\'], "");
            Some((sanitise(k.trim()), v))
        })
        .filter(|(k, _)| !k.is_empty())
        .collect();
    labels.sort();
    (sanitise(family), labels)
}

impl Collector for FilterMetricSet {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(inner) = self.inner.read() else {
            return Ok(());
        };
        // One family per name and kind, its labelled series together.
        let mut families: std::collections::BTreeMap<(&str, u8), Vec<&FilterMetric>> =
            std::collections::BTreeMap::new();
        for m in &inner.metrics {
            families
                .entry((m.name.as_str(), m.kind as u8))
                .or_default()
                .push(m);
        }
        for ((family, _), series) in families {
            let name = format!("filter_{family}");
            let help = "Defined by a WASM filter";
            let kind = series[0].kind;
            let ty = match kind {
                FilterMetricKind::Counter => MetricType::Counter,
                FilterMetricKind::Gauge => MetricType::Gauge,
                FilterMetricKind::Histogram => MetricType::Histogram,
            };
            let mut family_encoder = encoder.encode_descriptor(&name, help, None, ty)?;
            for m in series {
                let e = family_encoder.encode_family(&m.labels)?;
                match kind {
                    FilterMetricKind::Counter => {
                        let c: Counter = Counter::default();
                        c.inc_by(m.value().max(0) as u64);
                        c.encode(e)?;
                    }
                    FilterMetricKind::Gauge => {
                        let g: Gauge = Gauge::default();
                        g.set(m.value());
                        g.encode(e)?;
                    }
                    FilterMetricKind::Histogram => m.histogram.encode(e)?,
                }
            }
        }
        Ok(())
    }
}

/// The counters of span export over OTLP.
#[derive(Clone, Debug, Default)]
pub struct OtlpMetrics {
    /// Spans the collector accepted.
    pub exported: Counter,
    /// Spans dropped (queue full, export failed or timed out).
    pub dropped: Counter,
    /// Exports that failed or timed out.
    pub failures: Counter,
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
    /// Failed TLS handshakes (also in `connect_failures`).
    pub tls_failures: Counter,
    /// Requests that timed out.
    pub timeouts: Counter,
    /// Requests whose connection failed mid-exchange.
    pub resets: Counter,
    /// Attempts made again at a filter's request.
    pub retries: Counter,
    /// Outlier ejections.
    pub ejections_total: Counter,
    /// Picks made in panic.
    pub panic_picks: Counter,
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
    /// Connections closed by the request-headers timeout.
    pub request_headers_timeouts: Counter,
    /// Connections closed for premature resets.
    pub premature_reset_closes: Counter,
    /// Failed downstream TLS handshakes.
    pub tls_handshake_failures: Counter,
    /// Downstream connections over TLS.
    pub tls_connections: Counter,
    /// Bodies and tunnels ended by the stream idle timeout.
    pub stream_idle_timeouts: Counter,
    /// Tunnels open now.
    pub tunnels_active: Gauge,
    /// Tunnels opened.
    pub tunnels_total: Counter,
    /// Requests in flight.
    pub requests_active: Gauge,
    /// The listener's name.
    name: String,
    /// Answered requests, by listener, cluster and status class.
    requests: Family<RequestLabels, Counter>,
    tcp: TcpFamilies,
    golden: Arc<crate::golden::Golden>,
}

/// Pre-resolved metric handles of opaque TCP connections of one listener to one cluster.
#[derive(Clone, Debug)]
pub struct TcpMetrics {
    /// Connections relayed (counted once connected upstream).
    pub connections: Counter,
    /// Connections open now.
    pub active: Gauge,
    /// Bytes from the client to the upstream.
    pub sent: Counter,
    /// Bytes from the upstream to the client.
    pub received: Counter,
    /// Connection lifetimes.
    pub duration: AtomicHistogram,
    /// Connections closed without an upstream.
    pub refused: Counter,
}

impl ListenerMetrics {
    /// The handles of opaque TCP connections to `cluster` (`passthrough`: to the original
    /// destination). Takes the families' locks: once per connection.
    pub fn tcp(&self, cluster: &str) -> TcpMetrics {
        let l = TcpLabels {
            listener: self.name.clone(),
            cluster: cluster.to_owned(),
        };
        let t = &self.tcp;
        TcpMetrics {
            connections: t.connections.get_or_create(&l).clone(),
            active: t.active.get_or_create(&l).clone(),
            sent: t.sent.get_or_create(&l).clone(),
            received: t.received.get_or_create(&l).clone(),
            duration: t.duration.get_or_create(&l).clone(),
            refused: t.refused.get_or_create(&l).clone(),
        }
    }

    /// Counts a connection of a capture listener whose protocol was found to be `protocol`.
    pub fn detected(&self, protocol: &'static str) {
        self.tcp
            .detections
            .get_or_create(&DetectionLabels {
                listener: self.name.clone(),
                protocol,
            })
            .inc();
    }
}

/// Answered requests of one listener and one cluster, by status class (1xx..5xx).
pub type ResponseCounters = [Counter; 5];

impl ListenerMetrics {
    /// The golden-metric cells of this listener's requests to `cluster` (`""`: none found),
    /// for a listener going `direction` (0 unspecified, 1 inbound, 2 outbound). Resolved
    /// once per cluster and listener state, like [`ListenerMetrics::requests`].
    pub fn golden(&self, direction: u8, cluster: &str) -> crate::golden::ClusterCells {
        self.golden.cluster(&self.name, direction, cluster)
    }

    /// The counters of answered requests to `cluster` (`""`: requests no cluster was found
    /// for). Takes the family's lock: resolved once per cluster and listener state, not
    /// per request.
    pub fn requests(&self, cluster: &str) -> ResponseCounters {
        STATUS_CLASSES.map(|class| {
            self.requests
                .get_or_create(&RequestLabels {
                    listener: self.name.clone(),
                    cluster: cluster.to_owned(),
                    status_class: class,
                })
                .clone()
        })
    }
}

/// Counts an answered request with `status` on `counters`.
#[inline]
pub fn count_response(counters: &ResponseCounters, status: u16) {
    let class = (status / 100).clamp(1, 5) as usize - 1;
    counters[class].inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_metrics_with_labels_form_one_family() {
        let m = Metrics::new();
        let set = m.filter_defined();
        let a = set.define(FilterMetricKind::Counter, r#"reqs{route="a",code="2xx"}"#);
        let b = set.define(FilterMetricKind::Counter, r#"reqs{code="5xx",route="a"}"#);
        let plain = set.define(FilterMetricKind::Counter, "plain.count");
        assert_ne!(a, b);
        assert_eq!(
            a,
            set.define(FilterMetricKind::Counter, r#"reqs{route="a",code="2xx"}"#)
        );
        set.get(a).unwrap().add(3);
        set.get(b).unwrap().add(1);
        set.get(plain).unwrap().add(7);
        let text = m.encode();
        assert_eq!(
            text.matches("# TYPE weft_filter_reqs counter").count(),
            1,
            "{text}"
        );
        assert!(
            text.contains(r#"weft_filter_reqs_total{code="2xx",route="a"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"weft_filter_reqs_total{code="5xx",route="a"} 1"#),
            "{text}"
        );
        assert!(text.contains("weft_filter_plain_count_total 7"), "{text}");
    }

    #[test]
    fn exposition_has_families_labels_and_histogram_buckets() {
        let m = Metrics::new();
        let c = m.cluster("svc");
        let l = m.listener("outbound").requests("svc");
        count_response(&l, 204);
        count_response(&l, 503);
        count_response(&l, 503);
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
