//! The filter module's memory allocator: free lists by size class in front of the system
//! allocator (wasi-libc's dlmalloc).
//!
//! A filter allocates and frees small values on every callback (header names and values
//! copied out of the host, strings it builds, its per-stream state), and with dlmalloc
//! behind Rust's allocator shims each pair cost about 300 instructions: a quarter of the
//! guest's time in the standard chain (`benches/chain/callgrind.sh`). Here a request of up
//! to [`MAX_SMALL`] bytes (alignment up to [`ALIGN`]) takes a block of the next power of two
//! from its class's free list, or carves one from a 64 KiB chunk; freeing pushes the block
//! back on its list. Larger or more aligned requests go to the system allocator.
//!
//! Memory given to a class stays with that class (as dlmalloc's, a wasm module's memory
//! never shrinks): a module's footprint is the peak of what each class held at once, at
//! most twice what was asked for, plus less than [`MAX_SMALL`] left over per chunk.
//!
//! [`Pool`] is the module's `#[global_allocator]` when the SDK's `allocator` feature is on
//! (the default) and the target is wasm32; a filter that brings its own allocator turns the
//! feature off. On other targets it is a plain type, tested like any other.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr::{self, NonNull};

/// The smallest block, and the alignment every block has.
pub const ALIGN: usize = 16;
/// The largest request served from the free lists.
pub const MAX_SMALL: usize = 4096;
/// Size classes: 16, 32, …, [`MAX_SMALL`] bytes.
const CLASSES: usize = (MAX_SMALL / ALIGN).trailing_zeros() as usize + 1;
/// What a class's blocks are carved from, taken from the system allocator at once.
const CHUNK: usize = 64 * 1024;

/// The free lists and the chunk being carved.
struct State {
    /// The first free block of each class; each free block holds the address of the next.
    free: [*mut u8; CLASSES],
    /// The next unused byte of the current chunk, and its end.
    next: *mut u8,
    end: *mut u8,
}

/// A size-class allocator over [`System`]; see the module's documentation.
pub struct Pool {
    state: UnsafeCell<State>,
}

// SAFETY: wasm32-wasip1 modules run on one thread (the target has no threads), so the
// state is never touched by two callers at once. Only the wasm32 build is shared.
#[cfg(target_arch = "wasm32")]
unsafe impl Sync for Pool {}

impl Pool {
    /// An allocator with nothing taken from the system yet.
    pub const fn new() -> Self {
        Self {
            state: UnsafeCell::new(State {
                free: [ptr::null_mut(); CLASSES],
                next: ptr::null_mut(),
                end: ptr::null_mut(),
            }),
        }
    }

    /// The class of a layout served here, or `None` for the system allocator's.
    #[inline(always)]
    fn class(layout: Layout) -> Option<usize> {
        if layout.size() > MAX_SMALL || layout.align() > ALIGN {
            return None;
        }
        let size = layout.size().max(ALIGN);
        Some((size.next_power_of_two() / ALIGN).trailing_zeros() as usize)
    }

    /// A block of class `class`.
    ///
    /// # Safety
    /// No other call on this pool runs at the same time.
    #[inline(always)]
    unsafe fn take(&self, class: usize) -> *mut u8 {
        // SAFETY: one caller at a time (the caller's promise).
        let state = unsafe { &mut *self.state.get() };
        let head = state.free[class];
        if !head.is_null() {
            // SAFETY: a free block of this class holds the next free block's address.
            state.free[class] = unsafe { head.cast::<*mut u8>().read() };
            return head;
        }
        let size = ALIGN << class;
        if (state.end as usize) - (state.next as usize) < size {
            // SAFETY: CHUNK is a non-zero size and ALIGN a power of two.
            let chunk = unsafe { System.alloc(Layout::from_size_align_unchecked(CHUNK, ALIGN)) };
            if chunk.is_null() {
                return chunk;
            }
            state.next = chunk;
            // SAFETY: the chunk is CHUNK bytes long.
            state.end = unsafe { chunk.add(CHUNK) };
        }
        let block = state.next;
        // SAFETY: at least `size` bytes of the chunk are left.
        state.next = unsafe { block.add(size) };
        block
    }

    /// Puts a block of class `class` back on its free list.
    ///
    /// # Safety
    /// `block` came from [`Pool::take`] with the same class and is no longer used; no other
    /// call on this pool runs at the same time.
    #[inline(always)]
    unsafe fn give(&self, block: *mut u8, class: usize) {
        // SAFETY: one caller at a time (the caller's promise).
        let state = unsafe { &mut *self.state.get() };
        // SAFETY: every block is at least ALIGN bytes, aligned for a pointer.
        unsafe { block.cast::<*mut u8>().write(state.free[class]) };
        state.free[class] = block;
    }
}

