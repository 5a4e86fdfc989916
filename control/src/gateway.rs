//! Gateway API routes for the mesh (GAMMA): `HTTPRoute` and `GRPCRoute` of
//! `gateway.networking.k8s.io/v1` whose `parentRefs` name Services, read exactly as
//! Kubernetes users write them, and translated into the router and retry filters' config.
//!
//! Every field is read into a typed struct that refuses unknown fields, so a field Weft does
//! not support is an error that names it, never silently ignored. [`check`] validates a
//! route when it is applied; [`MeshRoutes`] turns the routes into:
//! - the router's config (`mesh-routes`): one router route per rule, match and parent
//!   Service, matching requests whose authority names the Service (`echo`, `echo:80`,
//!   `echo.<ns>`, `echo.<ns>.svc.cluster.local`), ordered by the Gateway API's precedence;
//!   a request no route matches goes on (`no_match: continue`), to the cluster its
//!   authority names;
//! - the retry filter's config (`mesh-retries`): a policy per router route from the rule's
//!   `retry` (GEP-1731).
//!
//! Chains use them with `config_ref: mesh-routes` (router) and `config_ref: mesh-retries`
//! (retry); [`status`] gives a route's `Accepted` and `ResolvedRefs` conditions.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The FilterConfig name chains give the router to run the mesh's routes.
pub const MESH_ROUTES: &str = "mesh-routes";
/// The FilterConfig name chains give the retry filter to run the routes' retry policies.
pub const MESH_RETRIES: &str = "mesh-retries";

/// An `HTTPRoute` or a `GRPCRoute`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    /// `HTTPRoute`.
    Http,
    /// `GRPCRoute`.
    Grpc,
}

