//! Host functions: the proxy-wasm ABI 0.2.1 (`env`) and a minimal WASI preview 1 with no
//! filesystem, sockets, arguments or environment.
//!
//! Every call returns only a status the upstream SDKs accept for it (they panic on any
//! other). Guest pointers and lengths are bounds-checked; a bad one gets
//! `INVALID_MEMORY_ACCESS`, never a host read.

use std::collections::{HashMap, HashSet};
use std::sync::{OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Linker};

use crate::queues::Dequeued;
use weft_core::metrics::FilterMetricKind;

use crate::host::{self, HostState, LocalResponse, MapEdit, MapKind, give, read, write, write_u32};
use weft_abi::map;
use weft_abi::{BufferType, LogLevel, MetricType, Status};

/// Names of every function this module defines, per import module.
pub fn defined() -> &'static HashSet<(&'static str, &'static str)> {
    static SET: OnceLock<HashSet<(&str, &str)>> = OnceLock::new();
    SET.get_or_init(|| {
        let mut s = HashSet::new();
        for n in ENV_FUNCTIONS {
            s.insert(("env", *n));
        }
        for n in WASI_FUNCTIONS {
            s.insert(("wasi_snapshot_preview1", *n));
        }
        s
    })
}

const ENV_FUNCTIONS: &[&str] = &[
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_get_buffer_status",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_add_header_map_value",
    "proxy_get_header_map_size",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_send_local_response",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_continue_request",
    "proxy_continue_response",
    "proxy_clear_route_cache",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_status",
    "proxy_set_effective_context",
    "proxy_done",
    "proxy_call_foreign_function",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
];

const WASI_FUNCTIONS: &[&str] = &[
    "fd_write",
    "environ_get",
    "environ_sizes_get",
    "args_get",
    "args_sizes_get",
    "proc_exit",
    "clock_time_get",
    "clock_res_get",
    "random_get",
    "sched_yield",
];

const WASI_ESUCCESS: i32 = 0;
const WASI_EBADF: i32 = 8;
const WASI_EFAULT: i32 = 21;
const WASI_EINVAL: i32 = 28;

fn status(r: Result<(), Status>) -> i32 {
    match r {
        Ok(()) => Status::Ok as i32,
        Err(s) => s as i32,
    }
}

/// Logs `msg` for filter `plugin` at proxy-wasm `level` (an unknown level logs as an error).
fn log_at(plugin: &str, level: Option<LogLevel>, msg: &[u8]) {
    let msg = String::from_utf8_lossy(msg);
    match level {
        Some(LogLevel::Trace) => tracing::trace!(filter = plugin, "{msg}"),
        Some(LogLevel::Debug) => tracing::debug!(filter = plugin, "{msg}"),
        Some(LogLevel::Info) => tracing::info!(filter = plugin, "{msg}"),
        Some(LogLevel::Warn) => tracing::warn!(filter = plugin, "{msg}"),
        Some(LogLevel::Error | LogLevel::Critical) | None => {
            tracing::error!(filter = plugin, "{msg}")
        }
    }
}

/// The proxy's log level in proxy-wasm terms.
fn log_level() -> LogLevel {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::TRACE => LogLevel::Trace,
        LevelFilter::DEBUG => LogLevel::Debug,
        LevelFilter::INFO => LogLevel::Info,
        LevelFilter::WARN => LogLevel::Warn,
        LevelFilter::ERROR => LogLevel::Error,
        _ => LogLevel::Critical,
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Shared data: key → (value, compare-and-swap version).
type SharedData = RwLock<HashMap<Vec<u8>, (Vec<u8>, u32)>>;

/// The process-wide shared data of all filters.
fn shared_data() -> &'static SharedData {
    static DATA: OnceLock<SharedData> = OnceLock::new();
    DATA.get_or_init(Default::default)
}

/// Adds every host function to `linker`.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    add_env(linker)?;
    add_wasi(linker)?;
    Ok(())
}

type C<'a> = Caller<'a, HostState>;

