//! The proxy's configuration: one YAML file, parsed into plain structs.
//!
//! Every struct rejects unknown fields, so a typo is a startup error naming the file, the line
//! and the field rather than a silently ignored setting. The schema is documented field by
//! field in `docs/config.md`; the defaults below are the ones that page states.
//!
//! This crate is shared by the proxy and the control service, so that both parse and check
//! a value (an endpoint address, a failure policy) the same way.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod tls;
pub mod tracing;
pub use tls::{
    CertificateFiles, ClusterTls, ClusterTlsMode, IdentityConfig, IdentitySource, ListenerTls,
    ListenerTlsMode, SpiffeId,
};

/// The whole configuration of one proxy process.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The admin endpoint (readiness, stats, cluster state, config dump).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Graceful drain on SIGTERM / SIGINT.
    #[serde(default)]
    pub drain: DrainConfig,
    /// Listeners accepting downstream connections.
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// Upstream clusters the listeners forward to.
    #[serde(default)]
    pub clusters: Vec<ClusterConfig>,
    /// The WASM filter host.
    #[serde(default)]
    pub wasm: WasmConfig,
    /// Overload protection.
    #[serde(default)]
    pub overload: OverloadConfig,
    /// The proxy's mesh identity (certificate, key, trust bundle), which mesh mTLS
    /// listeners and clusters use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityConfig>,
    /// Exporting the spans of traced requests to an OpenTelemetry collector (OTLP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<tracing::TracingConfig>,
}

/// Overload protection: the proxy's downstream connections, across listeners, against a
/// budget (see `weft_core::overload`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OverloadConfig {
    /// Downstream connections the proxy keeps open at most, tunnels included; past it new
    /// connections are shed and idle ones closed. 0: 40% of the open-file limit (which the
    /// proxy raises to its hard limit at startup), leaving room for upstream connections.
    #[serde(default)]
    pub max_connections: u64,
    /// From this share of `max_connections` on, HTTP/1.1 responses close their connections.
    #[serde(default = "defaults::keepalive_off_percent")]
    pub keepalive_off_percent: u32,
}

impl Default for OverloadConfig {
    fn default() -> Self {
        Self {
            max_connections: 0,
            keepalive_off_percent: defaults::keepalive_off_percent(),
        }
    }
}

/// Where the admin endpoint listens.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin HTTP server. Keep it on loopback: it is unauthenticated (the
    /// proxy warns at startup when it is not).
    pub address: SocketAddr,
    /// Host names a request may name in its `Host` header besides IP addresses and
    /// `localhost` (a DNS-rebinding page names its own domain, and is refused).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Time a client has to send a request head, and the longest an idle connection stays.
    #[serde(default = "defaults::admin_timeout_ms")]
    pub timeout_ms: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            address: SocketAddr::from(([127, 0, 0, 1], 9901)),
            allowed_hosts: Vec::new(),
            timeout_ms: defaults::admin_timeout_ms(),
        }
    }
}

/// How the proxy drains when asked to stop.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DrainConfig {
    /// How long in-flight requests may take to finish after SIGTERM before connections are
    /// closed and the process exits.
    #[serde(default = "defaults::drain_timeout_ms")]
    pub timeout_ms: u64,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            timeout_ms: defaults::drain_timeout_ms(),
        }
    }
}

/// The downstream protocols a listener accepts.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DownstreamProtocol {
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 with prior knowledge (h2c) only.
    Http2,
    /// Both on one port: a connection opening with the HTTP/2 preface is HTTP/2.
    #[default]
    Auto,
    /// Opaque TCP: every connection is relayed byte for byte to an endpoint of the default
    /// cluster (or, on a capture listener, of the cluster its original destination names),
    /// balanced per connection; the upstream is connected at once, so protocols where the
    /// server speaks first work.
    Tcp,
}

/// One listening socket and what it does with requests.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Name used in logs, metrics labels and the config dump.
    pub name: String,
    /// Address to listen on. Port 0 picks a free port (logged at startup).
    pub address: SocketAddr,
    /// Downstream protocols accepted.
    #[serde(default)]
    pub protocol: DownstreamProtocol,
    /// Cluster that requests go to unless a filter chooses another. Empty (or left out):
    /// each request goes to the cluster its authority names (`echo`, `echo:80`,
    /// `echo.<namespace>`, `echo.<namespace>.svc.cluster.local`); one naming none gets 404.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub default_cluster: String,
    /// Which way traffic goes through it, for filters (`listener_direction`): a sidecar's
    /// `inbound` listener receives calls to its service, `outbound` carries its calls out.
    #[serde(default)]
    pub direction: TrafficDirection,
    /// The WASM filter chain, in request order. On a `tcp` listener they are network filters
    /// (proxy-wasm stream contexts: `proxy_on_new_connection`, `proxy_on_downstream_data`,
    /// ...); elsewhere HTTP filters, which never see opaque bytes.
    #[serde(default)]
    pub filters: Vec<FilterConfig>,
    /// Largest request header block accepted (request line and headers), in bytes; larger
    /// gets 431.
    #[serde(default = "defaults::max_request_header_bytes")]
    pub max_request_header_bytes: usize,
    /// Most request headers accepted; more gets 431.
    #[serde(default = "defaults::max_request_headers")]
    pub max_request_headers: usize,
    /// A downstream connection with no request in flight and no bytes moving for this long is
    /// closed.
    #[serde(default = "defaults::downstream_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Time a client has to send a whole request head (request line and headers; an HTTP/2
    /// header block), from its first byte — or from the accept, for a connection's first
    /// head; past it the connection is closed (slowloris). 0 turns it off.
    #[serde(default = "defaults::request_headers_timeout_ms")]
    pub request_headers_timeout_ms: u64,
    /// Requests one HTTP/1.1 downstream connection may carry; its last response says
    /// `connection: close` and the client opens another. 0: no limit.
    #[serde(default = "defaults::max_requests_per_connection")]
    pub max_requests_per_connection: u64,
    /// The same for an HTTP/2 connection (GOAWAY after its last stream). 0, the default, as
    /// in Envoy: no limit — HTTP/2 clients keep one connection for all their requests, and a
    /// GOAWAY fails the requests some clients have in flight; abusive HTTP/2 clients are cut
    /// by the premature-reset rule instead.
    #[serde(default)]
    pub max_requests_per_http2_connection: u64,
    /// A request or response body, or an upgraded tunnel, that moves no bytes for this long
    /// is ended (Envoy's `stream_idle_timeout`): an upstream that stalls after its head, or a
    /// client that stalls mid-upload, holds nothing forever. 0 turns it off.
    #[serde(default = "defaults::stream_idle_timeout_ms")]
    pub stream_idle_timeout_ms: u64,
    /// Largest request body kept, in KiB, so that a filter can ask for another attempt
    /// (`weft.set_attempts`); a larger body streams and gets one attempt.
    #[serde(default = "defaults::replay_buffer_kb")]
    pub replay_buffer_kb: u32,
    /// TLS on this listener; without it, plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
    /// Transparent capture: connections redirected here by `weft-proxy init`'s rules are
    /// routed by their original destination, and their protocol is detected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CaptureConfig>,
}

