//! Retirement of swapped-out chains. Each chain takes a range of slot numbers once
//! ([`ChainLife::new`]); when its [`ChainLife`] ends (the chain was swapped out and its last
//! stream ended), the range joins the process-wide [`Retired`] set and every worker frees its
//! instances of it ([`crate::worker`]). The set merges adjacent ranges and everything below
//! the oldest live slot into one number, so it holds at most one range per live chain,
//! however many swaps ran.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// The next free slot number: each chain takes one per filter (at least one).
static NEXT_SLOT: AtomicU64 = AtomicU64::new(0);

/// The slots of retired chains.
static RETIRED: Mutex<Retired> = Mutex::new(Retired::new());

/// Bumped on each retirement, so that a worker looks at [`RETIRED`] only when it changed.
static RETIRED_EPOCH: AtomicU64 = AtomicU64::new(0);

/// The lifetime of a chain's instances: shared by the chain and each of its streams. When
/// the last one goes (the chain was swapped out and its last stream ended), the chain's
/// slots are retired: every worker frees its instances of them and never starts them again.
#[derive(Debug)]
pub struct ChainLife {
    /// The first slot number.
    first: u64,
    /// How many slot numbers.
    len: u64,
}

impl ChainLife {
    /// Takes slot numbers for a chain of `filters` filters.
    pub fn new(filters: usize) -> Self {
        let len = (filters as u64).max(1);
        Self {
            first: NEXT_SLOT.fetch_add(len, Ordering::Relaxed),
            len,
        }
    }

    /// The slot number of the chain's first filter (filter `i` has `first() + i`); unique
    /// to the chain.
    pub fn first(&self) -> u64 {
        self.first
    }
}

impl Drop for ChainLife {
    fn drop(&mut self) {
        RETIRED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(self.first, self.first + self.len);
        RETIRED_EPOCH.fetch_add(1, Ordering::Release);
    }
}

/// A set of retired slot numbers: every number below `below`, and the half-open ranges in
/// `ranges` (disjoint, not touching each other or `below`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retired {
    /// Every slot number below it is retired.
    below: u64,
    /// Start → end.
    ranges: BTreeMap<u64, u64>,
}

impl Retired {
    /// The empty set.
    pub const fn new() -> Self {
        Self {
            below: 0,
            ranges: BTreeMap::new(),
        }
    }

    /// Adds `start..end`.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end || end <= self.below {
            return;
        }
        let (mut start, mut end) = (start.max(self.below), end);
        // A range ending at or after `start` and beginning before it is merged.
        if let Some((&s, &e)) = self.ranges.range(..start).next_back()
            && e >= start
        {
            self.ranges.remove(&s);
            start = s;
            end = end.max(e);
        }
        // So are the ranges beginning within (or right after) the new one.
        while let Some((&s, &e)) = self.ranges.range(start..).next() {
            if s > end {
                break;
            }
            self.ranges.remove(&s);
            end = end.max(e);
        }
        if start <= self.below {
            self.below = end;
        } else {
            self.ranges.insert(start, end);
        }
    }

    /// Whether slot `n` is retired.
    pub fn contains(&self, n: u64) -> bool {
        n < self.below
            || self
                .ranges
                .range(..=n)
                .next_back()
                .is_some_and(|(_, &end)| n < end)
    }

    /// Number of ranges kept besides `below`: at most the number of live chains.
    #[cfg(test)]
    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }
}

/// The retirement epoch: it changes whenever a chain is retired.
pub fn epoch() -> u64 {
    RETIRED_EPOCH.load(Ordering::Acquire)
}

/// The retired set as it is now.
pub fn snapshot() -> Retired {
    RETIRED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_fold_into_below() {
        let mut r = Retired::new();
        r.insert(4, 6);
        r.insert(8, 10);
        assert_eq!(r.ranges(), 2);
        assert!(r.contains(4) && r.contains(5) && !r.contains(6) && !r.contains(3));
        r.insert(6, 8);
        assert_eq!(r.ranges(), 1, "4..10 in one range");
        assert!((4..10).all(|n| r.contains(n)) && !r.contains(10));
        r.insert(0, 4);
        assert_eq!((r.below, r.ranges()), (10, 0));
        r.insert(2, 3);
        assert_eq!((r.below, r.ranges()), (10, 0), "already retired");
        r.insert(12, 14);
        r.insert(11, 12);
        assert_eq!(r.ranges(), 1, "11..14");
        assert!(!r.contains(10) && r.contains(11) && r.contains(13) && !r.contains(14));
    }

    #[test]
    fn the_retired_set_stays_bounded_over_many_swaps() {
        // One chain stays live throughout (its slots keep a gap open below the others).
        let live = ChainLife::new(2);
        for _ in 0..1_000 {
            // A chain is swapped in and, at the next swap, out.
            drop(ChainLife::new(2));
        }
        let retired = snapshot();
        // Other tests of this process may hold a few chains of their own.
        assert!(retired.ranges() <= 8, "{} ranges", retired.ranges());
        assert!(!retired.contains(live.first()));
        let next = ChainLife::new(1);
        assert!(retired.contains(next.first() - 1), "the last swap's slots");
        let first = live.first();
        drop(live);
        assert!(snapshot().contains(first) && snapshot().contains(first + 1));
    }
}
