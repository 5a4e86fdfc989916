//! The retry filter: decides, per route, whether a failed attempt is tried again; the proxy
//! executes the decision (`weft.retry`), replaying the request it kept.
//!
//! A policy says how many attempts, on which outcomes (5xx, gateway errors, resets, connect
//! failures, listed status codes, listed gRPC statuses), the per-try timeout and the
//! exponential backoff with jitter. Only idempotent methods are retried unless the policy
//! allows others. A retry budget caps retries to a fraction of requests (plus a floor per
//! second) over a sliding window, as linkerd does, so that retries cannot multiply load
//! during an outage. The route comes from the `weft.route` property the router sets;
//! requests of routes without a policy use `default`.
//!
//! Configuration reference: `filters/retry/README.md`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use serde::Deserialize;
use weft_sdk::{Action, AttemptError, Ctx, Filter};

weft_sdk::export_filter!(Retry);

/// The filter's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Policy for routes without their own (none: no retries).
    #[serde(default)]
    pub default: Option<Policy>,
    /// Policies by route name (`weft.route`).
    #[serde(default)]
    pub routes: HashMap<String, Policy>,
    /// The retry budget.
    #[serde(default)]
    pub budget: BudgetConfig,
    /// Budget accounting and jitter state of this instance.
    #[serde(skip)]
    state: RefCell<State>,
}

/// A retry policy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Attempts in all (the first one included).
    #[serde(default = "defaults::attempts")]
    pub attempts: u32,
    /// Outcomes that are retried.
    #[serde(default = "defaults::retry_on")]
    pub retry_on: Vec<RetryOn>,
    /// Status codes retried with `retriable-status-codes`.
    #[serde(default)]
    pub retriable_status_codes: Vec<u16>,
    /// gRPC statuses (`grpc-status` in the response headers) that are retried:
    /// `cancelled`, `deadline-exceeded`, `resource-exhausted`, `unavailable`, `internal`.
    #[serde(default)]
    pub retriable_grpc: Vec<String>,
    /// Bound on each attempt.
    #[serde(default)]
    pub per_try_timeout_ms: Option<u64>,
    /// Backoff between attempts.
    #[serde(default)]
    pub backoff: Backoff,
    /// Retry non-idempotent methods too (POST, PATCH, CONNECT).
    #[serde(default)]
    pub retry_non_idempotent: bool,
}

/// An outcome worth another attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// Any 5xx, the proxy's own included.
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503, 504.
    GatewayError,
    /// The connection failed or timed out before a response.
    Reset,
    /// The connection could not be made.
    ConnectFailure,
    /// A status in `retriable_status_codes`.
    RetriableStatusCodes,
}

/// Exponential backoff with jitter: attempt `n` waits a random time between half and all
/// of `min(base × 2^(n-1), max)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// First delay.
    #[serde(default = "defaults::base_ms")]
    pub base_ms: u64,
    /// Largest delay.
    #[serde(default = "defaults::max_ms")]
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base_ms: defaults::base_ms(),
            max_ms: defaults::max_ms(),
        }
    }
}

/// The retry budget: over the last `window_s` seconds, retries may be at most `ratio` of
/// the requests plus `min_per_second` per second.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Retries allowed per request.
    #[serde(default = "defaults::ratio")]
    pub ratio: f64,
    /// Retries always allowed per second.
    #[serde(default = "defaults::min_per_second")]
    pub min_per_second: u32,
    /// The window.
    #[serde(default = "defaults::window_s")]
    pub window_s: u32,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio: defaults::ratio(),
            min_per_second: defaults::min_per_second(),
            window_s: defaults::window_s(),
        }
    }
}

mod defaults {
    use super::RetryOn;
    pub fn attempts() -> u32 {
        3
    }
    pub fn retry_on() -> Vec<RetryOn> {
        vec![
            RetryOn::ConnectFailure,
            RetryOn::Reset,
            RetryOn::GatewayError,
        ]
    }
    pub fn base_ms() -> u64 {
        25
    }
    pub fn max_ms() -> u64 {
        250
    }
    pub fn ratio() -> f64 {
        0.2
    }
    pub fn min_per_second() -> u32 {
        10
    }
    pub fn window_s() -> u32 {
        10
    }
}

/// Per-second counts of requests and retries, and the jitter generator.
#[derive(Debug, Default)]
struct State {
    /// (second, requests, retries), one slot per second of the window.
    slots: Vec<(u64, u64, u64)>,
    rng: u64,
}

