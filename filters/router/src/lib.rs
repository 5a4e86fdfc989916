//! The router: an ordered list of routes, the first that matches the request decides.
//!
//! A route matches on host, path (exact, prefix or regex — Rust's `regex`, linear time),
//! method and headers, and then sends the request to one cluster or splits it across
//! clusters by weight, optionally rewriting the path prefix and the host and setting a
//! timeout; or it answers directly (a fixed response or a redirect). A request no route
//! matches gets 404. The configuration is checked when the proxy loads the filter: an
//! invalid regex or a split without weight refuses the chain.
//!
//! Configuration reference: `filters/router/README.md`.

use std::cell::{Cell, OnceCell};
use std::rc::Rc;
use std::time::Duration;

use serde::Deserialize;
use weft_sdk::{Action, Ctx, Filter, LogLevel};

mod index;

use index::RouteIndex;

weft_sdk::export_filter!(Router);

/// The filter's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Routes, tried in order.
    pub routes: Vec<Route>,
    /// What a request no route matches gets.
    #[serde(default)]
    pub no_match: NoMatch,
    /// The routes filed by host and path, made at the first request.
    #[serde(skip)]
    index: OnceCell<RouteIndex>,
}

/// Up to this many routes, a request tries them all in order; past it, only those the
/// [`RouteIndex`] files under its host and path (the index costs a few hash lookups, which
/// a short list does not repay).
const SCAN_UP_TO: usize = 8;

/// What routes match on, read from the host at most once per request (each read is a host
/// call, and a request may be tried against many routes).
struct Request<'c, 'a> {
    cx: &'c Ctx<'a>,
    authority: OnceCell<String>,
    path: OnceCell<String>,
    method: OnceCell<String>,
}

impl<'c, 'a> Request<'c, 'a> {
    fn new(cx: &'c Ctx<'a>) -> Self {
        Self {
            cx,
            authority: OnceCell::new(),
            path: OnceCell::new(),
            method: OnceCell::new(),
        }
    }

    fn authority(&self) -> &str {
        self.authority.get_or_init(|| self.cx.authority())
    }

    /// The path with its query.
    fn path(&self) -> &str {
        self.path.get_or_init(|| self.cx.path())
    }

    fn method(&self) -> &str {
        self.method.get_or_init(|| self.cx.method())
    }
}

/// What happens to a request no route matches.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NoMatch {
    /// `404 no route`.
    #[default]
    Respond,
    /// It goes on as if there were no router: to the listener's default cluster, or to the
    /// cluster its authority names.
    Continue,
}

/// One route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Name: set as the stream property `weft.route` for later filters (retry policies,
    /// telemetry labels), and used in logs.
    #[serde(default)]
    pub name: String,
    /// What the request must look like (everything matches when absent).
    #[serde(default, rename = "match")]
    pub matcher: Match,
    /// The single cluster to send to.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Clusters to split across by weight.
    #[serde(default)]
    pub split: Vec<Backend>,
    /// Rewrites before the request goes upstream.
    #[serde(default)]
    pub rewrite: Option<Rewrite>,
    /// Bounds the whole request (all attempts).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Answer directly instead.
    #[serde(default)]
    pub direct_response: Option<DirectResponse>,
    /// Redirect instead.
    #[serde(default)]
    pub redirect: Option<Redirect>,
    /// Bounds each attempt.
    #[serde(default)]
    pub try_timeout_ms: Option<u64>,
    /// Header edits of the request, before it goes upstream.
    #[serde(default)]
    pub request_headers: Option<HeaderEdits>,
    /// Header edits of the response, before it goes downstream.
    #[serde(default)]
    pub response_headers: Option<HeaderEdits>,
    /// Clusters that get a copy of the request (its head, and its body when the request
    /// has none to stream), their answers ignored.
    #[serde(default)]
    pub mirror: Vec<Mirror>,
    /// Requests sent so far (drives the split).
    #[serde(skip)]
    pub sent: Cell<u64>,
    /// Requests considered for mirroring so far (drives the mirror percentage).
    #[serde(skip)]
    pub mirrored: Cell<u64>,
}

/// Header edits, in this order: set (replace), add (append), remove.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderEdits {
    /// Headers set, replacing any of the same name.
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    /// Headers added beside any of the same name.
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    /// Header names removed.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A header and its value.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValue {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A mirror target.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// The cluster that gets the copy.
    pub cluster: String,
    /// Percentage of requests mirrored (100 when absent).
    #[serde(default)]
    pub percent: Option<f64>,
}

/// A cluster of a split.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// Cluster name.
    pub cluster: String,
    /// Relative weight.
    pub weight: u32,
}

/// Route conditions; all given ones must hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// The authority, exactly (port included if the client sent one), case-insensitive.
    #[serde(default)]
    pub host: Option<String>,
    /// The authority names this mesh service, as the proxy's routing by authority reads it:
    /// `echo`, `echo:80`, `echo.<ns>`, `echo.<ns>.svc`, `echo.<ns>.svc.cluster.local`.
    #[serde(default)]
    pub service: Option<String>,
    /// With `service`: the namespace a qualified authority must name (`echo.<namespace>…`;
    /// a bare `echo` matches too).
    #[serde(default)]
    pub namespace: Option<String>,
    /// With `service`: the port the authority must name (a request without a port matches
    /// port 80).
    #[serde(default)]
    pub port: Option<u16>,
    /// Query parameter conditions.
    #[serde(default)]
    pub query: Vec<QueryMatch>,
    /// The path (query excluded).
    #[serde(default)]
    pub path: Option<PathMatch>,
    /// The method.
    #[serde(default)]
    pub method: Option<String>,
    /// Header conditions.
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
}

