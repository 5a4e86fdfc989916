//! Circuit-breaker limits and in-flight counts, each held by a drop guard.
//!
//! Every count the request path takes across an `.await` — a cluster's `max_requests`,
//! `max_connections` and `max_pending_requests`, an endpoint's active requests — is a guard
//! that gives it back in `Drop`, so it is released however the future holding it ends:
//! finished, failed, timed out, or dropped because the client went away (an HTTP/2
//! RST_STREAM, a gRPC deadline, a closed HTTP/1.1 connection). Nothing is released by hand.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::{Cluster, Endpoint};

pub use crate::config::Limit;

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

/// A connection slot under a cluster's `max_connections`, held for as long as the connection
/// is open (its connection task owns it) or, before that, while it is being made. Dropping it
/// releases the slot and wakes a request pending for one.
#[derive(Debug)]
pub struct ConnectionSlot {
    cluster: Arc<Cluster>,
}

impl ConnectionSlot {
    /// The cluster the slot is counted in.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.cluster.connections.fetch_sub(1, Relaxed);
        self.cluster.metrics.upstream_connections_active.dec();
        self.cluster.connection_freed.notify_one();
    }
}

/// A place in a cluster's pending queue (`max_pending_requests`) while a request waits for a
/// connection; dropping it leaves the queue.
#[derive(Debug)]
pub struct PendingSlot {
    cluster: Arc<Cluster>,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.cluster.pending.fetch_sub(1, Relaxed);
    }
}

/// A request counted in flight to an endpoint (its `active` count, which the balancers read);
/// dropping it ends the count.
#[derive(Debug)]
pub struct EndpointRequest {
    endpoint: Arc<Endpoint>,
}

impl EndpointRequest {
    /// The endpoint.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }
}

impl Drop for EndpointRequest {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Relaxed);
    }
}

impl Cluster {
    /// Admits a request under `max_requests`.
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
    pub fn try_reserve_connection(self: &Arc<Self>) -> Option<ConnectionSlot> {
        if self.connections.fetch_add(1, Relaxed) >= self.limits.max_connections {
            self.connections.fetch_sub(1, Relaxed);
            return None;
        }
        self.metrics.upstream_connections_active.inc();
        Some(ConnectionSlot {
            cluster: self.clone(),
        })
    }

    /// Enters the pending queue under `max_pending_requests`.
    pub fn try_enter_pending(self: &Arc<Self>) -> Option<PendingSlot> {
        if self.pending.fetch_add(1, Relaxed) >= self.limits.max_pending_requests {
            self.pending.fetch_sub(1, Relaxed);
            return None;
        }
        Some(PendingSlot {
            cluster: self.clone(),
        })
    }

    /// Requests waiting for a connection across workers.
    pub fn pending_requests(&self) -> usize {
        self.pending.load(Relaxed)
    }
}

impl Endpoint {
    /// Counts a request in flight to this endpoint until the guard is dropped.
    pub fn begin_request(self: &Arc<Self>) -> EndpointRequest {
        self.active.fetch_add(1, Relaxed);
        self.total.fetch_add(1, Relaxed);
        EndpointRequest {
            endpoint: self.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClusterConfig;
    use crate::metrics::ClusterMetrics;

    fn cluster(limits: &str) -> Arc<Cluster> {
        let yaml =
            format!("name: c\nendpoints: [{{ address: \"127.0.0.1:9\" }}]\nlimits: {{ {limits} }}");
        let cfg: ClusterConfig = serde_yaml_ng::from_str(&yaml).unwrap();
        Arc::new(Cluster::new(&cfg, ClusterMetrics::detached()))
    }

    #[test]
    fn every_guard_gives_back_what_it_took_and_limits_hold() {
        let c = cluster("max_requests: 1, max_connections: 1, max_pending_requests: 1");
        let permit = c.admit_request().unwrap();
        assert_eq!(c.admit_request().unwrap_err(), Limit::MaxRequests);
        let slot = c.try_reserve_connection().unwrap();
        assert!(c.try_reserve_connection().is_none());
        let pending = c.try_enter_pending().unwrap();
        assert!(c.try_enter_pending().is_none());
        let ep = c.endpoints().list[0].clone();
        let active = ep.begin_request();
        assert_eq!(
            (
                c.active_requests(),
                c.open_connections(),
                c.pending_requests()
            ),
            (1, 1, 1)
        );
        assert_eq!(ep.active_requests(), 1);
        drop((permit, slot, pending, active));
        assert_eq!(
            (
                c.active_requests(),
                c.open_connections(),
                c.pending_requests()
            ),
            (0, 0, 0)
        );
        assert_eq!(ep.active_requests(), 0);
        assert!(c.admit_request().is_ok() && c.try_reserve_connection().is_some());
    }
}
