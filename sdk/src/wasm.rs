//! The proxy-wasm glue of [`crate::export_filter!`] (wasm32 only): the root context parses
//! the configuration once, each HTTP context drives one [`Filter`] value, and [`WasmHost`]
//! implements [`Host`] over the ABI.

use std::rc::Rc;
use std::time::{Duration, SystemTime};

use proxy_wasm::hostcalls as hc;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types as pw;

use crate::host::{BufferType, Host, LogLevel, MapType, MetricKind, Status};
use crate::{Action, Ctx, Filter};

/// Registers `F` as the module's filter (called from `_initialize`).
pub fn install<F: Filter>() {
    proxy_wasm::set_log_level(pw::LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root::<F> { config: None })
    });
}

struct Root<F: Filter> {
    config: Option<Rc<F::Config>>,
}

impl<F: Filter> Context for Root<F> {}

impl<F: Filter> RootContext for Root<F> {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = hc::get_buffer(pw::BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        match crate::parse_config::<F>(&bytes) {
            Ok(c) => {
                if let Some(period) = F::tick_period(&c) {
                    let _ = hc::set_tick_period(period);
                }
                self.config = Some(Rc::new(c));
                true
            }
            Err(e) => {
                let _ = hc::log(pw::LogLevel::Error, &e);
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(config) = &self.config {
            F::on_tick(config, &mut Ctx::new(&mut WasmHost));
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.as_ref()?;
        Some(Box::new(Stream {
            filter: F::new(config),
        }))
    }

    fn get_type(&self) -> Option<pw::ContextType> {
        Some(pw::ContextType::HttpContext)
    }
}

struct Stream<F> {
    filter: F,
}

fn action(a: Action) -> pw::Action {
    match a {
        Action::Continue => pw::Action::Continue,
        Action::Pause => pw::Action::Pause,
    }
}

impl<F: Filter> Context for Stream<F> {
    fn on_http_call_response(&mut self, token: u32, headers: usize, _body: usize, _t: usize) {
        let mut host = WasmHost;
        let mut cx = Ctx::new(&mut host);
        let status = (headers > 0)
            .then(|| cx.call_response_header(":status"))
            .flatten()
            .and_then(|s| s.parse().ok());
        self.filter.on_call_response(&mut cx, token, status);
    }
}

impl<F: Filter> HttpContext for Stream<F> {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> pw::Action {
        action(
            self.filter
                .on_request_headers(&mut Ctx::new(&mut WasmHost), end_of_stream),
        )
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> pw::Action {
        action(
            self.filter
                .on_request_body(&mut Ctx::new(&mut WasmHost), size, end_of_stream),
        )
    }

    fn on_http_response_headers(&mut self, _n: usize, end_of_stream: bool) -> pw::Action {
        action(
            self.filter
                .on_response_headers(&mut Ctx::new(&mut WasmHost), end_of_stream),
        )
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> pw::Action {
        action(
            self.filter
                .on_response_body(&mut Ctx::new(&mut WasmHost), size, end_of_stream),
        )
    }

    fn on_http_request_trailers(&mut self, _n: usize) -> pw::Action {
        action(
            self.filter
                .on_request_trailers(&mut Ctx::new(&mut WasmHost)),
        )
    }

    fn on_http_response_trailers(&mut self, _n: usize) -> pw::Action {
        action(
            self.filter
                .on_response_trailers(&mut Ctx::new(&mut WasmHost)),
        )
    }

    fn on_log(&mut self) {
        self.filter.on_log(&mut Ctx::new(&mut WasmHost));
    }
}

/// [`Host`] over the proxy-wasm ABI.
pub struct WasmHost;

fn map_type(m: MapType) -> pw::MapType {
    match m {
        MapType::RequestHeaders => pw::MapType::HttpRequestHeaders,
        MapType::RequestTrailers => pw::MapType::HttpRequestTrailers,
        MapType::ResponseHeaders => pw::MapType::HttpResponseHeaders,
        MapType::ResponseTrailers => pw::MapType::HttpResponseTrailers,
        MapType::CallResponseHeaders => pw::MapType::HttpCallResponseHeaders,
    }
}

fn buffer_type(b: BufferType) -> pw::BufferType {
    match b {
        BufferType::RequestBody => pw::BufferType::HttpRequestBody,
        BufferType::ResponseBody => pw::BufferType::HttpResponseBody,
        BufferType::CallResponseBody => pw::BufferType::HttpCallResponseBody,
    }
}

fn status(s: pw::Status) -> Status {
    match s {
        pw::Status::NotFound => Status::NotFound,
        pw::Status::BadArgument => Status::BadArgument,
        pw::Status::CasMismatch => Status::CasMismatch,
        _ => Status::InternalFailure,
    }
}

impl Host for WasmHost {
    fn map(&self, map: MapType) -> Vec<(String, String)> {
        hc::get_map(map_type(map)).unwrap_or_default()
    }
    fn map_value(&self, map: MapType, name: &str) -> Option<String> {
        hc::get_map_value(map_type(map), name).ok().flatten()
    }
    fn set_map_value(&mut self, map: MapType, name: &str, value: Option<&str>) {
        let _ = hc::set_map_value(map_type(map), name, value);
    }
    fn add_map_value(&mut self, map: MapType, name: &str, value: &str) {
        let _ = hc::add_map_value(map_type(map), name, value);
    }
    fn buffer(&self, buffer: BufferType, start: usize, max: usize) -> Option<Vec<u8>> {
        hc::get_buffer(buffer_type(buffer), start, max)
            .ok()
            .flatten()
    }
    fn set_buffer(
        &mut self,
        buffer: BufferType,
        start: usize,
        size: usize,
        value: &[u8],
    ) -> Result<(), Status> {
        hc::set_buffer(buffer_type(buffer), start, size, value).map_err(status)
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hc::get_property(path.to_vec()).ok().flatten()
    }
    fn set_property(&mut self, path: &[&str], value: &[u8]) {
        let _ = hc::set_property(path.to_vec(), Some(value));
    }
    fn send_response(&mut self, code: u16, headers: &[(&str, &str)], body: &[u8]) {
        let _ = hc::send_http_response(u32::from(code), headers.to_vec(), Some(body));
    }
    fn resume(&mut self, response: bool) {
        let _ = if response {
            hc::resume_http_response()
        } else {
            hc::resume_http_request()
        };
    }
    fn call_foreign(&mut self, name: &str, args: &[u8]) -> Result<Option<Vec<u8>>, Status> {
        hc::call_foreign_function(name, Some(args)).map_err(status)
    }
    fn dispatch_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, Status> {
        hc::dispatch_http_call(cluster, headers.to_vec(), body, vec![], timeout).map_err(status)
    }
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Result<u32, Status> {
        let kind = match kind {
            MetricKind::Counter => pw::MetricType::Counter,
            MetricKind::Gauge => pw::MetricType::Gauge,
            MetricKind::Histogram => pw::MetricType::Histogram,
        };
        hc::define_metric(kind, name).map_err(status)
    }
    fn increment_metric(&mut self, id: u32, by: i64) -> Result<(), Status> {
        hc::increment_metric(id, by).map_err(status)
    }
    fn record_metric(&mut self, id: u32, value: u64) -> Result<(), Status> {
        hc::record_metric(id, value).map_err(status)
    }
    fn shared_data(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hc::get_shared_data(key).unwrap_or((None, None))
    }
    fn set_shared_data(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Status> {
        hc::set_shared_data(key, Some(value), cas).map_err(status)
    }
    fn now(&self) -> SystemTime {
        hc::get_current_time().unwrap_or(SystemTime::UNIX_EPOCH)
    }
    fn log(&self, level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Trace => pw::LogLevel::Trace,
            LogLevel::Debug => pw::LogLevel::Debug,
            LogLevel::Info => pw::LogLevel::Info,
            LogLevel::Warn => pw::LogLevel::Warn,
            LogLevel::Error => pw::LogLevel::Error,
        };
        let _ = hc::log(level, message);
    }
}
