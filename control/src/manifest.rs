//! Manifests: chains, filter configs and clusters as kubectl-like YAML documents, read by
//! `weftctl apply` and written by `weftctl get -o yaml|json`.
//!
//! A manifest is a stream of YAML documents separated by `---`; empty documents are skipped.
//! Each document is one [`Resource`]:
//!
//! ```yaml
//! kind: Chain                  # or FilterConfig or Cluster
//! name: outbound
//! selector: {app: service1}    # optional: proxy labels a proxy must all have
//! spec:
//!   listener: outbound         # required for a Chain
//!   default_cluster: service2  # optional
//!   filters:
//!     - name: router
//!       module: router         # a module name or sha256:<hex>
//!       root_id: ""            # optional
//!       vm_id: ""              # optional: filters with the same one share an instance
//!       config_ref: routes     # optional: the FilterConfig whose config the filter gets
//!       failure_policy: fail_closed  # optional: fail_closed, fail_open or reload
//!     - name: fault
//!       module: fault
//!       config: {percent: 5}   # optional, any value: handed to the filter as JSON;
//!                              # not together with config_ref
//! ---
//! kind: FilterConfig           # no selector: it applies wherever a chain refers to it
//! name: routes
//! spec:
//!   config: {routes: []}       # required, any value but null: handed on as JSON
//! ---
//! kind: Cluster
//! name: service2
//! spec:
//!   endpoints: [{address: "127.0.0.1:8081", weight: 2}]  # optional
//!   service: service2                                     # optional registry service
//!   dns: service2.example:8080                            # optional DNS name
//!   settings:                    # optional: the proxy cluster's settings, fields as in the
//!     protocol: http2            # proxy's config file (all but name and endpoints)
//!     lb_policy: least_request
//!     tls: {mode: mesh}
//! ---
//! kind: Listener                 # a proxy listener, live; its filters come from a Chain
//! name: outbound-http
//! selector: {app: service1}
//! spec:                          # the listener's fields as in the proxy's config file,
//!   address: 127.0.0.1:15001     # all but name and filters
//!   direction: outbound          # no default_cluster: routes by authority
//! ---
//! kind: Scope                    # what the proxies it selects may call
//! name: service1
//! selector: {app: service1}
//! spec:
//!   services: [service2, payments-*]   # names, or prefixes ending in `*`
//! ```
//!
//! `version` is written by [`to_yaml`] and ignored by [`parse`], so what `get` prints applies
//! again unchanged.

use std::collections::{BTreeMap, HashMap};

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use weft_proto::v1::resource::Spec;
use weft_proto::v1::{
    self, ChainSpec, ClusterSpec, Endpoint, FilterConfigSpec, FilterRef, ListenerSpec, Resource,
    ScopeSpec,
};

/// Why a manifest cannot be read: the document at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("document {document}: {message}")]
pub struct ManifestError {
    /// The 1-based index of the document in the manifest.
    pub document: usize,
    /// What is wrong, with the YAML position when there is one.
    pub message: String,
}

/// Reads the resources of a manifest, in the order of its documents.
///
/// An error names the document (1-based) and what is wrong with it, with the field's path
/// and line when the YAML is at fault (`document 2: spec.filters[0]: unknown field `conf`,
/// ... at line 9 column 7`).
pub fn parse(text: &str) -> Result<Vec<Resource>, ManifestError> {
    // A first pass reads each document's kind, which decides how the second pass reads the
    // document: serde then reports errors with their path, line and the right field names.
    // The documents iterator repeats a syntax error forever: stop at the first error.
    let mut heads = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let head = Option::<Head>::deserialize(document)
            .map_err(|e| ManifestError::new(heads.len(), e.to_string()))?;
        heads.push(head);
    }
    let mut resources: Vec<(usize, Resource)> = Vec::new();
    let documents = serde_yaml_ng::Deserializer::from_str(text);
    for (index, (head, document)) in heads.into_iter().zip(documents).enumerate() {
        let fail = |message: String| ManifestError::new(index, message);
        let Some(Head { kind }) = head else {
            continue;
        };
        let resource = match kind.as_deref() {
            Some("Chain") => read(document).and_then(chain),
            Some("FilterConfig") => read(document).and_then(filter_config),
            Some("Cluster") => read(document).map(cluster),
            Some("Listener") => read(document).and_then(listener),
            Some("Scope") => read(document).map(scope),
            Some(kind @ ("HTTPRoute" | "GRPCRoute")) => gateway_route(kind, document),
            Some(other) => Err(format!(
                "unknown kind `{other}` (expected `Chain`, `FilterConfig`, `Cluster`, `Listener`, `Scope`, `HTTPRoute` or `GRPCRoute`)"
            )),
            None => Err("missing field `kind`".to_owned()),
        }
        .map_err(fail)?;
        if let Some((first, _)) = resources
            .iter()
            .find(|(_, r)| r.kind == resource.kind && r.name == resource.name)
        {
            return Err(fail(format!(
                "{} `{}` is already defined in document {first}",
                resource.kind, resource.name
            )));
        }
        resources.push((index + 1, resource));
    }
    Ok(resources.into_iter().map(|(_, r)| r).collect())
}

