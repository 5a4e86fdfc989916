//! A listener's chain of WASM filters: one instance of each filter per worker thread (in a
//! thread-local), streams multiplexed onto it by proxy-wasm context id, limits and failure
//! policies applied per callback.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, request, response};
use prometheus_client::metrics::counter::Counter;
use wasmtime::{Engine, InstancePre, Store, Trap, TypedFunc};

use crate::host::BodyBuf;
use crate::host::{HostState, LocalResponse, PluginMeta};
use weft_abi::{BufferType, MapType};
use weft_config::FailurePolicy;
use weft_core::filter::{
    BodyDecision, Callout, CalloutOutcome, Direction, FilterChain, FilterStream, LocalReply,
    RequestDecision, ResponseDecision, StreamInfo,
};

/// Epoch ticks allowed to lifecycle callbacks (`_initialize`, `on_vm_start`, `on_configure`).
const LIFECYCLE_TICKS: u64 = 1000 / crate::EPOCH_TICK_MS + 1;
/// The root context's id in every instance.
const ROOT_CONTEXT: i32 = 1;

/// How a filter failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// A trap (panic, `unreachable`, bad memory access, `proc_exit`).
    Trap,
    /// The callback ran past its deadline.
    Deadline,
    /// The instance hit its memory cap.
    Memory,
    /// A fresh instance could not start (instantiate, `on_vm_start`, `on_configure`).
    Start,
}

impl FailureKind {
    /// Label value in `weft_filter_failures_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trap => "trap",
            Self::Deadline => "deadline",
            Self::Memory => "memory",
            Self::Start => "start",
        }
    }
}

/// A failure with its description.
#[derive(Debug)]
pub struct Failure {
    /// What kind.
    pub kind: FailureKind,
    /// Details (the trap message, which callback).
    pub message: String,
}

fn classify(e: wasmtime::Error, during: &str) -> Failure {
    let full = format!("{e:?}");
    let trap = e.downcast_ref::<Trap>();
    let kind = match trap {
        Some(Trap::Interrupt) => FailureKind::Deadline,
        // StoreLimits with trap_on_grow_failure reports a refused `memory.grow`.
        _ if full.contains("memory") && full.contains("grow") => FailureKind::Memory,
        _ => FailureKind::Trap,
    };
    let detail = match (kind, trap) {
        (FailureKind::Deadline, _) => "callback ran past its deadline".to_owned(),
        (FailureKind::Memory, _) => "memory limit reached".to_owned(),
        (_, Some(t)) => t.to_string(),
        (_, None) => e.root_cause().to_string(),
    };
    Failure {
        kind,
        message: format!("{during}: {detail}"),
    }
}

/// One configured filter, ready to be instantiated on any worker.
pub struct FilterSpec {
    /// Identity and configuration.
    pub meta: Arc<PluginMeta>,
    /// The module linked against the host functions.
    pub pre: InstancePre<HostState>,
    /// The engine (for stores).
    pub engine: Engine,
    /// What a failure does.
    pub policy: FailurePolicy,
    /// Linear memory cap.
    pub memory_bytes: usize,
    /// Epoch ticks allowed to a stream callback.
    pub callback_ticks: u64,
    /// `weft_filter_failures_total{filter, kind}` handles, by [`FailureKind`] order.
    pub failures: [Counter; 4],
    /// Metrics filters define.
    pub defined_metrics: Arc<weft_core::metrics::FilterMetricSet>,
    /// Whether the module exports `proxy_on_tick`.
    pub has_tick: bool,
    /// Whether the module exports body or trailers callbacks, by [`Direction`].
    pub body_callbacks: [bool; 2],
    /// Most body bytes the filter may buffer.
    pub buffer_limit: usize,
    /// Names of the clusters callouts may go to.
    pub clusters: Arc<[String]>,
}

impl FilterSpec {
    fn count(&self, f: &Failure) {
        let i = match f.kind {
            FailureKind::Trap => 0,
            FailureKind::Deadline => 1,
            FailureKind::Memory => 2,
            FailureKind::Start => 3,
        };
        self.failures[i].inc();
        tracing::warn!(filter = %self.meta.name, kind = f.kind.as_str(), "filter failed: {}", f.message);
    }
}

/// A `(context, count or size, end of stream) -> action` callback: headers and bodies.
type StreamFn = TypedFunc<(i32, i32, i32), i32>;

/// `proxy_on_http_call_response(context, token, headers, body size, trailers)`.
type CallResponseFn = TypedFunc<(i32, i32, i32, i32, i32), ()>;

/// The export name of the body callback for `direction`.
pub fn body_callback(direction: Direction) -> &'static str {
    match direction {
        Direction::Request => "proxy_on_request_body",
        Direction::Response => "proxy_on_response_body",
    }
}

/// The export name of the trailers callback for `direction`.
pub fn trailers_callback(direction: Direction) -> &'static str {
    match direction {
        Direction::Request => "proxy_on_request_trailers",
        Direction::Response => "proxy_on_response_trailers",
    }
}

/// The buffer that holds `direction`'s body during a body callback.
fn body_buffer(direction: Direction) -> BufferType {
    match direction {
        Direction::Request => BufferType::HttpRequestBody,
        Direction::Response => BufferType::HttpResponseBody,
    }
}

/// The map that holds `direction`'s trailers during a trailers callback.
fn trailers_map(direction: Direction) -> MapType {
    match direction {
        Direction::Request => MapType::HttpRequestTrailers,
        Direction::Response => MapType::HttpResponseTrailers,
    }
}

struct Exports {
    on_context_create: TypedFunc<(i32, i32), ()>,
    on_request_headers: Option<StreamFn>,
    on_response_headers: Option<StreamFn>,
    /// `proxy_on_{request,response}_body(context, buffered length, end of stream)`, by
    /// [`Direction`].
    on_body: [Option<StreamFn>; 2],
    /// `proxy_on_{request,response}_trailers(context, count)`, by [`Direction`].
    on_trailers: [Option<TypedFunc<(i32, i32), i32>>; 2],
    on_http_call_response: Option<CallResponseFn>,
    on_done: Option<TypedFunc<i32, i32>>,
    on_log: Option<TypedFunc<i32, ()>>,
    on_delete: Option<TypedFunc<i32, ()>>,
}

/// A running instance of a filter.
pub struct FilterInstance {
    store: Store<HostState>,
    exports: Exports,
    instance_tick: Option<TypedFunc<i32, ()>>,
    instance_queue_ready: Option<TypedFunc<(i32, i32), ()>>,
    next_context: i32,
}

/// Most epoch ticks a callback may run past its first deadline, whatever the CPU clock says
/// (about a second): a callback descheduled this long is stopped anyway.
const MAX_EXTRA_TICKS: u64 = 1000 / crate::EPOCH_TICK_MS;

