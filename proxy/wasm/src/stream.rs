//! [`WasmStream`]: one stream through a chain of WASM filters ([`FilterStream`]). It runs
//! each filter's callbacks in order (request) or reverse order (response) on this worker's
//! instances, creates the stream's context in each just before its first callback that runs
//! (a filter with nothing to run for a stream gets no context), buffers body pieces for
//! filters that pause on them (up to their limit), delivers callout outcomes, merges what the
//! filters asked through `weft.*`, and applies a failed filter's policy.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, request, response};

use weft_core::filter::{
    BodyDecision, Callout, CalloutOutcome, Direction, FilterStream, LocalReply, RequestDecision,
    ResponseDecision, StreamInfo,
};

use crate::failure::{Failure, policy_reply};
use crate::instance::{Callback, FilterInstance, FilterSpec, Head};
use crate::retired::ChainLife;
use crate::state::{BodyBuf, Ext, LocalResponse, Parked, Seen, callback_bit};
use crate::worker::{self, Release, fail, with_instance};

/// A stream a filter holds: paused with nothing outstanding, until the filter takes it up
/// again from another context.
struct Holding {
    /// What is held: a head (false) or a body (true), of which way.
    body: bool,
    direction: Direction,
    /// The filter holding it.
    idx: usize,
    /// Its instance's slot, generation and the stream's context there.
    key: worker::HoldKey,
    /// Where the release arrives (taken by [`FilterStream::held`]).
    rx: Option<tokio::sync::oneshot::Receiver<Release>>,
}

/// Where a held body goes on from, in the filter that held it: after its body callback (its
/// trailers callback still to run, if trailers came) or after its trailers callback.
#[derive(Clone, Copy, PartialEq, Eq)]
enum After {
    Body,
    Trailers,
}

/// A body a filter holds ([`BodyDecision::Hold`]).
struct BodyHold {
    direction: Direction,
    /// The filter's place in `direction`'s order.
    k: usize,
    /// The held piece was the last.
    end_of_stream: bool,
    after: After,
}

/// A stream's (or a network filter's connection's) context in one filter's instance.
#[derive(Clone, Copy)]
pub(crate) enum Ctx {
    /// Not reached yet.
    None,
    /// A context on the instance of this generation.
    Active(i32, u64),
    /// A context the host handed out on the instance of this generation, not created in the
    /// module yet: the stream reached the filter, but none of its callbacks ran so far (each
    /// was skipped: not exported, or `weft.unused`).
    Unborn(i32, u64),
    /// The filter is skipped for this stream: fail-open, its instance replaced, or it said it
    /// is done with the stream (`weft.stream_done`).
    Skipped,
}

/// One stream's passage through a [`crate::WasmChain`]: its context in each filter's instance
/// on this worker, what each filter holds of the body, and what the filters asked for.
pub struct WasmStream {
    /// Keeps the chain's instances alive until the stream ends.
    _life: Arc<ChainLife>,
    /// The chain's first slot number.
    chain: u64,
    /// The chain's filters.
    filters: Arc<[FilterSpec]>,
    /// The stream's context in each filter.
    contexts: Vec<Ctx>,
    /// Facts about the stream, as callbacks see them.
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
    /// The filter holding the stream, if one is.
    holding: Option<Holding>,
    /// A request-phase local reply is going through the response callbacks.
    replying: bool,
    /// How the held stream was released (written by the future [`FilterStream::held`]
    /// returns).
    released: Arc<std::sync::Mutex<Option<Release>>>,
    /// The body a filter holds, if one does.
    body_hold: Option<BodyHold>,
}

/// A copy of the request head as it went on (for properties in later callbacks).
fn snapshot_request(head: &request::Parts) -> Box<request::Parts> {
    let mut p = Box::new(<request::Parts as Head>::empty());
    p.method = head.method.clone();
    p.uri = head.uri.clone();
    p.version = head.version;
    p.headers = head.headers.clone();
    p
}

/// A copy of the response head as it went on.
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
        reset: false,
    }
}

/// The stream property that carries a local reply's `response.code_details`.
pub const CODE_DETAILS: &[u8] = b"weft\0code_details";

/// The stream property a router filter names its matched route in (`weft.route`).
pub const ROUTE_PROPERTY: &[u8] = b"weft\0route";

/// The reply for a filter's local response (invalid headers dropped).
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
        reset: lr.reset,
    }
}

