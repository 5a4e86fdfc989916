//! A native test harness: run a [`Filter`] with `cargo test`, no proxy needed.
//!
//! [`Harness`] parses the configuration as the proxy would; each [`TestStream`] is one HTTP
//! stream whose phases a test drives by hand, then inspects what the filter did: headers as
//! they would go upstream or downstream, a local response, callouts sent, the routing it
//! asked for (`weft.*`), metrics and logs. Shared data, metrics and the clock are shared by
//! the streams of one harness, as they are by the streams of one proxy.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use crate::ctx::Attempt;
use crate::host::{BufferType, Host, LogLevel, MapType, MetricKind, Status};
use crate::{Action, Ctx, Filter};

/// A local response a filter sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalResponse {
    /// Status.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

/// A callout a filter dispatched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// Token handed to the filter.
    pub token: u32,
    /// Target cluster.
    pub cluster: String,
    /// Headers, pseudo-headers included.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Option<Vec<u8>>,
    /// Timeout.
    pub timeout: Duration,
}

/// What a filter asked through Weft's `weft.*` extensions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routing {
    /// `weft.set_cluster`.
    pub cluster: Option<String>,
    /// `weft.set_timeout`.
    pub timeout: Option<Duration>,
    /// `weft.set_try_timeout`.
    pub try_timeout: Option<Duration>,
    /// `weft.set_attempts`.
    pub attempts: Option<u32>,
    /// `weft.retry`: the delay and whether other endpoints were asked for.
    pub retry: Option<(Duration, bool)>,
    /// `weft.delay`.
    pub delay: Option<Duration>,
    /// `weft.stream_done`: the filter said it has nothing more to do for the stream.
    pub done: bool,
}

/// State shared by the streams of a harness.
#[derive(Default)]
struct Shared {
    metrics: HashMap<String, (MetricKind, u32)>,
    values: HashMap<u32, i64>,
    recorded: HashMap<u32, Vec<u64>>,
    data: HashMap<String, (Vec<u8>, u32)>,
    elapsed: Duration,
    logs: Vec<(LogLevel, String)>,
}

/// The in-memory proxy of one [`TestStream`].
pub struct TestHost {
    maps: HashMap<MapType, Vec<(String, String)>>,
    buffers: HashMap<BufferType, Vec<u8>>,
    properties: HashMap<String, Vec<u8>>,
    local: Option<LocalResponse>,
    resumed: (bool, bool),
    calls: Vec<Call>,
    routing: Routing,
    attempt: Option<Attempt>,
    retry_allowed: bool,
    clusters: Option<Vec<String>>,
    extensions: bool,
    shared: Rc<RefCell<Shared>>,
}

impl TestHost {
    fn new(shared: Rc<RefCell<Shared>>) -> Self {
        Self {
            maps: HashMap::new(),
            buffers: HashMap::new(),
            properties: HashMap::new(),
            local: None,
            resumed: (false, false),
            calls: Vec::new(),
            routing: Routing::default(),
            attempt: None,
            retry_allowed: false,
            clusters: None,
            extensions: true,
            shared,
        }
    }
}

