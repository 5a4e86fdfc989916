//! A filter written only against the upstream `proxy-wasm` crate, as for Envoy or Istio.
//!
//! Request path selects behaviour, for the compatibility tests:
//! - any path: echo the plugin and VM configuration, request properties, and edit headers
//!   (add `x-wasm-added`, replace `x-replace-me`, remove `x-remove-me`);
//! - `/deny`: local response 403 with a header and a body; `/deny/details`: 403 with
//!   response code details `denied_by_basic`;
//! - `/panic`, `/loop`, `/grow`: panic, spin forever, grow memory without bound;
//!   `/panic/<config>`: panic only in the filter with that plugin configuration;
//! - `/random`: WASI `random_get` for a few normal lengths, answered locally with the bytes
//!   (hex) and errnos; `/random/huge`: `random_get` for lengths far past the guest's memory
//!   (4 GiB - 1 and 2 GiB - 1), answered locally with the errnos;
//! - `/reset`: resets the stream from the request headers (`proxy_close_stream`);
//!   `/reset/response`: from the response headers.
//!
//! Plugin configuration `refuse` makes `on_configure` return false.
//!
//! Sets the stream property `basic.seen` to the request path.
//!
//! Metrics: counter `basic_requests`, histogram `basic_request_headers`, gauge
//! `basic_last_status`, and counter `basic_ticks` bumped by a 50 ms tick. From `on_log`:
//! counter `basic_logged_<status>` per final status, and `basic_logged_deny_path` when the
//! logged request path was `/deny`.
//!
//! VM sharing: `x-wasm-vm-<plugin name>` on the request says how many root contexts this
//! instance has created (one per filter that shares it) and its `plugin_vm_id`.
//!
//! Shared queue: the root registers `basic_events`; `/enqueue` puts the path on it (after
//! resolving it by name in its own VM, whose id is empty) and `on_queue_ready` drains it, counting
//! `basic_dequeued`.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};

#[link(wasm_import_module = "wasi_snapshot_preview1")]
unsafe extern "C" {
    /// WASI preview 1 `random_get(buf, len) -> errno`, declared raw so that the filter can
    /// hand the host any length.
    #[link_name = "random_get"]
    fn wasi_random_get(buf: i32, len: i32) -> i32;
}

/// `random_get` into `buf`: the errno.
fn random_into(buf: &mut [u8]) -> i32 {
    // SAFETY: the host writes at most `buf.len()` bytes at `buf`.
    unsafe { wasi_random_get(buf.as_mut_ptr() as i32, buf.len() as i32) }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The response headers of `/random` and `/random/huge`.
fn random_route(path: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if path == "/random/huge" {
        let mut small = [0u8; 16];
        // Lengths far past the guest's memory: the host must refuse them (EFAULT) without
        // allocating or filling anything of that size.
        let errnos = [-1, i32::MAX].map(|len| {
            // SAFETY: a host that follows WASI writes nothing for an out-of-bounds range.
            unsafe { wasi_random_get(small.as_mut_ptr() as i32, len) }
        });
        out.push((
            "x-random-errno".into(),
            format!("{},{}", errnos[0], errnos[1]),
        ));
        return out;
    }
    let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
    // Past any 64 KiB chunk a host might use.
    let mut big = vec![0u8; 200 * 1024];
    let errnos = [
        random_into(&mut a),
        random_into(&mut b),
        random_into(&mut big),
        random_into(&mut []),
    ];
    let zero_chunks = big
        .chunks(1024)
        .filter(|c| c.iter().all(|x| *x == 0))
        .count();
    out.push(("x-random-errno".into(), format!("{errnos:?}")));
    out.push(("x-random-a".into(), hex(&a)));
    out.push(("x-random-b".into(), hex(&b)));
    out.push(("x-random-zero-chunks".into(), zero_chunks.to_string()));
    out
}

fn metric(kind: MetricType, name: &str) -> u32 {
    hostcalls::define_metric(kind, name).unwrap_or(0)
}

/// Root contexts this instance created (filters sharing it each have one).
static ROOTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        ROOTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::new(Root { config: String::new(), vm_config: String::new() })
    });
}}