/// What a capture listener does with a redirected connection (`listeners[].capture`).
///
/// The original destination (`SO_ORIGINAL_DST`) picks the cluster: `ports` first, then
/// the cluster one of whose endpoints is that address. With none, the connection goes
/// straight to the original destination (`passthrough`), or is closed. Its protocol is then
/// detected from its first bytes: HTTP/1, the HTTP/2 preface and TLS are served as such;
/// anything else, or nothing within `detect_timeout_ms`, is relayed as opaque TCP.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// A connection whose original destination no cluster owns goes straight there, as
    /// opaque TCP (Istio's `PassthroughCluster`); `false` closes it instead.
    #[serde(default = "defaults::yes")]
    pub passthrough: bool,
    /// How long to wait for a client's first bytes before relaying the connection as
    /// opaque TCP (a protocol where the server speaks first sends none).
    #[serde(default = "defaults::detect_timeout_ms")]
    pub detect_timeout_ms: u64,
    /// Original destination ports relayed as opaque TCP at once, with no detection
    /// (Linkerd's default opaque ports: SMTP, MySQL, Galera, PostgreSQL, Redis,
    /// Elasticsearch, memcached).
    #[serde(default = "defaults::opaque_ports")]
    pub opaque_ports: Vec<u16>,
    /// Original destination port → cluster, checked before the clusters' endpoints (an
    /// inbound listener: the local service's ports).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub ports: std::collections::BTreeMap<u16, String>,
    /// Connect timeout of passthrough connections.
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            passthrough: true,
            detect_timeout_ms: defaults::detect_timeout_ms(),
            opaque_ports: defaults::opaque_ports(),
            ports: Default::default(),
            connect_timeout_ms: defaults::connect_timeout_ms(),
        }
    }
}

/// Which way traffic goes through a listener (Envoy's `TrafficDirection`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TrafficDirection {
    /// Not said.
    #[default]
    Unspecified,
    /// Calls to the local service.
    Inbound,
    /// Calls from the local service.
    Outbound,
}

impl TrafficDirection {
    /// Envoy's number for it (`listener_direction`).
    pub fn number(self) -> u8 {
        match self {
            Self::Unspecified => 0,
            Self::Inbound => 1,
            Self::Outbound => 2,
        }
    }
}

/// One WASM filter of a listener's chain. The filter host that runs these is a separate
/// component; the core proxy only carries their configuration.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Filter name (the proxy-wasm `plugin_name`).
    pub name: String,
    /// Path of the `.wasm` module.
    pub module: PathBuf,
    /// The proxy-wasm root id.
    #[serde(default)]
    pub root_id: String,
    /// The VM id (`plugin_vm_id`): filters of a chain with the same `vm_id` (empty included),
    /// module and `vm_config` share one instance per worker, each with its own root context
    /// and `config`, as Envoy shares VMs; their shared queues are named in it. Without one,
    /// filters whose `failure_policy` or `limits` differ keep instances of their own.
    #[serde(default)]
    pub vm_id: String,
    /// Configuration handed to `on_configure`.
    #[serde(default)]
    pub config: serde_json::Value,
    /// Configuration handed to `on_vm_start`.
    #[serde(default)]
    pub vm_config: serde_json::Value,
    /// What happens to a stream when the filter traps, overruns its deadline or runs out of
    /// memory.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// Resource limits of each instance of the filter.
    #[serde(default)]
    pub limits: FilterLimits,
}

/// A filter's answer to its own failure.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// The stream gets 503; the failed instance stays failed on that worker, so later streams
    /// through it get 503 too (Envoy's FAIL_CLOSED).
    #[default]
    FailClosed,
    /// The stream goes on without the filter; later streams on that worker skip it too
    /// (Envoy's FAIL_OPEN).
    FailOpen,
    /// The stream gets 503; later streams get a fresh instance, created with exponential
    /// backoff while creation keeps failing (Envoy's FAIL_RELOAD).
    Reload,
}

impl FailurePolicy {
    /// Every policy.
    pub const ALL: [Self; 3] = [Self::FailClosed, Self::FailOpen, Self::Reload];

