//! A monotonic process clock in plain integers, cheap to store in atomics.

use std::sync::OnceLock;

/// `CLOCK_MONOTONIC` (the clock `std::time::Instant` reads) in nanoseconds, read through
/// libc's vDSO call: plain integer arithmetic, without `Instant`'s checked `Duration`
/// subtraction (the request path reads the clock about a dozen times per request). libc's,
/// not rustix's: rustix parses the vDSO itself, which valgrind's does not survive.
#[inline]
#[allow(unsafe_code)] // one FFI call, with a stack value it writes
fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(t.tv_nsec as u64)
}

fn origin_ns() -> u64 {
    static ORIGIN: OnceLock<u64> = OnceLock::new();
    *ORIGIN.get_or_init(monotonic_ns)
}

/// Nanoseconds since the process clock started.
#[inline]
pub fn now_ns() -> u64 {
    let origin = origin_ns();
    monotonic_ns().saturating_sub(origin)
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
