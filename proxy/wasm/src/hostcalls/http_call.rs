//! HTTP callouts: `proxy_http_call` queues a request to a cluster, which the request path
//! sends once the callback returns (or, from the root context, the worker sends at once) and
//! answers with `proxy_on_http_call_response`;
//! `proxy_get_status` reads the status of the gRPC call or stream being closed.

use weft_abi::{Status, map};

use super::{C, ENV, status};
use crate::linker::HostLinker;
use crate::memory::{give, read, write_u32};
use crate::state::Pending;

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
         t_ptr: i32,
         t_len: i32,
         timeout_ms: i32,
         ret_token: i32| {
            if c.data().network {
                // A network filter's callback: nothing would send it.
                return Status::Unimplemented as i32;
            }
            let read_all = |c: &mut C<'_>| -> Result<_, Status> {
                Ok((
                    read(c, up_ptr, up_len)?,
                    read(c, h_ptr, h_len)?,
                    read(c, b_ptr, b_len)?,
                    read(c, t_ptr, t_len)?,
                ))
            };
            let (cluster, headers, body, trailers) = match read_all(&mut c) {
                Ok(x) => x,
                Err(s) => return s as i32,
            };
            let cluster = String::from_utf8_lossy(&cluster).into_owned();
            if c.data().clusters.load().find(&cluster).is_none() {
                return Status::BadArgument as i32;
            }
            let Some(request) = map::deserialize(&headers).and_then(|h| callout_request(&h, body))
            else {
                return Status::BadArgument as i32;
            };
            let trailers = match trailer_map(&trailers) {
                Ok(t) => t,
                Err(s) => return s as i32,
            };
            let timeout = callout_timeout(timeout_ms);
            let request = Queued {
                cluster,
                request,
                trailers,
                timeout,
                grpc: false,
            };
            status(queue(&mut c, ret_token, request))
        },
    )?;
    // The status of the gRPC call or stream being closed (`proxy_on_grpc_close`); 0 and no
    // message otherwise.
    l.func_wrap(
        ENV,
        "proxy_get_status",
        |mut c: C<'_>, code_ptr: i32, msg_ptr: i32, msg_len: i32| {
            let (code, message) = c.data().received.status.clone().unwrap_or_default();
            if let Err(s) = write_u32(&mut c, code_ptr, code) {
                return Ok(s as i32);
            }
            Ok::<_, wasmtime::Error>(give(&mut c, message.as_bytes(), msg_ptr, msg_len)? as i32)
        },
    )?;
    Ok(())
}

/// The time a callout or call is allowed for `timeout_ms` (0: the default).
pub fn callout_timeout(timeout_ms: i32) -> std::time::Duration {
    match timeout_ms as u32 {
        0 => DEFAULT_CALLOUT_TIMEOUT,
        ms => std::time::Duration::from_millis(u64::from(ms)),
    }
}

/// A callout (or unary gRPC call) to queue.
pub struct Queued {
    /// The cluster it goes to.
    pub cluster: String,
    /// The request.
    pub request: http::Request<bytes::Bytes>,
    /// Trailers after the body.
    pub trailers: Option<http::HeaderMap>,
    /// Time allowed for the answer.
    pub timeout: std::time::Duration,
    /// A unary gRPC call.
    pub grpc: bool,
}

/// The trailers of a callout from their serialized map (none when empty).
fn trailer_map(bytes: &[u8]) -> Result<Option<http::HeaderMap>, Status> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let pairs = map::deserialize(bytes).ok_or(Status::BadArgument)?;
    let mut trailers = http::HeaderMap::new();
    for (k, v) in pairs {
        let name = http::HeaderName::from_bytes(k).map_err(|_| Status::BadArgument)?;
        let value = http::HeaderValue::from_bytes(v).map_err(|_| Status::BadArgument)?;
        trailers.append(name, value);
    }
    Ok((!trailers.is_empty()).then_some(trailers))
}

/// Queues a callout (or unary gRPC call) for the current callback to hand on, answered to the
/// current context, and writes its token at `ret_token`.
pub fn queue(c: &mut C<'_>, ret_token: i32, queued: Queued) -> Result<(), Status> {
    let Queued {
        cluster,
        request,
        trailers,
        timeout,
        grpc,
    } = queued;
    let token = c.data_mut().next_token();
    write_u32(c, ret_token, token)?;
    let data = c.data_mut();
    data.last_token = token;
    let context = data.context;
    data.pending.insert(
        token,
        Pending {
            context,
            grpc,
            awaited: true,
        },
    );
    data.callouts.push(weft_core::filter::Callout {
        token,
        cluster,
        request,
        trailers,
        timeout,
    });
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