    /// The name the config and the control API use (`fail_closed`, `fail_open`, `reload`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FailClosed => "fail_closed",
            Self::FailOpen => "fail_open",
            Self::Reload => "reload",
        }
    }
}

impl std::str::FromStr for FailurePolicy {
    type Err = String;

    /// Parses a policy's name; the empty string is the default (`fail_closed`).
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Ok(Self::default());
        }
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("failure_policy `{s}` (fail_closed, fail_open or reload)"))
    }
}

impl fmt::Display for FailurePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Limits of one filter instance.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FilterLimits {
    /// Linear memory cap in MiB; growing past it fails the filter.
    #[serde(default = "defaults::filter_memory_mb")]
    pub memory_mb: u32,
    /// CPU time allowed to one stream callback, in milliseconds (enforced with a 5 ms
    /// granularity); lifecycle callbacks (`on_vm_start`, `on_configure`) get 1 s.
    #[serde(default = "defaults::filter_callback_ms")]
    pub callback_ms: u64,
    /// Most body bytes the filter may hold while it pauses on body chunks, in KiB; past it the
    /// request gets 413 and the response 500.
    #[serde(default = "defaults::filter_buffer_kb")]
    pub buffer_kb: u32,
}

impl Default for FilterLimits {
    fn default() -> Self {
        Self {
            memory_mb: defaults::filter_memory_mb(),
            callback_ms: defaults::filter_callback_ms(),
            buffer_kb: defaults::filter_buffer_kb(),
        }
    }
}

/// Settings of the WASM filter host.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WasmConfig {
    /// Directory of compiled modules, keyed by content digest, so that a restart does not
    /// recompile; it must be private to the proxy's user. Default: the user's cache
    /// directory (`$XDG_CACHE_HOME/weft/modules` or `~/.cache/weft/modules`), or
    /// `<state-dir>/module-cache` for a proxy following a control service.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Singleton background services (Envoy's WasmService): filters that run once per proxy
    /// (one instance, on the first worker), not once per worker, for their ticks, queues
    /// and callouts, with no HTTP traffic of their own. Changing them needs a restart.
    #[serde(default)]
    pub services: Vec<FilterConfig>,
}

/// Protocol spoken to a cluster's endpoints.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive connection pooling.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c), requests multiplexed on shared connections.
    Http2,
}

/// Load-balancing policy of a cluster.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Endpoints in turn; weights are ignored (use `weighted` for weights).
    #[default]
    RoundRobin,
    /// Smooth weighted round robin (nginx's algorithm): exact proportions, evenly interleaved.
    Weighted,
    /// Power of two random choices, picking the one with fewer active requests per weight.
    LeastRequest,
    /// Power of two random choices over a peak-sensitive moving average of latency times
    /// active requests (linkerd's latency-aware balancer).
    PeakEwma,
    /// Weighted random.
    Random,
}

/// One upstream endpoint.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// `ip:port` or `host:port` (a host name is resolved when connecting).
    pub address: EndpointAddress,
    /// Relative weight, at least 1.
    #[serde(default = "defaults::weight")]
    pub weight: u32,
    /// The SPIFFE ID the endpoint must prove on a `mesh` TLS cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// Where an endpoint lives: an IP literal (no lookup) or a host name resolved per connect.
///
/// Parsed once, where the address enters (config file, control snapshot, registration);
/// everything after compares the typed value. It reads and writes as `ip:port`,
/// `[v6]:port` or `host:port`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EndpointAddress {
    /// `ip:port`.
    Ip(SocketAddr),
    /// `host:port`, resolved with the system resolver when a connection is opened.
    Host {
        /// The host name (letters, digits, `-`, `.` and `_`).
        host: String,
        /// The port (1 to 65535).
        port: u16,
    },
}

impl EndpointAddress {
    /// Parses `ip:port`, `[v6]:port` or `host:port`; the port must be 1 to 65535.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not `ip:port` or `host:port`");
        if let Ok(addr) = s.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(format!("`{s}`: port must be 1 to 65535"));
            }
            return Ok(Self::Ip(addr));
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(format!("`{s}`: port must be 1 to 65535"));
        }
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            return Err(bad());
        }
        Ok(Self::Host {
            host: host.to_owned(),
            port,
        })
    }

    /// The IP address and port, when the address is an IP literal.
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            Self::Ip(a) => Some(*a),
            Self::Host { .. } => None,
        }
    }
}

impl std::str::FromStr for EndpointAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl fmt::Display for EndpointAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(a) => a.fmt(f),
            Self::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl Serialize for EndpointAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EndpointAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(|e| serde::de::Error::custom(format!("address {e}")))
    }
}

/// Which circuit-breaker limit of [`LimitsConfig`] refused a request.
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

/// Passive outlier detection: endpoints that keep failing are taken out of rotation.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Consecutive failures (5xx responses, connect failures, resets, timeouts) that eject an
    /// endpoint. 0 disables outlier detection.
    #[serde(default = "defaults::consecutive_failures")]
    pub consecutive_failures: u32,
    /// First ejection lasts this long; each further ejection of the same endpoint lasts one
    /// more multiple of it.
    #[serde(default = "defaults::base_ejection_ms")]
    pub base_ejection_ms: u64,
    /// Cap on one ejection's length. An endpoint that stays healthy this long after an
    /// ejection starts again from `base_ejection_ms`.
    #[serde(default = "defaults::max_ejection_ms")]
    pub max_ejection_ms: u64,
    /// Most endpoints of the cluster ejected at once, in percent; at least one endpoint can
    /// always be ejected (but see `eject_last_healthy`).
    #[serde(default = "defaults::max_ejection_percent")]
    pub max_ejection_percent: u32,
    /// Which responses count as failures (connect failures, resets and timeouts always do).
    #[serde(default)]
    pub failures: OutlierFailures,
    /// Whether the last endpoint not ejected may be ejected too. Off by default: a cluster
    /// with one endpoint (a sidecar's inbound cluster) never ejects it.
    #[serde(default)]
    pub eject_last_healthy: bool,
    /// Envoy's healthy panic threshold, in percent: while fewer endpoints than this are not
    /// ejected, the balancer ignores ejections and spreads requests over all of them. 0 turns
    /// it off.
    #[serde(default = "defaults::panic_threshold_percent")]
    pub panic_threshold_percent: u32,
}

