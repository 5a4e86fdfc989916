//! Filters' HTTP callouts (`proxy_http_call`): each goes to its cluster through the same
//! [`upstream::dispatch`] as a request's attempt — admitted under the cluster's limits,
//! balanced, pooled, counted and recorded for outlier detection alike — and its whole
//! response is read within the callout's timeout.
//!
//! Callouts a stream paused on run side by side, as tasks of the stream's worker, and are
//! dropped with the stream (the client left), giving back every count they took. Callouts a
//! filter makes outside a stream (from its root context: start, ticks, queues) go through
//! [`run_on_worker`], which finds the proxy's clusters through the worker it runs on.
//!
//! A filter's gRPC stream is a [`Streaming`] exchange ([`open_on_worker`]): the request
//! body is fed piece by piece as the filter sends messages, and the response is read as it
//! arrives.

use std::cell::RefCell;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Version, request, response};
use http_body_util::BodyExt as _;

use super::attempt::set_upstream_target;
use crate::body::{Inbound, RequestBody};
use crate::config::UpstreamProtocol;
use crate::filter::{Callout, CalloutOutcome, CalloutResponse};
use crate::upstream::{self, ClusterTable, Clusters, InFlight};

/// Why a callout failed when its timeout passed.
pub const TIMED_OUT: &str = "callout timed out";

/// Largest callout response body kept for the filter.
const CALLOUT_BODY_LIMIT: usize = 1024 * 1024;

thread_local! {
    /// The proxy's clusters, on a worker thread (for callouts outside a stream).
    static CLUSTERS: RefCell<Option<Arc<ClusterTable>>> = const { RefCell::new(None) };
}

/// Makes the calling worker thread able to send callouts outside a stream to the clusters
/// of `table` (as they are when each is sent).
pub fn install(table: Arc<ClusterTable>) {
    CLUSTERS.with(|c| *c.borrow_mut() = Some(table));
}

/// The clusters now, on a worker thread.
fn worker_clusters() -> Option<Arc<Clusters>> {
    CLUSTERS.with(|c| Some(c.borrow().as_ref()?.load_full()))
}

/// Sends the callouts a filter paused on to `clusters` (the stream's), side by side, and
/// returns their outcomes (in the order they complete). Dropping the future drops the
/// callouts.
pub async fn run_all(clusters: &Arc<Clusters>, callouts: Vec<Callout>) -> Vec<CalloutOutcome> {
    if callouts.len() == 1 {
        let callout = callouts.into_iter().next().expect("one callout");
        return vec![run(clusters, callout).await];
    }
    let mut set = tokio::task::JoinSet::new();
    for callout in callouts {
        let clusters = clusters.clone();
        set.spawn(async move { run(&clusters, callout).await });
    }
    let mut outcomes = Vec::with_capacity(set.len());
    while let Some(done) = set.join_next().await {
        if let Ok(outcome) = done {
            outcomes.push(outcome);
        }
    }
    outcomes
}

/// Sends a callout made outside a stream (a filter's root context) to the proxy's clusters
/// as the calling worker knows them; off a worker it fails with a reason.
pub async fn run_on_worker(callout: Callout) -> CalloutOutcome {
    match worker_clusters() {
        Some(clusters) => run(&clusters, callout).await,
        None => CalloutOutcome {
            token: callout.token,
            response: Err("no worker to send the callout from".into()),
        },
    }
}

/// Sends one callout to its cluster and reads the whole response within its timeout.
pub async fn run(clusters: &Clusters, callout: Callout) -> CalloutOutcome {
    let token = callout.token;
    let deadline = tokio::time::Instant::now() + callout.timeout;
    let response = async {
        let (head, body) = callout.request.into_parts();
        let req_body = match callout.trailers {
            Some(trailers) => RequestBody::Filtered {
                body: crate::body::FilteredBody::whole(
                    body,
                    Some(trailers),
                    crate::filter::Direction::Request,
                ),
            },
            None => RequestBody::Full { body: body.into() },
        };
        let (resp, in_flight) =
            exchange(clusters, &callout.cluster, head, req_body, Some(deadline)).await?;
        let (head, body) = resp.into_parts();
        let limited = http_body_util::Limited::new(body, CALLOUT_BODY_LIMIT);
        let collected = limited
            .collect()
            .await
            .map_err(|e| format!("callout body: {e}"))?;
        let trailers = collected.trailers().cloned();
        in_flight.finish(true);
        Ok::<_, String>(CalloutResponse {
            head,
            body: collected.to_bytes(),
            trailers,
        })
    };
    let response = match tokio::time::timeout_at(deadline, response).await {
        Ok(r) => r,
        Err(_) => Err(TIMED_OUT.to_owned()),
    };
    CalloutOutcome { token, response }
}

/// Sends `head` with `body` to cluster `cluster` through [`upstream::dispatch`] and returns
/// the response head with what it holds. A request of version HTTP/2 needs a cluster that
/// speaks HTTP/2.
async fn exchange(
    clusters: &Clusters,
    cluster: &str,
    mut head: request::Parts,
    body: RequestBody,
    deadline: Option<tokio::time::Instant>,
) -> Result<(http::Response<Inbound>, InFlight), String> {
    let cluster = clusters
        .get(cluster)
        .ok_or_else(|| format!("no cluster `{cluster}`"))?;
    if head.version == Version::HTTP_2 && cluster.protocol != UpstreamProtocol::Http2 {
        return Err(format!(
            "cluster `{}` speaks HTTP/1.1; gRPC needs `protocol: http2`",
            cluster.name
        ));
    }
    set_upstream_target(&mut head, cluster.protocol).map_err(|(_, why)| why.trim())?;
    let req = Request::from_parts(head, body);
    let dispatched = upstream::dispatch(cluster, req, &[], deadline, |_| {}).await;
    dispatched.outcome.map_err(|e| e.to_string())
}

/// A streaming exchange with a cluster (a filter's gRPC stream), once its response head
/// arrived: the body is read as it comes. Dropping it resets the stream and gives back what
/// it holds of the cluster's limits.
pub struct Streaming {
    /// The response head.
    pub head: response::Parts,
    /// The response body, read as it arrives.
    pub body: Inbound,
    in_flight: InFlight,
}

impl Streaming {
    /// Ends the exchange; `complete` when the response was read to its end.
    pub fn finish(self, complete: bool) {
        self.in_flight.finish(complete);
    }
}

/// Opens a streaming exchange to cluster `cluster` from the calling worker: `head` goes at
/// once, then every piece sent on `body` (`None` ends the request; dropping the sender
/// before that resets the stream); waits for the response head until `deadline`.
pub async fn open_on_worker(
    cluster: &str,
    head: request::Parts,
    body: tokio::sync::mpsc::UnboundedReceiver<Option<Bytes>>,
    deadline: Option<tokio::time::Instant>,
) -> Result<Streaming, String> {
    let Some(clusters) = worker_clusters() else {
        return Err("no worker to open the stream from".into());
    };
    let open = exchange(
        &clusters,
        cluster,
        head,
        RequestBody::Channel {
            rx: body,
            ended: false,
        },
        deadline,
    );
    let (resp, in_flight) = match deadline {
        Some(at) => tokio::time::timeout_at(at, open)
            .await
            .unwrap_or_else(|_| Err(TIMED_OUT.to_owned()))?,
        None => open.await?,
    };
    let (head, body) = resp.into_parts();
    Ok(Streaming {
        head,
        body,
        in_flight,
    })
}
