//! The control service's own types: what it stores and reasons about. Generated protobuf
//! types are converted to and from these at the gRPC edge ([`crate::service`]) and never go
//! further in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Labels of a proxy or an instance, and label selectors.
pub type Labels = BTreeMap<String, String>;

/// A stored WASM module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    /// `sha256:<hex>` of the bytes.
    pub digest: String,
    /// The name it was pushed under.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The proxy-wasm ABI version it exports.
    pub abi_version: String,
    /// First stored, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Its signature (`ed25519 <key-id> <hex>`), empty if none.
    #[serde(default)]
    pub signature: String,
    /// The trusted key its signature was verified with, empty if not verified.
    #[serde(default)]
    pub verified_by: String,
}

/// The kinds of config resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// A listener's filter chain.
    Chain,
    /// A cluster's endpoints.
    Cluster,
    /// A filter configuration that chains refer to.
    FilterConfig,
    /// A proxy listener.
    Listener,
    /// What the proxies it selects may call.
    Scope,
    /// A Gateway API HTTPRoute.
    HttpRoute,
    /// A Gateway API GRPCRoute.
    GrpcRoute,
}

impl Kind {
    /// Parses `Chain`, `Cluster`, `FilterConfig`, `Listener`, `Scope`, case-insensitively,
    /// singular or plural.
    pub fn parse(s: &str) -> Option<Kind> {
        match s.to_ascii_lowercase().as_str() {
            "chain" | "chains" => Some(Kind::Chain),
            "cluster" | "clusters" => Some(Kind::Cluster),
            "filterconfig" | "filterconfigs" | "filter-config" | "filter-configs" | "fc" => {
                Some(Kind::FilterConfig)
            }
            "listener" | "listeners" => Some(Kind::Listener),
            "scope" | "scopes" => Some(Kind::Scope),
            "httproute" | "httproutes" => Some(Kind::HttpRoute),
            "grpcroute" | "grpcroutes" => Some(Kind::GrpcRoute),
            _ => None,
        }
    }

    /// `Chain`, `Cluster`, `FilterConfig`, `Listener` or `Scope`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Chain => "Chain",
            Kind::Cluster => "Cluster",
            Kind::FilterConfig => "FilterConfig",
            Kind::Listener => "Listener",
            Kind::Scope => "Scope",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
        }
    }
}

/// A filter of a chain, its module resolved to a digest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FilterSpec {
    /// Name in the chain.
    pub name: String,
    /// `sha256:<hex>` of the module.
    pub module: String,
    /// Root context id; empty for the default.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub root_id: String,
    /// VM id: filters of a chain with the same one share an instance per worker.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vm_id: String,
    /// Configuration handed to `on_configure`.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub config: serde_json::Value,
    /// A `FilterConfig` resource whose configuration the filter gets instead.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub config_ref: String,
    /// What a stream gets when the filter fails.
    #[serde(default)]
    pub failure_policy: weft_config::FailurePolicy,
}

/// A listener's chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChainSpec {
    /// The proxy listener.
    pub listener: String,
    /// The default cluster; empty keeps the proxy's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub default_cluster: String,
    /// The filters, in request order.
    pub filters: Vec<FilterSpec>,
}

/// An endpoint.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Endpoint {
    /// `host:port`.
    pub address: String,
    /// Weight, at least 1.
    pub weight: u32,
    /// The SPIFFE ID it proves on a mesh TLS cluster; empty when not known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub identity: String,
}

/// The endpoints a cluster gets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSpec {
    /// Fixed endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    /// Registry service whose live instances are added.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
    /// DNS name whose addresses are added (`name:port` or an SRV name).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dns: String,
    /// The proxy cluster's settings (a proxy config file cluster's fields but `name` and
    /// `endpoints`); `None`: a proxy's bootstrap cluster of that name keeps its own, a new
    /// one gets the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<serde_json::Value>,
}

/// A proxy listener: its settings (a proxy config file listener's fields but `name` and
/// `filters`; `address` required).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListenerSpec {
    /// The settings.
    pub settings: serde_json::Value,
}

/// What the proxies a Scope selects may call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScopeSpec {
    /// Cluster (service) names; one ending in `*` is a prefix.
    pub services: Vec<String>,
}

impl ScopeSpec {
    /// Whether the scope lets a proxy call `cluster`.
    pub fn allows(&self, cluster: &str) -> bool {
        self.services.iter().any(|s| match s.strip_suffix('*') {
            Some(prefix) => cluster.starts_with(prefix),
            None => s == cluster,
        })
    }
}

/// A Gateway API route (HTTPRoute or GRPCRoute, by the resource's kind).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteSpec {
    /// `metadata.namespace`.
    pub namespace: String,
    /// The route's `spec`, as written.
    pub spec: serde_json::Value,
}

/// A filter configuration of its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FilterConfigSpec {
    /// The configuration.
    pub config: serde_json::Value,
}

/// The spec of a resource.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Spec {
    /// A chain.
    Chain(ChainSpec),
    /// A cluster.
    Cluster(ClusterSpec),
    /// A filter configuration.
    FilterConfig(FilterConfigSpec),
    /// A listener.
    Listener(ListenerSpec),
    /// A scope.
    Scope(ScopeSpec),
    /// A Gateway API route.
    Route(RouteSpec),
}

/// A named, selected resource.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    /// Its kind.
    pub kind: Kind,
    /// Its name, unique per kind.
    pub name: String,
    /// Labels a proxy must have.
    pub selector: Labels,
    /// The config version that last changed it.
    pub version: u64,
    /// What it configures.
    pub spec: Spec,
}

