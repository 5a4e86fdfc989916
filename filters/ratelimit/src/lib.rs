//! The local rate limit filter: token buckets per route and per key (a request header, the
//! source address, or one bucket for all), shared by all workers of the proxy through
//! proxy-wasm shared data with compare-and-swap. A request finding its bucket empty gets
//! 429 with `retry-after` (seconds until a token is back).
//!
//! Configuration reference: `filters/ratelimit/README.md`.

use std::rc::Rc;
use std::time::UNIX_EPOCH;

use serde::Deserialize;
use weft_sdk::{Action, Ctx, Filter, LogLevel, Status};

weft_sdk::export_filter!(RateLimit);

/// The filter's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Rules; every rule that applies to a request takes a token from its bucket.
    pub rules: Vec<Rule>,
}

/// One limit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Name (the `x-weft-ratelimit` header of a 429, metrics).
    pub name: String,
    /// Only requests of this route (`weft.route`); all requests when absent.
    #[serde(default)]
    pub route: Option<String>,
    /// What separates buckets.
    #[serde(default)]
    pub key: Key,
    /// Tokens added per second.
    pub rate_per_second: f64,
    /// Bucket size (the burst allowed).
    pub burst: u32,
}

/// What separates buckets.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Key {
    /// One bucket for all requests of the rule.
    #[default]
    Global,
    /// One bucket per value of this request header (requests without it share one).
    Header(String),
    /// One bucket per client IP address.
    SourceAddress,
}

impl Config {
    fn check(&self) -> Result<(), String> {
        for (i, r) in self.rules.iter().enumerate() {
            if r.rate_per_second.is_nan() || r.rate_per_second <= 0.0 || r.burst == 0 {
                return Err(format!(
                    "rules[{i}]: rate_per_second and burst must be above 0"
                ));
            }
            if r.name.is_empty() || r.name.contains('/') {
                return Err(format!("rules[{i}].name: non-empty, without `/`"));
            }
        }
        Ok(())
    }
}

/// A bucket as stored in shared data: tokens (in millitokens) and the time they were
/// counted at (ms since the Unix epoch).
fn decode(v: &[u8]) -> Option<(u64, u64)> {
    let tokens = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let at = u64::from_le_bytes(v.get(8..16)?.try_into().ok()?);
    Some((tokens, at))
}

fn encode(tokens: u64, at: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&tokens.to_le_bytes());
    out[8..].copy_from_slice(&at.to_le_bytes());
    out
}

/// Takes a token from the bucket `key`: `Ok(())`, or `Err(seconds)` until one is back.
fn take(cx: &mut Ctx<'_>, key: &str, rule: &Rule) -> Result<(), u64> {
    let now = cx
        .now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let burst = u64::from(rule.burst) * 1000;
    // Compare-and-swap against the other workers; a lost race is tried again.
    for _ in 0..16 {
        let (value, cas) = cx.shared_data(key);
        let (tokens, at) = value.as_deref().and_then(decode).unwrap_or((burst, now));
        let refill = (now.saturating_sub(at) as f64 * rule.rate_per_second) as u64;
        let tokens = tokens.saturating_add(refill).min(burst);
        if tokens < 1000 {
            let missing = (1000 - tokens) as f64 / 1000.0;
            return Err((missing / rule.rate_per_second).ceil().max(1.0) as u64);
        }
        match cx.set_shared_data(key, &encode(tokens - 1000, now), cas.or(Some(0))) {
            Ok(()) => return Ok(()),
            Err(Status::CasMismatch) => continue,
            Err(e) => {
                cx.log(LogLevel::Warn, &format!("rate limit bucket {key}: {e}"));
                return Ok(()); // fail open: a broken store must not stop traffic
            }
        }
    }
    Ok(())
}

/// The rate limit filter's per-stream state.
pub struct RateLimit {
    config: Rc<Config>,
}

impl Filter for RateLimit {
    type Config = Config;

    fn validate(config: &Config) -> Result<(), String> {
        config.check()
    }

    fn new(config: &Rc<Config>) -> Self {
        RateLimit {
            config: config.clone(),
        }
    }