/// A query parameter condition (the first parameter of that name counts).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryMatch {
    /// Parameter name (exact, case-sensitive).
    pub name: String,
    /// Value equal to this.
    #[serde(default)]
    pub exact: Option<String>,
    /// Value matching this (whole value).
    #[serde(default)]
    pub regex: Option<Pattern>,
}

/// How a path matches.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PathMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Starts with these whole path segments (`/foo` matches `/foo` and `/foo/bar`, not
    /// `/foobar`; a trailing `/` is ignored): Gateway API's `PathPrefix`.
    Segments(String),
    /// Matches the whole path.
    Regex(Pattern),
}

/// A header condition.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name.
    pub name: String,
    /// Value equal to this.
    #[serde(default)]
    pub exact: Option<String>,
    /// Value starting with this.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Value matching this (whole value).
    #[serde(default)]
    pub regex: Option<Pattern>,
    /// Present (`true`) or absent (`false`).
    #[serde(default)]
    pub present: Option<bool>,
}

/// A regex compiled when the configuration is loaded, anchored to the whole input, with
/// ASCII character classes.
#[derive(Debug)]
pub struct Pattern(regex::Regex);

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        // ASCII classes (`\d`, `\w`): paths and header values are ASCII on the wire.
        regex::RegexBuilder::new(&format!("^(?:{s})$"))
            .unicode(false)
            .build()
            .map(Pattern)
            .map_err(|e| serde::de::Error::custom(format!("invalid regex `{s}`: {e}")))
    }
}

/// Rewrites.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Replaces the matched path prefix (prefix and segments routes only).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Replaces the whole path (the query is kept).
    #[serde(default)]
    pub path: Option<String>,
    /// Replaces the authority.
    #[serde(default)]
    pub host: Option<String>,
}

/// A fixed answer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    /// Status.
    pub status: u16,
    /// Body.
    #[serde(default)]
    pub body: String,
}

/// A redirect: a fixed `location`, or one made from the request with the parts given
/// replaced (none: the request's own URL).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// The `location`, as is.
    #[serde(default)]
    pub location: Option<String>,
    /// The scheme (`http` or `https`; the request's otherwise).
    #[serde(default)]
    pub scheme: Option<String>,
    /// The host (the request's otherwise).
    #[serde(default)]
    pub host: Option<String>,
    /// The port (left out when it is the scheme's default; the request's otherwise).
    #[serde(default)]
    pub port: Option<u16>,
    /// The whole path.
    #[serde(default)]
    pub path: Option<String>,
    /// Replaces the matched prefix (prefix and segments routes).
    #[serde(default)]
    pub prefix: Option<String>,
    /// 301, 302, 303, 307 or 308.
    #[serde(default = "default_redirect")]
    pub status: u16,
}

fn default_redirect() -> u16 {
    302
}

impl Config {
    fn check(&self) -> Result<(), String> {
        for (i, r) in self.routes.iter().enumerate() {
            let targets = usize::from(r.cluster.is_some())
                + usize::from(!r.split.is_empty())
                + usize::from(r.direct_response.is_some())
                + usize::from(r.redirect.is_some());
            if targets != 1 {
                return Err(format!(
                    "routes[{i}]: exactly one of cluster, split, direct_response, redirect"
                ));
            }
            if !r.split.is_empty() && r.split.iter().all(|b| b.weight == 0) {
                return Err(format!("routes[{i}].split: all weights are 0"));
            }
            let prefix_route = matches!(
                r.matcher.path,
                Some(PathMatch::Prefix(_) | PathMatch::Segments(_))
            );
            if let Some(rw) = &r.rewrite {
                if rw.prefix.is_some() && rw.path.is_some() {
                    return Err(format!("routes[{i}].rewrite: prefix or path, not both"));
                }
                if rw.prefix.is_some() && !prefix_route {
                    return Err(format!(
                        "routes[{i}].rewrite.prefix: needs a prefix path match"
                    ));
                }
            }
            if let Some(rd) = &r.redirect {
                let parts = rd.scheme.is_some()
                    || rd.host.is_some()
                    || rd.port.is_some()
                    || rd.path.is_some()
                    || rd.prefix.is_some();
                if rd.location.is_some() && parts {
                    return Err(format!(
                        "routes[{i}].redirect: a location, or parts (scheme, host, port, path, prefix)"
                    ));
                }
                if rd.path.is_some() && rd.prefix.is_some() {
                    return Err(format!("routes[{i}].redirect: path or prefix, not both"));
                }
                if rd.prefix.is_some() && !prefix_route {
                    return Err(format!(
                        "routes[{i}].redirect.prefix: needs a prefix path match"
                    ));
                }
                if let Some(s) = &rd.scheme
                    && s != "http"
                    && s != "https"
                {
                    return Err(format!("routes[{i}].redirect.scheme: http or https"));
                }
                if ![301, 302, 303, 307, 308].contains(&rd.status) {
                    return Err(format!(
                        "routes[{i}].redirect.status: 301, 302, 303, 307 or 308"
                    ));
                }
            }
            if r.matcher.port.is_some() && r.matcher.service.is_none() {
                return Err(format!("routes[{i}].match.port: needs match.service"));
            }
            for m in &r.mirror {
                if m.percent.is_some_and(|p| !(0.0..=100.0).contains(&p)) {
                    return Err(format!("routes[{i}].mirror: percent between 0 and 100"));
                }
            }
        }
        Ok(())
    }
}

