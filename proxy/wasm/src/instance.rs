//! A running filter instance ([`FilterInstance`]): its store, started (instantiate,
//! `_initialize`, root context, `on_vm_start`, `on_configure`) from a [`FilterSpec`], and one
//! entry point per callback. Each entry point moves what the callback may see into the store
//! (heads, body, trailers, the stream's [`Seen`]), arms the deadline, calls the export, takes
//! everything back trap or not, and returns what the callback asked for ([`Callback`]) or the
//! [`Failure`].

use std::sync::Arc;

use http::header::HeaderMap;
use http::{request, response};
use wasmtime::{Engine, InstancePre, Store, TypedFunc};

use weft_abi::{BufferType, MapType};
use weft_config::FailurePolicy;
use weft_core::filter::{Callout, CalloutOutcome, Direction, Flow, StreamInfo};
use weft_core::upstream::ClusterTable;

use crate::failure::{Failure, FailureCounters, classify};
use crate::limits::{self, LIFECYCLE_TICKS, arm};
use crate::state::{
    BodyBuf, CalloutResponse, Ext, HostState, LocalResponse, Parked, PluginMeta, Seen, callback_bit,
};

// The export through which a module names its scratch area (the Weft SDK defines it):
// values that fit are written there (`crate::memory::give`). A module without it is served
// as usual.
use weft_abi::IMPLICIT_CONTEXTS_EXPORT;
use weft_abi::SCRATCH_AREA_EXPORT as SCRATCH_EXPORT;
use weft_abi::{STREAM_DONE_ACTION, STREAM_DONE_RETURN_EXPORT};

/// The scratch area `area` names, if it is a usable one (not empty, not at address 0).
fn scratch_area(area: i64) -> Option<(u32, u32)> {
    let area = area as u64;
    let (at, len) = ((area >> 32) as u32, area as u32);
    (at != 0 && len != 0 && at.checked_add(len).is_some()).then_some((at, len))
}

/// The root context's id in every instance.
const ROOT_CONTEXT: i32 = 1;

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
    /// Counts the filter's failures.
    pub failures: FailureCounters,
    /// Metrics filters define.
    pub defined_metrics: Arc<weft_core::metrics::FilterMetricSet>,
    /// Whether the module exports `proxy_on_tick`.
    pub has_tick: bool,
    /// The body and trailers callbacks the module exports, by [`Direction`] (a mask of
    /// [`callback_bit`]s).
    pub body_exports: [u16; 2],
    /// Most body bytes the filter may buffer.
    pub buffer_limit: usize,
    /// The proxy's clusters (callouts go to them by name).
    pub clusters: Arc<ClusterTable>,
    /// The place in its chain of the filter whose instance this one runs in: its own, unless
    /// it shares an instance with earlier filters of the same `vm_id` (Envoy's VM sharing).
    pub vm: usize,
    /// Its place among the filters of that instance (0: the one that owns it).
    pub plugin: usize,
}

impl FilterSpec {
    /// Whether the filter runs body or trailers callbacks for `direction`: it exports one
    /// that it has not said it does nothing in (`weft.unused`).
    #[inline]
    pub fn body_callbacks(&self, direction: Direction) -> bool {
        let d = direction as usize;
        self.runs(callback_bit::BODY[d] | callback_bit::TRAILERS[d])
    }

    /// Whether the filter runs any of the body and trailers callbacks of `bits` (a mask of
    /// [`callback_bit`]s): it exports one that it has not said it does nothing in.
    #[inline]
    pub fn runs(&self, bits: u16) -> bool {
        let unused = self.meta.unused.load(std::sync::atomic::Ordering::Relaxed);
        (self.body_exports[0] | self.body_exports[1]) & bits & !unused != 0
    }
}

/// A `(context, count or size, end of stream) -> action` callback: headers and bodies.
type StreamFn = TypedFunc<(i32, i32, i32), i32>;

/// A headers callback as either ABI generation exports it: `(context, headers, end of
/// stream)` since 0.2.0, `(context, headers)` in 0.1.0.
#[derive(Clone)]
pub enum HeadersFn {
    /// ABI 0.2.x.
    WithEndOfStream(StreamFn),
    /// ABI 0.1.0.
    WithoutEndOfStream(TypedFunc<(i32, i32), i32>),
}

impl HeadersFn {
    /// The export `name` of `instance`, with whichever of the two types it has.
    fn of(store: &mut Store<HostState>, instance: &wasmtime::Instance, name: &str) -> Option<Self> {
        let f = instance.get_func(&mut *store, name)?;
        if let Ok(f) = f.typed::<(i32, i32, i32), i32>(&*store) {
            return Some(Self::WithEndOfStream(f));
        }
        f.typed::<(i32, i32), i32>(&*store)
            .ok()
            .map(Self::WithoutEndOfStream)
    }

    fn call(
        &self,
        store: &mut Store<HostState>,
        context: i32,
        headers: i32,
        end_of_stream: bool,
    ) -> wasmtime::Result<i32> {
        match self {
            Self::WithEndOfStream(f) => f.call(store, (context, headers, end_of_stream as i32)),
            Self::WithoutEndOfStream(f) => f.call(store, (context, headers)),
        }
    }
}

/// `proxy_on_http_call_response(context, token, headers, body size, trailers)`.
type CallResponseFn = TypedFunc<(i32, i32, i32, i32, i32), ()>;

/// A `(context, token, count, size or status)` gRPC callback.
type GrpcFn = TypedFunc<(i32, i32, i32), ()>;

/// The gRPC callbacks: `proxy_on_grpc_receive_initial_metadata`, `proxy_on_grpc_receive`,
/// `proxy_on_grpc_receive_trailing_metadata`, `proxy_on_grpc_close`.
#[derive(Default)]
struct GrpcExports {
    initial: Option<GrpcFn>,
    receive: Option<GrpcFn>,
    trailing: Option<GrpcFn>,
    close: Option<GrpcFn>,
}

