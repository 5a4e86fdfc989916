//! External authorization, as an Envoy filter would do it: every request except `/public`
//! is held while the filter asks the cluster named in its configuration
//! (`GET /status/<x-auth-status or 200>`); a 200 lets it through with `x-auth: ok` and the
//! answer's body in `x-auth-body`, anything else (or no answer) gets 403. `x-auth-timeout-ms`
//! sets the callout's timeout (0: the host's default); `x-auth-parallel: n` sends n callouts
//! at once and lets the request through when all n answered 200.
//!
//! Responses to `/public/audited` are held while the filter asks the same cluster
//! (`GET /status/202`) and get `x-audit: <its status>` before they go on.
//!
//! Configuration `<cluster>:warm`: the root context calls the cluster from `on_configure`
//! (`GET /status/201`), again from the answer's callback (`/status/202`), and from
//! `on_queue_ready` for each item a request to `/enqueue` puts on its queue `callout_q`
//! (`/status/203`); the answers are counted as `root_answered_<n>_<status>`.
//!
//! A request whose path contains `/notify` is not held: the filter sends `GET /status/204`
//! to the cluster and lets the request go on at once; the answer, when it comes while the
//! stream lives, counts `notify_answered_<status>`.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { cluster: String::new(), answered: 0 }) });
}}

struct Root {
    cluster: String,
    /// Root-context callouts answered so far (`warm` mode).
    answered: u32,
}

impl Root {
    fn call(&self, path: &str) {
        let headers = vec![(":method", "GET"), (":path", path), (":authority", "auth")];
        self.dispatch_http_call(&self.cluster, headers, None, vec![], Duration::from_secs(2))
            .expect("a root-context callout is sent");
    }
}

impl Context for Root {
    /// `warm` mode: the answers to the root context's own callouts, counted as
    /// `root_answered_<n>_<status>`; the first answer sends another callout from here.
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, _body: usize, _trailers: usize) {
        self.answered += 1;
        let status = self.get_http_call_response_header(":status").unwrap_or_default();
        let name = format!("root_answered_{}_{status}", self.answered);
        if let Ok(id) = hostcalls::define_metric(MetricType::Counter, &name) {
            let _ = hostcalls::increment_metric(id, 1);
        }
        if self.answered == 1 {
            self.call("/status/202");
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let (cluster, warm) = match config.split_once(':') {
            Some((cluster, "warm")) => (cluster.to_owned(), true),
            _ => (config.clone(), false),
        };
        self.cluster = cluster;
        if warm {
            // From on_configure, as filters fetch what they need before traffic.
            self.call("/status/201");
            let _ = hostcalls::register_shared_queue("callout_q");
        }
        !self.cluster.is_empty()
    }

    /// `warm` mode: each queued item sends a callout from here.
    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {
            self.call("/status/203");
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Auth {
            cluster: self.cluster.clone(),
            outstanding: 0,
            audited: false,
            auditing: false,
            notifying: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Auth {
    cluster: String,
    /// Callouts still outstanding (`x-auth-parallel: n` sends n at once).
    outstanding: usize,
    /// The request was for `/public/audited`.
    audited: bool,
    /// The outstanding callout is the response audit.
    auditing: bool,
    /// The outstanding callout is a notification nothing waits for.
    notifying: bool,
}

impl Context for Auth {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let status = self.get_http_call_response_header(":status").unwrap_or_default();
        if self.notifying {
            let name = format!("notify_answered_{status}");
            if let Ok(id) = hostcalls::define_metric(MetricType::Counter, &name) {
                let _ = hostcalls::increment_metric(id, 1);
            }
            return;
        }
        if self.auditing {
            self.set_http_response_header("x-audit", Some(&status));
            self.resume_http_response();
            return;
        }
        if status == "200" && self.outstanding > 1 {
            // One of several callouts sent at once: go on when the last one answers.
            self.outstanding -= 1;
            return;
        }
        if status == "200" {
            let body = self
                .get_http_call_response_body(0, body_size)
                .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
                .unwrap_or_default();
            self.set_http_request_header("x-auth", Some("ok"));
            self.set_http_request_header("x-auth-body", Some(&body));
            self.resume_http_request();
        } else {
            let shown = if status.is_empty() { "none" } else { status.as_str() };
            self.send_http_response(403, vec![("x-auth-status", shown)], Some(b"denied by auth\n"));
        }
    }
}

impl HttpContext for Auth {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        if path == "/enqueue" {
            if let Ok(Some(queue)) = hostcalls::resolve_shared_queue("", "callout_q") {
                let _ = hostcalls::enqueue_shared_queue(queue, Some(b"go"));
            }
            return Action::Continue;
        }
        if path.contains("/notify") {
            let headers = vec![(":method", "GET"), (":path", "/status/204"), (":authority", "auth")];
            self.notifying = self
                .dispatch_http_call(&self.cluster, headers, None, vec![], Duration::from_secs(2))
                .is_ok();
            return Action::Continue;
        }
        if path.starts_with("/public") {
            self.audited = path == "/public/audited";
            return Action::Continue;
        }
        let wanted = self.get_http_request_header("x-auth-status").unwrap_or_else(|| "200".into());
        // The callout's timeout: `x-auth-timeout-ms` (0: the host's default), else 2 s.
        let timeout = self
            .get_http_request_header("x-auth-timeout-ms")
            .and_then(|t| t.parse().ok())
            .map_or(Duration::from_secs(2), Duration::from_millis);
        // `x-auth-echo: <v>`: the callout goes to `/echo` with the body `ping` and the
        // trailer `x-callout-trailer: <v>` (the echo comes back as `x-auth-body`).
        let echo = self.get_http_request_header("x-auth-echo");
        let path = match &echo {
            Some(_) => "/echo".to_owned(),
            None => format!("/status/{wanted}"),
        };
        if let Some(v) = echo {
            let headers = vec![(":method", "POST"), (":path", "/echo"), (":authority", "auth")];
            let trailers = vec![("x-callout-trailer", v.as_str())];
            self.outstanding += 1;
            self.dispatch_http_call(&self.cluster, headers, Some(b"ping"), trailers, timeout)
                .expect("the callout is sent");
            return Action::Pause;
        }
        let parallel: usize = self
            .get_http_request_header("x-auth-parallel")
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        for _ in 1..parallel {
            let headers = vec![(":method", "GET"), (":path", path.as_str()), (":authority", "auth")];
            if self.dispatch_http_call(&self.cluster, headers, None, vec![], timeout).is_ok() {
                self.outstanding += 1;
            }
        }
        let headers = vec![(":method", "GET"), (":path", path.as_str()), (":authority", "auth")];
        self.outstanding += 1;
        match self.dispatch_http_call(&self.cluster, headers, None, vec![], timeout) {
            Ok(_) => Action::Pause,
            Err(_) => {
                self.send_http_response(500, vec![], Some(b"callout refused\n"));
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if !self.audited {
            return Action::Continue;
        }
        let headers = vec![(":method", "GET"), (":path", "/status/202"), (":authority", "auth")];
        match self.dispatch_http_call(&self.cluster, headers, None, vec![], Duration::from_secs(2)) {
            Ok(_) => {
                self.auditing = true;
                Action::Pause
            }
            Err(_) => Action::Continue,
        }
    }
}