impl Route {
    fn matches(&self, req: &Request<'_, '_>) -> Option<usize> {
        let m = &self.matcher;
        if let Some(host) = &m.host
            && !req.authority().eq_ignore_ascii_case(host)
        {
            return None;
        }
        if let Some(service) = &m.service
            && !names_service(req.authority(), service, m.namespace.as_deref(), m.port)
        {
            return None;
        }
        if let Some(method) = &m.method
            && req.method() != method
        {
            return None;
        }
        for h in &m.headers {
            let value = req.cx.request_header(&h.name);
            let ok = match (&value, h) {
                (
                    v,
                    HeaderMatch {
                        present: Some(p), ..
                    },
                ) if v.is_some() != *p => false,
                (
                    None,
                    HeaderMatch {
                        present: Some(false),
                        ..
                    },
                ) => true,
                (None, _) => false,
                (Some(v), _) => {
                    h.exact.as_ref().is_none_or(|e| v == e)
                        && h.prefix.as_ref().is_none_or(|p| v.starts_with(p.as_str()))
                        && h.regex.as_ref().is_none_or(|r| r.0.is_match(v))
                }
            };
            if !ok {
                return None;
            }
        }
        let full = req.path();
        let (path, query) = full.split_once('?').unwrap_or((full, ""));
        for q in &m.query {
            let value = query
                .split('&')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == q.name).then_some(v)
                })
                .next();
            let v = value?;
            if !(q.exact.as_ref().is_none_or(|e| v == e)
                && q.regex.as_ref().is_none_or(|r| r.0.is_match(v)))
            {
                return None;
            }
        }
        match &m.path {
            None => Some(0),
            Some(PathMatch::Exact(p)) => (path == p).then_some(p.len()),
            Some(PathMatch::Prefix(p)) => path.starts_with(p.as_str()).then_some(p.len()),
            Some(PathMatch::Segments(p)) => {
                let p = p.trim_end_matches('/');
                let rest = path.strip_prefix(p)?;
                (rest.is_empty() || rest.starts_with('/')).then_some(p.len())
            }
            Some(PathMatch::Regex(r)) => r.0.is_match(path).then_some(0),
        }
    }

    /// The cluster for the next request: the split is a Weyl sequence over the weights,
    /// so any window of requests follows them closely and interleaves the clusters.
    fn pick(&self) -> Option<&str> {
        if let Some(c) = &self.cluster {
            return Some(c);
        }
        let total: u64 = self.split.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let n = self.sent.get();
        self.sent.set(n.wrapping_add(1));
        let x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut at = ((u128::from(x) * u128::from(total)) >> 64) as u64;
        for b in &self.split {
            if at < u64::from(b.weight) {
                return Some(&b.cluster);
            }
            at -= u64::from(b.weight);
        }
        self.split.last().map(|b| b.cluster.as_str())
    }
}

/// Whether `authority` names mesh service `service` (in `namespace`, when given) on `port`
/// (when given; no port is 80).
pub fn names_service(
    authority: &str,
    service: &str,
    namespace: Option<&str>,
    port: Option<u16>,
) -> bool {
    let (host, p) = match authority.rsplit_once(':') {
        Some((h, p))
            if !h.ends_with(']') && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) =>
        {
            (h, p.parse::<u16>().ok())
        }
        _ => (authority, None),
    };
    if let Some(want) = port
        && p.unwrap_or(80) != want
    {
        return false;
    }
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let service = service.to_ascii_lowercase();
    if host == service {
        return true;
    }
    let Some(rest) = host
        .strip_prefix(&service)
        .and_then(|r| r.strip_prefix('.'))
    else {
        return false;
    };
    let ns = rest
        .strip_suffix(".svc.cluster.local")
        .or_else(|| rest.strip_suffix(".svc"))
        .unwrap_or(rest);
    !ns.is_empty() && !ns.contains('.') && namespace.is_none_or(|n| n.eq_ignore_ascii_case(ns))
}

/// The router's per-stream state.
pub struct Router {
    config: Rc<Config>,
    /// The route the request took (its response header edits apply).
    route: Option<usize>,
    /// Mirrors waiting for the request body: their clusters, the request's headers, and
    /// the body copied so far (the request itself is not held).
    mirrors: Option<PendingMirror>,
}