impl State {
    fn slot(&mut self, second: u64, window: usize) -> &mut (u64, u64, u64) {
        if self.slots.len() != window {
            self.slots = vec![(u64::MAX, 0, 0); window];
        }
        let s = &mut self.slots[(second % window as u64) as usize];
        if s.0 != second {
            *s = (second, 0, 0);
        }
        s
    }

    fn totals(&self, second: u64, window: u64) -> (u64, u64) {
        self.slots
            .iter()
            .filter(|s| s.0 != u64::MAX && second.saturating_sub(s.0) < window)
            .fold((0, 0), |(r, t), s| (r + s.1, t + s.2))
    }

    /// xorshift64*, seeded from the clock.
    fn random(&mut self, seed: u64) -> u64 {
        if self.rng == 0 {
            self.rng = seed | 1;
        }
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

const GRPC_CODES: &[(&str, &str)] = &[
    ("cancelled", "1"),
    ("deadline-exceeded", "4"),
    ("resource-exhausted", "8"),
    ("internal", "13"),
    ("unavailable", "14"),
];

impl Config {
    fn check(&self) -> Result<(), String> {
        let all = self
            .default
            .iter()
            .map(|p| ("default".to_owned(), p))
            .chain(self.routes.iter().map(|(k, p)| (format!("routes.{k}"), p)));
        for (at, p) in all {
            if p.attempts == 0 || p.attempts > 10 {
                return Err(format!("{at}.attempts: between 1 and 10"));
            }
            if p.backoff.base_ms > p.backoff.max_ms {
                return Err(format!("{at}.backoff: base_ms is above max_ms"));
            }
            for g in &p.retriable_grpc {
                if !GRPC_CODES.iter().any(|(name, _)| name == g) {
                    return Err(format!("{at}.retriable_grpc: unknown gRPC status `{g}`"));
                }
            }
        }
        if !(0.0..=10.0).contains(&self.budget.ratio) || self.budget.window_s == 0 {
            return Err("budget: ratio within 0..10 and window_s at least 1".into());
        }
        Ok(())
    }

    fn second(cx: &Ctx<'_>) -> u64 {
        cx.now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    /// Counts a request into the budget.
    fn deposit(&self, cx: &Ctx<'_>) {
        let window = self.budget.window_s as usize;
        self.state.borrow_mut().slot(Self::second(cx), window).1 += 1;
    }

    /// Takes one retry from the budget, if any is left.
    fn withdraw(&self, cx: &Ctx<'_>) -> bool {
        let b = &self.budget;
        let second = Self::second(cx);
        let mut state = self.state.borrow_mut();
        let (requests, retries) = state.totals(second, u64::from(b.window_s));
        let allowed = b.ratio * requests as f64 + f64::from(b.min_per_second * b.window_s);
        if retries as f64 + 1.0 > allowed {
            return false;
        }
        state.slot(second, b.window_s as usize).2 += 1;
        true
    }
}

impl Policy {
    /// Whether the outcome is retried; `grpc` reads the response's `grpc-status`, asked
    /// only when the policy retries some gRPC statuses.
    fn wants(
        &self,
        status: u16,
        error: AttemptError,
        grpc: impl FnOnce() -> Option<String>,
    ) -> bool {
        let is = |r: RetryOn| self.retry_on.contains(&r);
        (is(RetryOn::FiveXx) && status >= 500)
            || (is(RetryOn::GatewayError) && matches!(status, 502..=504))
            || (is(RetryOn::Reset) && matches!(error, AttemptError::Reset | AttemptError::Timeout))
            || (is(RetryOn::ConnectFailure) && error == AttemptError::ConnectFailure)
            || (is(RetryOn::RetriableStatusCodes) && self.retriable_status_codes.contains(&status))
            || (!self.retriable_grpc.is_empty()
                && grpc().is_some_and(|code| {
                    self.retriable_grpc
                        .iter()
                        .any(|name| GRPC_CODES.iter().any(|(n, c)| n == name && *c == code))
                }))
    }
}

fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
    )
}

/// The retry filter's per-stream state.
pub struct Retry {
    config: Rc<Config>,
    /// The policy of this request's route, when retries apply to it.
    policy: Option<String>,
}

impl Retry {
    fn policy(&self) -> Option<&Policy> {
        match self.policy.as_deref()? {
            "" => self.config.default.as_ref(),
            route => self.config.routes.get(route),
        }
    }

