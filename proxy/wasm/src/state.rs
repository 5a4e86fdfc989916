//! A filter instance's store data ([`HostState`]) and what lives in it: the filter's identity
//! ([`PluginMeta`]), the heads, body ([`BodyBuf`]) and trailers lent to the running callback,
//! and what the callback leaves behind for the stream (a [`LocalResponse`], callouts, the
//! `weft.*` requests in [`Ext`]). [`Seen`] is the stream's side of what is lent.

use std::collections::HashMap;

/// The host's maps keyed by context ids, tokens and property paths: a filter's own keys,
/// never a client's, so FxHash (a multiply per word) rather than SipHash, which showed at
/// about 2,000 instructions a stream.
pub type FastMap<K, V> = HashMap<K, V, rustc_hash::FxBuildHasher>;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::HeaderMap;
use http::{request, response};
use wasmtime::{Memory, TypedFunc};

use weft_abi::{BufferType, MapType};
use weft_core::filter::{Direction, RetryAsk, StreamInfo};
use weft_core::metrics::{FilterMetric, FilterMetricSet};
use weft_core::upstream::ClusterTable;

use crate::limits::Limits;

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
    /// The stream callbacks the filter said it does nothing in (`weft.unused`), as a mask of
    /// [`weft_abi::ext::SKIPPABLE`] bits: the host stops calling them. What a module's code
    /// does is the same in all its instances, so one instance's word holds for all.
    pub unused: std::sync::atomic::AtomicU16,
}

impl PluginMeta {
    /// Whether the filter said it does nothing in the callback of `bit`
    /// ([`weft_abi::ext::skippable_bit`]).
    #[inline]
    pub fn skips(&self, bit: u16) -> bool {
        self.unused.load(std::sync::atomic::Ordering::Relaxed) & bit != 0
    }
}

/// The [`weft_abi::ext::SKIPPABLE`] bits of the callbacks the host calls, by name.
pub mod callback_bit {
    /// `proxy_on_request_headers`.
    pub const REQUEST_HEADERS: u16 = 1 << 0;
    /// `proxy_on_response_headers`.
    pub const RESPONSE_HEADERS: u16 = 1 << 1;
    /// `proxy_on_{request,response}_body`, by `Direction`.
    pub const BODY: [u16; 2] = [1 << 2, 1 << 3];
    /// `proxy_on_{request,response}_trailers`, by `Direction`.
    pub const TRAILERS: [u16; 2] = [1 << 4, 1 << 5];
    /// `proxy_on_done`.
    pub const DONE: u16 = 1 << 6;
    /// `proxy_on_log`.
    pub const LOG: u16 = 1 << 7;
}

/// A local response a filter asked for.
#[derive(Debug)]
pub struct LocalResponse {
    /// Status code.
    pub status: u16,
    /// `response.code_details` (read from the guest, not used yet: local replies carry no
    /// code details).
    #[allow(dead_code)]
    pub details: String,
    /// Body.
    pub body: Vec<u8>,
    /// Extra headers.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Reset the stream instead (`proxy_close_stream`).
    pub reset: bool,
}

/// The response to a callout, while `proxy_on_http_call_response` runs.
#[derive(Debug, Default)]
pub struct CalloutResponse {
    /// Head, when there is a response.
    pub head: Option<response::Parts>,
    /// Body.
    pub body: Bytes,
    /// Trailers (map 7), when the response had any.
    pub trailers: Option<HeaderMap>,
}

/// A held stream's live head, parked on its worker while the stream waits, so that
/// callbacks on its context from elsewhere (a tick through `proxy_set_effective_context`, a
/// gRPC stream's messages, a callout's answer) read and edit it as the stream will send it.
#[derive(Debug)]
pub enum Parked {
    /// Held in the request phase.
    Request(Box<request::Parts>),
    /// Held in the response phase.
    Response(Box<response::Parts>),
    /// A body a filter holds (it paused on it with a callout out, or waits for another
    /// context), as that filter's body buffer.
    Body(BufferType, BodyBuf),
}

/// A callout or gRPC call the filter made and has not been answered: who gets the answer.
#[derive(Clone, Copy, Debug)]
pub struct Pending {
    /// The context that made it.
    pub context: u32,
    /// A unary gRPC call (answered with `proxy_on_grpc_receive` or `_close`), not an HTTP
    /// callout.
    pub grpc: bool,
    /// Its stream waits for it (it paused on it); false once the stream went on.
    pub awaited: bool,
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

