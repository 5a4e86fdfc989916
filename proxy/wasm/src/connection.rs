//! [`WasmConnection`]: one opaque TCP connection through a chain of network filters
//! (proxy-wasm `StreamContext`s) on a `tcp` listener ([`ConnectionFilter`]): its context in
//! each filter, `proxy_on_new_connection`, the data callbacks with buffers 2 (downstream)
//! and 3 (upstream) — downstream in chain order, upstream in reverse — what a pausing filter
//! holds, the close callbacks, and the failure policies (`fail_open` skips the filter for the
//! connection, anything else closes it).

use std::sync::Arc;

use bytes::Bytes;
use weft_core::filter::{ConnectionFilter, Flow, NetworkAction, StreamInfo};

use crate::failure::Failure;
use crate::instance::{FilterInstance, FilterSpec};
use crate::retired::ChainLife;
use crate::state::{BodyBuf, Seen};
use crate::stream::Ctx;
use crate::worker::{self, with_instance};

/// One connection's passage through a chain of network filters.
pub struct WasmConnection {
    _life: Arc<ChainLife>,
    chain: u64,
    filters: Arc<[FilterSpec]>,
    contexts: Vec<Ctx>,
    info: StreamInfo,
    /// What each filter holds (it paused on it), by [`Flow`].
    held: [Vec<Vec<u8>>; 2],
}

impl WasmConnection {
    pub(crate) fn new(
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
            held: [vec![Vec::new(); n], vec![Vec::new(); n]],
        }
    }

    /// Runs a callback of filter `idx` in the connection's context (made on first use).
    /// `Ok(None)`: the filter is skipped; `Err`: the connection must close.
    fn call(
        &mut self,
        idx: usize,
        f: impl FnOnce(&mut FilterInstance, u64, i32, &StreamInfo) -> Result<i32, Failure>,
    ) -> Result<Option<i32>, ()> {
        let spec = &self.filters[idx];
        let ticks = spec.callback_ticks;
        let ctx = self.contexts[idx];
        if matches!(ctx, Ctx::Skipped) {
            return Ok(None);
        }
        let (plugin, info) = (spec.plugin, &self.info);
        let outcome = with_instance(self.chain, &self.filters, idx, |inst, generation| {
            let context = match ctx {
                Ctx::Active(c, g) if g == generation => c,
                // Its instance was replaced mid-connection: skipped from here on.
                Ctx::Active(..) => return (Ctx::Skipped, Ok(0)),
                _ => match inst.new_context(plugin, ticks) {
                    Ok(c) => c,
                    Err(e) => return (Ctx::None, Err(e)),
                },
            };
            (
                Ctx::Active(context, generation),
                f(inst, ticks, context, info),
            )
        });
        let policy_open = spec.policy == weft_config::FailurePolicy::FailOpen;
        match outcome {
            Ok((ctx, Ok(action))) => {
                self.contexts[idx] = ctx;
                Ok((!matches!(ctx, Ctx::Skipped)).then_some(action))
            }
            Ok((_, Err(failure))) => {
                tracing::warn!(filter = %spec.meta.name, "network filter failed: {}", failure.message);
                worker::fail(self.chain, spec, &failure);
                self.contexts[idx] = Ctx::Skipped;
                if policy_open { Ok(None) } else { Err(()) }
            }
            // The filter's instance is down (failed earlier, not restarted yet).
            Err(()) => {
                self.contexts[idx] = Ctx::Skipped;
                if policy_open { Ok(None) } else { Err(()) }
            }
        }
    }
}

impl ConnectionFilter for WasmConnection {
    fn on_new_connection(&mut self) -> NetworkAction {
        for idx in 0..self.filters.len() {
            if self
                .call(idx, |inst, ticks, ctx, info| {
                    inst.new_connection(ticks, ctx, info)
                })
                .is_err()
            {
                return NetworkAction::Close;
            }
        }
        NetworkAction::Continue
    }

    fn on_data(&mut self, flow: Flow, data: &mut Vec<u8>, end_of_stream: bool) -> NetworkAction {
        let n = self.filters.len();
        let order: Box<dyn Iterator<Item = usize>> = match flow {
            Flow::Downstream => Box::new(0..n),
            Flow::Upstream => Box::new((0..n).rev()),
        };
        let mut carry = std::mem::take(data);
        for idx in order {
            if matches!(self.contexts[idx], Ctx::Skipped) {
                // Skipped since it paused (failed open): what it held goes on first.
                let mut held = std::mem::take(&mut self.held[flow as usize][idx]);
                if !held.is_empty() {
                    held.append(&mut carry);
                    carry = held;
                }
                continue;
            }
            // What it held, then what comes now: given to it whole again.
            let mut bytes = std::mem::take(&mut self.held[flow as usize][idx]);
            bytes.append(&mut carry);
            let mut buf = BodyBuf::Shared(Bytes::from(bytes));
            let action = self.call(idx, |inst, ticks, ctx, info| {
                inst.network_data(ticks, ctx, flow, &mut buf, end_of_stream, info)
            });
            let bytes = buf.as_slice().to_vec();
            match action {
                Err(()) => return NetworkAction::Close,
                // Paused: it holds them until more come; at the end nothing more will, so
                // they go on.
                Ok(Some(1)) if !end_of_stream => {
                    self.held[flow as usize][idx] = bytes;
                    return NetworkAction::Pause;
                }
                Ok(_) => carry = bytes,
            }
        }
        *data = carry;
        NetworkAction::Continue
    }

    fn on_close(&mut self, flow: Flow) {
        for idx in 0..self.filters.len() {
            if matches!(self.contexts[idx], Ctx::Active(..)) {
                let _ = self.call(idx, |inst, ticks, ctx, info| {
                    inst.connection_close(ticks, ctx, flow, info).map(|()| 0)
                });
            }
        }
    }

    fn finish(&mut self) {
        let mut seen = Seen::default();
        for idx in 0..self.filters.len() {
            if let Ctx::Active(context, generation) = self.contexts[idx] {
                let (spec, info) = (&self.filters[idx], &self.info);
                let _ = with_instance(self.chain, &self.filters, idx, |inst, g| {
                    if g == generation {
                        let _ = inst.end_context(spec.callback_ticks, context, info, &mut seen);
                    }
                });
                self.contexts[idx] = Ctx::Skipped;
            }
        }
    }
}

impl Drop for WasmConnection {
    /// A connection dropped mid-way (its task cancelled at the drain deadline) still ends its
    /// contexts.
    fn drop(&mut self) {
        self.finish();
    }
}
