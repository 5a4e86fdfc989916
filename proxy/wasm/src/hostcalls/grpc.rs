//! gRPC calls and streams, which this host does not make: `proxy_grpc_call` and
//! `proxy_grpc_stream` answer `INTERNAL_FAILURE`, the calls on an existing call `NOT_FOUND`
//! (the statuses the SDKs expect when there is no such call).

use weft_abi::Status;

use super::{C, ENV};
use crate::linker::HostLinker;

/// Adds the gRPC calls.
pub fn add_to_linker(l: &mut HostLinker) -> wasmtime::Result<()> {
    l.func_wrap(
        ENV,
        "proxy_grpc_call",
        |_c: C<'_>,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32,
         _: i32| { Status::InternalFailure as i32 },
    )?;
    l.func_wrap(
        ENV,
        "proxy_grpc_stream",
        |_c: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| {
            Status::InternalFailure as i32
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_grpc_send",
        |_c: C<'_>, _: i32, _: i32, _: i32, _: i32| Status::NotFound as i32,
    )?;
    for name in ["proxy_grpc_cancel", "proxy_grpc_close"] {
        l.func_wrap(ENV, name, |_c: C<'_>, _: i32| Status::NotFound as i32)?;
    }
    Ok(())
}
