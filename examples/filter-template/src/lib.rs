//! A starting point for a Weft filter: adds a configured header to every request, answers
//! `403` to requests missing a required header, and (optionally) asks another service
//! whether each request may pass, waiting for its answer: a callout.

use std::rc::Rc;
use std::time::Duration;

use serde::Deserialize;
use weft_sdk::{Action, Ctx, Filter};

weft_sdk::export_filter!(Template);

/// The configuration (`config:` of the filter in the proxy's YAML).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Header added to every request going upstream.
    pub add_header: (String, String),
    /// Requests without this header get 403.
    #[serde(default)]
    pub require_header: Option<String>,
    /// Ask this cluster about each request, as Envoy's HTTP external authorization does: a
    /// `GET` of `check_path_prefix` + the request's path, with its method and path also in
    /// `x-check-method` / `x-check-path`. A 2xx answer lets the request pass, any other
    /// answer gets 403, no answer within `check_timeout_ms` gets 503.
    #[serde(default)]
    pub check_cluster: Option<String>,
    /// Put before the request's path in the check's path (default none).
    #[serde(default)]
    pub check_path_prefix: String,
    /// How long to wait for the check (default 1000 ms).
    #[serde(default = "default_check_timeout")]
    pub check_timeout_ms: u64,
}

fn default_check_timeout() -> u64 {
    1000
}

/// One stream's state.
pub struct Template {
    config: Rc<Config>,
    /// The check this stream waits for.
    check: Option<u32>,
}

impl Filter for Template {
    type Config = Config;

    fn validate(config: &Config) -> Result<(), String> {
        if config.add_header.0.is_empty() {
            return Err("add_header: the header name is empty".into());
        }
        Ok(())
    }

    fn new(config: &Rc<Config>) -> Self {
        Template {
            config: config.clone(),
            check: None,
        }
    }

    fn on_request_headers(&mut self, cx: &mut Ctx<'_>, _end_of_stream: bool) -> Action {
        if let Some(required) = &self.config.require_header
            && cx.request_header(required).is_none()
        {
            cx.send_response(403, &[("content-type", "text/plain")], b"missing header\n");
            return Action::Pause;
        }
        let (name, value) = &self.config.add_header;
        cx.set_request_header(name, Some(value));
        let Some(cluster) = &self.config.check_cluster else {
            return Action::Continue;
        };
        let (path, method) = (cx.path(), cx.method());
        let check_path = format!("{}{path}", self.config.check_path_prefix);
        let headers = [
            (":method", "GET"),
            (":path", check_path.as_str()),
            (":authority", cluster.as_str()),
            ("x-check-path", path.as_str()),
            ("x-check-method", method.as_str()),
        ];
        let timeout = Duration::from_millis(self.config.check_timeout_ms);
        match cx.dispatch_call(cluster, &headers, None, timeout) {
            Ok(token) => {
                self.check = Some(token);
                Action::Pause
            }
            Err(e) => {
                let body = format!("check not sent: {e}\n");
                cx.send_response(503, &[("content-type", "text/plain")], body.as_bytes());
                Action::Pause
            }
        }
    }

    fn on_call_response(&mut self, cx: &mut Ctx<'_>, token: u32, status: Option<u16>) {
        if self.check != Some(token) {
            return;
        }
        self.check = None;
        match status {
            Some(200..=299) => cx.resume_request(),
            Some(_) => cx.send_response(403, &[("content-type", "text/plain")], b"denied\n"),
            None => cx.send_response(503, &[("content-type", "text/plain")], b"no check\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_sdk::testing::Harness;

    #[test]
    fn adds_the_header_and_enforces_the_required_one() {
        let mut h = Harness::<Template>::new(
            r#"{"add_header": ["x-team", "payments"], "require_header": "authorization"}"#,
        )
        .unwrap();

        let mut s = h.stream();
        s.request("GET", "/", &[("authorization", "Bearer t")]);
        assert_eq!(s.request_headers(true), Action::Continue);
        assert_eq!(s.request_header("x-team").as_deref(), Some("payments"));

        let mut s = h.stream();
        s.request("GET", "/", &[]);
        assert_eq!(s.request_headers(true), Action::Pause);
        assert_eq!(s.local_response().unwrap().status, 403);
    }

    #[test]
    fn the_check_decides_whether_a_request_passes() {
        let config = r#"{"add_header": ["x-team", "payments"], "check_cluster": "auth"}"#;
        let mut h = Harness::<Template>::new(config)
            .unwrap()
            .with_clusters(&["auth"]);
        for (answer, passes, status) in [
            (Some(204), true, None),
            (Some(401), false, Some(403)),
            (None, false, Some(503)),
        ] {
            let mut s = h.stream();
            s.request("POST", "/pay", &[]);
            assert_eq!(
                s.request_headers(true),
                Action::Pause,
                "waits for the check"
            );
            let call = s.calls().last().expect("a callout").clone();
            assert_eq!(call.cluster, "auth");
            assert_eq!(
                call.headers
                    .iter()
                    .find(|(k, _)| k == ":path")
                    .map(|(_, v)| v.as_str()),
                Some("/pay")
            );
            let asked = |n: &str| {
                call.headers
                    .iter()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.clone())
            };
            assert_eq!(asked("x-check-path").as_deref(), Some("/pay"));
            assert_eq!(asked("x-check-method").as_deref(), Some("POST"));
            s.call_response(call.token, answer.map(|code| (code, &[][..], &b""[..])));
            assert_eq!(s.resumed().0, passes);
            assert_eq!(s.local_response().map(|r| r.status), status);
        }
    }

    #[test]
    fn a_bad_configuration_is_refused() {
        assert!(Harness::<Template>::new(r#"{"add_header": ["", "x"]}"#).is_err());
        assert!(Harness::<Template>::new(r#"{"add_header": "x"}"#).is_err());
    }
}
