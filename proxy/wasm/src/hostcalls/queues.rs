//! Shared queues: `proxy_register_shared_queue`, `proxy_resolve_shared_queue`,
//! `proxy_enqueue_shared_queue`, `proxy_dequeue_shared_queue` (the registry and the delivery
//! of `proxy_on_queue_ready`: [`crate::queues`], [`crate::ticks`]).

use weft_abi::Status;

use super::{C, ENV, status};
use crate::linker::HostLinker;
use crate::memory::{give, read, write_u32};
use crate::queues::Dequeued;

/// Adds the shared-queue calls.
pub fn add_to_linker(l: &mut HostLinker) -> wasmtime::Result<()> {
    l.func_wrap(
        ENV,
        "proxy_register_shared_queue",
        |mut c: C<'_>, ptr: i32, len: i32, ret: i32| {
            let name = match read(&mut c, ptr, len) {
                Ok(n) => n,
                Err(s) => return s as i32,
            };
            let data = c.data();
            // The owner is the filter's root context, whichever context registers.
            let (vm_id, slot, context) = (data.plugin.vm_id.clone(), data.slot, data.root);
            // Registering needs a worker to deliver on_queue_ready on; the canary that
            // checks a filter at startup has none, and the SDKs accept only OK here.
            let token = crate::queues::register(&vm_id, &name, slot, context).unwrap_or(0);
            status(write_u32(&mut c, ret, token))
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, vm_ptr: i32, vm_len: i32, ptr: i32, len: i32, ret: i32| {
            let (vm_id, name) = match (read(&mut c, vm_ptr, vm_len), read(&mut c, ptr, len)) {
                (Ok(v), Ok(n)) => (v, n),
                (Err(s), _) | (_, Err(s)) => return s as i32,
            };
            let vm_id = if vm_id.is_empty() {
                c.data().plugin.vm_id.clone()
            } else {
                String::from_utf8_lossy(&vm_id).into_owned()
            };
            match crate::queues::resolve(&vm_id, &name) {
                Some(token) => status(write_u32(&mut c, ret, token)),
                None => Status::NotFound as i32,
            }
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_enqueue_shared_queue",
        |mut c: C<'_>, token: i32, ptr: i32, len: i32| {
            let item = match read(&mut c, ptr, len) {
                Ok(i) => i,
                Err(s) => return s as i32,
            };
            if crate::queues::enqueue(token as u32, item) {
                Status::Ok as i32
            } else {
                Status::NotFound as i32
            }
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_dequeue_shared_queue",
        |mut c: C<'_>, token: i32, ret_ptr: i32, ret_len: i32| match crate::queues::dequeue(
            token as u32,
        ) {
            Dequeued::Item(item) => {
                Ok::<_, wasmtime::Error>(give(&mut c, &item, ret_ptr, ret_len)? as i32)
            }
            Dequeued::Empty => Ok(Status::Empty as i32),
            Dequeued::NoSuchQueue => Ok(Status::NotFound as i32),
        },
    )?;
    Ok(())
}
