//! The admin endpoint: `/ready`, `/stats/prometheus`, `/clusters`, `/config_dump`.
//!
//! It runs on the main thread's runtime, apart from the workers, and keeps answering while
//! the proxy drains (`/ready` then says 503 so that load balancers stop sending traffic).
//!
//! It is unauthenticated, so it defends what it can: a request must name an IP address,
//! `localhost` or an allowed host in its `Host` header (a DNS-rebinding page in a browser
//! names its own domain); a slow or idle connection is closed after `admin.timeout_ms`;
//! values of filter configuration that look like secrets are redacted from `/config_dump`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;

use crate::clock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::upstream::ClusterTable;

/// What the admin endpoint reports on.
pub struct AdminState {
    /// The running configuration (replaced after each SIGHUP or control snapshot applied).
    pub config: arc_swap::ArcSwap<Config>,
    /// The control service this proxy follows and where it stands (`null` without one).
    pub control: std::sync::Mutex<serde_json::Value>,
    /// Where each listener actually listens (port 0 resolved).
    pub listeners: arc_swap::ArcSwap<Vec<(String, SocketAddr)>>,
    /// The proxy's clusters now.
    pub clusters: Arc<ClusterTable>,
    /// All metrics.
    pub metrics: Arc<Metrics>,
    /// Set once the proxy starts draining.
    pub draining: AtomicBool,
    /// The proxy's mesh identity.
    pub identity: Arc<crate::tls::IdentityStore>,
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
            let timeout = Duration::from_millis(state.config.load().admin.timeout_ms);
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(stream), service);
            let _ = conn.await;
        });
    }
}

/// Whether `host` (a `Host` header: name or address, and maybe a port) may reach the admin
/// endpoint: an IP address, `localhost`, or one of `allowed`.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        // `[v6]:port`
        Some(rest) => {
            return rest
                .split(']')
                .next()
                .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
        }
        None => host.rsplit_once(':').map_or(host, |(n, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                n
            } else {
                host
            }
        }),
    };
    name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// Whether a configuration key names a secret: one of its words (split at `_`, `-`, `.` and
/// camelCase) is `secret`, `password`, `passwd`, `token`, `credential(s)`, `authorization`
/// or `apikey`, or it has `api` or `private` followed by `key` (`api_token`, `clientSecret`,
/// `private_key`; not `tokens_per_fill`).
fn names_secret(key: &str) -> bool {
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut prev_lower = false;
    for c in key.chars() {
        let boundary = !c.is_ascii_alphanumeric() || (c.is_ascii_uppercase() && prev_lower);
        if boundary && !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
        if c.is_ascii_alphanumeric() {
            word.push(c.to_ascii_lowercase());
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
    }
    if !word.is_empty() {
        words.push(word);
    }
    const SECRET: [&str; 9] = [
        "secret",
        "password",
        "passwd",
        "token",
        "credential",
        "credentials",
        "authorization",
        "apikey",
        "secrets",
    ];
    words.iter().any(|w| SECRET.contains(&w.as_str()))
        || words
            .windows(2)
            .any(|p| (p[0] == "api" || p[0] == "private") && p[1] == "key")
}

/// Replaces, anywhere in `v`, the value of every key that names a secret
/// ([`names_secret`]) with `"[redacted]"`.
pub fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, value) in map.iter_mut() {
                if names_secret(k) {
                    *value = serde_json::Value::String("[redacted]".into());
                } else {
                    redact(value);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET or HEAD only\n".into(),
        );
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    if let Some(host) = host
        && !host_allowed(host, &state.config.load().admin.allowed_hosts)
    {
        return reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            format!(
                "host `{host}` is not allowed here: use an IP address or localhost, or list it \
                 in admin.allowed_hosts\n"
            ),
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
            for c in state.clusters.load().list.iter() {
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
                .load()
                .list
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
        "/certs" => {
            let identity = state.identity.held().map(|id| {
                json!({
                    "spiffe_id": id.id.to_string(),
                    "serial": id.leaf.serial,
                    "issuer": id
                        .certified
                        .cert
                        .first()
                        .and_then(|c| x509_parser::parse_x509_certificate(c).ok())
                        .map(|(_, c)| c.issuer().to_string()),
                    "not_before": id.leaf.not_before,
                    "not_after": id.leaf.not_after,
                    "expired": id.expired(),
                    "trust_bundle_roots": id.root_count,
                })
            });
            json_reply(&json!({ "identity": identity }))
        }
        "/config_dump" => {
            let listening: Vec<_> = state
                .listeners
                .load()
                .iter()
                .map(|(name, addr)| json!({ "name": name, "address": addr }))
                .collect();
            let control = state.control.lock().map(|c| c.clone()).unwrap_or_default();
            let mut config = serde_json::to_value(&**state.config.load()).unwrap_or_default();
            redact(&mut config);
            json_reply(&json!({
                "config": config,
                "listening": listening,
                "control": control,
            }))
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /ready /stats/prometheus /clusters /certs /config_dump\n".into(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_are_words_not_substrings() {
        for key in [
            "api_token",
            "clientSecret",
            "private_key",
            "PASSWORD",
            "db-passwd",
            "apiKey",
            "x.credentials",
            "authorization",
        ] {
            assert!(names_secret(key), "{key}");
        }
        for key in [
            "tokens_per_fill",
            "greeting",
            "keyspace",
            "secretary_name",
            "author",
        ] {
            assert!(!names_secret(key), "{key}");
        }
    }

    #[test]
    fn hosts_are_ip_addresses_localhost_or_allowed() {
        let allowed = vec!["weft-admin".to_owned()];
        for host in [
            "127.0.0.1",
            "127.0.0.1:9901",
            "[::1]:9901",
            "localhost:1",
            "Weft-Admin:80",
            "10.0.0.7",
        ] {
            assert!(host_allowed(host, &allowed), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:9901",
            "127.0.0.1.evil.example",
            "[nope]:1",
            "localhost.evil",
        ] {
            assert!(!host_allowed(host, &allowed), "{host}");
        }
    }
}