    /// Judges the response of an attempt: whether another attempt was asked for.
    fn retried(&mut self, cx: &mut Ctx<'_>) -> bool {
        let Some(policy) = self.policy() else {
            return false;
        };
        let Some(attempt) = cx.attempt() else {
            return false;
        };
        if !policy.wants(attempt.status, attempt.error, || {
            cx.response_header("grpc-status")
        }) {
            return false;
        }
        if !self.config.withdraw(cx) {
            if let Some(m) = cx.counter("retry_budget_exhausted") {
                cx.increment(m, 1);
            }
            return false;
        }
        let b = &policy.backoff;
        let exp = b
            .base_ms
            .saturating_mul(1u64 << attempt.number.saturating_sub(1).min(20))
            .min(b.max_ms);
        let seed = cx
            .now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let r = self.config.state.borrow_mut().random(seed);
        let delay = exp / 2 + if exp > 1 { r % (exp / 2 + 1) } else { 0 };
        if cx.retry(Duration::from_millis(delay), true).is_err() {
            return false;
        }
        if let Some(m) = cx.counter("retries") {
            cx.increment(m, 1);
        }
        true
    }
}

impl Filter for Retry {
    type Config = Config;

    fn validate(config: &Config) -> Result<(), String> {
        config.check()
    }

    fn new(config: &Rc<Config>) -> Self {
        Retry {
            config: config.clone(),
            policy: None,
        }
    }

    fn on_request_headers(&mut self, cx: &mut Ctx<'_>, _end_of_stream: bool) -> Action {
        self.config.deposit(cx);
        // The route is read only when some route has a policy of its own.
        let key = (!self.config.routes.is_empty())
            .then(|| cx.property(&["weft", "route"]).unwrap_or_default())
            .filter(|route| self.config.routes.contains_key(route))
            .unwrap_or_default();
        self.policy = Some(key);
        // No policy for this request: the response has nothing to retry.
        let Some(policy) = self.policy() else {
            self.policy = None;
            let _ = cx.done_with_stream();
            return Action::Continue;
        };
        if !policy.retry_non_idempotent && !idempotent(&cx.method()) {
            self.policy = None;
            let _ = cx.done_with_stream();
            return Action::Continue;
        }
        let (attempts, per_try) = (policy.attempts, policy.per_try_timeout_ms);
        if attempts > 1 && cx.set_attempts(attempts).is_err() {
            self.policy = None; // not on Weft: nothing to do
        }
        if let Some(ms) = per_try {
            let _ = cx.set_try_timeout(Duration::from_millis(ms));
        }
        Action::Continue
    }

    fn on_response_headers(&mut self, cx: &mut Ctx<'_>, _end_of_stream: bool) -> Action {
        // A response this filter does not retry is the stream's last as far as it goes
        // (a retry another filter asks for later is not judged here): nothing more to do.
        if !self.retried(cx) {
            let _ = cx.done_with_stream();
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_sdk::Attempt;
    use weft_sdk::testing::{Harness, TestStream};

    fn failed(number: u32, status: u16, error: AttemptError) -> Attempt {
        Attempt {
            number,
            status,
            error,
        }
    }

    /// Runs one request through the filter and returns the stream after one response.
    fn run(
        h: &mut Harness<Retry>,
        method: &str,
        route: Option<&str>,
        attempt: Attempt,
        headers: &[(&str, &str)],
    ) -> TestStream<Retry> {
        let mut s = h.stream();
        s.request(method, "/", &[("host", "svc")]);
        if let Some(r) = route {
            s.property("weft.route", r.as_bytes());
        }
        s.request_headers(true);
        s.response(attempt.status, headers).attempt(attempt, true);
        s.response_headers(true);
        s
    }

    #[test]
    fn failures_the_policy_names_are_retried_others_are_not() {
        let mut h = Harness::<Retry>::new(
            r#"{"default": {"attempts": 3, "retry_on": ["connect-failure", "gateway-error"],
                            "per_try_timeout_ms": 300, "retriable_grpc": ["unavailable"]}}"#,
        )
        .unwrap();
        let s = run(
            &mut h,
            "GET",
            None,
            failed(1, 503, AttemptError::ConnectFailure),
            &[],
        );
        assert_eq!(s.routing().attempts, Some(3));
        assert_eq!(s.routing().try_timeout, Some(Duration::from_millis(300)));
        assert!(s.routing().retry.is_some(), "connect failure");
        assert!(
            !s.routing().done,
            "the next attempt's response is still to judge"
        );
        let s = run(&mut h, "GET", None, failed(1, 502, AttemptError::None), &[]);
        assert!(s.routing().retry.is_some(), "gateway error");
        let s = run(&mut h, "GET", None, failed(1, 500, AttemptError::None), &[]);
        assert!(s.routing().retry.is_none(), "500 is not a gateway error");
        assert!(s.routing().done, "a response not retried is the last: done");
        let s = run(&mut h, "GET", None, failed(1, 404, AttemptError::None), &[]);
        assert!(s.routing().retry.is_none());
        assert!(s.routing().done);
        let s = run(
            &mut h,
            "GET",
            None,
            failed(1, 200, AttemptError::None),
            &[("grpc-status", "14")],
        );
        assert!(s.routing().retry.is_some(), "gRPC unavailable");
        assert_eq!(h.metric("retries"), Some(3));
    }

