//! Filters' HTTP callouts (`proxy_http_call`): each goes to its cluster through the same
//! [`upstream::dispatch`] as a request's attempt — admitted under the cluster's limits,
//! balanced, pooled, counted and recorded for outlier detection alike — and its whole
//! response is read within the callout's timeout. Dropping the request (the client left)
//! drops the callouts with it, and every count they took is given back.

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt as _;

use super::ListenerCtx;
use super::attempt::set_upstream_target;
use crate::body::RequestBody;
use crate::filter::{Callout, CalloutOutcome};
use crate::upstream;

/// Largest callout response body kept for the filter.
const CALLOUT_BODY_LIMIT: usize = 1024 * 1024;

/// Sends the callouts a filter paused on, in order, and returns their outcomes.
pub async fn run_all(ctx: &ListenerCtx, callouts: Vec<Callout>) -> Vec<CalloutOutcome> {
    let mut outcomes = Vec::with_capacity(callouts.len());
    for callout in callouts {
        outcomes.push(run(ctx, callout).await);
    }
    outcomes
}

/// Sends one callout to its cluster and reads the whole response within its timeout.
pub async fn run(ctx: &ListenerCtx, callout: Callout) -> CalloutOutcome {
    let token = callout.token;
    let deadline = tokio::time::Instant::now() + callout.timeout;
    let response = async {
        let cluster = ctx
            .clusters
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
