//! The authorization filter: identity-based access control in the style of Istio's
//! `AuthorizationPolicy`. Rules say who (`from`: the caller's SPIFFE principal or namespace,
//! proved by mesh mTLS), what (`to`: methods, paths, ports) and when (request headers);
//! `deny` rules win; once any `allow` rule exists, a request no `allow` rule matches is
//! denied. A denied request gets `403 RBAC: access denied` with the reason in
//! `x-weft-authz`, and never reaches the upstream. Decisions are counted.
//!
//! Configuration reference: `filters/authz/README.md`.

use std::rc::Rc;

use serde::Deserialize;
use weft_sdk::{Action, Ctx, Filter};

weft_sdk::export_filter!(Authz);

/// The filter's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The rules, in any order: `deny` rules are looked at first.
    pub rules: Vec<Rule>,
}

/// What a rule does to the requests it matches.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Let them through (and, once any `allow` rule exists, deny what none matches).
    Allow,
    /// Refuse them, whatever `allow` rules say.
    Deny,
}

/// One rule: it matches a request when its `from`, `to` and `when` all do (an empty part
/// matches everything); within a list, one entry is enough.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Names the rule (the `x-weft-authz` header of a denial, metric labels).
    pub name: String,
    /// `allow` or `deny`.
    pub action: Verdict,
    /// Who calls.
    #[serde(default)]
    pub from: Source,
    /// What is called.
    #[serde(default)]
    pub to: Operation,
    /// Conditions on request headers, all of which must hold.
    #[serde(default)]
    pub when: Vec<Condition>,
}

/// Who calls: the peer identity that mesh mTLS proved.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// SPIFFE principals (`spiffe://td/ns/x/sa/y` or Istio's `td/ns/x/sa/y`); `*` stands
    /// for any prefix or suffix (`*` alone: any authenticated caller).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Principals that do not match.
    #[serde(default)]
    pub not_principals: Vec<String>,
    /// Namespaces of the principal (`/ns/<namespace>/`).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Namespaces that do not match.
    #[serde(default)]
    pub not_namespaces: Vec<String>,
}

/// What is called.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    /// Methods (`GET`).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Methods that do not match.
    #[serde(default)]
    pub not_methods: Vec<String>,
    /// Paths, without the query: exact, `/api/*` (prefix) or `*.js` (suffix).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Paths that do not match.
    #[serde(default)]
    pub not_paths: Vec<String>,
    /// Ports the request arrived on (the listener's).
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Ports that do not match.
    #[serde(default)]
    pub not_ports: Vec<u16>,
}

/// A request header condition.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The header's name.
    pub header: String,
    /// Values it may have (`*` patterns as for paths); the header must be present.
    #[serde(default)]
    pub values: Vec<String>,
    /// Values it must not have.
    #[serde(default)]
    pub not_values: Vec<String>,
}

