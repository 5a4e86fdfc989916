//! Each worker thread's own state (a thread-local [`Worker`]): its instance of each filter of
//! each chain it has run, by slot number (filter `i` of a chain is slot `chain + i`), started
//! on first use and replaced under the `reload` policy; the chains it has warmed; and its copy
//! of the retired set ([`crate::retired`]), so that a retired chain's instances are dropped
//! and never started again. The table holds only the slots of live chains, however many
//! swaps ran.
//!
//! It also holds the streams a filter paused with nothing outstanding ([`hold`]): after
//! every callback on an instance, what the callback did to other contexts' streams
//! (`proxy_set_effective_context`, then `proxy_continue_stream` or a local response) is
//! delivered to them, and an instance that fails releases its held streams as failed.

use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use weft_config::FailurePolicy;
use weft_core::filter::Direction;

use crate::failure::Failure;
use crate::instance::{FilterInstance, FilterSpec};
use crate::limits::LIFECYCLE_TICKS;
use crate::retired::{self, Retired};
use crate::state::{FastMap, LocalResponse, Parked, Wake};

/// How a held stream is taken up again.
#[derive(Debug)]
pub enum Release {
    /// The filter resumed it.
    Resume,
    /// The filter answered it.
    Reply(LocalResponse),
    /// The filter failed (or its instance is gone): its failure policy decides.
    Failed,
}

/// A worker's instance of one filter.
pub enum Slot {
    /// Running.
    Live {
        /// The instance.
        instance: Box<FilterInstance>,
        /// Bumped each time the filter is started again on this worker.
        generation: u64,
        /// The filter's failure policy.
        policy: FailurePolicy,
    },
    /// Failed; `retry_at` is set under the `reload` policy.
    Failed {
        /// When to start it again (`None`: never).
        retry_at: Option<Instant>,
        /// The wait before the last start attempt.
        backoff: Duration,
        /// The generation of the instance that failed.
        generation: u64,
    },
}

/// One worker's filter state.
#[derive(Default)]
pub struct Worker {
    /// Instances by slot number.
    slots: FastMap<usize, Slot>,
    /// Chains whose instances (and tick loops) this worker has started, by first slot.
    warmed: BTreeSet<u64>,
    /// The retired set as of `epoch`.
    retired: Retired,
    /// The retirement epoch `retired` reflects.
    epoch: u64,
    /// Streams held by a filter, by [`HoldKey`], with the way what is held goes.
    held: HashMap<HoldKey, (Direction, tokio::sync::oneshot::Sender<Release>)>,
}

impl Worker {
    /// Catches up with chains retired since the last look (one atomic load when none was):
    /// drops their instances and forgets them.
    fn refresh(&mut self) {
        let epoch = retired::epoch();
        if epoch != self.epoch {
            self.apply(retired::snapshot());
            self.epoch = epoch;
        }
    }

    /// Drops what `retired` retires and keeps it as this worker's copy.
    fn apply(&mut self, retired: Retired) {
        self.slots.retain(|n, _| !retired.contains(*n as u64));
        self.warmed.retain(|c| !retired.contains(*c));
        self.retired = retired;
    }

    /// Delivers what callbacks on the instance of generation `generation` in slot `n` did to
    /// other contexts' held streams.
    fn wake(&mut self, n: usize, generation: u64, wakes: Vec<(u32, Wake)>) {
        for (context, wake) in wakes {
            let key = (n, generation, context);
            let release = match wake {
                // Continuing the way that is not held does nothing (as in Envoy).
                Wake::Resume(d) if self.held.get(&key).is_some_and(|(held, _)| *held == d) => {
                    Release::Resume
                }
                Wake::Resume(_) => continue,
                Wake::Reply(reply) => Release::Reply(reply),
            };
            if let Some((_, tx)) = self.held.remove(&key) {
                let _ = tx.send(release);
            }
        }
    }

    /// Releases every stream slot `n` holds as failed.
    fn release_failed(&mut self, n: usize) {
        let keys: Vec<_> = self
            .held
            .keys()
            .filter(|(s, ..)| *s == n)
            .copied()
            .collect();
        for key in keys {
            if let Some((_, tx)) = self.held.remove(&key) {
                let _ = tx.send(Release::Failed);
            }
        }
    }