/// What delivering callout outcomes led to.
enum Delivered {
    /// The filter answered (or failed closed).
    Reply(LocalReply),
    /// It dispatched more callouts and did not resume.
    More(Vec<Callout>),
    /// It resumed the stream.
    Resumed,
    /// It neither resumed nor answered, and has nothing outstanding: the stream stays held
    /// until it is taken up from another context.
    Hold,
}

/// What one callback led to.
enum Step {
    Go,
    /// The callback returned `Pause` with nothing outstanding (a body filter buffering).
    Hold,
    Local(Box<LocalResponse>),
    Paused(Vec<Callout>),
    Failed(Failure),
    Unavailable,
}

impl WasmStream {
    /// A stream through `filters` (the chain whose first slot is `chain`), keeping the chain's
    /// instances alive until it ends.
    pub fn new(
        life: Arc<ChainLife>,
        chain: u64,
        filters: Arc<[FilterSpec]>,
        info: StreamInfo,
    ) -> Self {
        let n = filters.len();
        Self {
            _life: life,
            chain,
            filters,
            contexts: vec![Ctx::None; n],
            info,
            paused: None,
            seen: Seen::default(),
            bodies: [Vec::new(), Vec::new()],
            reply: None,
            finished: false,
            cluster: None,
            route: Default::default(),
            retry: None,
            holding: None,
            replying: false,
            released: Arc::default(),
            body_hold: None,
        }
    }

    /// Holds the stream for filter `idx` until it is taken up again from another context;
    /// its live head waits parked on the worker (callbacks on its context from elsewhere
    /// read and edit it there) until [`WasmStream::release`] puts it back.
    ///
    /// False (nothing held) while the stream already waits on another hold (a request body
    /// held while the response comes): a stream holds one thing at a time.
    fn hold<H: Head>(&mut self, idx: usize, head: &mut H) -> bool {
        let Ctx::Active(context, generation) = self.contexts[idx] else {
            return false;
        };
        if self.holding.is_some() {
            self.overlapping_hold(idx);
            return false;
        }
        let key = (
            worker::slot_of(self.chain, &self.filters[idx]),
            generation,
            context as u32,
        );
        worker::park(key, std::mem::replace(head, H::empty()).park());
        self.paused = Some(idx);
        self.holding = Some(Holding {
            body: false,
            direction: H::DIRECTION,
            idx,
            key,
            rx: Some(worker::hold(key, H::DIRECTION)),
        });
        true
    }

    /// Logs a hold refused because the stream already waits on another.
    fn overlapping_hold(&self, idx: usize) {
        tracing::warn!(
            filter = %self.filters[idx].meta.name,
            "a pause while the stream already waits on another is not held: it goes on"
        );
    }

    /// How a held stream was released, its head put back; `None` when its `H` head is not
    /// held.
    fn release<H: Head>(&mut self, head: &mut H) -> Option<(usize, Release)> {
        let h = self
            .holding
            .take_if(|h| !h.body && h.direction == H::DIRECTION)?;
        worker::unhold(h.key);
        if let Some(parked) = worker::unpark(h.key).and_then(H::unpark) {
            *head = parked;
        }
        self.paused = None;
        Some((h.idx, self.take_release()))
    }