fn add_env(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_log",
        |mut c: C<'_>, level: i32, ptr: i32, len: i32| {
            let level = LogLevel::from_i32(level);
            status(read(&mut c, ptr, len).map(|m| log_at(&c.data().plugin.name, level, &m)))
        },
    )?;
    l.func_wrap("env", "proxy_get_log_level", |mut c: C<'_>, ret: i32| {
        status(write_u32(&mut c, ret, log_level() as u32))
    })?;
    l.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ret: i32| status(write(&mut c, ret, &unix_ns().to_le_bytes())),
    )?;
    l.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: C<'_>, period: i32| {
            c.data_mut().tick_period_ms = period as u32;
            Status::Ok as i32
        },
    )?;
    l.func_wrap(
        "env",
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
        "env",
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
    // Only the body being called back for can be written (Envoy's rule); the callout
    // response and the configurations are read-only.
    l.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, kind: i32, start: i32, size: i32, ptr: i32, len: i32| {
            let data = match read(&mut c, ptr, len) {
                Ok(d) => d,
                Err(s) => return s as i32,
            };
            match c.data_mut().body.as_mut() {
                Some((k, buf)) if *k as i32 == kind => {
                    buf.splice(start as u32 as usize, size as u32 as usize, &data);
                    Status::Ok as i32
                }
                _ => Status::NotFound as i32,
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, map: i32, ret_ptr: i32, ret_len: i32| {
            let Some(kind) = MapKind::from_abi(map) else {
                return Ok(Status::BadArgument as i32);
            };
            let pairs = host::map_pairs(c.data(), kind);
            let bytes = map::serialize(pairs.iter().map(|(k, v)| (k, v)));
            Ok::<_, wasmtime::Error>(give(&mut c, &bytes, ret_ptr, ret_len)? as i32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_size",
        |mut c: C<'_>, map: i32, ret: i32| {
            let Some(kind) = MapKind::from_abi(map) else {
                return Status::BadArgument as i32;
            };
            let pairs = host::map_pairs(c.data(), kind);
            let size = map::serialize(pairs.iter().map(|(k, v)| (k, v))).len();
            status(write_u32(&mut c, ret, size as u32))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, map: i32, ptr: i32, len: i32| {
            let Some(kind) = MapKind::from_abi(map) else {
                return Status::BadArgument as i32;
            };
            let bytes = match read(&mut c, ptr, len) {
                Ok(b) => b,
                Err(s) => return s as i32,
            };
            let Some(pairs) = map::deserialize(&bytes) else {
                return Status::BadArgument as i32;
            };
            if !host::map_set_all(c.data_mut(), kind, &pairs) {
                warn_invalid(&c);
            }
            Status::Ok as i32
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C<'_>, map: i32, kptr: i32, klen: i32, ret_ptr: i32, ret_len: i32| {
            let Some(kind) = MapKind::from_abi(map) else {
                return Ok(Status::BadArgument as i32);
            };
            let key = match read(&mut c, kptr, klen) {
                Ok(k) => k.to_ascii_lowercase(),
                Err(s) => return Ok(s as i32),
            };
            match host::map_get(c.data(), kind, &key) {
                Some(v) => Ok::<_, wasmtime::Error>(give(&mut c, &v, ret_ptr, ret_len)? as i32),
                None => Ok(Status::NotFound as i32),
            }
        },
    )?;
    for (name, edit) in [
        ("proxy_replace_header_map_value", MapEdit::Replace),
        ("proxy_add_header_map_value", MapEdit::Add),
    ] {
        l.func_wrap(
            "env",
            name,
            move |mut c: C<'_>, map: i32, kptr: i32, klen: i32, vptr: i32, vlen: i32| {
                edit_map(&mut c, map, edit, kptr, klen, Some((vptr, vlen)))
            },
        )?;
    }
    l.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C<'_>, map: i32, kptr: i32, klen: i32| {
            edit_map(&mut c, map, MapEdit::Remove, kptr, klen, None)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C<'_>, ptr: i32, len: i32, ret_ptr: i32, ret_len: i32| {
            let path = match read(&mut c, ptr, len) {
                Ok(p) => p,
                Err(s) => return Ok(s as i32),
            };
            match host::property(c.data(), &path) {
                Some(v) => Ok::<_, wasmtime::Error>(give(&mut c, &v, ret_ptr, ret_len)? as i32),
                None => Ok(Status::NotFound as i32),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C<'_>, ptr: i32, len: i32, vptr: i32, vlen: i32| {
            let (path, value) = match (read(&mut c, ptr, len), read(&mut c, vptr, vlen)) {
                (Ok(p), Ok(v)) => (p, v),
                (Err(s), _) | (_, Err(s)) => return s as i32,
            };
            let data = c.data_mut();
            match &mut data.stream_props {
                Some(props) => {
                    props.insert(path, value);
                }
                None => {
                    data.properties.insert((data.context, path), value);
                }
            }
            Status::Ok as i32
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C<'_>,
         code: i32,
         dptr: i32,
         dlen: i32,
         bptr: i32,
         blen: i32,
         hptr: i32,
         hlen: i32,
         _grpc: i32| {
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
            let Ok(status) = u16::try_from(code) else {
                return Status::BadArgument as i32;
            };
            c.data_mut().local_response = Some(LocalResponse {
                status,
                details: String::from_utf8_lossy(&details).into_owned(),
                body,
                headers,
            });
            Status::Ok as i32
        },
    )?;
    // Continuing marks a paused request as resumed; closing ends it with a local 503.
    for name in ["proxy_continue_stream", "proxy_close_stream"] {
        let close = name == "proxy_close_stream";
        l.func_wrap("env", name, move |mut c: C<'_>, _stream: i32| {
            if !close {
                c.data_mut().resumed = true;
            } else if c.data().local_response.is_none() {
                c.data_mut().local_response = Some(LocalResponse {
                    status: 503,
                    details: "closed_by_filter".into(),
                    body: b"stream closed by filter\n".to_vec(),
                    headers: Vec::new(),
                });
            }
            Status::Ok as i32
        })?;
    }
    for name in ["proxy_continue_request", "proxy_continue_response"] {
        l.func_wrap("env", name, |mut c: C<'_>| {
            c.data_mut().resumed = true;
            Status::Ok as i32
        })?;
    }
    for name in ["proxy_clear_route_cache", "proxy_done"] {
        l.func_wrap("env", name, |_c: C<'_>| Status::Ok as i32)?;
    }
    l.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: C<'_>, context: i32| {
            if context <= 0 {
                return Status::BadArgument as i32;
            }
            c.data_mut().context = context as u32;
            Status::Ok as i32
        },
    )?;
    // A callout: validated and queued; the request path sends it once the callback returns
    // Pause, and delivers the response with proxy_on_http_call_response.
    l.func_wrap(
        "env",
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
                timeout: std::time::Duration::from_millis(u64::from(timeout_ms as u32).max(1)),
            });
            Status::Ok as i32
        },
    )?;
    l.func_wrap(
        "env",
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
        "env",
        "proxy_grpc_stream",
        |_c: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| {
            Status::InternalFailure as i32
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_send",
        |_c: C<'_>, _: i32, _: i32, _: i32, _: i32| Status::NotFound as i32,
    )?;
    for name in ["proxy_grpc_cancel", "proxy_grpc_close"] {
        l.func_wrap("env", name, |_c: C<'_>, _: i32| Status::NotFound as i32)?;
    }
    l.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: C<'_>, code_ptr: i32, msg_ptr: i32, msg_len: i32| {
            if let Err(s) = write_u32(&mut c, code_ptr, 0) {
                return Ok(s as i32);
            }
            Ok::<_, wasmtime::Error>(give(&mut c, b"", msg_ptr, msg_len)? as i32)
        },
    )?;
    // Weft's extensions (`weft.*`) come with the SDK; every name is unknown for now.
    l.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut c: C<'_>,
         name_ptr: i32,
         name_len: i32,
         args_ptr: i32,
         args_len: i32,
         ret_ptr: i32,
         ret_len: i32| {
            let (name, args) = match (
                read(&mut c, name_ptr, name_len),
                read(&mut c, args_ptr, args_len),
            ) {
                (Ok(n), Ok(a)) => (n, a),
                (Err(s), _) | (_, Err(s)) => return Ok(s as i32),
            };
            match host::foreign(c.data_mut(), &name, &args) {
                Ok(None) => Ok(Status::Ok as i32),
                Ok(Some(bytes)) => {
                    Ok::<_, wasmtime::Error>(give(&mut c, &bytes, ret_ptr, ret_len)? as i32)
                }
                Err(s) => Ok(s as i32),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C<'_>, kptr: i32, klen: i32, ret_ptr: i32, ret_len: i32, ret_cas: i32| {
            let key = match read(&mut c, kptr, klen) {
                Ok(k) => k,
                Err(s) => return Ok(s as i32),
            };
            let found = shared_data().read().ok().and_then(|m| m.get(&key).cloned());
            let Some((value, cas)) = found else {
                return Ok(Status::NotFound as i32);
            };
            if let Err(s) = write_u32(&mut c, ret_cas, cas) {
                return Ok(s as i32);
            }
            Ok::<_, wasmtime::Error>(give(&mut c, &value, ret_ptr, ret_len)? as i32)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C<'_>, kptr: i32, klen: i32, vptr: i32, vlen: i32, cas: i32| {
            let (key, value) = match (read(&mut c, kptr, klen), read(&mut c, vptr, vlen)) {
                (Ok(k), Ok(v)) => (k, v),
                (Err(s), _) | (_, Err(s)) => return s as i32,
            };
            let Ok(mut map) = shared_data().write() else {
                return Status::InternalFailure as i32;
            };
            let entry = map.entry(key).or_insert_with(|| (Vec::new(), 0));
            // cas 0 writes unconditionally; otherwise it must match the current version.
            if cas != 0 && entry.1 != cas as u32 {
                return Status::CasMismatch as i32;
            }
            entry.0 = value;
            entry.1 = entry.1.wrapping_add(1).max(1);
            Status::Ok as i32
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: C<'_>, ptr: i32, len: i32, ret: i32| {
            let name = match read(&mut c, ptr, len) {
                Ok(n) => n,
                Err(s) => return s as i32,
            };
            let (vm_id, slot) = (c.data().plugin.vm_id.clone(), c.data().slot);
            // Registering needs a worker to deliver on_queue_ready on; the canary that
            // checks a filter at startup has none, and the SDKs accept only OK here.
            let token = crate::queues::register(&vm_id, &name, slot).unwrap_or(0);
            status(write_u32(&mut c, ret, token))
        },
    )?;
    l.func_wrap(
        "env",
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
        "env",
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
        "env",
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
    l.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C<'_>, kind: i32, ptr: i32, len: i32, ret: i32| {
            let kind = match MetricType::from_i32(kind) {
                Some(MetricType::Counter) => FilterMetricKind::Counter,
                Some(MetricType::Gauge) => FilterMetricKind::Gauge,
                Some(MetricType::Histogram) => FilterMetricKind::Histogram,
                None => return Status::BadArgument as i32,
            };
            let name = match read(&mut c, ptr, len) {
                Ok(n) => String::from_utf8_lossy(&n).into_owned(),
                Err(s) => return s as i32,
            };
            let id = c.data().metrics.define(kind, &name);
            status(write_u32(&mut c, ret, id))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_increment_metric",
        |mut c: C<'_>, id: i32, offset: i64| {
            let Some(m) = c.data_mut().metric(id as u32) else {
                return Status::NotFound as i32;
            };
            match m.kind {
                FilterMetricKind::Counter if offset < 0 => Status::BadArgument as i32,
                FilterMetricKind::Counter | FilterMetricKind::Gauge => {
                    m.add(offset);
                    Status::Ok as i32
                }
                FilterMetricKind::Histogram => Status::BadArgument as i32,
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_record_metric",
        |mut c: C<'_>, id: i32, value: i64| {
            let Some(m) = c.data_mut().metric(id as u32) else {
                return Status::NotFound as i32;
            };
            match m.kind {
                FilterMetricKind::Counter => m.add(value),
                FilterMetricKind::Gauge => m.set(value),
                FilterMetricKind::Histogram => m.record(value as u64),
            }
            Status::Ok as i32
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: C<'_>, id: i32, ret: i32| {
            let Some(m) = c.data_mut().metric(id as u32) else {
                return Status::NotFound as i32;
            };
            if m.kind == FilterMetricKind::Histogram {
                return Status::BadArgument as i32;
            }
            status(write(&mut c, ret, &(m.value() as u64).to_le_bytes()))
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

/// The bytes of buffer `kind` (ABI buffer type), when the current callback has it.
fn buffer(state: &HostState, kind: i32) -> Option<&[u8]> {
    match BufferType::from_i32(kind)? {
        kind @ (BufferType::HttpRequestBody | BufferType::HttpResponseBody) => match &state.body {
            Some((k, buf)) if *k == kind => Some(buf.as_slice()),
            _ => None,
        },
        BufferType::HttpCallResponseBody => state.callout_response.as_ref().map(|r| &r.body[..]),
        BufferType::VmConfiguration => Some(&state.plugin.vm_config),
        BufferType::PluginConfiguration => Some(&state.plugin.config),
        BufferType::DownstreamData | BufferType::UpstreamData | BufferType::GrpcReceiveBuffer => {
            None
        }
    }
}

fn warn_invalid(c: &C<'_>) {
    tracing::warn!(
        filter = %c.data().plugin.name,
        "filter set a header name or value that is not valid HTTP; ignored"
    );
}

fn edit_map(
    c: &mut C<'_>,
    map: i32,
    edit: MapEdit,
    kptr: i32,
    klen: i32,
    value: Option<(i32, i32)>,
) -> i32 {
    let Some(kind) = MapKind::from_abi(map) else {
        return Status::BadArgument as i32;
    };
    let key = match read(c, kptr, klen) {
        Ok(k) => k.to_ascii_lowercase(),
        Err(s) => return s as i32,
    };
    let value = match value {
        Some((p, l)) => match read(c, p, l) {
            Ok(v) => v,
            Err(s) => return s as i32,
        },
        None => Vec::new(),
    };
    if !host::map_edit(c.data_mut(), kind, edit, &key, &value) {
        warn_invalid(c);
    }
    Status::Ok as i32
}

fn add_wasi(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    const W: &str = "wasi_snapshot_preview1";
    l.func_wrap(
        W,
        "fd_write",
        |mut c: C<'_>, fd: i32, iovs: i32, iovs_len: i32, nwritten: i32| {
            if fd != 1 && fd != 2 {
                return WASI_EBADF;
            }
            let Ok(table) = read(&mut c, iovs, iovs_len.saturating_mul(8)) else {
                return WASI_EFAULT;
            };
            let mut total = 0u32;
            for iov in table.chunks_exact(8) {
                let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                let Ok(bytes) = read(&mut c, ptr, len) else {
                    return WASI_EFAULT;
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
                return WASI_EFAULT;
            }
            WASI_ESUCCESS
        },
    )?;
    for name in ["environ_sizes_get", "args_sizes_get"] {
        l.func_wrap(
            W,
            name,
            |mut c: C<'_>, count: i32, size: i32| match write_u32(&mut c, count, 0)
                .and_then(|_| write_u32(&mut c, size, 0))
            {
                Ok(()) => WASI_ESUCCESS,
                Err(_) => WASI_EFAULT,
            },
        )?;
    }
    for name in ["environ_get", "args_get"] {
        l.func_wrap(W, name, |_c: C<'_>, _: i32, _: i32| WASI_ESUCCESS)?;
    }
    l.func_wrap(
        W,
        "proc_exit",
        |_c: C<'_>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::format_err!("filter called proc_exit({code})"))
        },
    )?;
    l.func_wrap(
        W,
        "clock_time_get",
        |mut c: C<'_>, id: i32, _precision: i64, ret: i32| {
            let ns = match id {
                0 => unix_ns(),
                1..=3 => weft_core::clock::now_ns(),
                _ => return WASI_EINVAL,
            };
            match write(&mut c, ret, &ns.to_le_bytes()) {
                Ok(()) => WASI_ESUCCESS,
                Err(_) => WASI_EFAULT,
            }
        },
    )?;
    l.func_wrap(
        W,
        "clock_res_get",
        |mut c: C<'_>, _id: i32, ret: i32| match write(&mut c, ret, &1_000u64.to_le_bytes()) {
            Ok(()) => WASI_ESUCCESS,
            Err(_) => WASI_EFAULT,
        },
    )?;
    l.func_wrap(W, "random_get", |mut c: C<'_>, ptr: i32, len: i32| {
        let mut bytes = vec![0u8; len as u32 as usize];
        fastrand::fill(&mut bytes);
        match write(&mut c, ptr, &bytes) {
            Ok(()) => WASI_ESUCCESS,
            Err(_) => WASI_EFAULT,
        }
    })?;
    l.func_wrap(W, "sched_yield", |_c: C<'_>| WASI_ESUCCESS)?;
    Ok(())
}