impl Config {
    fn check(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            if r.name.is_empty() || !names.insert(r.name.as_str()) {
                return Err(format!("rules[{i}].name: non-empty and unique"));
            }
            let patterns = r
                .from
                .principals
                .iter()
                .chain(&r.from.not_principals)
                .chain(&r.to.paths)
                .chain(&r.to.not_paths);
            for p in patterns {
                let star_inside = p.find('*').is_some_and(|i| i != 0 && i != p.len() - 1);
                if p.is_empty() || p.matches('*').count() > 1 || star_inside {
                    return Err(format!(
                        "rules[{i}] (`{}`): `{p}`: a pattern is exact, or has one `*` at its start or end",
                        r.name
                    ));
                }
            }
            for c in &r.when {
                if c.header.is_empty() || (c.values.is_empty() && c.not_values.is_empty()) {
                    return Err(format!(
                        "rules[{i}] (`{}`).when: a condition names a header and values or not_values",
                        r.name
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `pattern` (exact, `prefix*`, `*suffix` or `*`) matches `value`.
fn matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    pattern == value
}

/// Matches a list: empty `any` means anything (unless `none` rules it out).
fn list<T>(any: &[T], none: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (any.is_empty() || any.iter().any(&hit)) && !none.iter().any(hit)
}

/// What the rules look at in a request.
struct Request {
    /// The caller's principal, without `spiffe://`, if mesh mTLS proved one.
    principal: Option<String>,
    method: String,
    path: String,
    port: Option<u16>,
}

impl Request {
    fn namespace(&self) -> Option<&str> {
        let p = self.principal.as_deref()?;
        let (_, rest) = p.split_once("/ns/")?;
        Some(rest.split('/').next().unwrap_or(""))
    }
}

/// A principal without its scheme, as Istio writes them.
fn bare(principal: &str) -> &str {
    principal.strip_prefix("spiffe://").unwrap_or(principal)
}

impl Rule {
    fn matches(&self, cx: &Ctx<'_>, r: &Request) -> bool {
        let f = &self.from;
        let by_principal = |p: &String| {
            r.principal
                .as_deref()
                .is_some_and(|me| matches(bare(p), me))
        };
        let by_namespace = |n: &String| r.namespace().is_some_and(|me| matches(n, me));
        // A rule that names callers needs an authenticated one.
        let needs_peer = !f.principals.is_empty() || !f.namespaces.is_empty();
        if needs_peer && r.principal.is_none() {
            return false;
        }
        if !list(&f.principals, &f.not_principals, by_principal)
            || !list(&f.namespaces, &f.not_namespaces, by_namespace)
        {
            return false;
        }
        let t = &self.to;
        let method = |m: &String| m.eq_ignore_ascii_case(&r.method);
        let path = |p: &String| matches(p, &r.path);
        let port = |p: &u16| r.port == Some(*p);
        if !list(&t.methods, &t.not_methods, method)
            || !list(&t.paths, &t.not_paths, path)
            || !list(&t.ports, &t.not_ports, port)
        {
            return false;
        }
        self.when.iter().all(|c| {
            let value = cx.request_header(&c.header);
            let hit = |v: &String| value.as_deref().is_some_and(|have| matches(v, have));
            (c.values.is_empty() || value.is_some()) && list(&c.values, &c.not_values, hit)
        })
    }
}

/// The authorization filter's per-stream state.
pub struct Authz {
    config: Rc<Config>,
}

impl Authz {
    fn count(cx: &mut Ctx<'_>, decision: &str, rule: &str) {
        let name = format!(r#"authz_decisions{{decision="{decision}",rule="{rule}"}}"#);
        if let Some(m) = cx.counter(&name) {
            cx.increment(m, 1);
        }
    }

    fn deny(cx: &mut Ctx<'_>, reason: &str, rule: &str) -> Action {
        Self::count(cx, "deny", rule);
        cx.send_response(
            403,
            &[("x-weft-authz", reason), ("content-type", "text/plain")],
            b"RBAC: access denied\n",
        );
        Action::Pause
    }
}

impl Filter for Authz {
    type Config = Config;

    fn validate(config: &Config) -> Result<(), String> {
        config.check()
    }

    fn new(config: &Rc<Config>) -> Self {
        Authz {
            config: config.clone(),
        }
    }

    fn on_request_headers(&mut self, cx: &mut Ctx<'_>, _end_of_stream: bool) -> Action {
        let config = self.config.clone();
        let path = cx.path();
        let request = Request {
            principal: cx
                .property(&["source", "principal"])
                .map(|p| bare(&p).to_owned()),
            method: cx.method(),
            path: path.split(['?', '#']).next().unwrap_or("").to_owned(),
            port: cx
                .property_int(&["destination", "port"])
                .and_then(|p| u16::try_from(p).ok()),
        };
        let verdict = |v: Verdict| config.rules.iter().filter(move |r| r.action == v);
        if let Some(rule) = verdict(Verdict::Deny).find(|r| r.matches(cx, &request)) {
            return Self::deny(cx, &format!("denied by {}", rule.name), &rule.name);
        }
        let mut allows = verdict(Verdict::Allow).peekable();
        if allows.peek().is_none() {
            Self::count(cx, "allow", "");
            return Action::Continue;
        }
        match verdict(Verdict::Allow).find(|r| r.matches(cx, &request)) {
            Some(rule) => {
                Self::count(cx, "allow", &rule.name);
                Action::Continue
            }
            None => Self::deny(cx, "no allow rule matched", ""),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_sdk::testing::Harness;

    const A: &str = "spiffe://weft.local/ns/default/sa/a";
    const C: &str = "spiffe://weft.local/ns/other/sa/c";

    /// Status and `x-weft-authz` of a request.
    fn ask(
        h: &mut Harness<Authz>,
        principal: Option<&str>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let mut s = h.stream();
        s.request(method, path, headers)
            .property("destination.port", &15006i64.to_le_bytes());
        if let Some(p) = principal {
            s.property("source.principal", p.as_bytes());
        }
        match s.request_headers(true) {
            Action::Continue => (200, String::new()),
            Action::Pause => {
                let r = s.local_response().unwrap();
                let why = r
                    .headers
                    .iter()
                    .find(|(k, _)| k == "x-weft-authz")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                (r.status, why)
            }
        }
    }

    #[test]
    fn deny_wins_allow_rules_close_the_rest() {
        let mut h = Harness::<Authz>::new(
            r#"{"rules": [
                {"name": "a-reads", "action": "allow",
                 "from": {"principals": ["weft.local/ns/default/sa/a"]},
                 "to": {"methods": ["GET"], "paths": ["/api/*"]}},
                {"name": "other-ns", "action": "allow", "from": {"namespaces": ["other"]},
                 "to": {"ports": [15006]}},
                {"name": "no-admin", "action": "deny", "to": {"paths": ["/api/admin"]}},
                {"name": "flagged", "action": "deny",
                 "when": [{"header": "x-debug", "values": ["*"]}]}
            ]}"#,
        )
        .unwrap();
        assert_eq!(ask(&mut h, Some(A), "GET", "/api/items?x=1", &[]).0, 200);
        assert_eq!(
            ask(&mut h, Some(A), "POST", "/api/items", &[]),
            (403, "no allow rule matched".into())
        );
        assert_eq!(
            ask(&mut h, Some(A), "GET", "/api/admin", &[]),
            (403, "denied by no-admin".into())
        );
        assert_eq!(
            ask(&mut h, Some(A), "GET", "/api/items", &[("x-debug", "1")]),
            (403, "denied by flagged".into())
        );
        assert_eq!(ask(&mut h, Some(C), "DELETE", "/anything", &[]).0, 200);
        // Without a proved identity, rules naming callers do not match.
        assert_eq!(
            ask(&mut h, None, "GET", "/api/items", &[]),
            (403, "no allow rule matched".into())
        );
        assert_eq!(
            h.metric(r#"authz_decisions{decision="allow",rule="a-reads"}"#),
            Some(1)
        );
        assert_eq!(
            h.metric(r#"authz_decisions{decision="deny",rule="no-admin"}"#),
            Some(1)
        );
        assert_eq!(
            h.metric(r#"authz_decisions{decision="deny",rule=""}"#),
            Some(2)
        );
    }

    #[test]
    fn only_deny_rules_let_the_rest_through() {
        let mut h = Harness::<Authz>::new(
            r#"{"rules": [{"name": "not-c", "action": "deny",
                "from": {"principals": ["*/sa/c"]}}]}"#,
        )
        .unwrap();
        assert_eq!(ask(&mut h, Some(A), "GET", "/", &[]).0, 200);
        assert_eq!(ask(&mut h, None, "GET", "/", &[]).0, 200);
        assert_eq!(ask(&mut h, Some(C), "GET", "/", &[]).0, 403);
    }

    #[test]
    fn negations_and_header_values() {
        let mut h = Harness::<Authz>::new(
            r#"{"rules": [{"name": "r", "action": "allow",
                "from": {"principals": ["*"], "not_namespaces": ["other"]},
                "to": {"not_methods": ["DELETE"]},
                "when": [{"header": "x-tenant", "values": ["acme"], "not_values": []}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            ask(&mut h, Some(A), "GET", "/", &[("x-tenant", "acme")]).0,
            200
        );
        assert_eq!(
            ask(&mut h, Some(A), "GET", "/", &[("x-tenant", "evil")]).0,
            403
        );
        assert_eq!(ask(&mut h, Some(A), "GET", "/", &[]).0, 403);
        assert_eq!(
            ask(&mut h, Some(A), "DELETE", "/", &[("x-tenant", "acme")]).0,
            403
        );
        assert_eq!(
            ask(&mut h, Some(C), "GET", "/", &[("x-tenant", "acme")]).0,
            403
        );
        assert_eq!(
            ask(&mut h, None, "GET", "/", &[("x-tenant", "acme")]).0,
            403
        );
    }

    #[test]
    fn bad_rules_are_refused() {
        let err = |c: &str| Harness::<Authz>::new(c).err().unwrap_or_default();
        assert!(
            err(r#"{"rules": [{"name": "a", "action": "maybe"}]}"#).contains("unknown variant")
        );
        assert!(
            err(r#"{"rules": [{"name": "a", "action": "allow", "to": {"paths": ["/a*b"]}}]}"#)
                .contains("one `*` at its start or end")
        );
        assert!(
            err(
                r#"{"rules": [{"name": "a", "action": "allow"}, {"name": "a", "action": "deny"}]}"#
            )
            .contains("unique")
        );
        assert!(
            err(r#"{"rules": [{"name": "a", "action": "deny", "when": [{"header": "x"}]}]}"#)
                .contains("values or not_values")
        );
    }
}
