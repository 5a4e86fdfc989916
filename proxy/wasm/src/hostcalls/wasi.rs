//! A minimal WASI preview 1: `fd_write` to stdout and stderr (lines go to the proxy's log),
//! empty arguments and environment, clocks, `random_get`, `sched_yield`, and `proc_exit`
//! (which fails the instance). The standard streams are character devices (stdin reads as
//! empty) and there are no preopened directories, as Go and TinyGo runtimes check at start;
//! no filesystem or sockets otherwise: anything else a module imports from WASI answers
//! `ENOSYS` ([`crate::linker`]).

use weft_abi::LogLevel;

use super::C;
use super::log::log_at;
use super::time::unix_ns;
use crate::linker::HostLinker;
use crate::memory::{read, with_slice_mut, write, write_u32};

/// The WASI preview 1 import module (tests name it).
#[cfg(test)]
pub const MODULE: &str = "wasi_snapshot_preview1";

/// Success.
const ESUCCESS: i32 = 0;
/// Bad file descriptor.
const EBADF: i32 = 8;
/// No such file or directory.
const ENOENT: i32 = 44;
/// Invalid seek (on a stream).
const ESPIPE: i32 = 70;
/// Bad address: a pointer or length outside the guest's memory.
const EFAULT: i32 = 21;
/// Invalid argument.
const EINVAL: i32 = 28;
/// I/O error.
const EIO: i32 = 29;
/// Function not implemented.
pub const ENOSYS: i32 = 52;

/// Adds the WASI functions, under `wasi_snapshot_preview1` and its predecessor
/// `wasi_unstable` alike ([`weft_abi::WASI_MODULES`]).
pub fn add_to_linker(l: &mut HostLinker) -> wasmtime::Result<()> {
    for module in weft_abi::WASI_MODULES {
        add_module(l, module)?;
    }
    Ok(())
}

/// Adds the WASI functions under import module `module`.
fn add_module(l: &mut HostLinker, module: &'static str) -> wasmtime::Result<()> {
    l.func_wrap(
        module,
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
            module,
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
        l.func_wrap(module, name, |_c: C<'_>, _: i32, _: i32| ESUCCESS)?;
    }
    l.func_wrap(
        module,
        "proc_exit",
        |_c: C<'_>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::format_err!("filter called proc_exit({code})"))
        },
    )?;
    l.func_wrap(
        module,
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
        module,
        "clock_res_get",
        |mut c: C<'_>, _id: i32, ret: i32| match write(&mut c, ret, &1_000u64.to_le_bytes()) {
            Ok(()) => ESUCCESS,
            Err(_) => EFAULT,
        },
    )?;
    // Filled in place in guest memory from the operating system's generator: the host
    // allocates nothing, whatever length the guest asks for.
    l.func_wrap(
        module,
        "random_get",
        |mut c: C<'_>, ptr: i32, len: i32| match with_slice_mut(&mut c, ptr, len, getrandom::fill) {
            Ok(Ok(())) => ESUCCESS,
            Ok(Err(e)) => {
                tracing::warn!("random_get: the system's generator failed: {e}");
                EIO
            }
            Err(_) => EFAULT,
        },
    )?;
    l.func_wrap(module, "sched_yield", |_c: C<'_>| ESUCCESS)?;
    add_descriptors(l, module)
}