    /// The bytes as an owned, writable buffer (copied once if shared).
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
    /// `weft.stream_done`: the filter has nothing more to do for this stream.
    pub done: bool,
}

/// What a callback did to another context's stream, through `proxy_set_effective_context`
/// (a root context resuming, from `on_tick`, a request it paused).
#[derive(Debug)]
pub enum Wake {
    /// `proxy_continue_stream`: the held stream goes on, if what is held goes this way.
    Resume(Direction),
    /// `proxy_send_local_response` (or `proxy_close_stream`): the held stream gets this reply.
    Reply(LocalResponse),
}

/// The data of one filter instance's store.
pub struct HostState {
    /// The memory cap and the callback deadline, with what they stopped.
    pub limits: Limits,
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
    pub properties: FastMap<(u32, Vec<u8>), Vec<u8>>,
    /// The stream's own properties, lent for the duration of a stream callback: shared by
    /// every filter of the stream's chain, as Envoy's filter state.
    pub stream_props: Option<FastMap<Vec<u8>, Vec<u8>>>,
    /// A local response asked for during the current callback.
    pub local_response: Option<LocalResponse>,
    /// The context the current callback is for (`proxy_set_effective_context` changes it).
    pub context: u32,
    /// The context the host called the current callback for.
    pub callback_context: u32,
    /// What the current callback did to other contexts' streams, to deliver after it.
    pub wakes: Vec<(u32, Wake)>,
    /// The root context of the filter the current callback is for (several filters may share
    /// an instance, each with its root context).
    pub root: u32,
    /// Tick periods the filters of this instance asked for, by root context.
    pub tick_periods: Vec<(u32, u32)>,
    /// Number of root contexts (ids 1 to `roots`: one per filter of the instance).
    pub roots: u32,
    /// Live stream contexts, with the filter (its place in the instance) each belongs to.
    pub contexts: FastMap<u32, usize>,
    /// Partial line written to stdout/stderr.
    pub stdout: Vec<u8>,
    /// A write to a map outside its phase was logged (once per instance).
    pub warned_phase: bool,
    /// While the instance starts: what the filter logged (info and above, the last few
    /// lines), so that a failed start can say what the filter said.
    pub start_log: Option<std::collections::VecDeque<String>>,
    /// The guest's allocator (`proxy_on_memory_allocate`, or `malloc`).
    pub alloc: Option<TypedFunc<i32, i32>>,
    /// The module's scratch area for returned values (address, size), if it names one
    /// ([`weft_abi::SCRATCH_AREA_EXPORT`]).
    pub scratch: Option<(u32, u32)>,
    /// The guest's memory.
    pub memory: Option<Memory>,
    /// Metrics the filter defines (shared by all instances).
    pub metrics: Arc<FilterMetricSet>,
    /// Metrics this instance has used, by id.
    pub metric_cache: FastMap<u32, Arc<FilterMetric>>,
    /// The proxy's clusters (callouts go to them by name).
    pub clusters: Arc<ClusterTable>,
    /// Callouts asked for during the current callback.
    pub callouts: Vec<weft_core::filter::Callout>,
    /// Last callout token handed out.
    pub last_token: u32,
    /// Callouts and gRPC calls not answered yet, by token (an answer whose token is gone —
    /// cancelled, or its context ended — is not delivered).
    pub pending: FastMap<u32, Pending>,
    /// Open gRPC streams, by token (dropping one resets it).
    pub streams: FastMap<u32, crate::grpc::OpenStream>,
    /// What the gRPC callback being delivered reads.
    pub received: crate::grpc::Received,
    /// The instance's generation in its slot (for events that arrive later).
    pub generation: u64,
    /// The parked head of the held stream of the effective context, borrowed while the
    /// callback runs for another context than its own.
    pub borrowed: Option<(u32, Parked)>,
    /// The callout response being delivered.
    pub callout_response: Option<CalloutResponse>,
    /// Set when the filter asks to continue the stream.
    pub resumed: bool,
    /// The way the current stream callback's head or body goes (`None` outside one): what
    /// `proxy_continue_stream` on the callback's own context can continue.
    pub phase: Option<Direction>,
    /// What the current callback asked through `weft.*` extensions.
    pub ext: Ext,
    /// The current callback is a network filter's: callouts cannot be made from it (nothing
    /// would send them), so they are refused with `Unimplemented`.
    pub network: bool,
    /// This instance's slot on its worker (for shared-queue ownership).
    pub slot: usize,
}