/// Which upstream responses count against an endpoint in outlier detection.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OutlierFailures {
    /// Every 5xx response (Envoy's `consecutive_5xx`, Istio's `consecutive5xxErrors`).
    #[default]
    All5xx,
    /// Only 502, 503 and 504 (Envoy's `consecutive_gateway_failure`): an application's own
    /// 500s do not eject it.
    Gateway,
}

impl OutlierFailures {
    /// Whether a response with `status` counts as a failure.
    pub fn counts(self, status: u16) -> bool {
        match self {
            Self::All5xx => (500..600).contains(&status),
            Self::Gateway => matches!(status, 502..=504),
        }
    }
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: defaults::consecutive_failures(),
            base_ejection_ms: defaults::base_ejection_ms(),
            max_ejection_ms: defaults::max_ejection_ms(),
            max_ejection_percent: defaults::max_ejection_percent(),
            failures: OutlierFailures::default(),
            eject_last_healthy: false,
            panic_threshold_percent: defaults::panic_threshold_percent(),
        }
    }
}

/// Circuit-breaker limits of a cluster, shared by all workers. A request over a limit gets 503
/// with `x-weft-overloaded` naming the limit.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most open connections to the cluster's endpoints.
    #[serde(default = "defaults::limit")]
    pub max_connections: usize,
    /// Most requests waiting for a connection when `max_connections` is reached.
    #[serde(default = "defaults::limit")]
    pub max_pending_requests: usize,
    /// Most requests in flight to the cluster.
    #[serde(default = "defaults::limit")]
    pub max_requests: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: defaults::limit(),
            max_pending_requests: defaults::limit(),
            max_requests: defaults::limit(),
        }
    }
}

/// A named set of upstream endpoints and how to reach them.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Cluster name, referenced by listeners and filters.
    pub name: String,
    /// Protocol spoken to the endpoints.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Load-balancing policy.
    #[serde(default)]
    pub lb_policy: LbPolicy,
    /// The endpoints.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// Time allowed to establish a TCP connection; past it the request gets 503.
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time allowed from sending the request until the response headers arrive; past it the
    /// request gets 504. 0 disables it.
    #[serde(default = "defaults::request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// A pooled upstream connection unused for this long is closed instead of reused.
    #[serde(default = "defaults::upstream_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Passive outlier detection.
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// Circuit-breaker limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// TLS towards the endpoints; without it, plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClusterTls>,
    /// Virtual addresses of the service (`ip:port`: a Kubernetes Service's ClusterIP and
    /// port): a captured connection to one goes to this cluster, balanced over its
    /// endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<SocketAddr>,
}

/// A named item (`name`) from `settings`: a JSON object of its fields but `reserved` (and
/// `None` for all defaults), read as YAML text so that errors name the field.
fn from_settings<T: serde::de::DeserializeOwned>(
    name: &str,
    settings: Option<&serde_json::Value>,
    reserved: &[&str],
) -> Result<T, String> {
    let mut object = match settings {
        None | Some(serde_json::Value::Null) => serde_json::Map::new(),
        Some(serde_json::Value::Object(o)) => o.clone(),
        Some(_) => return Err("settings must be an object".into()),
    };
    for r in reserved {
        if object.contains_key(*r) {
            return Err(format!("settings must not set `{r}`"));
        }
    }
    object.insert("name".into(), name.into());
    let text = serde_yaml_ng::to_string(&object).map_err(|e| format!("settings: {e}"))?;
    serde_yaml_ng::from_str(&text).map_err(|e| {
        let e = e.to_string();
        let e = e.split(" at line ").next().unwrap_or(&e).to_owned();
        format!("settings: {e}")
    })
}

impl ListenerConfig {
    /// The listener `name` with `settings`: a JSON object of a config file listener's
    /// fields other than `name` and `filters` (`address` is required), checked as the
    /// file's listeners are (`identity`: the proxy has a mesh identity); its default
    /// cluster is checked against the clusters once it is in a config.
    pub fn from_settings(
        name: &str,
        settings: Option<&serde_json::Value>,
        identity: bool,
    ) -> Result<ListenerConfig, String> {
        let l: ListenerConfig = from_settings(name, settings, &["name", "filters"])?;
        l.validate(identity)
            .map_err(|(field, m)| format!("settings.{field}: {m}"))?;
        Ok(l)
    }