impl Host for TestHost {
    fn map(&self, map: MapType) -> Vec<(String, String)> {
        self.maps.get(&map).cloned().unwrap_or_default()
    }
    fn map_value(&self, map: MapType, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        self.maps
            .get(&map)?
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
    }
    fn set_map_value(&mut self, map: MapType, name: &str, value: Option<&str>) {
        let name = name.to_ascii_lowercase();
        let pairs = self.maps.entry(map).or_default();
        let at = pairs.iter().position(|(k, _)| *k == name);
        pairs.retain(|(k, _)| *k != name);
        if let Some(v) = value {
            let at = at.unwrap_or(pairs.len()).min(pairs.len());
            pairs.insert(at, (name, v.to_owned()));
        }
    }
    fn add_map_value(&mut self, map: MapType, name: &str, value: &str) {
        self.maps
            .entry(map)
            .or_default()
            .push((name.to_ascii_lowercase(), value.to_owned()));
    }
    fn buffer(&self, buffer: BufferType, start: usize, max: usize) -> Option<Vec<u8>> {
        let b = self.buffers.get(&buffer)?;
        let start = start.min(b.len());
        let end = start.saturating_add(max).min(b.len());
        Some(b[start..end].to_vec())
    }
    fn set_buffer(
        &mut self,
        buffer: BufferType,
        start: usize,
        size: usize,
        value: &[u8],
    ) -> Result<(), Status> {
        let b = self.buffers.get_mut(&buffer).ok_or(Status::NotFound)?;
        let start = start.min(b.len());
        let end = start.saturating_add(size).min(b.len());
        b.splice(start..end, value.iter().copied());
        Ok(())
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.properties.get(&path.join(".")).cloned()
    }
    fn set_property(&mut self, path: &[&str], value: &[u8]) {
        self.properties.insert(path.join("."), value.to_vec());
    }
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        self.local = Some(LocalResponse {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            body: body.to_vec(),
        });
    }
    fn resume(&mut self, response: bool) {
        if response {
            self.resumed.1 = true;
        } else {
            self.resumed.0 = true;
        }
    }
    fn call_foreign(&mut self, name: &str, args: &[u8]) -> Result<Option<Vec<u8>>, Status> {
        if !self.extensions {
            return Err(Status::NotFound);
        }
        use weft_abi::ext;
        let ms = |a: &[u8]| -> Result<Duration, Status> {
            ext::decode_millis(a)
                .map(Duration::from_millis)
                .map_err(|_| Status::BadArgument)
        };
        match name {
            ext::SET_CLUSTER => {
                let c = String::from_utf8(args.to_vec()).map_err(|_| Status::BadArgument)?;
                if self
                    .clusters
                    .as_ref()
                    .is_some_and(|known| !known.contains(&c))
                {
                    return Err(Status::NotFound);
                }
                self.routing.cluster = Some(c);
            }
            ext::SET_TIMEOUT => self.routing.timeout = Some(ms(args)?),
            ext::DELAY => self.routing.delay = Some(ms(args)?),
            ext::SET_TRY_TIMEOUT => self.routing.try_timeout = Some(ms(args)?),
            ext::SET_ATTEMPTS => match ext::decode_attempts(args) {
                Ok(0) | Err(_) => return Err(Status::BadArgument),
                Ok(n) => self.routing.attempts = Some(n.min(ext::MAX_ATTEMPTS)),
            },
            ext::ATTEMPT => {
                return self
                    .attempt
                    .map(|a| Some(a.to_bytes().to_vec()))
                    .ok_or(Status::BadArgument);
            }
            ext::RETRY => {
                let r = ext::RetryArgs::decode(args).map_err(|_| Status::BadArgument)?;
                if !self.retry_allowed {
                    return Err(Status::BadArgument);
                }
                self.routing.retry = Some((Duration::from_millis(r.delay_ms), r.exclude_tried));
            }
            // The harness calls every phase anyway: a filter's tests see all of them.
            ext::UNUSED => {
                let name = std::str::from_utf8(args).map_err(|_| Status::BadArgument)?;
                ext::skippable_bit(name).ok_or(Status::BadArgument)?;
            }
            ext::STREAM_DONE if args.is_empty() => self.routing.done = true,
            // As the proxy answers it: what `property` gives for each path, in order.
            ext::PROPERTIES => {
                let paths = ext::decode_property_paths(args).map_err(|_| Status::BadArgument)?;
                let mut out = Vec::new();
                for path in paths {
                    let path = String::from_utf8_lossy(path);
                    let segments: Vec<&str> = path.split('\0').collect();
                    ext::encode_property_value(&mut out, self.property(&segments).as_deref());
                }
                return Ok(Some(out));
            }
            _ => return Err(Status::NotFound),
        }
        Ok(None)
    }
    fn dispatch_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, Status> {
        for required in [":method", ":path", ":authority"] {
            if !headers.iter().any(|(k, _)| *k == required) {
                return Err(Status::BadArgument);
            }
        }
        let token = self.calls.len() as u32 + 1;
        self.calls.push(Call {
            token,
            cluster: cluster.to_owned(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            body: body.map(<[u8]>::to_vec),
            timeout,
        });
        Ok(token)
    }
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Result<u32, Status> {
        let mut s = self.shared.borrow_mut();
        let next = s.metrics.len() as u32 + 1;
        let (k, id) = *s.metrics.entry(name.to_owned()).or_insert((kind, next));
        if k != kind {
            return Err(Status::BadArgument);
        }
        Ok(id)
    }
    fn increment_metric(&mut self, id: u32, by: i64) -> Result<(), Status> {
        *self.shared.borrow_mut().values.entry(id).or_default() += by;
        Ok(())
    }
    fn record_metric(&mut self, id: u32, value: u64) -> Result<(), Status> {
        let mut s = self.shared.borrow_mut();
        s.values.insert(id, value as i64);
        s.recorded.entry(id).or_default().push(value);
        Ok(())
    }
    fn shared_data(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        match self.shared.borrow().data.get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }
    fn set_shared_data(&mut self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Status> {
        let mut s = self.shared.borrow_mut();
        let current = s.data.get(key).map_or(0, |(_, c)| *c);
        if cas.is_some_and(|c| c != 0 && c != current) {
            return Err(Status::CasMismatch);
        }
        s.data.insert(key.to_owned(), (value.to_vec(), current + 1));
        Ok(())
    }
    fn now(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + self.shared.borrow().elapsed
    }
    fn log(&self, level: LogLevel, message: &str) {
        self.shared
            .borrow_mut()
            .logs
            .push((level, message.to_owned()));
    }
}

/// A filter under test, with its parsed configuration.
pub struct Harness<F: Filter> {
    config: Rc<F::Config>,
    shared: Rc<RefCell<Shared>>,
    clusters: Option<Vec<String>>,
}

impl<F: Filter> Harness<F> {
    /// Parses `config` (JSON, as the proxy hands it to the filter); the error is the one
    /// the proxy would log when refusing the chain.
    pub fn new(config: &str) -> Result<Self, String> {
        Ok(Self {
            config: Rc::new(crate::parse_config::<F>(config.as_bytes())?),
            shared: Rc::default(),
            clusters: None,
        })
    }

    /// Declares the proxy's clusters: `weft.set_cluster` to any other is `NotFound`.
    pub fn with_clusters(mut self, clusters: &[&str]) -> Self {
        self.clusters = Some(clusters.iter().map(|c| (*c).to_owned()).collect());
        self
    }

    /// A new stream.
    pub fn stream(&mut self) -> TestStream<F> {
        let mut host = TestHost::new(self.shared.clone());
        host.clusters = self.clusters.clone();
        TestStream {
            filter: F::new(&self.config),
            host,
            forwarded: (Vec::new(), Vec::new()),
        }
    }

    /// Runs [`Filter::on_tick`] once, as a worker's timer would (outside any stream).
    pub fn tick(&mut self) {
        let mut host = TestHost::new(self.shared.clone());
        host.clusters = self.clusters.clone();
        F::on_tick(&self.config, &mut Ctx::new(&mut host));
    }

    /// The tick period the filter asks for.
    pub fn tick_period(&self) -> Option<Duration> {
        F::tick_period(&self.config)
    }

    /// Moves the clock on.
    pub fn advance(&mut self, by: Duration) {
        self.shared.borrow_mut().elapsed += by;
    }

    /// A counter's or gauge's value (`None` when never defined).
    pub fn metric(&self, name: &str) -> Option<i64> {
        let s = self.shared.borrow();
        let (_, id) = s.metrics.get(name)?;
        Some(s.values.get(id).copied().unwrap_or(0))
    }

    /// The values recorded in a histogram.
    pub fn recorded(&self, name: &str) -> Vec<u64> {
        let s = self.shared.borrow();
        s.metrics
            .get(name)
            .and_then(|(_, id)| s.recorded.get(id).cloned())
            .unwrap_or_default()
    }

    /// Log lines written so far.
    pub fn logs(&self) -> Vec<(LogLevel, String)> {
        self.shared.borrow().logs.clone()
    }

    /// The value of a shared-data key.
    pub fn shared_data(&self, key: &str) -> Option<Vec<u8>> {
        self.shared.borrow().data.get(key).map(|(v, _)| v.clone())
    }
}

/// A callout's answer in a test: status, headers, body.
pub type CallAnswer<'a> = (u16, &'a [(&'a str, &'a str)], &'a [u8]);

/// One stream through a filter under test.
pub struct TestStream<F: Filter> {
    filter: F,
    /// The in-memory proxy (public for tests that need more than the helpers).
    pub host: TestHost,
    /// Body bytes the filter let through, (request, response).
    forwarded: (Vec<u8>, Vec<u8>),
}

impl<F: Filter> TestStream<F> {
    /// Sets the request head: pseudo-headers from `method`, `path` and the `host` header.
    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> &mut Self {
        let host = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("host"))
            .map_or("", |(_, v)| *v);
        let mut pairs = vec![
            (":method".to_owned(), method.to_owned()),
            (":path".to_owned(), path.to_owned()),
            (":authority".to_owned(), host.to_owned()),
            (":scheme".to_owned(), "http".to_owned()),
        ];
        for (k, v) in headers {
            if !k.eq_ignore_ascii_case("host") {
                pairs.push((k.to_ascii_lowercase(), (*v).to_owned()));
            }
        }
        self.host.maps.insert(MapType::RequestHeaders, pairs);
        self.host
            .properties
            .insert("request.path".into(), path.as_bytes().to_vec());
        self
    }

    /// Sets a property the proxy would provide (`"source.address"`, …).
    pub fn property(&mut self, path: &str, value: &[u8]) -> &mut Self {
        self.host.properties.insert(path.to_owned(), value.to_vec());
        self
    }

    /// Runs the request headers phase.
    pub fn request_headers(&mut self, end_of_stream: bool) -> Action {
        self.filter
            .on_request_headers(&mut Ctx::new(&mut self.host), end_of_stream)
    }

    /// Runs the request body phase with one more piece; what the filter lets through (on
    /// `Continue`) is appended to [`Self::forwarded_request_body`].
    pub fn request_body(&mut self, piece: &[u8], end_of_stream: bool) -> Action {
        self.body(BufferType::RequestBody, piece, end_of_stream)
    }

    /// Runs the request trailers phase with `trailers`.
    pub fn request_trailers(&mut self, trailers: &[(&str, &str)]) -> Action {
        let pairs = trailers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned()))
            .collect();
        self.host.maps.insert(MapType::RequestTrailers, pairs);
        self.filter
            .on_request_trailers(&mut Ctx::new(&mut self.host))
    }

    /// Runs the response trailers phase with `trailers`.
    pub fn response_trailers(&mut self, trailers: &[(&str, &str)]) -> Action {
        let pairs = trailers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned()))
            .collect();
        self.host.maps.insert(MapType::ResponseTrailers, pairs);
        self.filter
            .on_response_trailers(&mut Ctx::new(&mut self.host))
    }

    /// A trailer as it would go on (request or response).
    pub fn trailer(&self, response: bool, name: &str) -> Option<String> {
        let map = if response {
            MapType::ResponseTrailers
        } else {
            MapType::RequestTrailers
        };
        self.host.map_value(map, name)
    }

    /// Sets the response head (`:status` first).
    pub fn response(&mut self, status: u16, headers: &[(&str, &str)]) -> &mut Self {
        let mut pairs = vec![(":status".to_owned(), status.to_string())];
        pairs.extend(
            headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned())),
        );
        self.host.maps.insert(MapType::ResponseHeaders, pairs);
        self.host.properties.insert(
            "response.code".into(),
            i64::from(status).to_le_bytes().to_vec(),
        );
        self
    }

    /// Sets the attempt the response belongs to (`weft.attempt`) and whether the proxy could
    /// make another.
    pub fn attempt(&mut self, attempt: Attempt, retry_allowed: bool) -> &mut Self {
        self.host.attempt = Some(attempt);
        self.host.retry_allowed = retry_allowed;
        self.host.routing.retry = None;
        self
    }

    /// Runs the response headers phase.
    pub fn response_headers(&mut self, end_of_stream: bool) -> Action {
        self.filter
            .on_response_headers(&mut Ctx::new(&mut self.host), end_of_stream)
    }

    /// Runs the response body phase with one more piece.
    pub fn response_body(&mut self, piece: &[u8], end_of_stream: bool) -> Action {
        self.body(BufferType::ResponseBody, piece, end_of_stream)
    }

    fn body(&mut self, which: BufferType, piece: &[u8], end_of_stream: bool) -> Action {
        let buf = self.host.buffers.entry(which).or_default();
        buf.extend_from_slice(piece);
        let size = buf.len();
        let mut cx = Ctx::new(&mut self.host);
        let action = match which {
            BufferType::RequestBody => self.filter.on_request_body(&mut cx, size, end_of_stream),
            _ => self.filter.on_response_body(&mut cx, size, end_of_stream),
        };
        if action == Action::Continue || end_of_stream {
            let through = self.host.buffers.remove(&which).unwrap_or_default();
            match which {
                BufferType::RequestBody => self.forwarded.0.extend(through),
                _ => self.forwarded.1.extend(through),
            }
        }
        action
    }

    /// Delivers the answer to callout `token`: `None` for a failed callout.
    pub fn call_response(&mut self, token: u32, answer: Option<CallAnswer<'_>>) -> &mut Self {
        let (status, headers, body) = match answer {
            Some((s, h, b)) => {
                let mut pairs = vec![(":status".to_owned(), s.to_string())];
                pairs.extend(h.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
                (Some(s), pairs, b.to_vec())
            }
            None => (None, Vec::new(), Vec::new()),
        };
        self.host.maps.insert(MapType::CallResponseHeaders, headers);
        self.host.buffers.insert(BufferType::CallResponseBody, body);
        self.filter
            .on_call_response(&mut Ctx::new(&mut self.host), token, status);
        self.host.maps.remove(&MapType::CallResponseHeaders);
        self.host.buffers.remove(&BufferType::CallResponseBody);
        self
    }

    /// Ends the stream (`on_log`).
    pub fn finish(&mut self) {
        self.filter.on_log(&mut Ctx::new(&mut self.host));
    }

    /// A request header as it would go upstream.
    pub fn request_header(&self, name: &str) -> Option<String> {
        self.host.map_value(MapType::RequestHeaders, name)
    }

    /// A response header as it would go downstream.
    pub fn response_header(&self, name: &str) -> Option<String> {
        self.host.map_value(MapType::ResponseHeaders, name)
    }

    /// The local response the filter sent, if any.
    pub fn local_response(&self) -> Option<&LocalResponse> {
        self.host.local.as_ref()
    }

    /// Callouts dispatched so far.
    pub fn calls(&self) -> &[Call] {
        &self.host.calls
    }

    /// Whether the filter resumed the request / the response.
    pub fn resumed(&self) -> (bool, bool) {
        self.host.resumed
    }

    /// What the filter asked through `weft.*` extensions.
    pub fn routing(&self) -> &Routing {
        &self.host.routing
    }

    /// Request body the filter let through.
    pub fn forwarded_request_body(&self) -> &[u8] {
        &self.forwarded.0
    }

    /// Response body the filter let through.
    pub fn forwarded_response_body(&self) -> &[u8] {
        &self.forwarded.1
    }

    /// Makes the `weft.*` extensions answer `NotFound`, as on another proxy-wasm host.
    pub fn without_extensions(&mut self) -> &mut Self {
        self.host.extensions = false;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AttemptError;

    /// Buffers the request body to its end and upper-cases it; retries 503s once.
    struct Upper;

    impl Filter for Upper {
        type Config = Option<serde_json::Value>;
        fn new(_: &Rc<Self::Config>) -> Self {
            Upper
        }
        fn on_request_body(&mut self, cx: &mut Ctx<'_>, _n: usize, end: bool) -> Action {
            if !end {
                return Action::Pause;
            }
            let up = cx.request_body().to_ascii_uppercase();
            let _ = cx.set_request_body(&up);
            Action::Continue
        }
        fn on_response_headers(&mut self, cx: &mut Ctx<'_>, _end: bool) -> Action {
            if cx.status() == 503 && cx.retry(Duration::from_millis(5), true).is_ok() {
                return Action::Continue;
            }
            let n = cx.attempt().map_or(0, |a| a.number);
            cx.set_response_header("x-attempts", Some(&n.to_string()));
            let c = cx.counter("responses");
            if let Some(c) = c {
                cx.increment(c, 1);
            }
            Action::Continue
        }
    }

    #[test]
    fn the_harness_drives_bodies_extensions_and_metrics() {
        let mut h = Harness::<Upper>::new("").unwrap();
        let mut s = h.stream();
        s.request("POST", "/", &[("host", "svc")]);
        assert_eq!(s.request_headers(false), Action::Continue);
        assert_eq!(s.request_body(b"ab", false), Action::Pause);
        assert!(s.forwarded_request_body().is_empty(), "held while paused");
        assert_eq!(s.request_body(b"cd", true), Action::Continue);
        assert_eq!(s.forwarded_request_body(), b"ABCD");

        let failed = Attempt {
            number: 1,
            status: 503,
            error: AttemptError::ConnectFailure,
        };
        s.response(503, &[]).attempt(failed, true);
        s.response_headers(true);
        assert_eq!(s.routing().retry, Some((Duration::from_millis(5), true)));
        // No attempt left: the retry is refused and the response goes on.
        s.response(503, &[]).attempt(
            Attempt {
                number: 2,
                ..failed
            },
            false,
        );
        s.response_headers(true);
        assert_eq!(s.routing().retry, None);
        assert_eq!(s.response_header("x-attempts").as_deref(), Some("2"));
        assert_eq!(h.metric("responses"), Some(1));
    }

    /// Counts gRPC failures from trailers and publishes the count on each tick.
    struct Grpc;

    impl Filter for Grpc {
        type Config = Option<()>;
        fn new(_: &Rc<Option<()>>) -> Self {
            Grpc
        }
        fn on_response_trailers(&mut self, cx: &mut Ctx<'_>) -> Action {
            if cx.response_trailer("grpc-status").is_some_and(|s| s != "0") {
                let (v, cas) = cx.shared_data("failures");
                let n = v.map_or(0, |b| b.len()) + 1;
                let _ = cx.set_shared_data("failures", &vec![0u8; n], cas);
                cx.set_response_trailer("x-counted", Some("1"));
            }
            Action::Continue
        }
        fn tick_period(_: &Option<()>) -> Option<Duration> {
            Some(Duration::from_secs(1))
        }
        fn on_tick(_: &Rc<Option<()>>, cx: &mut Ctx<'_>) {
            let n = cx.shared_data("failures").0.map_or(0, |b| b.len());
            if let Some(g) = cx.gauge("grpc_failures") {
                cx.record(g, n as u64);
            }
        }
    }

    #[test]
    fn trailers_and_ticks_reach_the_filter() {
        let mut h = Harness::<Grpc>::new("").unwrap();
        assert_eq!(h.tick_period(), Some(Duration::from_secs(1)));
        for status in ["0", "14", "13"] {
            let mut s = h.stream();
            s.request("POST", "/svc/M", &[]);
            s.response(200, &[("content-type", "application/grpc")]);
            s.response_trailers(&[("grpc-status", status)]);
            assert_eq!(s.trailer(true, "x-counted").is_some(), status != "0");
        }
        h.tick();
        assert_eq!(h.metric("grpc_failures"), Some(2));
    }

    #[test]
    fn bad_configuration_is_a_clear_error() {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Strict {
            limit: u32,
        }
        struct F;
        impl Filter for F {
            type Config = Strict;
            fn new(_: &Rc<Strict>) -> Self {
                F
            }
        }
        let err = Harness::<F>::new(r#"{"limit": "lots"}"#).err().unwrap();
        assert!(
            err.starts_with("bad filter configuration: invalid type"),
            "{err}"
        );
        assert!(Harness::<F>::new(r#"{"limit": 3}"#).is_ok());
    }

    #[test]
    fn extensions_answer_not_found_on_another_host() {
        struct R;
        impl Filter for R {
            type Config = Option<()>;
            fn new(_: &Rc<Option<()>>) -> Self {
                R
            }
            fn on_request_headers(&mut self, cx: &mut Ctx<'_>, _: bool) -> Action {
                if cx.set_cluster("b").is_err() {
                    cx.send_response(500, &[], b"no routing here");
                    return Action::Pause;
                }
                Action::Continue
            }
        }
        let mut h = Harness::<R>::new("").unwrap().with_clusters(&["a", "b"]);
        let mut s = h.stream();
        s.request("GET", "/", &[]);
        s.request_headers(true);
        assert_eq!(s.routing().cluster.as_deref(), Some("b"));
        let mut s = h.stream();
        s.without_extensions().request("GET", "/", &[]);
        assert_eq!(s.request_headers(true), Action::Pause);
        assert_eq!(s.local_response().unwrap().status, 500);
    }
    #[test]
    fn a_property_set_reads_the_same_in_one_call_or_one_call_each() {
        thread_local! {
            static SET: crate::PropertySet<3> = crate::PropertySet::new([
                &["weft", "route"],
                &["request", "no_such_thing"],
                &["request", "duration"],
            ]);
        }
        /// Reads the set at the request head and forwards what it read.
        struct Props;
        impl Filter for Props {
            type Config = Option<()>;
            fn new(_: &Rc<Option<()>>) -> Self {
                Props
            }
            fn on_request_headers(&mut self, cx: &mut Ctx<'_>, _: bool) -> Action {
                let v = SET.with(|set| cx.read(set));
                let read = format!(
                    "{}|{:?}|{}",
                    v.text(0).unwrap_or_default(),
                    v.get(1),
                    v.int(2).unwrap_or(-1)
                );
                cx.set_request_header("x-read", Some(&read));
                Action::Continue
            }
        }
        let mut h = Harness::<Props>::new("").unwrap();
        let mut read = |extensions: bool| {
            let mut s = h.stream();
            if !extensions {
                s.without_extensions();
            }
            s.request("GET", "/", &[])
                .property("weft.route", b"r\xffoute")
                .property("request.duration", &7i64.to_le_bytes());
            s.request_headers(true);
            s.request_header("x-read")
        };
        let expected = Some("r\u{fffd}oute|None|7".to_owned());
        // Through `weft.properties`, then on a host that refuses it (one call each), and
        // from then on one call each.
        assert_eq!(read(true), expected);
        assert!(SET.with(|set| set.batched.get()));
        assert_eq!(read(false), expected);
        assert!(!SET.with(|set| set.batched.get()));
        assert_eq!(read(true), expected);
    }
}