/// Mirror copies sent once the request body has been seen whole.
struct PendingMirror {
    clusters: Vec<String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// The largest request body copied to mirrors; a larger request is not mirrored (logged).
pub const MIRROR_BODY_MAX: usize = 1 << 20;

/// The most request body bytes all streams of one filter instance hold for mirrors at
/// once; past it a request is not mirrored (logged), so that mirrors never take the memory
/// real traffic needs.
pub const MIRROR_HELD_MAX: usize = 8 << 20;

thread_local! {
    /// Body bytes held for mirrors by this instance's streams now.
    static MIRROR_HELD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl Drop for PendingMirror {
    fn drop(&mut self) {
        MIRROR_HELD.with(|h| h.set(h.get().saturating_sub(self.body.len())));
    }
}

impl PendingMirror {
    /// Copies `piece`; why not, when it would hold too much.
    fn keep(&mut self, piece: &[u8]) -> Result<(), String> {
        if self.body.len() + piece.len() > MIRROR_BODY_MAX {
            return Err(format!("its body is over {MIRROR_BODY_MAX} bytes"));
        }
        let held = MIRROR_HELD.with(|h| h.get());
        if held + piece.len() > MIRROR_HELD_MAX {
            return Err(format!(
                "{held} bytes are held for mirrors already (at most {MIRROR_HELD_MAX})"
            ));
        }
        MIRROR_HELD.with(|h| h.set(held + piece.len()));
        self.body.extend_from_slice(piece);
        Ok(())
    }
}

/// Applies `edits` through `set` (name, `Some(value)` or `None` to remove) and `add`.
fn edit_headers(
    edits: &HeaderEdits,
    mut set: impl FnMut(&str, Option<&str>),
    mut add: impl FnMut(&str, &str),
) {
    for h in &edits.set {
        set(&h.name, Some(&h.value));
    }
    for h in &edits.add {
        add(&h.name, &h.value);
    }
    for name in &edits.remove {
        set(name, None);
    }
}

impl Filter for Router {
    type Config = Config;

    fn validate(config: &Config) -> Result<(), String> {
        config.check()
    }

    fn new(config: &Rc<Config>) -> Self {
        Router {
            config: config.clone(),
            route: None,
            mirrors: None,
        }
    }

    fn on_request_body(&mut self, cx: &mut Ctx<'_>, _body_size: usize, end: bool) -> Action {
        let Some(pending) = &mut self.mirrors else {
            return Action::Continue;
        };
        // Each piece is forwarded as it comes: what is buffered now is this piece.
        let piece = cx.request_body();
        if let Err(why) = pending.keep(&piece) {
            cx.log(
                LogLevel::Warn,
                &format!(
                    "request not mirrored to {}: {why}",
                    pending.clusters.join(", ")
                ),
            );
            self.mirrors = None;
            return Action::Continue;
        }
        if end && let Some(pending) = self.mirrors.take() {
            send_mirrors(cx, &pending.clusters, &pending.headers, &pending.body);
        }
        Action::Continue
    }

    fn on_request_trailers(&mut self, cx: &mut Ctx<'_>) -> Action {
        // A body that ends with trailers never ends in `on_request_body`.
        if let Some(pending) = self.mirrors.take() {
            send_mirrors(cx, &pending.clusters, &pending.headers, &pending.body);
        }
        Action::Continue
    }

    fn on_response_headers(&mut self, cx: &mut Ctx<'_>, _end_of_stream: bool) -> Action {
        let config = self.config.clone();
        if let Some(edits) = self
            .route
            .and_then(|i| config.routes.get(i))
            .and_then(|r| r.response_headers.as_ref())
        {
            let cx = std::cell::RefCell::new(cx);
            edit_headers(
                edits,
                |n, v| cx.borrow_mut().set_response_header(n, v),
                |n, v| cx.borrow_mut().add_response_header(n, v),
            );
        }
        Action::Continue
    }

    fn on_request_headers(&mut self, cx: &mut Ctx<'_>, end_of_stream: bool) -> Action {
        let config = self.config.clone();
        let found = {
            let req = Request::new(cx);
            let try_route = |i: usize| {
                let r = config.routes.get(i)?;
                r.matches(&req).map(|n| (i, r, n))
            };
            if config.routes.len() <= SCAN_UP_TO {
                (0..config.routes.len()).find_map(try_route)
            } else {
                let path = req.path();
                let path = path.split_once('?').map_or(path, |(p, _)| p);
                let mut candidates = Vec::new();
                config
                    .index
                    .get_or_init(|| RouteIndex::new(&config.routes))
                    .candidates(|| req.authority(), path, &mut candidates);
                candidates.iter().find_map(|&i| try_route(i as usize))
            }
        };
        let Some((index, route, matched)) = found else {
            if config.no_match == NoMatch::Continue {
                // No route: nothing to edit in the response.
                let _ = cx.done_with_stream();
                return Action::Continue;
            }
            cx.send_response(404, &[("content-type", "text/plain")], b"no route\n");
            return Action::Pause;
        };
        self.route = Some(index);
        if !route.name.is_empty() {
            cx.set_property(&["weft", "route"], &route.name);
        }
        if let Some(d) = &route.direct_response {
            cx.send_response(
                d.status,
                &[("content-type", "text/plain")],
                d.body.as_bytes(),
            );
            return Action::Pause;
        }
        if let Some(r) = &route.redirect {
            let location = redirect_location(r, cx, matched);
            // The route's response header edits apply to the redirect too.
            let mut headers: Vec<(&str, &str)> = vec![("location", &location)];
            // (Edits of `location` do not touch the redirect's own.)
            if let Some(edits) = &route.response_headers {
                for h in edits
                    .set
                    .iter()
                    .filter(|h| !h.name.eq_ignore_ascii_case("location"))
                {
                    headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&h.name));
                    headers.push((&h.name, &h.value));
                }
                for h in edits
                    .add
                    .iter()
                    .filter(|h| !h.name.eq_ignore_ascii_case("location"))
                {
                    headers.push((&h.name, &h.value));
                }
                headers.retain(|(n, _)| {
                    n.eq_ignore_ascii_case("location")
                        || !edits.remove.iter().any(|r| r.eq_ignore_ascii_case(n))
                });
            }
            cx.send_response(r.status, &headers, b"");
            return Action::Pause;
        }
        let Some(cluster) = route.pick() else {
            cx.send_response(503, &[], b"no cluster\n");
            return Action::Pause;
        };
        if let Err(e) = cx.set_cluster(cluster) {
            cx.log(
                LogLevel::Error,
                &format!("route `{}`: cluster `{cluster}`: {e}", route.name),
            );
            cx.send_response(503, &[("content-type", "text/plain")], b"unknown cluster\n");
            return Action::Pause;
        }
        if let Some(ms) = route.timeout_ms {
            let _ = cx.set_timeout(Duration::from_millis(ms));
        }
        if let Some(ms) = route.try_timeout_ms {
            let _ = cx.set_try_timeout(Duration::from_millis(ms));
        }
        if !route.mirror.is_empty() {
            let clusters = mirror_targets(route);
            if !clusters.is_empty() {
                let headers = cx.request_headers();
                if end_of_stream {
                    send_mirrors(cx, &clusters, &headers, b"");
                } else {
                    self.mirrors = Some(PendingMirror {
                        clusters,
                        headers,
                        body: Vec::new(),
                    });
                }
            }
        }
        if let Some(rw) = &route.rewrite {
            if let Some(prefix) = &rw.prefix {
                let new = replace_prefix(&cx.path(), matched, prefix);
                cx.set_request_header(":path", Some(&new));
            }
            if let Some(path) = &rw.path {
                let full = cx.path();
                let new = match full.split_once('?') {
                    Some((_, query)) => format!("{path}?{query}"),
                    None => path.clone(),
                };
                cx.set_request_header(":path", Some(&new));
            }
            if let Some(host) = &rw.host {
                cx.set_request_header(":authority", Some(host));
            }
        }
        if let Some(edits) = &route.request_headers {
            let cx = std::cell::RefCell::new(&mut *cx);
            edit_headers(
                edits,
                |n, v| cx.borrow_mut().set_request_header(n, v),
                |n, v| cx.borrow_mut().add_request_header(n, v),
            );
        }
        // No response edits and no body to mirror: the later phases have nothing to do.
        if route.response_headers.is_none() && self.mirrors.is_none() {
            let _ = cx.done_with_stream();
        }
        Action::Continue
    }
}

