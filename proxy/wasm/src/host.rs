//! What a filter instance's host functions work on: the store's data, guest memory access,
//! the proxy-wasm map wire format, pseudo-headers and properties.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, request, response};
use wasmtime::{Caller, Extern, Memory, StoreLimits, TypedFunc};

use std::time::Duration;

use weft_core::filter::{RetryAsk, StreamInfo};
use weft_core::metrics::{FilterMetric, FilterMetricSet};

pub use weft_abi::Status;
use weft_abi::{BufferType, MapType, ext};

/// Identity and configuration of a filter (one per configured filter, shared by its
/// instances).
#[derive(Debug)]
pub struct PluginMeta {
    /// `plugin_name`.
    pub name: String,
    /// `plugin_root_id`.
    pub root_id: String,
    /// `plugin_vm_id`.
    pub vm_id: String,
    /// Handed to `on_configure`.
    pub config: Vec<u8>,
    /// Handed to `on_vm_start`.
    pub vm_config: Vec<u8>,
}

/// A local response a filter asked for.
#[derive(Debug)]
pub struct LocalResponse {
    /// Status code.
    pub status: u16,
    /// `response.code_details`.
    pub details: String,
    /// Body.
    pub body: Vec<u8>,
    /// Extra headers.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The response to a callout, while `proxy_on_http_call_response` runs.
#[derive(Debug, Default)]
pub struct CalloutResponse {
    /// Head, when there is a response.
    pub head: Option<response::Parts>,
    /// Body.
    pub body: Vec<u8>,
}

/// A body buffer a filter sees: the chunk as it arrived (shared, not copied) until the filter
/// buffers more or rewrites it.
#[derive(Debug)]
pub enum BodyBuf {
    /// Bytes as received.
    Shared(Bytes),
    /// Bytes the host appended to or the filter rewrote.
    Owned(BytesMut),
}

impl Default for BodyBuf {
    fn default() -> Self {
        Self::Shared(Bytes::new())
    }
}

impl BodyBuf {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Self::Shared(b) => b,
            Self::Owned(b) => b,
        }
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// No bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn owned(&mut self) -> &mut BytesMut {
        if let Self::Shared(b) = self {
            *self = Self::Owned(BytesMut::from(&b[..]));
        }
        match self {
            Self::Owned(b) => b,
            Self::Shared(_) => unreachable!("made owned above"),
        }
    }

    /// Appends a chunk.
    pub fn append(&mut self, data: Bytes) {
        if self.is_empty() {
            *self = Self::Shared(data);
        } else if !data.is_empty() {
            self.owned().extend_from_slice(&data);
        }
    }

    /// Replaces `size` bytes from `start` with `data` (`proxy_set_buffer_bytes`): a `start`
    /// at or past the end appends, `size` past the end replaces the rest.
    pub fn splice(&mut self, start: usize, size: usize, data: &[u8]) {
        let len = self.len();
        let start = start.min(len);
        let end = start.saturating_add(size).min(len);
        if start == 0 && end == len {
            *self = Self::Owned(BytesMut::from(data));
            return;
        }
        let buf = self.owned();
        let tail = buf.split_off(end);
        buf.truncate(start);
        buf.extend_from_slice(data);
        buf.extend_from_slice(&tail);
    }

    /// Takes the bytes out, leaving the buffer empty.
    pub fn take(&mut self) -> Bytes {
        match std::mem::take(self) {
            Self::Shared(b) => b,
            Self::Owned(b) => b.freeze(),
        }
    }
}

/// What a callback asked through Weft's `weft.*` foreign functions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ext {
    /// `weft.set_cluster`: index of the cluster.
    pub cluster: Option<usize>,
    /// `weft.set_timeout` (zero: none).
    pub timeout: Option<Duration>,
    /// `weft.set_try_timeout` (zero: none).
    pub try_timeout: Option<Duration>,
    /// `weft.set_attempts`.
    pub max_attempts: Option<u32>,
    /// `weft.retry`.
    pub retry: Option<RetryAsk>,
    /// `weft.delay`.
    pub delay: Option<Duration>,
}

