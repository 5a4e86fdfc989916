//! Endpoints: where an upstream instance lives and the live statistics every worker shares
//! about it (active requests, peak-EWMA latency, failures, ejection), and the endpoint sets a
//! cluster swaps whole.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use serde::Serialize;

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
    /// Requests in flight to it, across workers (held by [`EndpointRequest`]s).
    pub(super) active: AtomicU32,
    /// Requests sent to it since start.
    pub(super) total: AtomicU64,
    /// Peak-EWMA latency estimate in nanoseconds, as f64 bits.
    ewma_ns: AtomicU64,
    /// When `ewma_ns` was last updated, in nanoseconds of [`clock`].
    ewma_stamp_ns: AtomicU64,
    /// Failures since the last success.
    pub(super) consecutive_failures: AtomicU32,
    /// Ejected until this [`clock`](crate::clock) millisecond; 0 when not ejected.
    pub(super) ejected_until_ms: AtomicU64,
    /// Number of back-to-back ejections, which lengthens the next one.
    pub(super) ejection_streak: AtomicU32,
    /// Ejections since start.
    pub(super) ejections_total: AtomicU64,
    /// For a host-name endpoint: the address its last connection reached.
    resolved: arc_swap::ArcSwapOption<SocketAddr>,
    /// The SPIFFE ID it must prove on a mesh TLS cluster, when known.
    pub identity: Option<weft_config::SpiffeId>,
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
            resolved: arc_swap::ArcSwapOption::empty(),
            identity: None,
        }
    }

    /// The endpoint with the SPIFFE ID it must prove (mesh TLS).
    pub fn with_identity(mut self, identity: Option<weft_config::SpiffeId>) -> Self {
        self.identity = identity;
        self
    }

    /// The socket address requests to it reach: its own, or for a host name the one its
    /// last connection reached (`None` before any).
    pub fn peer(&self) -> Option<SocketAddr> {
        self.address
            .ip()
            .or_else(|| self.resolved.load().as_deref().copied())
    }

    /// Records the address a connection to this host-name endpoint reached.
    pub(super) fn resolved_to(&self, peer: SocketAddr) {
        if self.address.ip().is_none() {
            self.resolved.store(Some(std::sync::Arc::new(peer)));
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

#[cfg(test)]
mod tests {
    use super::*;

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
