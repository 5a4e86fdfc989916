//! Retirement of swapped-out chains: slot numbers are handed out to chains once
//! ([`NEXT_SLOT`]); when a chain's [`ChainLife`] ends (the chain was swapped out and its last
//! stream ended), its slot range is published in [`RETIRED`] for every worker to free its
//! instances of.

/// The next free slot number: each chain takes one per filter, so slot tables stay dense.
pub static NEXT_SLOT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Slot ranges of retired chains, in retirement order, for every worker to free its
/// instances of (each worker goes through the entries added since it last looked).
pub static RETIRED: std::sync::Mutex<Vec<(u64, u64)>> = std::sync::Mutex::new(Vec::new());
/// Bumped on each retirement, so that a worker checks the list only when it changed.
pub static RETIRED_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The lifetime of a chain's instances: shared by the chain and each of its streams. When
/// the last one goes (the chain was swapped out and its last stream ended), every worker
/// frees its instances of the chain at its next stream.
pub struct ChainLife {
    /// Slot number of the chain's first filter.
    pub id: u64,
    /// Number of filters.
    pub len: u64,
}

impl Drop for ChainLife {
    fn drop(&mut self) {
        if let Ok(mut retired) = RETIRED.lock() {
            retired.push((self.id, self.len));
        }
        RETIRED_EPOCH.fetch_add(1, std::sync::atomic::Ordering::Release);
    }
}