    #[test]
    fn non_idempotent_requests_are_not_retried_unless_allowed() {
        let mut h = Harness::<Retry>::new(
            r#"{"default": {"retry_on": ["5xx"]},
                "routes": {"orders": {"retry_on": ["5xx"], "retry_non_idempotent": true}}}"#,
        )
        .unwrap();
        let s = run(
            &mut h,
            "POST",
            None,
            failed(1, 503, AttemptError::None),
            &[],
        );
        assert_eq!(
            s.routing().attempts,
            None,
            "the proxy is not asked to keep the request"
        );
        assert!(s.routing().retry.is_none());
        assert!(s.routing().done, "nothing to retry: done with the stream");
        let s = run(
            &mut h,
            "POST",
            Some("orders"),
            failed(1, 503, AttemptError::None),
            &[],
        );
        assert!(s.routing().retry.is_some(), "allowed for this route");
        assert!(!s.routing().done, "its response is still to be judged");
        let s = run(&mut h, "PUT", None, failed(1, 503, AttemptError::None), &[]);
        assert!(s.routing().retry.is_some(), "PUT is idempotent");
    }

    #[test]
    fn the_budget_caps_retries_to_a_fraction_of_requests() {
        let mut h = Harness::<Retry>::new(
            r#"{"default": {"retry_on": ["5xx"]},
                "budget": {"ratio": 0.1, "min_per_second": 0, "window_s": 10}}"#,
        )
        .unwrap();
        let mut retried = 0;
        for _ in 0..200 {
            let s = run(&mut h, "GET", None, failed(1, 503, AttemptError::None), &[]);
            retried += usize::from(s.routing().retry.is_some());
        }
        assert_eq!(retried, 20, "10% of 200 requests");
        assert_eq!(h.metric("retry_budget_exhausted"), Some(180));
        // The window moves on: old requests stop counting, and retries come back with new
        // requests.
        h.advance(Duration::from_secs(11));
        let s = run(&mut h, "GET", None, failed(1, 503, AttemptError::None), &[]);
        assert!(s.routing().retry.is_none(), "1 request: 0.1 retry");
        for _ in 0..9 {
            run(&mut h, "GET", None, failed(1, 200, AttemptError::None), &[]);
        }
        let s = run(&mut h, "GET", None, failed(1, 503, AttemptError::None), &[]);
        assert!(s.routing().retry.is_some(), "11 requests: 1.1 retries");
    }

    #[test]
    fn backoff_grows_exponentially_with_jitter_up_to_the_cap() {
        let mut h = Harness::<Retry>::new(
            r#"{"default": {"attempts": 10, "retry_on": ["5xx"], "backoff": {"base_ms": 10, "max_ms": 80}}}"#,
        )
        .unwrap();
        for (n, (lo, hi)) in [(1, (5, 10)), (2, (10, 20)), (3, (20, 40)), (5, (40, 80))] {
            for _ in 0..20 {
                let s = run(&mut h, "GET", None, failed(n, 503, AttemptError::None), &[]);
                let (delay, others) = s.routing().retry.expect("retried");
                let ms = delay.as_millis() as u64;
                assert!((lo..=hi).contains(&ms), "attempt {n}: {ms} ms");
                assert!(others, "other endpoints first");
            }
        }
    }

    #[test]
    fn bad_policies_are_refused() {
        let err = |c: &str| Harness::<Retry>::new(c).err().unwrap_or_default();
        assert!(err(r#"{"default": {"attempts": 0}}"#).contains("default.attempts"));
        assert!(err(r#"{"default": {"retry_on": ["sometimes"]}}"#).contains("unknown variant"));
        assert!(
            err(r#"{"routes": {"a": {"retriable_grpc": ["weird"]}}}"#)
                .contains("routes.a.retriable_grpc: unknown gRPC status `weird`")
        );
    }
}
