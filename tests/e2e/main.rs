//! End-to-end tests: the real `weft-proxy` binary, real upstream servers and real clients,
//! all on loopback. One test binary with a module per area keeps link time down.

mod admin;
mod bad_input;
mod drain;
mod fault;
mod lb;
mod limits;
mod outlier;
mod protocols;
mod ratelimit;
mod retry;
mod router;
mod telemetry;
mod wasm;
mod wasm_body;
mod wasm_ext;

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

/// `(address, 1)` for each upstream.
pub fn eps(ups: &[&Upstream]) -> Vec<(String, u32)> {
    ups.iter().map(|u| (u.address(), 1)).collect()
}