impl ManifestError {
    /// An error of the document at 0-based `index`.
    fn new(index: usize, message: String) -> Self {
        ManifestError {
            document: index + 1,
            message,
        }
    }
}

/// Writes resources as a manifest [`parse`] reads back: one YAML document per resource.
pub fn to_yaml(resources: &[Resource]) -> String {
    resources
        .iter()
        .map(|resource| {
            let written = match RouteDocument::of(resource) {
                Some(route) => serde_yaml_ng::to_string(&route),
                None => serde_yaml_ng::to_string(&OutputDocument::from(resource)),
            };
            written.unwrap_or_else(|e| {
                format!("# cannot write {} {}: {e}\n", resource.kind, resource.name)
            })
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Writes resources as a pretty JSON array of the documents [`to_yaml`] writes, fields in the
/// same order.
pub fn to_json(resources: &[Resource]) -> String {
    let documents: Vec<_> = resources.iter().map(to_value).collect();
    serde_json::to_string_pretty(&documents).unwrap_or_default()
}

/// The document [`to_yaml`] writes for a resource, as a JSON value (the filters' `config_json`
/// parsed back into values).
pub fn to_value(resource: &Resource) -> serde_json::Value {
    match RouteDocument::of(resource) {
        Some(route) => serde_json::to_value(route),
        None => serde_json::to_value(OutputDocument::from(resource)),
    }
    .unwrap_or_default()
}

/// The Gateway API group and version routes are read in.
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";

/// A Gateway API route document, as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RouteInput {
    api_version: String,
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    metadata: Metadata,
    spec: Option<serde_json::Value>,
    /// Written by controllers: accepted and ignored.
    #[serde(default, rename = "status")]
    _status: IgnoredAny,
}

/// A route's `metadata`.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    /// Kept by Kubernetes: accepted and ignored.
    #[serde(default, rename = "labels", skip_serializing)]
    _labels: Option<IgnoredAny>,
    /// Kept by Kubernetes: accepted and ignored.
    #[serde(default, rename = "annotations", skip_serializing)]
    _annotations: Option<IgnoredAny>,
}

/// Builds the resource of an `HTTPRoute` or `GRPCRoute` document.
fn gateway_route(
    kind: &str,
    document: serde_yaml_ng::Deserializer<'_>,
) -> Result<Resource, String> {
    let route = RouteInput::deserialize(document).map_err(|e| e.to_string())?;
    if route.api_version != GATEWAY_API_VERSION {
        return Err(format!(
            "apiVersion `{}`: {kind} is read as `{GATEWAY_API_VERSION}`",
            route.api_version
        ));
    }
    if route.metadata.name.is_empty() {
        return Err("`metadata.name` is empty".into());
    }
    let Some(spec) = route.spec else {
        return Err(format!("{kind} `{}` has no `spec`", route.metadata.name));
    };
    let spec = v1::GatewayRouteSpec {
        namespace: route.metadata.namespace.unwrap_or_else(|| "default".into()),
        spec_json: spec.to_string(),
    };
    let spec = if kind == "GRPCRoute" {
        Spec::GrpcRoute(spec)
    } else {
        Spec::HttpRoute(spec)
    };
    Ok(resource(kind, route.metadata.name, None, spec))
}

/// A route as written: a Gateway API document, with its status when the service gave one.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RouteDocument<'a> {
    api_version: &'static str,
    kind: &'a str,
    metadata: Metadata,
    spec: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<serde_json::Value>,
}