    fn on_request_headers(&mut self, cx: &mut Ctx<'_>, _end_of_stream: bool) -> Action {
        let config = self.config.clone();
        let route = cx.property(&["weft", "route"]).unwrap_or_default();
        for rule in &config.rules {
            if rule.route.as_ref().is_some_and(|r| *r != route) {
                continue;
            }
            let key = match &rule.key {
                Key::Global => String::new(),
                Key::Header(h) => cx.request_header(h).unwrap_or_default(),
                Key::SourceAddress => {
                    let a = cx.property(&["source", "address"]).unwrap_or_default();
                    // `ip:port` or `[v6]:port`: the IP.
                    a.rsplit_once(':')
                        .map_or(a.clone(), |(ip, _)| ip.to_owned())
                }
            };
            let bucket = format!("weft.ratelimit/{}/{key}", rule.name);
            if let Err(wait) = take(cx, &bucket, rule) {
                if let Some(m) = cx.counter(&format!(r#"ratelimited{{rule="{}"}}"#, rule.name)) {
                    cx.increment(m, 1);
                }
                let wait = wait.to_string();
                cx.send_response(
                    429,
                    &[
                        ("retry-after", &wait),
                        ("x-weft-ratelimit", &rule.name),
                        ("content-type", "text/plain"),
                    ],
                    b"rate limited\n",
                );
                return Action::Pause;
            }
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use weft_sdk::testing::Harness;

    fn status(h: &mut Harness<RateLimit>, headers: &[(&str, &str)], source: &str) -> u16 {
        let mut s = h.stream();
        s.request("GET", "/", headers)
            .property("source.address", source.as_bytes());
        match s.request_headers(true) {
            Action::Continue => 200,
            Action::Pause => s.local_response().unwrap().status,
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let mut h = Harness::<RateLimit>::new(
            r#"{"rules": [{"name": "all", "rate_per_second": 2, "burst": 3}]}"#,
        )
        .unwrap();
        let got: Vec<u16> = (0..5).map(|_| status(&mut h, &[], "1.2.3.4:5")).collect();
        assert_eq!(got, [200, 200, 200, 429, 429]);
        let mut s = h.stream();
        s.request("GET", "/", &[]);
        s.request_headers(true);
        let r = s.local_response().unwrap();
        assert!(
            r.headers.contains(&("retry-after".into(), "1".into())),
            "{r:?}"
        );
        assert!(
            r.headers
                .contains(&("x-weft-ratelimit".into(), "all".into()))
        );
        // Half a second: one token back (2 per second).
        h.advance(Duration::from_millis(500));
        assert_eq!(status(&mut h, &[], "1.2.3.4:5"), 200);
        assert_eq!(status(&mut h, &[], "1.2.3.4:5"), 429);
        // Long idle: back to the burst, not more.
        h.advance(Duration::from_secs(60));
        let got: Vec<u16> = (0..4).map(|_| status(&mut h, &[], "1.2.3.4:5")).collect();
        assert_eq!(got, [200, 200, 200, 429]);
        assert_eq!(h.metric(r#"ratelimited{rule="all"}"#), Some(5));
    }

    #[test]
    fn keys_separate_buckets() {
        let mut h = Harness::<RateLimit>::new(
            r#"{"rules": [
                {"name": "user", "key": {"header": "x-user"}, "rate_per_second": 0.001, "burst": 1},
                {"name": "ip", "key": "source_address", "rate_per_second": 0.001, "burst": 2}
            ]}"#,
        )
        .unwrap();
        assert_eq!(status(&mut h, &[("x-user", "a")], "10.0.0.1:1"), 200);
        assert_eq!(
            status(&mut h, &[("x-user", "a")], "10.0.0.2:1"),
            429,
            "user a is out"
        );
        assert_eq!(
            status(&mut h, &[("x-user", "b")], "10.0.0.1:2"),
            200,
            "user b has its own"
        );
        // 10.0.0.1 has used its 2 (any port): the ip rule stops it.
        assert_eq!(status(&mut h, &[("x-user", "c")], "10.0.0.1:3"), 429);
    }

    #[test]
    fn bad_rules_are_refused() {
        let err = |c: &str| Harness::<RateLimit>::new(c).err().unwrap_or_default();
        assert!(
            err(r#"{"rules": [{"name": "a", "rate_per_second": 0, "burst": 1}]}"#)
                .contains("must be above 0")
        );
        assert!(err(r#"{"rules": [{"name": "a", "key": {"cookie": "x"}, "rate_per_second": 1, "burst": 1}]}"#)
            .contains("unknown variant `cookie`"));
    }
}
