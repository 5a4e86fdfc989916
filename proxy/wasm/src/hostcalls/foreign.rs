//! `proxy_call_foreign_function` and Weft's extensions behind it (`weft.*`, names and
//! encodings from [`weft_abi::ext`]): the cluster, timeouts, attempts and delay a request
//! gets, the attempt facts and retries a response callback sees, and properties read several
//! at a time.

use std::time::Duration;

use weft_abi::{Status, ext};
use weft_core::filter::RetryAsk;

use super::{C, ENV};
use crate::linker::HostLinker;
use crate::memory::{give, with_two_mut};
use crate::state::HostState;

/// Adds `proxy_call_foreign_function`.
pub fn add_to_linker(l: &mut HostLinker) -> wasmtime::Result<()> {
    l.func_wrap(
        ENV,
        "proxy_call_foreign_function",
        |mut c: C<'_>,
         name_ptr: i32,
         name_len: i32,
         args_ptr: i32,
         args_len: i32,
         ret_ptr: i32,
         ret_len: i32| {
            // Name and arguments are read where they are in guest memory.
            let answer = with_two_mut(
                &mut c,
                (name_ptr, name_len),
                (args_ptr, args_len),
                |name, args, state| foreign(state, name, args),
            );
            let answer = match answer {
                Ok(a) => a,
                Err(s) => return Ok(s as i32),
            };
            match answer {
                Ok(None) => Ok(Status::Ok as i32),
                Ok(Some(bytes)) => {
                    Ok::<_, wasmtime::Error>(give(&mut c, &bytes, ret_ptr, ret_len)? as i32)
                }
                Err(s) => Ok(s as i32),
            }
        },
    )?;
    Ok(())
}

/// Runs the Weft extension `name` (`proxy_call_foreign_function`): `Ok(Some(bytes))` to hand
/// bytes back, `Ok(None)` for none, `Err` with the status otherwise (`NOT_FOUND` for a name
/// this host does not have).
pub fn foreign(state: &mut HostState, name: &[u8], args: &[u8]) -> Result<Option<Vec<u8>>, Status> {
    let millis = |args: &[u8]| -> Result<Duration, Status> {
        ext::decode_millis(args)
            .map(Duration::from_millis)
            .map_err(|_| Status::BadArgument)
    };
    let request_phase = state.request.is_some();
    // Found among the names this host has by comparing bytes (cheaper than checking the
    // name is UTF-8 first, which showed in profiles at a call or more a request).
    let Some(&name) = ext::ALL.iter().find(|n| n.as_bytes() == name) else {
        return Err(Status::NotFound);
    };
    match name {
        ext::SET_CLUSTER => {
            if !request_phase {
                return Err(Status::BadArgument);
            }
            // By the clusters the stream started with: its index is into them.
            let name = std::str::from_utf8(args).map_err(|_| Status::NotFound)?;
            let i = state
                .info
                .as_ref()
                .and_then(|info| info.clusters.find(name))
                .ok_or(Status::NotFound)?;
            state.ext.cluster = Some(i);
            Ok(None)
        }
        ext::SET_TIMEOUT | ext::SET_TRY_TIMEOUT => {
            if !request_phase {
                return Err(Status::BadArgument);
            }
            let d = millis(args)?;
            if name == ext::SET_TIMEOUT {
                state.ext.timeout = Some(d);
            } else {
                state.ext.try_timeout = Some(d);
            }
            Ok(None)
        }
        ext::DELAY => {
            if !request_phase {
                return Err(Status::BadArgument);
            }
            state.ext.delay = Some(millis(args)?);
            Ok(None)
        }
        ext::SET_ATTEMPTS => {
            let n = ext::decode_attempts(args).map_err(|_| Status::BadArgument)?;
            if !request_phase || n == 0 {
                return Err(Status::BadArgument);
            }
            state.ext.max_attempts = Some(n.min(ext::MAX_ATTEMPTS));
            Ok(None)
        }
        ext::ATTEMPT => {
            let a = state.info.as_ref().ok_or(Status::BadArgument)?.attempt;
            let info = ext::AttemptInfo {
                number: a.number,
                status: a.status,
                error: a.error,
            };
            Ok(Some(info.encode().to_vec()))
        }
        ext::RETRY => {
            let allowed = state.info.as_ref().is_some_and(|i| i.attempt.retry_allowed);
            if state.response.is_none() || !allowed {
                return Err(Status::BadArgument);
            }
            let args = ext::RetryArgs::decode(args).map_err(|_| Status::BadArgument)?;
            state.ext.retry = Some(RetryAsk {
                delay: Duration::from_millis(args.delay_ms),
                exclude_tried: args.exclude_tried,
            });
            Ok(None)
        }
        ext::UNUSED => {
            let bit = std::str::from_utf8(args)
                .ok()
                .and_then(ext::skippable_bit)
                .ok_or(Status::BadArgument)?;
            state
                .plugin
                .unused
                .fetch_or(bit, std::sync::atomic::Ordering::Relaxed);
            Ok(None)
        }
        ext::STREAM_DONE => {
            // Only where the stream's path runs the callback and can act on it: not from a
            // root context, a network filter, a detached callout answer or the stream's end.
            let in_path = state.info.is_some()
                && state.phase.is_some()
                && !state.network
                && state.context == state.callback_context;
            if !in_path || !args.is_empty() {
                return Err(Status::BadArgument);
            }
            state.ext.done = true;
            Ok(None)
        }
        ext::PROPERTIES => {
            // What `proxy_get_property` would answer for each path, in one call.
            let paths = ext::decode_property_paths(args).map_err(|_| Status::BadArgument)?;
            let mut out = Vec::with_capacity(paths.len() * 16);
            for path in paths {
                let value = crate::properties::property(state, path);
                ext::encode_property_value(&mut out, value.as_deref());
            }
            Ok(Some(out))
        }
        _ => Err(Status::NotFound),
    }
}

#[cfg(test)]
mod tests {
    use weft_abi::ext;

    use super::foreign;
    use crate::state::tests::state;

    #[test]
    fn properties_are_read_together_in_order_and_bad_arguments_are_refused() {
        let mut s = state();
        let paths: [&[&str]; 4] = [
            &["request", "path"],
            &["request", "no_such_thing"],
            &["request", "headers", "x-request-id"],
            &["request", "method"],
        ];
        let answer = foreign(
            &mut s,
            ext::PROPERTIES.as_bytes(),
            &ext::encode_property_paths(&paths),
        )
        .unwrap()
        .unwrap();
        let values = ext::decode_property_values(&answer, paths.len()).unwrap();
        assert_eq!(
            values,
            [
                Some(b"/a/b?q=1".to_vec()),
                None,
                Some(b"rid".to_vec()),
                Some(b"GET".to_vec())
            ]
        );
        // Each the same as one `proxy_get_property` call would give.
        for (path, value) in paths.iter().zip(&values) {
            let joined = path.join("\0");
            assert_eq!(&crate::properties::property(&s, joined.as_bytes()), value);
        }
        // Truncated, trailing bytes, too many paths: BAD_ARGUMENT, nothing answered.
        let args = ext::encode_property_paths(&paths);
        for bad in [
            &args[..args.len() - 2],
            &[args.as_slice(), b"!"].concat()[..],
            &ext::encode_property_paths(&vec![&["request", "path"][..]; ext::MAX_PROPERTIES + 1])[..],
            b"",
        ] {
            assert_eq!(
                foreign(&mut s, ext::PROPERTIES.as_bytes(), bad),
                Err(weft_abi::Status::BadArgument)
            );
        }
    }
}