/// A route's `spec`, either kind.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RouteSpec {
    parent_refs: Vec<ParentRef>,
    #[serde(default)]
    hostnames: Vec<String>,
    #[serde(default)]
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ParentRef {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    section_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Rule {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    matches: Vec<Value>,
    #[serde(default)]
    filters: Vec<Filter>,
    #[serde(default)]
    backend_refs: Vec<BackendRef>,
    #[serde(default)]
    timeouts: Option<Timeouts>,
    #[serde(default)]
    retry: Option<Retry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpMatch {
    #[serde(default)]
    path: Option<PathMatch>,
    #[serde(default)]
    headers: Vec<ValueMatch>,
    #[serde(default)]
    query_params: Vec<ValueMatch>,
    #[serde(default)]
    method: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GrpcMatch {
    #[serde(default)]
    method: Option<GrpcMethod>,
    #[serde(default)]
    headers: Vec<ValueMatch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GrpcMethod {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    method: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PathMatch {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ValueMatch {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Filter {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    request_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    response_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    request_redirect: Option<Redirect>,
    #[serde(default)]
    url_rewrite: Option<UrlRewrite>,
    #[serde(default)]
    request_mirror: Option<Mirror>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HeaderModifier {
    #[serde(default)]
    set: Vec<NameValue>,
    #[serde(default)]
    add: Vec<NameValue>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NameValue {
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Redirect {
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    path: Option<PathModifier>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    status_code: Option<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct UrlRewrite {
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    path: Option<PathModifier>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PathModifier {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    replace_full_path: Option<String>,
    #[serde(default)]
    replace_prefix_match: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Mirror {
    backend_ref: BackendRef,
    #[serde(default)]
    percent: Option<u32>,
    #[serde(default)]
    fraction: Option<Fraction>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Fraction {
    numerator: u32,
    #[serde(default)]
    denominator: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BackendRef {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    /// The Service port: accepted; the cluster's endpoints carry their ports.
    #[serde(default, rename = "port")]
    _port: Option<u16>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    filters: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Timeouts {
    #[serde(default)]
    request: Option<String>,
    #[serde(default)]
    backend_request: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Retry {
    #[serde(default)]
    codes: Vec<u16>,
    #[serde(default)]
    attempts: Option<u32>,
    #[serde(default)]
    backoff: Option<String>,
}

/// A Gateway API duration (GEP-2257: `1h`, `30s`, `500ms`, `1m30s`) in milliseconds.
pub fn duration_ms(text: &str) -> Result<u64, String> {
    let bad = || format!("`{text}` is not a duration (like `10s`, `500ms`, `1m30s`)");
    let mut total = 0u64;
    let mut rest = text;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += n * unit;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok(total)
}

/// Reads a route's `spec` (as JSON) of `kind`, refusing what Weft does not support.
fn read(kind: RouteKind, spec: &Value) -> Result<RouteSpec, String> {
    let spec: RouteSpec = serde_json::from_value(spec.clone()).map_err(|e| format!("spec: {e}"))?;
    if spec.parent_refs.is_empty() {
        return Err("spec.parentRefs: a mesh route names at least one Service".into());
    }
    for (i, p) in spec.parent_refs.iter().enumerate() {
        let at = format!("spec.parentRefs[{i}]");
        if p.group.as_deref().is_some_and(|g| !g.is_empty())
            || p.kind.as_deref().unwrap_or("Gateway") != "Service"
        {
            return Err(format!(
                "{at}: only Services (`group: \"\"`, `kind: Service`) are supported as parents: Weft is a mesh and has no Gateways"
            ));
        }
        if p.section_name.is_some() {
            return Err(format!(
                "{at}.sectionName: not supported for Service parents"
            ));
        }
    }
    if !spec.hostnames.is_empty() {
        return Err(
            "spec.hostnames: not supported for mesh routes (the parent Service names the destination)"
                .into(),
        );
    }
    if spec.rules.len() > 64 {
        return Err("spec.rules: at most 64".into());
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        for (j, m) in rule.matches.iter().enumerate() {
            let at = format!("{at}.matches[{j}]");
            match kind {
                RouteKind::Http => {
                    let m: HttpMatch =
                        serde_json::from_value(m.clone()).map_err(|e| format!("{at}: {e}"))?;
                    router_match(&m, "", None, None).map_err(|e| format!("{at}.{e}"))?;
                }
                RouteKind::Grpc => {
                    let m: GrpcMatch =
                        serde_json::from_value(m.clone()).map_err(|e| format!("{at}: {e}"))?;
                    grpc_match(&m, "", None, None).map_err(|e| format!("{at}.{e}"))?;
                }
            }
        }
        for (j, f) in rule.filters.iter().enumerate() {
            check_filter(kind, f).map_err(|e| format!("{at}.filters[{j}]: {e}"))?;
        }
        for (j, b) in rule.backend_refs.iter().enumerate() {
            check_backend(b).map_err(|e| format!("{at}.backendRefs[{j}]: {e}"))?;
        }
        if let Some(t) = &rule.timeouts {
            if kind == RouteKind::Grpc {
                return Err(format!("{at}.timeouts: not part of GRPCRoute"));
            }
            let request = t.request.as_deref().map(duration_ms).transpose();
            let backend = t.backend_request.as_deref().map(duration_ms).transpose();
            let (request, backend) = (
                request.map_err(|e| format!("{at}.timeouts.request: {e}"))?,
                backend.map_err(|e| format!("{at}.timeouts.backendRequest: {e}"))?,
            );
            if let (Some(r), Some(b)) = (request, backend)
                && r > 0
                && b > r
            {
                return Err(format!(
                    "{at}.timeouts: backendRequest must not be longer than request"
                ));
            }
        }
        if let Some(r) = &rule.retry {
            if kind == RouteKind::Grpc {
                return Err(format!("{at}.retry: not part of GRPCRoute"));
            }
            if r.attempts.is_some_and(|a| a > 9) {
                return Err(format!("{at}.retry.attempts: at most 9"));
            }
            if let Some(c) = r.codes.iter().find(|c| !(400..=599).contains(*c)) {
                return Err(format!("{at}.retry.codes: {c} is not a 4xx or 5xx status"));
            }
            if let Some(b) = &r.backoff {
                duration_ms(b).map_err(|e| format!("{at}.retry.backoff: {e}"))?;
            }
        }
        let redirect = rule.filters.iter().any(|f| f.kind == "RequestRedirect");
        let rewrite = rule.filters.iter().any(|f| f.kind == "URLRewrite");
        if redirect && rewrite {
            return Err(format!(
                "{at}.filters: RequestRedirect and URLRewrite cannot be used together"
            ));
        }
        if redirect && !rule.backend_refs.is_empty() {
            return Err(format!(
                "{at}: a rule with RequestRedirect answers itself: it has no backendRefs"
            ));
        }
    }
    Ok(spec)
}

fn check_filter(kind: RouteKind, f: &Filter) -> Result<(), String> {
    let set = [
        ("RequestHeaderModifier", f.request_header_modifier.is_some()),
        (
            "ResponseHeaderModifier",
            f.response_header_modifier.is_some(),
        ),
        ("RequestRedirect", f.request_redirect.is_some()),
        ("URLRewrite", f.url_rewrite.is_some()),
        ("RequestMirror", f.request_mirror.is_some()),
    ];
    let known = set.iter().any(|(name, _)| *name == f.kind);
    if !known {
        return Err(format!(
            "filter type `{}` is not supported (RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror are)",
            f.kind
        ));
    }
    if kind == RouteKind::Grpc && matches!(f.kind.as_str(), "RequestRedirect" | "URLRewrite") {
        return Err(format!("`{}` is not a GRPCRoute filter", f.kind));
    }
    for (name, present) in set {
        if present != (name == f.kind) {
            return Err(format!(
                "type `{}` takes exactly its own field (`{}`)",
                f.kind,
                field_of(&f.kind)
            ));
        }
    }
    if let Some(r) = &f.request_redirect {
        if let Some(s) = &r.scheme
            && s != "http"
            && s != "https"
        {
            return Err(format!("requestRedirect.scheme: `{s}`: http or https"));
        }
        if let Some(c) = r.status_code
            && c != 301
            && c != 302
        {
            return Err(format!("requestRedirect.statusCode: {c}: 301 or 302"));
        }
        if let Some(p) = &r.path {
            check_path_modifier(p).map_err(|e| format!("requestRedirect.path: {e}"))?;
        }
    }
    if let Some(r) = &f.url_rewrite
        && let Some(p) = &r.path
    {
        check_path_modifier(p).map_err(|e| format!("urlRewrite.path: {e}"))?;
    }
    if let Some(m) = &f.request_mirror {
        check_backend(&m.backend_ref).map_err(|e| format!("requestMirror.backendRef: {e}"))?;
        if m.percent.is_some() && m.fraction.is_some() {
            return Err("requestMirror: percent or fraction, not both".into());
        }
        if m.percent.is_some_and(|p| p > 100) {
            return Err("requestMirror.percent: 0 to 100".into());
        }
        if let Some(f) = &m.fraction
            && (f.denominator == Some(0) || f.numerator > f.denominator.unwrap_or(100))
        {
            return Err("requestMirror.fraction: numerator ≤ denominator, denominator > 0".into());
        }
    }
    Ok(())
}

fn field_of(kind: &str) -> &'static str {
    match kind {
        "RequestHeaderModifier" => "requestHeaderModifier",
        "ResponseHeaderModifier" => "responseHeaderModifier",
        "RequestRedirect" => "requestRedirect",
        "URLRewrite" => "urlRewrite",
        _ => "requestMirror",
    }
}

fn check_path_modifier(p: &PathModifier) -> Result<(), String> {
    match (
        p.kind.as_str(),
        &p.replace_full_path,
        &p.replace_prefix_match,
    ) {
        ("ReplaceFullPath", Some(_), None) | ("ReplacePrefixMatch", None, Some(_)) => Ok(()),
        ("ReplaceFullPath" | "ReplacePrefixMatch", _, _) => {
            Err(format!("type `{}` takes exactly its own field", p.kind))
        }
        (other, _, _) => Err(format!(
            "type `{other}`: ReplaceFullPath or ReplacePrefixMatch"
        )),
    }
}

fn check_backend(b: &BackendRef) -> Result<(), String> {
    if b.group.as_deref().is_some_and(|g| !g.is_empty())
        || b.kind.as_deref().is_some_and(|k| k != "Service")
    {
        return Err("only Services (`group: \"\"`, `kind: Service`) are supported".into());
    }
    if !b.filters.is_empty() {
        return Err("filters on a backendRef are not supported".into());
    }
    if b.namespace.is_some() {
        return Err(
            "namespace: cross-namespace backends are not supported (the mesh's services are named without one)"
                .into(),
        );
    }
    if b.weight.is_some_and(|w| w > 1_000_000) {
        return Err("weight: at most 1000000".into());
    }
    Ok(())
}

/// A regex as the router compiles it (anchored, ASCII classes).
fn check_regex(r: &str) -> Result<(), String> {
    regex::RegexBuilder::new(&format!("^(?:{r})$"))
        .unicode(false)
        .build()
        .map(drop)
        .map_err(|e| format!("invalid regular expression `{r}`: {e}"))
}

fn value_match(kind: &Option<String>, value: &str, field: &str) -> Result<Value, String> {
    match kind.as_deref().unwrap_or("Exact") {
        "Exact" => Ok(json!({ "exact": value })),
        "RegularExpression" => {
            check_regex(value)?;
            Ok(json!({ "regex": value }))
        }
        other => Err(format!(
            "{field}.type: `{other}`: Exact or RegularExpression"
        )),
    }
}

/// The router match of requests to a parent Service (`service` in `namespace`, on `port`).
fn parent_match(service: &str, namespace: Option<&str>, port: Option<u16>) -> Value {
    let mut out = json!({ "service": service });
    if let Some(ns) = namespace {
        out["namespace"] = ns.into();
    }
    if let Some(p) = port {
        out["port"] = p.into();
    }
    out
}

/// The router's header conditions of a route's header matches.
fn header_matches(headers: &[ValueMatch]) -> Result<Value, String> {
    let mut out = Vec::new();
    for (i, h) in headers.iter().enumerate() {
        let mut v = value_match(&h.kind, &h.value, &format!("headers[{i}]"))?;
        v["name"] = h.name.to_ascii_lowercase().into();
        out.push(v);
    }
    Ok(out.into())
}

/// The router match of an HTTPRoute match for requests to `service`.
fn router_match(
    m: &HttpMatch,
    service: &str,
    namespace: Option<&str>,
    port: Option<u16>,
) -> Result<Value, String> {
    let mut out = parent_match(service, namespace, port);
    let (kind, value) = match &m.path {
        None => ("PathPrefix", "/".to_owned()),
        Some(p) => (
            p.kind.as_deref().unwrap_or("PathPrefix"),
            p.value.clone().unwrap_or_else(|| "/".into()),
        ),
    };
    if !value.starts_with('/') && kind != "RegularExpression" {
        return Err(format!("path.value: `{value}` must start with `/`"));
    }
    out["path"] = match kind {
        "Exact" => json!({ "exact": value }),
        "PathPrefix" => json!({ "segments": value }),
        "RegularExpression" => {
            check_regex(&value).map_err(|e| format!("path.value: {e}"))?;
            json!({ "regex": value })
        }
        other => {
            return Err(format!(
                "path.type: `{other}`: Exact, PathPrefix or RegularExpression"
            ));
        }
    };
    out["headers"] = header_matches(&m.headers)?;
    let mut query = Vec::new();
    for (i, q) in m.query_params.iter().enumerate() {
        let mut v = value_match(&q.kind, &q.value, &format!("queryParams[{i}]"))?;
        v["name"] = q.name.clone().into();
        query.push(v);
    }
    out["query"] = query.into();
    if let Some(method) = &m.method {
        const METHODS: [&str; 9] = [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ];
        if !METHODS.contains(&method.as_str()) {
            return Err(format!("method: `{method}` is not an HTTP method"));
        }
        out["method"] = method.clone().into();
    }
    Ok(out)
}

/// The router match of a GRPCRoute match: its method as the request path.
fn grpc_match(
    m: &GrpcMatch,
    service: &str,
    namespace: Option<&str>,
    port: Option<u16>,
) -> Result<Value, String> {
    let mut out = parent_match(service, namespace, port);
    out["method"] = "POST".into();
    if let Some(method) = &m.method {
        let (svc, name) = (method.service.as_deref(), method.method.as_deref());
        if svc.is_none() && name.is_none() {
            return Err("method: needs a service or a method".into());
        }
        out["path"] = match method.kind.as_deref().unwrap_or("Exact") {
            "Exact" => match (svc, name) {
                (Some(s), Some(n)) => json!({ "exact": format!("/{s}/{n}") }),
                (Some(s), None) => json!({ "segments": format!("/{s}") }),
                (None, Some(n)) => json!({ "regex": format!("/[^/]+/{}", regex::escape(n)) }),
                (None, None) => unreachable!("checked above"),
            },
            "RegularExpression" => {
                let s = svc.unwrap_or("[^/]+");
                let n = name.unwrap_or("[^/]+");
                check_regex(s).map_err(|e| format!("method.service: {e}"))?;
                check_regex(n).map_err(|e| format!("method.method: {e}"))?;
                json!({ "regex": format!("/(?:{s})/(?:{n})") })
            }
            other => {
                return Err(format!(
                    "method.type: `{other}`: Exact or RegularExpression"
                ));
            }
        };
    }
    out["headers"] = header_matches(&m.headers)?;
    Ok(out)
}

/// Checks a route's spec (as JSON) when it is applied.
pub fn check(kind: RouteKind, spec: &Value) -> Result<(), String> {
    read(kind, spec).map(drop)
}

/// One route as stored: kind, name, namespace and spec.
#[derive(Clone, Debug)]
pub struct StoredRoute {
    /// HTTPRoute or GRPCRoute.
    pub kind: RouteKind,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace` (`default` when it had none).
    pub namespace: String,
    /// `spec`.
    pub spec: Value,
    /// The config version that last changed it (ties in precedence go to the older).
    pub version: u64,
}

/// A condition of a route's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Condition {
    /// `Accepted` or `ResolvedRefs`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True` or `False`.
    pub status: String,
    /// Why.
    pub reason: String,
    /// What is wrong, when it is.
    pub message: String,
}

/// A route's `Accepted` and `ResolvedRefs` conditions, given the mesh's services.
pub fn status(route: &StoredRoute, services: &BTreeSet<String>) -> Vec<Condition> {
    let cond = |kind: &str, ok: bool, reason: &str, message: String| Condition {
        kind: kind.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
    };
    let spec = match read(route.kind, &route.spec) {
        Ok(s) => s,
        Err(e) => {
            return vec![
                cond("Accepted", false, "UnsupportedValue", e),
                cond("ResolvedRefs", false, "UnsupportedValue", String::new()),
            ];
        }
    };
    let missing_parents: Vec<&str> = spec
        .parent_refs
        .iter()
        .map(|p| p.name.as_str())
        .filter(|p| !services.contains(*p))
        .collect();
    let accepted = if missing_parents.is_empty() {
        cond("Accepted", true, "Accepted", String::new())
    } else {
        cond(
            "Accepted",
            false,
            "NoMatchingParent",
            format!("no service named {}", missing_parents.join(", ")),
        )
    };
    let mut missing: Vec<&str> = spec
        .rules
        .iter()
        .flat_map(|r| {
            r.backend_refs.iter().chain(
                r.filters
                    .iter()
                    .filter_map(|f| f.request_mirror.as_ref().map(|m| &m.backend_ref)),
            )
        })
        .map(|b| b.name.as_str())
        .filter(|b| !services.contains(*b))
        .collect();
    missing.dedup();
    let resolved = if missing.is_empty() {
        cond("ResolvedRefs", true, "ResolvedRefs", String::new())
    } else {
        cond(
            "ResolvedRefs",
            false,
            "BackendNotFound",
            format!("no service named {}", missing.join(", ")),
        )
    };
    vec![accepted, resolved]
}

/// One router route made from a rule, with what orders it.
struct Made {
    route: Value,
    retry: Option<(String, Value)>,
    /// Gateway API precedence: exact path, longer prefix, method, more headers, more query
    /// params; then the older route, then by name.
    rank: (u8, usize, u8, usize, usize),
    order: (u64, String, usize, usize),
}

/// The router and retry configs of `routes` (valid ones; an invalid one is left out) for
/// a proxy with the clusters `clusters`: routes apply to parents the proxy has, and a
/// backend the proxy does not have answers 500, as the Gateway API asks.
pub struct MeshRoutes {
    /// The router's config.
    pub router: Value,
    /// The retry filter's config.
    pub retry: Value,
}

impl MeshRoutes {
    /// Translates `routes`.
    pub fn new(routes: &[StoredRoute], clusters: &BTreeSet<String>) -> Self {
        let mut made: Vec<Made> = Vec::new();
        for r in routes {
            let Ok(spec) = read(r.kind, &r.spec) else {
                continue;
            };
            for (pi, parent) in spec.parent_refs.iter().enumerate() {
                // A parent this proxy does not have (unknown to the mesh, or outside the
                // proxy's Scope) is not reachable through its routes either.
                if !clusters.contains(&parent.name) {
                    continue;
                }
                let namespace = parent.namespace.as_deref().unwrap_or(&r.namespace);
                for (ri, rule) in spec.rules.iter().enumerate() {
                    let base = format!(
                        "{}/{}/{}/{}",
                        match r.kind {
                            RouteKind::Http => "httproute",
                            RouteKind::Grpc => "grpcroute",
                        },
                        r.namespace,
                        r.name,
                        rule.name.clone().unwrap_or_else(|| ri.to_string())
                    );
                    let matches: Vec<Value> = if rule.matches.is_empty() {
                        vec![json!({})]
                    } else {
                        rule.matches.clone()
                    };
                    for (mi, m) in matches.iter().enumerate() {
                        let name = if spec.parent_refs.len() > 1 {
                            format!("{base}/{pi}")
                        } else {
                            base.clone()
                        };
                        let (matcher, rank) = match r.kind {
                            RouteKind::Http => {
                                let Ok(m) = serde_json::from_value::<HttpMatch>(m.clone()) else {
                                    continue;
                                };
                                let Ok(v) =
                                    router_match(&m, &parent.name, Some(namespace), parent.port)
                                else {
                                    continue;
                                };
                                let path = m.path.as_ref();
                                let kind =
                                    path.and_then(|p| p.kind.as_deref()).unwrap_or("PathPrefix");
                                let len =
                                    path.and_then(|p| p.value.as_ref()).map_or(1, String::len);
                                let rank = (
                                    u8::from(kind == "Exact"),
                                    if kind == "PathPrefix" { len } else { 0 },
                                    u8::from(m.method.is_some()),
                                    m.headers.len(),
                                    m.query_params.len(),
                                );
                                (v, rank)
                            }
                            RouteKind::Grpc => {
                                let Ok(m) = serde_json::from_value::<GrpcMatch>(m.clone()) else {
                                    continue;
                                };
                                let Ok(v) =
                                    grpc_match(&m, &parent.name, Some(namespace), parent.port)
                                else {
                                    continue;
                                };
                                let exact = m.method.as_ref().is_some_and(|x| {
                                    x.kind.as_deref().unwrap_or("Exact") == "Exact"
                                        && x.service.is_some()
                                        && x.method.is_some()
                                });
                                let rank = (
                                    u8::from(exact),
                                    usize::from(m.method.is_some()),
                                    0,
                                    m.headers.len(),
                                    0,
                                );
                                (v, rank)
                            }
                        };
                        let mut route = rule_target(rule, clusters);
                        route["name"] = name.clone().into();
                        route["match"] = matcher;
                        let retry = rule
                            .retry
                            .as_ref()
                            .map(|rt| (name.clone(), retry_policy(rt)));
                        made.push(Made {
                            route,
                            retry,
                            rank,
                            order: (r.version, r.name.clone(), ri, mi),
                        });
                    }
                }
            }
        }
        made.sort_by(|a, b| b.rank.cmp(&a.rank).then_with(|| a.order.cmp(&b.order)));
        let mut retries = serde_json::Map::new();
        for m in &made {
            if let Some((name, policy)) = &m.retry {
                retries.insert(name.clone(), policy.clone());
            }
        }
        MeshRoutes {
            router: json!({
                "routes": made.into_iter().map(|m| m.route).collect::<Vec<_>>(),
                "no_match": "continue",
            }),
            retry: json!({ "routes": retries }),
        }
    }
}

/// What a rule does with a request that matched: its backends (or 500 when none is a
/// cluster the proxy has), redirect, rewrites, header edits, mirrors, timeouts.
fn rule_target(rule: &Rule, clusters: &BTreeSet<String>) -> Value {
    let mut route = json!({});
    for f in &rule.filters {
        if let Some(h) = &f.request_header_modifier {
            route["request_headers"] = header_edits(h);
        }
        if let Some(h) = &f.response_header_modifier {
            route["response_headers"] = header_edits(h);
        }
        if let Some(rw) = &f.url_rewrite {
            let mut v = json!({});
            if let Some(h) = &rw.hostname {
                v["host"] = h.clone().into();
            }
            if let Some(p) = &rw.path {
                path_modifier(&mut v, p);
            }
            route["rewrite"] = v;
        }
        if let Some(m) = &f.request_mirror {
            let percent = match (&m.percent, &m.fraction) {
                (Some(p), _) => f64::from(*p),
                (None, Some(f)) => {
                    f64::from(f.numerator) * 100.0 / f64::from(f.denominator.unwrap_or(100))
                }
                (None, None) => 100.0,
            };
            let mut mirrors = route["mirror"].as_array().cloned().unwrap_or_default();
            mirrors.push(json!({ "cluster": m.backend_ref.name, "percent": percent }));
            route["mirror"] = mirrors.into();
        }
        if let Some(rd) = &f.request_redirect {
            let mut v = json!({ "status": rd.status_code.unwrap_or(302) });
            if let Some(s) = &rd.scheme {
                v["scheme"] = s.clone().into();
            }
            if let Some(h) = &rd.hostname {
                v["host"] = h.clone().into();
            }
            if let Some(p) = rd.port {
                v["port"] = p.into();
            }
            if let Some(p) = &rd.path {
                path_modifier(&mut v, p);
            }
            route["redirect"] = v;
        }
    }
    // A redirect answers itself: only the response header edits (of any filter of the
    // rule, before or after it) go with it.
    if route.get("redirect").is_some() {
        return finish_redirect(route);
    }
    if let Some(t) = &rule.timeouts {
        if let Some(ms) = t.request.as_deref().and_then(|d| duration_ms(d).ok()) {
            // `0s`: no timeout at all.
            route["timeout_ms"] = ms.into();
        }
        if let Some(ms) = t
            .backend_request
            .as_deref()
            .and_then(|d| duration_ms(d).ok())
            && ms > 0
        {
            route["try_timeout_ms"] = ms.into();
        }
    }
    let backends: Vec<(&str, u32)> = rule
        .backend_refs
        .iter()
        .map(|b| (b.name.as_str(), b.weight.unwrap_or(1)))
        .collect();
    let total: u64 = backends.iter().map(|(_, w)| u64::from(*w)).sum();
    let resolved = backends.iter().all(|(n, _)| clusters.contains(*n));
    if backends.is_empty() || total == 0 || !resolved {
        route["direct_response"] = json!({ "status": 500, "body": "no backend for this route\n" });
        for k in [
            "request_headers",
            "rewrite",
            "mirror",
            "timeout_ms",
            "try_timeout_ms",
        ] {
            route.as_object_mut().map(|o| o.remove(k));
        }
        return route;
    }
    let live: Vec<_> = backends.iter().filter(|(_, w)| *w > 0).collect();
    if live.len() == 1 {
        route["cluster"] = live[0].0.into();
    } else {
        route["split"] = live
            .iter()
            .map(|(n, w)| json!({ "cluster": n, "weight": w }))
            .collect::<Vec<_>>()
            .into();
    }
    route
}

/// A path modifier as the router's rewrite or redirect reads it: `path` (the whole path)
/// or `prefix` (the matched prefix).
fn path_modifier(out: &mut Value, p: &PathModifier) {
    if let Some(full) = &p.replace_full_path {
        out["path"] = full.clone().into();
    }
    if let Some(prefix) = &p.replace_prefix_match {
        out["prefix"] = prefix.clone().into();
    }
}

/// A redirect route carries only what a redirect uses (plus response header edits).
fn finish_redirect(mut route: Value) -> Value {
    if let Some(o) = route.as_object_mut() {
        o.retain(|k, _| matches!(k.as_str(), "redirect" | "response_headers"));
    }
    route
}

fn header_edits(h: &HeaderModifier) -> Value {
    json!({
        "set": h.set.iter().map(|v| json!({"name": v.name.to_ascii_lowercase(), "value": v.value})).collect::<Vec<_>>(),
        "add": h.add.iter().map(|v| json!({"name": v.name.to_ascii_lowercase(), "value": v.value})).collect::<Vec<_>>(),
        "remove": h.remove.iter().map(|n| n.to_ascii_lowercase()).collect::<Vec<_>>(),
    })
}

/// The retry filter's policy for a rule's `retry` (GEP-1731): `attempts` retries (so one
/// more attempt in all), on its `codes` and on connection failures, the `backoff` as the
/// first wait (doubling up to 8 times it).
fn retry_policy(r: &Retry) -> Value {
    let retries = r.attempts.unwrap_or(1);
    let base = r
        .backoff
        .as_deref()
        .and_then(|b| duration_ms(b).ok())
        .unwrap_or(25)
        .max(1);
    json!({
        "attempts": retries + 1,
        "retry_on": ["retriable-status-codes", "connect-failure", "reset"],
        "retriable_status_codes": r.codes,
        "backoff": { "base_ms": base, "max_ms": base * 8 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(kind: RouteKind, name: &str, spec: &str, version: u64) -> StoredRoute {
        let spec: Value = serde_yaml_ng::from_str(spec).unwrap();
        check(kind, &spec).unwrap();
        StoredRoute {
            kind,
            name: name.into(),
            namespace: "default".into(),
            spec,
            version,
        }
    }

    fn refused(kind: RouteKind, spec: &str) -> String {
        let spec: Value = serde_yaml_ng::from_str(spec).unwrap();
        check(kind, &spec).unwrap_err()
    }

    #[test]
    fn rules_become_router_routes_in_gateway_api_precedence() {
        let canary = route(
            RouteKind::Http,
            "canary",
            "
parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
rules:
  - backendRefs: [{name: echo-v1, port: 80, weight: 90}, {name: echo-v2, port: 80, weight: 10}]
  - matches: [{path: {type: Exact, value: /login}, method: POST}]
    filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: X-Env, value: prod}], remove: [x-debug]}
    backendRefs: [{name: echo-v1, port: 80}]
    timeouts: {request: 2s, backendRequest: 500ms}
    retry: {codes: [503], attempts: 2, backoff: 50ms}
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
      - type: RequestRedirect
        requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}
",
            2,
        );
        let clusters: BTreeSet<String> = ["echo", "echo-v1", "echo-v2"].map(String::from).into();
        // Without the parent (unknown, or out of the proxy's scope): no route at all.
        let without_parent: BTreeSet<String> = ["echo-v1", "echo-v2"].map(String::from).into();
        let none = MeshRoutes::new(std::slice::from_ref(&canary), &without_parent);
        assert_eq!(none.router["routes"], json!([]));
        let mesh = MeshRoutes::new(&[canary], &clusters);
        let routes = mesh.router["routes"].as_array().unwrap();
        let names: Vec<&str> = routes.iter().map(|r| r["name"].as_str().unwrap()).collect();
        // Exact first, then the longer prefix, then `/`.
        assert_eq!(
            names,
            [
                "httproute/default/canary/1",
                "httproute/default/canary/2",
                "httproute/default/canary/0"
            ]
        );
        assert_eq!(routes[0]["match"]["path"], json!({"exact": "/login"}));
        assert_eq!(routes[0]["match"]["method"], "POST");
        assert_eq!(routes[0]["match"]["service"], "echo");
        assert_eq!(routes[0]["match"]["port"], 80);
        assert_eq!(routes[0]["timeout_ms"], 2000);
        assert_eq!(routes[0]["try_timeout_ms"], 500);
        assert_eq!(routes[0]["request_headers"]["set"][0]["name"], "x-env");
        assert_eq!(
            routes[1]["redirect"],
            json!({"prefix": "/new", "status": 301})
        );
        assert_eq!(
            routes[2]["split"],
            json!([{"cluster": "echo-v1", "weight": 90}, {"cluster": "echo-v2", "weight": 10}])
        );
        assert_eq!(mesh.router["no_match"], "continue");
        let policy = &mesh.retry["routes"]["httproute/default/canary/1"];
        assert_eq!(policy["attempts"], 3);
        assert_eq!(policy["retriable_status_codes"], json!([503]));
        assert_eq!(policy["backoff"]["base_ms"], 50);

        // A backend the proxy does not have: 500, as the Gateway API asks.
        let mesh = MeshRoutes::new(
            &[route(
                RouteKind::Http,
                "r",
                "{parentRefs: [{kind: Service, name: echo}], rules: [{backendRefs: [{name: gone}]}]}",
                1,
            )],
            &clusters,
        );
        assert_eq!(mesh.router["routes"][0]["direct_response"]["status"], 500);
    }

    #[test]
    fn parents_on_several_ports_and_weightless_backends() {
        let r = route(
            RouteKind::Http,
            "ports",
            "
parentRefs: [{kind: Service, name: echo, port: 80}, {kind: Service, name: echo, port: 8080}]
rules:
  - backendRefs: [{name: echo-v1, weight: 0}, {name: echo-v2, weight: 3}]
  - matches: [{path: {value: /off}}]
    backendRefs: [{name: echo-v1, weight: 0}]
",
            1,
        );
        let clusters: BTreeSet<String> = ["echo", "echo-v1", "echo-v2"].map(String::from).into();
        let mesh = MeshRoutes::new(&[r], &clusters);
        let routes = mesh.router["routes"].as_array().unwrap();
        // One route per rule and parent, each with its port.
        let ports: Vec<(&str, u64)> = routes
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap(),
                    r["match"]["port"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            ports,
            [
                ("httproute/default/ports/1/0", 80),
                ("httproute/default/ports/1/1", 8080),
                ("httproute/default/ports/0/0", 80),
                ("httproute/default/ports/0/1", 8080)
            ]
        );
        // A weight of 0 takes no traffic; all of them 0 is a 500.
        assert_eq!(routes[2]["cluster"], "echo-v2");
        assert_eq!(routes[0]["direct_response"]["status"], 500);
    }

    #[test]
    fn grpc_methods_become_paths() {
        let r = route(
            RouteKind::Grpc,
            "g",
            "
parentRefs: [{kind: Service, name: greeter}]
rules:
  - matches: [{method: {service: helloworld.Greeter, method: SayHello}}]
    backendRefs: [{name: greeter-v2}]
  - backendRefs: [{name: greeter}]
",
            1,
        );
        let clusters: BTreeSet<String> = ["greeter", "greeter-v2"].map(String::from).into();
        // (greeter is both the parent and a backend.)
        let mesh = MeshRoutes::new(&[r], &clusters);
        let routes = mesh.router["routes"].as_array().unwrap();
        assert_eq!(
            routes[0]["match"]["path"],
            json!({"exact": "/helloworld.Greeter/SayHello"})
        );
        assert_eq!(routes[0]["cluster"], "greeter-v2");
        assert_eq!(routes[1]["cluster"], "greeter");
    }

    #[test]
    fn what_weft_does_not_support_is_refused_by_name() {
        let base = "parentRefs: [{kind: Service, name: echo}]\n";
        for (spec, want) in [
            ("parentRefs: [{name: gw}]", "only Services"),
            (&format!("{base}hostnames: [a.example]"), "spec.hostnames"),
            (
                &format!(
                    "{base}rules: [{{filters: [{{type: ExtensionRef, extensionRef: {{}}}}]}}]"
                ),
                "unknown field `extensionRef`",
            ),
            (
                &format!("{base}rules: [{{filters: [{{type: CORS}}]}}]"),
                "filter type `CORS` is not supported",
            ),
            (
                &format!("{base}rules: [{{sessionPersistence: {{}}}}]"),
                "unknown field `sessionPersistence`",
            ),
            (
                &format!(
                    "{base}rules: [{{matches: [{{path: {{type: RegularExpression, value: '(x'}}}}]}}]"
                ),
                "invalid regular expression",
            ),
            (
                &format!("{base}rules: [{{timeouts: {{request: 5x}}}}]"),
                "is not a duration",
            ),
            (
                &format!("{base}rules: [{{timeouts: {{request: 1s, backendRequest: 2s}}}}]"),
                "must not be longer",
            ),
            (
                &format!("{base}rules: [{{retry: {{codes: [200]}}}}]"),
                "not a 4xx or 5xx",
            ),
            (
                &format!("{base}rules: [{{backendRefs: [{{name: x, namespace: other}}]}}]"),
                "cross-namespace",
            ),
        ] {
            let e = refused(RouteKind::Http, spec);
            assert!(e.contains(want), "{spec}: {e}");
        }
        let e = refused(
            RouteKind::Grpc,
            "{parentRefs: [{kind: Service, name: g}], rules: [{filters: [{type: URLRewrite, urlRewrite: {}}]}]}",
        );
        assert!(e.contains("not a GRPCRoute filter"), "{e}");
    }

    #[test]
    fn durations_read_as_gep_2257_writes_them() {
        assert_eq!(duration_ms("10s"), Ok(10_000));
        assert_eq!(duration_ms("500ms"), Ok(500));
        assert_eq!(duration_ms("1h2m3s4ms"), Ok(3_723_004));
        assert_eq!(duration_ms("0s"), Ok(0));
        for bad in ["", "10", "s", "1.5s", "1d", "100000s", "1h1m1s1ms1h"] {
            assert!(duration_ms(bad).is_err(), "{bad}");
        }
    }
}
