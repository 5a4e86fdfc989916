//! Time and timers: `proxy_get_current_time_nanoseconds` and
//! `proxy_set_tick_period_milliseconds` (the tick loop reads the period: [`crate::ticks`]).

use std::time::{SystemTime, UNIX_EPOCH};

use weft_abi::Status;

use super::{C, ENV, status};
use crate::linker::HostLinker;
use crate::memory::write;

/// Adds the clock and tick-period calls.
pub fn add_to_linker(l: &mut HostLinker) -> wasmtime::Result<()> {
    l.func_wrap(
        ENV,
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ret: i32| status(write(&mut c, ret, &unix_ns().to_le_bytes())),
    )?;
    l.func_wrap(
        ENV,
        "proxy_set_tick_period_milliseconds",
        |mut c: C<'_>, period: i32| {
            // The period is the calling filter's (its root context's).
            let data = c.data_mut();
            let root = data.root;
            data.tick_periods.retain(|(r, _)| *r != root);
            data.tick_periods.push((root, period as u32));
            Status::Ok as i32
        },
    )?;
    Ok(())
}

/// Wall-clock time in nanoseconds since the Unix epoch.
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