/// Runs the Weft extension `name` (`proxy_call_foreign_function`): `Ok(Some(bytes))` to hand
/// bytes back, `Ok(None)` for none, `Err` with the status otherwise (`NOT_FOUND` for a name
/// this host does not have).
pub fn foreign(state: &mut HostState, name: &[u8], args: &[u8]) -> Result<Option<Vec<u8>>, Status> {
    let millis = |args: &[u8]| -> Result<Duration, Status> {
        ext::decode_millis(args)
            .map(Duration::from_millis)
            .map_err(|_| Status::BadArgument)
    };
    let request_phase = state.request.is_some();
    let Ok(name) = std::str::from_utf8(name) else {
        return Err(Status::NotFound);
    };
    match name {
        ext::SET_CLUSTER => {
            if !request_phase {
                return Err(Status::BadArgument);
            }
            let i = state
                .clusters
                .iter()
                .position(|c| c.as_bytes() == args)
                .ok_or(Status::NotFound)?;
            state.ext.cluster = Some(i);
            Ok(None)
        }
        ext::SET_TIMEOUT | ext::SET_TRY_TIMEOUT => {
            if !request_phase {
                return Err(Status::BadArgument);
            }
            let d = millis(args)?;
            if name == ext::SET_TIMEOUT {
                state.ext.timeout = Some(d);
            } else {
                state.ext.try_timeout = Some(d);
            }
            Ok(None)
        }
        ext::DELAY => {
            if !request_phase {
                return Err(Status::BadArgument);
            }
            state.ext.delay = Some(millis(args)?);
            Ok(None)
        }
        ext::SET_ATTEMPTS => {
            let n = ext::decode_attempts(args).map_err(|_| Status::BadArgument)?;
            if !request_phase || n == 0 {
                return Err(Status::BadArgument);
            }
            state.ext.max_attempts = Some(n.min(ext::MAX_ATTEMPTS));
            Ok(None)
        }
        ext::ATTEMPT => {
            let a = state.info.as_ref().ok_or(Status::BadArgument)?.attempt;
            let info = ext::AttemptInfo {
                number: a.number,
                status: a.status,
                error: a.error,
            };
            Ok(Some(info.encode().to_vec()))
        }
        ext::RETRY => {
            let allowed = state.info.as_ref().is_some_and(|i| i.attempt.retry_allowed);
            if state.response.is_none() || !allowed {
                return Err(Status::BadArgument);
            }
            let args = ext::RetryArgs::decode(args).map_err(|_| Status::BadArgument)?;
            state.ext.retry = Some(RetryAsk {
                delay: Duration::from_millis(args.delay_ms),
                exclude_tried: args.exclude_tried,
            });
            Ok(None)
        }
        _ => Err(Status::NotFound),
    }
}

/// The data of one filter instance's store.
pub struct HostState {
    /// Memory limit of the instance.
    pub limits: StoreLimits,
    /// The running callback's deadline bookkeeping.
    pub deadline: crate::chain::Deadline,
    /// The filter.
    pub plugin: Arc<PluginMeta>,
    /// The request head, moved in for the duration of a request callback.
    pub request: Option<request::Parts>,
    /// The response head, moved in for the duration of a response callback.
    pub response: Option<response::Parts>,
    /// The request as it went upstream, lent for body, trailers and end-of-stream callbacks
    /// (read when `request` is absent).
    pub seen_request: Option<Box<request::Parts>>,
    /// The response as it went downstream, lent likewise.
    pub seen_response: Option<Box<response::Parts>>,
    /// The body buffer a body callback sees, with its buffer type (request or response
    /// body).
    pub body: Option<(BufferType, BodyBuf)>,
    /// The trailers a trailers callback sees, with their map type (request or response
    /// trailers).
    pub trailers: Option<(MapType, HeaderMap)>,
    /// Facts about the stream being called back for.
    pub info: Option<StreamInfo>,
    /// Properties set outside stream callbacks (root context), per context.
    pub properties: HashMap<(u32, Vec<u8>), Vec<u8>>,
    /// The stream's own properties, lent for the duration of a stream callback: shared by
    /// every filter of the stream's chain, as Envoy's filter state.
    pub stream_props: Option<HashMap<Vec<u8>, Vec<u8>>>,
    /// A local response asked for during the current callback.
    pub local_response: Option<LocalResponse>,
    /// The context the current callback is for (`proxy_set_effective_context` changes it).
    pub context: u32,
    /// Requested tick period (ticks are not delivered yet).
    pub tick_period_ms: u32,
    /// Partial line written to stdout/stderr.
    pub stdout: Vec<u8>,
    /// The guest's allocator (`proxy_on_memory_allocate`, or `malloc`).
    pub alloc: Option<TypedFunc<i32, i32>>,
    /// The guest's memory.
    pub memory: Option<Memory>,
    /// Metrics the filter defines (shared by all instances).
    pub metrics: Arc<FilterMetricSet>,
    /// Metrics this instance has used, by id.
    pub metric_cache: HashMap<u32, Arc<FilterMetric>>,
    /// Clusters a callout may go to.
    pub clusters: Arc<[String]>,
    /// Callouts asked for during the current callback.
    pub callouts: Vec<weft_core::filter::Callout>,
    /// Last callout token handed out.
    pub last_token: u32,
    /// The callout response being delivered.
    pub callout_response: Option<CalloutResponse>,
    /// Set when the filter asks to continue the stream.
    pub resumed: bool,
    /// What the current callback asked through `weft.*` extensions.
    pub ext: Ext,
    /// This instance's slot on its worker (for shared-queue ownership).
    pub slot: usize,
}

