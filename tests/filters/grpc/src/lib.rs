//! gRPC from a filter, as ext_authz-style and streaming filters use it, against the
//! `weft.control.v1` services on cluster `grpc` (messages encoded by hand, as a filter with
//! its own protobuf code would):
//!
//! - `/call/<service>`: a unary `Registry/Register` call with `service` in the request and
//!   the request's `x-token` as `authorization` metadata, timeout `x-timeout-ms` (default
//!   2000). The request is paused until the answer: an `Instance` lets it through with
//!   `x-instance-id: <id>`; a failure answers 403 with `x-grpc-status` and
//!   `x-grpc-message` from the status.
//! - `/call-unknown`: a call to a cluster the proxy does not have: 502 with the status.
//! - `/stream/<n>`: a `Discovery/Subscribe` stream; sends `n` requests (`version` i, `hash`
//!   `h<i>`), the last with end of stream, and answers 200 with a line per event once the
//!   stream closes: `initial <x-echo metadata>`, `message <version> <hash>`, `trailing
//!   <x-summary metadata>`, `close <code> <message>`.
//! - `…/stream-cancel`: opens a stream, sends one request (hash `push1`: the server keeps
//!   answering) and, on the first answer, cancels the stream and lets the request through
//!   with `x-cancelled-after: <version> <hash>`; every later callback for that stream
//!   counts `grpc_after_cancel`.
//!
//! Configuration `root-stream:<token>`: the root context opens a stream (with the token) on
//! its first tick, sends three requests and closes its side; it counts `grpc_root_messages`
//! and, on close, `grpc_root_closed_<code>`.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { root_stream: None, opened: false })
    });
}}

const CLUSTER: &str = "grpc";
const REGISTRY: &str = "weft.control.v1.Registry";
const DISCOVERY: &str = "weft.control.v1.Discovery";

/// Increments counter `name`.
fn count(name: &str) {
    if let Ok(id) = hostcalls::define_metric(MetricType::Counter, name) {
        let _ = hostcalls::increment_metric(id, 1);
    }
}

