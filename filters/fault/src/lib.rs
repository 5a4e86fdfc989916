//! The fault filter: injects delays and aborts into a share of requests, per route (the
//! router's `weft.route` property) or per request header, to test how a mesh behaves
//! when things go wrong — as Envoy's fault filter does.
//!
//! An abort answers locally with an HTTP status, or with a gRPC status for gRPC requests
//! (`content-type: application/grpc`). A delay holds the request before it goes upstream
//! (`weft.delay`); at most `max_active_delays` requests per worker are delayed at once, so a
//! fault cannot pile up unbounded work. When a request is picked for both, it is aborted.
//!
//! Configuration reference: `filters/fault/README.md`.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use serde::Deserialize;
use weft_sdk::{Action, Ctx, Filter};

weft_sdk::export_filter!(Fault);

/// The filter's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Faults for requests whose route has none.
    #[serde(default)]
    pub default: Option<Faults>,
    /// Faults by route name (`weft.route`).
    #[serde(default)]
    pub routes: HashMap<String, Faults>,
    /// Honour the request headers `x-weft-fault-delay-ms`, `x-weft-fault-abort` (an HTTP
    /// status) and `x-weft-fault-abort-grpc` (a gRPC status): for tests, off by default.
    #[serde(default)]
    pub headers: bool,
    /// Most requests delayed at once on a worker.
    #[serde(default = "default_max_active")]
    pub max_active_delays: u32,
    #[serde(skip)]
    active: Cell<u32>,
    #[serde(skip)]
    rng: Cell<u64>,
}

fn default_max_active() -> u32 {
    100
}

/// The faults of a route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Delay a share of requests.
    #[serde(default)]
    pub delay: Option<Delay>,
    /// Abort a share of requests.
    #[serde(default)]
    pub abort: Option<Abort>,
}

/// A delay fault.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delay {
    /// Share of requests, 0–100.
    pub percent: f64,
    /// How long.
    pub ms: u64,
}

/// An abort fault: `status` for HTTP requests, `grpc_status` (if given) for gRPC ones.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Abort {
    /// Share of requests, 0–100.
    pub percent: f64,
    /// HTTP status.
    #[serde(default = "default_status")]
    pub status: u16,
    /// gRPC status for gRPC requests.
    #[serde(default)]
    pub grpc_status: Option<u32>,
}

fn default_status() -> u16 {
    503
}

impl Config {
    fn check(&self) -> Result<(), String> {
        let all = self
            .default
            .iter()
            .map(|f| ("default".to_owned(), f))
            .chain(self.routes.iter().map(|(k, f)| (format!("routes.{k}"), f)));
        for (at, f) in all {
            let percents = [
                f.delay.as_ref().map(|d| d.percent),
                f.abort.as_ref().map(|a| a.percent),
            ];
            if percents
                .into_iter()
                .flatten()
                .any(|p| !(0.0..=100.0).contains(&p))
            {
                return Err(format!("{at}: percent must be within 0..=100"));
            }
            if let Some(a) = &f.abort
                && !(200..=599).contains(&a.status)
            {
                return Err(format!(
                    "{at}.abort.status: {} is not an HTTP status",
                    a.status
                ));
            }
        }
        Ok(())
    }

    /// True for `percent` % of the calls (xorshift64*, seeded from the clock).
    fn roll(&self, cx: &Ctx<'_>, percent: f64) -> bool {
        if percent <= 0.0 {
            return false;
        }
        let mut x = self.rng.get();
        if x == 0 {
            x = cx
                .now()
                .duration_since(UNIX_EPOCH)
                .map_or(0x9E37_79B9, |d| d.as_nanos() as u64)
                | 1;
        }
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11; // 53 random bits
        (r as f64 / (1u64 << 53) as f64) * 100.0 < percent
    }
}

/// The fault filter's per-stream state.
pub struct Fault {
    config: Rc<Config>,
    /// This stream holds one of the worker's delay slots.
    delayed: bool,
}

impl Fault {
    fn abort(cx: &mut Ctx<'_>, status: u16, grpc: Option<u32>) -> Action {
        let is_grpc = cx
            .request_header("content-type")
            .is_some_and(|c| c.starts_with("application/grpc"));
        match grpc {
            Some(code) if is_grpc => {
                let code = code.to_string();
                cx.send_response(
                    200,
                    &[
                        ("content-type", "application/grpc"),
                        ("grpc-status", &code),
                        ("grpc-message", "fault filter abort"),
                    ],
                    b"",
                );
            }
            _ => cx.send_response(
                status,
                &[("content-type", "text/plain")],
                b"fault filter abort\n",
            ),
        }
        if let Some(m) = cx.counter("fault_aborts") {
            cx.increment(m, 1);
        }
        Action::Pause
    }