impl HostState {
    /// Fresh state for an instance of `plugin` capped at `memory_bytes`.
    pub fn new(
        plugin: Arc<PluginMeta>,
        memory_bytes: usize,
        metrics: Arc<FilterMetricSet>,
        clusters: Arc<ClusterTable>,
    ) -> Self {
        Self {
            limits: Limits::new(memory_bytes),
            plugin,
            request: None,
            response: None,
            seen_request: None,
            seen_response: None,
            body: None,
            trailers: None,
            info: None,
            properties: FastMap::default(),
            stream_props: None,
            local_response: None,
            context: 0,
            callback_context: 0,
            wakes: Vec::new(),
            root: 1,
            tick_periods: Vec::new(),
            roots: 1,
            contexts: FastMap::default(),
            stdout: Vec::new(),
            start_log: None,
            warned_phase: false,
            alloc: None,
            scratch: None,
            memory: None,
            metrics,
            metric_cache: FastMap::default(),
            clusters,
            callouts: Vec::new(),
            last_token: 0,
            pending: FastMap::default(),
            streams: FastMap::default(),
            received: Default::default(),
            generation: 0,
            borrowed: None,
            callout_response: None,
            resumed: false,
            phase: None,
            ext: Ext::default(),
            network: false,
            slot: usize::MAX,
        }
    }

    /// The request head a callback sees: the live one, else the recorded one; for another
    /// context than the callback's, its held stream's parked head, if it has one.
    pub fn req(&self) -> Option<&request::Parts> {
        if self.context != self.callback_context {
            return match &self.borrowed {
                Some((c, Parked::Request(p))) if *c == self.context => Some(p),
                _ => None,
            };
        }
        self.request.as_ref().or(self.seen_request.as_deref())
    }

    /// The response head a callback sees (as [`HostState::req`]).
    pub fn resp(&self) -> Option<&response::Parts> {
        if self.context != self.callback_context {
            return match &self.borrowed {
                Some((c, Parked::Response(p))) if *c == self.context => Some(p),
                _ => None,
            };
        }
        self.response.as_ref().or(self.seen_response.as_deref())
    }

    /// The live request head a callback may edit (as [`HostState::req`], without the recorded
    /// one).
    pub fn req_mut(&mut self) -> Option<&mut request::Parts> {
        if self.context != self.callback_context {
            return match &mut self.borrowed {
                Some((c, Parked::Request(p))) if *c == self.context => Some(p),
                _ => None,
            };
        }
        self.request.as_mut()
    }

    /// The live response head a callback may edit.
    pub fn resp_mut(&mut self) -> Option<&mut response::Parts> {
        if self.context != self.callback_context {
            return match &mut self.borrowed {
                Some((c, Parked::Response(p))) if *c == self.context => Some(p),
                _ => None,
            };
        }
        self.response.as_mut()
    }

    /// Borrows the parked head of `context`'s held stream (if it is held), returning any
    /// other first.
    pub fn borrow_parked(&mut self, context: u32) {
        self.return_borrowed();
        let key = (self.slot, self.generation, context);
        self.borrowed = crate::worker::unpark(key).map(|p| (context, p));
    }

    /// The body buffer a callback sees: the piece of its own body callback, or, for another
    /// context than the callback's, what that context's filter holds of its body.
    pub fn body_buf(&self) -> Option<(BufferType, &BodyBuf)> {
        if self.context != self.callback_context {
            return match &self.borrowed {
                Some((c, Parked::Body(kind, buf))) if *c == self.context => Some((*kind, buf)),
                _ => None,
            };
        }
        self.body.as_ref().map(|(kind, buf)| (*kind, buf))
    }

    /// [`HostState::body_buf`], writable.
    pub fn body_buf_mut(&mut self) -> Option<(BufferType, &mut BodyBuf)> {
        if self.context != self.callback_context {
            return match &mut self.borrowed {
                Some((c, Parked::Body(kind, buf))) if *c == self.context => Some((*kind, buf)),
                _ => None,
            };
        }
        self.body.as_mut().map(|(kind, buf)| (*kind, buf))
    }