/// Sets a callback's deadline, `ticks` epoch ticks from now.
fn arm(store: &mut Store<HostState>, ticks: u64) {
    store.data_mut().deadline = Deadline {
        window: ticks,
        cpu_mark: None,
        windows: 0,
    };
    store.set_epoch_deadline(ticks);
}

/// Where a callback stands against its deadline (see [`past_deadline`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Deadline {
    /// The deadline in epoch ticks.
    window: u64,
    /// The thread's CPU time when the first window ended.
    cpu_mark: Option<std::time::Duration>,
    /// Windows granted after the first.
    windows: u32,
}

/// Runs when a callback reaches its wall-clock deadline. A deadline is meant to stop a
/// filter that burns CPU, not one whose thread the machine took away: so the callback gets
/// more windows, and is interrupted once it has used a whole window of CPU time since the
/// first one ended (or after about a second of further windows, whatever the clock says).
/// A runaway loop is thus stopped after about twice `callback_ms` on an idle machine, later
/// on a saturated one; a callback that was preempted is not failed. The thread's CPU clock
/// is only read on this slow path.
fn past_deadline(
    mut ctx: wasmtime::StoreContextMut<'_, HostState>,
) -> wasmtime::Result<wasmtime::UpdateDeadline> {
    use wasmtime::UpdateDeadline;
    let d = &mut ctx.data_mut().deadline;
    let Ok(now) = cpu_time::ThreadTime::try_now().map(|t| t.as_duration()) else {
        return Ok(UpdateDeadline::Interrupt);
    };
    let budget = std::time::Duration::from_millis(d.window * crate::EPOCH_TICK_MS);
    let mark = *d.cpu_mark.get_or_insert(now);
    let max_windows = (MAX_EXTRA_TICKS / d.window.max(1)).max(2) as u32;
    if now.saturating_sub(mark) >= budget || d.windows >= max_windows {
        return Ok(UpdateDeadline::Interrupt);
    }
    d.windows += 1;
    Ok(UpdateDeadline::Continue(d.window.max(1)))
}

impl FilterInstance {
    /// Instantiates and starts a filter: `_initialize`/`_start`, the root context,
    /// `on_vm_start` and `on_configure`. Either returning false is a [`FailureKind::Start`].
    pub fn start(spec: &FilterSpec, slot: usize) -> Result<Self, Failure> {
        let start_err = |message: String| Failure {
            kind: FailureKind::Start,
            message,
        };
        let mut store = Store::new(
            &spec.engine,
            HostState::new(
                spec.meta.clone(),
                spec.memory_bytes,
                spec.defined_metrics.clone(),
                spec.clusters.clone(),
            ),
        );
        store.data_mut().slot = slot;
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_callback(past_deadline);
        arm(&mut store, LIFECYCLE_TICKS);
        let instance = spec
            .pre
            .instantiate(&mut store)
            .map_err(|e| classify(e, "instantiate"))?;
        for init in ["_initialize", "_start"] {
            if let Ok(f) = instance.get_typed_func::<(), ()>(&mut store, init) {
                f.call(&mut store, ()).map_err(|e| classify(e, init))?;
                break;
            }
        }
        let func = |store: &mut Store<HostState>, name: &str| instance.get_func(&mut *store, name);
        let typed3 = |store: &mut Store<HostState>, name: &str| {
            func(store, name).and_then(|f| f.typed::<(i32, i32, i32), i32>(&*store).ok())
        };
        let exports = Exports {
            on_context_create: func(&mut store, "proxy_on_context_create")
                .and_then(|f| f.typed(&store).ok())
                .ok_or_else(|| {
                    start_err("module does not export proxy_on_context_create".into())
                })?,
            on_request_headers: typed3(&mut store, "proxy_on_request_headers"),
            on_response_headers: typed3(&mut store, "proxy_on_response_headers"),
            on_body: [Direction::Request, Direction::Response]
                .map(|d| typed3(&mut store, body_callback(d))),
            on_trailers: [Direction::Request, Direction::Response]
                .map(|d| func(&mut store, trailers_callback(d)).and_then(|f| f.typed(&store).ok())),
            on_http_call_response: func(&mut store, "proxy_on_http_call_response")
                .and_then(|f| f.typed(&store).ok()),
            on_done: func(&mut store, "proxy_on_done").and_then(|f| f.typed(&store).ok()),
            on_log: func(&mut store, "proxy_on_log").and_then(|f| f.typed(&store).ok()),
            on_delete: func(&mut store, "proxy_on_delete").and_then(|f| f.typed(&store).ok()),
        };
        store.data_mut().context = ROOT_CONTEXT as u32;
        exports
            .on_context_create
            .call(&mut store, (ROOT_CONTEXT, 0))
            .map_err(|e| classify(e, "proxy_on_context_create"))?;
        let vm_len = spec.meta.vm_config.len() as i32;
        let cfg_len = spec.meta.config.len() as i32;
        for (name, len) in [
            ("proxy_on_vm_start", vm_len),
            ("proxy_on_configure", cfg_len),
        ] {
            let Some(f) = func(&mut store, name) else {
                continue;
            };
            let f = f
                .typed::<(i32, i32), i32>(&store)
                .map_err(|e| start_err(format!("{name} has the wrong type: {e}")))?;
            let ok = f
                .call(&mut store, (ROOT_CONTEXT, len))
                .map_err(|e| classify(e, name))?;
            if ok == 0 {
                return Err(start_err(format!("{name} returned false")));
            }
        }
        let instance_tick = func(&mut store, "proxy_on_tick").and_then(|f| f.typed(&store).ok());
        let instance_queue_ready =
            func(&mut store, "proxy_on_queue_ready").and_then(|f| f.typed(&store).ok());
        Ok(Self {
            store,
            exports,
            instance_tick,
            instance_queue_ready,
            next_context: ROOT_CONTEXT + 1,
        })
    }

    /// The tick period the filter asked for (0: none).
    fn tick_period_ms(&self) -> u32 {
        self.store.data().tick_period_ms
    }

    /// `proxy_on_tick` on the root context.
    fn on_tick(&mut self, ticks: u64) -> Result<(), Failure> {
        let Some(f) = &self.instance_tick else {
            return Ok(());
        };
        arm(&mut self.store, ticks);
        self.store.data_mut().context = ROOT_CONTEXT as u32;
        self.store.data_mut().info = None;
        f.call(&mut self.store, ROOT_CONTEXT)
            .map_err(|e| classify(e, "proxy_on_tick"))
    }

    /// `proxy_on_queue_ready` on the root context.
    fn on_queue_ready(&mut self, ticks: u64, token: u32) -> Result<(), Failure> {
        let Some(f) = &self.instance_queue_ready else {
            return Ok(());
        };
        arm(&mut self.store, ticks);
        self.store.data_mut().context = ROOT_CONTEXT as u32;
        self.store.data_mut().info = None;
        f.call(&mut self.store, (ROOT_CONTEXT, token as i32))
            .map_err(|e| classify(e, "proxy_on_queue_ready"))
    }

