//! What runs on a worker besides streams: each filter's tick loop (`proxy_on_tick` at the
//! period the filter set), the delivery of `proxy_on_queue_ready` to the instances that own
//! a shared queue, and the callouts a filter makes outside a stream's path (from its root
//! context: start, ticks, queues; or from a stream that did not wait), sent by the worker
//! and answered on the context that made them.

use std::sync::Arc;
use std::time::Duration;

use weft_core::filter::Callout;

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
        let period = with_instance(chain, &filters, idx, |inst, _| {
            inst.tick_period_ms(spec.plugin)
        })
        .unwrap_or(0);
        let wait = if period == 0 { 100 } else { u64::from(period) };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if period == 0 {
            continue;
        }
        match with_instance(chain, &filters, idx, |inst, generation| {
            (
                inst.on_tick(spec.plugin, spec.callback_ticks),
                inst.take_callouts(),
                generation,
            )
        }) {
            Ok((Err(failure), _, _)) => fail(chain, spec, &failure),
            Ok((Ok(()), callouts, generation)) => send_detached_callouts(
                worker::slot_of(chain, spec),
                generation,
                callouts,
                spec.callback_ticks,
            ),
            Err(()) => {}
        }
    }
}

/// Calls `proxy_on_queue_ready` on this worker's instances that own a queue, as items
/// arrive. Runs until the worker's runtime ends.
pub async fn deliver_queue_ready(
    mut ready: tokio::sync::mpsc::UnboundedReceiver<crate::queues::Ready>,
) {
    while let Some((slot, root, token)) = ready.recv().await {
        // Not on a request's path: the queue callback gets the lifecycle deadline.
        let mut callouts = (0, Vec::new());
        worker::with_live_slot(slot, None, |instance, generation| {
            let result = instance.on_queue_ready(LIFECYCLE_TICKS, root, token);
            callouts = (generation, instance.take_callouts());
            result
        });
        send_detached_callouts(slot, callouts.0, callouts.1, LIFECYCLE_TICKS);
    }
}

/// Sends the callouts the instance of generation `generation` in slot `n` made outside a
/// stream's path (from its root context, or from a stream that did not wait for them), each
/// as a task of this worker, and delivers each answer to the context that made it
/// (`proxy_on_http_call_response`, or a gRPC callback, within `ticks`), if the instance and
/// the context still live; callouts made there are sent in turn. Off a runtime (nothing
/// could deliver the answers) they are dropped with a warning.
pub fn send_detached_callouts(n: usize, generation: u64, callouts: Vec<Callout>, ticks: u64) {
    if callouts.is_empty() {
        return;
    }
    if tokio::runtime::Handle::try_current().is_err() {
        tracing::warn!(
            callouts = callouts.len(),
            "callouts from a filter's root context outside a worker are dropped"
        );
        return;
    }
    for callout in callouts {
        tokio::spawn(async move {
            let outcome = weft_core::http::callout::run_on_worker(callout).await;
            let mut more = Vec::new();
            worker::with_live_slot(n, Some(generation), |instance, _| {
                let result = instance.detached_response(ticks, outcome);
                more = instance.take_callouts();
                result
            });
            send_detached_callouts(n, generation, more, ticks);
        });
    }
}