    fn delay(&mut self, cx: &mut Ctx<'_>, ms: u64) {
        let c = &self.config;
        if c.active.get() >= c.max_active_delays {
            if let Some(m) = cx.counter("fault_delays_skipped") {
                cx.increment(m, 1);
            }
            return;
        }
        if cx.delay(Duration::from_millis(ms)).is_ok() {
            c.active.set(c.active.get() + 1);
            self.delayed = true;
            if let Some(m) = cx.counter("fault_delays") {
                cx.increment(m, 1);
            }
        }
    }
}

impl Filter for Fault {
    type Config = Config;

    fn validate(config: &Config) -> Result<(), String> {
        config.check()
    }

    fn new(config: &Rc<Config>) -> Self {
        Fault {
            config: config.clone(),
            delayed: false,
        }
    }

    fn on_request_headers(&mut self, cx: &mut Ctx<'_>, _end_of_stream: bool) -> Action {
        let config = self.config.clone();
        if config.headers {
            let grpc = cx
                .request_header("x-weft-fault-abort-grpc")
                .and_then(|v| v.parse().ok());
            let status = cx
                .request_header("x-weft-fault-abort")
                .and_then(|v| v.parse::<u16>().ok())
                .filter(|s| (200..=599).contains(s));
            if status.is_some() || grpc.is_some() {
                return Self::abort(cx, status.unwrap_or(503), grpc);
            }
            if let Some(ms) = cx
                .request_header("x-weft-fault-delay-ms")
                .and_then(|v| v.parse().ok())
            {
                self.delay(cx, ms);
                return Action::Continue;
            }
        }
        // The route is read only when some route has faults of its own.
        let for_route = (!config.routes.is_empty())
            .then(|| cx.property(&["weft", "route"]).unwrap_or_default())
            .and_then(|route| config.routes.get(&route));
        let Some(faults) = for_route.or(config.default.as_ref()) else {
            let _ = cx.done_with_stream();
            return Action::Continue;
        };
        if let Some(a) = &faults.abort
            && config.roll(cx, a.percent)
        {
            return Self::abort(cx, a.status, a.grpc_status);
        }
        if let Some(d) = &faults.delay
            && config.roll(cx, d.percent)
        {
            self.delay(cx, d.ms);
        }
        // Not delayed: `on_log` has no active delay to count down.
        if !self.delayed {
            let _ = cx.done_with_stream();
        }
        Action::Continue
    }