impl<'a> RouteDocument<'a> {
    /// The document of `resource`, if it is a route.
    fn of(resource: &'a Resource) -> Option<Self> {
        let route = match &resource.spec {
            Some(Spec::HttpRoute(r) | Spec::GrpcRoute(r)) => r,
            _ => return None,
        };
        let status = (!resource.conditions.is_empty()).then(|| {
            serde_json::json!({ "conditions": resource.conditions.iter().map(|c| serde_json::json!({
                "type": c.r#type, "status": c.status, "reason": c.reason, "message": c.message,
            })).collect::<Vec<_>>() })
        });
        Some(RouteDocument {
            api_version: GATEWAY_API_VERSION,
            kind: &resource.kind,
            metadata: Metadata {
                name: resource.name.clone(),
                namespace: Some(route.namespace.clone()),
                _labels: None,
                _annotations: None,
            },
            spec: serde_json::from_str(&route.spec_json).unwrap_or_default(),
            status,
        })
    }
}

/// What the first pass reads of a document.
#[derive(Deserialize)]
#[serde(expecting = "a resource: a mapping with `kind`, `name` and `spec`")]
struct Head {
    /// `Chain`, `FilterConfig` or `Cluster`.
    kind: Option<String>,
}

/// A document of a kind whose spec is `S`, as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputDocument<S> {
    /// Read by the first pass.
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    name: String,
    /// Absent and empty alike select every proxy; a `FilterConfig` must not have one.
    selector: Option<HashMap<String, String>>,
    /// Set by the service: accepted and ignored.
    #[serde(default, rename = "version")]
    _version: IgnoredAny,
    spec: Option<S>,
}

/// The spec of a `Chain`, as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChainInput {
    listener: String,
    #[serde(default)]
    default_cluster: String,
    #[serde(default)]
    filters: Vec<FilterDocument>,
}

/// The spec of a `FilterConfig`, as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterConfigInput {
    config: serde_json::Value,
}

/// The spec of a `Cluster`, as read.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterInput {
    #[serde(default)]
    endpoints: Vec<EndpointDocument>,
    #[serde(default)]
    service: String,
    #[serde(default)]
    dns: String,
    #[serde(default)]
    settings: Option<serde_json::Value>,
}

/// A filter of a chain, as written in a manifest.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FilterDocument {
    name: String,
    module: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    root_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    vm_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    config: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    config_ref: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failure_policy: Option<weft_config::FailurePolicy>,
}

/// An endpoint of a cluster, as written in a manifest.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct EndpointDocument {
    address: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identity: Option<String>,
}

/// Reads a document in the second pass.
fn read<S: for<'de> Deserialize<'de>>(
    document: serde_yaml_ng::Deserializer<'_>,
) -> Result<InputDocument<S>, String> {
    let document = InputDocument::deserialize(document).map_err(|e| e.to_string())?;
    if document.name.is_empty() {
        return Err("`name` is empty".to_owned());
    }
    Ok(document)
}

/// Checks a `Chain` document and builds its resource.
fn chain(document: InputDocument<ChainInput>) -> Result<Resource, String> {
    let name = document.name;
    let Some(spec) = document.spec.filter(|spec| !spec.listener.is_empty()) else {
        return Err(format!("Chain `{name}` has no `spec.listener`"));
    };
    if let Some(filter) = spec
        .filters
        .iter()
        .find(|f| !f.config_ref.is_empty() && f.config.as_ref().is_some_and(|c| !c.is_null()))
    {
        return Err(format!(
            "Chain `{name}`: filter `{}` sets both `config` and `config_ref` (`{}`); \
             set one: `config_ref` gives the filter that FilterConfig's config instead",
            filter.name, filter.config_ref
        ));
    }
    let spec = Spec::Chain(ChainSpec {
        listener: spec.listener,
        default_cluster: spec.default_cluster,
        filters: spec.filters.into_iter().map(FilterRef::from).collect(),
    });
    Ok(resource("Chain", name, document.selector, spec))
}

