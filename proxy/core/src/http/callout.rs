//! Filters' HTTP callouts (`proxy_http_call`): each goes to its cluster through the same
//! [`upstream::dispatch`] as a request's attempt — admitted under the cluster's limits,
//! balanced, pooled, counted and recorded for outlier detection alike — and its whole
//! response is read within the callout's timeout.
//!
//! Callouts a stream paused on run side by side, as tasks of the stream's worker, and are
//! dropped with the stream (the client left), giving back every count they took. Callouts a
//! filter makes outside a stream (from its root context: start, ticks, queues) go through
//! [`run_on_worker`], which finds the proxy's clusters through the worker it runs on.

use std::cell::RefCell;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt as _;

use super::ListenerCtx;
use super::attempt::set_upstream_target;
use crate::body::RequestBody;
use crate::filter::{Callout, CalloutOutcome};
use crate::upstream::{self, Cluster};

/// Largest callout response body kept for the filter.
const CALLOUT_BODY_LIMIT: usize = 1024 * 1024;

thread_local! {
    /// The proxy's clusters, on a worker thread (for callouts outside a stream).
    static CLUSTERS: RefCell<Option<Arc<[Arc<Cluster>]>>> = const { RefCell::new(None) };
}

/// Makes the calling worker thread able to send callouts outside a stream to `clusters`.
pub fn install(clusters: Arc<[Arc<Cluster>]>) {
    CLUSTERS.with(|c| *c.borrow_mut() = Some(clusters));
}

/// Sends the callouts a filter paused on, side by side, and returns their outcomes (in the
/// order they complete). Dropping the future drops the callouts.
pub async fn run_all(ctx: &ListenerCtx, callouts: Vec<Callout>) -> Vec<CalloutOutcome> {
    if callouts.len() == 1 {
        let callout = callouts.into_iter().next().expect("one callout");
        return vec![run(&ctx.clusters, callout).await];
    }
    let mut set = tokio::task::JoinSet::new();
    for callout in callouts {
        let clusters = ctx.clusters.clone();
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
    match CLUSTERS.with(|c| c.borrow().clone()) {
        Some(clusters) => run(&clusters, callout).await,
        None => CalloutOutcome {
            token: callout.token,
            response: Err("no worker to send the callout from".into()),
        },
    }
}

/// Sends one callout to its cluster and reads the whole response within its timeout.
pub async fn run(clusters: &[Arc<Cluster>], callout: Callout) -> CalloutOutcome {
    let token = callout.token;
    let deadline = tokio::time::Instant::now() + callout.timeout;
    let response = async {
        let cluster = clusters
            .iter()
            .find(|c| c.name == callout.cluster)
            .ok_or_else(|| format!("no cluster `{}`", callout.cluster))?;
        let (mut head, body) = callout.request.into_parts();
        set_upstream_target(&mut head, cluster.protocol).map_err(|(_, why)| why.trim())?;
        let req = Request::from_parts(head, RequestBody::Full { body: body.into() });
        let dispatched = upstream::dispatch(cluster, req, &[], Some(deadline), |_| {}).await;
        let (resp, in_flight) = dispatched.outcome.map_err(|e| e.to_string())?;
        let (head, body) = resp.into_parts();
        let limited = http_body_util::Limited::new(body, CALLOUT_BODY_LIMIT);
        let bytes: Bytes = limited
            .collect()
            .await
            .map_err(|e| format!("callout body: {e}"))?
            .to_bytes();
        in_flight.finish(true);
        Ok::<_, String>((head, bytes))
    };
    let response = match tokio::time::timeout_at(deadline, response).await {
        Ok(r) => r,
        Err(_) => Err("callout timed out".to_owned()),
    };
    CalloutOutcome { token, response }
}
