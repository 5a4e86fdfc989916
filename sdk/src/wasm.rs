//! The proxy-wasm glue of [`crate::export_filter!`] (wasm32 only): the root context parses
//! the configuration once, each HTTP context drives one [`Filter`] value, and [`WasmHost`]
//! implements [`Host`] over the ABI.

use std::rc::Rc;
use std::time::{Duration, SystemTime};

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types as pw;

use crate::ffi;
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
        // Buffer 7: the plugin configuration.
        let bytes = ffi::buffer(7, 0, usize::MAX).unwrap_or_default();
        match crate::parse_config::<F>(&bytes) {
            Ok(c) => {
                if let Some(period) = F::tick_period(&c) {
                    let ms = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
                    let _ = ffi::set_tick_period(ms.max(1));
                }
                self.config = Some(Rc::new(c));
                true
            }
            Err(e) => {
                ffi::log(4, &e);
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
    fn on_done(&mut self) -> bool {
        // A filter's stream ends when the proxy says: nothing to do here, ever.
        let _ = ffi::call_foreign(weft_abi::ext::UNUSED, b"proxy_on_done");
        true
    }

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

/// [`Host`] over the proxy-wasm ABI (through [`crate::ffi`], which never panics).
pub struct WasmHost;

fn map_type(m: MapType) -> u32 {
    use weft_abi::MapType as M;
    (match m {
        MapType::RequestHeaders => M::HttpRequestHeaders,
        MapType::RequestTrailers => M::HttpRequestTrailers,
        MapType::ResponseHeaders => M::HttpResponseHeaders,
        MapType::ResponseTrailers => M::HttpResponseTrailers,
        MapType::CallResponseHeaders => M::HttpCallResponseHeaders,
    }) as u32
}

fn buffer_type(b: BufferType) -> u32 {
    use weft_abi::BufferType as B;
    (match b {
        BufferType::RequestBody => B::HttpRequestBody,
        BufferType::ResponseBody => B::HttpResponseBody,
        BufferType::CallResponseBody => B::HttpCallResponseBody,
    }) as u32
}

impl Host for WasmHost {
    fn map(&self, map: MapType) -> Vec<(String, String)> {
        ffi::map(map_type(map)).unwrap_or_default()
    }
    fn map_value(&self, map: MapType, name: &str) -> Option<String> {
        ffi::map_value(map_type(map), name).ok().flatten()
    }
    fn set_map_value(&mut self, map: MapType, name: &str, value: Option<&str>) {
        let _ = ffi::set_map_value(map_type(map), name, value);
    }
    fn add_map_value(&mut self, map: MapType, name: &str, value: &str) {
        let _ = ffi::add_map_value(map_type(map), name, value);
    }
    fn buffer(&self, buffer: BufferType, start: usize, max: usize) -> Option<Vec<u8>> {
        ffi::buffer(buffer_type(buffer), start, max).ok()
    }
    fn set_buffer(
        &mut self,
        buffer: BufferType,
        start: usize,
        size: usize,
        value: &[u8],
    ) -> Result<(), Status> {
        ffi::set_buffer(buffer_type(buffer), start, size, value)
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        ffi::property(path).ok().flatten()
    }
    fn set_property(&mut self, path: &[&str], value: &[u8]) {
        let _ = ffi::set_property(path, value);
    }
    fn send_response(&mut self, code: u16, headers: &[(&str, &str)], body: &[u8]) {
        let _ = ffi::send_response(code, headers, body);
    }
    fn resume(&mut self, response: bool) {
        let _ = ffi::resume(u32::from(response));
    }
    fn call_foreign(&mut self, name: &str, args: &[u8]) -> Result<Option<Vec<u8>>, Status> {
        ffi::call_foreign(name, args)
    }
    fn dispatch_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, Status> {
        // Through proxy-wasm's own call, which records the token with the calling context:
        // its dispatcher delivers `proxy_on_http_call_response` only for tokens it knows
        // (and traps on others). The statuses it does not expect (it panics on them) are
        // never returned by a call with a cluster name and a header map: the host answers
        // OK, BadArgument or InternalFailure, as Envoy does.
        proxy_wasm::hostcalls::dispatch_http_call(
            cluster,
            headers.to_vec(),
            body,
            Vec::new(),
            timeout.min(Duration::from_millis(u64::from(u32::MAX))),
        )
        .map_err(|s| match s {
            pw::Status::BadArgument => Status::BadArgument,
            _ => Status::InternalFailure,
        })
    }
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Result<u32, Status> {
        let kind = match kind {
            MetricKind::Counter => weft_abi::MetricType::Counter,
            MetricKind::Gauge => weft_abi::MetricType::Gauge,
            MetricKind::Histogram => weft_abi::MetricType::Histogram,
        };
        ffi::define_metric(kind as u32, name)
    }
    fn increment_metric(&mut self, id: u32, by: i64) -> Result<(), Status> {
        ffi::increment_metric(id, by)
    }
    fn record_metric(&mut self, id: u32, value: u64) -> Result<(), Status> {
        ffi::record_metric(id, value)
    }
    fn shared_data(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        ffi::shared_data(key)
    }
    fn set_shared_data(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Status> {
        ffi::set_shared_data(key, value, cas.unwrap_or(0))
    }
    fn now(&self) -> SystemTime {
        ffi::now_ns().map_or(SystemTime::UNIX_EPOCH, |ns| {
            SystemTime::UNIX_EPOCH + Duration::from_nanos(ns)
        })
    }
    fn log(&self, level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Trace => weft_abi::LogLevel::Trace,
            LogLevel::Debug => weft_abi::LogLevel::Debug,
            LogLevel::Info => weft_abi::LogLevel::Info,
            LogLevel::Warn => weft_abi::LogLevel::Warn,
            LogLevel::Error => weft_abi::LogLevel::Error,
        };
        ffi::log(level as u32, message);
    }
}