/// Checks a `FilterConfig` document and builds its resource.
fn filter_config(document: InputDocument<FilterConfigInput>) -> Result<Resource, String> {
    let name = document.name;
    if document.selector.is_some() {
        return Err(
            "a FilterConfig has no selector: it applies wherever a chain refers to it".to_owned(),
        );
    }
    let config = match document.spec {
        None => return Err(format!("FilterConfig `{name}` has no `spec.config`")),
        Some(FilterConfigInput {
            config: serde_json::Value::Null,
        }) => return Err(format!("FilterConfig `{name}`: `spec.config` is null")),
        Some(spec) => spec.config,
    };
    let spec = Spec::FilterConfig(FilterConfigSpec {
        config_json: config.to_string(),
    });
    Ok(resource("FilterConfig", name, None, spec))
}

/// The spec of a `Scope`, as read.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopeInput {
    services: Vec<String>,
}

/// Builds the resource of a `Listener` document: its spec is the listener's settings.
fn listener(document: InputDocument<serde_json::Value>) -> Result<Resource, String> {
    let settings = match document.spec {
        Some(settings @ serde_json::Value::Object(_)) => settings,
        _ => {
            return Err(
                "spec: the listener's settings (a mapping with `address`) are required".into(),
            );
        }
    };
    let spec = Spec::Listener(ListenerSpec {
        settings_json: settings.to_string(),
    });
    Ok(resource("Listener", document.name, document.selector, spec))
}

/// Builds the resource of a `Scope` document.
fn scope(document: InputDocument<ScopeInput>) -> Resource {
    let spec = Spec::Scope(ScopeSpec {
        services: document.spec.unwrap_or_default().services,
    });
    resource("Scope", document.name, document.selector, spec)
}

/// Builds the resource of a `Cluster` document.
fn cluster(document: InputDocument<ClusterInput>) -> Resource {
    let spec = document.spec.unwrap_or_default();
    let spec = Spec::Cluster(ClusterSpec {
        endpoints: spec.endpoints.into_iter().map(Endpoint::from).collect(),
        service: spec.service,
        dns: spec.dns,
        settings_json: spec
            .settings
            .filter(|s| !s.is_null())
            .map(|s| s.to_string())
            .unwrap_or_default(),
    });
    resource("Cluster", document.name, document.selector, spec)
}

/// A resource as read (no version).
fn resource(
    kind: &str,
    name: String,
    selector: Option<HashMap<String, String>>,
    spec: Spec,
) -> Resource {
    Resource {
        kind: kind.to_owned(),
        name,
        selector: selector.unwrap_or_default(),
        version: 0,
        spec: Some(spec),
        conditions: Vec::new(),
    }
}

impl From<FilterDocument> for FilterRef {
    fn from(filter: FilterDocument) -> Self {
        FilterRef {
            name: filter.name,
            module: filter.module,
            root_id: filter.root_id,
            vm_id: filter.vm_id,
            config_json: match filter.config {
                None | Some(serde_json::Value::Null) => String::new(),
                Some(value) => value.to_string(),
            },
            config_ref: filter.config_ref,
            failure_policy: filter
                .failure_policy
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default(),
        }
    }
}

impl From<EndpointDocument> for Endpoint {
    fn from(endpoint: EndpointDocument) -> Self {
        Endpoint {
            address: endpoint.address,
            weight: endpoint.weight,
            identity: endpoint.identity.unwrap_or_default(),
        }
    }
}

/// A document as written: fields in manifest order, empty optional fields left out.
#[derive(Serialize)]
struct OutputDocument<'a> {
    kind: &'a str,
    name: &'a str,
    /// Left out for a `FilterConfig` (unless the service gave it one).
    #[serde(skip_serializing_if = "Option::is_none")]
    selector: Option<BTreeMap<&'a str, &'a str>>,
    #[serde(skip_serializing_if = "is_zero")]
    version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    spec: Option<OutputSpec<'a>>,
}

