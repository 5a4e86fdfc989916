//! The telemetry filter: per-request metrics labelled by route, cluster, method and status
//! class, JSON access log lines, and W3C trace context (`traceparent`) propagation.
//!
//! - Metrics (exported by the proxy's `/stats/prometheus`): `weft_filter_requests_total` and
//!   `weft_filter_request_duration_ms` (histogram), labelled `route`, `cluster`, `method`,
//!   `status_class`.
//! - Access log: one JSON object per request into the proxy's log (tagged with the filter's
//!   name): time, method, path, authority, status, duration, route, cluster, upstream,
//!   source, request id, trace id, user agent.
//! - Tracing: a request with a valid `traceparent` keeps its trace id and gets a new span id
//!   for the hop (its span becomes the parent); one without gets a new trace. The request
//!   id (`x-request-id`) is set by the proxy before filters run and travels unchanged.
//!
//! Configuration reference: `filters/telemetry/README.md`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

use serde::Deserialize;
use weft_sdk::{Action, Ctx, Filter, LogLevel, Metric, PropertySet};

weft_sdk::export_filter!(Telemetry);

/// The filter's configuration (all fields optional; no configuration at all is fine).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Write access log lines.
    #[serde(default = "yes")]
    pub access_log: bool,
    /// Count requests and their durations.
    #[serde(default = "yes")]
    pub metrics: bool,
    /// Propagate and create `traceparent`.
    #[serde(default = "yes")]
    pub tracing: bool,
    #[serde(skip)]
    rng: Cell<u64>,
    /// Metric handles by label set, defined once per instance.
    #[serde(skip)]
    series: RefCell<HashMap<String, Series>>,
    /// The label values of the last stream counted and their handles: a stream like the
    /// one before (the common case) skips building the label set and looking it up.
    #[serde(skip)]
    last: RefCell<Option<LastSeries>>,
    /// What the metrics need from every stream, read in one host call.
    #[serde(skip, default = "metric_properties")]
    metric_properties: PropertySet<5>,
}

/// The properties `on_log` reads for the metrics: status, duration, route, cluster, method.
fn metric_properties() -> PropertySet<5> {
    PropertySet::new([
        &["response", "code"],
        &["request", "duration"],
        &["weft", "route"],
        &["xds", "cluster_name"],
        &["request", "method"],
    ])
}

/// The series the last stream was counted in, by the values its labels came from.
#[derive(Debug)]
struct LastSeries {
    route: String,
    cluster: String,
    method: String,
    class: &'static str,
    series: Series,
}

/// Writes `v` as 16 lowercase hex digits into `out` (16 bytes).
fn write_hex(out: &mut [u8], v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in out.iter_mut().take(16).enumerate() {
        *b = DIGITS[(v >> ((15 - i) * 4) & 0xf) as usize];
    }
}

/// Length of a version-00 `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>`.
const TRACEPARENT_LEN: usize = 55;

fn yes() -> bool {
    true
}

impl Config {
    /// 64 random bits (xorshift64*, seeded from the clock and the address of this
    /// instance's configuration, so that workers differ).
    fn random(&self, cx: &Ctx<'_>) -> u64 {
        let mut x = self.rng.get();
        if x == 0 {
            let t = cx
                .now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            x = (t ^ (self as *const Self as u64).rotate_left(32)) | 1;
        }
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// The handles of one label set: request counter, duration histogram.
type Series = (Option<Metric>, Option<Metric>);

/// A parsed `traceparent` (version 00).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 2 hex digits.
    pub flags: String,
}

impl TraceParent {
    /// Parses `00-<trace id>-<span id>-<flags>`; all-zero ids are invalid.
    pub fn parse(v: &str) -> Option<TraceParent> {
        let mut parts = v.trim().split('-');
        let (Some(version), Some(trace), Some(span), Some(flags), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if version != "00" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
            return None;
        }
        if trace.bytes().all(|b| b == b'0') || span.bytes().all(|b| b == b'0') {
            return None;
        }
        Some(TraceParent {
            trace_id: trace.to_owned(),
            span_id: span.to_owned(),
            flags: flags.to_owned(),
        })
    }