impl HostState {
    /// Fresh state for an instance of `plugin` capped at `memory_bytes`.
    pub fn new(
        plugin: Arc<PluginMeta>,
        memory_bytes: usize,
        metrics: Arc<FilterMetricSet>,
        clusters: Arc<[String]>,
    ) -> Self {
        Self {
            limits: wasmtime::StoreLimitsBuilder::new()
                .memory_size(memory_bytes)
                .trap_on_grow_failure(true)
                .instances(1)
                .build(),
            deadline: Default::default(),
            plugin,
            request: None,
            response: None,
            seen_request: None,
            seen_response: None,
            body: None,
            trailers: None,
            info: None,
            properties: HashMap::new(),
            stream_props: None,
            local_response: None,
            context: 0,
            tick_period_ms: 0,
            stdout: Vec::new(),
            alloc: None,
            memory: None,
            metrics,
            metric_cache: HashMap::new(),
            clusters,
            callouts: Vec::new(),
            last_token: 0,
            callout_response: None,
            resumed: false,
            ext: Ext::default(),
            slot: usize::MAX,
        }
    }

    /// The request head a callback sees: the live one, else the recorded one.
    pub fn req(&self) -> Option<&request::Parts> {
        self.request.as_ref().or(self.seen_request.as_deref())
    }

    /// The request head, writable.
    pub fn req_mut(&mut self) -> Option<&mut request::Parts> {
        self.request.as_mut().or(self.seen_request.as_deref_mut())
    }

    /// The response head a callback sees: the live one, else the recorded one.
    pub fn resp(&self) -> Option<&response::Parts> {
        self.response.as_ref().or(self.seen_response.as_deref())
    }

    /// The response head, writable.
    pub fn resp_mut(&mut self) -> Option<&mut response::Parts> {
        self.response.as_mut().or(self.seen_response.as_deref_mut())
    }

    /// The filter metric with `id`.
    pub fn metric(&mut self, id: u32) -> Option<Arc<FilterMetric>> {
        if let Some(m) = self.metric_cache.get(&id) {
            return Some(m.clone());
        }
        let m = self.metrics.get(id)?;
        self.metric_cache.insert(id, m.clone());
        Some(m)
    }
}

/// Why a host function could not touch guest memory.
pub type MemResult<T> = Result<T, Status>;

fn memory(caller: &mut Caller<'_, HostState>) -> MemResult<Memory> {
    if let Some(m) = caller.data().memory {
        return Ok(m);
    }
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => {
            caller.data_mut().memory = Some(m);
            Ok(m)
        }
        _ => Err(Status::InternalFailure),
    }
}

