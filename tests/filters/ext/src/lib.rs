//! Weft's `weft.*` extensions called from a filter written only against the upstream
//! `proxy-wasm` crate (through `proxy_call_foreign_function`), driven by request headers:
//! - `x-route-cluster: <name>`: `weft.set_cluster` (an unknown cluster gets a local 400);
//! - `x-timeout-ms: <n>`: `weft.set_timeout`; `x-try-timeout-ms: <n>`: `weft.set_try_timeout`;
//! - `x-attempts: <n>`: `weft.set_attempts`;
//! - `x-retry-on: 5xx | connect-failure`: on such an outcome (read with `weft.attempt`), ask
//!   `weft.retry` (no delay, other endpoints first).
//!
//! - `x-upper-body: 1`: the response body is upper-cased (buffered to its end);
//! - `x-unused: <callback>[,<callback>...]`: `weft.unused` for each callback named (the
//!   filter says it does nothing there, so the host may stop calling it), the status in
//!   `x-unused-status` (the first that is not `ok`, else `ok`);
//! - `x-pause-head: 1`: the request headers callback returns `Pause` with nothing
//!   outstanding (a request with a body: the body callback, which continues, decides);
//! - `x-properties: 1`: `weft.properties` for `request.path`, `request.method` and
//!   `request.no_such_thing`, encoded by hand from `docs/filter-abi.md`; the answer in
//!   `x-properties` on the request upstream (`path|method|-`, `-` for an absent value), or
//!   `error` when the call or its answer is bad.
//!
//! - `x-stream-done: 1 | pause | junk`: `weft.stream_done` (with `junk`, one byte of
//!   arguments, which the host refuses), its status (`ok`, `bad_argument`, `other`) in
//!   `x-stream-done-status` on the request upstream; with `pause`, the callback then returns
//!   `Pause` (which the host takes as `Continue`). The upstream `proxy-wasm` crate keeps a
//!   context until `on_delete`, which the host no longer calls for a done stream: each such
//!   stream's small state stays for the instance's life (a test filter's leak; an SDK filter
//!   drops its state itself).
//!
//! The counter `contexts_created` counts the stream contexts the host had it create.
//!
//! Every response gets `x-attempts-made` (the attempt number) and `x-code-details` (the
//! `response.code_details` property), and `x-basic-seen` with the stream property
//! `basic.seen` when an earlier filter set it.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MetricType, Status};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        if let Ok(id) = hostcalls::define_metric(MetricType::Counter, "contexts_created") {
            let _ = hostcalls::increment_metric(id, 1);
        }
        Some(Box::new(Stream { retry_on: String::new(), upper: false, unused: None }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    retry_on: String,
    upper: bool,
    unused: Option<&'static str>,
}

fn call(name: &str, args: &[u8]) -> Result<Option<Vec<u8>>, Status> {
    hostcalls::call_foreign_function(name, Some(args))
}

/// `weft.properties` as the ABI document gives it: u32 count, then u32 length and bytes per
/// path; the answer is each value as u32 length (`0xFFFFFFFF`: absent) and bytes.
fn read_properties(paths: &[&[u8]]) -> Option<String> {
    let mut args = (paths.len() as u32).to_le_bytes().to_vec();
    for p in paths {
        args.extend_from_slice(&(p.len() as u32).to_le_bytes());
        args.extend_from_slice(p);
    }
    let answer = call("weft.properties", &args).ok()??;
    let mut rest = answer.as_slice();
    let mut values = Vec::new();
    for _ in paths {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len);
        if len == u32::MAX {
            values.push("-".to_owned());
            rest = tail;
            continue;
        }
        let (value, tail) = tail.split_at_checked(len as usize)?;
        values.push(String::from_utf8_lossy(value).into_owned());
        rest = tail;
    }
    rest.is_empty().then(|| values.join("|"))
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        if let Some(cluster) = self.get_http_request_header("x-route-cluster") {
            if call("weft.set_cluster", cluster.as_bytes()).is_err() {
                self.send_http_response(400, vec![], Some(b"no such cluster\n"));
                return Action::Pause;
            }
        }
        for (header, function) in [
            ("x-timeout-ms", "weft.set_timeout"),
            ("x-try-timeout-ms", "weft.set_try_timeout"),
        ] {
            if let Some(ms) = self.get_http_request_header(header).and_then(|v| v.parse::<u64>().ok()) {
                let _ = call(function, &ms.to_le_bytes());
            }
        }
        if let Some(n) = self.get_http_request_header("x-attempts").and_then(|v| v.parse::<u32>().ok()) {
            let _ = call("weft.set_attempts", &n.to_le_bytes());
        }
        self.retry_on = self.get_http_request_header("x-retry-on").unwrap_or_default();
        self.upper = self.get_http_request_header("x-upper-body").is_some();
        if let Some(callbacks) = self.get_http_request_header("x-unused") {
            let status = |callback: &str| match call("weft.unused", callback.trim().as_bytes()) {
                Ok(_) => "ok",
                Err(Status::BadArgument) => "bad_argument",
                Err(_) => "other",
            };
            let statuses: Vec<&'static str> = callbacks.split(',').map(status).collect();
            self.unused = Some(statuses.into_iter().find(|s| *s != "ok").unwrap_or("ok"));
        }
        if self.get_http_request_header("x-properties").is_some() {
            let answer = read_properties(&[b"request\0path", b"request\0method", b"request\0no_such_thing"]);
            self.set_http_request_header("x-properties", Some(answer.as_deref().unwrap_or("error")));
        }
        if let Some(how) = self.get_http_request_header("x-stream-done") {
            let args: &[u8] = if how == "junk" { b"x" } else { b"" };
            let status = match call("weft.stream_done", args) {
                Ok(_) => "ok",
                Err(Status::BadArgument) => "bad_argument",
                Err(_) => "other",
            };
            self.set_http_request_header("x-stream-done-status", Some(status));
            if how == "pause" {
                return Action::Pause;
            }
        }
        if self.get_http_request_header("x-pause-head").is_some() {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        let attempt = call("weft.attempt", &[]).ok().flatten().unwrap_or_default();
        let (number, status, error) = match attempt.as_slice() {
            [a, b, c, d, s0, s1, e] => (
                u32::from_le_bytes([*a, *b, *c, *d]),
                u16::from_le_bytes([*s0, *s1]),
                *e,
            ),
            _ => (0, 0, 0),
        };
        let wanted = match self.retry_on.as_str() {
            "5xx" => status >= 500,
            "connect-failure" => error == 1,
            _ => false,
        };
        if wanted {
            let mut args = 0u64.to_le_bytes().to_vec();
            args.push(1); // other endpoints first
            if call("weft.retry", &args).is_ok() {
                return Action::Continue;
            }
        }
        self.set_http_response_header("x-attempts-made", Some(&number.to_string()));
        if let Some(status) = self.unused {
            self.set_http_response_header("x-unused-status", Some(status));
        }
        let details = self
            .get_property(vec!["response", "code_details"])
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        self.set_http_response_header("x-code-details", Some(&details));
        // A property another filter of the chain set on this stream.
        if let Some(seen) = self.get_property(vec!["basic", "seen"]) {
            self.set_http_response_header("x-basic-seen", Some(&String::from_utf8_lossy(&seen)));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !self.upper {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_response_body(0, size).unwrap_or_default();
        self.set_http_response_body(0, size, &body.to_ascii_uppercase());
        Action::Continue
    }
}