    /// The header value.
    pub fn header(&self) -> String {
        let mut h = String::with_capacity(
            3 + self.trace_id.len() + 1 + self.span_id.len() + 1 + self.flags.len(),
        );
        for part in ["00-", &self.trace_id, "-", &self.span_id, "-", &self.flags] {
            h.push_str(part);
        }
        h
    }
}

/// The telemetry filter's per-stream state.
pub struct Telemetry {
    config: Rc<Config>,
    trace_id: String,
    parent_span: String,
}

fn class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

/// The method as a label: the standard ones, else `other` (a client cannot grow the
/// number of series by inventing methods).
fn method_label(m: &str) -> &str {
    match m {
        "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE" | "PATCH" => m,
        _ => "other",
    }
}

/// A label value as the host's `family{key="value"}` syntax takes it.
fn label(v: &str) -> String {
    v.chars()
        .filter(|c| !matches!(c, '"' | '\\' | ',' | '{' | '}'))
        .collect()
}

impl Telemetry {
    /// The handles of the series with these label values, defined on first use.
    fn series(
        &self,
        cx: &mut Ctx<'_>,
        route: &str,
        cluster: &str,
        method: &str,
        class: &str,
    ) -> Series {
        let labels = format!(
            r#"{{route="{}",cluster="{}",method="{method}",status_class="{class}"}}"#,
            label(route),
            label(cluster),
        );
        if let Some(handles) = self.config.series.borrow().get(&labels) {
            return *handles;
        }
        let handles = (
            cx.counter(&format!("requests{labels}")),
            cx.histogram(&format!("request_duration_ms{labels}")),
        );
        let mut series = self.config.series.borrow_mut();
        // Label sets come from config (routes, clusters) and a few methods and classes; the
        // cap guards against unbounded methods.
        if series.len() < 10_000 {
            series.insert(labels, handles);
        }
        handles
    }
}

impl Filter for Telemetry {
    type Config = Config;

    fn new(config: &Rc<Config>) -> Self {
        Telemetry {
            config: config.clone(),
            trace_id: String::new(),
            parent_span: String::new(),
        }
    }

    fn on_request_headers(&mut self, cx: &mut Ctx<'_>, _end_of_stream: bool) -> Action {
        if !self.config.tracing {
            return Action::Continue;
        }
        let incoming = cx
            .request_header("traceparent")
            .and_then(|v| TraceParent::parse(&v));
        // The next hop's header, written in place: `00-<trace>-<new span>-<flags>`.
        let mut h = [0u8; TRACEPARENT_LEN];
        h[..3].copy_from_slice(b"00-");
        h[35] = b'-';
        h[52] = b'-';
        match &incoming {
            Some(parent) => {
                h[3..35].copy_from_slice(parent.trace_id.as_bytes());
                h[53..].copy_from_slice(parent.flags.as_bytes());
                self.parent_span.clone_from(&parent.span_id);
            }
            None => {
                write_hex(&mut h[3..19], self.config.random(cx));
                write_hex(&mut h[19..35], self.config.random(cx) | 1);
                h[53..].copy_from_slice(b"01");
            }
        }
        write_hex(&mut h[36..52], self.config.random(cx) | 1);
        // ASCII throughout: a parsed parent's parts are lowercase hex, the rest is ours.
        let header = std::str::from_utf8(&h).unwrap_or_default();
        self.trace_id.clear();
        self.trace_id.push_str(&header[3..35]);
        cx.set_request_header("traceparent", Some(header));
        Action::Continue
    }

