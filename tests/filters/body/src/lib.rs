//! Body and trailer callbacks, written only against the upstream `proxy-wasm` crate.
//!
//! The request header `x-body-mode` picks the behaviour for the stream:
//! - `upper`: buffers the whole request body and sends it upstream upper-cased with `!`
//!   appended; a body containing `forbidden` gets a local 403 instead.
//! - `wrap`: buffers the whole response body and sends `<wrapped>…</wrapped>` instead.
//! - `hold`: pauses on every body piece, both ways, until the end of the stream (to run into
//!   the proxy's buffer limit).
//! - `panic`: panics in the request body callback.
//! - `watch`: streams the request body, but answers 403 as soon as the bytes seen so far
//!   contain `forbidden` (possibly long after the head went upstream).
//! - `scan`: buffers the whole request body, then sends it to cluster `scanner`
//!   (`POST /status/<x-scan-status or 200>`) from the body callback and waits: a 200 lets
//!   the body go on as `[scanned]<body>` (rewritten from the callout's answer), anything
//!   else answers 403 `blocked by scanner`.
//! - `scan-trailers`: the same check, sent from the request trailers callback (the body
//!   streams untouched).
//! - `scan-ignore`: sends the body to the scanner like `scan`, then ignores the answer (the
//!   body stays held).
//! - `hold-end`: pauses on every request body piece, the last one included, and never takes
//!   the body up again.
//! - `scan-response`: the same for the response body, which goes on as
//!   `[scanned]<body>` or is replaced by a 502 `blocked by scanner`.
//! - anything else: streams both bodies untouched, counting bytes in the counter
//!   `body_bytes_seen` and the pieces of response body in `body_pieces_seen`.
//!
//! Trailers: request trailers gain `x-wasm-trailer: req`; response trailers gain
//! `x-wasm-trailer: resp` and `x-wasm-grpc-status` with the upstream's `grpc-status`.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            mode: String::new(),
            seen: Vec::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    mode: String,
    /// Request bytes seen so far (`watch` mode).
    seen: Vec<u8>,
}

fn count(name: &str, by: usize) {
    if let Ok(id) = hostcalls::define_metric(MetricType::Counter, name) {
        let _ = hostcalls::increment_metric(id, by as i64);
    }
}

impl Stream {
    /// Sends `body` to the scanner; the answer decides (`on_http_call_response`).
    fn scan(&self, body: Vec<u8>) -> Action {
        let status = self.get_http_request_header("x-scan-status").unwrap_or_else(|| "200".into());
        let path = format!("/status/{status}");
        let headers = vec![(":method", "POST"), (":path", path.as_str()), (":authority", "scanner")];
        match self.dispatch_http_call("scanner", headers, Some(&body), vec![], Duration::from_secs(2)) {
            Ok(_) => Action::Pause,
            Err(e) => panic!("the scan callout was refused: {e:?}"),
        }
    }
}

impl Context for Stream {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, _body: usize, _trailers: usize) {
        let ok = self.get_http_call_response_header(":status").as_deref() == Some("200");
        match (self.mode.as_str(), ok) {
            ("scan", true) => {
                // The held body is this callback's body buffer: rewrite it, then let it go.
                let body = self.get_http_request_body(0, usize::MAX).unwrap_or_default();
                let mut scanned = b"[scanned]".to_vec();
                scanned.extend_from_slice(&body);
                self.set_http_request_body(0, body.len(), &scanned);
                self.resume_http_request();
            }
            ("scan-trailers", true) => self.resume_http_request(),
            // Never takes the body up again: it waits until the request's timeout.
            ("scan-ignore", _) => {}
            ("scan-response", true) => {
                let body = self.get_http_response_body(0, usize::MAX).unwrap_or_default();
                let mut scanned = b"[scanned]".to_vec();
                scanned.extend_from_slice(&body);
                self.set_http_response_body(0, body.len(), &scanned);
                self.resume_http_response();
            }
            ("scan-response", false) => {
                self.send_http_response(502, vec![], Some(b"blocked by scanner\n"));
            }
            _ => self.send_http_response(403, vec![], Some(b"blocked by scanner\n")),
        }
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        self.mode = self.get_http_request_header("x-body-mode").unwrap_or_default();
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        match self.mode.as_str() {
            "panic" => panic!("body callback panics on purpose"),
            "upper" | "hold" | "scan" | "scan-ignore" if !end_of_stream => Action::Pause,
            // Pauses at the end too, with nothing outstanding: nothing takes it up again.
            "hold-end" => Action::Pause,
            "scan" | "scan-ignore" => {
                let body = self.get_http_request_body(0, size).unwrap_or_default();
                self.scan(body)
            }
            "upper" => {
                let body = self.get_http_request_body(0, size).unwrap_or_default();
                if body.windows(9).any(|w| w == b"forbidden") {
                    self.send_http_response(403, vec![("x-denied-by", "body")], Some(b"no\n"));
                    return Action::Pause;
                }
                let mut upper = body.to_ascii_uppercase();
                upper.push(b'!');
                self.set_http_request_body(0, size, &upper);
                Action::Continue
            }
            "watch" => {
                let piece = self.get_http_request_body(0, size).unwrap_or_default();
                self.seen.extend_from_slice(&piece);
                if self.seen.windows(9).any(|w| w == b"forbidden") {
                    self.send_http_response(403, vec![("x-denied-by", "watch")], Some(b"no\n"));
                    return Action::Pause;
                }
                Action::Continue
            }
            _ => {
                count("body_bytes_seen", size);
                Action::Continue
            }
        }
    }

    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        self.add_http_request_trailer("x-wasm-trailer", "req");
        if self.mode == "scan-trailers" {
            return self.scan(b"trailers".to_vec());
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        match self.mode.as_str() {
            "wrap" | "hold" | "scan-response" if !end_of_stream => Action::Pause,
            "scan-response" => {
                let body = self.get_http_response_body(0, size).unwrap_or_default();
                self.scan(body)
            }
            "wrap" => {
                let body = self.get_http_response_body(0, size).unwrap_or_default();
                let mut wrapped = b"<wrapped>".to_vec();
                wrapped.extend_from_slice(&body);
                wrapped.extend_from_slice(b"</wrapped>");
                self.set_http_response_body(0, size, &wrapped);
                Action::Continue
            }
            "upper" | "hold" | "watch" | "scan" | "scan-ignore" | "scan-trailers" => {
                Action::Continue
            }
            _ => {
                count("body_bytes_seen", size);
                count("body_pieces_seen", 1);
                Action::Continue
            }
        }
    }

    fn on_http_response_trailers(&mut self, _n: usize) -> Action {
        let status = self.get_http_response_trailer("grpc-status").unwrap_or_default();
        self.set_http_response_trailer("x-wasm-grpc-status", Some(&status));
        self.add_http_response_trailer("x-wasm-trailer", "resp");
        Action::Continue
    }
}