/// The spec of an [`OutputDocument`].
#[derive(Serialize)]
#[serde(untagged)]
enum OutputSpec<'a> {
    /// A chain's.
    Chain {
        listener: &'a str,
        #[serde(skip_serializing_if = "str::is_empty")]
        default_cluster: &'a str,
        filters: Vec<FilterDocument>,
    },
    /// A filter config's.
    FilterConfig { config: serde_json::Value },
    /// A cluster's.
    Cluster {
        #[serde(skip_serializing_if = "Vec::is_empty")]
        endpoints: Vec<EndpointDocument>,
        #[serde(skip_serializing_if = "str::is_empty")]
        service: &'a str,
        #[serde(skip_serializing_if = "str::is_empty")]
        dns: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        settings: Option<serde_json::Value>,
    },
    /// A listener's: its settings.
    Listener(serde_json::Value),
    /// A scope's.
    Scope { services: &'a [String] },
}

impl<'a> From<&'a Resource> for OutputDocument<'a> {
    fn from(resource: &'a Resource) -> Self {
        let spec = resource.spec.as_ref().map(|spec| match spec {
            Spec::Chain(chain) => OutputSpec::Chain {
                listener: &chain.listener,
                default_cluster: &chain.default_cluster,
                filters: chain.filters.iter().map(FilterDocument::from).collect(),
            },
            Spec::Cluster(cluster) => OutputSpec::Cluster {
                endpoints: cluster
                    .endpoints
                    .iter()
                    .map(|e| EndpointDocument {
                        address: e.address.clone(),
                        weight: e.weight,
                        identity: (!e.identity.is_empty()).then(|| e.identity.clone()),
                    })
                    .collect(),
                service: &cluster.service,
                dns: &cluster.dns,
                settings: config_value(&cluster.settings_json),
            },
            Spec::FilterConfig(filter_config) => OutputSpec::FilterConfig {
                config: config_value(&filter_config.config_json).unwrap_or(serde_json::Value::Null),
            },
            Spec::Listener(l) => OutputSpec::Listener(
                config_value(&l.settings_json).unwrap_or(serde_json::Value::Null),
            ),
            Spec::Scope(s) => OutputSpec::Scope {
                services: &s.services,
            },
            // Written by `RouteDocument`.
            Spec::HttpRoute(r) | Spec::GrpcRoute(r) => {
                OutputSpec::Listener(config_value(&r.spec_json).unwrap_or(serde_json::Value::Null))
            }
        });
        let selector =
            (resource.kind != "FilterConfig" || !resource.selector.is_empty()).then(|| {
                resource
                    .selector
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect()
            });
        OutputDocument {
            kind: &resource.kind,
            name: &resource.name,
            selector,
            version: resource.version,
            spec,
        }
    }
}

impl From<&FilterRef> for FilterDocument {
    fn from(filter: &FilterRef) -> Self {
        FilterDocument {
            name: filter.name.clone(),
            module: filter.module.clone(),
            root_id: filter.root_id.clone(),
            vm_id: filter.vm_id.clone(),
            config: config_value(&filter.config_json),
            config_ref: filter.config_ref.clone(),
            failure_policy: match filter.failure_policy.as_str() {
                "" => None,
                name => name.parse().ok(),
            },
        }
    }
}

/// A `config_json` as a value: `None` when it is empty, a string when it is not JSON (never
/// from the service).
fn config_value(config_json: &str) -> Option<serde_json::Value> {
    (!config_json.is_empty()).then(|| {
        serde_json::from_str(config_json)
            .unwrap_or_else(|_| serde_json::Value::String(config_json.to_owned()))
    })
}

/// For `skip_serializing_if`.
fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
kind: Chain
name: outbound
selector: {app: service1}
spec:
  listener: outbound
  default_cluster: service2
  filters:
    - name: router
      module: router
      config:
        routes:
          - {prefix: /api, cluster: service2, weight: 1.5}
          - {prefix: /, cluster: "null"}
    - name: fault
      module: sha256:0123456789abcdef
      root_id: fault_root
      failure_policy: fail_open