    /// `Err((field, why))` for a setting out of range or that does not fit (field paths
    /// relative to the listener); `identity`: the proxy has a mesh identity.
    pub fn validate(&self, identity: bool) -> Result<(), (String, String)> {
        let l = self;
        let at = |f: &str| f.to_owned();
        if let Some(tls) = &l.tls {
            tls.validate(identity)
                .map_err(|(f, m)| (at(&format!("tls.{f}")), m))?;
        }
        in_range(
            &at("max_request_header_bytes"),
            l.max_request_header_bytes as u64,
            ranges::HEADER_BYTES,
        )?;
        in_range(
            &at("max_request_headers"),
            l.max_request_headers as u64,
            ranges::HEADERS,
        )?;
        in_range(&at("idle_timeout_ms"), l.idle_timeout_ms, ranges::IDLE_MS)?;
        in_range(
            &at("request_headers_timeout_ms"),
            l.request_headers_timeout_ms,
            ranges::OPTIONAL_MS,
        )?;
        in_range(
            &at("replay_buffer_kb"),
            l.replay_buffer_kb.into(),
            ranges::BUFFER_KB,
        )?;
        in_range(
            &at("stream_idle_timeout_ms"),
            l.stream_idle_timeout_ms,
            ranges::OPTIONAL_MS,
        )?;
        in_range(
            &at("max_requests_per_http2_connection"),
            l.max_requests_per_http2_connection,
            ranges::REQUESTS_PER_CONNECTION,
        )?;
        in_range(
            &at("max_requests_per_connection"),
            l.max_requests_per_connection,
            ranges::REQUESTS_PER_CONNECTION,
        )?;
        Ok(())
    }
}

impl ClusterConfig {
    /// The cluster `name` with `settings`: a JSON object of a config file cluster's fields
    /// other than `name` and `endpoints` (`None`: the defaults), checked as the file's
    /// clusters are (`identity`: the proxy has a mesh identity). This is how the control
    /// service states clusters.
    pub fn from_settings(
        name: &str,
        settings: Option<&serde_json::Value>,
        identity: bool,
    ) -> Result<ClusterConfig, String> {
        let c: ClusterConfig = from_settings(name, settings, &["name", "endpoints"])?;
        c.validate(identity)
            .map_err(|(field, m)| format!("settings.{field}: {m}"))?;
        Ok(c)
    }

    /// `Err((field, why))` for a setting out of range or that does not fit (field paths
    /// relative to the cluster); `identity`: the proxy has a mesh identity.
    pub fn validate(&self, identity: bool) -> Result<(), (String, String)> {
        let c = self;
        let at = |f: &str| f.to_owned();
        for (j, e) in c.endpoints.iter().enumerate() {
            let field = at(&format!("endpoints[{j}].weight"));
            in_range(&field, e.weight.into(), ranges::WEIGHT)?;
            if let Some(id) = &e.identity {
                SpiffeId::parse(id).map_err(|m| (at(&format!("endpoints[{j}].identity")), m))?;
            }
        }
        if let Some(tls) = &c.tls {
            tls.validate(identity)
                .map_err(|(f, m)| (at(&format!("tls.{f}")), m))?;
        }
        in_range(
            &at("connect_timeout_ms"),
            c.connect_timeout_ms,
            ranges::TIMEOUT_MS,
        )?;
        in_range(
            &at("request_timeout_ms"),
            c.request_timeout_ms,
            ranges::OPTIONAL_MS,
        )?;
        in_range(&at("idle_timeout_ms"), c.idle_timeout_ms, ranges::IDLE_MS)?;
        let o = &c.outlier;
        in_range(
            &at("outlier.consecutive_failures"),
            o.consecutive_failures.into(),
            ranges::COUNT,
        )?;
        if o.consecutive_failures > 0 {
            in_range(
                &at("outlier.base_ejection_ms"),
                o.base_ejection_ms,
                ranges::TIMEOUT_MS,
            )?;
            in_range(
                &at("outlier.max_ejection_ms"),
                o.max_ejection_ms,
                (o.base_ejection_ms, ranges::TIMEOUT_MS.1),
            )?;
        }
        in_range(
            &at("outlier.max_ejection_percent"),
            o.max_ejection_percent.into(),
            ranges::PERCENT,
        )?;
        in_range(
            &at("outlier.panic_threshold_percent"),
            o.panic_threshold_percent.into(),
            ranges::PERCENT,
        )?;
        let l = &c.limits;
        in_range(
            &at("limits.max_connections"),
            l.max_connections as u64,
            ranges::LIMIT,
        )?;
        in_range(
            &at("limits.max_pending_requests"),
            l.max_pending_requests as u64,
            ranges::LIMIT,
        )?;
        in_range(
            &at("limits.max_requests"),
            l.max_requests as u64,
            ranges::LIMIT,
        )?;
        Ok(())
    }
}

mod defaults {
    pub fn yes() -> bool {
        true
    }
    pub fn detect_timeout_ms() -> u64 {
        100
    }
    pub fn opaque_ports() -> Vec<u16> {
        vec![25, 587, 3306, 4444, 5432, 6379, 9300, 11211]
    }
    pub fn drain_timeout_ms() -> u64 {
        5_000
    }
    pub fn max_request_header_bytes() -> usize {
        60 * 1024
    }
    pub fn max_request_headers() -> usize {
        100
    }
    pub fn downstream_idle_timeout_ms() -> u64 {
        3_600_000
    }
    pub fn request_headers_timeout_ms() -> u64 {
        10_000
    }
    pub fn max_requests_per_connection() -> u64 {
        1000
    }
    pub fn admin_timeout_ms() -> u64 {
        10_000
    }
    pub fn keepalive_off_percent() -> u32 {
        80
    }
    pub fn stream_idle_timeout_ms() -> u64 {
        300_000
    }
    pub fn weight() -> u32 {
        1
    }
    pub fn consecutive_failures() -> u32 {
        5
    }
    pub fn base_ejection_ms() -> u64 {
        30_000
    }
    pub fn max_ejection_ms() -> u64 {
        300_000
    }
    pub fn panic_threshold_percent() -> u32 {
        50
    }
    pub fn max_ejection_percent() -> u32 {
        10
    }
    pub fn limit() -> usize {
        1024
    }
    pub fn connect_timeout_ms() -> u64 {
        1_000
    }
    pub fn request_timeout_ms() -> u64 {
        15_000
    }
    pub fn upstream_idle_timeout_ms() -> u64 {
        60_000
    }
    pub fn filter_memory_mb() -> u32 {
        64
    }
    pub fn filter_callback_ms() -> u64 {
        10
    }
    pub fn filter_buffer_kb() -> u32 {
        1024
    }
    pub fn replay_buffer_kb() -> u32 {
        64
    }
}

