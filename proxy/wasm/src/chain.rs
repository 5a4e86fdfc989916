//! [`WasmChain`]: a listener's chain of WASM filters as the core sees it
//! ([`FilterChain`]). Each worker warms its own instances of the chain (and their tick loops)
//! ahead of, or at, the chain's first stream there; streams run as [`WasmStream`]s.

use std::sync::Arc;

use weft_core::filter::{FilterChain, FilterStream, StreamInfo};

use crate::instance::FilterSpec;
use crate::retired::ChainLife;
use crate::stream::WasmStream;
use crate::ticks;
use crate::worker::{self, with_instance};

/// A chain of WASM filters.
pub struct WasmChain {
    /// Slot number of the first filter; filter `i` uses `id + i`.
    id: u64,
    /// The filters, in request order.
    filters: Arc<[FilterSpec]>,
    /// Shared with the chain's streams; its end retires the chain's instances.
    life: Arc<ChainLife>,
}

impl WasmChain {
    /// A chain of `filters`, in request order.
    pub(crate) fn new(mut filters: Vec<FilterSpec>) -> Self {
        // A filter not placed with another has its own instance, in its own slot.
        for (i, spec) in filters.iter_mut().enumerate() {
            if spec.vm == crate::instance::OWN_INSTANCE {
                (spec.vm, spec.plugin) = (i, 0);
            }
        }
        let life = ChainLife::new(filters.len());
        Self {
            id: life.first(),
            filters: filters.into(),
            life: Arc::new(life),
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
            tokio::spawn(ticks::deliver_queue_ready(ready));
        }
        if !worker::mark_warmed(self.id) {
            return;
        }
        for (i, spec) in self.filters.iter().enumerate() {
            let _ = with_instance(self.id, &self.filters, i, |_, _| ());
            if spec.has_tick && tokio::runtime::Handle::try_current().is_ok() {
                let life = Arc::downgrade(&self.life);
                tokio::spawn(ticks::tick_loop(self.id, i, self.filters.clone(), life));
            }
        }
    }

    fn start_stream(&self, info: StreamInfo) -> Box<dyn FilterStream> {
        // A chain swapped in after the worker started is warmed by its first stream.
        if !worker::is_warmed(self.id) {
            self.warm();
        }
        Box::new(WasmStream::new(
            self.life.clone(),
            self.id,
            self.filters.clone(),
            info,
        ))
    }

    fn start_connection(
        &self,
        info: StreamInfo,
    ) -> Option<Box<dyn weft_core::filter::ConnectionFilter>> {
        if !worker::is_warmed(self.id) {
            self.warm();
        }
        Some(Box::new(crate::connection::WasmConnection::new(
            self.life.clone(),
            self.id,
            self.filters.clone(),
            info,
        )))
    }
}

#[cfg(test)]
mod tests {
    use weft_config::FilterLimits;

    use super::*;
    use crate::testing::{self, i32_const};

    #[test]
    fn a_worker_frees_swapped_out_chains_and_keeps_only_live_ones() {
        let rt = testing::runtime();
        let wasm = testing::filter(&[], "headers", i32_const(0));
        let spec = || testing::spec(&rt, &wasm, FilterLimits::default());
        let live = WasmChain::new(vec![spec(), spec()]);
        let mut stream = live.start_stream(testing::info());
        stream.on_request_headers(&mut testing::request(), true);
        for _ in 0..200 {
            // Swapped in, serves a stream, swapped out.
            let chain = WasmChain::new(vec![spec()]);
            let mut s = chain.start_stream(testing::info());
            s.on_request_headers(&mut testing::request(), true);
            s.finish();
        }
        // The next stream frees what was retired.
        let next = WasmChain::new(vec![spec()]);
        next.start_stream(testing::info()).finish();
        assert_eq!(
            worker::slots(),
            3,
            "the live chain's two and the newest one"
        );
        stream.finish();
        drop((stream, live));
        next.start_stream(testing::info()).finish();
        assert_eq!(worker::slots(), 1);
    }
}
