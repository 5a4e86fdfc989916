//! A starting point for a Weft filter: adds a configured header to every request, and
//! answers `403` to requests missing a required header.

use std::rc::Rc;

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
}

/// One stream's state.
pub struct Template {
    config: Rc<Config>,
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
        Action::Continue
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
    fn a_bad_configuration_is_refused() {
        assert!(Harness::<Template>::new(r#"{"add_header": ["", "x"]}"#).is_err());
        assert!(Harness::<Template>::new(r#"{"add_header": "x"}"#).is_err());
    }
}
