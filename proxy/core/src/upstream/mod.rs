//! The upstream side: clusters and endpoints ([`cluster`]), circuit-breaker limits held by
//! drop guards ([`limits`]), the per-worker balancers and connection pools ([`pool`],
//! [`lb`]), connecting and sending ([`connect`]), and [`dispatch`]: the one path by which a
//! request reaches an endpoint, whether it is a downstream request's attempt or a filter's
//! callout.

pub mod cluster;
pub mod connect;
pub mod endpoint;
pub mod h1;
pub mod lb;
pub mod limits;
pub mod outlier;
pub mod pool;

use std::io;
use std::sync::Arc;

use http::{Request, Response};

pub use cluster::{
    Cluster, ClusterTable, Clusters, Endpoint, EndpointAddress, EndpointSet, EndpointSnapshot,
};
pub use connect::{PooledH1, UpstreamError};
pub use limits::{EndpointRequest, Limit, RequestPermit};

use crate::body::{BoxError, Inbound, RequestBody};
use crate::clock;
use crate::filter::AttemptError;

/// A request sent to an endpoint and not yet finished: it holds the cluster's `max_requests`
/// permit and the endpoint's active count, and for HTTP/1.1 the connection to give back once
/// the response has been read to its end. Dropping it releases all of it (the connection then
/// closes); [`InFlight::finish`] with `complete` returns the connection to the pool.
#[derive(Debug)]
pub struct InFlight {
    cluster: Arc<Cluster>,
    request: EndpointRequest,
    _permit: RequestPermit,
    pooled: Option<PooledH1>,
    /// Whether the connection may carry another request (false after a protocol upgrade).
    pub reusable: bool,
}

impl InFlight {
    /// The endpoint the request went to.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        self.request.endpoint()
    }

    /// The cluster.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Ends the request; a connection whose response was read to its end (`complete`) goes
    /// back to this worker's pool.
    pub fn finish(mut self, complete: bool) {
        if let Some(pooled) = self.pooled.take()
            && complete
            && self.reusable
        {
            pooled.release();
            self.cluster.connection_freed.notify_one();
        }
    }
}

/// Why [`dispatch`] got no response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// A circuit-breaker limit refused the request.
    #[error("upstream overflow: {}", .0.as_str())]
    Overflow(Limit),
    /// The cluster has no endpoint that is not ejected.
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    /// The connection to the chosen endpoint could not be made.
    #[error("upstream connect error: {0}")]
    Connect(io::Error),
    /// The connection failed or was reset before a response.
    #[error("upstream reset: {0}")]
    Reset(BoxError),
    /// No response before the deadline.
    #[error("upstream request timeout")]
    Timeout,
}

impl DispatchError {
    /// How filters see it (`weft.attempt`).
    pub fn attempt_error(&self) -> AttemptError {
        match self {
            Self::Overflow(_) => AttemptError::Overflow,
            Self::NoHealthyUpstream => AttemptError::NoHealthyUpstream,
            Self::Connect(_) => AttemptError::ConnectFailure,
            Self::Reset(_) => AttemptError::Reset,
            Self::Timeout => AttemptError::Timeout,
        }
    }
}

/// What [`dispatch`] did: the endpoint it chose (if it got that far) and the outcome.
pub struct Dispatched {
    /// The endpoint the request was sent to.
    pub endpoint: Option<Arc<Endpoint>>,
    /// The response with what it holds, or why there is none.
    pub outcome: Result<(Response<Inbound>, InFlight), DispatchError>,
}

/// Sends `req` to an endpoint of `cluster`: admits it under `max_requests`, picks an endpoint
/// with this worker's balancer (avoiding the endpoint ids in `avoid` when it can), counts it
/// active there, tells `picked`, sends it (pooled or new connection, within the connection
/// limits) before `deadline`, and records the outcome for outlier detection (5xx responses,
/// connect failures, resets and timeouts count against the endpoint) and latency.
///
/// Every count it takes is a guard: if the future is dropped at any await (connecting,
/// waiting as pending, waiting for the response), everything is given back.
pub async fn dispatch(
    cluster: &Arc<Cluster>,
    req: Request<RequestBody>,
    avoid: &[u64],
    deadline: Option<tokio::time::Instant>,
    picked: impl FnOnce(&Endpoint),
) -> Dispatched {
    let permit = match cluster.admit_request() {
        Ok(p) => p,
        Err(limit) => {
            return Dispatched {
                endpoint: None,
                outcome: Err(DispatchError::Overflow(limit)),
            };
        }
    };
    let now_ms = clock::now_ms();
    let mut pick = pool::pick(cluster, now_ms);
    for _ in 0..avoid.len().min(4) {
        match pick {
            Some(ep) if avoid.contains(&ep.id) => pick = pool::pick(cluster, now_ms),
            _ => break,
        }
    }
    let Some(endpoint) = pick else {
        return Dispatched {
            endpoint: None,
            outcome: Err(DispatchError::NoHealthyUpstream),
        };
    };
    picked(&endpoint);
    let request = endpoint.begin_request();
    let started = clock::now_ns();
    let exchange = connect::send(cluster, &endpoint, req);
    let result = match deadline {
        Some(at) => tokio::time::timeout_at(at, exchange)
            .await
            .unwrap_or(Err(UpstreamError::Timeout)),
        None => exchange.await,
    };
    let outcome = match result {
        Ok((resp, pooled)) => {
            let done = clock::now_ns();
            let latency = done.saturating_sub(started);
            cluster.metrics.latency.observe_ns(latency);
            endpoint.observe_latency(done, latency);
            if cluster.outlier.failures.counts(resp.status().as_u16()) {
                cluster.record_failure(&endpoint);
            } else {
                cluster.record_success(&endpoint);
            }
            Ok((
                resp,
                InFlight {
                    cluster: cluster.clone(),
                    request,
                    _permit: permit,
                    pooled,
                    reusable: true,
                },
            ))
        }
        Err(e) => Err(classify(cluster, &endpoint, e)),
    };
    Dispatched {
        endpoint: Some(endpoint),
        outcome,
    }
}

/// Counts a failed exchange against the endpoint and the cluster's metrics.
fn classify(cluster: &Cluster, endpoint: &Endpoint, e: UpstreamError) -> DispatchError {
    if e.is_endpoint_failure() {
        cluster.record_failure(endpoint);
    }
    tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.address, "{e}");
    match e {
        UpstreamError::Overflow(limit) => DispatchError::Overflow(limit),
        UpstreamError::Connect(e) => DispatchError::Connect(e),
        UpstreamError::Timeout => {
            cluster.metrics.timeouts.inc();
            DispatchError::Timeout
        }
        UpstreamError::Reset(e) => {
            cluster.metrics.resets.inc();
            DispatchError::Reset(e)
        }
    }
}
