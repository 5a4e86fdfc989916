//! The proxy-wasm host calls, declared and wrapped here rather than through the upstream
//! crate's `hostcalls` (which panic on a status outside the spec and on a header value that
//! is not UTF-8): every status maps to a `Result`, every text is read lossily. wasm32 only.
//!
//! Memory the host hands back was allocated through the module's
//! `proxy_on_memory_allocate` ([`crate::wasm::proxy_on_memory_allocate`], a boxed slice of
//! exactly the size asked), so it is taken back with `Vec::from_raw_parts` (capacity =
//! length); or, from a Weft host, written into the module's scratch area
//! ([`crate::wasm::SCRATCH`]), and then copied out at once.
#![allow(unsafe_code)]

use std::ptr::null_mut;

use crate::host::Status;

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_log(level: u32, ptr: *const u8, len: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(ret: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        kind: u32,
        start: usize,
        max: usize,
        ret_ptr: *mut *mut u8,
        ret_len: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        kind: u32,
        start: usize,
        size: usize,
        ptr: *const u8,
        len: usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(map: u32, ret_ptr: *mut *mut u8, ret_len: *mut usize) -> u32;
    fn proxy_get_header_map_value(
        map: u32,
        key_ptr: *const u8,
        key_len: usize,
        ret_ptr: *mut *mut u8,
        ret_len: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map: u32,
        key_ptr: *const u8,
        key_len: usize,
        value_ptr: *const u8,
        value_len: usize,
    ) -> u32;
    fn proxy_add_header_map_value(
        map: u32,
        key_ptr: *const u8,
        key_len: usize,
        value_ptr: *const u8,
        value_len: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map: u32, key_ptr: *const u8, key_len: usize) -> u32;
    fn proxy_get_property(
        path_ptr: *const u8,
        path_len: usize,
        ret_ptr: *mut *mut u8,
        ret_len: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_ptr: *const u8,
        path_len: usize,
        value_ptr: *const u8,
        value_len: usize,
    ) -> u32;
    fn proxy_send_local_response(
        status: u32,
        details_ptr: *const u8,
        details_len: usize,
        body_ptr: *const u8,
        body_len: usize,
        headers_ptr: *const u8,
        headers_len: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_continue_stream(stream: u32) -> u32;
    fn proxy_call_foreign_function(
        name_ptr: *const u8,
        name_len: usize,
        args_ptr: *const u8,
        args_len: usize,
        ret_ptr: *mut *mut u8,
        ret_len: *mut usize,
    ) -> u32;
    fn proxy_define_metric(
        kind: u32,
        name_ptr: *const u8,
        name_len: usize,
        ret_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    fn proxy_record_metric(id: u32, value: u64) -> u32;
    fn proxy_get_shared_data(
        key_ptr: *const u8,
        key_len: usize,
        ret_ptr: *mut *mut u8,
        ret_len: *mut usize,
        ret_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_ptr: *const u8,
        key_len: usize,
        value_ptr: *const u8,
        value_len: usize,
        cas: u32,
    ) -> u32;
    fn proxy_http_call(
        upstream_ptr: *const u8,
        upstream_len: usize,
        headers_ptr: *const u8,
        headers_len: usize,
        body_ptr: *const u8,
        body_len: usize,
        trailers_ptr: *const u8,
        trailers_len: usize,
        timeout_ms: u32,
        ret_token: *mut u32,
    ) -> u32;
}

/// A status as a `Result` (0 is OK); a status this SDK has no name for is an internal
/// failure, never a panic.
fn check(status: u32) -> Result<(), Status> {
    use weft_abi::Status as S;
    match i32::try_from(status).ok().and_then(S::from_i32) {
        Some(S::Ok) => Ok(()),
        Some(S::NotFound) => Err(Status::NotFound),
        Some(S::BadArgument) => Err(Status::BadArgument),
        Some(S::CasMismatch) => Err(Status::CasMismatch),
        _ => Err(Status::InternalFailure),
    }
}

/// Bytes the host returned as text: moved, not copied, when they are UTF-8 (they nearly
/// always are); lossily otherwise.
fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Takes ownership of bytes the host returned (null: none).
fn take(ptr: *mut u8, len: usize) -> Vec<u8> {
    if ptr.is_null() {
        return Vec::new();
    }
    let scratch = crate::wasm::SCRATCH.0.get().cast::<u8>();
    if ptr == scratch {
        // SAFETY: the host wrote `len` bytes into the scratch area (bounded by its size
        // here whatever the host said); nothing else writes it before this copy.
        return unsafe { std::slice::from_raw_parts(scratch, len.min(crate::wasm::SCRATCH_LEN)) }
            .to_vec();
    }
    // SAFETY: the host wrote a pointer it got from this module's allocator for exactly
    // `len` bytes (capacity = length), and hands ownership to the caller; it is taken once.
    unsafe { Vec::from_raw_parts(ptr, len, len) }
}

/// Calls a host function that returns bytes through `(ret_ptr, ret_len)`.
fn returned(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Result<Vec<u8>, Status> {
    let (mut ptr, mut len): (*mut u8, usize) = (null_mut(), 0);
    check(call(&mut ptr, &mut len))?;
    Ok(take(ptr, len))
}

/// Serialises pairs in the proxy-wasm map format.
pub fn serialize_map(pairs: &[(&str, &str)]) -> Vec<u8> {
    weft_abi::map::serialize(pairs.iter().map(|(k, v)| (*k, *v)))
}

/// Parses the proxy-wasm map format (lossy text; a malformed map reads as empty).
pub fn deserialize_map(bytes: &[u8]) -> Vec<(String, String)> {
    weft_abi::map::deserialize(bytes)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .collect()
}

/// `proxy_log`.
pub fn log(level: u32, message: &str) {
    // SAFETY: the pointer and length describe `message`, alive for the call.
    unsafe { proxy_log(level, message.as_ptr(), message.len()) };
}

/// `proxy_get_current_time_nanoseconds`.
pub fn now_ns() -> Result<u64, Status> {
    let mut t = 0u64;
    // SAFETY: `t` is a valid place for the host to write a u64.
    check(unsafe { proxy_get_current_time_nanoseconds(&mut t) })?;
    Ok(t)
}

/// `proxy_set_tick_period_milliseconds`.
pub fn set_tick_period(ms: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_set_tick_period_milliseconds(ms) })
}

/// `proxy_get_buffer_bytes`.
pub fn buffer(kind: u32, start: usize, max: usize) -> Result<Vec<u8>, Status> {
    // SAFETY: the return places are valid for the host to write.
    returned(|p, l| unsafe { proxy_get_buffer_bytes(kind, start, max, p, l) })
}

/// `proxy_set_buffer_bytes`.
pub fn set_buffer(kind: u32, start: usize, size: usize, value: &[u8]) -> Result<(), Status> {
    // SAFETY: the pointer and length describe `value`, alive for the call.
    check(unsafe { proxy_set_buffer_bytes(kind, start, size, value.as_ptr(), value.len()) })
}

/// `proxy_get_header_map_pairs`.
pub fn map(map: u32) -> Result<Vec<(String, String)>, Status> {
    // SAFETY: the return places are valid for the host to write.
    returned(|p, l| unsafe { proxy_get_header_map_pairs(map, p, l) }).map(|b| deserialize_map(&b))
}

/// `proxy_get_header_map_value`: `Ok(None)` when absent.
pub fn map_value(map: u32, key: &str) -> Result<Option<String>, Status> {
    // SAFETY: `key` is alive for the call; the return places are valid.
    let r =
        returned(|p, l| unsafe { proxy_get_header_map_value(map, key.as_ptr(), key.len(), p, l) });
    match r {
        Ok(b) => Ok(Some(text(b))),
        Err(Status::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `proxy_replace_header_map_value` (`Some`) or `proxy_remove_header_map_value` (`None`).
pub fn set_map_value(map: u32, key: &str, value: Option<&str>) -> Result<(), Status> {
    // SAFETY: `key` and `value` are alive for the call.
    check(unsafe {
        match value {
            Some(v) => {
                proxy_replace_header_map_value(map, key.as_ptr(), key.len(), v.as_ptr(), v.len())
            }
            None => proxy_remove_header_map_value(map, key.as_ptr(), key.len()),
        }
    })
}

/// `proxy_add_header_map_value`.
pub fn add_map_value(map: u32, key: &str, value: &str) -> Result<(), Status> {
    // SAFETY: `key` and `value` are alive for the call.
    check(unsafe {
        proxy_add_header_map_value(map, key.as_ptr(), key.len(), value.as_ptr(), value.len())
    })
}

/// Calls `f` with a property path as the ABI takes it (segments separated by NUL), built
/// on the stack when it fits (every path the standard filters read does).
fn with_property_path<T>(path: &[&str], f: impl FnOnce(&[u8]) -> T) -> T {
    let len = path
        .iter()
        .map(|s| s.len() + 1)
        .sum::<usize>()
        .saturating_sub(1);
    let mut stack = [0u8; 64];
    let mut heap = Vec::new();
    let buf: &mut [u8] = if len <= stack.len() {
        &mut stack[..len]
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    let mut at = 0;
    for (i, segment) in path.iter().enumerate() {
        if i > 0 {
            buf[at] = 0;
            at += 1;
        }
        buf[at..at + segment.len()].copy_from_slice(segment.as_bytes());
        at += segment.len();
    }
    f(buf)
}

/// `proxy_get_property`: `Ok(None)` when absent.
pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
    let r = with_property_path(path, |p| {
        // SAFETY: `p` is alive for the call; the return places are valid.
        returned(|rp, rl| unsafe { proxy_get_property(p.as_ptr(), p.len(), rp, rl) })
    });
    match r {
        Ok(b) => Ok(Some(b)),
        Err(Status::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `proxy_set_property`.
pub fn set_property(path: &[&str], value: &[u8]) -> Result<(), Status> {
    with_property_path(path, |p| {
        // SAFETY: `p` and `value` are alive for the call.
        check(unsafe { proxy_set_property(p.as_ptr(), p.len(), value.as_ptr(), value.len()) })
    })
}

/// `proxy_http_call` with no trailers: the callout's token.
pub fn http_call(
    cluster: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout_ms: u32,
) -> Result<u32, Status> {
    let h = serialize_map(headers);
    let body = body.unwrap_or_default();
    let mut token = 0u32;
    // SAFETY: every pointer describes a buffer alive for the call; `token` is valid.
    check(unsafe {
        proxy_http_call(
            cluster.as_ptr(),
            cluster.len(),
            h.as_ptr(),
            h.len(),
            body.as_ptr(),
            body.len(),
            std::ptr::null(),
            0,
            timeout_ms,
            &mut token,
        )
    })?;
    Ok(token)
}

/// `proxy_send_local_response`.
pub fn send_response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Result<(), Status> {
    let h = serialize_map(headers);
    // SAFETY: every pointer describes a buffer alive for the call.
    check(unsafe {
        proxy_send_local_response(
            u32::from(status),
            null_mut(),
            0,
            body.as_ptr(),
            body.len(),
            h.as_ptr(),
            h.len(),
            -1,
        )
    })
}

/// `proxy_continue_stream` (0 request, 1 response).
pub fn resume(stream: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_continue_stream(stream) })
}

/// `proxy_call_foreign_function`: `Ok(None)` when the function returned nothing.
pub fn call_foreign(name: &str, args: &[u8]) -> Result<Option<Vec<u8>>, Status> {
    let (mut ptr, mut len): (*mut u8, usize) = (null_mut(), 0);
    // SAFETY: `name` and `args` are alive for the call; the return places are valid.
    check(unsafe {
        proxy_call_foreign_function(
            name.as_ptr(),
            name.len(),
            args.as_ptr(),
            args.len(),
            &mut ptr,
            &mut len,
        )
    })?;
    Ok((!ptr.is_null()).then(|| take(ptr, len)))
}

/// `proxy_define_metric` (0 counter, 1 gauge, 2 histogram).
pub fn define_metric(kind: u32, name: &str) -> Result<u32, Status> {
    let mut id = 0u32;
    // SAFETY: `name` is alive for the call; `id` is valid.
    check(unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

/// `proxy_increment_metric`.
pub fn increment_metric(id: u32, by: i64) -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_increment_metric(id, by) })
}

/// `proxy_record_metric`.
pub fn record_metric(id: u32, value: u64) -> Result<(), Status> {
    // SAFETY: no pointers.
    check(unsafe { proxy_record_metric(id, value) })
}

/// `proxy_get_shared_data`: the value and its version, `(None, None)` when absent.
pub fn shared_data(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    let (mut ptr, mut len, mut cas): (*mut u8, usize, u32) = (null_mut(), 0, 0);
    // SAFETY: `key` is alive for the call; the return places are valid.
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut ptr, &mut len, &mut cas) };
    match check(status) {
        Ok(()) => (Some(take(ptr, len)), Some(cas)),
        Err(_) => (None, None),
    }
}

/// `proxy_set_shared_data` (`cas` 0: unconditionally).
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
    // SAFETY: `key` and `value` are alive for the call.
    check(unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    })
}
