//! The stream: `proxy_send_local_response`, `proxy_continue_stream` / `proxy_close_stream`
//! (and the 0.1 names `proxy_continue_request` / `proxy_continue_response`),
//! `proxy_clear_route_cache`, `proxy_done` and `proxy_set_effective_context`.

use weft_abi::{Status, map};

use super::{C, ENV};
use crate::linker::HostLinker;
use crate::memory::read;
use crate::state::{HostState, LocalResponse, Wake};
use weft_core::filter::Direction;

/// `proxy_continue_stream(direction)` for the effective context. As in Envoy, continuing
/// the way that is not stopped does nothing (the request and the response are continued
/// apart).
fn continue_stream(data: &mut HostState, direction: Direction) {
    if data.context == data.callback_context {
        if data.phase == Some(direction) {
            data.resumed = true;
        }
    } else {
        let context = data.context;
        data.wakes.push((context, Wake::Resume(direction)));
    }
}

/// The ABI's stream type: 0 the request, 1 the response (2 and 3, the downstream and upstream
/// of a network filter, are not an HTTP filter's).
fn stream_direction(stream: i32) -> Option<Direction> {
    match stream {
        0 => Some(Direction::Request),
        1 => Some(Direction::Response),
        _ => None,
    }
}

/// `proxy_close_stream` for the effective context: as in Envoy, the stream is reset (the
/// request and the response alike: an HTTP filter's stream ends as one).
fn close_stream(data: &mut HostState) {
    let reply = LocalResponse {
        status: 503,
        details: "closed_by_filter".into(),
        body: Vec::new(),
        headers: Vec::new(),
        reset: true,
    };
    if data.context != data.callback_context {
        let context = data.context;
        data.wakes.push((context, Wake::Reply(reply)));
    } else if data.local_response.is_none() {
        data.local_response = Some(reply);
    }
}

/// A local reply to a gRPC request, as Envoy makes it: HTTP 200, trailers-only, with
/// `grpc-status` (the filter's `grpc_status`, else mapped from the HTTP status) and the body
/// as `grpc-message`.
fn grpc_reply(reply: LocalResponse, grpc_status: i32) -> LocalResponse {
    let code =
        u32::try_from(grpc_status).unwrap_or_else(|_| crate::grpc::code_for_http(reply.status));
    let mut headers: Vec<(Vec<u8>, Vec<u8>)> = reply
        .headers
        .into_iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case(b"content-type"))
        .collect();
    headers.push((b"content-type".to_vec(), b"application/grpc".to_vec()));
    headers.push((b"grpc-status".to_vec(), code.to_string().into_bytes()));
    if !reply.body.is_empty() {
        let message = crate::grpc::percent_encode(&reply.body);
        headers.push((b"grpc-message".to_vec(), message.into_bytes()));
    }
    LocalResponse {
        status: 200,
        details: reply.details,
        body: Vec::new(),
        headers,
        reset: false,
    }
}

/// Adds the stream calls.
pub fn add_to_linker(l: &mut HostLinker) -> wasmtime::Result<()> {
    l.func_wrap(
        ENV,
        "proxy_send_local_response",
        |mut c: C<'_>,
         code: i32,
         dptr: i32,
         dlen: i32,
         bptr: i32,
         blen: i32,
         hptr: i32,
         hlen: i32,
         grpc_status: i32| {
            let read_all = |c: &mut C<'_>| -> Result<_, Status> {
                Ok((
                    read(c, dptr, dlen)?,
                    read(c, bptr, blen)?,
                    read(c, hptr, hlen)?,
                ))
            };
            let (details, body, headers) = match read_all(&mut c) {
                Ok(x) => x,
                Err(s) => return s as i32,
            };
            let Some(headers) = map::deserialize(&headers) else {
                return Status::BadArgument as i32;
            };
            let headers = headers
                .into_iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect();
            // The SDKs trap on any status but OK here: an invalid status becomes a 500 that
            // says so (and a warning), not a silent one.
            let reply = match u16::try_from(code)
                .ok()
                .filter(|s| http::StatusCode::from_u16(*s).is_ok())
            {
                Some(status) => LocalResponse {
                    status,
                    details: String::from_utf8_lossy(&details).into_owned(),
                    body,
                    headers,
                    reset: false,
                },
                None => {
                    let filter = &c.data().plugin.name;
                    tracing::warn!(
                        filter = %filter,
                        "proxy_send_local_response: invalid status {code}; answering 500"
                    );
                    LocalResponse {
                        status: 500,
                        details: "invalid_local_reply_status".into(),
                        body: format!(
                            "filter `{filter}` sent a local reply with invalid status {code}\n"
                        )
                        .into_bytes(),
                        headers: Vec::new(),
                        reset: false,
                    }
                }
            };
            let grpc_request = c.data().req().is_some_and(|r| {
                r.headers
                    .get(http::header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
            });
            let reply = if grpc_request {
                grpc_reply(reply, grpc_status)
            } else {
                reply
            };
            let data = c.data_mut();
            if data.context == data.callback_context {
                data.local_response = Some(reply);
            } else {
                // For another context's stream (set with proxy_set_effective_context).
                let context = data.context;
                data.wakes.push((context, Wake::Reply(reply)));
            }
            Status::Ok as i32
        },
    )?;
    // Continuing marks a paused stream as resumed; closing ends it with a local 503. Either
    // may be for another context's stream (proxy_set_effective_context), which is woken
    // after the callback.
    for name in ["proxy_continue_stream", "proxy_close_stream"] {
        let close = name == "proxy_close_stream";
        l.func_wrap(ENV, name, move |mut c: C<'_>, stream: i32| {
            let Some(direction) = stream_direction(stream) else {
                return Status::BadArgument as i32;
            };
            if close {
                close_stream(c.data_mut());
            } else {
                continue_stream(c.data_mut(), direction);
            }
            Status::Ok as i32
        })?;
    }
    // ABI 0.1.0's names.
    for (name, direction) in [
        ("proxy_continue_request", Direction::Request),
        ("proxy_continue_response", Direction::Response),
    ] {
        l.func_wrap(ENV, name, move |mut c: C<'_>| {
            continue_stream(c.data_mut(), direction);
            Status::Ok as i32
        })?;
    }
    for name in ["proxy_clear_route_cache", "proxy_done"] {
        l.func_wrap(ENV, name, |_c: C<'_>| Status::Ok as i32)?;
    }
    l.func_wrap(
        ENV,
        "proxy_set_effective_context",
        |mut c: C<'_>, context: i32| {
            // As in Envoy, only a live context (a stream that ended is gone).
            if context <= 0 || !c.data().is_live(context as u32) {
                return Status::BadArgument as i32;
            }
            let data = c.data_mut();
            data.context = context as u32;
            // Another context's held stream: its head is read and edited where it waits.
            if data.context != data.callback_context {
                data.borrow_parked(context as u32);
            } else {
                data.return_borrowed();
            }
            Status::Ok as i32
        },
    )?;
    Ok(())
}
