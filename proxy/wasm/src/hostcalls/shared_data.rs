//! Shared data: `proxy_get_shared_data` and `proxy_set_shared_data` over one process-wide
//! key-value store with compare-and-swap versions, shared by every filter on every worker.

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

use weft_abi::Status;

use super::{C, ENV};
use crate::linker::HostLinker;
use crate::memory::{give, read, write_u32};

/// Adds the shared-data calls.
pub fn add_to_linker(l: &mut HostLinker) -> wasmtime::Result<()> {
    l.func_wrap(
        ENV,
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
        ENV,
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
    Ok(())
}

/// Shared data: key → (value, compare-and-swap version).
type SharedData = RwLock<HashMap<Vec<u8>, (Vec<u8>, u32)>>;

/// The process-wide shared data of all filters.
fn shared_data() -> &'static SharedData {
    static DATA: OnceLock<SharedData> = OnceLock::new();
    DATA.get_or_init(Default::default)
}
