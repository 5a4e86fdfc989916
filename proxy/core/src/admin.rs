//! The admin endpoint: `/ready`, `/stats/prometheus`, `/clusters`, `/config_dump`.
//!
//! It runs on the main thread's runtime, apart from the workers, and keeps answering while
//! the proxy drains (`/ready` then says 503 so that load balancers stop sending traffic).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::clock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::upstream::Cluster;

/// What the admin endpoint reports on.
pub struct AdminState {
    /// The running configuration (replaced after each SIGHUP or control snapshot applied).
    pub config: arc_swap::ArcSwap<Config>,
    /// The control service this proxy follows and where it stands (`null` without one).
    pub control: std::sync::Mutex<serde_json::Value>,
    /// Where each listener actually listens (port 0 resolved).
    pub listeners: Vec<(String, SocketAddr)>,
    /// All clusters.
    pub clusters: Arc<[Arc<Cluster>]>,
    /// All metrics.
    pub metrics: Arc<Metrics>,
    /// Set once the proxy starts draining.
    pub draining: AtomicBool,
}

/// Serves the admin endpoint until the task is dropped.
pub async fn serve(socket: TcpListener, state: Arc<AdminState>) {
    loop {
        let (stream, _) = match socket.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/ready" => {
            if state.draining.load(Relaxed) {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "DRAINING\n".into(),
                )
            } else {
                reply(StatusCode::OK, "text/plain", "LIVE\n".into())
            }
        }
        "/stats/prometheus" => {
            let now = clock::now_ms();
            for c in state.clusters.iter() {
                c.metrics.endpoints_ejected.set(c.ejected_count(now) as i64);
            }
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                state.metrics.encode(),
            )
        }
        "/clusters" => {
            let now = clock::now_ms();
            let clusters: Vec<_> = state
                .clusters
                .iter()
                .map(|c| {
                    json!({
                        "name": c.name,
                        "protocol": c.protocol,
                        "lb_policy": c.lb_policy,
                        "active_requests": c.active_requests(),
                        "open_connections": c.open_connections(),
                        "pending_requests": c.pending_requests(),
                        "panic": c.in_panic(now),
                        "endpoints": c.endpoints().list.iter().map(|e| e.snapshot(now)).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json_reply(&json!({ "clusters": clusters }))
        }
        "/config_dump" => {
            let listening: Vec<_> = state
                .listeners
                .iter()
                .map(|(name, addr)| json!({ "name": name, "address": addr }))
                .collect();
            let control = state.control.lock().map(|c| c.clone()).unwrap_or_default();
            json_reply(&json!({
                "config": **state.config.load(),
                "listening": listening,
                "control": control,
            }))
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /ready /stats/prometheus /clusters /config_dump\n".into(),
        ),
    }
}

fn json_reply(v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_string_pretty(v).unwrap_or_default();
    text.push('\n');
    reply(StatusCode::OK, "application/json", text)
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}
