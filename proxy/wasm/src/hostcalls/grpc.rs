//! gRPC calls and streams to a cluster (`crate::grpc` says how they go over the wire):
//! `proxy_grpc_call` queues a unary call like an HTTP callout; `proxy_grpc_stream` opens a
//! stream at once as a task of the worker; `proxy_grpc_send` sends a message on it (and
//! half-closes it with `end_stream`), `proxy_grpc_close` half-closes a stream or cancels a
//! call, `proxy_grpc_cancel` resets a stream or cancels a call (no callback follows).

use weft_abi::{Status, map};

use super::http_call::{Queued, callout_timeout, queue};
use super::{C, ENV, status};
use crate::grpc::{self, OpenStream};
use crate::linker::HostLinker;
use crate::memory::{read, write_u32};

/// The strings and maps a call or stream names: the cluster, the service, the method and
/// the initial metadata (serialized map).
struct Target {
    cluster: String,
    service: String,
    method: String,
    metadata: Vec<u8>,
}

impl Target {
    fn read(
        c: &mut C<'_>,
        cluster: (i32, i32),
        service: (i32, i32),
        method: (i32, i32),
        metadata: (i32, i32),
    ) -> Result<Self, Status> {
        // The SDKs accept only PARSE_FAILURE and INTERNAL_FAILURE from these calls (they
        // panic on any other status): a malformed name or map is the first, a cluster the
        // proxy does not have the second.
        let text = |b: Vec<u8>| String::from_utf8(b).map_err(|_| Status::ParseFailure);
        let target = Self {
            cluster: text(read(c, cluster.0, cluster.1)?)?,
            service: text(read(c, service.0, service.1)?)?,
            method: text(read(c, method.0, method.1)?)?,
            metadata: read(c, metadata.0, metadata.1)?,
        };
        if target.service.is_empty() || target.method.is_empty() {
            return Err(Status::ParseFailure);
        }
        // The cluster must be one of the proxy's (Envoy also takes a serialized GrpcService
        // here; this host takes cluster names only).
        if c.data().clusters.load().find(&target.cluster).is_none() {
            return Err(Status::InternalFailure);
        }
        Ok(target)
    }

    /// The request head, with `timeout_ms` as `grpc-timeout` when set.
    fn head(&self, timeout_ms: Option<u32>) -> Result<http::request::Parts, Status> {
        let pairs = if self.metadata.is_empty() {
            Vec::new()
        } else {
            map::deserialize(&self.metadata).ok_or(Status::ParseFailure)?
        };
        grpc::request_head(
            &self.cluster,
            &self.service,
            &self.method,
            &pairs,
            timeout_ms,
        )
        .ok_or(Status::ParseFailure)
    }
}

/// Adds the gRPC calls.
pub fn add_to_linker(l: &mut HostLinker) -> wasmtime::Result<()> {
    l.func_wrap(
        ENV,
        "proxy_grpc_call",
        |mut c: C<'_>,
         cluster_ptr: i32,
         cluster_len: i32,
         service_ptr: i32,
         service_len: i32,
         method_ptr: i32,
         method_len: i32,
         metadata_ptr: i32,
         metadata_len: i32,
         message_ptr: i32,
         message_len: i32,
         timeout_ms: i32,
         ret_token: i32| {
            if c.data().network {
                // A network filter's callback: nothing would send it.
                return Status::Unimplemented as i32;
            }
            let call = |c: &mut C<'_>| -> Result<(), Status> {
                let target = Target::read(
                    c,
                    (cluster_ptr, cluster_len),
                    (service_ptr, service_len),
                    (method_ptr, method_len),
                    (metadata_ptr, metadata_len),
                )?;
                let message = read(c, message_ptr, message_len)?;
                let timeout = callout_timeout(timeout_ms);
                let head = target.head(Some(timeout.as_millis() as u32))?;
                let request = http::Request::from_parts(head, grpc::frame(&message));
                let queued = Queued {
                    cluster: target.cluster,
                    request,
                    trailers: None,
                    timeout,
                    grpc: true,
                };
                queue(c, ret_token, queued)
            };
            status(call(&mut c))
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_grpc_stream",
        |mut c: C<'_>,
         cluster_ptr: i32,
         cluster_len: i32,
         service_ptr: i32,
         service_len: i32,
         method_ptr: i32,
         method_len: i32,
         metadata_ptr: i32,
         metadata_len: i32,
         ret_token: i32| {
            if c.data().network {
                // A network filter's callback: nothing would send it.
                return Status::Unimplemented as i32;
            }
            let open = |c: &mut C<'_>| -> Result<(), Status> {
                let target = Target::read(
                    c,
                    (cluster_ptr, cluster_len),
                    (service_ptr, service_len),
                    (method_ptr, method_len),
                    (metadata_ptr, metadata_len),
                )?;
                let head = target.head(None)?;
                // A stream runs as a task of this worker: there must be one.
                let runtime =
                    tokio::runtime::Handle::try_current().map_err(|_| Status::InternalFailure)?;
                let token = c.data_mut().next_token();
                write_u32(c, ret_token, token)?;
                let data = c.data_mut();
                data.last_token = token;
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let ticks = crate::limits::LIFECYCLE_TICKS;
                let task = runtime
                    .spawn(grpc::run_stream(
                        data.slot,
                        data.generation,
                        token,
                        target.cluster,
                        head,
                        rx,
                        ticks,
                    ))
                    .abort_handle();
                let context = data.context;
                data.streams.insert(
                    token,
                    OpenStream {
                        context,
                        tx: Some(tx),
                        task,
                    },
                );
                Ok(())
            };
            status(open(&mut c))
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_grpc_send",
        |mut c: C<'_>, token: i32, message_ptr: i32, message_len: i32, end_stream: i32| {
            let send = |c: &mut C<'_>| -> Result<(), Status> {
                let message = read(c, message_ptr, message_len)?;
                let stream = c
                    .data_mut()
                    .streams
                    .get_mut(&(token as u32))
                    .ok_or(Status::NotFound)?;
                // After the filter closed its side nothing more can be sent.
                let tx = stream.tx.as_ref().ok_or(Status::BadArgument)?;
                // The task ended (the stream closed): the message cannot go.
                tx.send(Some(grpc::frame(&message)))
                    .map_err(|_| Status::NotFound)?;
                if end_stream != 0 {
                    stream.close();
                }
                Ok(())
            };
            status(send(&mut c))
        },
    )?;
    // Cancel: a stream is reset, a call forgotten; no callback follows.
    l.func_wrap(ENV, "proxy_grpc_cancel", |mut c: C<'_>, token: i32| {
        status(cancel(&mut c, token as u32))
    })?;
    // Close: a stream is half-closed (the answers still come), a call is cancelled.
    l.func_wrap(ENV, "proxy_grpc_close", |mut c: C<'_>, token: i32| {
        let data = c.data_mut();
        match data.streams.get_mut(&(token as u32)) {
            Some(stream) => {
                stream.close();
                Status::Ok as i32
            }
            None => status(cancel(&mut c, token as u32)),
        }
    })?;
    Ok(())
}

/// Cancels gRPC call or stream `token`: `NOT_FOUND` when there is none.
fn cancel(c: &mut C<'_>, token: u32) -> Result<(), Status> {
    let data = c.data_mut();
    if data.streams.remove(&token).is_some() {
        return Ok(());
    }
    match data.pending.get(&token) {
        Some(p) if p.grpc => {
            data.pending.remove(&token);
            // Not sent yet (the same callback): it never goes.
            data.callouts.retain(|c| c.token != token);
            Ok(())
        }
        _ => Err(Status::NotFound),
    }
}
