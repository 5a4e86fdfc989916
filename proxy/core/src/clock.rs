//! A monotonic process clock in plain integers, cheap to store in atomics.

use std::sync::OnceLock;
use std::time::Instant;

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Nanoseconds since the process clock started.
#[inline]
pub fn now_ns() -> u64 {
    origin().elapsed().as_nanos() as u64
}

/// Milliseconds since the process clock started; never 0, so 0 can mean "never".
#[inline]
pub fn now_ms() -> u64 {
    ns_to_ms(now_ns())
}

/// The [`now_ms`] value of a [`now_ns`] reading, to avoid reading the clock twice.
#[inline]
pub fn ns_to_ms(ns: u64) -> u64 {
    ns / 1_000_000 + 1
}
