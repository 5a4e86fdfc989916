//! What runs on a worker besides streams: each filter's tick loop (`proxy_on_tick` at the
//! period the filter set) and the delivery of `proxy_on_queue_ready` to the instances that
//! own a shared queue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_config::FailurePolicy;

use crate::instance::FilterSpec;
use crate::limits::LIFECYCLE_TICKS;
use crate::retired::ChainLife;
use crate::worker::{self, Slot, fail, with_instance};

/// Calls `proxy_on_tick` on this worker's instance of filter `idx` at the period it set
/// (checked again after every tick, so a filter can change or stop it). Runs until the
/// worker's runtime ends.
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
        worker::SLOTS.with(|slots| {
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
                    filter = %instance.name(),
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
