//! What bounds a filter's callbacks: the callback deadline (epoch ticks, with CPU-time grace
//! on a busy machine: [`arm`], [`past_deadline`]) and the memory cap on the store.

use wasmtime::Store;

use crate::state::HostState;

/// Epoch ticks allowed to lifecycle callbacks (`_initialize`, `on_vm_start`, `on_configure`)
/// and to callbacks off the request path (`on_queue_ready`).
pub const LIFECYCLE_TICKS: u64 = 1000 / crate::EPOCH_TICK_MS + 1;

/// Most epoch ticks a callback may run past its first deadline, whatever the CPU clock says
/// (about a second): a callback descheduled this long is stopped anyway.
const MAX_EXTRA_TICKS: u64 = 1000 / crate::EPOCH_TICK_MS;

/// Puts a fresh store under its limits: the memory cap and the deadline callback.
pub fn install(store: &mut Store<HostState>) {
    store.limiter(|s| &mut s.limits);
    store.epoch_deadline_callback(past_deadline);
}

/// Sets a callback's deadline, `ticks` epoch ticks from now.
pub fn arm(store: &mut Store<HostState>, ticks: u64) {
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