    /// How the hold was released (written by the future [`FilterStream::held`] returned);
    /// failed when nothing was written (the instance went away).
    fn take_release(&self) -> Release {
        self.released
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .unwrap_or(Release::Failed)
    }

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
                Step::Go => continue,
                // Paused with a body to come through its body callbacks: they decide.
                // (Exported is what counts, as in Envoy: a body callback the filter does nothing
                // in continues, which releases the head.)
                Step::Hold if !end_of_stream && self.filters[idx].body_exports[0] != 0 => continue,
                // Paused with nothing outstanding: held until the filter takes it up again.
                Step::Hold => {
                    if self.hold(idx, head) {
                        return RequestDecision::Hold;
                    }
                    continue;
                }
                Step::Local(lr) => {
                    let reply = self.local_reply(*lr);
                    return RequestDecision::Respond(self.seen_reply(head, reply));
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

    /// A local reply given in the request phase: as in Envoy, it goes through the response
    /// callbacks of the filters the request reached (in reverse order), which may edit its
    /// head or replace it; remembered (with the request it answers) for `on_log`.
    fn seen_reply(&mut self, head: &request::Parts, reply: LocalReply) -> LocalReply {
        self.seen.request = Some(snapshot_request(head));
        // A reset has no response to show anyone.
        if reply.reset {
            return reply;
        }
        let reply = if self.replying {
            reply
        } else {
            self.replying = true;
            let mut rhead = <response::Parts as Head>::empty();
            rhead.status = reply.status;
            rhead.headers = reply.headers;
            let decision =
                self.response_from(self.filters.len(), &mut rhead, reply.body.is_empty());
            self.replying = false;
            // A callout or a hold asked for on a local reply is not waited for.
            if let Some(h) = self.holding.take() {
                worker::unhold(h.key);
                if let Some(parked) = worker::unpark(h.key).and_then(Head::unpark) {
                    rhead = parked;
                }
            }
            self.paused = None;
            match decision {
                ResponseDecision::Respond(other) => other,
                _ => LocalReply {
                    status: rhead.status,
                    headers: rhead.headers,
                    body: reply.body,
                    reset: false,
                },
            }
        };
        self.saw_reply(&reply);
        reply
    }

    /// Runs one filter's callback, creating the stream's context in the module first if this
    /// is the first callback that actually runs there.
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
        let slot = worker::slot_of(self.chain, spec);
        let (filters, plugin) = (&self.filters, spec.plugin);
        let outcome = with_instance(self.chain, filters, idx, |inst, generation| {
            let context = match ctx {
                Ctx::Active(c, g) if g == generation => c,
                Ctx::Unborn(c, g) if g == generation => {
                    inst.expect_birth(c, plugin);
                    c
                }
                // Instance replaced mid-stream: the filter is skipped.
                Ctx::Active(..) | Ctx::Unborn(..) => return (None, Ok(Callback::default())),
                // The module creates the context only if the callback runs in it.
                _ => {
                    let c = inst.reserve_context(plugin);
                    inst.expect_birth(c, plugin);
                    c
                }
            };
            let mut result = call(inst, ticks, context, info);
            let mut ctx = if inst.take_unborn() {
                Ctx::Unborn(context, generation)
            } else {
                Ctx::Active(context, generation)
            };
            // Done with the stream (`weft.stream_done`): nothing could resume a pause.
            let done = matches!(&result, Ok(cb) if cb.ext.done);
            if done && let Ok(cb) = &mut result {
                cb.paused = false;
            }
            // Callouts the stream does not wait for are still sent, as in Envoy: their
            // answers come to the stream's context later (unless it ended by then).
            if let Ok(cb) = &mut result
                && !cb.callouts.is_empty()
                && (!cb.paused || cb.resumed)
            {
                let callouts = std::mem::take(&mut cb.callouts);
                inst.detach(callouts.iter().map(|c| c.token));
                crate::ticks::send_detached_callouts(slot, generation, callouts, ticks);
            }
            // The module dropped its state for the stream; the host forgets the context and
            // calls the filter no more for this stream (`on_log` and `on_delete` included).
            if done {
                inst.release_context(context);
                ctx = Ctx::Skipped;
            }
            (Some(ctx), result)
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
        data: Bytes,
        end_of_stream: bool,
        trailers: Option<&mut HeaderMap>,
    ) -> BodyDecision {
        if self.finished {
            return BodyDecision::Continue(data);
        }
        let n = self.filters.len();
        let d = direction as usize;
        if self.bodies[d].len() < n {
            self.bodies[d].resize_with(n, BodyBuf::default);
        }
        self.flow_from(direction, 0, None, data, end_of_stream, trailers)
    }

    /// [`WasmStream::flow`] from the `start`-th filter in `direction`'s order; with `resumed`,
    /// that filter held the body and was taken up again after that callback (its buffer is
    /// what goes on).
    fn flow_from(
        &mut self,
        direction: Direction,
        start: usize,
        resumed: Option<After>,
        mut data: Bytes,
        end_of_stream: bool,
        mut trailers: Option<&mut HeaderMap>,
    ) -> BodyDecision {
        let d = direction as usize;
        let n = self.filters.len();
        // The body ends with this piece (trailers end it too, but after the data).
        let last = end_of_stream && trailers.is_none();
        for k in start..n {
            let idx = match direction {
                Direction::Request => k,
                Direction::Response => n - 1 - k,
            };
            let resumed = if k == start { resumed } else { None };
            let mut buf = std::mem::take(&mut self.bodies[d][idx]);
            buf.append(data);
            if !matches!(self.contexts[idx], Ctx::Active(..) | Ctx::Unborn(..))
                || !self.filters[idx].body_callbacks(direction)
            {
                data = buf.take();
                continue;
            }
            let mut seen = std::mem::take(&mut self.seen);
            let mut step = Step::Go;
            let mut after = After::Body;
            if resumed.is_none() && (!buf.is_empty() || last) {
                step = self.run(idx, |inst, ticks, ctx, info| {
                    inst.body(ticks, ctx, direction, &mut buf, last, info, &mut seen)
                });
            }
            if matches!(step, Step::Go | Step::Hold)
                && resumed != Some(After::Trailers)
                && let Some(t) = trailers.as_deref_mut()
            {
                after = After::Trailers;
                step = self.run(idx, |inst, ticks, ctx, info| {
                    inst.trailers(ticks, ctx, direction, t, info, &mut seen)
                });
            }
            self.seen = seen;
            let failure = match step {
                Step::Go => None,
                // Paused with a callout out: the body waits for the filter to take it up
                // again (from the callout's answer, or any other context).
                Step::Paused(callouts) if self.holding.is_none() => {
                    return self.hold_body(direction, k, idx, buf, end_of_stream, after, callouts);
                }
                // Already waiting on another hold: this one is not held, what the filter
                // has goes on (its callouts are still sent and answered).
                Step::Paused(callouts) => {
                    if let Ctx::Active(_, generation) = self.contexts[idx] {
                        let spec = &self.filters[idx];
                        let slot = worker::slot_of(self.chain, spec);
                        let ticks = spec.callback_ticks;
                        crate::ticks::send_detached_callouts(slot, generation, callouts, ticks);
                    }
                    self.overlapping_hold(idx);
                    None
                }
                // Paused at the end of the body (or on its trailers) with nothing outstanding:
                // as in Envoy, held until the filter takes it up again from another context
                // (or the request's timeout); no later piece will call it again.
                Step::Hold if (last || after == After::Trailers) && self.holding.is_none() => {
                    return self.hold_body(
                        direction,
                        k,
                        idx,
                        buf,
                        end_of_stream,
                        after,
                        Vec::new(),
                    );
                }
                Step::Hold if last || after == After::Trailers => {
                    self.overlapping_hold(idx);
                    None
                }
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
                Step::Local(lr) => {
                    let reply = self.local_reply(*lr);
                    return self.end_body(direction, reply);
                }
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

    /// Holds the body for filter `idx` (the `k`-th in `direction`'s order), which paused on
    /// `callouts`: they are sent (their answers come to its context), and what it holds of
    /// the body waits parked on the worker, where callbacks on its context read and rewrite
    /// it as their body buffer, until [`FilterStream::resume_body`].
    #[allow(clippy::too_many_arguments)]
    fn hold_body(
        &mut self,
        direction: Direction,
        k: usize,
        idx: usize,
        buf: BodyBuf,
        end_of_stream: bool,
        after: After,
        callouts: Vec<Callout>,
    ) -> BodyDecision {
        let Ctx::Active(context, generation) = self.contexts[idx] else {
            return BodyDecision::Continue(buf.as_slice().to_vec().into());
        };
        let spec = &self.filters[idx];
        let slot = worker::slot_of(self.chain, spec);
        crate::ticks::send_detached_callouts(slot, generation, callouts, spec.callback_ticks);
        let key = (slot, generation, context as u32);
        let kind = crate::instance::body_buffer(direction);
        worker::park(key, Parked::Body(kind, buf));
        self.holding = Some(Holding {
            body: true,
            direction,
            idx,
            key,
            rx: Some(worker::hold(key, direction)),
        });
        self.body_hold = Some(BodyHold {
            direction,
            k,
            end_of_stream,
            after,
        });
        BodyDecision::Hold
    }

    /// Ends the stream from a body or trailers callback with `reply`.
    fn end_body(&mut self, direction: Direction, reply: LocalReply) -> BodyDecision {
        self.saw_reply(&reply);
        for buf in &mut self.bodies[direction as usize] {
            buf.take();
        }
        if direction == Direction::Request {
            self.reply = Some(LocalReply {
                status: reply.status,
                headers: reply.headers.clone(),
                body: reply.body.clone(),
                reset: false,
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
                Step::Go => continue,
                Step::Hold if !end_of_stream && self.filters[idx].body_exports[1] != 0 => continue,
                Step::Hold => {
                    if self.hold(idx, head) {
                        return ResponseDecision::Hold;
                    }
                    continue;
                }
                Step::Paused(callouts) => {
                    self.paused = Some(idx);
                    return ResponseDecision::Pause(callouts);
                }
                Step::Local(lr) => {
                    let reply = self.local_reply(*lr);
                    // A reset leaves the response as it came for `on_log`.
                    let (status, headers) = match reply.reset {
                        true => (head.status, &head.headers),
                        false => (reply.status, &reply.headers),
                    };
                    self.seen.response = Some(snapshot_response(status, headers));
                    return ResponseDecision::Respond(reply);
                }
                Step::Failed(f) => Some(f),
                // A local reply passes a filter whose instance is gone (it failed making
                // this very reply, or shares an instance that did) without being replaced.
                Step::Unavailable if self.replying => continue,
                Step::Unavailable => None,
            };
            if let Some(reply) = self.on_failure(idx, failure) {
                self.saw_reply(&reply);
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
                Step::Local(lr) => return Delivered::Reply(self.local_reply(*lr)),
                Step::Failed(f) => Some(f),
                Step::Unavailable => None,
            };
            if let Some(reply) = self.on_failure(idx, failure) {
                return Delivered::Reply(reply);
            }
        }
        if resumed {
            return Delivered::Resumed;
        }
        if !more.is_empty() {
            return Delivered::More(more);
        }
        Delivered::Hold
    }

    /// Remembers `reply` as the stream's response for `on_log` (a reset sends none: the
    /// response seen so far, if any, stays).
    fn saw_reply(&mut self, reply: &LocalReply) {
        if !reply.reset {
            self.seen.response = Some(snapshot_response(reply.status, &reply.headers));
        }
    }

    /// The reply for a filter's local response; its details become the stream's
    /// `response.code_details`, as in Envoy.
    fn local_reply(&mut self, lr: LocalResponse) -> LocalReply {
        self.seen
            .props
            .insert(CODE_DETAILS.to_vec(), lr.details.clone().into_bytes());
        local_reply(lr)
    }

    /// Keeps what a callback asked through `weft.*` extensions (later calls win).
    fn merge(&mut self, ext: Ext) {
        if ext == Ext::default() {
            return;
        }
        self.cluster = ext.cluster.or(self.cluster);
        if let Some(c) = ext.cluster {
            // Later filters read the cluster chosen (`cluster_name`).
            self.info.cluster = Some(c as u32);
        }
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
            fail(self.chain, spec, f);
        }
        self.contexts[idx] = Ctx::Skipped;
        policy_reply(spec.policy, &spec.meta.name)
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

    fn route_name(&self) -> Option<&str> {
        let name = self.seen.props.get(ROUTE_PROPERTY)?;
        std::str::from_utf8(name).ok()
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
        if let Some((idx, release)) = self.release(head) {
            return match release {
                Release::Resume => self.request_from(idx + 1, head, end_of_stream),
                Release::Reply(lr) => {
                    let reply = self.local_reply(lr);
                    RequestDecision::Respond(self.seen_reply(head, reply))
                }
                Release::Failed => match self.on_failure(idx, None) {
                    Some(reply) => RequestDecision::Respond(self.seen_reply(head, reply)),
                    None => self.request_from(idx + 1, head, end_of_stream),
                },
            };
        }
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
            Delivered::Hold => {
                if self.hold(idx, head) {
                    return RequestDecision::Hold;
                }
                self.request_from(idx + 1, head, end_of_stream)
            }
        }
    }

    fn resume_response(
        &mut self,
        head: &mut response::Parts,
        end_of_stream: bool,
        outcomes: Vec<CalloutOutcome>,
    ) -> ResponseDecision {
        let respond = |this: &mut Self, reply: LocalReply| {
            this.saw_reply(&reply);
            ResponseDecision::Respond(reply)
        };
        if let Some((idx, release)) = self.release(head) {
            return match release {
                Release::Resume => self.response_from(idx, head, end_of_stream),
                Release::Reply(lr) => {
                    let reply = self.local_reply(lr);
                    respond(self, reply)
                }
                Release::Failed => match self.on_failure(idx, None) {
                    Some(reply) => respond(self, reply),
                    None => self.response_from(idx, head, end_of_stream),
                },
            };
        }
        let Some(idx) = self.paused.take() else {
            return ResponseDecision::Continue;
        };
        match self.deliver(idx, head, outcomes) {
            Delivered::Reply(reply) => respond(self, reply),
            Delivered::More(callouts) => {
                self.paused = Some(idx);
                ResponseDecision::Pause(callouts)
            }
            Delivered::Resumed => self.response_from(idx, head, end_of_stream),
            Delivered::Hold => {
                if self.hold(idx, head) {
                    return ResponseDecision::Hold;
                }
                self.response_from(idx, head, end_of_stream)
            }
        }
    }

    fn on_response_headers(
        &mut self,
        head: &mut response::Parts,
        end_of_stream: bool,
    ) -> ResponseDecision {
        self.response_from(self.filters.len(), head, end_of_stream)
    }

    fn wants_body(&self, direction: Direction, trailers: bool) -> bool {
        let d = direction as usize;
        let callbacks = callback_bit::BODY[d]
            | if trailers {
                callback_bit::TRAILERS[d]
            } else {
                0
            };
        !self.finished
            && self
                .filters
                .iter()
                .zip(&self.contexts)
                .any(|(f, c)| f.runs(callbacks) && matches!(c, Ctx::Active(..) | Ctx::Unborn(..)))
    }

    fn on_body(&mut self, direction: Direction, data: Bytes, end_of_stream: bool) -> BodyDecision {
        self.flow(direction, data, end_of_stream, None)
    }

    fn on_trailers(&mut self, direction: Direction, trailers: &mut HeaderMap) -> BodyDecision {
        self.flow(direction, Bytes::new(), false, Some(trailers))
    }

    fn resume_body(
        &mut self,
        direction: Direction,
        trailers: Option<&mut HeaderMap>,
    ) -> BodyDecision {
        let Some(hold) = self.body_hold.take_if(|h| h.direction == direction) else {
            return BodyDecision::Continue(Bytes::new());
        };
        let Some(h) = self.holding.take_if(|h| h.body && h.direction == direction) else {
            return BodyDecision::Continue(Bytes::new());
        };
        worker::unhold(h.key);
        let d = direction as usize;
        if let Some(Parked::Body(_, buf)) = worker::unpark(h.key) {
            self.bodies[d][h.idx] = buf;
        }
        let release = self.take_release();
        let go_on = |this: &mut Self, trailers| {
            this.flow_from(
                direction,
                hold.k,
                Some(hold.after),
                Bytes::new(),
                hold.end_of_stream,
                trailers,
            )
        };
        match release {
            Release::Resume => go_on(self, trailers),
            Release::Reply(lr) => {
                let reply = self.local_reply(lr);
                self.end_body(direction, reply)
            }
            Release::Failed => match self.on_failure(h.idx, None) {
                Some(reply) => self.end_body(direction, reply),
                // Fail-open: the filter is skipped; what it held goes on.
                None => go_on(self, trailers),
            },
        }
    }

    fn end_hold(&mut self, direction: Direction, reply: LocalReply) -> BodyDecision {
        if let Some(h) = self.holding.take_if(|h| h.body && h.direction == direction) {
            worker::unhold(h.key);
            worker::unpark(h.key);
        }
        self.body_hold = None;
        self.end_body(direction, reply)
    }

    fn take_reply(&mut self) -> Option<LocalReply> {
        self.reply.take()
    }

    fn held(&mut self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        let Some(rx) = self.holding.as_mut().and_then(|h| h.rx.take()) else {
            return Box::pin(std::future::ready(()));
        };
        let released = self.released.clone();
        Box::pin(async move {
            // A dropped sender (the instance went away) releases the stream as failed.
            let release = rx.await.unwrap_or(Release::Failed);
            *released
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(release);
        })
    }

    fn finish(&mut self) {
        self.finished = true;
        if let Some(h) = self.holding.take() {
            worker::unhold(h.key);
            worker::unpark(h.key);
        }
        self.body_hold = None;
        for idx in 0..self.filters.len() {
            let (context, generation, unborn) = match self.contexts[idx] {
                Ctx::Active(c, g) => (c, g, false),
                Ctx::Unborn(c, g) => (c, g, true),
                Ctx::None | Ctx::Skipped => continue,
            };
            let spec = &self.filters[idx];
            let info = &self.info;
            let seen = &mut self.seen;
            let result = with_instance(self.chain, &self.filters, idx, |inst, g| {
                (g == generation).then(|| {
                    if unborn {
                        inst.expect_birth(context, spec.plugin);
                    }
                    inst.end_context(spec.callback_ticks, context, info, seen)
                })
            });
            if let Ok(Some(Err(f))) = result {
                fail(self.chain, spec, &f);
            }
        }
    }
}
