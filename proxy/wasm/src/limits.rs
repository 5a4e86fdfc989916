//! What bounds a filter's callbacks, and the record of what stopped one: the memory cap (a
//! [`wasmtime::ResourceLimiter`] that notes each growth it refuses) and the callback deadline
//! (epoch ticks with CPU-time grace on a busy machine, [`arm`]; the epoch callback notes when
//! it interrupts). [`crate::failure::classify`] reads these notes ([`Stopped`]), so a failure's
//! kind comes from what happened, not from an error's text.

use wasmtime::{ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder};

use crate::state::HostState;

/// Epoch ticks allowed to lifecycle callbacks (`_initialize`, `on_vm_start`, `on_configure`)
/// and to callbacks off the request path (`on_queue_ready`).
pub const LIFECYCLE_TICKS: u64 = 1000 / crate::EPOCH_TICK_MS + 1;

/// Most epoch ticks a callback may run past its first deadline, whatever the CPU clock says
/// (about a second): a callback descheduled this long is stopped anyway.
const MAX_EXTRA_TICKS: u64 = 1000 / crate::EPOCH_TICK_MS;

/// A store's limits, with what they stopped since the running callback was armed.
pub struct Limits {
    /// The memory cap.
    memory: MemoryLimiter,
    /// The running callback's deadline.
    deadline: Deadline,
}

/// What the limits stopped during the running callback.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stopped {
    /// A memory growth was refused (past the cap, or the host could not provide it).
    pub memory: bool,
    /// The callback was interrupted at its deadline.
    pub deadline: bool,
}

impl Limits {
    /// Limits for an instance capped at `memory_bytes` of linear memory.
    pub fn new(memory_bytes: usize) -> Self {
        Self {
            memory: MemoryLimiter {
                limits: StoreLimitsBuilder::new()
                    .memory_size(memory_bytes)
                    .trap_on_grow_failure(true)
                    .instances(1)
                    .build(),
                refused: false,
            },
            deadline: Deadline::default(),
        }
    }

    /// What was stopped since the last [`arm`].
    pub fn stopped(&self) -> Stopped {
        Stopped {
            memory: self.memory.refused,
            deadline: self.deadline.interrupted,
        }
    }
}

/// Puts a fresh store under its limits: the memory limiter and the deadline callback.
pub fn install(store: &mut Store<HostState>) {
    store.limiter(|s| &mut s.limits.memory);
    store.epoch_deadline_callback(past_deadline);
}

/// Sets a callback's deadline, `ticks` epoch ticks from now, and clears what the limits
/// recorded for the previous one.
pub fn arm(store: &mut Store<HostState>, ticks: u64) {
    let limits = &mut store.data_mut().limits;
    limits.deadline = Deadline {
        window: ticks,
        ..Deadline::default()
    };
    limits.memory.refused = false;
    store.set_epoch_deadline(ticks);
}

/// [`StoreLimits`] (memory cap, one instance, a refused growth traps) that records each
/// growth it refuses.
struct MemoryLimiter {
    /// The cap.
    limits: StoreLimits,
    /// A growth was refused since the last [`arm`].
    refused: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum);
        // With trap_on_grow_failure a refusal is an error (never `Ok(false)`).
        if !matches!(allowed, Ok(true)) {
            self.refused = true;
        }
        allowed
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.refused = true;
        self.limits.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// Where a callback stands against its deadline (see [`past_deadline`]).
#[derive(Clone, Copy, Debug, Default)]
struct Deadline {
    /// The deadline in epoch ticks.
    window: u64,
    /// The thread's CPU time when the first window ended.
    cpu_mark: Option<std::time::Duration>,
    /// Windows granted after the first.
    windows: u32,
    /// The callback was interrupted.
    interrupted: bool,
}

/// Runs when a callback reaches its wall-clock deadline. A deadline is meant to stop a
/// filter that burns CPU, not one whose thread the machine took away: so the callback gets
/// more windows, and is interrupted once it has used a whole window of CPU time since the
/// first one ended (or after about a second of further windows, whatever the clock says).
/// A runaway loop is thus stopped after about twice `callback_ms` on an idle machine, later
/// on a saturated one; a callback that was preempted is not failed. The thread's CPU clock
/// is only read on this slow path. An interruption is recorded ([`Stopped::deadline`]).
fn past_deadline(
    mut ctx: wasmtime::StoreContextMut<'_, HostState>,
) -> wasmtime::Result<wasmtime::UpdateDeadline> {
    use wasmtime::UpdateDeadline;
    let d = &mut ctx.data_mut().limits.deadline;
    let now = cpu_time::ThreadTime::try_now().map(|t| t.as_duration());
    let expired = match now {
        Ok(now) => {
            let budget = std::time::Duration::from_millis(d.window * crate::EPOCH_TICK_MS);
            let mark = *d.cpu_mark.get_or_insert(now);
            let max_windows = (MAX_EXTRA_TICKS / d.window.max(1)).max(2) as u32;
            now.saturating_sub(mark) >= budget || d.windows >= max_windows
        }
        // Without a CPU clock, the wall clock decides.
        Err(_) => true,
    };
    if expired {
        d.interrupted = true;
        return Ok(UpdateDeadline::Interrupt);
    }
    d.windows += 1;
    Ok(UpdateDeadline::Continue(d.window.max(1)))
}