/// Copies `len` bytes at `ptr` out of guest memory, bounds-checked.
pub fn read(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> MemResult<Vec<u8>> {
    let mem = memory(caller)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    mem.data(&caller)
        .get(ptr..ptr.checked_add(len).ok_or(Status::InvalidMemoryAccess)?)
        .map(<[u8]>::to_vec)
        .ok_or(Status::InvalidMemoryAccess)
}

/// Writes `bytes` at `ptr` in guest memory, bounds-checked.
pub fn write(caller: &mut Caller<'_, HostState>, ptr: i32, bytes: &[u8]) -> MemResult<()> {
    let mem = memory(caller)?;
    let ptr = ptr as u32 as usize;
    let end = ptr
        .checked_add(bytes.len())
        .ok_or(Status::InvalidMemoryAccess)?;
    mem.data_mut(&mut *caller)
        .get_mut(ptr..end)
        .ok_or(Status::InvalidMemoryAccess)?
        .copy_from_slice(bytes);
    Ok(())
}

/// Writes a little-endian u32 at `ptr`.
pub fn write_u32(caller: &mut Caller<'_, HostState>, ptr: i32, v: u32) -> MemResult<()> {
    write(caller, ptr, &v.to_le_bytes())
}

/// Hands `bytes` to the guest: allocates them with the guest's allocator, copies them in and
/// stores pointer and length at `ret_ptr` / `ret_len`, as the SDKs expect (they take
/// ownership of the allocation). A trap inside the guest allocator is returned as an error.
pub fn give(
    caller: &mut Caller<'_, HostState>,
    bytes: &[u8],
    ret_ptr: i32,
    ret_len: i32,
) -> wasmtime::Result<Status> {
    let alloc = match caller.data().alloc.clone() {
        Some(a) => a,
        None => {
            let f = caller
                .get_export("proxy_on_memory_allocate")
                .or_else(|| caller.get_export("malloc"))
                .and_then(Extern::into_func);
            let Some(f) = f else {
                return Ok(Status::InternalFailure);
            };
            let typed = f.typed::<i32, i32>(&caller)?;
            caller.data_mut().alloc = Some(typed.clone());
            typed
        }
    };
    let len = i32::try_from(bytes.len()).map_err(|_| wasmtime::format_err!("value too large"))?;
    let ptr = alloc.call(&mut *caller, len)?;
    if ptr == 0 && !bytes.is_empty() {
        return Ok(Status::InternalFailure);
    }
    let status = write(caller, ptr, bytes)
        .and_then(|_| write_u32(caller, ret_ptr, ptr as u32))
        .and_then(|_| write_u32(caller, ret_len, len as u32));
    Ok(match status {
        Ok(()) => Status::Ok,
        Err(s) => s,
    })
}

/// Which header map a call means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// Request headers (with `:method`, `:path`, `:authority`, `:scheme`).
    RequestHeaders,
    /// Response headers (with `:status`).
    ResponseHeaders,
    /// Headers of the callout response being delivered (with `:status`).
    CalloutHeaders,
    /// Request or response trailers, while a trailers callback runs.
    Trailers(MapType),
    /// A map this host does not keep (gRPC metadata, callout trailers): reads as empty,
    /// writes are dropped.
    Unavailable,
}

impl MapKind {
    /// From the ABI's map type; `None` for a number the ABI does not define.
    pub fn from_abi(t: i32) -> Option<Self> {
        Some(match MapType::from_i32(t)? {
            MapType::HttpRequestHeaders => Self::RequestHeaders,
            MapType::HttpResponseHeaders => Self::ResponseHeaders,
            MapType::HttpCallResponseHeaders => Self::CalloutHeaders,
            t @ (MapType::HttpRequestTrailers | MapType::HttpResponseTrailers) => Self::Trailers(t),
            MapType::GrpcReceiveInitialMetadata
            | MapType::GrpcReceiveTrailingMetadata
            | MapType::HttpCallResponseTrailers => Self::Unavailable,
        })
    }
}

fn authority(parts: &request::Parts) -> Option<&[u8]> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().as_bytes())
        .or_else(|| parts.headers.get(http::header::HOST).map(|v| v.as_bytes()))
}

/// The pairs of a map, pseudo-headers first.
pub fn map_pairs(state: &HostState, kind: MapKind) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let headers = match kind {
        MapKind::RequestHeaders => {
            let Some(p) = state.req() else { return out };
            out.push((b":method".to_vec(), p.method.as_str().as_bytes().to_vec()));
            out.push((
                b":path".to_vec(),
                p.uri
                    .path_and_query()
                    .map_or(b"/".to_vec(), |pq| pq.as_str().as_bytes().to_vec()),
            ));
            if let Some(a) = authority(p) {
                out.push((b":authority".to_vec(), a.to_vec()));
            }
            out.push((b":scheme".to_vec(), b"http".to_vec()));
            &p.headers
        }
        MapKind::ResponseHeaders | MapKind::CalloutHeaders => {
            let head = if kind == MapKind::ResponseHeaders {
                state.resp()
            } else {
                state
                    .callout_response
                    .as_ref()
                    .and_then(|r| r.head.as_ref())
            };
            let Some(p) = head else { return out };
            out.push((b":status".to_vec(), p.status.as_str().as_bytes().to_vec()));
            &p.headers
        }
        MapKind::Trailers(t) => match &state.trailers {
            Some((kind, map)) if *kind == t => map,
            _ => return out,
        },
        MapKind::Unavailable => return out,
    };
    for (k, v) in headers {
        out.push((k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()));
    }
    out
}