---
---
kind: Cluster
name: service2
selector: {}
version: 7
spec:
  endpoints: [{address: "127.0.0.1:8081", weight: 2}, {address: "127.0.0.1:8082"}]
  service: service2
---
kind: Cluster
name: empty
---
kind: Listener
name: outbound-http
selector: {app: service1}
spec:
  address: 127.0.0.1:15001
  direction: outbound
  idle_timeout_ms: 30000
---
kind: Scope
name: service1
selector: {app: service1}
spec:
  services: [service2, pay-*]
---
kind: Cluster
name: tuned
spec:
  service: tuned
  settings: {lb_policy: least_request, limits: {max_requests: 9}}
"#;

    #[test]
    fn reads_every_document() {
        let resources = parse(MANIFEST).unwrap();
        assert_eq!(resources.len(), 6);
        let Some(Spec::Listener(l)) = &resources[3].spec else {
            panic!("not a listener: {:?}", resources[3]);
        };
        let settings: serde_json::Value = serde_json::from_str(&l.settings_json).unwrap();
        assert_eq!(settings["address"], "127.0.0.1:15001");
        assert_eq!(settings["idle_timeout_ms"], 30000);
        assert_eq!(
            resources[4].spec,
            Some(Spec::Scope(ScopeSpec {
                services: vec!["service2".into(), "pay-*".into()]
            }))
        );
        let Some(Spec::Cluster(tuned)) = &resources[5].spec else {
            panic!("not a cluster: {:?}", resources[5]);
        };
        let settings: serde_json::Value = serde_json::from_str(&tuned.settings_json).unwrap();
        assert_eq!(settings["limits"]["max_requests"], 9);
        let Some(Spec::Chain(chain)) = &resources[0].spec else {
            panic!("not a chain: {:?}", resources[0]);
        };
        assert_eq!(resources[0].selector["app"], "service1");
        assert_eq!(chain.listener, "outbound");
        assert_eq!(chain.filters.len(), 2);
        let config: serde_json::Value =
            serde_json::from_str(&chain.filters[0].config_json).unwrap();
        assert_eq!(config["routes"][0]["weight"], 1.5);
        assert_eq!(config["routes"][1]["cluster"], "null");
        assert_eq!(chain.filters[1].config_json, "");
        let Some(Spec::Cluster(cluster)) = &resources[1].spec else {
            panic!("not a cluster: {:?}", resources[1]);
        };
        assert_eq!(resources[1].version, 0, "version is ignored");
        assert_eq!(cluster.endpoints[0].weight, 2);
        assert_eq!(cluster.service, "service2");
        assert_eq!(
            resources[2].spec,
            Some(Spec::Cluster(ClusterSpec::default()))
        );
    }

    #[test]
    fn round_trips() {
        let resources = parse(MANIFEST).unwrap();
        let yaml = to_yaml(&resources);
        assert_eq!(parse(&yaml).unwrap(), resources, "{yaml}");
        let mut versioned = resources.clone();
        versioned[0].version = 3;
        let yaml = to_yaml(&versioned);
        assert!(yaml.contains("version: 3"), "{yaml}");
        assert_eq!(parse(&yaml).unwrap(), resources, "{yaml}");
        let json: Vec<serde_json::Value> = serde_json::from_str(&to_json(&versioned)).unwrap();
        assert_eq!(json[0], to_value(&versioned[0]));
        assert_eq!(
            json[0]["spec"]["filters"][0]["config"]["routes"][0]["prefix"],
            "/api"
        );
    }

    #[test]
    fn empty_manifest_has_no_resources() {
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(parse("---\n---\n# nothing\n").unwrap(), vec![]);
    }

    fn error(text: &str) -> ManifestError {
        parse(text).unwrap_err()
    }

    #[test]
    fn errors_name_the_document() {
        let valid = "kind: Cluster\nname: a\n---\n";
        let e = error(&format!("{valid}kind: Gateway\nname: b\n"));
        assert_eq!(e.document, 2);
        assert_eq!(
            e.to_string(),
            "document 2: unknown kind `Gateway` (expected `Chain`, `FilterConfig`, `Cluster`, `Listener`, `Scope`, `HTTPRoute` or `GRPCRoute`)"
        );
        let e = error(&format!("{valid}kind: Listener\nname: b\nspec: 3\n"));
        assert_eq!(
            e.to_string(),
            "document 2: spec: the listener's settings (a mapping with `address`) are required"
        );
        let e = error(&format!(
            "{valid}kind: Scope\nname: b\nspec: {{hosts: [a]}}\n"
        ));
        assert!(e.to_string().contains("unknown field `hosts`"), "{e}");

        let e = error(&format!("{valid}kind: Cluster\nname: b\nlabels: {{}}\n"));
        assert_eq!(e.document, 2);
        assert!(
            e.to_string()
                .starts_with("document 2: unknown field `labels`"),
            "{e}"
        );

        let e = error(&format!(
            "{valid}kind: Chain\nname: b\nspec:\n  listener: x\n  filters:\n    - {{name: r, module: r, conf: 1}}\n"
        ));
        assert!(
            e.message.contains("spec.filters[0]: unknown field `conf`"),
            "{e}"
        );
        assert!(e.message.contains("line 9"), "{e}");

        let e = error("kind: Chain\nname: b\nspec:\n  endpoints: []\n  listener: x\n");
        assert_eq!(e.document, 1);
        assert!(
            e.message.starts_with(
                "spec: unknown field `endpoints`, expected one of `listener`, `default_cluster`"
            ),
            "{e}"
        );

        let e = error("kind: Cluster\nname: b\nspec: {listener: x}\n");
        assert!(
            e.message
                .contains("expected one of `endpoints`, `service`, `dns`"),
            "{e}"
        );

        let e = error("name: b\n");
        assert_eq!(e.to_string(), "document 1: missing field `kind`");

        let e = error("[kind, name]\n");
        assert!(e.message.contains("expected a resource"), "{e}");

        let e = error("kind: Cluster\nspec: {}\n");
        assert!(e.message.contains("missing field `name`"), "{e}");

        let e = error("kind: Chain\nname: c\nspec: {filters: []}\n");
        assert_eq!(
            e.to_string(),
            "document 1: spec: missing field `listener` at line 3 column 7"
        );
        let e = error("kind: Chain\nname: c\n");
        assert_eq!(
            e.to_string(),
            "document 1: Chain `c` has no `spec.listener`"
        );

        let e = error(&format!("{valid}{valid}"));
        assert_eq!(
            e.to_string(),
            "document 2: Cluster `a` is already defined in document 1"
        );

        let e = error(&format!("{valid}kind: [\n"));
        assert_eq!(e.document, 2);
    }

    const WITH_FILTER_CONFIG: &str = r#"