    fn new_context(&mut self, ticks: u64) -> Result<i32, Failure> {
        let id = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(ROOT_CONTEXT + 1);
        arm(&mut self.store, ticks);
        self.store.data_mut().context = id as u32;
        self.exports
            .on_context_create
            .call(&mut self.store, (id, ROOT_CONTEXT))
            .map_err(|e| classify(e, "proxy_on_context_create"))?;
        Ok(id)
    }

    /// Runs the headers callback of `H` (request or response) for `context`, with the head
    /// moved into the store for the duration of the call and back out after it, trap or not.
    fn headers<H: Head>(
        &mut self,
        ticks: u64,
        context: i32,
        head: &mut H,
        info: &StreamInfo,
        end_of_stream: bool,
        seen: &mut Seen,
    ) -> Result<Callback, Failure> {
        if H::callback(&self.exports).is_none() {
            return Ok(Callback::default());
        }
        let n = head.pairs();
        self.enter(head, info, context);
        // The request as it went upstream stays readable from the response callbacks.
        seen.lend(self.store.data_mut());
        arm(&mut self.store, ticks);
        let result = match H::callback(&self.exports) {
            Some(f) => f.call(&mut self.store, (context, n, end_of_stream as i32)),
            None => Ok(0),
        };
        seen.take_back(self.store.data_mut());
        let outcome = self.leave(head);
        let action = result.map_err(|e| classify(e, H::CALLBACK))?;
        Ok(Callback {
            paused: action == 1,
            ..outcome
        })
    }

    /// Moves a head into the store and resets the per-callback state.
    fn enter<H: Head>(&mut self, head: &mut H, info: &StreamInfo, context: i32) {
        let data = self.store.data_mut();
        *H::slot(data) = Some(std::mem::replace(head, H::empty()));
        begin_callback(data, info, context);
    }

    /// Moves the head back out and collects what the callback asked for.
    fn leave<H: Head>(&mut self, head: &mut H) -> Callback {
        let data = self.store.data_mut();
        if let Some(back) = H::slot(data).take() {
            *head = back;
        }
        data.callout_response = None;
        Callback {
            local: data.local_response.take(),
            callouts: std::mem::take(&mut data.callouts),
            resumed: data.resumed,
            paused: false,
            ext: std::mem::take(&mut data.ext),
        }
    }

    /// Delivers a callout's outcome with `proxy_on_http_call_response`, the request head in
    /// the store so the filter can still edit it.
    fn callout_response<H: Head>(
        &mut self,
        ticks: u64,
        context: i32,
        head: &mut H,
        info: &StreamInfo,
        outcome: CalloutOutcome,
        seen: &mut Seen,
    ) -> Result<Callback, Failure> {
        let Some(f) = self.exports.on_http_call_response.clone() else {
            return Ok(Callback {
                resumed: true,
                ..Callback::default()
            });
        };
        self.enter(head, info, context);
        let response = match outcome.response {
            Ok((head, body)) => crate::host::CalloutResponse {
                head: Some(head),
                body: body.to_vec(),
            },
            Err(why) => {
                tracing::debug!(filter = %self.store.data().plugin.name, "callout failed: {why}");
                crate::host::CalloutResponse::default()
            }
        };
        let headers = response
            .head
            .as_ref()
            .map_or(0, |h| h.headers.len() as i32 + 1);
        let body_len = response.body.len() as i32;
        let data = self.store.data_mut();
        data.callout_response = Some(response);
        seen.lend(data);
        arm(&mut self.store, ticks);
        let result = f.call(
            &mut self.store,
            (context, outcome.token as i32, headers, body_len, 0),
        );
        seen.take_back(self.store.data_mut());
        let outcome = self.leave(head);
        result.map_err(|e| classify(e, "proxy_on_http_call_response"))?;
        Ok(outcome)
    }

    /// `proxy_on_{request,response}_body` with `buf` as the body buffer, and the request and
    /// response heads as they went on readable as properties.
    #[allow(clippy::too_many_arguments)]
    fn body(
        &mut self,
        ticks: u64,
        context: i32,
        direction: Direction,
        buf: &mut BodyBuf,
        end_of_stream: bool,
        info: &StreamInfo,
        seen: &mut Seen,
    ) -> Result<Callback, Failure> {
        let Some(f) = &self.exports.on_body[direction as usize] else {
            return Ok(Callback::default());
        };
        let len = buf.len() as i32;
        self.store.data_mut().body = Some((body_buffer(direction), std::mem::take(buf)));
        let result = with_seen(&mut self.store, ticks, context, info, seen, |store| {
            f.call(store, (context, len, end_of_stream as i32))
        });
        if let Some((_, back)) = self.store.data_mut().body.take() {
            *buf = back;
        }
        let (action, callback) = result;
        let action = action.map_err(|e| classify(e, body_callback(direction)))?;
        Ok(Callback {
            paused: action == 1,
            ..callback
        })
    }

    /// `proxy_on_{request,response}_trailers` with `trailers` as map 1 or 3.
    fn trailers(
        &mut self,
        ticks: u64,
        context: i32,
        direction: Direction,
        trailers: &mut HeaderMap,
        info: &StreamInfo,
        seen: &mut Seen,
    ) -> Result<Callback, Failure> {
        let Some(f) = &self.exports.on_trailers[direction as usize] else {
            return Ok(Callback::default());
        };
        let map = trailers_map(direction);
        let n = trailers.len() as i32;
        self.store.data_mut().trailers = Some((map, std::mem::take(trailers)));
        let result = with_seen(&mut self.store, ticks, context, info, seen, |store| {
            f.call(store, (context, n))
        });
        if let Some((_, back)) = self.store.data_mut().trailers.take() {
            *trailers = back;
        }
        let (action, callback) = result;
        action.map_err(|e| classify(e, trailers_callback(direction)))?;
        Ok(callback)
    }

    /// `on_done`, `on_log`, `on_delete` for a finished stream's context, with the request
    /// and response as they were sent readable as properties (read-only copies).
    fn end_context(
        &mut self,
        ticks: u64,
        context: i32,
        info: &StreamInfo,
        seen: &mut Seen,
    ) -> Result<(), Failure> {
        let data = self.store.data_mut();
        data.info = Some(*info);
        data.context = context as u32;
        seen.lend(data);
        arm(&mut self.store, ticks);
        let result = self.end_callbacks(context);
        seen.take_back(self.store.data_mut());
        result
    }

    fn end_callbacks(&mut self, context: i32) -> Result<(), Failure> {
        if let Some(f) = &self.exports.on_done {
            f.call(&mut self.store, context)
                .map_err(|e| classify(e, "proxy_on_done"))?;
        }
        if let Some(f) = &self.exports.on_log {
            f.call(&mut self.store, context)
                .map_err(|e| classify(e, "proxy_on_log"))?;
        }
        if let Some(f) = &self.exports.on_delete {
            f.call(&mut self.store, context)
                .map_err(|e| classify(e, "proxy_on_delete"))?;
        }
        Ok(())
    }
}