/// One value of a map (the first, for repeated headers).
pub fn map_get(state: &HostState, kind: MapKind, key: &[u8]) -> Option<Vec<u8>> {
    match (kind, key) {
        (MapKind::RequestHeaders | MapKind::ResponseHeaders | MapKind::CalloutHeaders, k)
            if k.starts_with(b":") =>
        {
            map_pairs(state, kind)
                .into_iter()
                .find(|(name, _)| name == key)
                .map(|(_, v)| v)
        }
        (MapKind::RequestHeaders, k) => state
            .req()?
            .headers
            .get(HeaderName::from_bytes(k).ok()?)
            .map(|v| v.as_bytes().to_vec()),
        (MapKind::ResponseHeaders, k) => state
            .resp()?
            .headers
            .get(HeaderName::from_bytes(k).ok()?)
            .map(|v| v.as_bytes().to_vec()),
        (MapKind::CalloutHeaders, k) => state
            .callout_response
            .as_ref()?
            .head
            .as_ref()?
            .headers
            .get(HeaderName::from_bytes(k).ok()?)
            .map(|v| v.as_bytes().to_vec()),
        (MapKind::Trailers(t), k) => match &state.trailers {
            Some((kind, map)) if *kind == t => map
                .get(HeaderName::from_bytes(k).ok()?)
                .map(|v| v.as_bytes().to_vec()),
            _ => None,
        },
        (MapKind::Unavailable, _) => None,
    }
}

/// How a map is changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapEdit {
    /// Add a value (repeated headers allowed).
    Add,
    /// Replace all values.
    Replace,
    /// Remove all values.
    Remove,
}

/// Applies an edit; returns false when the name or value is not valid HTTP (the edit is then
/// dropped: the SDKs only accept `Ok` from these calls).
pub fn map_edit(
    state: &mut HostState,
    kind: MapKind,
    edit: MapEdit,
    key: &[u8],
    value: &[u8],
) -> bool {
    match kind {
        MapKind::RequestHeaders => {
            let Some(p) = state.req_mut() else {
                return true;
            };
            if key.starts_with(b":") {
                return edit == MapEdit::Remove || set_request_pseudo(p, key, value);
            }
            edit_headers(&mut p.headers, edit, key, value)
        }
        MapKind::ResponseHeaders => {
            let Some(p) = state.resp_mut() else {
                return true;
            };
            if key == b":status" {
                if edit == MapEdit::Remove {
                    return true;
                }
                return std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse::<u16>().ok())
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .map(|s| p.status = s)
                    .is_some();
            }
            if key.starts_with(b":") {
                return true;
            }
            edit_headers(&mut p.headers, edit, key, value)
        }
        MapKind::Trailers(t) => match &mut state.trailers {
            Some((kind, map)) if *kind == t && !key.starts_with(b":") => {
                edit_headers(map, edit, key, value)
            }
            _ => true,
        },
        // Callout responses are read-only.
        MapKind::CalloutHeaders | MapKind::Unavailable => true,
    }
}

/// Replaces a whole map with `pairs`.
pub fn map_set_all(state: &mut HostState, kind: MapKind, pairs: &[(&[u8], &[u8])]) -> bool {
    match kind {
        MapKind::RequestHeaders => {
            if let Some(p) = state.req_mut() {
                p.headers.clear();
            }
        }
        MapKind::ResponseHeaders => {
            if let Some(p) = state.resp_mut() {
                p.headers.clear();
            }
        }
        MapKind::Trailers(t) => {
            if let Some((kind, map)) = state.trailers.as_mut()
                && *kind == t
            {
                map.clear();
            }
        }
        MapKind::CalloutHeaders | MapKind::Unavailable => return true,
    }
    pairs
        .iter()
        .all(|(k, v)| map_edit(state, kind, MapEdit::Add, k, v))
}