    fn on_log(&mut self, cx: &mut Ctx<'_>) {
        // What the metrics need, in one host call; the values compared where they lie.
        let v = cx.read(&self.config.metric_properties);
        let status = v.int(0).map_or(0, |c| c as u16);
        let duration_ms = v.int(1).map_or(0, |ns| (ns / 1_000_000) as u64);
        let (route, cluster) = (v.get(2).unwrap_or_default(), v.get(3).unwrap_or_default());
        let method = std::str::from_utf8(v.get(4).unwrap_or_default()).unwrap_or("other");
        if self.config.metrics {
            let (method_l, class_l) = (method_label(method), class(status));
            let hit = self.config.last.borrow().as_ref().and_then(|l| {
                (l.route.as_bytes() == route
                    && l.cluster.as_bytes() == cluster
                    && l.method == method_l
                    && l.class == class_l)
                    .then_some(l.series)
            });
            let (count, duration) = match hit {
                Some(series) => series,
                None => {
                    let route = String::from_utf8_lossy(route).into_owned();
                    let cluster = String::from_utf8_lossy(cluster).into_owned();
                    let series = self.series(cx, &route, &cluster, method_l, class_l);
                    *self.config.last.borrow_mut() = Some(LastSeries {
                        route,
                        cluster,
                        method: method_l.to_owned(),
                        class: class_l,
                        series,
                    });
                    series
                }
            };
            if let Some(m) = count {
                cx.increment(m, 1);
            }
            if let Some(m) = duration {
                cx.record(m, duration_ms);
            }
        }
        if self.config.access_log {
            // The rest of the access log's fields.
            let [
                time,
                path,
                host,
                protocol,
                upstream,
                details,
                source,
                id,
                agent,
            ] = cx.properties([
                &["request", "time"],
                &["request", "path"],
                &["request", "host"],
                &["request", "protocol"],
                &["upstream", "address"],
                &["response", "code_details"],
                &["source", "address"],
                &["request", "id"],
                &["request", "headers", "user-agent"],
            ]);
            let text = |p: weft_sdk::Property| p.text().unwrap_or_default();
            let line = serde_json::json!({
                "start_ms": time.int().map_or(0, |ns| ns / 1_000_000),
                "method": v.text(4).unwrap_or_default(),
                "path": text(path),
                "authority": text(host),
                "protocol": text(protocol),
                "status": status,
                "duration_ms": duration_ms,
                "route": String::from_utf8_lossy(route),
                "cluster": String::from_utf8_lossy(cluster),
                "upstream": text(upstream),
                "code_details": text(details),
                "source": text(source),
                "request_id": text(id),
                "trace_id": self.trace_id,
                "parent_span_id": self.parent_span,
                "user_agent": text(agent),
            });
            cx.log(LogLevel::Info, &line.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_sdk::testing::Harness;

    fn finished(
        h: &mut Harness<Telemetry>,
        headers: &[(&str, &str)],
        status: u16,
    ) -> Option<String> {
        let mut s = h.stream();
        s.request("GET", "/items/1", headers);
        s.property("request.method", b"GET")
            .property("weft.route", b"items")
            .property("xds.cluster_name", b"catalog")
            .property("request.duration", &12_000_000i64.to_le_bytes());
        s.request_headers(true);
        s.response(status, &[]);
        s.response_headers(true);
        s.finish();
        s.request_header("traceparent")
    }

    #[test]
    fn metrics_are_labelled_by_route_cluster_method_and_class() {
        let mut h = Harness::<Telemetry>::new("").unwrap();
        finished(&mut h, &[], 200);
        finished(&mut h, &[], 204);
        finished(&mut h, &[], 503);
        // Back to a series counted before (the last-series cache must follow the change).
        finished(&mut h, &[], 200);
        let labels = |c: &str| {
            format!(r#"{{route="items",cluster="catalog",method="GET",status_class="{c}"}}"#)
        };
        assert_eq!(h.metric(&format!("requests{}", labels("2xx"))), Some(3));
        assert_eq!(h.metric(&format!("requests{}", labels("5xx"))), Some(1));
        assert_eq!(
            h.recorded(&format!("request_duration_ms{}", labels("2xx"))),
            vec![12, 12, 12]
        );
    }

    #[test]
    fn a_trace_is_continued_with_a_new_span_or_started() {
        let mut h = Harness::<Telemetry>::new("{}").unwrap();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = finished(&mut h, &[("traceparent", parent)], 200).unwrap();
        let next = TraceParent::parse(&tp).expect("valid");
        assert_eq!(
            next.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736",
            "same trace"
        );
        assert_ne!(next.span_id, "00f067aa0ba902b7", "a new span for this hop");
        assert_eq!(next.flags, "01");

        let a = TraceParent::parse(&finished(&mut h, &[], 200).unwrap()).unwrap();
        let b = TraceParent::parse(&finished(&mut h, &[("traceparent", "garbage")], 200).unwrap())
            .unwrap();
        assert_ne!(a.trace_id, b.trace_id, "new traces differ");
    }

    #[test]
    fn the_access_log_is_one_json_line_per_request() {
        let mut h = Harness::<Telemetry>::new(r#"{"metrics": false}"#).unwrap();
        finished(&mut h, &[("user-agent", "curl/8")], 404);
        let logs = h.logs();
        assert_eq!(logs.len(), 1);
        let v: serde_json::Value = serde_json::from_str(&logs[0].1).unwrap();
        assert_eq!(v["status"], 404);
        assert_eq!(v["route"], "items");
        assert_eq!(v["cluster"], "catalog");
        assert_eq!(v["duration_ms"], 12);
        assert_eq!(v["trace_id"].as_str().unwrap().len(), 32);
        assert_eq!(
            h.metric(
                r#"requests{route="items",cluster="catalog",method="GET",status_class="4xx"}"#
            ),
            None
        );
    }

    #[test]
    fn traceparent_parsing_rejects_malformed_values() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad}");
        }
    }
}
