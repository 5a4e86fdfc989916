//! A minimal WASI preview 1: `fd_write` to stdout and stderr (lines go to the proxy's log),
//! empty arguments and environment, clocks, `random_get`, `sched_yield`, and `proc_exit`
//! (which fails the instance). No filesystem or sockets: anything else a module imports from
//! WASI answers `ENOSYS` ([`crate::linker`]).

use weft_abi::LogLevel;

use super::C;
use super::log::log_at;
use super::time::unix_ns;
use crate::linker::HostLinker;
use crate::memory::{read, write, write_u32};

/// The WASI preview 1 import module.
pub const MODULE: &str = "wasi_snapshot_preview1";

const ESUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EFAULT: i32 = 21;
const EINVAL: i32 = 28;
/// Function not implemented.
pub const ENOSYS: i32 = 52;

/// Adds the WASI functions.
pub fn add_to_linker(l: &mut HostLinker) -> wasmtime::Result<()> {
    l.func_wrap(
        MODULE,
        "fd_write",
        |mut c: C<'_>, fd: i32, iovs: i32, iovs_len: i32, nwritten: i32| {
            if fd != 1 && fd != 2 {
                return EBADF;
            }
            let Ok(table) = read(&mut c, iovs, iovs_len.saturating_mul(8)) else {
                return EFAULT;
            };
            let mut total = 0u32;
            for iov in table.chunks_exact(8) {
                let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                let Ok(bytes) = read(&mut c, ptr, len) else {
                    return EFAULT;
                };
                total = total.saturating_add(bytes.len() as u32);
                c.data_mut().stdout.extend_from_slice(&bytes);
            }
            // Whole lines go to the proxy's log, tagged with the filter's name.
            while let Some(nl) = c.data().stdout.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = c.data_mut().stdout.drain(..=nl).collect();
                let level = if fd == 2 {
                    LogLevel::Warn
                } else {
                    LogLevel::Info
                };
                log_at(&c.data().plugin.name, Some(level), &line[..nl]);
            }
            if c.data().stdout.len() > 64 * 1024 {
                let line = std::mem::take(&mut c.data_mut().stdout);
                log_at(&c.data().plugin.name, Some(LogLevel::Info), &line);
            }
            if write_u32(&mut c, nwritten, total).is_err() {
                return EFAULT;
            }
            ESUCCESS
        },
    )?;
    for name in ["environ_sizes_get", "args_sizes_get"] {
        l.func_wrap(
            MODULE,
            name,
            |mut c: C<'_>, count: i32, size: i32| match write_u32(&mut c, count, 0)
                .and_then(|_| write_u32(&mut c, size, 0))
            {
                Ok(()) => ESUCCESS,
                Err(_) => EFAULT,
            },
        )?;
    }
    for name in ["environ_get", "args_get"] {
        l.func_wrap(MODULE, name, |_c: C<'_>, _: i32, _: i32| ESUCCESS)?;
    }
    l.func_wrap(
        MODULE,
        "proc_exit",
        |_c: C<'_>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::format_err!("filter called proc_exit({code})"))
        },
    )?;
    l.func_wrap(
        MODULE,
        "clock_time_get",
        |mut c: C<'_>, id: i32, _precision: i64, ret: i32| {
            let ns = match id {
                0 => unix_ns(),
                1..=3 => weft_core::clock::now_ns(),
                _ => return EINVAL,
            };
            match write(&mut c, ret, &ns.to_le_bytes()) {
                Ok(()) => ESUCCESS,
                Err(_) => EFAULT,
            }
        },
    )?;
    l.func_wrap(
        MODULE,
        "clock_res_get",
        |mut c: C<'_>, _id: i32, ret: i32| match write(&mut c, ret, &1_000u64.to_le_bytes()) {
            Ok(()) => ESUCCESS,
            Err(_) => EFAULT,
        },
    )?;
    l.func_wrap(MODULE, "random_get", |mut c: C<'_>, ptr: i32, len: i32| {
        let mut bytes = vec![0u8; len as u32 as usize];
        fastrand::fill(&mut bytes);
        match write(&mut c, ptr, &bytes) {
            Ok(()) => ESUCCESS,
            Err(_) => EFAULT,
        }
    })?;
    l.func_wrap(MODULE, "sched_yield", |_c: C<'_>| ESUCCESS)?;
    Ok(())
}