fn edit_headers(headers: &mut HeaderMap, edit: MapEdit, key: &[u8], value: &[u8]) -> bool {
    let Ok(name) = HeaderName::from_bytes(key) else {
        return false;
    };
    if edit == MapEdit::Remove {
        headers.remove(name);
        return true;
    }
    let Ok(value) = HeaderValue::from_bytes(value) else {
        return false;
    };
    match edit {
        MapEdit::Add => {
            headers.append(name, value);
        }
        MapEdit::Replace => {
            headers.insert(name, value);
        }
        MapEdit::Remove => {}
    }
    true
}

fn set_request_pseudo(p: &mut request::Parts, key: &[u8], value: &[u8]) -> bool {
    match key {
        b":method" => Method::from_bytes(value).map(|m| p.method = m).is_ok(),
        b":path" => {
            let mut parts = p.uri.clone().into_parts();
            match http::uri::PathAndQuery::try_from(value) {
                Ok(pq) => parts.path_and_query = Some(pq),
                Err(_) => return false,
            }
            Uri::from_parts(parts).map(|u| p.uri = u).is_ok()
        }
        b":authority" => {
            let Ok(v) = HeaderValue::from_bytes(value) else {
                return false;
            };
            if p.uri.authority().is_some() {
                let mut parts = p.uri.clone().into_parts();
                match http::uri::Authority::try_from(value) {
                    Ok(a) => parts.authority = Some(a),
                    Err(_) => return false,
                }
                if let Ok(u) = Uri::from_parts(parts) {
                    p.uri = u;
                }
            }
            p.headers.insert(http::header::HOST, v);
            true
        }
        // The scheme of a plain-HTTP listener cannot change.
        _ => true,
    }
}

/// A property value in Envoy's encodings: strings as bytes, integers as 8-byte little-endian.
pub fn property(state: &HostState, path: &[u8]) -> Option<Vec<u8>> {
    let segments: Vec<&[u8]> = path.split(|b| *b == 0).filter(|s| !s.is_empty()).collect();
    let int = |v: i64| Some(v.to_le_bytes().to_vec());
    let text = |s: &str| Some(s.as_bytes().to_vec());
    let info = state.info.as_ref();
    match segments.as_slice() {
        [b"plugin_name"] => text(&state.plugin.name),
        [b"plugin_root_id"] => text(&state.plugin.root_id),
        [b"plugin_vm_id"] => text(&state.plugin.vm_id),
        [b"source", b"address"] => text(&info?.source.to_string()),
        [b"source", b"port"] => int(info?.source.port().into()),
        [b"destination", b"address"] => text(&info?.destination.to_string()),
        [b"destination", b"port"] => int(info?.destination.port().into()),
        [b"connection", b"id"] => int(info?.connection_id as i64),
        [b"xds", b"cluster_name"] => text(state.clusters.get(info?.cluster? as usize)?),
        [b"upstream", b"address"] => text(&info?.upstream?.to_string()),
        [b"upstream", b"port"] => int(info?.upstream?.port().into()),
        [b"request", rest @ ..] => {
            let req = state.req();
            match rest {
                [b"path"] => map_get(state, MapKind::RequestHeaders, b":path"),
                [b"url_path"] => text(req?.uri.path()),
                [b"host"] => authority(req?).map(<[u8]>::to_vec),
                [b"scheme"] => text("http"),
                [b"method"] => text(req?.method.as_str()),
                [b"protocol"] => text(match req?.version {
                    http::Version::HTTP_2 => "HTTP/2",
                    http::Version::HTTP_10 => "HTTP/1.0",
                    _ => "HTTP/1.1",
                }),
                [b"id"] => map_get(state, MapKind::RequestHeaders, b"x-request-id"),
                [b"headers"] => {
                    let pairs = map_pairs(state, MapKind::RequestHeaders);
                    Some(weft_abi::map::serialize(pairs.iter().map(|(k, v)| (k, v))))
                }
                [b"headers", name] => map_get(state, MapKind::RequestHeaders, name),
                [b"time"] => int(info?.start_unix_ns as i64),
                [b"duration"] => {
                    int(weft_core::clock::now_ns().saturating_sub(info?.start_ns) as i64)
                }
                [b"size"] => int(content_length(&req?.headers)),
                _ => None,
            }
        }
        [b"response", rest @ ..] => {
            let resp = state.resp();
            match rest {
                [b"code"] => int(resp?.status.as_u16().into()),
                [b"code_details"] => text(info?.attempt.error.code_details()),
                [b"headers"] => {
                    let pairs = map_pairs(state, MapKind::ResponseHeaders);
                    Some(weft_abi::map::serialize(pairs.iter().map(|(k, v)| (k, v))))
                }
                [b"headers", name] => map_get(state, MapKind::ResponseHeaders, name),
                [b"size"] => int(content_length(&resp?.headers)),
                _ => None,
            }
        }
        _ => match &state.stream_props {
            Some(props) => props.get(path).cloned(),
            None => state
                .properties
                .get(&(state.context, path.to_vec()))
                .cloned(),
        },
    }
}