/// Protobuf: a varint.
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Protobuf: a length-delimited field.
fn bytes_field(out: &mut Vec<u8>, field: u64, b: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Protobuf: a varint field.
fn varint_field(out: &mut Vec<u8>, field: u64, v: u64) {
    varint(out, field << 3);
    varint(out, v);
}

/// Protobuf: the fields of a message as (number, varint value or bytes).
fn fields(mut b: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    fn read_varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    while let Some(tag) = read_varint(&mut b) {
        match tag & 7 {
            0 => match read_varint(&mut b) {
                Some(v) => out.push((tag >> 3, v, Vec::new())),
                None => break,
            },
            2 => {
                let Some(len) = read_varint(&mut b) else { break };
                let len = len as usize;
                if len > b.len() {
                    break;
                }
                out.push((tag >> 3, 0, b[..len].to_vec()));
                b = &b[len..];
            }
            _ => break,
        }
    }
    out
}

/// A string field of a message.
fn string_field(message: &[u8], field: u64) -> String {
    fields(message)
        .into_iter()
        .find(|(n, _, _)| *n == field)
        .map(|(_, _, b)| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// A varint field of a message.
fn varint_of(message: &[u8], field: u64) -> u64 {
    fields(message)
        .into_iter()
        .find(|(n, _, _)| *n == field)
        .map_or(0, |(_, v, _)| v)
}

/// `DiscoveryRequest { version, hash }`.
fn discovery_request(version: u64, hash: &str) -> Vec<u8> {
    let mut m = Vec::new();
    varint_field(&mut m, 2, version);
    bytes_field(&mut m, 3, hash.as_bytes());
    m
}

struct Root {
    /// `root-stream`: the token to open the stream with.
    root_stream: Option<String>,
    opened: bool,
}

impl Context for Root {
    fn on_grpc_stream_message(&mut self, _token: u32, _size: usize) {
        count("grpc_root_messages");
    }

    fn on_grpc_stream_close(&mut self, _token: u32, status: u32) {
        count(&format!("grpc_root_closed_{status}"));
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let config = String::from_utf8_lossy(&config);
        self.root_stream = config.strip_prefix("root-stream:").map(str::to_owned);
        if self.root_stream.is_some() {
            self.set_tick_period(Duration::from_millis(50));
        }
        true
    }

    fn on_tick(&mut self) {
        if self.opened {
            return;
        }
        self.opened = true;
        self.set_tick_period(Duration::ZERO);
        let auth = format!("Bearer {}", self.root_stream.as_deref().unwrap_or_default());
        let token = self
            .open_grpc_stream(
                CLUSTER,
                DISCOVERY,
                "Subscribe",
                vec![("authorization", auth.as_bytes())],
            )
            .expect("the stream opens");
        for i in 1..=3 {
            self.send_grpc_stream_message(token, Some(&discovery_request(i, "root")), i == 3);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            log: String::new(),
            cancelled: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    /// One line per stream event.
    log: String,
    /// The stream this context cancelled.
    cancelled: Option<u32>,
}

impl Stream {
    /// The request's `x-token` as `authorization` metadata.
    fn metadata(&self) -> Vec<(&'static str, Vec<u8>)> {
        match self.get_http_request_header("x-token") {
            Some(t) => vec![("authorization", format!("Bearer {t}").into_bytes())],
            None => Vec::new(),
        }
    }

    /// Counts a callback for the stream this context cancelled (there must be none).
    fn after_cancel(&self, token: u32) -> bool {
        if self.cancelled == Some(token) {
            count("grpc_after_cancel");
            return true;
        }
        false
    }
}

impl Context for Stream {
    fn on_grpc_call_response(&mut self, _token: u32, status: u32, size: usize) {
        if status == 0 {
            let body = self.get_grpc_call_response_body(0, size).unwrap_or_default();
            let id = string_field(&body, 1);
            self.add_http_request_header("x-instance-id", &id);
            self.resume_http_request();
            return;
        }
        let (code, message) = self.get_grpc_status();
        let code = code.to_string();
        let message = message.unwrap_or_default();
        self.send_http_response(
            403,
            vec![("x-grpc-status", &code), ("x-grpc-message", &message)],
            Some(b"denied over gRPC\n"),
        );
    }

    fn on_grpc_stream_initial_metadata(&mut self, token: u32, _n: u32) {
        if self.after_cancel(token) {
            return;
        }
        let echo = self
            .get_grpc_stream_initial_metadata_value("x-echo")
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        self.log.push_str(&format!("initial {echo}\n"));
    }

    fn on_grpc_stream_message(&mut self, token: u32, size: usize) {
        if self.after_cancel(token) {
            return;
        }
        let m = self.get_grpc_stream_message(0, size).unwrap_or_default();
        let (version, hash) = (varint_of(&m, 1), string_field(&m, 2));
        let path = self.get_http_request_header(":path").unwrap_or_default();
        if path.ends_with("/stream-cancel") {
            self.cancel_grpc_stream(token);
            self.cancelled = Some(token);
            self.set_http_request_header("x-cancelled-after", Some(&format!("{version} {hash}")));
            self.resume_http_request();
            return;
        }
        self.log.push_str(&format!("message {version} {hash}\n"));
    }

    fn on_grpc_stream_trailing_metadata(&mut self, token: u32, _n: u32) {
        if self.after_cancel(token) {
            return;
        }
        let summary = self
            .get_grpc_stream_trailing_metadata_value("x-summary")
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        self.log.push_str(&format!("trailing {summary}\n"));
    }

    fn on_grpc_stream_close(&mut self, token: u32, status: u32) {
        if self.after_cancel(token) {
            return;
        }
        let (_, message) = self.get_grpc_status();
        self.log.push_str(&format!("close {status} {}\n", message.unwrap_or_default()));
        let body = std::mem::take(&mut self.log);
        self.send_http_response(200, vec![], Some(body.as_bytes()));
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, _end: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let metadata = self.metadata();
        let metadata: Vec<(&str, &[u8])> = metadata.iter().map(|(k, v)| (*k, &v[..])).collect();
        if let Some(service) = path.strip_prefix("/call/") {
            let timeout = self
                .get_http_request_header("x-timeout-ms")
                .and_then(|t| t.parse().ok())
                .unwrap_or(2000);
            let mut request = Vec::new();
            bytes_field(&mut request, 1, service.as_bytes());
            bytes_field(&mut request, 2, b"10.0.0.1:80");
            return match self.dispatch_grpc_call(
                CLUSTER,
                REGISTRY,
                "Register",
                metadata,
                Some(&request),
                Duration::from_millis(timeout),
            ) {
                Ok(_) => Action::Pause,
                Err(e) => {
                    self.send_http_response(502, vec![], Some(format!("{e:?}\n").as_bytes()));
                    Action::Pause
                }
            };
        }
        if path == "/call-unknown" {
            let status = self.dispatch_grpc_call(
                "no-such-cluster",
                REGISTRY,
                "Register",
                vec![],
                None,
                Duration::from_secs(1),
            );
            let body = format!("{status:?}\n");
            self.send_http_response(502, vec![], Some(body.as_bytes()));
            return Action::Pause;
        }
        let (count, cancel) = match path.strip_prefix("/stream/") {
            Some(n) => (n.parse::<u64>().unwrap_or(0), false),
            None if path.ends_with("/stream-cancel") => (1, true),
            None => return Action::Continue,
        };
        let token = match self.open_grpc_stream(CLUSTER, DISCOVERY, "Subscribe", metadata) {
            Ok(t) => t,
            Err(e) => {
                self.send_http_response(502, vec![], Some(format!("{e:?}\n").as_bytes()));
                return Action::Pause;
            }
        };
        for i in 1..=count {
            let last = i == count && !cancel;
            // Cancelling: the server is asked to keep pushing answers (hash `push…`).
            let hash = if cancel { format!("push{i}") } else { format!("h{i}") };
            self.send_grpc_stream_message(token, Some(&discovery_request(i, &hash)), last);
        }
        if count == 0 {
            self.close_grpc_stream(token);
        }
        Action::Pause
    }
}
