//! End-to-end tests: the real `weft-proxy` binary, real upstream servers and real clients,
//! all on loopback. One test binary with a module per area keeps link time down.

mod abuse;
mod admin;
mod bad_input;
mod cancellation;
mod capture;
mod compose;
mod control;
mod dns;
mod downstream_h1;
mod drain;
mod etcd;
mod fault;
mod gateway;
mod images;
mod lb;
mod limits;
mod mesh_ca;
mod mtls;
mod observe;
mod otlp;
mod outlier;
mod protocols;
mod ratelimit;
mod reload;
mod retry;
mod rollout;
mod router;
mod sdk;
mod services;
mod tcp;
mod telemetry;
mod upstream_h1;
mod wasm;
mod wasm_body;
mod wasm_ext;
mod wasm_grpc;
mod wasm_hold;
mod wasm_host;

use weft_tests::Upstream;

/// A one-listener, one-cluster config. `listener` and `cluster` are extra YAML lines
/// (already indented for their block); endpoints are `(address, weight)`.
pub fn config(listener: &str, cluster: &str, endpoints: &[(String, u32)]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|(a, w)| format!("      - {{ address: \"{a}\", weight: {w} }}\n"))
        .collect();
    format!(
        "admin: {{ address: \"{{admin}}\" }}
drain: {{ timeout_ms: 5000 }}
listeners:
  - name: ingress
    address: \"{{listen}}\"
    default_cluster: svc
{listener}
clusters:
  - name: svc
    endpoints:
{eps}{cluster}
"
    )
}

/// A one-listener config whose listener `ingress` runs a filter chain: `filters` and
/// `clusters` are YAML flow mappings (see [`filter`] and [`cluster`]), in order.
pub fn chain(default_cluster: &str, filters: &[String], clusters: &[String]) -> String {
    let filters: String = filters.iter().map(|f| format!("      - {f}\n")).collect();
    let clusters: String = clusters.iter().map(|c| format!("  - {c}\n")).collect();
    format!(
        "admin: {{ address: \"{{admin}}\" }}
wasm: {{ cache_dir: \"{cache}\" }}
listeners:
  - name: ingress
    address: \"{{listen}}\"
    default_cluster: {default_cluster}
    filters:
{filters}clusters:
{clusters}",
        cache = weft_tests::shared_module_cache().display(),
    )
}

/// A filter entry: `config` is YAML (flow style) or empty for none.
pub fn filter(name: &str, module: &std::path::Path, config: &str) -> String {
    let config = if config.is_empty() {
        String::new()
    } else {
        format!(", config: {config}")
    };
    format!(
        "{{ name: {name}, module: \"{}\"{config} }}",
        module.display()
    )
}

/// A cluster entry over `endpoints`, with `extra` fields (YAML, flow style) if any.
pub fn cluster(name: &str, endpoints: &[String], extra: &str) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|a| format!("{{ address: \"{a}\" }}"))
        .collect();
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    format!(
        "{{ name: {name}, endpoints: [ {} ]{extra} }}",
        eps.join(", ")
    )
}

/// `(address, 1)` for each upstream.
pub fn eps(ups: &[&Upstream]) -> Vec<(String, u32)> {
    ups.iter().map(|u| (u.address(), 1)).collect()
}
