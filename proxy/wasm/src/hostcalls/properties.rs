//! Properties: `proxy_get_property` (what there is: [`crate::properties`]) and
//! `proxy_set_property` (per stream while a stream callback runs, else per context).

use weft_abi::Status;

use super::{C, ENV};
use crate::linker::HostLinker;
use crate::memory::{give, read, with_bytes};

/// Adds the property calls.
pub fn add_to_linker(l: &mut HostLinker) -> wasmtime::Result<()> {
    l.func_wrap(
        ENV,
        "proxy_get_property",
        |mut c: C<'_>, ptr: i32, len: i32, ret_ptr: i32, ret_len: i32| {
            let value = match with_bytes(&mut c, ptr, len, |path, state| {
                crate::properties::property(state, path)
            }) {
                Ok(v) => v,
                Err(s) => return Ok(s as i32),
            };
            match value {
                Some(v) => Ok::<_, wasmtime::Error>(give(&mut c, &v, ret_ptr, ret_len)? as i32),
                None => Ok(Status::NotFound as i32),
            }
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_set_property",
        |mut c: C<'_>, ptr: i32, len: i32, vptr: i32, vlen: i32| {
            let (path, value) = match (read(&mut c, ptr, len), read(&mut c, vptr, vlen)) {
                (Ok(p), Ok(v)) => (p, v),
                (Err(s), _) | (_, Err(s)) => return s as i32,
            };
            // Kept as read when already normal (no copy).
            let owned = match crate::properties::normalized(&path) {
                std::borrow::Cow::Owned(p) => Some(p),
                std::borrow::Cow::Borrowed(_) => None,
            };
            let path = owned.unwrap_or(path);
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
    Ok(())
}