    /// The slot of `n` (started as a due `reload` if it has none yet); `None` when `n`
    /// belongs to a retired chain.
    fn slot(&mut self, n: usize) -> Option<&mut Slot> {
        match self.slots.entry(n) {
            // A slot still here is live: `refresh` drops the retired ones.
            Entry::Occupied(e) => Some(e.into_mut()),
            Entry::Vacant(_) if self.retired.contains(n as u64) => None,
            Entry::Vacant(e) => Some(e.insert(Slot::Failed {
                retry_at: Some(Instant::now()),
                backoff: Duration::ZERO,
                generation: 0,
            })),
        }
    }
}

thread_local! {
    /// This worker's filter state.
    static WORKER: RefCell<Worker> = RefCell::new(Worker::default());
    /// The heads of held streams, by [`HoldKey`]: apart from [`WORKER`], which is borrowed
    /// while a callback runs, so that the callback can borrow them in turn.
    static PARKED: RefCell<HashMap<HoldKey, Parked>> = RefCell::new(HashMap::new());
}

/// A held stream: its filter's slot, the generation of the instance there (context ids
/// start again in each instance) and its context.
pub type HoldKey = (usize, u64, u32);

/// Parks the head of the held stream `key`.
pub fn park(key: HoldKey, head: Parked) {
    PARKED.with(|p| p.borrow_mut().insert(key, head));
}

/// Takes back the parked head of held stream `key`, if there is one.
pub fn unpark(key: HoldKey) -> Option<Parked> {
    PARKED.with(|p| p.borrow_mut().remove(&key))
}

/// The first wait before starting a filter again after its start failed (`reload`).
const RELOAD_BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest such wait (it doubles after each failed start).
const RELOAD_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The slot of filter `spec` of the chain whose first slot is `chain`: its instance's (the
/// slot of the filter that owns the instance it shares, if it shares one).
pub fn slot_of(chain: u64, spec: &FilterSpec) -> usize {
    chain as usize + spec.vm
}

/// Runs `f` on this worker's live instance of filter `idx` of `chain` (whose filters are
/// `filters`), starting it first if needed — with every filter that shares it. `Err` when
/// the filter is failed on this worker (or fails to start now), or the chain is retired.
pub fn with_instance<R>(
    chain: u64,
    filters: &[FilterSpec],
    idx: usize,
    f: impl FnOnce(&mut FilterInstance, u64) -> R,
) -> Result<R, ()> {
    let spec = &filters[idx];
    WORKER.with(|w| {
        let mut w = w.borrow_mut();
        w.refresh();
        let n = slot_of(chain, spec);
        // A retired chain's filter is not started again.
        let slot = w.slot(n).ok_or(())?;
        if let Slot::Failed {
            retry_at: Some(at),
            backoff,
            generation,
        } = slot
            && *at <= Instant::now()
        {
            let now = Instant::now();
            let (backoff, generation) = (*backoff, *generation);
            let owner = &filters[spec.vm];
            let plugins: Vec<&FilterSpec> = filters.iter().filter(|s| s.vm == spec.vm).collect();
            *slot = match FilterInstance::start(&plugins, n, generation + 1) {
                Ok(mut instance) => {
                    // Callouts from on_vm_start / on_configure.
                    crate::ticks::send_detached_callouts(
                        n,
                        generation + 1,
                        instance.take_callouts(),
                        LIFECYCLE_TICKS,
                    );
                    Slot::Live {
                        instance: Box::new(instance),
                        generation: generation + 1,
                        policy: owner.policy,
                    }
                }
                Err(failure) => {
                    owner.failures.count(&failure);
                    let next = (backoff * 2).clamp(RELOAD_BACKOFF_START, RELOAD_BACKOFF_MAX);
                    Slot::Failed {
                        retry_at: Some(now + next),
                        backoff: next,
                        generation,
                    }
                }
            };
        }
        let (result, wakes, generation) = match slot {
            Slot::Live {
                instance,
                generation,
                ..
            } => {
                let result = f(instance, *generation);
                (result, instance.take_wakes(), *generation)
            }
            Slot::Failed { .. } => return Err(()),
        };
        if !wakes.is_empty() {
            w.wake(n, generation, wakes);
        }
        Ok(result)
    })
}

/// Holds stream `key` (its head or body going `direction`) until a callback of its instance
/// takes it up again (or the instance fails, or the stream ends and drops the receiver).
pub fn hold(key: HoldKey, direction: Direction) -> tokio::sync::oneshot::Receiver<Release> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    WORKER.with(|w| w.borrow_mut().held.insert(key, (direction, tx)));
    rx
}

/// Forgets a held stream (it ended, or was taken up).
pub fn unhold(key: HoldKey) {
    WORKER.with(|w| w.borrow_mut().held.remove(&key));
}

