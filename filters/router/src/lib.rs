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

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use serde::Deserialize;
use weft_sdk::{Action, Ctx, Filter, LogLevel};

weft_sdk::export_filter!(Router);

/// The filter's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Routes, tried in order.
    pub routes: Vec<Route>,
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
    /// Requests sent so far (drives the split).
    #[serde(skip)]
    pub sent: Cell<u64>,
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

/// How a path matches.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PathMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
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
    /// Replaces the matched path prefix (prefix routes only).
    #[serde(default)]
    pub prefix: Option<String>,
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

/// A redirect.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// The `location`.
    pub location: String,
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
        }
        Ok(())
    }
}

impl Route {
    fn matches(&self, cx: &Ctx<'_>) -> Option<usize> {
        let m = &self.matcher;
        if let Some(host) = &m.host
            && !cx.authority().eq_ignore_ascii_case(host)
        {
            return None;
        }
        if let Some(method) = &m.method
            && cx.method() != *method
        {
            return None;
        }
        for h in &m.headers {
            let value = cx.request_header(&h.name);
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
        let full = cx.path();
        let path = full.split('?').next().unwrap_or("");
        match &m.path {
            None => Some(0),
            Some(PathMatch::Exact(p)) => (path == p).then_some(p.len()),
            Some(PathMatch::Prefix(p)) => path.starts_with(p.as_str()).then_some(p.len()),
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

/// The router's per-stream state.
pub struct Router {
    config: Rc<Config>,
}

impl Filter for Router {
    type Config = Config;

    fn validate(config: &Config) -> Result<(), String> {
        config.check()
    }

    fn new(config: &Rc<Config>) -> Self {
        Router {
            config: config.clone(),
        }
    }

    fn on_request_headers(&mut self, cx: &mut Ctx<'_>, _end_of_stream: bool) -> Action {
        let config = self.config.clone();
        let Some((route, matched)) = config
            .routes
            .iter()
            .find_map(|r| r.matches(cx).map(|n| (r, n)))
        else {
            cx.send_response(404, &[("content-type", "text/plain")], b"no route\n");
            return Action::Pause;
        };
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
            cx.send_response(r.status, &[("location", &r.location)], b"");
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
        if let Some(rw) = &route.rewrite {
            if let (Some(prefix), Some(PathMatch::Prefix(_))) = (&rw.prefix, &route.matcher.path) {
                let path = cx.path();
                let rest = path.get(matched..).unwrap_or("");
                let mut new = prefix.clone();
                if new.ends_with('/') && rest.starts_with('/') {
                    new.pop();
                }
                new.push_str(rest);
                if new.is_empty() || !new.starts_with('/') {
                    new.insert(0, '/');
                }
                cx.set_request_header(":path", Some(&new));
            }
            if let Some(host) = &rw.host {
                cx.set_request_header(":authority", Some(host));
            }
        }
        Action::Continue
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
    fn an_unknown_cluster_is_a_503_not_a_misroute() {
        let mut h = harness(r#"{"routes": [{"cluster": "zzz"}]}"#);
        assert_eq!(route(&mut h, "GET", "/", &[]), "503");
        assert!(h.logs().iter().any(|(_, l)| l.contains("cluster `zzz`")));
    }
}
