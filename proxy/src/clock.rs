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
    origin().elapsed().as_millis() as u64 + 1
}
