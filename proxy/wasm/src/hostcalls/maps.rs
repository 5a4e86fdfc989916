//! Header maps: `proxy_get_header_map_pairs`, `proxy_get_header_map_size`,
//! `proxy_set_header_map_pairs`, `proxy_get_header_map_value` and the replace, add and remove
//! calls (what the maps are: [`crate::maps`]).

use weft_abi::{Status, map};

use super::{C, ENV, status};
use crate::linker::HostLinker;
use crate::maps::{self, MapEdit, MapKind};
use crate::memory::{give, read, with_bytes, write_u32};

/// Adds the header-map calls.
pub fn add_to_linker(l: &mut HostLinker) -> wasmtime::Result<()> {
    l.func_wrap(
        ENV,
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, map: i32, ret_ptr: i32, ret_len: i32| {
            let Some(kind) = MapKind::from_abi(map) else {
                return Ok(Status::BadArgument as i32);
            };
            let bytes = maps::View::of(c.data(), kind).serialize();
            Ok::<_, wasmtime::Error>(give(&mut c, &bytes, ret_ptr, ret_len)? as i32)
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_get_header_map_size",
        |mut c: C<'_>, map: i32, ret: i32| {
            let Some(kind) = MapKind::from_abi(map) else {
                return Status::BadArgument as i32;
            };
            let size = maps::View::of(c.data(), kind).serialize().len();
            status(write_u32(&mut c, ret, size as u32))
        },
    )?;
    l.func_wrap(
        ENV,
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
            let edited = maps::map_set_all(c.data_mut(), kind, &pairs);
            answer(&mut c, kind, edited)
        },
    )?;
    l.func_wrap(
        ENV,
        "proxy_get_header_map_value",
        |mut c: C<'_>, map: i32, kptr: i32, klen: i32, ret_ptr: i32, ret_len: i32| {
            let Some(kind) = MapKind::from_abi(map) else {
                return Ok(Status::BadArgument as i32);
            };
            let value = with_bytes(&mut c, kptr, klen, |key, state| {
                if key.iter().any(u8::is_ascii_uppercase) {
                    maps::map_get(state, kind, &key.to_ascii_lowercase())
                } else {
                    maps::map_get(state, kind, key)
                }
            });
            let value = match value {
                Ok(v) => v,
                Err(s) => return Ok(s as i32),
            };
            match value {
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
            ENV,
            name,
            move |mut c: C<'_>, map: i32, kptr: i32, klen: i32, vptr: i32, vlen: i32| {
                edit_map(&mut c, map, edit, kptr, klen, Some((vptr, vlen)))
            },
        )?;
    }
    l.func_wrap(
        ENV,
        "proxy_remove_header_map_value",
        |mut c: C<'_>, map: i32, kptr: i32, klen: i32| {
            edit_map(&mut c, map, MapEdit::Remove, kptr, klen, None)
        },
    )?;
    Ok(())
}

/// The status of an edit: `OK` (a name or value that is not valid HTTP is dropped with a
/// warning: the SDKs accept only `OK`), or `BAD_ARGUMENT` for a map that cannot be written
/// in this phase, as Envoy answers — logged once per filter instance.
fn answer(c: &mut C<'_>, kind: MapKind, edited: maps::Edited) -> i32 {
    match edited {
        maps::Edited::Done => Status::Ok as i32,
        maps::Edited::Invalid => {
            tracing::warn!(
                filter = %c.data().plugin.name,
                "filter set a header name or value that is not valid HTTP; ignored"
            );
            Status::Ok as i32
        }
        maps::Edited::Unavailable => {
            if !c.data().warned_phase {
                c.data_mut().warned_phase = true;
                tracing::warn!(
                    filter = %c.data().plugin.name,
                    "filter wrote {kind:?} where that map cannot be written (BAD_ARGUMENT, as in Envoy); logged once"
                );
            }
            Status::BadArgument as i32
        }
    }
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
    let edited = maps::map_edit(c.data_mut(), kind, edit, &key, &value);
    answer(c, kind, edited)
}
