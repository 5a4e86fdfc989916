//! Bounds-checked access to a guest's linear memory: reads and writes that answer
//! `INVALID_MEMORY_ACCESS` instead of touching anything outside it, and [`give`], which hands
//! bytes to the guest through its own allocator as the proxy-wasm SDKs expect.

use wasmtime::{Caller, Extern, Memory};

use weft_abi::Status;

use crate::state::HostState;

/// Why a host function could not touch guest memory.
pub type MemResult<T> = Result<T, Status>;

/// The guest's exported `memory` (looked up once).
fn memory(caller: &mut Caller<'_, HostState>) -> MemResult<Memory> {
    if let Some(m) = caller.data().memory {
        return Ok(m);
    }
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => {
            caller.data_mut().memory = Some(m);
            Ok(m)
        }
        _ => Err(Status::InternalFailure),
    }
}

/// Copies `len` bytes at `ptr` out of guest memory, bounds-checked.
pub fn read(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> MemResult<Vec<u8>> {
    let mem = memory(caller)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    mem.data(&caller)
        .get(ptr..ptr.checked_add(len).ok_or(Status::InvalidMemoryAccess)?)
        .map(<[u8]>::to_vec)
        .ok_or(Status::InvalidMemoryAccess)
}

/// Runs `f` on the `len` bytes at `ptr` in guest memory (borrowed, not copied) and on the
/// host state beside them, bounds-checked.
pub fn with_bytes<R>(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
    f: impl FnOnce(&[u8], &HostState) -> R,
) -> MemResult<R> {
    let mem = memory(caller)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    let end = ptr.checked_add(len).ok_or(Status::InvalidMemoryAccess)?;
    let bytes = mem
        .data(&*caller)
        .get(ptr..end)
        .ok_or(Status::InvalidMemoryAccess)?;
    Ok(f(bytes, caller.data()))
}

/// Runs `f` on two byte ranges of guest memory, borrowed in place (nothing copied), with the
/// host state writable beside them; bounds-checked.
pub fn with_two_mut<R>(
    caller: &mut Caller<'_, HostState>,
    (p1, l1): (i32, i32),
    (p2, l2): (i32, i32),
    f: impl FnOnce(&[u8], &[u8], &mut HostState) -> R,
) -> MemResult<R> {
    let mem = memory(caller)?;
    let (data, state) = mem.data_and_store_mut(&mut *caller);
    let range = |p: i32, l: i32| {
        let (p, l) = (p as u32 as usize, l as u32 as usize);
        p.checked_add(l)
            .filter(|end| *end <= data.len())
            .map(|end| p..end)
            .ok_or(Status::InvalidMemoryAccess)
    };
    let (a, b) = (range(p1, l1)?, range(p2, l2)?);
    Ok(f(&data[a], &data[b], state))
}

/// Writes `bytes` at `ptr` in guest memory, bounds-checked.
pub fn write(caller: &mut Caller<'_, HostState>, ptr: i32, bytes: &[u8]) -> MemResult<()> {
    let mem = memory(caller)?;
    let ptr = ptr as u32 as usize;
    let end = ptr
        .checked_add(bytes.len())
        .ok_or(Status::InvalidMemoryAccess)?;
    mem.data_mut(&mut *caller)
        .get_mut(ptr..end)
        .ok_or(Status::InvalidMemoryAccess)?
        .copy_from_slice(bytes);
    Ok(())
}

/// Runs `f` on the `len` bytes of guest memory at `ptr`, in place (nothing is copied or
/// allocated, whatever `len`), bounds-checked.
pub fn with_slice_mut<R>(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
    f: impl FnOnce(&mut [u8]) -> R,
) -> MemResult<R> {
    let mem = memory(caller)?;
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    let end = ptr.checked_add(len).ok_or(Status::InvalidMemoryAccess)?;
    let slice = mem
        .data_mut(&mut *caller)
        .get_mut(ptr..end)
        .ok_or(Status::InvalidMemoryAccess)?;
    Ok(f(slice))
}

/// Writes a little-endian u32 at `ptr`.
pub fn write_u32(caller: &mut Caller<'_, HostState>, ptr: i32, v: u32) -> MemResult<()> {
    write(caller, ptr, &v.to_le_bytes())
}

/// Hands `bytes` to the guest: allocates them with the guest's allocator, copies them in and
/// stores pointer and length at `ret_ptr` / `ret_len`, as the SDKs expect (they take
/// ownership of the allocation). A trap inside the guest allocator is returned as an error.
///
/// When the module named a scratch area ([`weft_abi::SCRATCH_AREA_EXPORT`]) and the value
/// fits, it is written there instead and the pointer returned is the area's: the module
/// copies it out before its next host call. No call into the module is made.
pub fn give(
    caller: &mut Caller<'_, HostState>,
    bytes: &[u8],
    ret_ptr: i32,
    ret_len: i32,
) -> wasmtime::Result<Status> {
    let len = i32::try_from(bytes.len()).map_err(|_| wasmtime::format_err!("value too large"))?;
    if let Some((at, size)) = caller.data().scratch
        && bytes.len() <= size as usize
    {
        // One look at the memory for the value and both return places.
        let mem = match memory(caller) {
            Ok(m) => m,
            Err(s) => return Ok(s),
        };
        let data = mem.data_mut(&mut *caller);
        let mut put = |at: u32, value: &[u8]| {
            let at = at as usize;
            data.get_mut(at..at.checked_add(value.len())?)
                .map(|dst| dst.copy_from_slice(value))
        };
        let done = put(at, bytes)
            .and_then(|_| put(ret_ptr as u32, &at.to_le_bytes()))
            .and_then(|_| put(ret_len as u32, &(len as u32).to_le_bytes()));
        return Ok(match done {
            Some(()) => Status::Ok,
            None => Status::InvalidMemoryAccess,
        });
    }
    // Taken out of the state for the call and put back after, not cloned: cloning a
    // `TypedFunc` clones its registered type (a lock and a reference count), and this runs
    // for every value a filter reads.
    let alloc = match caller.data_mut().alloc.take() {
        Some(a) => a,
        None => {
            let f = caller
                .get_export("proxy_on_memory_allocate")
                .or_else(|| caller.get_export("malloc"))
                .and_then(Extern::into_func);
            let Some(f) = f else {
                return Ok(Status::InternalFailure);
            };
            f.typed::<i32, i32>(&caller)?
        }
    };
    let ptr = alloc.call(&mut *caller, len);
    caller.data_mut().alloc = Some(alloc);
    let ptr = ptr?;
    if ptr == 0 && !bytes.is_empty() {
        return Ok(Status::InternalFailure);
    }
    let status = write(caller, ptr, bytes)
        .and_then(|_| write_u32(caller, ret_ptr, ptr as u32))
        .and_then(|_| write_u32(caller, ret_len, len as u32));
    Ok(match status {
        Ok(()) => Status::Ok,
        Err(s) => s,
    })
}