impl Resource {
    /// Whether it applies to a proxy with `labels`.
    pub fn selects(&self, labels: &Labels) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// The digests of the modules it refers to.
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.filters().iter().map(|f| f.module.as_str())
    }

    /// The `FilterConfig`s it refers to.
    pub fn config_refs(&self) -> impl Iterator<Item = &str> {
        self.filters()
            .iter()
            .filter(|f| !f.config_ref.is_empty())
            .map(|f| f.config_ref.as_str())
    }

    fn filters(&self) -> &[FilterSpec] {
        match &self.spec {
            Spec::Chain(c) => c.filters.as_slice(),
            Spec::Cluster(_)
            | Spec::FilterConfig(_)
            | Spec::Listener(_)
            | Spec::Scope(_)
            | Spec::Route(_) => &[],
        }
    }

    /// The YAML of what the resource says (version left out), for diffs.
    pub fn to_yaml(&self) -> String {
        #[derive(Serialize)]
        struct View<'a> {
            kind: &'static str,
            name: &'a str,
            selector: &'a Labels,
            spec: serde_json::Value,
        }
        // The spec as a manifest writes it: no enum tag.
        let spec = match &self.spec {
            Spec::Chain(c) => serde_json::to_value(c),
            Spec::Cluster(c) => serde_json::to_value(c),
            Spec::FilterConfig(c) => serde_json::to_value(c),
            Spec::Listener(c) => Ok(c.settings.clone()),
            Spec::Scope(c) => serde_json::to_value(c),
            Spec::Route(c) => serde_json::to_value(c),
        }
        .unwrap_or_default();
        serde_yaml_ng::to_string(&View {
            kind: self.kind.as_str(),
            name: &self.name,
            selector: &self.selector,
            spec,
        })
        .unwrap_or_default()
    }
}

/// A registered service instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// `<service>/<address>`.
    pub id: String,
    /// The service.
    pub service: String,
    /// Its address.
    pub address: String,
    /// Its labels.
    pub labels: Labels,
    /// Seconds without a heartbeat before it expires.
    pub ttl_seconds: u32,
    /// Balancing weight.
    pub weight: u32,
    /// Last registration or heartbeat, milliseconds since the Unix epoch.
    pub last_seen_ms: u64,
    /// Its SPIFFE ID; empty when none was given.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub identity: String,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Largest middle part (lines of old × lines of new, after the common head and tail) that
/// gets a line-by-line alignment; beyond it the middle is shown removed then added, so that
/// a huge resource costs linear memory.
const DIFF_CELLS: usize = 1 << 20;

/// A line diff of two texts: unchanged lines prefixed with two spaces, removed with `- `,
/// added with `+ ` (longest common subsequence over the part between the common head and
/// tail).
pub fn diff(old: &str, new: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let head = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let tail = a[head..]
        .iter()
        .rev()
        .zip(b[head..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (ma, mb) = (&a[head..a.len() - tail], &b[head..b.len() - tail]);
    let mut out = String::new();
    for line in &a[..head] {
        out += &format!("  {line}\n");
    }
    if ma.len().saturating_mul(mb.len()) > DIFF_CELLS {
        for line in ma {
            out += &format!("- {line}\n");
        }
        for line in mb {
            out += &format!("+ {line}\n");
        }
    } else {
        let mut lcs = vec![vec![0u32; mb.len() + 1]; ma.len() + 1];
        for i in (0..ma.len()).rev() {
            for j in (0..mb.len()).rev() {
                lcs[i][j] = if ma[i] == mb[j] {
                    lcs[i + 1][j + 1] + 1
                } else {
                    lcs[i + 1][j].max(lcs[i][j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < ma.len() || j < mb.len() {
            if i < ma.len() && j < mb.len() && ma[i] == mb[j] {
                out += &format!("  {}\n", ma[i]);
                (i, j) = (i + 1, j + 1);
            } else if i < ma.len() && (j == mb.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
                out += &format!("- {}\n", ma[i]);
                i += 1;
            } else {
                out += &format!("+ {}\n", mb[j]);
                j += 1;
            }
        }
    }
    for line in &a[a.len() - tail..] {
        out += &format!("  {line}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_marks_removed_and_added_lines() {
        let d = diff("a\nb\nc\n", "a\nx\nc\n");
        assert_eq!(d, "  a\n- b\n+ x\n  c\n");
        assert_eq!(diff("", "a\n"), "+ a\n");
        assert_eq!(diff("a\nb\n", "a\nb\n"), "  a\n  b\n");
    }

    #[test]
    fn a_huge_diff_costs_linear_memory() {
        let old: String = (0..3000).map(|i| format!("a{i}\n")).collect();
        let new: String = (0..3000).map(|i| format!("b{i}\n")).collect();
        let d = diff(&format!("head\n{old}tail\n"), &format!("head\n{new}tail\n"));
        assert!(d.starts_with("  head\n- a0\n") && d.ends_with("+ b2999\n  tail\n"));
        assert_eq!(d.lines().count(), 6002);
    }

    #[test]
    fn selectors_need_every_label() {
        let r = Resource {
            kind: Kind::Cluster,
            name: "c".into(),
            selector: [("app".to_string(), "s1".to_string())].into(),
            version: 1,
            spec: Spec::Cluster(ClusterSpec {
                endpoints: vec![],
                service: String::new(),
                dns: String::new(),
                settings: None,
            }),
        };
        let mut labels: Labels = [("app".to_string(), "s2".to_string())].into();
        assert!(!r.selects(&labels));
        labels.insert("app".into(), "s1".into());
        labels.insert("zone".into(), "a".into());
        assert!(r.selects(&labels));
    }
}
