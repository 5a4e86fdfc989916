//! HTTP callouts: `proxy_http_call` queues a request to a cluster, which the request path
//! sends once the callback returns (or, from the root context, the worker sends at once) and
//! answers with `proxy_on_http_call_response`;
//! `proxy_get_status` reads the status of the call being answered.

use weft_abi::{Status, map};

use super::{C, ENV};
use crate::linker::HostLinker;
use crate::memory::{give, read, write_u32};

/// The timeout of a callout dispatched with timeout 0 (as Envoy's default route timeout).
pub const DEFAULT_CALLOUT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Adds the callout calls.
pub fn add_to_linker(l: &mut HostLinker) -> wasmtime::Result<()> {
    // A callout: validated and queued; the request path sends it once the callback returns
    // Pause, and delivers the response with proxy_on_http_call_response.
    l.func_wrap(
        ENV,
        "proxy_http_call",
        |mut c: C<'_>,
         up_ptr: i32,
         up_len: i32,
         h_ptr: i32,
         h_len: i32,
         b_ptr: i32,
         b_len: i32,
         _t_ptr: i32,
         _t_len: i32,
         timeout_ms: i32,
         ret_token: i32| {
            let read_all = |c: &mut C<'_>| -> Result<_, Status> {
                Ok((
                    read(c, up_ptr, up_len)?,
                    read(c, h_ptr, h_len)?,
                    read(c, b_ptr, b_len)?,
                ))
            };
            let (cluster, headers, body) = match read_all(&mut c) {
                Ok(x) => x,
                Err(s) => return s as i32,
            };
            let cluster = String::from_utf8_lossy(&cluster).into_owned();
            if !c.data().clusters.contains(&cluster) {
                return Status::BadArgument as i32;
            }
            // Body and trailers callbacks cannot wait for a callout yet: refused rather than
            // answered OK and never sent.
            if c.data().body.is_some() || c.data().trailers.is_some() {
                return Status::InternalFailure as i32;
            }
            let Some(request) = map::deserialize(&headers).and_then(|h| callout_request(&h, body))
            else {
                return Status::BadArgument as i32;
            };
            let token = c.data().last_token.wrapping_add(1).max(1);
            if write_u32(&mut c, ret_token, token).is_err() {
                return Status::InvalidMemoryAccess as i32;
            }
            let data = c.data_mut();
            data.last_token = token;
            data.callouts.push(weft_core::filter::Callout {
                token,
                cluster,
                request,
                timeout: match timeout_ms as u32 {
                    0 => DEFAULT_CALLOUT_TIMEOUT,
                    ms => std::time::Duration::from_millis(u64::from(ms)),
                },
            });
            Status::Ok as i32
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_get_status",
        |mut c: C<'_>, code_ptr: i32, msg_ptr: i32, msg_len: i32| {
            if let Err(s) = write_u32(&mut c, code_ptr, 0) {
                return Ok(s as i32);
            }
            Ok::<_, wasmtime::Error>(give(&mut c, b"", msg_ptr, msg_len)? as i32)
        },
    )?;
    Ok(())
}

/// A callout request from its header map: `:method`, `:path` and `:authority` are required.
fn callout_request(pairs: &[(&[u8], &[u8])], body: Vec<u8>) -> Option<http::Request<bytes::Bytes>> {
    let pseudo = |name: &[u8]| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let mut req = http::Request::builder()
        .method(http::Method::from_bytes(pseudo(b":method")?).ok()?)
        .uri(http::Uri::try_from(pseudo(b":path")?).ok()?)
        .header(
            http::header::HOST,
            http::HeaderValue::from_bytes(pseudo(b":authority")?).ok()?,
        );
    for (k, v) in pairs.iter().filter(|(k, _)| !k.starts_with(b":")) {
        req = req.header(
            http::HeaderName::from_bytes(k).ok()?,
            http::HeaderValue::from_bytes(v).ok()?,
        );
    }
    req.body(bytes::Bytes::from(body)).ok()
}