    /// Returns a borrowed parked head (or body) to its worker.
    pub fn return_borrowed(&mut self) {
        if let Some((context, parked)) = self.borrowed.take() {
            crate::worker::park((self.slot, self.generation, context), parked);
        }
    }

    /// Whether `context` is a live context of this instance (a root, or a stream's).
    pub fn is_live(&self, context: u32) -> bool {
        (1..=self.roots).contains(&context) || self.contexts.contains_key(&context)
    }

    /// A fresh token for a callout, call or stream.
    pub fn next_token(&mut self) -> u32 {
        let mut token = self.last_token.wrapping_add(1).max(1);
        while self.pending.contains_key(&token) || self.streams.contains_key(&token) {
            token = token.wrapping_add(1).max(1);
        }
        token
    }

    /// Forgets what context `context` is owed (it ended): its unanswered calls are not
    /// delivered and its streams are reset.
    pub fn forget_context(&mut self, context: u32) {
        // At every stream's end: nothing to scan in the common case.
        if !self.pending.is_empty() {
            self.pending.retain(|_, p| p.context != context);
        }
        if !self.streams.is_empty() {
            self.streams.retain(|_, s| s.context != context);
        }
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

/// The request as it went upstream and the response as it went downstream (read-only copies
/// for properties once the heads have moved on).
#[derive(Default)]
pub struct Seen {
    /// The request as it went upstream.
    pub request: Option<Box<request::Parts>>,
    /// The response as it went downstream.
    pub response: Option<Box<response::Parts>>,
    /// Properties the filters set on the stream (`proxy_set_property`).
    pub props: FastMap<Vec<u8>, Vec<u8>>,
}

impl Seen {
    /// Lends the recorded heads and the stream's properties to the store for a callback
    /// (pointer and map moves, no copies).
    pub fn lend(&mut self, data: &mut HostState) {
        data.seen_request = self.request.take();
        data.seen_response = self.response.take();
        data.stream_props = Some(std::mem::take(&mut self.props));
    }

    /// Takes back what [`Seen::lend`] lent, as the callback left it.
    pub fn take_back(&mut self, data: &mut HostState) {
        self.request = data.seen_request.take();
        self.response = data.seen_response.take();
        self.props = data.stream_props.take().unwrap_or_default();
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A store's data with a GET request for `/a/b?q=1` to `svc:8080` in it.
    pub fn state() -> HostState {
        let meta = Arc::new(PluginMeta {
            name: "f".into(),
            root_id: "r".into(),
            vm_id: "v".into(),
            config: vec![],
            vm_config: vec![],
            unused: Default::default(),
        });
        let mut s = HostState::new(meta, 1 << 20, Arc::default(), Arc::default());
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
    fn tokens_are_fresh_and_go_with_their_context() {
        let mut s = state();
        let pending = |context| Pending {
            context,
            grpc: false,
            awaited: true,
        };
        s.pending.insert(1, pending(2));
        s.pending.insert(2, pending(3));
        assert_eq!(s.next_token(), 3, "tokens in use are skipped");
        s.last_token = u32::MAX;
        assert_eq!(s.next_token(), 3, "wraps past 0 and the tokens in use");
        s.forget_context(2);
        assert_eq!(s.pending.keys().collect::<Vec<_>>(), [&2]);
    }

    #[test]
    fn a_held_streams_head_is_borrowed_by_its_own_instance_only() {
        let mut s = state();
        s.request = None;
        (s.slot, s.generation, s.context, s.callback_context) = (7, 2, 5, 1);
        let head = http::Request::get("/held").body(()).unwrap().into_parts().0;
        crate::worker::park((7, 2, 5), Parked::Request(Box::new(head)));
        // Another generation of the slot (context ids start again) does not see it.
        s.generation = 3;
        s.borrow_parked(5);
        assert!(s.req().is_none());
        s.generation = 2;
        s.borrow_parked(5);
        assert_eq!(s.req().unwrap().uri, "/held");
        s.req_mut()
            .unwrap()
            .headers
            .insert("x-a", "1".parse().unwrap());
        // Back on the callback's own context, the borrowed head is not what it reads.
        s.context = 1;
        assert!(s.req().is_none());
        s.return_borrowed();
        let Some(Parked::Request(back)) = crate::worker::unpark((7, 2, 5)) else {
            panic!("the head was not parked again");
        };
        assert_eq!(back.headers["x-a"], "1", "edits stay with the head");
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
}