/// The range of each numeric field, inclusive: `(least, most)`.
pub mod ranges {
    /// A range.
    pub type Range = (u64, u64);
    /// `drain.timeout_ms`: up to an hour.
    pub const DRAIN_MS: Range = (0, 3_600_000);
    /// A timeout that must be on: 1 ms to a day.
    pub const TIMEOUT_MS: Range = (1, 86_400_000);
    /// A timeout where 0 turns it off: up to a day.
    pub const OPTIONAL_MS: Range = (0, 86_400_000);
    /// `capture.detect_timeout_ms`: 1 ms to 10 s (Linkerd's fixed wait).
    pub const DETECT_MS: Range = (1, 10_000);
    /// Idle timeouts: 1 ms to a week.
    pub const IDLE_MS: Range = (1, 604_800_000);
    /// `max_request_header_bytes`: 8 KiB (hyper's smallest read buffer) to 1 MiB (each
    /// connection may hold that much).
    pub const HEADER_BYTES: Range = (8192, 1 << 20);
    /// `max_request_headers`: hyper keeps room for this many per request.
    pub const HEADERS: Range = (1, 4096);
    /// `replay_buffer_kb`: up to 64 MiB per request.
    pub const BUFFER_KB: Range = (0, 65_536);
    /// Endpoint weights.
    pub const WEIGHT: Range = (1, 1_000_000);
    /// A count of events (0 turns the check off).
    pub const COUNT: Range = (0, 1_000_000);
    /// A percentage.
    pub const PERCENT: Range = (0, 100);
    /// `max_requests_per_connection` (0: no limit).
    pub const REQUESTS_PER_CONNECTION: Range = (0, 100_000_000);
    /// Circuit-breaker limits: 0 would refuse every request.
    pub const LIMIT: Range = (1, 1_000_000);
    /// A filter's linear memory: wasm32 addresses 4 GiB.
    pub const MEMORY_MB: Range = (1, 4096);
    /// A filter callback's CPU time: up to a minute.
    pub const CALLBACK_MS: Range = (1, 60_000);
    /// What a filter may buffer: up to 256 MiB.
    pub const FILTER_BUFFER_KB: Range = (1, 262_144);
}

/// The 1-based line and column of the first YAML alias (`*name`) in `text`, outside
/// comments and quoted scalars.
fn first_alias(text: &str) -> Option<(usize, usize)> {
    for (n, line) in text.lines().enumerate() {
        let mut quote = None;
        let mut prev = ' ';
        for (col, ch) in line.chars().enumerate() {
            match (quote, ch) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(ch),
                (None, '#') if prev.is_whitespace() => break,
                (None, '*') if prev.is_whitespace() || "[{,:-".contains(prev) => {
                    return Some((n + 1, col + 1));
                }
                _ => {}
            }
            prev = ch;
        }
    }
    None
}

/// `Err((field, why))` unless `least <= value <= most`.
fn in_range(field: &str, value: u64, (least, most): ranges::Range) -> Result<(), (String, String)> {
    if (least..=most).contains(&value) {
        return Ok(());
    }
    Err((
        field.to_owned(),
        format!("must be between {least} and {most} (got {value})"),
    ))
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read config: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML is malformed, or a field is unknown or has a bad value.
    #[error("{}:{}", path.display(), .location)]
    Parse {
        /// The file.
        path: PathBuf,
        /// Line, column and message.
        location: ParseLocation,
    },
    /// The YAML parsed but is inconsistent (e.g. a listener names a cluster that does not
    /// exist).
    #[error("{}: {field}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Path of the offending field, e.g. `listeners[0].default_cluster`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// Position and message of a YAML parse error.
#[derive(Debug)]
pub struct ParseLocation {
    /// 1-based line, if known.
    pub line: Option<usize>,
    /// 1-based column, if known.
    pub column: Option<usize>,
    /// The parser's message, which names the field path (e.g. `clusters[0].lb_policy`).
    pub message: String,
}

impl fmt::Display for ParseLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{l}:{c}: {}", self.message),
            _ => write!(f, " {}", self.message),
        }
    }
}