struct Root {
    config: String,
    vm_config: String,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        self.vm_config = self
            .get_vm_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        self.config = self
            .get_plugin_configuration()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        log::info!("configured with {}", self.config);
        if self.config == "refuse" {
            return false;
        }
        self.set_tick_period(Duration::from_millis(50));
        let _ = hostcalls::register_shared_queue("basic_events");
        true
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(item)) = hostcalls::dequeue_shared_queue(queue_id) {
            if item == b"/enqueue/poison" {
                panic!("a poisoned queue item");
            }
            let _ = hostcalls::increment_metric(metric(MetricType::Counter, "basic_dequeued"), 1);
        }
    }

    fn on_tick(&mut self) {
        let _ = hostcalls::increment_metric(metric(MetricType::Counter, "basic_ticks"), 1);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream {
            config: self.config.clone(),
            vm_config: self.vm_config.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    config: String,
    vm_config: String,
}

impl Stream {
    fn property(&self, path: &[&str]) -> String {
        self.get_property(path.to_vec())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|| "<none>".into())
    }
}

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_add_header_map_value(
        map: u32,
        key: *const u8,
        key_len: usize,
        value: *const u8,
        value_len: usize,
    ) -> u32;
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_len: usize,
        body: *const u8,
        body_len: usize,
        headers: *const u8,
        headers_len: usize,
        grpc_status: i32,
    ) -> u32;
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let path = self.get_http_request_header(":path").unwrap_or_default();
        // A stream property, readable by the other filters of the chain (filter state).
        self.set_property(vec!["basic", "seen"], Some(path.as_bytes()));
        match path.as_str() {
            "/deny" => {
                self.send_http_response(403, vec![("x-denied-by", "wasm")], Some(b"denied by filter\n"));
                return Action::Pause;
            }
            "/deny/bad-length" => {
                // A content-length that does not match the body: the host frames it.
                self.send_http_response(403, vec![("content-length", "999")], Some(b"short\n"));
                return Action::Pause;
            }
            "/deny/details" | "/deny/grpc-status" => {
                // The raw call, with response code details (the SDK passes none), and a
                // gRPC status for `/deny/grpc-status`.
                let (details, body) = ("denied_by_basic", "no\n");
                let grpc_status = if path == "/deny/grpc-status" { 16 } else { -1 };
                // SAFETY: the pointers and lengths describe live local data; no headers.
                unsafe {
                    proxy_send_local_response(
                        403,
                        details.as_ptr(),
                        details.len(),
                        body.as_ptr(),
                        body.len(),
                        std::ptr::null(),
                        0,
                        grpc_status,
                    )
                };
                return Action::Pause;
            }
            "/deny/bad-status" => {
                self.send_http_response(1000, vec![], Some(b"never\n"));
                return Action::Pause;
            }
            "/wrong-phase" => {
                // Response headers before there is a response: the raw call, to see the
                // status the host answers (the SDK would trap on it, as it does in Envoy).
                let (k, v) = ("x-early", "1");
                // SAFETY: the pointers and lengths describe `k` and `v`, alive for the call.
                let status = unsafe {
                    proxy_add_header_map_value(2, k.as_ptr(), k.len(), v.as_ptr(), v.len())
                };
                self.set_http_request_header("x-wrong-phase-status", Some(&status.to_string()));
                return Action::Continue;
            }
            "/reset" => {
                let _ = hostcalls::reset_http_request();
                return Action::Pause;
            }
            "/panic" => panic!("the filter panicked on purpose"),
            // Only the filter with this configuration panics.
            p if p.strip_prefix("/panic/") == Some(self.config.as_str()) => {
                panic!("the filter panicked on purpose")
            }
            "/loop" => {
                let mut i: u64 = 0;
                loop {
                    i = i.wrapping_add(1);
                    std::hint::black_box(i);
                }
            }
            "/random" | "/random/huge" => {
                let headers = random_route(&path);
                let headers: Vec<(&str, &str)> =
                    headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                self.send_http_response(200, headers, Some(b"random\n"));
                return Action::Pause;
            }
            "/enqueue" | "/enqueue/poison" => {
                if let Ok(Some(queue)) = hostcalls::resolve_shared_queue("", "basic_events") {
                    let _ = hostcalls::enqueue_shared_queue(queue, Some(path.as_bytes()));
                }
            }
            "/grow" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![7u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            _ => {}
        }
        self.set_http_request_header("x-wasm-config", Some(&self.config));
        self.set_http_request_header("x-wasm-vm-config", Some(&self.vm_config));
        self.add_http_request_header("x-wasm-added", "1");
        if self.get_http_request_header("x-replace-me").is_some() {
            self.set_http_request_header("x-replace-me", Some("replaced"));
        }
        self.set_http_request_header("x-remove-me", None);
        let seen = format!(
            "path={} method={} plugin={} root_id={} source={}",
            self.property(&["request", "path"]),
            self.property(&["request", "method"]),
            self.property(&["plugin_name"]),
            self.property(&["plugin_root_id"]),
            self.property(&["source", "address"]),
        );
        self.set_http_request_header("x-wasm-properties", Some(&seen));
        let vm = format!(
            "roots={} vm={} config={}",
            ROOTS.load(std::sync::atomic::Ordering::Relaxed),
            self.property(&["plugin_vm_id"]),
            self.config,
        );
        let name = format!("x-wasm-vm-{}", self.property(&["plugin_name"]));
        self.set_http_request_header(&name, Some(&vm));
        // Envoy's request and node properties that filters read in practice.
        let int = |v: Option<Vec<u8>>| {
            v.and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map_or("<none>".to_owned(), |b| i64::from_le_bytes(b).to_string())
        };
        let envoy = format!(
            "q={} ref={} ua={} node={} app={} dir={}",
            self.property(&["request", "query"]),
            self.property(&["request", "referer"]),
            self.property(&["request", "useragent"]),
            self.property(&["node", "id"]),
            self.property(&["node", "metadata", "app"]),
            int(self.get_property(vec!["listener_direction"])),
        );
        self.set_http_request_header("x-wasm-envoy", Some(&envoy));
        // As an authentication filter leaves its result for later filters to read.
        self.set_property(vec!["authn", "principal"], Some(b"alice"));
        let more = format!(
            "cluster={} url_path={} host={} scheme={} mtls={:?} sni=[{}] fs={} md={}",
            self.property(&["cluster_name"]),
            self.property(&["request", "url_path"]),
            self.property(&["request", "host"]),
            self.property(&["request", "scheme"]),
            self.get_property(vec!["connection", "mtls"]).unwrap_or_default(),
            self.property(&["connection", "requested_server_name"]),
            self.property(&["filter_state", "wasm.authn.principal"]),
            self.property(&["metadata", "filter_metadata", "authn", "principal"]),
        );
        self.set_http_request_header("x-wasm-envoy-more", Some(&more));
        // Messages, as protobuf bytes: the node's metadata (a Struct) and the node itself.
        let md = self.get_property(vec!["node", "metadata"]).unwrap_or_default();
        self.set_http_request_header("x-wasm-node-metadata", Some(&hex(&md)));
        let node = self.get_property(vec!["xds", "node"]).unwrap_or_default();
        self.set_http_request_header("x-wasm-node", Some(&hex(&node)));
        let count = self.get_http_request_headers().len();
        let _ = hostcalls::increment_metric(metric(MetricType::Counter, "basic_requests"), 1);
        let _ = hostcalls::record_metric(metric(MetricType::Histogram, "basic_request_headers"), count as u64);
        self.set_http_request_header("x-wasm-header-count", Some(&count.to_string()));
        // The names of the map the filter saw, in order.
        let names: Vec<String> = self.get_http_request_headers().into_iter().map(|(k, _)| k).collect();
        self.set_http_request_header("x-wasm-map", Some(&names.join(",")));
        // The downstream connection's TLS, as an authorization filter reads it.
        let tls = format!(
            "principal={} san={} version={} mtls={:?} scheme={}",
            self.property(&["source", "principal"]),
            self.property(&["connection", "uri_san_peer_certificate"]),
            self.property(&["connection", "tls_version"]),
            self.get_property(vec!["connection", "mtls"]).unwrap_or_default(),
            self.property(&["request", "scheme"]),
        );
        self.set_http_request_header("x-wasm-tls", Some(&tls));
        log::debug!("request {path} passed");
        Action::Continue
    }

    fn on_log(&mut self) {
        let code = self
            .get_property(vec!["response", "code"])
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(i64::from_le_bytes)
            .unwrap_or(0);
        let _ = hostcalls::increment_metric(metric(MetricType::Counter, &format!("basic_logged_{code}")), 1);
        if self.property(&["request", "path"]) == "/deny" {
            let _ = hostcalls::increment_metric(metric(MetricType::Counter, "basic_logged_deny_path"), 1);
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // Integer properties are 8-byte little-endian, as Envoy encodes them.
        let code = self
            .get_property(vec!["response", "code"])
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(i64::from_le_bytes)
            .map_or("<none>".to_owned(), |c| c.to_string());
        self.add_http_response_header("x-wasm-response", &format!("seen {code}"));
        let upstream = self.property(&["upstream", "address"]);
        self.add_http_response_header("x-wasm-upstream", &upstream);
        // The request stays readable while the response is processed.
        let path = self.property(&["request", "path"]);
        self.add_http_response_header("x-wasm-request-path", &path);
        if path == "/reset/response" {
            let _ = hostcalls::reset_http_response();
            return Action::Pause;
        }
        if let Ok(status) = code.parse::<u64>() {
            let _ = hostcalls::record_metric(metric(MetricType::Gauge, "basic_last_status"), status);
        }
        self.set_http_response_header("x-upstream", None);
        let flags = self
            .get_property(vec!["response", "flags"])
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or("<none>".to_owned(), |b| i64::from_le_bytes(b).to_string());
        self.add_http_response_header("x-wasm-flags", &flags);
        let cluster = self.property(&["cluster_name"]);
        self.add_http_response_header("x-wasm-cluster", &cluster);
        let attempts = self
            .get_property(vec!["upstream", "request_attempt_count"])
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or("<none>".to_owned(), |b| i64::from_le_bytes(b).to_string());
        self.add_http_response_header("x-wasm-attempts", &attempts);
        let details = self.property(&["response", "code_details"]);
        self.add_http_response_header("x-wasm-details", &format!("[{details}]"));
        Action::Continue
    }
}