fn content_length(headers: &HeaderMap) -> i64 {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> HostState {
        let meta = Arc::new(PluginMeta {
            name: "f".into(),
            root_id: "r".into(),
            vm_id: "v".into(),
            config: vec![],
            vm_config: vec![],
        });
        let mut s = HostState::new(meta, 1 << 20, Arc::default(), Arc::from(Vec::new()));
        let (parts, ()) = http::Request::get("/a/b?q=1")
            .header("host", "svc:8080")
            .header("x-request-id", "rid")
            .body(())
            .unwrap()
            .into_parts();
        s.request = Some(parts);
        s
    }

    #[test]
    fn pseudo_headers_read_and_write_through_to_the_request() {
        let mut s = state();
        assert_eq!(
            map_get(&s, MapKind::RequestHeaders, b":path").unwrap(),
            b"/a/b?q=1"
        );
        assert_eq!(
            map_get(&s, MapKind::RequestHeaders, b":authority").unwrap(),
            b"svc:8080"
        );
        assert!(map_edit(
            &mut s,
            MapKind::RequestHeaders,
            MapEdit::Replace,
            b":path",
            b"/new"
        ));
        assert!(map_edit(
            &mut s,
            MapKind::RequestHeaders,
            MapEdit::Replace,
            b":method",
            b"POST"
        ));
        let req = s.request.as_ref().unwrap();
        assert_eq!(req.uri, "/new");
        assert_eq!(req.method, Method::POST);
        assert!(!map_edit(
            &mut s,
            MapKind::RequestHeaders,
            MapEdit::Add,
            b"bad name",
            b"v"
        ));
        assert!(map_edit(
            &mut s,
            MapKind::RequestHeaders,
            MapEdit::Add,
            b"x-a",
            b"1"
        ));
        assert!(map_edit(
            &mut s,
            MapKind::RequestHeaders,
            MapEdit::Add,
            b"x-a",
            b"2"
        ));
        let pairs = map_pairs(&s, MapKind::RequestHeaders);
        assert_eq!(pairs.iter().filter(|(k, _)| k == b"x-a").count(), 2);
        assert_eq!(pairs[0].0, b":method");
    }

    #[test]
    fn body_buffer_splices_like_envoy() {
        let mut b = BodyBuf::default();
        b.append(Bytes::from_static(b"hello"));
        assert!(matches!(b, BodyBuf::Shared(_)), "first chunk is not copied");
        b.append(Bytes::from_static(b" world"));
        assert_eq!(b.as_slice(), b"hello world");
        b.splice(0, 5, b"HELLO");
        assert_eq!(b.as_slice(), b"HELLO world");
        b.splice(100, 0, b"!");
        assert_eq!(b.as_slice(), b"HELLO world!", "start past the end appends");
        b.splice(0, 0, b">");
        assert_eq!(b.as_slice(), b">HELLO world!", "size 0 at 0 prepends");
        b.splice(0, usize::MAX, b"new");
        assert_eq!(b.take(), Bytes::from_static(b"new"));
        assert!(b.is_empty());
    }

    #[test]
    fn properties_use_envoy_encodings() {
        let s = state();
        assert_eq!(property(&s, b"request\0path").unwrap(), b"/a/b?q=1");
        assert_eq!(property(&s, b"request\0url_path\0").unwrap(), b"/a/b");
        assert_eq!(property(&s, b"request\0id").unwrap(), b"rid");
        assert_eq!(property(&s, b"plugin_name").unwrap(), b"f");
        assert!(property(&s, b"response\0code").is_none(), "no response yet");
        assert!(property(&s, b"nope").is_none());
    }
}
