//! Host functions, one file per proxy-wasm interface, each adding its functions to the
//! [`HostLinker`] with its own `add_to_linker`; [`wasi`] is the minimal WASI preview 1.
//!
//! Every call returns only a status the upstream SDKs accept for it (they panic on any
//! other). Guest pointers and lengths are bounds-checked ([`crate::memory`]); a bad one gets
//! `INVALID_MEMORY_ACCESS` (WASI: `EFAULT`), never a host read or write outside the guest.

use wasmtime::Caller;

use weft_abi::Status;

use crate::linker::HostLinker;
use crate::state::HostState;

pub mod buffers;
pub mod foreign;
pub mod grpc;
pub mod http_call;
pub mod log;
pub mod maps;
pub mod metrics;
pub mod properties;
pub mod queues;
pub mod shared_data;
pub mod stream;
pub mod time;
pub mod wasi;

/// The proxy-wasm ABI's import module.
pub const ENV: &str = "env";

/// What every host function gets: the caller, with its instance's [`HostState`].
type C<'a> = Caller<'a, HostState>;

/// A status as the ABI returns it.
fn status(r: Result<(), Status>) -> i32 {
    match r {
        Ok(()) => Status::Ok as i32,
        Err(s) => s as i32,
    }
}

/// Adds every host function to `linker`.
pub fn add_to_linker(linker: &mut HostLinker) -> wasmtime::Result<()> {
    log::add_to_linker(linker)?;
    time::add_to_linker(linker)?;
    buffers::add_to_linker(linker)?;
    maps::add_to_linker(linker)?;
    properties::add_to_linker(linker)?;
    stream::add_to_linker(linker)?;
    http_call::add_to_linker(linker)?;
    grpc::add_to_linker(linker)?;
    shared_data::add_to_linker(linker)?;
    queues::add_to_linker(linker)?;
    metrics::add_to_linker(linker)?;
    foreign::add_to_linker(linker)?;
    wasi::add_to_linker(linker)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_linked_modules_are_the_abis_and_every_function_is_recorded() {
        assert_eq!(
            weft_abi::IMPORT_MODULES,
            &[ENV, wasi::MODULE, "wasi_unstable"]
        );
        let engine = wasmtime::Engine::default();
        let mut linker = HostLinker::new(&engine);
        add_to_linker(&mut linker).unwrap();
        assert!(linker.is_defined(ENV, "proxy_log"));
        assert!(linker.is_defined(ENV, "proxy_call_foreign_function"));
        assert!(linker.is_defined(wasi::MODULE, "random_get"));
        assert!(!linker.is_defined(ENV, "proxy_no_such_call"));
        assert!(
            linker
                .defined()
                .all(|(m, _)| weft_abi::IMPORT_MODULES.contains(&m))
        );
    }
}