/// `path` (query kept) with its first `matched` bytes replaced by `prefix`.
fn replace_prefix(path: &str, matched: usize, prefix: &str) -> String {
    let rest = path.get(matched..).unwrap_or("");
    let mut new = prefix.to_owned();
    if new.ends_with('/') && rest.starts_with('/') {
        new.pop();
    }
    new.push_str(rest);
    if new.is_empty() || !new.starts_with('/') {
        new.insert(0, '/');
    }
    new
}

/// Where a redirect sends the client.
fn redirect_location(r: &Redirect, cx: &Ctx<'_>, matched: usize) -> String {
    if let Some(location) = &r.location {
        return location.clone();
    }
    let authority = cx.authority();
    let (req_host, req_port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') && p.bytes().all(|b| b.is_ascii_digit()) => {
            (h.to_owned(), p.parse::<u16>().ok())
        }
        _ => (authority.clone(), None),
    };
    let request_scheme = cx
        .request_header(":scheme")
        .unwrap_or_else(|| "http".to_owned());
    let scheme = r.scheme.clone().unwrap_or(request_scheme);
    let host = r.host.clone().unwrap_or(req_host);
    // A new scheme without a port goes to that scheme's default port.
    let port = r.port.or(if r.scheme.is_some() { None } else { req_port });
    let default_port = if scheme == "https" { 443 } else { 80 };
    let full = cx.path();
    let path = match (&r.path, &r.prefix) {
        (Some(p), _) => p.clone(),
        (None, Some(prefix)) => {
            let (path, _) = full.split_once('?').unwrap_or((&full, ""));
            replace_prefix(path, matched, prefix)
        }
        (None, None) => full
            .split_once('?')
            .map_or(full.as_str(), |(p, _)| p)
            .to_owned(),
    };
    let query = full
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    match port {
        Some(p) if p != default_port => format!("{scheme}://{host}:{p}{path}{query}"),
        _ => format!("{scheme}://{host}{path}{query}"),
    }
}

/// The route's mirror clusters this request goes to (each by its percentage).
fn mirror_targets(route: &Route) -> Vec<String> {
    let mut clusters = Vec::new();
    for m in &route.mirror {
        if let Some(p) = m.percent {
            let n = route.mirrored.get();
            route.mirrored.set(n.wrapping_add(1));
            let x = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
            if x * 100.0 >= p {
                continue;
            }
        }
        clusters.push(m.cluster.clone());
    }
    clusters
}