/// Resets the per-callback state of the store for a callback on `context`.
fn begin_callback(data: &mut HostState, info: &StreamInfo, context: i32) {
    data.info = Some(*info);
    data.context = context as u32;
    data.local_response = None;
    data.callouts.clear();
    data.resumed = false;
    data.ext = Default::default();
}

/// Runs `call` with the stream's recorded heads in the store (read-only copies) and the
/// per-callback state reset; returns its result and what it asked for.
fn with_seen<R>(
    store: &mut Store<HostState>,
    ticks: u64,
    context: i32,
    info: &StreamInfo,
    seen: &mut Seen,
    call: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
) -> (wasmtime::Result<R>, Callback) {
    let data = store.data_mut();
    begin_callback(data, info, context);
    seen.lend(data);
    arm(store, ticks);
    let result = call(store);
    let data = store.data_mut();
    seen.take_back(data);
    let callback = Callback {
        local: data.local_response.take(),
        // Callouts are only sent from request headers; others are dropped.
        callouts: Vec::new(),
        resumed: data.resumed,
        paused: false,
        ext: std::mem::take(&mut data.ext),
    };
    data.callouts.clear();
    (result, callback)
}

/// What a callback left behind.
#[derive(Default)]
struct Callback {
    /// A local response it asked for.
    local: Option<LocalResponse>,
    /// Callouts it dispatched.
    callouts: Vec<Callout>,
    /// It returned `Pause`.
    paused: bool,
    /// It called `proxy_continue_stream`.
    resumed: bool,
    /// What it asked through `weft.*` extensions.
    ext: crate::host::Ext,
}

/// A request or response head, as a headers callback sees it.
trait Head: Sized {
    /// The export's name.
    const CALLBACK: &'static str;
    /// The export to call.
    fn callback(e: &Exports) -> Option<&StreamFn>;
    /// Where the head lives in the store during the call.
    fn slot(state: &mut HostState) -> &mut Option<Self>;
    /// A placeholder left behind while the head is in the store.
    fn empty() -> Self;
    /// Header count the guest is told, pseudo-headers included.
    fn pairs(&self) -> i32;
}

impl Head for request::Parts {
    const CALLBACK: &'static str = "proxy_on_request_headers";
    fn callback(e: &Exports) -> Option<&StreamFn> {
        e.on_request_headers.as_ref()
    }
    fn slot(state: &mut HostState) -> &mut Option<Self> {
        &mut state.request
    }
    fn empty() -> Self {
        http::Request::new(()).into_parts().0
    }
    fn pairs(&self) -> i32 {
        self.headers.len() as i32 + 4
    }
}

impl Head for response::Parts {
    const CALLBACK: &'static str = "proxy_on_response_headers";
    fn callback(e: &Exports) -> Option<&StreamFn> {
        e.on_response_headers.as_ref()
    }
    fn slot(state: &mut HostState) -> &mut Option<Self> {
        &mut state.response
    }
    fn empty() -> Self {
        http::Response::new(()).into_parts().0
    }
    fn pairs(&self) -> i32 {
        self.headers.len() as i32 + 1
    }
}

/// A worker's instance of one filter.
enum Slot {
    Live {
        instance: Box<FilterInstance>,
        generation: u64,
        policy: FailurePolicy,
    },
    /// Failed; `retry_at` is set under the `reload` policy.
    Failed {
        retry_at: Option<Instant>,
        backoff: Duration,
        generation: u64,
    },
}

/// This worker's instances by slot number (`WasmChain::id + filter`). Slot numbers only
/// grow; entries of retired chains are dropped from the front as soon as every older one is
/// retired too, so the table holds about the slots of live chains, however many swaps ran.
#[derive(Default)]
struct Slots {
    /// Slot number of `list[0]`.
    base: usize,
    list: std::collections::VecDeque<Option<Slot>>,
    /// Retired slot numbers at or past `base` whose entries are still in `list`.
    retired: std::collections::BTreeSet<usize>,
}

impl Slots {
    /// The entry of slot `n`, made empty if missing; `None` for a retired slot.
    fn entry(&mut self, n: usize) -> Option<&mut Option<Slot>> {
        let i = n.checked_sub(self.base)?;
        if self.retired.contains(&n) {
            return None;
        }
        if self.list.len() <= i {
            self.list.resize_with(i + 1, || None);
        }
        self.list.get_mut(i)
    }

    /// The entry of slot `n` if it has one.
    fn get_mut(&mut self, n: usize) -> Option<&mut Option<Slot>> {
        let i = n.checked_sub(self.base)?;
        self.list.get_mut(i)
    }

    /// Frees the instances of slots `first..first + len` and never makes them again.
    fn retire(&mut self, first: usize, len: usize) {
        for n in first.max(self.base)..first + len {
            if let Some(e) = self.get_mut(n) {
                *e = None;
            }
            self.retired.insert(n);
        }
        while self.retired.remove(&self.base) {
            self.list.pop_front();
            self.base += 1;
        }
    }
}

thread_local! {
    /// This worker's instances.
    static SLOTS: RefCell<Slots> = RefCell::new(Slots::default());
}

const RELOAD_BACKOFF_START: Duration = Duration::from_millis(100);
const RELOAD_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Runs `f` on this worker's live instance of filter `idx`, starting it first if needed.
/// `Err` when the filter is failed on this worker (or fails to start now).
fn with_instance<R>(
    chain: u64,
    idx: usize,
    spec: &FilterSpec,
    f: impl FnOnce(&mut FilterInstance, u64) -> R,
) -> Result<R, ()> {
    SLOTS.with(|slots| {
        let mut slots = slots.borrow_mut();
        let n = chain as usize + idx;
        // A retired chain's filter is not started again.
        let entry = slots.entry(n).ok_or(())?;
        let slot = entry.get_or_insert_with(|| Slot::Failed {
            retry_at: Some(Instant::now()),
            backoff: Duration::ZERO,
            generation: 0,
        });
        if let Slot::Failed {
            retry_at: Some(at),
            backoff,
            generation,
        } = slot
            && *at <= Instant::now()
        {
            let now = Instant::now();
            let (backoff, generation) = (*backoff, *generation);
            *slot = match FilterInstance::start(spec, n) {
                Ok(instance) => Slot::Live {
                    instance: Box::new(instance),
                    generation: generation + 1,
                    policy: spec.policy,
                },
                Err(failure) => {
                    spec.count(&failure);
                    let next = (backoff * 2).clamp(RELOAD_BACKOFF_START, RELOAD_BACKOFF_MAX);
                    Slot::Failed {
                        retry_at: Some(now + next),
                        backoff: next,
                        generation,
                    }
                }
            };
        }
        match slot {
            Slot::Live {
                instance,
                generation,
                ..
            } => Ok(f(instance, *generation)),
            Slot::Failed { .. } => Err(()),
        }
    })
}

