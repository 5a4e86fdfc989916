//! Each worker thread's own table of filter instances (a thread-local): slot `n` holds the
//! worker's instance of filter `n - chain.id` of a chain, started on first use, replaced
//! under the `reload` policy, dropped when its chain is retired.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use weft_config::FailurePolicy;

use crate::failure::Failure;
use crate::instance::{FilterInstance, FilterSpec};

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

/// This worker's instances by slot number (`WasmChain::id + filter`). Slot numbers only
/// grow; entries of retired chains are dropped from the front as soon as every older one is
/// retired too, so the table holds about the slots of live chains, however many swaps ran.
#[derive(Default)]
pub struct Slots {
    /// Slot number of `list[0]`.
    base: usize,
    list: std::collections::VecDeque<Option<Slot>>,
    /// Retired slot numbers at or past `base` whose entries are still in `list`.
    retired: std::collections::BTreeSet<usize>,
}

impl Slots {
    /// The entry of slot `n`, made empty if missing; `None` for a retired slot.
    pub fn entry(&mut self, n: usize) -> Option<&mut Option<Slot>> {
        let i = n.checked_sub(self.base)?;
        if self.retired.contains(&n) {
            return None;
        }
        if self.list.len() <= i {
            self.list.resize_with(i + 1, || None);
        }
        self.list.get_mut(i)
    }

    /// The entry of slot `n` if it has one.
    pub fn get_mut(&mut self, n: usize) -> Option<&mut Option<Slot>> {
        let i = n.checked_sub(self.base)?;
        self.list.get_mut(i)
    }

    /// Frees the instances of slots `first..first + len` and never makes them again.
    fn retire(&mut self, first: usize, len: usize) {
        for n in first.max(self.base)..first + len {
            if let Some(e) = self.get_mut(n) {
                *e = None;
            }
            self.retired.insert(n);
        }
        while self.retired.remove(&self.base) {
            self.list.pop_front();
            self.base += 1;
        }
    }
}

thread_local! {
    /// This worker's instances.
    pub static SLOTS: RefCell<Slots> = RefCell::new(Slots::default());
}

const RELOAD_BACKOFF_START: Duration = Duration::from_millis(100);
const RELOAD_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Runs `f` on this worker's live instance of filter `idx`, starting it first if needed.
/// `Err` when the filter is failed on this worker (or fails to start now).
pub fn with_instance<R>(
    chain: u64,
    idx: usize,
    spec: &FilterSpec,
    f: impl FnOnce(&mut FilterInstance, u64) -> R,
) -> Result<R, ()> {
    SLOTS.with(|slots| {
        let mut slots = slots.borrow_mut();
        let n = chain as usize + idx;
        // A retired chain's filter is not started again.
        let entry = slots.entry(n).ok_or(())?;
        let slot = entry.get_or_insert_with(|| Slot::Failed {
            retry_at: Some(Instant::now()),
            backoff: Duration::ZERO,
            generation: 0,
        });
        if let Slot::Failed {
            retry_at: Some(at),
            backoff,
            generation,
        } = slot
            && *at <= Instant::now()
        {
            let now = Instant::now();
            let (backoff, generation) = (*backoff, *generation);
            *slot = match FilterInstance::start(spec, n) {
                Ok(instance) => Slot::Live {
                    instance: Box::new(instance),
                    generation: generation + 1,
                    policy: spec.policy,
                },
                Err(failure) => {
                    spec.failures.count(&failure);
                    let next = (backoff * 2).clamp(RELOAD_BACKOFF_START, RELOAD_BACKOFF_MAX);
                    Slot::Failed {
                        retry_at: Some(now + next),
                        backoff: next,
                        generation,
                    }
                }
            };
        }
        match slot {
            Slot::Live {
                instance,
                generation,
                ..
            } => Ok(f(instance, *generation)),
            Slot::Failed { .. } => Err(()),
        }
    })
}

/// Marks this worker's instance of filter `idx` failed, per the filter's policy.
pub fn fail(chain: u64, idx: usize, spec: &FilterSpec, failure: &Failure) {
    spec.failures.count(failure);
    SLOTS.with(|slots| {
        let mut slots = slots.borrow_mut();
        let n = chain as usize + idx;
        let Some(entry) = slots.entry(n) else {
            return;
        };
        let generation = match &*entry {
            Some(Slot::Live { generation, .. }) | Some(Slot::Failed { generation, .. }) => {
                *generation
            }
            None => 0,
        };
        let retry_at = (spec.policy == FailurePolicy::Reload).then(Instant::now);
        *entry = Some(Slot::Failed {
            retry_at,
            backoff: Duration::ZERO,
            generation,
        });
    });
}

thread_local! {
    /// The retirement epoch this worker has processed.
    static SEEN_EPOCH: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// How many entries of `RETIRED` this worker has processed.
    static SEEN_RETIRED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Chains this worker has warmed (instances started, tick loops spawned).
    pub static WARMED: RefCell<std::collections::HashSet<u64>> =
        RefCell::new(std::collections::HashSet::new());
}

/// Frees this worker's instances of chains retired since it last looked (cheap when none
/// was).
pub fn free_retired() {
    let epoch = crate::retired::RETIRED_EPOCH.load(std::sync::atomic::Ordering::Acquire);
    if SEEN_EPOCH.with(|s| s.replace(epoch)) == epoch {
        return;
    }
    let Ok(retired) = crate::retired::RETIRED.lock() else {
        return;
    };
    let seen = SEEN_RETIRED.with(|s| s.replace(retired.len()));
    let new = retired.get(seen..).unwrap_or_default();
    SLOTS.with(|slots| {
        let mut slots = slots.borrow_mut();
        for &(id, len) in new {
            slots.retire(id as usize, len as usize);
        }
    });
    WARMED.with(|w| {
        let mut w = w.borrow_mut();
        for (id, _) in new {
            w.remove(id);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(generation: u64) -> Option<Slot> {
        Some(Slot::Failed {
            retry_at: None,
            backoff: Duration::ZERO,
            generation,
        })
    }

    #[test]
    fn retired_slots_leave_the_table_and_are_not_made_again() {
        let mut s = Slots::default();
        // Chain A holds slots 0 and 1, chain B slots 2 and 3.
        *s.entry(0).expect("live") = failed(1);
        *s.entry(3).expect("live") = failed(2);
        // B retires first: its entries go, A's stay, nothing can be trimmed yet.
        s.retire(2, 2);
        assert!(s.entry(3).is_none(), "a retired slot is never made again");
        assert!(matches!(s.entry(0), Some(Some(_))));
        assert_eq!(s.base, 0);
        // Then A: the table empties.
        s.retire(0, 2);
        assert_eq!((s.base, s.list.len(), s.retired.len()), (4, 0, 0));
        assert!(s.entry(1).is_none() && s.get_mut(1).is_none());
        // A thousand swaps of a two-filter chain leave one chain's worth behind.
        for k in 0..1000 {
            let first = 4 + k * 2;
            *s.entry(first).expect("live") = failed(k as u64);
            s.retire(first, 2);
        }
        assert!(
            s.list.len() <= 2 && s.retired.is_empty(),
            "{}",
            s.list.len()
        );
        assert_eq!(s.base, 2004);
    }
}