kind: FilterConfig
name: routes
spec:
  config:
    routes:
      - {prefix: /api, cluster: service2}
---
kind: FilterConfig
name: banner
version: 4
spec: {config: "hello, world"}
---
kind: Chain
name: outbound
spec:
  listener: outbound
  filters:
    - {name: router, module: router, config_ref: routes, failure_policy: fail_open}
    - {name: banner, module: banner, config: null, config_ref: banner}
    - {name: fault, module: fault, config: {percent: 5}}
"#;

    #[test]
    fn reads_filter_configs_and_config_refs() {
        let resources = parse(WITH_FILTER_CONFIG).unwrap();
        assert_eq!(resources.len(), 3);
        assert_eq!(resources[0].kind, "FilterConfig");
        assert!(resources[0].selector.is_empty());
        let Some(Spec::FilterConfig(routes)) = &resources[0].spec else {
            panic!("not a filter config: {:?}", resources[0]);
        };
        let config: serde_json::Value = serde_json::from_str(&routes.config_json).unwrap();
        assert_eq!(config["routes"][0]["cluster"], "service2");
        assert_eq!(
            resources[1].spec,
            Some(Spec::FilterConfig(FilterConfigSpec {
                config_json: r#""hello, world""#.to_owned()
            }))
        );
        let Some(Spec::Chain(chain)) = &resources[2].spec else {
            panic!("not a chain: {:?}", resources[2]);
        };
        assert_eq!(chain.filters[0].config_ref, "routes");
        assert_eq!(chain.filters[0].config_json, "");
        assert_eq!(chain.filters[1].config_ref, "banner");
        assert_eq!(
            chain.filters[1].config_json, "",
            "a null config is no config"
        );
        assert_eq!(chain.filters[2].config_ref, "");
        assert_eq!(chain.filters[2].config_json, r#"{"percent":5}"#);
    }

    #[test]
    fn round_trips_filter_configs_and_config_refs() {
        let resources = parse(WITH_FILTER_CONFIG).unwrap();
        let mut versioned = resources.clone();
        versioned[0].version = 9;
        let yaml = to_yaml(&versioned);
        assert!(
            yaml.starts_with("kind: FilterConfig\nname: routes\nversion: 9\nspec:\n  config:\n"),
            "{yaml}"
        );
        assert!(!yaml.contains("selector: {}\nversion: 9"), "{yaml}");
        assert!(yaml.contains("config_ref: routes"), "{yaml}");
        assert_eq!(parse(&yaml).unwrap(), resources, "{yaml}");

        let json: Vec<serde_json::Value> = serde_json::from_str(&to_json(&versioned)).unwrap();
        assert_eq!(json[0], to_value(&versioned[0]));
        assert_eq!(
            json[0],
            serde_json::json!({
                "kind": "FilterConfig",
                "name": "routes",
                "version": 9,
                "spec": {"config": {"routes": [{"prefix": "/api", "cluster": "service2"}]}},
            })
        );
        assert_eq!(json[1]["spec"]["config"], "hello, world");
        assert_eq!(json[2]["spec"]["filters"][0]["config_ref"], "routes");
        assert!(json[2]["spec"]["filters"][0].get("config").is_none());
    }

    #[test]
    fn config_and_config_ref_exclude_each_other() {
        let e = error(
            "kind: Cluster\nname: a\n---\nkind: Chain\nname: c\nspec:\n  listener: l\n  filters:\n    - {name: r, module: r, config: {routes: []}, config_ref: routes}\n",
        );
        assert_eq!(e.document, 2);
        assert_eq!(
            e.to_string(),
            "document 2: Chain `c`: filter `r` sets both `config` and `config_ref` (`routes`); \
             set one: `config_ref` gives the filter that FilterConfig's config instead"
        );
    }

    #[test]
    fn filter_config_errors() {
        let e = error("kind: FilterConfig\nname: routes\nselector: {app: a}\nspec: {config: 1}\n");
        assert_eq!(
            e.to_string(),
            "document 1: a FilterConfig has no selector: it applies wherever a chain refers to it"
        );
        let e = error("kind: FilterConfig\nname: routes\nselector: {}\nspec: {config: 1}\n");
        assert!(
            e.message.starts_with("a FilterConfig has no selector"),
            "{e}"
        );

        let e = error("kind: FilterConfig\nname: routes\n");
        assert_eq!(
            e.to_string(),
            "document 1: FilterConfig `routes` has no `spec.config`"
        );
        let e = error("kind: FilterConfig\nname: routes\nspec: {}\n");
        assert!(e.message.starts_with("spec: missing field `config`"), "{e}");
        let e = error("kind: FilterConfig\nname: routes\nspec: {config: }\n");
        assert_eq!(
            e.to_string(),
            "document 1: FilterConfig `routes`: `spec.config` is null"
        );
        let e = error("kind: FilterConfig\nname: routes\nspec: {config: 1, listener: x}\n");
        assert!(
            e.message
                .starts_with("spec: unknown field `listener`, expected `config`"),
            "{e}"
        );

        let e = error(
            "kind: FilterConfig\nname: routes\nspec: {config: 1}\n---\nkind: FilterConfig\nname: routes\nspec: {config: 2}\n",
        );
        assert_eq!(
            e.to_string(),
            "document 2: FilterConfig `routes` is already defined in document 1"
        );
    }
}