/// Marks this worker's instance of filter `idx` failed, per the filter's policy.
fn fail(chain: u64, idx: usize, spec: &FilterSpec, failure: &Failure) {
    spec.count(failure);
    SLOTS.with(|slots| {
        let mut slots = slots.borrow_mut();
        let n = chain as usize + idx;
        let Some(entry) = slots.entry(n) else {
            return;
        };
        let generation = match &*entry {
            Some(Slot::Live { generation, .. }) | Some(Slot::Failed { generation, .. }) => {
                *generation
            }
            None => 0,
        };
        let retry_at = (spec.policy == FailurePolicy::Reload).then(Instant::now);
        *entry = Some(Slot::Failed {
            retry_at,
            backoff: Duration::ZERO,
            generation,
        });
    });
}

/// Calls `proxy_on_tick` on this worker's instance of filter `idx` at the period it set
/// (checked again after every tick, so a filter can change or stop it). Runs until the
/// worker's runtime ends.
async fn tick_loop(
    chain: u64,
    idx: usize,
    filters: Arc<[FilterSpec]>,
    life: std::sync::Weak<ChainLife>,
) {
    let spec = &filters[idx];
    // Ends when the chain is retired (swapped out and its last stream finished).
    while life.strong_count() > 0 {
        let period = with_instance(chain, idx, spec, |inst, _| inst.tick_period_ms()).unwrap_or(0);
        let wait = if period == 0 { 100 } else { u64::from(period) };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if period == 0 {
            continue;
        }
        if let Ok(Err(failure)) = with_instance(chain, idx, spec, |inst, _| {
            inst.on_tick(spec.callback_ticks)
        }) {
            fail(chain, idx, spec, &failure);
        }
    }
}

/// Calls `proxy_on_queue_ready` on this worker's instances that own a queue, as items
/// arrive. Runs until the worker's runtime ends.
async fn deliver_queue_ready(mut ready: tokio::sync::mpsc::UnboundedReceiver<(usize, u32)>) {
    while let Some((slot, token)) = ready.recv().await {
        SLOTS.with(|slots| {
            let mut slots = slots.borrow_mut();
            let Some(entry) = slots.get_mut(slot) else {
                return;
            };
            let Some(Slot::Live {
                instance,
                generation,
                policy,
            }) = entry
            else {
                return;
            };
            // Not on a request's path: the queue callback gets the lifecycle deadline.
            if let Err(failure) = instance.on_queue_ready(LIFECYCLE_TICKS, token) {
                tracing::warn!(
                    filter = %instance.store.data().plugin.name,
                    "filter failed in proxy_on_queue_ready: {}",
                    failure.message
                );
                // A trapped instance is never called again; the policy says what follows.
                *entry = Some(Slot::Failed {
                    retry_at: (*policy == FailurePolicy::Reload).then(Instant::now),
                    backoff: Duration::ZERO,
                    generation: *generation,
                });
            }
        });
    }
}

/// The next free slot number: each chain takes one per filter, so slot tables stay dense.
static NEXT_SLOT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Slot ranges of retired chains, in retirement order, for every worker to free its
/// instances of (each worker goes through the entries added since it last looked).
static RETIRED: std::sync::Mutex<Vec<(u64, u64)>> = std::sync::Mutex::new(Vec::new());
/// Bumped on each retirement, so that a worker checks the list only when it changed.
static RETIRED_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    /// The retirement epoch this worker has processed.
    static SEEN_EPOCH: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// How many entries of `RETIRED` this worker has processed.
    static SEEN_RETIRED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Chains this worker has warmed (instances started, tick loops spawned).
    static WARMED: RefCell<std::collections::HashSet<u64>> =
        RefCell::new(std::collections::HashSet::new());
}

/// The lifetime of a chain's instances: shared by the chain and each of its streams. When
/// the last one goes (the chain was swapped out and its last stream ended), every worker
/// frees its instances of the chain at its next stream.
struct ChainLife {
    id: u64,
    len: u64,
}

impl Drop for ChainLife {
    fn drop(&mut self) {
        if let Ok(mut retired) = RETIRED.lock() {
            retired.push((self.id, self.len));
        }
        RETIRED_EPOCH.fetch_add(1, std::sync::atomic::Ordering::Release);
    }
}

/// Frees this worker's instances of chains retired since it last looked (cheap when none
/// was).
fn free_retired() {
    let epoch = RETIRED_EPOCH.load(std::sync::atomic::Ordering::Acquire);
    if SEEN_EPOCH.with(|s| s.replace(epoch)) == epoch {
        return;
    }
    let Ok(retired) = RETIRED.lock() else {
        return;
    };
    let seen = SEEN_RETIRED.with(|s| s.replace(retired.len()));
    let new = retired.get(seen..).unwrap_or_default();
    SLOTS.with(|slots| {
        let mut slots = slots.borrow_mut();
        for &(id, len) in new {
            slots.retire(id as usize, len as usize);
        }
    });
    WARMED.with(|w| {
        let mut w = w.borrow_mut();
        for (id, _) in new {
            w.remove(id);
        }
    });
}

/// A chain of WASM filters.
pub struct WasmChain {
    /// Slot number of the first filter; filter `i` uses `id + i`.
    id: u64,
    filters: Arc<[FilterSpec]>,
    life: Arc<ChainLife>,
}

impl WasmChain {
    /// A chain of `filters`, in request order.
    pub fn new(filters: Vec<FilterSpec>) -> Self {
        let n = filters.len() as u64;
        let id = NEXT_SLOT.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Self {
            id,
            filters: filters.into(),
            life: Arc::new(ChainLife { id, len: n }),
        }
    }
}

impl FilterChain for WasmChain {
    /// Starts this worker's instances now rather than on the first request, their tick
    /// timers, and (once per worker) the delivery of shared-queue notifications.
    fn warm(&self) {
        if tokio::runtime::Handle::try_current().is_ok()
            && let Some(ready) = crate::queues::install_worker_channel()
        {
            tokio::spawn(deliver_queue_ready(ready));
        }
        if !WARMED.with(|w| w.borrow_mut().insert(self.id)) {
            return;
        }
        for (i, spec) in self.filters.iter().enumerate() {
            let _ = with_instance(self.id, i, spec, |_, _| ());
            if spec.has_tick && tokio::runtime::Handle::try_current().is_ok() {
                let life = Arc::downgrade(&self.life);
                tokio::spawn(tick_loop(self.id, i, self.filters.clone(), life));
            }
        }
    }

