//! The web dashboard (`weft-control --dashboard ADDR`): one page, its script and its style
//! embedded in the binary (written by hand: no Node toolchain, no CDN, so it works with no
//! network beyond the control service), and one JSON endpoint the page polls every two
//! seconds.
//!
//! - `GET /`, `/app.js`, `/style.css`: the page (no secrets in it, served to anyone);
//! - `GET /api/overview?window=SECS`: the mesh now, as [`overview`] makes it: golden metrics
//!   per service, edge, route and proxy over the window, charts of the last five minutes in
//!   10-second slots, every proxy's status, and the rollouts. It needs the control API's
//!   bearer token (`authorization: Bearer <token>`) when the service has one; the page asks
//!   for it once (or takes it from the URL's `#token=` fragment) and keeps it in the tab's
//!   session storage.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

use crate::model::now_ms;
use crate::rollout::Record;
use crate::state::ControlState;
use crate::stats::{Row, StatKind};

const INDEX: &str = include_str!("index.html");
const APP: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");

/// The charts' slot and length.
const SLOT_S: u32 = 10;
const SLOTS: u32 = 30;

fn row_json(r: &Row) -> Value {
    json!({
        "service": r.service,
        "route": r.route,
        "source": r.source,
        "proxy": r.proxy,
        "requests": r.requests,
        "failures": r.failures,
        "rps": r.rps,
        "success_rate": r.success_rate,
        "p50_ms": r.p50_ms,
        "p95_ms": r.p95_ms,
        "p99_ms": r.p99_ms,
    })
}

fn rollout_json(r: &Record) -> Value {
    json!({
        "id": r.id,
        "state": r.state.as_str(),
        "resources": r.resources,
        "module": r.module.as_ref().map(|(n, d)| format!("{n}@{d}")),
        "steps": r.gates.steps,
        "step": r.step,
        "proxies": r.proxies,
        "share": r.share,
        "interval_ms": r.gates.interval_ms,
        "max_error_rate": r.gates.max_error_rate,
        "max_p99_ms": r.gates.max_p99_ms,
        "started_ms": r.started_ms,
        "reason": r.reason,
        "decisions": r.decisions.iter().map(|d| {
            let sample = |s: &Option<crate::stats::Sample>| s.as_ref().map(|s| json!({
                "requests": s.requests,
                "failures": s.failures,
                "error_rate": s.error_rate(),
                "p99_ms": s.p99_ms,
            }));
            json!({
                "at_ms": d.at_ms,
                "step_percent": d.step_percent,
                "action": d.action,
                "reason": d.reason,
                "canary": sample(&d.canary),
                "baseline": sample(&d.baseline),
            })
        }).collect::<Vec<_>>(),
    })
}

/// The mesh now, for the page: golden metrics over `window_s`, the last five minutes in
/// slots, the proxies, the rollouts.
pub fn overview(state: &ControlState, window_s: u32) -> Value {
    let now = now_ms();
    let stats = &state.stats;
    let rows = |kind| {
        stats
            .stat(kind, window_s, now)
            .iter()
            .map(row_json)
            .collect::<Vec<_>>()
    };
    // Per service: one point per slot.
    let mut series: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
    for (until, slot) in stats.series(StatKind::Services, SLOT_S, SLOTS, now) {
        for r in slot {
            series.entry(r.service.clone()).or_default().push(json!({
                "t": until,
                "rps": r.rps,
                "success_rate": r.success_rate,
                "p50_ms": r.p50_ms,
                "p95_ms": r.p95_ms,
                "p99_ms": r.p99_ms,
            }));
        }
    }
    let version = state.version();
    let proxies: Vec<Value> = state
        .proxies()
        .into_iter()
        .map(|p| {
            json!({
                "id": p.id,
                "labels": p.labels,
                "connected": p.connected,
                "acked_version": p.acked_version,
                "synced_version": p.synced_version,
                "latest_version": version,
                "nack_error": p.nack_error,
                "last_seen_ms": p.last_seen_ms,
                "last_report_ms": p.last_report_ms,
                "failures": p.failures.iter().map(|(f, k, n)| json!({
                    "filter": f, "kind": k, "count": n,
                })).collect::<Vec<_>>(),
                "filters": p.filters.iter().map(|(l, f, d, policy)| json!({
                    "listener": l, "filter": f, "digest": d, "failure_policy": policy,
                })).collect::<Vec<_>>(),
                "spiffe_id": p.identity.as_ref().map(|i| i.0.clone()),
                "cert_not_after_unix": p.identity.as_ref().map(|i| i.1),
            })
        })
        .collect();
    json!({
        "now_ms": now,
        "window_seconds": window_s,
        "version": version,
        "services": rows(StatKind::Services),
        "edges": rows(StatKind::Edges),
        "routes": rows(StatKind::Routes),
        "series": series,
        "slot_seconds": SLOT_S,
        "proxies": proxies,
        "rollouts": state.rollouts.list().iter().map(rollout_json).collect::<Vec<_>>(),
    })
}

fn reply(status: StatusCode, kind: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        kind.parse().expect("a valid content type"),
    );
    // Nothing from elsewhere: no CDN, no inline script from anyone else.
    h.insert(
        hyper::header::CONTENT_SECURITY_POLICY,
        hyper::header::HeaderValue::from_static("default-src 'self'; style-src 'self'"),
    );
    h.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

fn authorized(token: Option<&str>, req: &Request<Incoming>) -> bool {
    let Some(token) = token else { return true };
    req.headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| crate::service::constant_time_eq(given.as_bytes(), token.as_bytes()))
}

/// Answers one request of the dashboard.
pub fn answer(
    state: &ControlState,
    token: Option<&str>,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/" | "/index.html" => reply(StatusCode::OK, "text/html; charset=utf-8", INDEX),
        "/app.js" => reply(StatusCode::OK, "text/javascript; charset=utf-8", APP),
        "/style.css" => reply(StatusCode::OK, "text/css; charset=utf-8", STYLE),
        "/api/overview" => {
            if !authorized(token, req) {
                return reply(
                    StatusCode::UNAUTHORIZED,
                    "application/json",
                    r#"{"error":"this control service needs its bearer token"}"#,
                );
            }
            let window = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("window=")))
                .and_then(|w| w.parse::<u32>().ok())
                .unwrap_or(crate::stats::DEFAULT_WINDOW_S)
                .clamp(1, (crate::stats::KEEP_MS / 1000) as u32);
            let body = overview(state, window).to_string();
            reply(StatusCode::OK, "application/json", body)
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Serves the dashboard on `listener` (over TLS with `tls`) until the process ends.
pub async fn serve(
    state: Arc<ControlState>,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    token: Option<String>,
) {
    let token: Option<Arc<str>> = token.map(Into::into);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("dashboard accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (state, token, acceptor) = (state.clone(), token.clone(), acceptor.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = answer(&state, token.as_deref(), &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let result = match acceptor {
                Some(a) => {
                    match tokio::time::timeout(std::time::Duration::from_secs(10), a.accept(tcp))
                        .await
                    {
                        Ok(Ok(tls)) => {
                            builder
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                                .await
                        }
                        _ => return,
                    }
                }
                None => {
                    builder
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!("dashboard connection: {e}");
            }
        });
    }
}