impl Default for Pool {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: blocks of a class are ALIGN-aligned and `ALIGN << class` bytes long, at least the
// size and alignment of every layout of that class; a block is on a free list only while
// nobody holds it; layouts outside the classes go to the system allocator both ways, and
// `dealloc` / `realloc` get the layout `alloc` got (GlobalAlloc's contract), so a block
// always goes back to where it came from.
unsafe impl GlobalAlloc for Pool {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match Self::class(layout) {
            // SAFETY: single-threaded (see `Sync`), or a pool used by one thread.
            Some(class) => unsafe { self.take(class) },
            // SAFETY: forwarded with the caller's valid layout.
            None => unsafe { System.alloc(layout) },
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match Self::class(layout) {
            // SAFETY: `ptr` was allocated with `layout`, so from this class.
            Some(class) => unsafe { self.give(ptr, class) },
            // SAFETY: `ptr` came from System.alloc with `layout`.
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match Self::class(layout) {
            Some(class) => {
                // SAFETY: as in `alloc`.
                let block = unsafe { self.take(class) };
                if !block.is_null() {
                    // SAFETY: the block holds at least `layout.size()` bytes.
                    unsafe { block.write_bytes(0, layout.size()) };
                }
                block
            }
            // SAFETY: forwarded with the caller's valid layout.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: GlobalAlloc::realloc's caller promises `new_size`, rounded up to the
        // alignment, does not overflow isize.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (Self::class(layout), Self::class(new)) {
            (Some(a), Some(b)) if a == b => ptr,
            // SAFETY: both in the system allocator's hands.
            (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
            _ => {
                // SAFETY: `new` is a valid layout; the old block holds `layout.size()`
                // bytes and the new one `new_size`; the old one goes back where it came
                // from.
                unsafe {
                    let moved = self.alloc(new);
                    if let Some(moved) = NonNull::new(moved) {
                        ptr::copy_nonoverlapping(ptr, moved.as_ptr(), layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    moved
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn a_freed_block_is_handed_out_again_for_its_class_only() {
        let pool = Pool::new();
        unsafe {
            let a = pool.alloc(layout(40, 8));
            a.write_bytes(0xaa, 40);
            pool.dealloc(a, layout(40, 8));
            // 33..=64 bytes share a class; 16 bytes do not.
            let small = pool.alloc(layout(16, 8));
            assert_ne!(small, a);
            let b = pool.alloc(layout(64, 16));
            assert_eq!(b, a, "the freed block of the class comes back first");
            pool.dealloc(b, layout(64, 16));
            pool.dealloc(small, layout(16, 8));
        }
    }

    #[test]
    fn live_blocks_never_overlap_and_keep_what_was_written() {
        let pool = Pool::new();
        let mut live: Vec<(*mut u8, Layout, u8)> = Vec::new();
        // Sizes across every class and past the largest, some freed as they go, enough to
        // need more than one chunk.
        let mut seed = 7u32;
        for i in 0..4000u32 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let size = 1 + (seed >> 8) as usize % 6000;
            let l = layout(size, [1, 2, 4, 8, 16][i as usize % 5]);
            let fill = (i % 251) as u8;
            unsafe {
                let p = pool.alloc(l);
                assert!(!p.is_null());
                assert_eq!(p as usize % l.align(), 0, "aligned for {l:?}");
                p.write_bytes(fill, size);
                live.push((p, l, fill));
            }
            if seed.is_multiple_of(3) {
                let (p, l, fill) = live.swap_remove((seed as usize / 3) % live.len());
                unsafe {
                    assert!((0..l.size()).all(|k| *p.add(k) == fill), "contents kept");
                    pool.dealloc(p, l);
                }
            }
        }
        let mut spans: Vec<(usize, usize)> = live
            .iter()
            .map(|(p, l, _)| (*p as usize, *p as usize + l.size()))
            .collect();
        spans.sort();
        assert!(
            spans.windows(2).all(|w| w[0].1 <= w[1].0),
            "no two live blocks overlap"
        );
        for (p, l, fill) in live {
            unsafe {
                assert!((0..l.size()).all(|k| *p.add(k) == fill), "contents kept");
                pool.dealloc(p, l);
            }
        }
    }

    #[test]
    fn realloc_keeps_the_contents_across_classes_and_to_the_system_allocator() {
        let pool = Pool::new();
        unsafe {
            let l = layout(20, 4);
            let p = pool.alloc(l);
            for k in 0..20 {
                *p.add(k) = k as u8;
            }
            // Within the class: the same block.
            assert_eq!(pool.realloc(p, l, 30), p);
            let l = layout(30, 4);
            // Up a class, then past the largest, then back down.
            let q = pool.realloc(p, l, 1000);
            assert!((0..20).all(|k| *q.add(k) == k as u8));
            let r = pool.realloc(q, layout(1000, 4), 10_000);
            assert!((0..20).all(|k| *r.add(k) == k as u8));
            let s = pool.realloc(r, layout(10_000, 4), 8);
            assert!((0..8).all(|k| *s.add(k) == k as u8));
            pool.dealloc(s, layout(8, 4));
        }
    }

    #[test]
    fn zeroed_blocks_are_zero_even_when_reused() {
        let pool = Pool::new();
        unsafe {
            let l = layout(100, 8);
            let p = pool.alloc(l);
            p.write_bytes(0xff, 100);
            pool.dealloc(p, l);
            let z = pool.alloc_zeroed(l);
            assert_eq!(z, p);
            assert!((0..100).all(|k| *z.add(k) == 0));
            pool.dealloc(z, l);
            let big = layout(MAX_SMALL + 1, 8);
            let b = pool.alloc_zeroed(big);
            assert!((0..big.size()).all(|k| *b.add(k) == 0));
            pool.dealloc(b, big);
        }
    }

    #[test]
    fn over_aligned_layouts_go_to_the_system_allocator() {
        let pool = Pool::new();
        unsafe {
            let l = layout(64, 64);
            let p = pool.alloc(l);
            assert_eq!(p as usize % 64, 0);
            pool.dealloc(p, l);
        }
        assert_eq!(Pool::class(layout(8, 32)), None);
        assert_eq!(Pool::class(layout(MAX_SMALL, 16)), Some(CLASSES - 1));
        assert_eq!(Pool::class(layout(0, 1)), Some(0));
    }
}