    fn start_stream(&self, info: StreamInfo) -> Box<dyn FilterStream> {
        free_retired();
        // A chain swapped in after the worker started is warmed by its first stream.
        if !WARMED.with(|w| w.borrow().contains(&self.id)) {
            self.warm();
        }
        Box::new(WasmStream {
            _life: self.life.clone(),
            chain: self.id,
            filters: self.filters.clone(),
            contexts: vec![Ctx::None; self.filters.len()],
            info,
            paused: None,
            seen: Seen::default(),
            bodies: [Vec::new(), Vec::new()],
            reply: None,
            finished: false,
            cluster: None,
            route: Default::default(),
            retry: None,
        })
    }
}

#[derive(Clone, Copy)]
enum Ctx {
    /// Not reached yet.
    None,
    /// A context on the instance of this generation.
    Active(i32, u64),
    /// The filter is skipped for this stream (fail-open).
    Skipped,
}

struct WasmStream {
    /// Keeps the chain's instances alive until the stream ends.
    _life: Arc<ChainLife>,
    chain: u64,
    filters: Arc<[FilterSpec]>,
    contexts: Vec<Ctx>,
    info: StreamInfo,
    /// The filter whose callouts the request waits for.
    paused: Option<usize>,
    /// The heads as they went on, for properties in body callbacks and `on_log`.
    seen: Seen,
    /// What each filter holds of the body, by [`Direction`] (sized on first use).
    bodies: [Vec<BodyBuf>; 2],
    /// A local reply decided while the request body streamed upstream.
    reply: Option<LocalReply>,
    /// `finish` ran: later body pieces pass through untouched.
    finished: bool,
    /// The cluster a filter chose (`weft.set_cluster`).
    cluster: Option<usize>,
    /// Timeouts and attempts filters asked for.
    route: weft_core::filter::RouteOverrides,
    /// Another attempt a response callback asked for.
    retry: Option<weft_core::filter::RetryAsk>,
}

/// The request as it went upstream and the response as it went downstream (read-only copies
/// for properties once the heads have moved on).
#[derive(Default)]
struct Seen {
    request: Option<Box<request::Parts>>,
    response: Option<Box<response::Parts>>,
    /// Properties the filters set on the stream (`proxy_set_property`).
    props: std::collections::HashMap<Vec<u8>, Vec<u8>>,
}

impl Seen {
    /// Lends the recorded heads and the stream's properties to the store for a callback
    /// (pointer and map moves, no copies).
    fn lend(&mut self, data: &mut HostState) {
        data.seen_request = self.request.take();
        data.seen_response = self.response.take();
        data.stream_props = Some(std::mem::take(&mut self.props));
    }

    /// Takes back what [`Seen::lend`] lent, as the callback left it.
    fn take_back(&mut self, data: &mut HostState) {
        self.request = data.seen_request.take();
        self.response = data.seen_response.take();
        self.props = data.stream_props.take().unwrap_or_default();
    }
}

fn snapshot_request(head: &request::Parts) -> Box<request::Parts> {
    let mut p = Box::new(<request::Parts as Head>::empty());
    p.method = head.method.clone();
    p.uri = head.uri.clone();
    p.version = head.version;
    p.headers = head.headers.clone();
    p
}

fn snapshot_response(status: StatusCode, headers: &HeaderMap) -> Box<response::Parts> {
    let mut p = Box::new(<response::Parts as Head>::empty());
    p.status = status;
    p.headers = headers.clone();
    p
}

/// 413 (request) or 500 (response) for a body past a filter's buffer limit.
fn overflow_reply(direction: Direction, filter: &str) -> LocalReply {
    let (status, what) = match direction {
        Direction::Request => (StatusCode::PAYLOAD_TOO_LARGE, "request"),
        Direction::Response => (StatusCode::INTERNAL_SERVER_ERROR, "response"),
    };
    LocalReply {
        status,
        headers: HeaderMap::new(),
        body: Bytes::from(format!(
            "{what} body exceeds the buffer limit of filter `{filter}`\n"
        )),
    }
}

/// 503 for a stream whose filter failed.
fn failure_reply(filter: &str) -> LocalReply {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(filter) {
        headers.insert(HeaderName::from_static("x-weft-filter-failed"), v);
    }
    LocalReply {
        status: StatusCode::SERVICE_UNAVAILABLE,
        headers,
        body: Bytes::from_static(b"filter failure\n"),
    }
}

fn local_reply(lr: LocalResponse) -> LocalReply {
    let mut headers = HeaderMap::new();
    for (k, v) in lr.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(&k), HeaderValue::from_bytes(&v)) {
            headers.append(k, v);
        }
    }
    LocalReply {
        status: StatusCode::from_u16(lr.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        headers,
        body: Bytes::from(lr.body),
    }
}

/// What delivering callout outcomes led to.
enum Delivered {
    /// The filter answered (or failed closed).
    Reply(LocalReply),
    /// It dispatched more callouts and did not resume.
    More(Vec<Callout>),
    /// It resumed the stream (or has nothing outstanding).
    Resumed,
}

enum Step {
    Go,
    /// The callback returned `Pause` with nothing outstanding (a body filter buffering).
    Hold,
    Local(LocalResponse),
    Paused(Vec<Callout>),
    Failed(Failure),
    Unavailable,
}

impl WasmStream {
    /// Runs the request-headers callbacks of filters `start..`.
    fn request_from(
        &mut self,
        start: usize,
        head: &mut request::Parts,
        end_of_stream: bool,
    ) -> RequestDecision {
        for idx in start..self.filters.len() {
            let mut seen = std::mem::take(&mut self.seen);
            let step = self.run(idx, |inst, ticks, ctx, info| {
                inst.headers(ticks, ctx, head, info, end_of_stream, &mut seen)
            });
            self.seen = seen;
            let failure = match step {
                // A pause with nothing outstanding cannot be resumed: the stream goes on.
                Step::Go | Step::Hold => continue,
                Step::Local(lr) => {
                    return RequestDecision::Respond(self.seen_reply(head, local_reply(lr)));
                }
                Step::Paused(callouts) => {
                    self.paused = Some(idx);
                    return RequestDecision::Pause(callouts);
                }
                Step::Failed(f) => Some(f),
                Step::Unavailable => None,
            };
            if let Some(reply) = self.on_failure(idx, failure) {
                return RequestDecision::Respond(self.seen_reply(head, reply));
            }
        }
        self.seen.request = Some(snapshot_request(head));
        RequestDecision::Continue {
            cluster: self.cluster,
        }
    }

    /// Remembers a local reply (and the request it answers) for `on_log`.
    fn seen_reply(&mut self, head: &request::Parts, reply: LocalReply) -> LocalReply {
        self.seen.request = Some(snapshot_request(head));
        self.seen.response = Some(snapshot_response(reply.status, &reply.headers));
        reply
    }