/// The callback that delivers a callout's answer, with its arguments, the answer loaded in
/// the store.
enum Answer {
    /// `proxy_on_http_call_response(context, token, headers, body size, trailers)`.
    Http(CallResponseFn, i32, i32, i32),
    /// A gRPC callback `(context, token, arg)`.
    Grpc(GrpcFn, i32, &'static str),
    /// Nothing to deliver (cancelled, its context ended, or no such export).
    None,
}

/// The sentinel callback context of callbacks delivered outside their stream's path: what
/// they do to any stream (continue, reply) is a wake, delivered after the callback.
const DETACHED: u32 = u32::MAX;

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
pub fn body_buffer(direction: Direction) -> BufferType {
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

/// The callbacks a module exports (those it may lack are `None`).
pub struct Exports {
    /// `proxy_on_context_create(context, parent)`, the one export every filter has.
    on_context_create: TypedFunc<(i32, i32), ()>,
    /// `proxy_on_request_headers(context, headers, end of stream)`.
    on_request_headers: Option<HeadersFn>,
    /// `proxy_on_response_headers(context, headers, end of stream)`.
    on_response_headers: Option<HeadersFn>,
    /// `proxy_on_{request,response}_body(context, buffered length, end of stream)`, by
    /// [`Direction`].
    on_body: [Option<StreamFn>; 2],
    /// `proxy_on_{request,response}_trailers(context, count)`, by [`Direction`].
    on_trailers: [Option<TypedFunc<(i32, i32), i32>>; 2],
    on_http_call_response: Option<CallResponseFn>,
    grpc: GrpcExports,
    on_done: Option<TypedFunc<i32, i32>>,
    on_log: Option<TypedFunc<i32, ()>>,
    on_delete: Option<TypedFunc<i32, ()>>,
    /// Network filters: `proxy_on_new_connection(context)`.
    on_new_connection: Option<TypedFunc<i32, i32>>,
    /// `proxy_on_{downstream,upstream}_data(context, length, end of stream)`, by [`Flow`].
    on_data: [Option<StreamFn>; 2],
    /// `proxy_on_{downstream,upstream}_connection_close(context, peer type)`, by [`Flow`].
    on_connection_close: [Option<TypedFunc<(i32, i32), ()>>; 2],
    /// The module creates a stream's context itself at its first callback
    /// ([`weft_abi::IMPLICIT_CONTEXTS_EXPORT`]).
    implicit_contexts: bool,
    /// The module was told it may return [`STREAM_DONE_ACTION`] from stream callbacks
    /// ([`weft_abi::STREAM_DONE_RETURN_EXPORT`]).
    done_by_return: bool,
}

/// The export names of the network callbacks of `flow`: data, close.
fn network_callbacks(flow: Flow) -> (&'static str, &'static str) {
    match flow {
        Flow::Downstream => (
            "proxy_on_downstream_data",
            "proxy_on_downstream_connection_close",
        ),
        Flow::Upstream => (
            "proxy_on_upstream_data",
            "proxy_on_upstream_connection_close",
        ),
    }
}

/// [`FilterSpec::vm`] of a filter not placed in a chain yet: it gets an instance of its own.
pub const OWN_INSTANCE: usize = usize::MAX;

/// One filter an instance runs: its identity and its root context.
struct Plugin {
    meta: Arc<PluginMeta>,
    root: i32,
}

/// A running instance of a filter (or of several, sharing it by `vm_id`).
pub struct FilterInstance {
    /// The filters it runs, by their place among them ([`FilterSpec::plugin`]).
    plugins: Vec<Plugin>,
    /// Its filter's failure counters (for failures outside a stream: queues).
    failures: FailureCounters,
    store: Store<HostState>,
    exports: Exports,
    instance_tick: Option<TypedFunc<i32, ()>>,
    instance_queue_ready: Option<TypedFunc<(i32, i32), ()>>,
    next_context: i32,
    /// A stream context (and its root) the host has handed out but not yet created in the
    /// module: the next callback that actually runs on it calls `proxy_on_context_create`
    /// first ([`FilterInstance::expect_birth`]).
    unborn: Option<(i32, i32)>,
}

impl FilterInstance {
    /// Instantiates and starts a filter: `_initialize`/`_start`, the root context,
    /// `on_vm_start` and `on_configure`. Either returning false is a
    /// [`crate::failure::FailureKind::Start`] failure.
    /// `slot` and `generation` say where it runs on its worker (for answers that arrive
    /// later: root-context callouts, gRPC streams).
    ///
    /// `specs` are the filters the instance runs, in [`FilterSpec::plugin`] order (one, unless
    /// several share it): each gets its root context and `on_configure`; the first's module,
    /// limits and `vm_config` make the instance.
    pub fn start(specs: &[&FilterSpec], slot: usize, generation: u64) -> Result<Self, Failure> {
        let spec = specs[0];
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
        store.data_mut().generation = generation;
        store.data_mut().start_log = Some(Default::default());
        match Self::start_in(specs, &mut store) {
            Ok((exports, instance_tick, instance_queue_ready)) => {
                store.data_mut().start_log = None;
                let plugins: Vec<Plugin> = specs
                    .iter()
                    .enumerate()
                    .map(|(p, s)| Plugin {
                        meta: s.meta.clone(),
                        root: ROOT_CONTEXT + p as i32,
                    })
                    .collect();
                let next_context = ROOT_CONTEXT + plugins.len() as i32;
                store.data_mut().roots = plugins.len() as u32;
                Ok(Self {
                    plugins,
                    failures: spec.failures.clone(),
                    store,
                    exports,
                    instance_tick,
                    instance_queue_ready,
                    next_context,
                    unborn: None,
                })
            }
            // What the filter said while it failed to start is the operator's best clue
            // (its own validation message): it goes with the failure.
            Err(mut failure) => {
                let said = store.data_mut().start_log.take().unwrap_or_default();
                if !said.is_empty() {
                    let said: Vec<String> = said.iter().map(|l| format!("\"{l}\"")).collect();
                    failure.message = format!(
                        "{} (the filter logged: {})",
                        failure.message,
                        said.join("; ")
                    );
                }
                Err(failure)
            }
        }
    }

    /// Instantiates in `store` and runs the lifecycle callbacks: the exports, `on_tick` and
    /// `on_queue_ready`.
    #[allow(clippy::type_complexity)]
    fn start_in(
        specs: &[&FilterSpec],
        store: &mut Store<HostState>,
    ) -> Result<
        (
            Exports,
            Option<TypedFunc<i32, ()>>,
            Option<TypedFunc<(i32, i32), ()>>,
        ),
        Failure,
    > {
        let start_err = Failure::start;
        let spec = specs[0];
        limits::install(store);
        arm(store, LIFECYCLE_TICKS);
        let instance = spec
            .pre
            .instantiate(&mut *store)
            .map_err(|e| failed(store, e, "instantiate"))?;
        // A WASI reactor is initialized, then its `main` runs if it has one (as Envoy does, for
        // Go and TinyGo filters that register themselves there); a WASI command runs
        // `_start`.
        if let Ok(f) = instance.get_typed_func::<(), ()>(&mut *store, "_initialize") {
            f.call(&mut *store, ())
                .map_err(|e| failed(store, e, "_initialize"))?;
            if let Ok(main) = instance.get_typed_func::<(i32, i32), i32>(&mut *store, "main") {
                main.call(&mut *store, (0, 0))
                    .map_err(|e| failed(store, e, "main"))?;
            }
        } else if let Ok(f) = instance.get_typed_func::<(), ()>(&mut *store, "_start") {
            f.call(&mut *store, ())
                .map_err(|e| failed(store, e, "_start"))?;
        }
        // Weft's extension: a module may name a scratch area for small returned values.
        if let Ok(f) = instance.get_typed_func::<(), i64>(&mut *store, SCRATCH_EXPORT) {
            let area = f
                .call(&mut *store, ())
                .map_err(|e| failed(store, e, SCRATCH_EXPORT))?;
            store.data_mut().scratch = scratch_area(area);
        }
        // Weft's extension: a module may say it is done with a stream by its return value.
        let done_by_return =
            match instance.get_typed_func::<(), ()>(&mut *store, STREAM_DONE_RETURN_EXPORT) {
                Ok(f) => {
                    f.call(&mut *store, ())
                        .map_err(|e| failed(store, e, STREAM_DONE_RETURN_EXPORT))?;
                    true
                }
                Err(_) => false,
            };
        let func = |store: &mut Store<HostState>, name: &str| instance.get_func(&mut *store, name);
        let typed3 = |store: &mut Store<HostState>, name: &str| {
            func(store, name).and_then(|f| f.typed::<(i32, i32, i32), i32>(&*store).ok())
        };
        let exports = Exports {
            on_context_create: func(store, "proxy_on_context_create")
                .and_then(|f| f.typed(&*store).ok())
                .ok_or_else(|| {
                    start_err("module does not export proxy_on_context_create".into())
                })?,
            on_request_headers: HeadersFn::of(store, &instance, "proxy_on_request_headers"),
            on_response_headers: HeadersFn::of(store, &instance, "proxy_on_response_headers"),
            on_body: [Direction::Request, Direction::Response]
                .map(|d| typed3(store, body_callback(d))),
            on_trailers: [Direction::Request, Direction::Response]
                .map(|d| func(store, trailers_callback(d)).and_then(|f| f.typed(&*store).ok())),
            on_http_call_response: func(store, "proxy_on_http_call_response")
                .and_then(|f| f.typed(&*store).ok()),
            grpc: {
                let grpc = |store: &mut Store<HostState>, name: &str| {
                    func(store, name).and_then(|f| f.typed(&*store).ok())
                };
                GrpcExports {
                    initial: grpc(store, "proxy_on_grpc_receive_initial_metadata"),
                    receive: grpc(store, "proxy_on_grpc_receive"),
                    trailing: grpc(store, "proxy_on_grpc_receive_trailing_metadata"),
                    close: grpc(store, "proxy_on_grpc_close"),
                }
            },
            on_done: func(store, "proxy_on_done").and_then(|f| f.typed(&*store).ok()),
            on_log: func(store, "proxy_on_log").and_then(|f| f.typed(&*store).ok()),
            on_delete: func(store, "proxy_on_delete").and_then(|f| f.typed(&*store).ok()),
            on_new_connection: func(store, "proxy_on_new_connection")
                .and_then(|f| f.typed(&*store).ok()),
            on_data: [Flow::Downstream, Flow::Upstream]
                .map(|flow| typed3(store, network_callbacks(flow).0)),
            on_connection_close: [Flow::Downstream, Flow::Upstream].map(|flow| {
                func(store, network_callbacks(flow).1).and_then(|f| f.typed(&*store).ok())
            }),
            implicit_contexts: func(store, IMPLICIT_CONTEXTS_EXPORT).is_some(),
            done_by_return,
        };
        // Each filter gets its root context; the instance's first also `on_vm_start`.
        for (p, spec) in specs.iter().enumerate() {
            let root = ROOT_CONTEXT + p as i32;
            let data = store.data_mut();
            data.plugin = spec.meta.clone();
            data.context = root as u32;
            data.callback_context = root as u32;
            data.root = root as u32;
            exports
                .on_context_create
                .call(&mut *store, (root, 0))
                .map_err(|e| failed(store, e, "proxy_on_context_create"))?;
            let vm_len = spec.meta.vm_config.len() as i32;
            let cfg_len = spec.meta.config.len() as i32;
            let calls: &[(&str, i32)] = if p == 0 {
                &[
                    ("proxy_on_vm_start", vm_len),
                    ("proxy_on_configure", cfg_len),
                ]
            } else {
                &[("proxy_on_configure", cfg_len)]
            };
            for &(name, len) in calls {
                let Some(f) = func(store, name) else {
                    continue;
                };
                let f = f
                    .typed::<(i32, i32), i32>(&*store)
                    .map_err(|e| start_err(format!("{name} has the wrong type: {e}")))?;
                let ok = f
                    .call(&mut *store, (root, len))
                    .map_err(|e| failed(store, e, name))?;
                if ok == 0 {
                    let who = if specs.len() > 1 {
                        format!(" (filter `{}`)", spec.meta.name)
                    } else {
                        String::new()
                    };
                    return Err(start_err(format!("{name} returned false{who}")));
                }
            }
        }
        // Callbacks on the first filter's root context until told otherwise.
        let data = store.data_mut();
        data.plugin = spec.meta.clone();
        data.root = ROOT_CONTEXT as u32;
        let instance_tick = func(store, "proxy_on_tick").and_then(|f| f.typed(&*store).ok());
        let instance_queue_ready =
            func(store, "proxy_on_queue_ready").and_then(|f| f.typed(&*store).ok());
        Ok((exports, instance_tick, instance_queue_ready))
    }

    /// What the last callbacks did to other contexts' streams (taken); a held stream's head
    /// the callbacks borrowed goes back first, so that the stream finds it when it wakes.
    pub fn take_wakes(&mut self) -> Vec<(u32, crate::state::Wake)> {
        let data = self.store.data_mut();
        data.return_borrowed();
        std::mem::take(&mut data.wakes)
    }

    /// Counts `failure` against this instance's filter.
    pub fn count_failure(&self, failure: &Failure) {
        self.failures.count(failure);
    }

    /// The tick period filter `plugin` of this instance asked for (0: none).
    pub fn tick_period_ms(&self, plugin: usize) -> u32 {
        let root = self.plugins.get(plugin).map_or(ROOT_CONTEXT, |p| p.root) as u32;
        let periods = &self.store.data().tick_periods;
        periods
            .iter()
            .find(|(r, _)| *r == root)
            .map_or(0, |(_, ms)| *ms)
    }

    /// Makes callbacks on `context` those of the filter it belongs to (its identity and
    /// root context), when several share this instance.
    fn select(&mut self, context: i32) {
        if self.plugins.len() == 1 {
            return;
        }
        let n = self.plugins.len() as i32;
        let p = if (ROOT_CONTEXT..ROOT_CONTEXT + n).contains(&context) {
            (context - ROOT_CONTEXT) as usize
        } else {
            let contexts = &self.store.data().contexts;
            contexts.get(&(context as u32)).copied().unwrap_or(0)
        };
        let data = self.store.data_mut();
        data.plugin = self.plugins[p].meta.clone();
        data.root = self.plugins[p].root as u32;
    }

    /// Whether the filter that `context` belongs to said it does nothing in the callback of
    /// `bit` (`weft.unused`): the call is skipped, as if it had continued.
    #[inline]
    fn skips(&self, context: i32, bit: u16) -> bool {
        if self.plugins.len() == 1 {
            return self.plugins[0].meta.skips(bit);
        }
        // Several filters share the instance: which one the context is of matters only if
        // one of them skips this callback (the lookup is not free).
        if !self.plugins.iter().any(|p| p.meta.skips(bit)) {
            return false;
        }
        let contexts = &self.store.data().contexts;
        let p = contexts.get(&(context as u32)).copied().unwrap_or(0);
        self.plugins[p].meta.skips(bit)
    }

    /// `proxy_on_tick` on filter `plugin`'s root context.
    pub fn on_tick(&mut self, plugin: usize, ticks: u64) -> Result<(), Failure> {
        let Some(f) = self.instance_tick.clone() else {
            return Ok(());
        };
        let root = self.plugins.get(plugin).map_or(ROOT_CONTEXT, |p| p.root);
        self.select(root);
        arm(&mut self.store, ticks);
        let data = self.store.data_mut();
        data.context = root as u32;
        data.callback_context = root as u32;
        data.info = None;
        f.call(&mut self.store, root)
            .map_err(|e| failed(&self.store, e, "proxy_on_tick"))
    }

    /// `proxy_on_queue_ready` on root context `root` (the queue's owner).
    pub fn on_queue_ready(&mut self, ticks: u64, root: u32, token: u32) -> Result<(), Failure> {
        let Some(f) = self.instance_queue_ready.clone() else {
            return Ok(());
        };
        let root = root as i32;
        self.select(root);
        arm(&mut self.store, ticks);
        let data = self.store.data_mut();
        data.context = root as u32;
        data.callback_context = root as u32;
        data.info = None;
        f.call(&mut self.store, (root, token as i32))
            .map_err(|e| failed(&self.store, e, "proxy_on_queue_ready"))
    }

    /// A new stream context of filter `plugin` (`proxy_on_context_create` with its root
    /// context as parent).
    pub fn new_context(&mut self, plugin: usize, ticks: u64) -> Result<i32, Failure> {
        let id = self.reserve_context(plugin);
        self.expect_birth(id, plugin);
        self.create(ticks)?;
        Ok(id)
    }

    /// A stream context id for filter `plugin`, known to the host (which filter it is of)
    /// but not created in the module yet: [`FilterInstance::expect_birth`] before the
    /// callbacks that may create it.
    pub fn reserve_context(&mut self, plugin: usize) -> i32 {
        let first = ROOT_CONTEXT + self.plugins.len() as i32;
        let id = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(first);
        self.store.data_mut().contexts.insert(id as u32, plugin);
        id
    }

    /// Says that `context` (of filter `plugin`) is not created in the module yet: the next
    /// callback that actually calls into the module for it (one that is exported and not
    /// skipped, see `weft.unused`) creates it first. Streams create their contexts this way,
    /// so a filter that has nothing to run for a stream costs it no context at all (nor its
    /// deletion). [`FilterInstance::take_unborn`] says afterwards whether it is still unborn.
    pub fn expect_birth(&mut self, context: i32, plugin: usize) {
        let root = self.plugins.get(plugin).map_or(ROOT_CONTEXT, |p| p.root);
        self.unborn = Some((context, root));
    }

    /// Forgets stream `context` without calling into the module: the filter said it is done
    /// with the stream (`weft.stream_done`) and drops its state itself. What the context was
    /// owed goes with it, as at a stream's end: answers to its callouts are dropped.
    pub fn release_context(&mut self, context: i32) {
        let data = self.store.data_mut();
        data.forget_context(context as u32);
        data.contexts.remove(&(context as u32));
    }

    /// Whether the context given to [`FilterInstance::expect_birth`] is still not created
    /// (no callback ran); clears it either way.
    pub fn take_unborn(&mut self) -> bool {
        self.unborn.take().is_some()
    }

    /// Creates the stream context awaiting it, if one does: `proxy_on_context_create`,
    /// unless the module creates its stream contexts itself at their first callback
    /// ([`weft_abi::IMPLICIT_CONTEXTS_EXPORT`]) and runs only this filter (its one root is
    /// the parent). A call into the module saved per stream.
    fn born(&mut self, ticks: u64) -> Result<(), Failure> {
        if self.exports.implicit_contexts && self.plugins.len() == 1 {
            self.unborn = None;
            return Ok(());
        }
        self.create(ticks)
    }

    /// `proxy_on_context_create` for the context awaiting it, if one does.
    fn create(&mut self, ticks: u64) -> Result<(), Failure> {
        let Some((id, root)) = self.unborn.take() else {
            return Ok(());
        };
        self.select(id);
        arm(&mut self.store, ticks);
        self.store.data_mut().context = id as u32;
        self.store.data_mut().callback_context = id as u32;
        self.exports
            .on_context_create
            .call(&mut self.store, (id, root))
            .map_err(|e| failed(&self.store, e, "proxy_on_context_create"))
    }

    /// Runs the headers callback of `H` (request or response) for `context`, with the head
    /// moved into the store for the duration of the call and back out after it, trap or not.
    pub fn headers<H: Head>(
        &mut self,
        ticks: u64,
        context: i32,
        head: &mut H,
        info: &StreamInfo,
        end_of_stream: bool,
        seen: &mut Seen,
    ) -> Result<Callback, Failure> {
        if H::callback(&self.exports).is_none() || self.skips(context, H::UNUSED_BIT) {
            return Ok(Callback::default());
        }
        self.born(ticks)?;
        let n = head.pairs();
        self.enter(head, info, context);
        // The request as it went upstream stays readable from the response callbacks.
        seen.lend(self.store.data_mut());
        arm(&mut self.store, ticks);
        // Called through the reference: cloning a `TypedFunc` clones its registered type
        // (a lock and a reference count), which showed in profiles at a few % per request.
        let result = match H::callback(&self.exports) {
            Some(f) => f.call(&mut self.store, context, n, end_of_stream),
            None => Ok(0),
        };
        seen.take_back(self.store.data_mut());
        let outcome = self.leave(head);
        let action = result.map_err(|e| failed(&self.store, e, H::CALLBACK))?;
        Ok(self.acted(action, outcome))
    }

    /// What a stream callback left behind, with the action it returned: `Pause` (1), or
    /// [`STREAM_DONE_ACTION`] from a module told it may say so (done with the stream, as by
    /// `weft.stream_done`); anything else continues.
    fn acted(&self, action: i32, mut callback: Callback) -> Callback {
        callback.paused = action == 1;
        if self.exports.done_by_return && action as u32 == STREAM_DONE_ACTION {
            callback.ext.done = true;
        }
        callback
    }

    /// Moves a head into the store and resets the per-callback state.
    fn enter<H: Head>(&mut self, head: &mut H, info: &StreamInfo, context: i32) {
        self.select(context);
        let data = self.store.data_mut();
        *H::slot(data) = Some(std::mem::replace(head, H::empty()));
        begin_callback(data, info, context);
        data.phase = Some(H::DIRECTION);
    }

    /// Moves the head back out and collects what the callback asked for.
    fn leave<H: Head>(&mut self, head: &mut H) -> Callback {
        let data = self.store.data_mut();
        if let Some(back) = H::slot(data).take() {
            *head = back;
        }
        data.callout_response = None;
        Callback {
            local: data.local_response.take().map(Box::new),
            callouts: std::mem::take(&mut data.callouts),
            resumed: data.resumed,
            paused: false,
            ext: std::mem::take(&mut data.ext),
        }
    }

    /// Delivers a callout's outcome (`proxy_on_http_call_response`, or a unary gRPC call's
    /// `proxy_on_grpc_receive` / `proxy_on_grpc_close`) on the stream's context, the head
    /// in the store so the filter can still edit it.
    pub fn callout_response<H: Head>(
        &mut self,
        ticks: u64,
        context: i32,
        head: &mut H,
        info: &StreamInfo,
        outcome: CalloutOutcome,
        seen: &mut Seen,
    ) -> Result<Callback, Failure> {
        self.enter(head, info, context);
        let token = outcome.token;
        let answer = self.load_answer(outcome);
        if matches!(answer, Answer::None) {
            let outcome = self.leave(head);
            // Nothing will answer: the filter's pause ends as if it had resumed.
            return Ok(Callback {
                resumed: !self.waits_on(context),
                ..outcome
            });
        }
        seen.lend(self.store.data_mut());
        arm(&mut self.store, ticks);
        let result = self.call_answer(context, token, answer);
        seen.take_back(self.store.data_mut());
        let outcome = self.leave(head);
        result?;
        Ok(outcome)
    }

    /// Whether `context`'s stream still waits for an answer (a callout or call it paused on,
    /// not delivered yet).
    fn waits_on(&self, context: i32) -> bool {
        let pending = &self.store.data().pending;
        pending
            .values()
            .any(|p| p.context == context as u32 && p.awaited)
    }

    /// Marks the callouts `tokens` as not waited for by their stream (it went on): their
    /// answers still come to its context.
    pub fn detach(&mut self, tokens: impl Iterator<Item = u32>) {
        let pending = &mut self.store.data_mut().pending;
        for token in tokens {
            if let Some(p) = pending.get_mut(&token) {
                p.awaited = false;
            }
        }
    }

    /// Delivers the outcome of a callout sent outside a stream's path (from the root
    /// context, or from a stream that did not wait for it) to the context that made it, if
    /// that context still lives and the call was not cancelled. What the callback does to a
    /// stream (continue, reply) is delivered as a wake.
    pub fn detached_response(
        &mut self,
        ticks: u64,
        outcome: CalloutOutcome,
    ) -> Result<(), Failure> {
        let token = outcome.token;
        let Some(pending) = self.store.data().pending.get(&token).copied() else {
            return Ok(());
        };
        let answer = self.load_answer(outcome);
        self.call_detached(ticks, pending.context, token, answer)
    }

    /// Calls `answer`'s callback on `context` from outside its stream's path: what the
    /// callback does to a stream (continue, reply) is a wake, and a held stream's parked head
    /// or body is what it reads and edits.
    fn call_detached(
        &mut self,
        ticks: u64,
        context: u32,
        token: u32,
        answer: Answer,
    ) -> Result<(), Failure> {
        self.select(context as i32);
        let data = self.store.data_mut();
        data.context = context;
        data.callback_context = DETACHED;
        data.info = None;
        data.borrow_parked(context);
        arm(&mut self.store, ticks);
        let result = self.call_answer(context as i32, token, answer);
        let data = self.store.data_mut();
        data.return_borrowed();
        data.callback_context = data.context;
        result
    }

    /// Loads `outcome` into the store for its callback and says which callback that is.
    fn load_answer(&mut self, outcome: CalloutOutcome) -> Answer {
        let data = self.store.data_mut();
        let Some(pending) = data.pending.remove(&outcome.token) else {
            return Answer::None;
        };
        if pending.grpc {
            let (f, arg, name) = match crate::grpc::unary_event(outcome) {
                crate::grpc::Event::Message(m) => {
                    let len = m.len() as i32;
                    data.received.message = Some(m);
                    (&self.exports.grpc.receive, len, "proxy_on_grpc_receive")
                }
                crate::grpc::Event::Close(code, message) => {
                    data.received.status = Some((code, message));
                    (&self.exports.grpc.close, code as i32, "proxy_on_grpc_close")
                }
                _ => return Answer::None,
            };
            return match f {
                Some(f) => Answer::Grpc(f.clone(), arg, name),
                None => Answer::None,
            };
        }
        let Some(f) = self.exports.on_http_call_response.clone() else {
            return Answer::None;
        };
        let response = match outcome.response {
            Ok(r) => CalloutResponse {
                head: Some(r.head),
                body: r.body,
                trailers: r.trailers,
            },
            Err(why) => {
                tracing::debug!(filter = %data.plugin.name, "callout failed: {why}");
                CalloutResponse::default()
            }
        };
        let headers = response
            .head
            .as_ref()
            .map_or(0, |h| h.headers.len() as i32 + 1);
        let body_len = response.body.len() as i32;
        let trailers = response.trailers.as_ref().map_or(0, |t| t.len() as i32);
        data.callout_response = Some(response);
        Answer::Http(f, headers, body_len, trailers)
    }

    /// Calls the answer's callback on `context`, then clears what it read.
    fn call_answer(&mut self, context: i32, token: u32, answer: Answer) -> Result<(), Failure> {
        let result = match answer {
            Answer::Http(f, headers, body, trailers) => f
                .call(
                    &mut self.store,
                    (context, token as i32, headers, body, trailers),
                )
                .map_err(|e| failed(&self.store, e, "proxy_on_http_call_response")),
            Answer::Grpc(f, arg, name) => f
                .call(&mut self.store, (context, token as i32, arg))
                .map_err(|e| failed(&self.store, e, name)),
            Answer::None => Ok(()),
        };
        let data = self.store.data_mut();
        data.callout_response = None;
        data.received = Default::default();
        result
    }

    /// Delivers `event` of gRPC stream `token` to the context that opened it. `Ok(false)`
    /// when the stream is gone (cancelled, its context ended) or this event closed it.
    pub fn grpc_stream_event(
        &mut self,
        ticks: u64,
        token: u32,
        event: crate::grpc::Event,
    ) -> Result<bool, Failure> {
        use crate::grpc::Event;
        let Some(context) = self.store.data().streams.get(&token).map(|s| s.context) else {
            return Ok(false);
        };
        let data = self.store.data_mut();
        let g = &self.exports.grpc;
        let (f, arg, name, open) = match event {
            Event::Initial(map) => {
                let n = map.len() as i32;
                data.received.initial = Some(map);
                (
                    &g.initial,
                    n,
                    "proxy_on_grpc_receive_initial_metadata",
                    true,
                )
            }
            Event::Message(m) => {
                let n = m.len() as i32;
                data.received.message = Some(m);
                (&g.receive, n, "proxy_on_grpc_receive", true)
            }
            Event::Trailing(map) => {
                let n = map.len() as i32;
                data.received.trailing = Some(map);
                (
                    &g.trailing,
                    n,
                    "proxy_on_grpc_receive_trailing_metadata",
                    true,
                )
            }
            Event::Close(code, message) => {
                data.received.status = Some((code, message));
                // Closed: the token is free again. (Dropping the handle aborts the task that
                // delivers this, which ends right after anyway.)
                data.streams.remove(&token);
                (&g.close, code as i32, "proxy_on_grpc_close", false)
            }
        };
        let answer = match f {
            Some(f) => Answer::Grpc(f.clone(), arg, name),
            None => Answer::None,
        };
        self.call_detached(ticks, context, token, answer)?;
        Ok(open && self.store.data().streams.contains_key(&token))
    }

    /// The callouts the filter made outside a stream callback (its root context), taken.
    pub fn take_callouts(&mut self) -> Vec<Callout> {
        std::mem::take(&mut self.store.data_mut().callouts)
    }

    /// `proxy_on_{request,response}_body` with `buf` as the body buffer, and the request and
    /// response heads as they went on readable as properties.
    #[allow(clippy::too_many_arguments)]
    pub fn body(
        &mut self,
        ticks: u64,
        context: i32,
        direction: Direction,
        buf: &mut BodyBuf,
        end_of_stream: bool,
        info: &StreamInfo,
        seen: &mut Seen,
    ) -> Result<Callback, Failure> {
        if self.skips(context, callback_bit::BODY[direction as usize]) {
            return Ok(Callback::default());
        }
        if self.exports.on_body[direction as usize].is_none() {
            return Ok(Callback::default());
        }
        self.born(ticks)?;
        self.select(context);
        let Some(f) = &self.exports.on_body[direction as usize] else {
            return Ok(Callback::default());
        };
        let len = buf.len() as i32;
        self.store.data_mut().body = Some((body_buffer(direction), std::mem::take(buf)));
        let result = with_seen(
            &mut self.store,
            ticks,
            (context, direction),
            info,
            seen,
            |store| f.call(store, (context, len, end_of_stream as i32)),
        );
        if let Some((_, back)) = self.store.data_mut().body.take() {
            *buf = back;
        }
        let (action, callback) = result;
        let action = action.map_err(|e| failed(&self.store, e, body_callback(direction)))?;
        Ok(self.acted(action, callback))
    }

    /// `proxy_on_{request,response}_trailers` with `trailers` as map 1 or 3.
    pub fn trailers(
        &mut self,
        ticks: u64,
        context: i32,
        direction: Direction,
        trailers: &mut HeaderMap,
        info: &StreamInfo,
        seen: &mut Seen,
    ) -> Result<Callback, Failure> {
        if self.skips(context, callback_bit::TRAILERS[direction as usize]) {
            return Ok(Callback::default());
        }
        if self.exports.on_trailers[direction as usize].is_none() {
            return Ok(Callback::default());
        }
        self.born(ticks)?;
        self.select(context);
        let Some(f) = &self.exports.on_trailers[direction as usize] else {
            return Ok(Callback::default());
        };
        let map = trailers_map(direction);
        let n = trailers.len() as i32;
        self.store.data_mut().trailers = Some((map, std::mem::take(trailers)));
        let result = with_seen(
            &mut self.store,
            ticks,
            (context, direction),
            info,
            seen,
            |store| f.call(store, (context, n)),
        );
        if let Some((_, back)) = self.store.data_mut().trailers.take() {
            *trailers = back;
        }
        let (action, callback) = result;
        let action = action.map_err(|e| failed(&self.store, e, trailers_callback(direction)))?;
        Ok(self.acted(action, callback))
    }

    /// `proxy_on_new_connection` for a connection's context; the action it returned (1:
    /// pause, which a new connection cannot: taken as continue by the caller).
    pub fn new_connection(
        &mut self,
        ticks: u64,
        context: i32,
        info: &StreamInfo,
    ) -> Result<i32, Failure> {
        self.select(context);
        let Some(f) = &self.exports.on_new_connection else {
            return Ok(0);
        };
        begin_callback(self.store.data_mut(), info, context);
        self.store.data_mut().network = true;
        arm(&mut self.store, ticks);
        f.call(&mut self.store, context)
            .map_err(|e| failed(&self.store, e, "proxy_on_new_connection"))
    }

    /// `proxy_on_{downstream,upstream}_data` with `buf` as buffer 2 or 3 (readable and
    /// writable by the filter); the action it returned.
    pub fn network_data(
        &mut self,
        ticks: u64,
        context: i32,
        flow: Flow,
        buf: &mut BodyBuf,
        end_of_stream: bool,
        info: &StreamInfo,
    ) -> Result<i32, Failure> {
        self.select(context);
        let Some(f) = &self.exports.on_data[flow as usize] else {
            return Ok(0);
        };
        let kind = match flow {
            Flow::Downstream => BufferType::DownstreamData,
            Flow::Upstream => BufferType::UpstreamData,
        };
        let len = buf.len() as i32;
        let data = self.store.data_mut();
        begin_callback(data, info, context);
        data.network = true;
        data.body = Some((kind, std::mem::take(buf)));
        arm(&mut self.store, ticks);
        let result = f.call(&mut self.store, (context, len, end_of_stream as i32));
        if let Some((_, back)) = self.store.data_mut().body.take() {
            *buf = back;
        }
        result.map_err(|e| failed(&self.store, e, network_callbacks(flow).0))
    }

    /// `proxy_on_{downstream,upstream}_connection_close` (peer type 2: the remote end
    /// closed).
    pub fn connection_close(
        &mut self,
        ticks: u64,
        context: i32,
        flow: Flow,
        info: &StreamInfo,
    ) -> Result<(), Failure> {
        self.select(context);
        let Some(f) = &self.exports.on_connection_close[flow as usize] else {
            return Ok(());
        };
        begin_callback(self.store.data_mut(), info, context);
        self.store.data_mut().network = true;
        arm(&mut self.store, ticks);
        f.call(&mut self.store, (context, 2))
            .map_err(|e| failed(&self.store, e, network_callbacks(flow).1))
    }

    /// `on_done`, `on_log`, `on_delete` for a finished stream's context, with the request
    /// and response as they were sent readable as properties (read-only copies). A context
    /// still unborn ([`FilterInstance::expect_birth`]) is created first if the filter runs
    /// `on_done` or `on_log`; otherwise nothing is called.
    pub fn end_context(
        &mut self,
        ticks: u64,
        context: i32,
        info: &StreamInfo,
        seen: &mut Seen,
    ) -> Result<(), Failure> {
        let skip = [callback_bit::DONE, callback_bit::LOG].map(|b| self.skips(context, b));
        if self.unborn.is_some() {
            // Never created in the module: it is created now only if it has something to
            // run at its end (`on_done` or `on_log`), else nothing is called at all.
            let runs = (self.exports.on_done.is_some() && !skip[0])
                || (self.exports.on_log.is_some() && !skip[1]);
            if !runs {
                self.unborn = None;
                self.store.data_mut().contexts.remove(&(context as u32));
                return Ok(());
            }
            if let Err(f) = self.born(ticks) {
                self.store.data_mut().contexts.remove(&(context as u32));
                return Err(f);
            }
        }
        self.select(context);
        let data = self.store.data_mut();
        data.info = Some(info.clone());
        data.context = context as u32;
        data.callback_context = context as u32;
        // Not a phase of the stream's path (`weft.stream_done` is refused here).
        data.phase = None;
        seen.lend(data);
        arm(&mut self.store, ticks);
        let result = self.end_callbacks(context, skip);
        let data = self.store.data_mut();
        seen.take_back(data);
        // As in Envoy, what the context was owed goes with it: its calls are not answered
        // (nor sent, if made here), its streams are reset.
        data.callouts.clear();
        data.forget_context(context as u32);
        self.store.data_mut().contexts.remove(&(context as u32));
        result
    }

    /// `on_done`, `on_log` (each unless `skip` says so) and `on_delete`.
    fn end_callbacks(
        &mut self,
        context: i32,
        [skip_done, skip_log]: [bool; 2],
    ) -> Result<(), Failure> {
        if let Some(f) = &self.exports.on_done
            && !skip_done
        {
            f.call(&mut self.store, context)
                .map_err(|e| failed(&self.store, e, "proxy_on_done"))?;
        }
        if let Some(f) = &self.exports.on_log
            && !skip_log
        {
            f.call(&mut self.store, context)
                .map_err(|e| failed(&self.store, e, "proxy_on_log"))?;
        }
        if let Some(f) = &self.exports.on_delete {
            f.call(&mut self.store, context)
                .map_err(|e| failed(&self.store, e, "proxy_on_delete"))?;
        }
        Ok(())
    }
}

/// The failure of a call on `store` that returned `e`, classified by what the store's limits
/// recorded.
fn failed(store: &Store<HostState>, e: wasmtime::Error, during: &str) -> Failure {
    classify(e, store.data().limits.stopped(), during)
}

/// Resets the per-callback state of the store for a callback on `context`.
fn begin_callback(data: &mut HostState, info: &StreamInfo, context: i32) {
    data.info = Some(info.clone());
    data.context = context as u32;
    data.callback_context = context as u32;
    data.local_response = None;
    data.callouts.clear();
    data.resumed = false;
    data.phase = None;
    data.ext = Default::default();
    data.network = false;
}

/// Runs `call` with the stream's recorded heads in the store (read-only copies) and the
/// per-callback state reset; returns its result and what it asked for.
fn with_seen<R>(
    store: &mut Store<HostState>,
    ticks: u64,
    (context, direction): (i32, Direction),
    info: &StreamInfo,
    seen: &mut Seen,
    call: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<R>,
) -> (wasmtime::Result<R>, Callback) {
    let data = store.data_mut();
    begin_callback(data, info, context);
    data.phase = Some(direction);
    seen.lend(data);
    arm(store, ticks);
    let result = call(store);
    let data = store.data_mut();
    seen.take_back(data);
    let callback = Callback {
        local: data.local_response.take().map(Box::new),
        callouts: std::mem::take(&mut data.callouts),
        resumed: data.resumed,
        paused: false,
        ext: std::mem::take(&mut data.ext),
    };
    data.callouts.clear();
    (result, callback)
}

/// What a callback left behind.
#[derive(Default)]
pub struct Callback {
    /// A local response it asked for (boxed: rare, and a `Callback` is moved several times
    /// on every callback).
    pub local: Option<Box<LocalResponse>>,
    /// Callouts it dispatched.
    pub callouts: Vec<Callout>,
    /// It returned `Pause`.
    pub paused: bool,
    /// It called `proxy_continue_stream`.
    pub resumed: bool,
    /// What it asked through `weft.*` extensions.
    pub ext: Ext,
}

/// A request or response head, as a headers callback sees it.
pub trait Head: Sized {
    /// The export's name.
    const CALLBACK: &'static str;
    /// The way it goes.
    const DIRECTION: Direction;
    /// The callback's bit among those a filter can say it does nothing in.
    const UNUSED_BIT: u16;
    /// The export to call.
    fn callback(e: &Exports) -> Option<&HeadersFn>;
    /// Where the head lives in the store during the call.
    fn slot(state: &mut HostState) -> &mut Option<Self>;
    /// A placeholder left behind while the head is in the store.
    fn empty() -> Self;
    /// Header count the guest is told, pseudo-headers included.
    fn pairs(&self) -> i32;
    /// The head as it waits, parked, while its stream is held.
    fn park(self) -> Parked;
    /// The head back from where it was parked (`None`: a head of the other kind).
    fn unpark(parked: Parked) -> Option<Self>;
}

impl Head for request::Parts {
    const CALLBACK: &'static str = "proxy_on_request_headers";
    const DIRECTION: Direction = Direction::Request;
    const UNUSED_BIT: u16 = callback_bit::REQUEST_HEADERS;
    fn callback(e: &Exports) -> Option<&HeadersFn> {
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
    fn park(self) -> Parked {
        Parked::Request(Box::new(self))
    }
    fn unpark(parked: Parked) -> Option<Self> {
        match parked {
            Parked::Request(p) => Some(*p),
            _ => None,
        }
    }
}

impl Head for response::Parts {
    const CALLBACK: &'static str = "proxy_on_response_headers";
    const DIRECTION: Direction = Direction::Response;
    const UNUSED_BIT: u16 = callback_bit::RESPONSE_HEADERS;
    fn callback(e: &Exports) -> Option<&HeadersFn> {
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
    fn park(self) -> Parked {
        Parked::Response(Box::new(self))
    }
    fn unpark(parked: Parked) -> Option<Self> {
        match parked {
            Parked::Response(p) => Some(*p),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use weft_config::FilterLimits;

    use super::*;
    use crate::testing::{self, Func, Import, i32_const};

    /// `i32.load` / `i32.store` at offset 0 (alignment 4).
    const LOAD: [u8; 3] = [0x28, 0x02, 0x00];
    const STORE: [u8; 3] = [0x36, 0x02, 0x00];

    /// A filter exporting `abi` whose `proxy_on_configure` returns what `on_configure`
    /// leaves, with `extra` functions.
    fn module(
        abi: &str,
        imports: &[Import<'_>],
        on_configure: Vec<u8>,
        extra: Vec<Func<'_>>,
    ) -> Vec<u8> {
        let mut funcs = testing::proxy_funcs(abi);
        funcs.push(Func {
            export: "proxy_on_configure",
            name: "configure",
            params: 2,
            results: 1,
            body: on_configure,
        });
        funcs.extend(extra);
        testing::module(imports, &funcs, 1)
    }

    fn start(wasm: &[u8], config: &[u8]) -> Result<FilterInstance, Failure> {
        let rt = testing::runtime();
        let mut spec = testing::spec(&rt, wasm, FilterLimits::default());
        spec.meta = Arc::new(PluginMeta {
            name: spec.meta.name.clone(),
            root_id: String::new(),
            vm_id: spec.meta.vm_id.clone(),
            config: config.to_vec(),
            vm_config: Vec::new(),
            unused: Default::default(),
        });
        FilterInstance::start(&[&spec], 0, 1)
    }

    #[test]
    fn stream_done_by_return_value_counts_only_from_a_module_the_host_told() {
        // A module exporting the marker (which stores 1 at address 0 when called) returns
        // STREAM_DONE_ACTION from its request headers callback only if it was called; one
        // without the marker returns it anyway.
        let done = STREAM_DONE_ACTION as i32;
        let told = [i32_const(0), LOAD.to_vec(), i32_const(done), vec![0x6c]].concat(); // i32.mul
        let marker = Func {
            export: STREAM_DONE_RETURN_EXPORT,
            name: "done_by_return",
            params: 0,
            results: 0,
            body: [i32_const(0), i32_const(1), STORE.to_vec()].concat(),
        };
        let headers = |body: Vec<u8>| Func {
            export: "proxy_on_request_headers",
            name: "headers",
            params: 3,
            results: 1,
            body,
        };
        let run = |funcs: Vec<Func<'_>>| {
            let mut all = testing::proxy_funcs("proxy_abi_version_0_2_1");
            all.extend(funcs);
            let rt = testing::runtime();
            let spec = testing::spec(&rt, &testing::module(&[], &all, 1), FilterLimits::default());
            let mut inst = FilterInstance::start(&[&spec], 0, 1).expect("starts");
            let ticks = spec.callback_ticks;
            let ctx = inst.new_context(0, ticks).expect("context");
            let (mut head, info) = (testing::request(), testing::info());
            let cb = inst
                .headers(ticks, ctx, &mut head, &info, true, &mut Seen::default())
                .expect("runs");
            (cb.ext.done, cb.paused)
        };
        assert_eq!(
            run(vec![marker, headers(told)]),
            (true, false),
            "told: done"
        );
        assert_eq!(
            run(vec![headers(i32_const(done))]),
            (false, false),
            "not told: the value is only a continue"
        );
    }

    #[test]
    fn a_reactors_main_runs_after_initialize_as_in_envoy() {
        // `main` stores 1 at address 0; `on_configure` returns what is there.
        let main = [i32_const(0), i32_const(1), STORE.to_vec(), i32_const(0)].concat();
        let configure = [i32_const(0), LOAD.to_vec()].concat();
        let extra = |main_body: Vec<u8>| {
            vec![
                Func {
                    export: "_initialize",
                    name: "init",
                    params: 0,
                    results: 0,
                    body: vec![],
                },
                Func {
                    export: "main",
                    name: "main",
                    params: 2,
                    results: 1,
                    body: main_body,
                },
            ]
        };
        let wasm = module(
            "proxy_abi_version_0_2_1",
            &[],
            configure.clone(),
            extra(main),
        );
        assert!(start(&wasm, b"").is_ok(), "main ran before on_configure");
        // A `main` that traps fails the start, naming it.
        let wasm = module("proxy_abi_version_0_2_1", &[], configure, extra(vec![0x00]));
        let failure = start(&wasm, b"").err().expect("fails");
        assert!(failure.message.contains("main"), "{}", failure.message);
    }

    #[test]
    fn a_module_with_only_malloc_gets_host_data_through_it() {
        // ABI 0.2.0, `malloc` and no `proxy_on_memory_allocate` (as older SDKs build):
        // `on_configure` reads its configuration (the host allocates it with `malloc`, which
        // hands out address 1024) and returns whether the call was OK and the data is at
        // 1024 holding the configuration.
        let get = Import {
            module: "env",
            name: "proxy_get_buffer_bytes",
            params: 5,
            results: 1,
        };
        let configure = [
            i32_const(7), // plugin configuration
            i32_const(0),
            i32_const(100),
            i32_const(0),     // where the pointer goes
            i32_const(4),     // where the length goes
            vec![0x10, 0x00], // call the import
            vec![0x45],       // i32.eqz: OK
            i32_const(0),
            LOAD.to_vec(),
            i32_const(1024),
            vec![0x46], // i32.eq
            vec![0x71], // i32.and
            i32_const(1024),
            LOAD.to_vec(),
            i32_const(i32::from_le_bytes(*b"conf")),
            vec![0x46], // i32.eq
            vec![0x71], // i32.and
        ]
        .concat();
        let malloc = Func {
            export: "malloc",
            name: "malloc",
            params: 1,
            results: 1,
            body: i32_const(1024),
        };
        let wasm = module("proxy_abi_version_0_2_0", &[get], configure, vec![malloc]);
        assert!(start(&wasm, b"config").is_ok());
    }
}