impl Config {
    /// Reads, parses and validates a YAML config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates YAML text; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let blank = |l: &str| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
        };
        if text.lines().all(blank) {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                field: "(file)".into(),
                message: "is empty: a config needs at least a listener and a cluster".into(),
            });
        }
        let config: Config = serde_yaml_ng::from_str(text).map_err(|e| {
            let loc = e.location();
            let mut message = e.to_string();
            // The parser appends " at line L column C"; the location is printed up front.
            if let Some(idx) = message.rfind(" at line ") {
                message.truncate(idx);
            }
            let mut at = loc.as_ref().map(|l| (l.line(), l.column()));
            // Alias expansion (a "YAML bomb") fails with no position: point at the first
            // alias, where the expansion starts.
            if at.is_none() && message.contains("limit exceeded") {
                at = first_alias(text);
                if at.is_some() {
                    message.push_str(" (YAML aliases expand to too much; the first alias is here)");
                }
            }
            ConfigError::Parse {
                path: path.to_owned(),
                location: ParseLocation {
                    line: at.map(|(l, _)| l),
                    column: at.map(|(_, c)| c),
                    message,
                },
            }
        })?;
        config
            .validate()
            .map_err(|(field, message)| ConfigError::Invalid {
                path: path.to_owned(),
                field,
                message,
            })?;
        Ok(config)
    }

    /// Checks what serde cannot: references between resources, uniqueness, and that every
    /// number is in its range ([`ranges`]: a value that would exhaust memory or refuse
    /// every request is an error naming its field, not a crash or an outage later).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.listeners.is_empty() {
            return Err((
                "listeners".into(),
                "at least one listener is needed (a proxy without one serves nothing)".into(),
            ));
        }
        in_range("drain.timeout_ms", self.drain.timeout_ms, ranges::DRAIN_MS)?;
        in_range(
            "admin.timeout_ms",
            self.admin.timeout_ms,
            ranges::TIMEOUT_MS,
        )?;
        in_range(
            "overload.max_connections",
            self.overload.max_connections,
            ranges::COUNT,
        )?;
        in_range(
            "overload.keepalive_off_percent",
            self.overload.keepalive_off_percent.into(),
            (1, 100),
        )?;
        if let Some(identity) = &self.identity {
            identity
                .source()
                .map_err(|(f, m)| (format!("identity.{f}"), m))?;
        }
        if let Some(t) = &self.tracing {
            t.validate()?;
        }
        let mut service_names = HashSet::new();
        for (i, s) in self.wasm.services.iter().enumerate() {
            if !service_names.insert(s.name.as_str()) {
                return Err((
                    format!("wasm.services[{i}].name"),
                    format!("duplicate service name `{}`", s.name),
                ));
            }
        }
        let mut cluster_names = HashSet::new();
        for (i, c) in self.clusters.iter().enumerate() {
            let at = |f: &str| format!("clusters[{i}].{f}");
            if c.name.is_empty() {
                return Err((at("name"), "must not be empty".into()));
            }
            if !cluster_names.insert(c.name.as_str()) {
                return Err((at("name"), format!("duplicate cluster name `{}`", c.name)));
            }
            c.validate(self.identity.is_some())
                .map_err(|(f, m)| (at(&f), m))?;
        }
        let mut listener_names = HashSet::new();
        let mut addresses = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let at = |f: &str| format!("listeners[{i}].{f}");
            if l.name.is_empty() {
                return Err((at("name"), "must not be empty".into()));
            }
            if !listener_names.insert(l.name.as_str()) {
                return Err((at("name"), format!("duplicate listener name `{}`", l.name)));
            }
            if l.address.port() != 0 && !addresses.insert(l.address) {
                return Err((
                    at("address"),
                    format!("{} is used by another listener", l.address),
                ));
            }
            if !l.default_cluster.is_empty() && !cluster_names.contains(l.default_cluster.as_str())
            {
                return Err((
                    at("default_cluster"),
                    format!("no cluster named `{}`", l.default_cluster),
                ));
            }
            if let Some(capture) = &l.capture {
                for (port, cluster) in &capture.ports {
                    if !cluster_names.contains(cluster.as_str()) {
                        return Err((
                            at(&format!("capture.ports.{port}")),
                            format!("no cluster named `{cluster}`"),
                        ));
                    }
                }
                in_range(
                    &at("capture.detect_timeout_ms"),
                    capture.detect_timeout_ms,
                    ranges::DETECT_MS,
                )?;
                in_range(
                    &at("capture.connect_timeout_ms"),
                    capture.connect_timeout_ms,
                    ranges::TIMEOUT_MS,
                )?;
            }
            if l.protocol == DownstreamProtocol::Tcp
                && l.default_cluster.is_empty()
                && l.capture.is_none()
            {
                return Err((
                    at("default_cluster"),
                    "a `tcp` listener needs a default cluster (or `capture`)".into(),
                ));
            }
            l.validate(self.identity.is_some())
                .map_err(|(f, m)| (at(&f), m))?;
            let mut filter_names = HashSet::new();
            for (j, f) in l.filters.iter().enumerate() {
                let at = |x: &str| format!("listeners[{i}].filters[{j}].{x}");
                if f.name.is_empty() || !filter_names.insert(f.name.as_str()) {
                    return Err((
                        at("name"),
                        "must be non-empty and unique in the chain".into(),
                    ));
                }
                let fl = &f.limits;
                in_range(
                    &at("limits.memory_mb"),
                    fl.memory_mb.into(),
                    ranges::MEMORY_MB,
                )?;
                in_range(
                    &at("limits.callback_ms"),
                    fl.callback_ms,
                    ranges::CALLBACK_MS,
                )?;
                in_range(
                    &at("limits.buffer_kb"),
                    fl.buffer_kb.into(),
                    ranges::FILTER_BUFFER_KB,
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_settings_are_read_and_checked_as_a_file_s_clusters() {
        let json = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap();
        let c = ClusterConfig::from_settings(
            "echo",
            Some(&json(
                r#"{"lb_policy": "least_request", "request_timeout_ms": 3000}"#,
            )),
            false,
        )
        .unwrap();
        assert_eq!(
            (c.name.as_str(), c.lb_policy),
            ("echo", LbPolicy::LeastRequest)
        );
        assert_eq!(c.request_timeout_ms, 3000);
        assert!(c.endpoints.is_empty());
        let defaults = ClusterConfig::from_settings("echo", None, false).unwrap();
        assert_eq!(defaults.connect_timeout_ms, defaults::connect_timeout_ms());
        let err = |t: &str, identity| {
            ClusterConfig::from_settings("echo", Some(&json(t)), identity).unwrap_err()
        };
        let e = err(r#"{"lb_policy": "fastest"}"#, true);
        assert!(
            e.starts_with("settings: lb_policy: unknown variant `fastest`"),
            "{e}"
        );
        let e = err(r#"{"connect_timeout": 5}"#, true);
        assert!(e.contains("unknown field `connect_timeout`"), "{e}");
        assert_eq!(
            err(r#"{"name": "x"}"#, true),
            "settings must not set `name`"
        );
        assert_eq!(err("[1]", true), "settings must be an object");
        let e = err(r#"{"connect_timeout_ms": 0}"#, true);
        assert!(e.starts_with("settings.connect_timeout_ms: "), "{e}");
        let e = err(r#"{"tls": {"mode": "mesh"}}"#, false);
        assert!(
            e.starts_with("settings.tls.mode: ") && e.contains("identity"),
            "{e}"
        );
        assert!(
            ClusterConfig::from_settings("e", Some(&json(r#"{"tls": {"mode": "mesh"}}"#)), true)
                .is_ok()
        );
    }

    const GOOD: &str = r#"
admin:
  address: 127.0.0.1:9901
listeners:
  - name: outbound
    address: 127.0.0.1:15001
    protocol: auto
    default_cluster: service2
    filters: []
clusters:
  - name: service2
    protocol: http1
    lb_policy: weighted
    endpoints:
      - { address: 127.0.0.1:8001, weight: 1 }
      - { address: 127.0.0.1:8002, weight: 3 }
    connect_timeout_ms: 1000
    request_timeout_ms: 15000
    outlier: { consecutive_failures: 5, base_ejection_ms: 30000, max_ejection_percent: 50 }
    limits: { max_connections: 1024, max_pending_requests: 1024, max_requests: 1024 }
"#;

    #[test]
    fn addresses_parse_as_ip_or_host_and_print_back() {
        assert_eq!(
            EndpointAddress::parse("127.0.0.1:80"),
            Ok(EndpointAddress::Ip("127.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            EndpointAddress::parse("[::1]:80"),
            Ok(EndpointAddress::Ip("[::1]:80".parse().unwrap()))
        );
        let host = EndpointAddress::parse("service_2:8080").unwrap();
        assert_eq!(
            host,
            EndpointAddress::Host {
                host: "service_2".into(),
                port: 8080
            }
        );
        assert_eq!(host.to_string(), "service_2:8080");
        assert_eq!(
            EndpointAddress::parse("[::1]:80").unwrap().to_string(),
            "[::1]:80"
        );
        for bad in [
            "service2",
            "a b:80",
            "host:99999",
            "host:0",
            "127.0.0.1:0",
            ":80",
            "",
        ] {
            assert!(EndpointAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn failure_policies_parse_by_name_both_ways() {
        for p in FailurePolicy::ALL {
            assert_eq!(p.as_str().parse::<FailurePolicy>(), Ok(p));
            let yaml: FailurePolicy = serde_yaml_ng::from_str(p.as_str()).unwrap();
            assert_eq!(yaml, p);
        }
        assert_eq!("".parse::<FailurePolicy>(), Ok(FailurePolicy::FailClosed));
        assert!("fail_later".parse::<FailurePolicy>().is_err());
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("proxy.yaml"), text)
    }

    #[test]
    fn the_documented_example_parses_with_its_values() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.listeners[0].default_cluster, "service2");
        assert_eq!(c.clusters[0].lb_policy, LbPolicy::Weighted);
        assert_eq!(c.clusters[0].endpoints[1].weight, 3);
        assert_eq!(c.clusters[0].outlier.max_ejection_percent, 50);
        // Unset fields take their documented defaults.
        assert_eq!(c.listeners[0].max_request_header_bytes, 61440);
        assert_eq!(c.clusters[0].outlier.max_ejection_ms, 300_000);
        assert_eq!(c.drain.timeout_ms, 5_000);
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let text = GOOD.replace("    lb_policy: weighted", "    lb_polcy: weighted");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("proxy.yaml:13:5: "), "{err}");
        assert!(err.contains("clusters[0]"), "{err}");
        assert!(err.contains("unknown field `lb_polcy`"), "{err}");
    }

    #[test]
    fn bad_value_names_file_line_and_field() {
        let text = GOOD.replace("lb_policy: weighted", "lb_policy: fastest");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("proxy.yaml:13:"), "{err}");
        assert!(err.contains("clusters[0].lb_policy"), "{err}");
        assert!(err.contains("fastest"), "{err}");

        let text = GOOD.replace("address: 127.0.0.1:15001", "address: 127.0.0.1:99999");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.starts_with("proxy.yaml:6:"), "{err}");
        assert!(err.contains("listeners[0].address"), "{err}");
    }

    #[test]
    fn references_and_ranges_are_checked() {
        let text = GOOD.replace("default_cluster: service2", "default_cluster: nope");
        let err = parse(&text).unwrap_err().to_string();
        assert_eq!(
            err,
            "proxy.yaml: listeners[0].default_cluster: no cluster named `nope`"
        );

        let text = GOOD.replace("weight: 3", "weight: 0");
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("clusters[0].endpoints[1].weight: must be between 1 and 1000000 (got 0)"),
            "{err}"
        );

        let text = GOOD.replace("127.0.0.1:8002", "no-port-here");
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("clusters[0].endpoints[1]: address `no-port-here`"),
            "{err}"
        );
    }
}