    /// Runs one filter's callback, creating the stream's context on first use.
    fn run(
        &mut self,
        idx: usize,
        call: impl FnOnce(&mut FilterInstance, u64, i32, &StreamInfo) -> Result<Callback, Failure>,
    ) -> Step {
        let spec = &self.filters[idx];
        let ticks = spec.callback_ticks;
        let ctx = self.contexts[idx];
        if matches!(ctx, Ctx::Skipped) {
            return Step::Go;
        }
        let info = &self.info;
        let outcome = with_instance(self.chain, idx, spec, |inst, generation| {
            let context = match ctx {
                Ctx::Active(c, g) if g == generation => c,
                // Instance replaced mid-stream: the filter is skipped.
                Ctx::Active(..) => return (None, Ok(Callback::default())),
                _ => match inst.new_context(ticks) {
                    Ok(c) => c,
                    Err(f) => return (None, Err(f)),
                },
            };
            (
                Some(Ctx::Active(context, generation)),
                call(inst, ticks, context, info),
            )
        });
        match outcome {
            Err(()) => Step::Unavailable,
            Ok((ctx, result)) => {
                if let Some(ctx) = ctx {
                    self.contexts[idx] = ctx;
                }
                if let Ok(cb) = &result {
                    self.merge(cb.ext);
                }
                match result {
                    Ok(Callback {
                        local: Some(lr), ..
                    }) => Step::Local(lr),
                    // Waiting for callouts the filter will answer in on_http_call_response.
                    Ok(Callback {
                        callouts,
                        paused: true,
                        resumed: false,
                        ..
                    }) if !callouts.is_empty() => Step::Paused(callouts),
                    Ok(Callback {
                        paused: true,
                        resumed: false,
                        ..
                    }) => Step::Hold,
                    Ok(_) => Step::Go,
                    Err(f) => Step::Failed(f),
                }
            }
        }
    }

    /// Passes a body piece (or trailers, which end the body) through the filters that see
    /// `direction`'s body, in its order. A filter that pauses keeps what it got in its buffer
    /// (until the limit); the next piece is appended and the filter called with all of it.
    fn flow(
        &mut self,
        direction: Direction,
        mut data: Bytes,
        end_of_stream: bool,
        mut trailers: Option<&mut HeaderMap>,
    ) -> BodyDecision {
        if self.finished {
            return BodyDecision::Continue(data);
        }
        let d = direction as usize;
        let n = self.filters.len();
        if self.bodies[d].len() < n {
            self.bodies[d].resize_with(n, BodyBuf::default);
        }
        // The body ends with this piece (trailers end it too, but after the data).
        let last = end_of_stream && trailers.is_none();
        for k in 0..n {
            let idx = match direction {
                Direction::Request => k,
                Direction::Response => n - 1 - k,
            };
            let mut buf = std::mem::take(&mut self.bodies[d][idx]);
            buf.append(data);
            if !matches!(self.contexts[idx], Ctx::Active(..))
                || !self.filters[idx].body_callbacks[d]
            {
                data = buf.take();
                continue;
            }
            let mut seen = std::mem::take(&mut self.seen);
            let mut step = Step::Go;
            if !buf.is_empty() || last {
                step = self.run(idx, |inst, ticks, ctx, info| {
                    inst.body(ticks, ctx, direction, &mut buf, last, info, &mut seen)
                });
            }
            if matches!(step, Step::Go | Step::Hold)
                && let Some(t) = trailers.as_deref_mut()
            {
                step = match self.run(idx, |inst, ticks, ctx, info| {
                    inst.trailers(ticks, ctx, direction, t, info, &mut seen)
                }) {
                    // Trailers end the body: a filter holding it releases it now.
                    Step::Hold => Step::Go,
                    other => other,
                };
            }
            self.seen = seen;
            let failure = match step {
                Step::Go | Step::Paused(_) => None,
                Step::Hold if last => None, // nothing can resume it later: go on
                Step::Hold => {
                    let limit = self.filters[idx].buffer_limit;
                    let held = buf.len();
                    self.bodies[d][idx] = buf;
                    if held > limit {
                        return self.end_body(
                            direction,
                            overflow_reply(direction, &self.filters[idx].meta.name),
                        );
                    }
                    return BodyDecision::Continue(Bytes::new());
                }
                Step::Local(lr) => return self.end_body(direction, local_reply(lr)),
                Step::Failed(f) => Some(Some(f)),
                Step::Unavailable => Some(None),
            };
            if let Some(failure) = failure
                && let Some(reply) = self.on_failure(idx, failure)
            {
                return self.end_body(direction, reply);
            }
            data = buf.take();
        }
        BodyDecision::Continue(data)
    }

    /// Ends the stream from a body or trailers callback with `reply`.
    fn end_body(&mut self, direction: Direction, reply: LocalReply) -> BodyDecision {
        self.seen.response = Some(snapshot_response(reply.status, &reply.headers));
        for buf in &mut self.bodies[direction as usize] {
            buf.take();
        }
        if direction == Direction::Request {
            self.reply = Some(LocalReply {
                status: reply.status,
                headers: reply.headers.clone(),
                body: reply.body.clone(),
            });
        }
        BodyDecision::Respond(reply)
    }

    /// Runs the response-headers callbacks of filters `end-1` down to 0.
    fn response_from(
        &mut self,
        end: usize,
        head: &mut response::Parts,
        end_of_stream: bool,
    ) -> ResponseDecision {
        for idx in (0..end).rev() {
            if matches!(self.contexts[idx], Ctx::None) {
                continue; // the stream never reached this filter
            }
            let mut seen = std::mem::take(&mut self.seen);
            let step = self.run(idx, |inst, ticks, ctx, info| {
                inst.headers(ticks, ctx, head, info, end_of_stream, &mut seen)
            });
            self.seen = seen;
            if let Some(ask) = self.retry.take()
                && matches!(step, Step::Go | Step::Hold)
            {
                return ResponseDecision::Retry(ask);
            }
            let failure = match step {
                Step::Go | Step::Hold => continue,
                Step::Paused(callouts) => {
                    self.paused = Some(idx);
                    return ResponseDecision::Pause(callouts);
                }
                Step::Local(lr) => {
                    let reply = local_reply(lr);
                    self.seen.response = Some(snapshot_response(reply.status, &reply.headers));
                    return ResponseDecision::Respond(reply);
                }
                Step::Failed(f) => Some(f),
                Step::Unavailable => None,
            };
            if let Some(reply) = self.on_failure(idx, failure) {
                self.seen.response = Some(snapshot_response(reply.status, &reply.headers));
                return ResponseDecision::Respond(reply);
            }
        }
        self.seen.response = Some(snapshot_response(head.status, &head.headers));
        ResponseDecision::Continue
    }