/// The file descriptors: stdin, stdout and stderr only (character devices; stdin at its
/// end), no preopened directories (`fd_prestat_get` answers `EBADF` from fd 3 on, which is
/// how Go's and TinyGo's start-up know the list ended), nothing to open.
fn add_descriptors(l: &mut HostLinker, module: &'static str) -> wasmtime::Result<()> {
    let standard = |fd: i32| (0..=2).contains(&fd);
    l.func_wrap(
        module,
        "fd_prestat_get",
        |_c: C<'_>, _fd: i32, _buf: i32| EBADF,
    )?;
    l.func_wrap(
        module,
        "fd_prestat_dir_name",
        |_c: C<'_>, _fd: i32, _path: i32, _len: i32| EBADF,
    )?;
    l.func_wrap(
        module,
        "fd_fdstat_get",
        move |mut c: C<'_>, fd: i32, buf: i32| {
            if !standard(fd) {
                return EBADF;
            }
            // fdstat: filetype (character device = 2), flags (append for stdout and stderr),
            // rights base (read for stdin, write for the others), rights inheriting.
            let mut stat = [0u8; 24];
            stat[0] = 2;
            let (flags, rights): (u16, u64) = if fd == 0 { (0, 1 << 1) } else { (1, 1 << 6) };
            stat[2..4].copy_from_slice(&flags.to_le_bytes());
            stat[8..16].copy_from_slice(&rights.to_le_bytes());
            match write(&mut c, buf, &stat) {
                Ok(()) => ESUCCESS,
                Err(_) => EFAULT,
            }
        },
    )?;
    l.func_wrap(
        module,
        "fd_read",
        move |mut c: C<'_>, fd: i32, _iovs: i32, _iovs_len: i32, nread: i32| {
            if fd != 0 {
                return EBADF;
            }
            // Standard input is at its end.
            match write_u32(&mut c, nread, 0) {
                Ok(()) => ESUCCESS,
                Err(_) => EFAULT,
            }
        },
    )?;
    l.func_wrap(
        module,
        "fd_seek",
        move |_c: C<'_>, fd: i32, _offset: i64, _whence: i32, _ret: i32| {
            if standard(fd) { ESPIPE } else { EBADF }
        },
    )?;
    l.func_wrap(module, "fd_close", move |_c: C<'_>, fd: i32| {
        if standard(fd) { ESUCCESS } else { EBADF }
    })?;
    l.func_wrap(
        module,
        "path_open",
        |_c: C<'_>,
         _dirfd: i32,
         _flags: i32,
         _path: i32,
         _path_len: i32,
         _oflags: i32,
         _base: i64,
         _inheriting: i64,
         _fdflags: i32,
         _ret: i32| ENOENT,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{self, Func, Import, i32_const};

    #[test]
    fn go_and_tinygo_start_up_finds_no_preopened_directories_and_standard_streams() {
        let rt = testing::runtime();
        let import = |name, params| Import {
            module: MODULE,
            name,
            params,
            results: 1,
        };
        // As Go's syscall package starts: fd_prestat_get from fd 3 until EBADF (it panics on
        // anything else); then fd_fdstat_get on stdout.
        let wasm = testing::module(
            &[import("fd_prestat_get", 2), import("fd_fdstat_get", 2)],
            &[
                Func {
                    export: "prestat",
                    name: "prestat",
                    params: 0,
                    results: 1,
                    body: [i32_const(3), i32_const(0), vec![0x10, 0x00]].concat(),
                },
                Func {
                    export: "fdstat",
                    name: "fdstat",
                    params: 1,
                    results: 1,
                    body: [vec![0x20, 0x00], i32_const(64), vec![0x10, 0x01]].concat(),
                },
            ],
            1,
        );
        let (mut store, instance) = testing::instance(&rt, &wasm);
        let prestat = instance
            .get_typed_func::<(), i32>(&mut store, "prestat")
            .unwrap();
        assert_eq!(prestat.call(&mut store, ()).unwrap(), EBADF);
        let fdstat = instance
            .get_typed_func::<i32, i32>(&mut store, "fdstat")
            .unwrap();
        assert_eq!(fdstat.call(&mut store, 1).unwrap(), ESUCCESS);
        let memory = instance.get_memory(&mut store, "memory").unwrap();
        assert_eq!(memory.data(&store)[64], 2, "a character device");
        assert_eq!(fdstat.call(&mut store, 7).unwrap(), EBADF);
    }

    #[test]
    fn random_get_fills_guest_memory_in_place_and_refuses_what_is_outside_it() {
        let rt = testing::runtime();
        // (func (export "rand") (param i32 i32) (result i32) local.get 0 local.get 1 call 0)
        let wasm = testing::module(
            &[Import {
                module: MODULE,
                name: "random_get",
                params: 2,
                results: 1,
            }],
            &[Func {
                export: "rand",
                name: "rand",
                params: 2,
                results: 1,
                body: vec![0x20, 0x00, 0x20, 0x01, 0x10, 0x00],
            }],
            1,
        );
        let (mut store, instance) = testing::instance(&rt, &wasm);
        let rand = instance
            .get_typed_func::<(i32, i32), i32>(&mut store, "rand")
            .unwrap();
        let memory = instance.get_memory(&mut store, "memory").unwrap();
        let page = 65_536;

        // All of the guest's memory: random, in every 1 KiB.
        assert_eq!(rand.call(&mut store, (0, page)).unwrap(), ESUCCESS);
        let first = memory.data(&store)[..page as usize].to_vec();
        assert!(first.chunks(1024).all(|c| c.iter().any(|b| *b != 0)));
        assert_eq!(rand.call(&mut store, (0, 32)).unwrap(), ESUCCESS);
        assert_ne!(
            memory.data(&store)[..32],
            first[..32],
            "fresh bytes each call"
        );
        assert_eq!(rand.call(&mut store, (page, 0)).unwrap(), ESUCCESS);

        // Past the end, by a little or by almost 4 GiB: EFAULT, with nothing allocated.
        let before = testing::peak_rss();
        assert_eq!(rand.call(&mut store, (page - 8, 16)).unwrap(), EFAULT);
        assert_eq!(rand.call(&mut store, (16, -1)).unwrap(), EFAULT);
        assert_eq!(rand.call(&mut store, (16, i32::MAX)).unwrap(), EFAULT);
        assert_eq!(rand.call(&mut store, (-1, 2)).unwrap(), EFAULT);
        let after = testing::peak_rss();
        assert!(
            after < before + (64 << 20),
            "peak RSS went from {before} to {after}"
        );
    }
}