/// Sends a copy of the request (`headers` as it came, `body` whole) to each of `clusters`,
/// fire and forget.
fn send_mirrors(cx: &mut Ctx<'_>, clusters: &[String], headers: &[(String, String)], body: &[u8]) {
    let length = body.len().to_string();
    let mut h: Vec<(&str, &str)> = headers
        .iter()
        .filter(|(n, _)| {
            !n.eq_ignore_ascii_case("content-length")
                && !n.eq_ignore_ascii_case("transfer-encoding")
        })
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    h.push(("content-length", &length));
    let body = (!body.is_empty()).then_some(body);
    for cluster in clusters {
        if let Err(e) = cx.dispatch_call(cluster, &h, body, Duration::from_secs(5)) {
            cx.log(LogLevel::Warn, &format!("mirror to `{cluster}`: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_sdk::Host;
    use weft_sdk::testing::Harness;

    fn harness(config: &str) -> Harness<Router> {
        Harness::<Router>::new(config)
            .unwrap()
            .with_clusters(&["a", "b", "c"])
    }

    /// Routes `method path` with `headers`; the cluster chosen, or the local status.
    fn route(
        h: &mut Harness<Router>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> String {
        let mut s = h.stream();
        s.request(method, path, headers);
        match s.request_headers(true) {
            Action::Continue => s.routing().cluster.clone().unwrap_or_default(),
            Action::Pause => format!("{}", s.local_response().map_or(0, |r| r.status)),
        }
    }

    #[test]
    fn a_route_without_response_work_is_done_after_the_request_head() {
        let mut h = harness(
            r#"{"routes": [
                {"match": {"path": {"prefix": "/edit"}}, "cluster": "a",
                 "response_headers": {"set": [{"name": "x-edited", "value": "1"}]}},
                {"match": {"path": {"prefix": "/mirror"}}, "cluster": "a", "mirror": [{"cluster": "b"}]},
                {"match": {"path": {"prefix": "/"}}, "cluster": "b"}
            ]}"#,
        );
        let done = |h: &mut Harness<Router>, path: &str, end_of_stream: bool| {
            let mut s = h.stream();
            s.request("POST", path, &[]);
            assert_eq!(s.request_headers(end_of_stream), Action::Continue);
            s.routing().done
        };
        assert!(done(&mut h, "/plain", true));
        // Its response edits are still to be made.
        assert!(!done(&mut h, "/edit", true));
        // A body still to come for its mirror; none to come: mirrored already, done.
        assert!(!done(&mut h, "/mirror", false));
        assert!(done(&mut h, "/mirror", true));
    }

    #[test]
    fn each_matcher_selects_its_route() {
        let mut h = harness(
            r#"{"routes": [
                {"match": {"path": {"exact": "/exact"}}, "cluster": "a"},
                {"match": {"path": {"regex": "/v[0-9]+/items"}}, "cluster": "b"},
                {"match": {"host": "admin.svc"}, "cluster": "c"},
                {"match": {"method": "DELETE"}, "direct_response": {"status": 405, "body": "no"}},
                {"match": {"headers": [{"name": "x-canary", "exact": "1"}]}, "cluster": "b"},
                {"match": {"headers": [{"name": "x-debug", "present": true}]}, "cluster": "c"},
                {"match": {"path": {"prefix": "/api"}}, "cluster": "a"}
            ]}"#,
        );
        assert_eq!(route(&mut h, "GET", "/exact", &[]), "a");
        assert_eq!(route(&mut h, "GET", "/exact/no", &[]), "404");
        assert_eq!(
            route(&mut h, "GET", "/v2/items?x=1", &[]),
            "b",
            "query ignored"
        );
        assert_eq!(
            route(&mut h, "GET", "/v2/items/9", &[]),
            "404",
            "regex is anchored"
        );
        assert_eq!(
            route(&mut h, "GET", "/other", &[("host", "ADMIN.svc")]),
            "c"
        );
        assert_eq!(route(&mut h, "DELETE", "/api/x", &[]), "405");
        assert_eq!(route(&mut h, "GET", "/x", &[("x-canary", "1")]), "b");
        assert_eq!(route(&mut h, "GET", "/x", &[("x-canary", "2")]), "404");
        assert_eq!(route(&mut h, "GET", "/x", &[("x-debug", "")]), "c");
        assert_eq!(route(&mut h, "GET", "/api/users", &[]), "a");
    }

    #[test]
    fn the_first_route_in_order_wins_whatever_the_index_files_it_under() {
        // Routes filed under every kind of key, interleaved (more than `SCAN_UP_TO`, so
        // that the index picks the candidates): the order of the list decides.
        const { assert!(SCAN_UP_TO < 10) };
        let mut h = harness(
            r#"{"routes": [
                {"match": {"path": {"prefix": "/api/v1"}, "method": "POST"}, "cluster": "a"},
                {"match": {"host": "Shop.example:8080", "path": {"prefix": "/api"}}, "cluster": "b"},
                {"match": {"service": "echo", "path": {"segments": "/api/"}}, "cluster": "c"},
                {"match": {"path": {"exact": "/api/v1/x"}}, "cluster": "a"},
                {"match": {"path": {"regex": "/api/[a-z0-9/]*"}}, "cluster": "b"},
                {"match": {"host": "shop.example:8080"}, "cluster": "c"},
                {"match": {"service": "echo.other"}, "cluster": "a"},
                {"match": {"path": {"segments": "/"}}, "cluster": "b"},
                {"match": {"path": {"exact": "/never"}}, "cluster": "c"},
                {"match": {"host": "never.example"}, "cluster": "c"}
            ]}"#,
        );
        let shop = [("host", "shop.EXAMPLE:8080")];
        assert_eq!(route(&mut h, "POST", "/api/v1/x", &shop), "a");
        assert_eq!(route(&mut h, "GET", "/api/v1/x", &shop), "b");
        assert_eq!(route(&mut h, "GET", "/other", &shop), "c");
        let echo = [("host", "echo.default.svc.cluster.local:80")];
        assert_eq!(route(&mut h, "GET", "/api/v1/x", &echo), "c");
        assert_eq!(route(&mut h, "GET", "/apiary", &echo), "b", "not a segment");
        let plain = [("host", "other")];
        assert_eq!(route(&mut h, "GET", "/api/v1/x", &plain), "a");
        assert_eq!(route(&mut h, "GET", "/api/v1/y?q", &plain), "b");
        assert_eq!(
            route(&mut h, "GET", "/z", &[("host", "echo.other.svc")]),
            "a",
            "a service name with a dot is tried for every host"
        );
        assert_eq!(route(&mut h, "GET", "/z", &plain), "b");
    }

    #[test]
    fn ten_thousand_routes_route_to_the_one_that_matches() {
        let routes: Vec<String> = (0..10_000)
            .map(|i| {
                let cluster = ["a", "b", "c"][i % 3];
                match i % 4 {
                    0 => format!(r#"{{"match": {{"path": {{"prefix": "/p{i}/"}}}}, "cluster": "{cluster}"}}"#),
                    1 => format!(r#"{{"match": {{"path": {{"exact": "/e{i}"}}}}, "cluster": "{cluster}"}}"#),
                    2 => format!(r#"{{"match": {{"host": "h{i}.example"}}, "cluster": "{cluster}"}}"#),
                    _ => format!(r#"{{"match": {{"service": "s{i}", "path": {{"segments": "/s"}}}}, "cluster": "{cluster}"}}"#),
                }
            })
            .collect();
        let mut h = harness(&format!(r#"{{"routes": [{}]}}"#, routes.join(",")));
        assert_eq!(route(&mut h, "GET", "/p9996/x", &[]), "a");
        assert_eq!(route(&mut h, "GET", "/e9997", &[]), "b");
        assert_eq!(route(&mut h, "GET", "/e9997/", &[]), "404");
        assert_eq!(route(&mut h, "GET", "/", &[("host", "h9998.example")]), "c");
        assert_eq!(
            route(&mut h, "GET", "/s/1", &[("host", "s9999.ns:80")]),
            "a"
        );
        assert_eq!(
            route(&mut h, "GET", "/t", &[("host", "s9999.ns:80")]),
            "404"
        );
        assert_eq!(route(&mut h, "GET", "/p9997/x", &[]), "404");
    }

    #[test]
    fn a_weighted_split_follows_its_weights() {
        let mut h = harness(
            r#"{"routes": [{"split": [{"cluster": "a", "weight": 90}, {"cluster": "b", "weight": 10}]}]}"#,
        );
        let picks: Vec<String> = (0..10_000)
            .map(|_| route(&mut h, "GET", "/", &[]))
            .collect();
        let b = picks.iter().filter(|c| *c == "b").count();
        assert!((800..=1200).contains(&b), "10% ± 2%: {b}");
        // Any window of 100 requests is close to the weights too (interleaved, not bursts).
        for w in picks.chunks(100) {
            let b = w.iter().filter(|c| *c == "b").count();
            assert!((5..=15).contains(&b), "window: {b}");
        }
    }

    #[test]
    fn rewrites_timeouts_and_redirects() {
        let mut h = harness(
            r#"{"routes": [
                {"match": {"path": {"prefix": "/old/"}}, "redirect": {"location": "/new/", "status": 301}},
                {"name": "api", "match": {"path": {"prefix": "/api/"}}, "cluster": "a",
                 "rewrite": {"prefix": "/", "host": "backend"}, "timeout_ms": 250}
            ]}"#,
        );
        let mut s = h.stream();
        s.request("GET", "/api/users?id=1", &[("host", "front")]);
        assert_eq!(s.request_headers(true), Action::Continue);
        assert_eq!(s.host.property(&["weft", "route"]), Some(b"api".to_vec()));
        assert_eq!(s.request_header(":path").as_deref(), Some("/users?id=1"));
        assert_eq!(s.request_header(":authority").as_deref(), Some("backend"));
        assert_eq!(s.routing().timeout, Some(Duration::from_millis(250)));

        let mut s = h.stream();
        s.request("GET", "/old/page", &[]);
        assert_eq!(s.request_headers(true), Action::Pause);
        let r = s.local_response().unwrap();
        assert_eq!(r.status, 301);
        assert_eq!(r.headers, vec![("location".to_owned(), "/new/".to_owned())]);
    }

    #[test]
    fn bad_configurations_are_refused_with_the_reason() {
        let err = |c: &str| Harness::<Router>::new(c).err().unwrap_or_default();
        assert!(
            err(r#"{"routes": [{"match": {"path": {"regex": "(unclosed"}}, "cluster": "a"}]}"#)
                .contains("invalid regex `(unclosed`")
        );
        assert!(
            err(r#"{"routes": [{"cluster": "a", "redirect": {"location": "/"}}]}"#)
                .contains("exactly one of")
        );
        assert!(
            err(r#"{"routes": [{"split": [{"cluster": "a", "weight": 0}]}]}"#)
                .contains("all weights are 0")
        );
        assert!(err(r#"{"routes": [{"clustr": "a"}]}"#).contains("unknown field `clustr`"));
    }

    #[test]
    fn services_queries_and_segment_prefixes_match_as_the_gateway_api_reads_them() {
        let mut h = harness(
            r#"{"routes": [
                {"match": {"service": "echo", "port": 8080, "path": {"segments": "/v2/"}}, "cluster": "b"},
                {"match": {"service": "echo", "namespace": "prod", "query": [{"name": "canary", "exact": "1"}]}, "cluster": "c"},
                {"match": {"service": "echo", "query": [{"name": "id", "regex": "[0-9]+"}]}, "cluster": "b"},
                {"match": {"service": "echo"}, "cluster": "a"}
            ], "no_match": "continue"}"#,
        );
        let host = |h: &'static str| [("host", h)];
        for (authority, path, want) in [
            ("echo", "/x", "a"),
            ("echo:80", "/x", "a"),
            ("echo.prod.svc.cluster.local", "/x", "a"),
            ("ECHO.default", "/x", "a"),
            ("echo:8080", "/v2", "b"),
            ("echo:8080", "/v2/items", "b"),
            ("echo:8080", "/v2items", "a"),
            ("echo", "/v2/items", "a"),
            ("echo.prod", "/x?canary=1", "c"),
            ("echo", "/x?a=b&canary=1", "c"),
            ("echo.staging", "/x?canary=1", "a"),
            ("echo", "/x?id=42", "b"),
            ("echo", "/x?id=4x2", "a"),
            ("echo", "/x?ID=42", "a"),
            ("echox", "/x", ""),
            ("echo.a.b", "/x", ""),
            ("other", "/x", ""),
        ] {
            assert_eq!(
                route(&mut h, "GET", path, &host(authority)),
                want,
                "{authority}{path}"
            );
        }
        // No match goes on with no cluster chosen (the proxy routes by authority).
        let mut s = h.stream();
        s.request("GET", "/", &[("host", "other")]);
        assert_eq!(s.request_headers(true), Action::Continue);
        assert_eq!(s.routing().cluster, None);
    }

    #[test]
    fn mirrors_carry_the_whole_body_without_holding_the_request() {
        let mut h = harness(
            r#"{"routes": [{"match": {"path": {"prefix": "/"}}, "cluster": "a",
                            "mirror": [{"cluster": "b"}, {"cluster": "c"}]}]}"#,
        );
        let mut s = h.stream();
        s.request("POST", "/upload", &[("content-length", "6")]);
        assert_eq!(s.request_headers(false), Action::Continue);
        assert!(s.calls().is_empty(), "sent only once the body is whole");
        assert_eq!(s.request_body(b"abc", false), Action::Continue);
        assert!(s.calls().is_empty());
        assert_eq!(s.request_body(b"def", true), Action::Continue);
        assert_eq!(
            s.forwarded_request_body(),
            b"abcdef",
            "the request flows on"
        );
        let calls = s.calls();
        assert_eq!(calls.len(), 2);
        for (call, cluster) in calls.iter().zip(["b", "c"]) {
            assert_eq!(call.cluster, cluster);
            assert_eq!(call.body.as_deref(), Some(&b"abcdef"[..]));
            let length = call.headers.iter().find(|(n, _)| n == "content-length");
            assert_eq!(length.map(|(_, v)| v.as_str()), Some("6"));
        }

        // A body that ends with trailers: mirrored when they come.
        let mut s = h.stream();
        s.request("POST", "/upload", &[]);
        assert_eq!(s.request_headers(false), Action::Continue);
        assert_eq!(s.request_body(b"grpc", false), Action::Continue);
        assert!(s.calls().is_empty());
        assert_eq!(s.request_trailers(&[("x-sum", "1")]), Action::Continue);
        assert_eq!(s.calls().len(), 2);
        assert_eq!(s.calls()[0].body.as_deref(), Some(&b"grpc"[..]));

        // Over the cap: the request goes on, unmirrored.
        let mut s = h.stream();
        s.request("POST", "/upload", &[]);
        assert_eq!(s.request_headers(false), Action::Continue);
        let big = vec![b'x'; MIRROR_BODY_MAX];
        assert_eq!(s.request_body(&big, false), Action::Continue);
        assert_eq!(s.request_body(b"y", true), Action::Continue);
        assert!(s.calls().is_empty());
        assert_eq!(s.forwarded_request_body().len(), MIRROR_BODY_MAX + 1);
    }

    #[test]
    fn header_edits_full_path_rewrites_try_timeouts_and_mirrors() {
        let mut h = harness(
            r#"{"routes": [
                {"name": "r", "match": {"path": {"segments": "/api"}}, "cluster": "a",
                 "rewrite": {"path": "/v1/all"}, "try_timeout_ms": 100,
                 "request_headers": {"set": [{"name": "x-env", "value": "prod"}],
                                     "add": [{"name": "x-tag", "value": "2"}],
                                     "remove": ["x-secret"]},
                 "response_headers": {"set": [{"name": "server", "value": "weft"}],
                                      "remove": ["x-internal"]},
                 "mirror": [{"cluster": "b"}]}
            ]}"#,
        );
        let mut s = h.stream();
        s.request(
            "GET",
            "/api/users?id=1",
            &[("x-env", "dev"), ("x-tag", "1"), ("x-secret", "s")],
        );
        assert_eq!(s.request_headers(true), Action::Continue);
        assert_eq!(s.request_header(":path").as_deref(), Some("/v1/all?id=1"));
        assert_eq!(s.request_header("x-env").as_deref(), Some("prod"));
        assert_eq!(s.request_header("x-secret"), None);
        assert_eq!(s.routing().try_timeout, Some(Duration::from_millis(100)));
        assert_eq!(s.calls().len(), 1, "one mirror call");
        assert_eq!(s.calls()[0].cluster, "b");
        s.response(200, &[("server", "upstream"), ("x-internal", "1")]);
        assert_eq!(s.response_headers(true), Action::Continue);
        assert_eq!(s.response_header("server").as_deref(), Some("weft"));
        assert_eq!(s.response_header("x-internal"), None);
    }

    #[test]
    fn redirects_are_made_from_the_request_with_parts_replaced() {
        let mut h = harness(
            r#"{"routes": [
                {"match": {"path": {"segments": "/old"}}, "redirect": {"prefix": "/new", "status": 301}},
                {"match": {"path": {"exact": "/s"}}, "redirect": {"scheme": "https"}},
                {"match": {"path": {"exact": "/h"}}, "redirect": {"host": "example.com", "port": 8443, "path": "/p"}}
            ]}"#,
        );
        let location = |h: &mut Harness<Router>, path: &str| {
            let mut s = h.stream();
            s.request("GET", path, &[("host", "echo:8080")]);
            assert_eq!(s.request_headers(true), Action::Pause);
            let r = s.local_response().unwrap().clone();
            (r.status, r.headers[0].1.clone())
        };
        assert_eq!(
            location(&mut h, "/old/page?q=1"),
            (301, "http://echo:8080/new/page?q=1".to_owned())
        );
        assert_eq!(location(&mut h, "/s"), (302, "https://echo/s".to_owned()));
        assert_eq!(
            location(&mut h, "/h"),
            (302, "http://example.com:8443/p".to_owned())
        );
        // The route's response header edits apply to its redirect.
        let mut h = harness(
            r#"{"routes": [{"redirect": {"scheme": "https"},
                            "response_headers": {"set": [{"name": "cache-control", "value": "no-store"}],
                                                 "add": [{"name": "x-moved", "value": "1"}]}}]}"#,
        );
        let mut s = h.stream();
        s.request("GET", "/a", &[("host", "echo")]);
        assert_eq!(s.request_headers(true), Action::Pause);
        let r = s.local_response().unwrap();
        let headers: Vec<(&str, &str)> = r
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            headers,
            [
                ("location", "https://echo/a"),
                ("cache-control", "no-store"),
                ("x-moved", "1")
            ]
        );
        let err = |c: &str| Harness::<Router>::new(c).err().unwrap_or_default();
        assert!(
            err(r#"{"routes": [{"redirect": {"location": "/", "scheme": "https"}}]}"#)
                .contains("a location, or parts")
        );
        assert!(
            err(r#"{"routes": [{"redirect": {"prefix": "/x"}}]}"#)
                .contains("needs a prefix path match")
        );
        assert!(
            err(r#"{"routes": [{"match": {"port": 80}, "cluster": "a"}]}"#)
                .contains("needs match.service")
        );
    }

    #[test]
    fn an_unknown_cluster_is_a_503_not_a_misroute() {
        let mut h = harness(r#"{"routes": [{"cluster": "zzz"}]}"#);
        assert_eq!(route(&mut h, "GET", "/", &[]), "503");
        assert!(h.logs().iter().any(|(_, l)| l.contains("cluster `zzz`")));
    }
}
