//! What runs on a worker besides streams: each filter's tick loop (`proxy_on_tick` at the
//! period the filter set) and the delivery of `proxy_on_queue_ready` to the instances that
//! own a shared queue.

use std::sync::Arc;
use std::time::Duration;

use crate::instance::FilterSpec;
use crate::limits::LIFECYCLE_TICKS;
use crate::retired::ChainLife;
use crate::worker::{self, fail, with_instance};

/// Calls `proxy_on_tick` on this worker's instance of filter `idx` at the period it set
/// (checked again after every tick, so a filter can change or stop it). Runs until the chain
/// is retired or the worker's runtime ends.
pub async fn tick_loop(
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
pub async fn deliver_queue_ready(mut ready: tokio::sync::mpsc::UnboundedReceiver<(usize, u32)>) {
    while let Some((slot, token)) = ready.recv().await {
        // Not on a request's path: the queue callback gets the lifecycle deadline.
        worker::with_live_slot(slot, |instance| {
            instance.on_queue_ready(LIFECYCLE_TICKS, token)
        });
    }
}