    fn on_log(&mut self, _cx: &mut Ctx<'_>) {
        if std::mem::take(&mut self.delayed) {
            let c = &self.config;
            c.active.set(c.active.get().saturating_sub(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_sdk::testing::Harness;

    #[test]
    fn percentages_hold_over_many_requests() {
        let mut h = Harness::<Fault>::new(
            r#"{"default": {"delay": {"percent": 10, "ms": 50}, "abort": {"percent": 20, "status": 502}},
                "max_active_delays": 100000}"#,
        )
        .unwrap();
        let (mut delayed, mut aborted) = (0, 0);
        for _ in 0..10_000 {
            let mut s = h.stream();
            s.request("GET", "/", &[]);
            if s.request_headers(true) == Action::Pause {
                assert_eq!(s.local_response().unwrap().status, 502);
                aborted += 1;
            } else if s.routing().delay == Some(Duration::from_millis(50)) {
                delayed += 1;
            }
            s.finish();
        }
        // 20% aborted; of the other 80%, 10% delayed (8% of all).
        assert!((1800..=2200).contains(&aborted), "aborted {aborted}");
        assert!((650..=950).contains(&delayed), "delayed {delayed}");
        assert_eq!(h.metric("fault_aborts"), Some(aborted));
    }

    #[test]
    fn a_route_with_faults_of_its_own_gets_them_and_others_the_default() {
        let mut h = Harness::<Fault>::new(
            r#"{"default": {"delay": {"percent": 100, "ms": 5}},
                "routes": {"orders": {"abort": {"percent": 100, "status": 418}}}}"#,
        )
        .unwrap();
        let mut s = h.stream();
        s.request("GET", "/", &[]).property("weft.route", b"orders");
        assert_eq!(s.request_headers(true), Action::Pause);
        assert_eq!(s.local_response().unwrap().status, 418);
        for route in [&b"catalog"[..], b""] {
            let mut s = h.stream();
            s.request("GET", "/", &[]).property("weft.route", route);
            assert_eq!(s.request_headers(true), Action::Continue);
            assert_eq!(s.routing().delay, Some(Duration::from_millis(5)));
            assert!(s.local_response().is_none());
        }
    }

    #[test]
    fn grpc_requests_get_a_grpc_status() {
        let mut h = Harness::<Fault>::new(
            r#"{"default": {"abort": {"percent": 100, "status": 503, "grpc_status": 14}}}"#,
        )
        .unwrap();
        let mut s = h.stream();
        s.request(
            "POST",
            "/svc/Method",
            &[("content-type", "application/grpc")],
        );
        assert_eq!(s.request_headers(false), Action::Pause);
        let r = s.local_response().unwrap();
        assert_eq!(r.status, 200);
        assert!(r.headers.contains(&("grpc-status".into(), "14".into())));
        let mut s = h.stream();
        s.request("GET", "/", &[]);
        s.request_headers(true);
        assert_eq!(
            s.local_response().unwrap().status,
            503,
            "plain HTTP gets the status"
        );
    }

    #[test]
    fn header_faults_apply_only_when_enabled() {
        let mut on = Harness::<Fault>::new(r#"{"headers": true}"#).unwrap();
        let mut s = on.stream();
        s.request("GET", "/", &[("x-weft-fault-abort", "418")]);
        assert_eq!(s.request_headers(true), Action::Pause);
        assert_eq!(s.local_response().unwrap().status, 418);
        let mut s = on.stream();
        s.request("GET", "/", &[("x-weft-fault-delay-ms", "250")]);
        assert_eq!(s.request_headers(true), Action::Continue);
        assert_eq!(s.routing().delay, Some(Duration::from_millis(250)));

        let mut off = Harness::<Fault>::new("{}").unwrap();
        let mut s = off.stream();
        s.request("GET", "/", &[("x-weft-fault-abort", "418")]);
        assert_eq!(s.request_headers(true), Action::Continue);
        assert!(s.local_response().is_none());
    }

    #[test]
    fn concurrent_delays_are_capped_per_worker() {
        let mut h = Harness::<Fault>::new(
            r#"{"default": {"delay": {"percent": 100, "ms": 1000}}, "max_active_delays": 3}"#,
        )
        .unwrap();
        let mut streams: Vec<_> = (0..5)
            .map(|_| {
                let mut s = h.stream();
                s.request("GET", "/", &[]);
                s.request_headers(true);
                s
            })
            .collect();
        let delayed = streams
            .iter()
            .filter(|s| s.routing().delay.is_some())
            .count();
        assert_eq!(delayed, 3);
        assert_eq!(h.metric("fault_delays_skipped"), Some(2));
        // A delayed stream ending frees its slot.
        streams[0].finish();
        let mut s = h.stream();
        s.request("GET", "/", &[]);
        s.request_headers(true);
        assert!(s.routing().delay.is_some());
    }

    #[test]
    fn a_stream_without_a_delay_to_count_down_is_done_after_its_request_head() {
        let mut h = Harness::<Fault>::new(
            r#"{"default": {"delay": {"percent": 100, "ms": 10}}, "max_active_delays": 1}"#,
        )
        .unwrap();
        // Delayed: its `on_log` counts the delay down, so it is not done.
        let mut delayed = h.stream();
        delayed.request("GET", "/", &[]);
        delayed.request_headers(true);
        assert!(delayed.routing().delay.is_some());
        assert!(!delayed.routing().done);
        // Over the cap: not delayed, nothing left to do.
        let mut s = h.stream();
        s.request("GET", "/", &[]);
        s.request_headers(true);
        assert!(s.routing().delay.is_none());
        assert!(s.routing().done);
        // No fault configured for the stream at all: done too.
        let mut none = Harness::<Fault>::new("{}").unwrap();
        let mut s = none.stream();
        s.request("GET", "/", &[]);
        s.request_headers(true);
        assert!(s.routing().done);
    }

    #[test]
    fn bad_faults_are_refused() {
        let err = |c: &str| Harness::<Fault>::new(c).err().unwrap_or_default();
        assert!(err(r#"{"default": {"abort": {"percent": 150}}}"#).contains("within 0..=100"));
        assert!(
            err(r#"{"default": {"abort": {"percent": 5, "status": 42}}}"#)
                .contains("42 is not an HTTP status")
        );
    }
}