    /// Delivers callout outcomes to filter `idx` (`proxy_on_http_call_response`) with `head`
    /// writable.
    fn deliver<H: Head>(
        &mut self,
        idx: usize,
        head: &mut H,
        outcomes: Vec<CalloutOutcome>,
    ) -> Delivered {
        let mut more = Vec::new();
        let mut resumed = false;
        for outcome in outcomes {
            let mut seen = std::mem::take(&mut self.seen);
            let step = self.run(idx, |inst, ticks, ctx, info| {
                inst.callout_response(ticks, ctx, head, info, outcome, &mut seen)
                    .map(|cb| {
                        resumed |= cb.resumed;
                        // More callouts keep the stream waiting unless it was resumed.
                        Callback { paused: true, ..cb }
                    })
            });
            self.seen = seen;
            let failure = match step {
                Step::Go | Step::Hold => continue,
                Step::Paused(callouts) => {
                    more.extend(callouts);
                    continue;
                }
                Step::Local(lr) => return Delivered::Reply(local_reply(lr)),
                Step::Failed(f) => Some(f),
                Step::Unavailable => None,
            };
            if let Some(reply) = self.on_failure(idx, failure) {
                return Delivered::Reply(reply);
            }
        }
        if !more.is_empty() && !resumed {
            return Delivered::More(more);
        }
        Delivered::Resumed
    }

    /// Keeps what a callback asked through `weft.*` extensions (later calls win).
    fn merge(&mut self, ext: crate::host::Ext) {
        if ext == crate::host::Ext::default() {
            return;
        }
        self.cluster = ext.cluster.or(self.cluster);
        let r = &mut self.route;
        r.timeout = ext.timeout.or(r.timeout);
        r.try_timeout = ext.try_timeout.or(r.try_timeout);
        r.max_attempts = ext.max_attempts.unwrap_or(r.max_attempts);
        r.delay = ext.delay.or(r.delay);
        self.retry = ext.retry.or(self.retry);
    }

    /// Applies the failure policy of filter `idx`: `Some(reply)` to end the stream.
    fn on_failure(&mut self, idx: usize, failure: Option<Failure>) -> Option<LocalReply> {
        let spec = &self.filters[idx];
        if let Some(f) = &failure {
            fail(self.chain, idx, spec, f);
        }
        self.contexts[idx] = Ctx::Skipped;
        match spec.policy {
            FailurePolicy::FailOpen => None,
            FailurePolicy::FailClosed | FailurePolicy::Reload => {
                Some(failure_reply(&spec.meta.name))
            }
        }
    }
}

impl FilterStream for WasmStream {
    fn set_upstream(&mut self, cluster: usize, address: Option<std::net::SocketAddr>) {
        self.info.cluster = Some(cluster as u32);
        self.info.upstream = address;
    }

    fn route(&self) -> weft_core::filter::RouteOverrides {
        self.route
    }

    fn set_attempt(&mut self, attempt: weft_core::filter::Attempt) {
        self.info.attempt = attempt;
        self.retry = None;
    }

    fn on_request_headers(
        &mut self,
        head: &mut request::Parts,
        end_of_stream: bool,
    ) -> RequestDecision {
        self.request_from(0, head, end_of_stream)
    }

    fn resume_request(
        &mut self,
        head: &mut request::Parts,
        end_of_stream: bool,
        outcomes: Vec<CalloutOutcome>,
    ) -> RequestDecision {
        let Some(idx) = self.paused.take() else {
            return RequestDecision::Continue { cluster: None };
        };
        match self.deliver(idx, head, outcomes) {
            Delivered::Reply(reply) => RequestDecision::Respond(self.seen_reply(head, reply)),
            Delivered::More(callouts) => {
                self.paused = Some(idx);
                RequestDecision::Pause(callouts)
            }
            Delivered::Resumed => self.request_from(idx + 1, head, end_of_stream),
        }
    }

    fn resume_response(
        &mut self,
        head: &mut response::Parts,
        end_of_stream: bool,
        outcomes: Vec<CalloutOutcome>,
    ) -> ResponseDecision {
        let Some(idx) = self.paused.take() else {
            return ResponseDecision::Continue;
        };
        match self.deliver(idx, head, outcomes) {
            Delivered::Reply(reply) => {
                self.seen.response = Some(snapshot_response(reply.status, &reply.headers));
                ResponseDecision::Respond(reply)
            }
            Delivered::More(callouts) => {
                self.paused = Some(idx);
                ResponseDecision::Pause(callouts)
            }
            Delivered::Resumed => self.response_from(idx, head, end_of_stream),
        }
    }

    fn on_response_headers(
        &mut self,
        head: &mut response::Parts,
        end_of_stream: bool,
    ) -> ResponseDecision {
        self.response_from(self.filters.len(), head, end_of_stream)
    }

    fn wants_body(&self, direction: Direction) -> bool {
        !self.finished
            && self
                .filters
                .iter()
                .zip(&self.contexts)
                .any(|(f, c)| f.body_callbacks[direction as usize] && matches!(c, Ctx::Active(..)))
    }

    fn on_body(&mut self, direction: Direction, data: Bytes, end_of_stream: bool) -> BodyDecision {
        self.flow(direction, data, end_of_stream, None)
    }

    fn on_trailers(&mut self, direction: Direction, trailers: &mut HeaderMap) -> BodyDecision {
        self.flow(direction, Bytes::new(), false, Some(trailers))
    }

    fn take_reply(&mut self) -> Option<LocalReply> {
        self.reply.take()
    }

    fn finish(&mut self) {
        self.finished = true;
        for idx in 0..self.filters.len() {
            let Ctx::Active(context, generation) = self.contexts[idx] else {
                continue;
            };
            let spec = &self.filters[idx];
            let info = &self.info;
            let seen = &mut self.seen;
            let result = with_instance(self.chain, idx, spec, |inst, g| {
                (g == generation)
                    .then(|| inst.end_context(spec.callback_ticks, context, info, seen))
            });
            if let Ok(Some(Err(f))) = result {
                fail(self.chain, idx, spec, &f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(generation: u64) -> Option<Slot> {
        Some(Slot::Failed {
            retry_at: None,
            backoff: Duration::ZERO,
            generation,
        })
    }

    #[test]
    fn retired_slots_leave_the_table_and_are_not_made_again() {
        let mut s = Slots::default();
        // Chain A holds slots 0 and 1, chain B slots 2 and 3.
        *s.entry(0).expect("live") = failed(1);
        *s.entry(3).expect("live") = failed(2);
        // B retires first: its entries go, A's stay, nothing can be trimmed yet.
        s.retire(2, 2);
        assert!(s.entry(3).is_none(), "a retired slot is never made again");
        assert!(matches!(s.entry(0), Some(Some(_))));
        assert_eq!(s.base, 0);
        // Then A: the table empties.
        s.retire(0, 2);
        assert_eq!((s.base, s.list.len(), s.retired.len()), (4, 0, 0));
        assert!(s.entry(1).is_none() && s.get_mut(1).is_none());
        // A thousand swaps of a two-filter chain leave one chain's worth behind.
        for k in 0..1000 {
            let first = 4 + k * 2;
            *s.entry(first).expect("live") = failed(k as u64);
            s.retire(first, 2);
        }
        assert!(
            s.list.len() <= 2 && s.retired.is_empty(),
            "{}",
            s.list.len()
        );
        assert_eq!(s.base, 2004);
    }
}
