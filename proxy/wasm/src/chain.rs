//! [`WasmChain`]: a listener's chain of WASM filters as the core sees it
//! ([`FilterChain`]). Each worker warms its own instances of the chain (and their tick loops)
//! ahead of, or at, the chain's first stream there; streams run as [`WasmStream`]s.

use std::sync::Arc;

use weft_core::filter::{FilterChain, FilterStream, StreamInfo};

use crate::instance::FilterSpec;
use crate::retired::{self, ChainLife};
use crate::stream::WasmStream;
use crate::ticks;
use crate::worker::{self, with_instance};

/// A chain of WASM filters.
pub struct WasmChain {
    /// Slot number of the first filter; filter `i` uses `id + i`.
    id: u64,
    filters: Arc<[FilterSpec]>,
    life: Arc<ChainLife>,
}

impl WasmChain {
    /// A chain of `filters`, in request order.
    pub(crate) fn new(filters: Vec<FilterSpec>) -> Self {
        let n = filters.len() as u64;
        let id = retired::NEXT_SLOT.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
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
            tokio::spawn(ticks::deliver_queue_ready(ready));
        }
        if !worker::WARMED.with(|w| w.borrow_mut().insert(self.id)) {
            return;
        }
        for (i, spec) in self.filters.iter().enumerate() {
            let _ = with_instance(self.id, i, spec, |_, _| ());
            if spec.has_tick && tokio::runtime::Handle::try_current().is_ok() {
                let life = Arc::downgrade(&self.life);
                tokio::spawn(ticks::tick_loop(self.id, i, self.filters.clone(), life));
            }
        }
    }

    fn start_stream(&self, info: StreamInfo) -> Box<dyn FilterStream> {
        worker::free_retired();
        // A chain swapped in after the worker started is warmed by its first stream.
        if !worker::WARMED.with(|w| w.borrow().contains(&self.id)) {
            self.warm();
        }
        Box::new(WasmStream::new(
            self.life.clone(),
            self.id,
            self.filters.clone(),
            info,
        ))
    }
}
