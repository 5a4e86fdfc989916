//! Buffers: `proxy_get_buffer_bytes`, `proxy_get_buffer_status`, `proxy_set_buffer_bytes`
//! over the body being called back for, the callout response's body, the gRPC message being
//! delivered and the VM and plugin configurations; ABI 0.1.0's `proxy_get_configuration`.

use weft_abi::{BufferType, Status};

use super::{C, ENV, status};
use crate::linker::HostLinker;
use crate::memory::{give, read, write_u32};
use crate::state::HostState;

/// Adds the buffer calls.
pub fn add_to_linker(l: &mut HostLinker) -> wasmtime::Result<()> {
    // ABI 0.1.0 reads the plugin configuration with its own call (0.2 uses buffer 7).
    l.func_wrap(
        ENV,
        "proxy_get_configuration",
        |mut c: C<'_>, ret_ptr: i32, ret_len: i32| {
            let config = c.data().plugin.config.clone();
            Ok::<_, wasmtime::Error>(give(&mut c, &config, ret_ptr, ret_len)? as i32)
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, max: i32, ret_ptr: i32, ret_len: i32| {
            let data: Vec<u8> = {
                let Some(data) = buffer(c.data(), kind) else {
                    return Ok(Status::NotFound as i32);
                };
                let start = (start as u32 as usize).min(data.len());
                let end = start.saturating_add(max as u32 as usize).min(data.len());
                data[start..end].to_vec()
            };
            Ok::<_, wasmtime::Error>(give(&mut c, &data, ret_ptr, ret_len)? as i32)
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_get_buffer_status",
        |mut c: C<'_>, kind: i32, len_ptr: i32, flags_ptr: i32| {
            let Some(len) = buffer(c.data(), kind).map(<[u8]>::len) else {
                return Status::NotFound as i32;
            };
            status(
                write_u32(&mut c, len_ptr, len as u32)
                    .and_then(|_| write_u32(&mut c, flags_ptr, 0)),
            )
        },
    )?;
    // Only the body (or, in a network filter, the connection data) being called back for can be
    // written (Envoy's rule); the callout
    // response and the configurations are read-only.
    l.func_wrap(
        ENV,
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, size: i32, ptr: i32, len: i32| {
            let data = match read(&mut c, ptr, len) {
                Ok(d) => d,
                Err(s) => return s as i32,
            };
            match c.data_mut().body_buf_mut() {
                Some((k, buf)) if k as i32 == kind => {
                    buf.splice(start as u32 as usize, size as u32 as usize, &data);
                    Status::Ok as i32
                }
                _ => Status::NotFound as i32,
            }
        },
    )?;
    Ok(())
}

/// The bytes of buffer `kind` (ABI buffer type), when the current callback has it.
fn buffer(state: &HostState, kind: i32) -> Option<&[u8]> {
    match BufferType::from_i32(kind)? {
        kind @ (BufferType::HttpRequestBody
        | BufferType::HttpResponseBody
        | BufferType::DownstreamData
        | BufferType::UpstreamData) => match state.body_buf() {
            Some((k, buf)) if k == kind => Some(buf.as_slice()),
            _ => None,
        },
        BufferType::HttpCallResponseBody => state.callout_response.as_ref().map(|r| &r.body[..]),
        BufferType::VmConfiguration => Some(&state.plugin.vm_config),
        BufferType::PluginConfiguration => Some(&state.plugin.config),
        BufferType::GrpcReceiveBuffer => state.received.message.as_deref(),
    }
}
