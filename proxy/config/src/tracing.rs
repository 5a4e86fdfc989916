//! `tracing:`: exporting the spans of traced requests to an OpenTelemetry collector (OTLP).

use serde::{Deserialize, Serialize};

/// How spans reach the collector.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    /// OTLP/gRPC (`TraceService/Export`), the collector's port 4317.
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`POST <endpoint>/v1/traces`), port 4318.
    HttpProtobuf,
}

/// Exporting spans over OTLP.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector: `http://host:port`.
    pub endpoint: String,
    /// `grpc` or `http_protobuf`.
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// The share of traces exported, in percent, decided from the trace id (so that every
    /// proxy a trace crosses decides alike); the request's `traceparent` must also say
    /// sampled.
    #[serde(default = "hundred")]
    pub sample_percent: f64,
    /// The spans' `service.name`; by default the proxy's `app` label, else `weft-proxy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// Spans waiting for export at most; past it new spans are dropped (and counted).
    #[serde(default = "max_queue")]
    pub max_queue: u64,
    /// Spans in one export at most.
    #[serde(default = "max_batch")]
    pub max_batch: u64,
    /// How often waiting spans are exported, ms.
    #[serde(default = "flush_ms")]
    pub flush_ms: u64,
    /// An export not answered within this is abandoned (its spans dropped), ms.
    #[serde(default = "timeout_ms")]
    pub timeout_ms: u64,
}

fn hundred() -> f64 {
    100.0
}
fn max_queue() -> u64 {
    2048
}
fn max_batch() -> u64 {
    512
}
fn flush_ms() -> u64 {
    1000
}
fn timeout_ms() -> u64 {
    2000
}

impl TracingConfig {
    /// Checks the endpoint and the numbers: (field, message) of the first problem.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, message: String| Err((format!("tracing.{field}"), message));
        let Some(rest) = self.endpoint.strip_prefix("http://") else {
            return bad(
                "endpoint",
                format!(
                    "`{}`: an OTLP collector is `http://host:port` (TLS to the collector is \
                     not supported yet)",
                    self.endpoint
                ),
            );
        };
        let authority = rest.trim_end_matches('/');
        let port_ok = authority.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok || authority.contains('/') {
            return bad(
                "endpoint",
                format!("`{}`: expected http://host:port", self.endpoint),
            );
        }
        if !(0.0..=100.0).contains(&self.sample_percent) {
            return bad(
                "sample_percent",
                format!("{}: within 0..=100", self.sample_percent),
            );
        }
        for (field, v, lo, hi) in [
            ("max_queue", self.max_queue, 1, 1_000_000),
            ("max_batch", self.max_batch, 1, 100_000),
            ("flush_ms", self.flush_ms, 10, 600_000),
            ("timeout_ms", self.timeout_ms, 10, 600_000),
        ] {
            if !(lo..=hi).contains(&v) {
                return bad(field, format!("{v}: within {lo}..={hi}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoint: &str) -> TracingConfig {
        serde_yaml_ng::from_str(&format!("endpoint: \"{endpoint}\"")).expect("yaml")
    }

    #[test]
    fn an_endpoint_is_http_host_port_and_numbers_are_in_range() {
        let ok = config("http://127.0.0.1:4317");
        assert_eq!(ok.protocol, OtlpProtocol::Grpc);
        assert_eq!(
            (ok.sample_percent, ok.max_batch, ok.flush_ms),
            (100.0, 512, 1000)
        );
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(config("http://collector:4318/").validate(), Ok(()));
        for bad in [
            "https://c:4317",
            "c:4317",
            "http://c",
            "http://c:0",
            "http://:4317",
            "http://c:4317/v1/traces",
        ] {
            let (field, message) = config(bad).validate().expect_err(bad);
            assert_eq!(field, "tracing.endpoint", "{bad}");
            assert!(message.contains(bad), "{message}");
        }
        let mut c = config("http://c:4317");
        c.sample_percent = 150.0;
        assert_eq!(c.validate().unwrap_err().0, "tracing.sample_percent");
        let mut c = config("http://c:4317");
        c.max_batch = 0;
        assert_eq!(c.validate().unwrap_err().0, "tracing.max_batch");
        assert!(
            serde_yaml_ng::from_str::<TracingConfig>("endpoint: http://c:1\nprotocol: thrift")
                .is_err()
        );
    }
}