/// Marks this worker's instance of filter `spec` of `chain` failed, per the filter's policy
/// (a failed instance is never called again: it is replaced under `reload`).
pub fn fail(chain: u64, spec: &FilterSpec, failure: &Failure) {
    spec.failures.count(failure);
    WORKER.with(|w| {
        let mut w = w.borrow_mut();
        w.refresh();
        let Some(slot) = w.slot(slot_of(chain, spec)) else {
            return;
        };
        let (Slot::Live { generation, .. } | Slot::Failed { generation, .. }) = slot;
        let generation = *generation;
        *slot = Slot::Failed {
            retry_at: (spec.policy == FailurePolicy::Reload).then(Instant::now),
            backoff: Duration::ZERO,
            generation,
        };
        w.release_failed(slot_of(chain, spec));
    });
}

/// Runs `f` on this worker's live instance in slot `n`, if there is one (and, with
/// `generation`, if it is still that instance), and marks it failed (per its policy) if `f`
/// fails. Never starts an instance. `f` gets the instance's generation.
pub fn with_live_slot(
    n: usize,
    generation: Option<u64>,
    f: impl FnOnce(&mut FilterInstance, u64) -> Result<(), Failure>,
) {
    WORKER.with(|w| {
        let mut w = w.borrow_mut();
        let Some(slot) = w.slots.get_mut(&n) else {
            return;
        };
        let Slot::Live {
            instance,
            generation: live,
            policy,
        } = slot
        else {
            return;
        };
        if generation.is_some_and(|g| g != *live) {
            return; // the instance the call was for is gone
        }
        let generation = *live;
        let result = f(instance, generation);
        let wakes = instance.take_wakes();
        if let Err(failure) = result {
            instance.count_failure(&failure);
            // A trapped instance is never called again; the policy says what follows.
            *slot = Slot::Failed {
                retry_at: (*policy == FailurePolicy::Reload).then(Instant::now),
                backoff: Duration::ZERO,
                generation,
            };
            w.release_failed(n);
        }
        w.wake(n, generation, wakes);
    });
}

/// Records that this worker warmed `chain`; false if it already had.
pub fn mark_warmed(chain: u64) -> bool {
    WORKER.with(|w| w.borrow_mut().warmed.insert(chain))
}

/// Whether this worker has warmed `chain`. Catches up with retirements first, so that the
/// instances of chains retired since are freed (at each stream: cheap when none was).
pub fn is_warmed(chain: u64) -> bool {
    WORKER.with(|w| {
        let mut w = w.borrow_mut();
        w.refresh();
        w.warmed.contains(&chain)
    })
}

/// Number of slots this worker holds.
#[cfg(test)]
pub fn slots() -> usize {
    WORKER.with(|w| w.borrow().slots.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(generation: u64) -> Slot {
        Slot::Failed {
            retry_at: None,
            backoff: Duration::ZERO,
            generation,
        }
    }

    #[test]
    fn retired_slots_leave_the_table_and_are_not_made_again() {
        let mut w = Worker::default();
        let mut retired = Retired::new();
        // Chain A holds slots 0 and 1, chain B slots 2 and 3.
        *w.slot(0).expect("live") = failed(1);
        *w.slot(3).expect("live") = failed(2);
        w.warmed.extend([0, 2]);
        // B retires first: its entries go, A's stay.
        retired.insert(2, 4);
        w.apply(retired.clone());
        assert!(w.slot(3).is_none(), "a retired slot is never made again");
        assert!(matches!(
            w.slots.get(&0),
            Some(Slot::Failed { generation: 1, .. })
        ));
        assert_eq!(w.warmed.iter().collect::<Vec<_>>(), [&0]);
        // A thousand swaps of a two-filter chain while A stays live leave A's slots only.
        for k in 0..1000 {
            let first = 4 + k * 2;
            *w.slot(first).expect("live") = failed(k as u64);
            w.warmed.insert(first as u64);
            retired.insert(first as u64, first as u64 + 2);
            w.apply(retired.clone());
        }
        assert_eq!(w.slots.keys().collect::<Vec<_>>(), [&0]);
        assert_eq!(w.warmed.len(), 1);
        assert!(w.retired.ranges() <= 1, "{:?}", w.retired);
        // Then A: the table empties.
        retired.insert(0, 2);
        w.apply(retired);
        assert!(w.slots.is_empty() && w.warmed.is_empty());
        assert_eq!(w.retired.ranges(), 0);
        assert!(w.slot(1).is_none());
    }
}
