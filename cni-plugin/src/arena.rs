//! The `istio-cni` binary's allocator: a bump arena in front of the system allocator.
//!
//! The plugin is a short-lived process (one ADD, DEL or CHECK) that makes thousands of small
//! allocations (JSON values, netlink attributes) and frees them all at exit. musl's allocator
//! (the image's static build) spends about half of the plugin's instructions on them, and maps
//! and unmaps pages as it goes. Here small blocks are carved from one zero-initialised static
//! region: allocation is a pointer bump, freeing the latest block (and growing it in place) rolls
//! the pointer, any other free is a no-op. Large blocks, and everything once the region is used
//! up, go to the system allocator, so memory stays bounded by the region plus what the system
//! allocator holds. Only the binary installs it (`main.rs`); the library's users keep theirs.
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Size of the region (untouched pages cost nothing: it is `.bss`).
const REGION: usize = 4 << 20;
/// Larger blocks always come from the system allocator.
const MAX_BLOCK: usize = 32 << 10;

#[repr(C, align(4096))]
struct Region(UnsafeCell<[u8; REGION]>);

// SAFETY: disjoint parts of the region are handed out by the atomic bump below; the region
// itself is never accessed through a reference.
unsafe impl Sync for Region {}

static MEMORY: Region = Region(UnsafeCell::new([0; REGION]));

/// The allocator; see the module doc.
pub struct Arena {
    /// Offset of the first free byte of the region.
    next: AtomicUsize,
}

impl Arena {
    pub const fn new() -> Self {
        Self {
            next: AtomicUsize::new(0),
        }
    }

    fn base() -> usize {
        MEMORY.0.get() as usize
    }

    fn owns(ptr: *mut u8) -> bool {
        let p = ptr as usize;
        p >= Self::base() && p < Self::base() + REGION
    }

    /// A block from the region, or `None` when it does not fit.
    fn bump(&self, layout: Layout) -> Option<*mut u8> {
        if layout.size() > MAX_BLOCK || layout.align() > 4096 {
            return None;
        }
        let base = Self::base();
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let start = (base + cur).next_multiple_of(layout.align()) - base;
            let end = start.checked_add(layout.size())?;
            if end > REGION {
                return None;
            }
            match self
                .next
                .compare_exchange_weak(cur, end, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some((base + start) as *mut u8),
                Err(now) => cur = now,
            }
        }
    }

    /// Moves the end of the latest block at `ptr` (of `old` bytes) to `new` bytes, if it is the
    /// latest block and the region has room.
    fn resize_last(&self, ptr: *mut u8, old: usize, new: usize) -> bool {
        let start = ptr as usize - Self::base();
        let end = start + new;
        end <= REGION
            && self
                .next
                .compare_exchange(start + old, end, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

impl Default for Arena {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: blocks from the region are disjoint, aligned as asked and at least `size` long; the
// rest is the system allocator's, called with the pointers it handed out. The methods are out of
// line: inlined into every allocation site they would grow the binary by a tenth.
unsafe impl GlobalAlloc for Arena {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match self.bump(layout) {
            Some(p) => p,
            // SAFETY: the caller's layout contract, passed on.
            None => unsafe { System.alloc(layout) },
        }
    }

    #[inline(never)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match self.bump(layout) {
            Some(p) => {
                // A rolled-back block may have been written before.
                // SAFETY: p is valid for layout.size() bytes.
                unsafe { p.write_bytes(0, layout.size()) };
                p
            }
            // SAFETY: the caller's layout contract, passed on.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    #[inline(never)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if Self::owns(ptr) {
            // The latest block gives its room back; others stay until exit.
            self.resize_last(ptr, layout.size(), 0);
        } else {
            // SAFETY: ptr came from System.alloc with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[inline(never)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !Self::owns(ptr) {
            // SAFETY: ptr came from System with this layout.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        if new_size <= layout.size() {
            self.resize_last(ptr, layout.size(), new_size);
            return ptr;
        }
        if new_size <= MAX_BLOCK && self.resize_last(ptr, layout.size(), new_size) {
            return ptr;
        }
        // SAFETY: the new layout has the old alignment and a non-zero size (the caller's
        // contract for realloc).
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as alloc.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are valid for layout.size() bytes and do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size()) };
            // SAFETY: ptr is ours with this layout.
            unsafe { self.dealloc(ptr, layout) };
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_disjoint_and_grow_in_place() {
        let a = Arena::new();
        // SAFETY: layouts are non-zero; every block is used within its size.
        unsafe {
            let l8 = Layout::from_size_align(24, 8).unwrap();
            let p = a.alloc(l8);
            assert!(Arena::owns(p));
            assert_eq!(p as usize % 8, 0);
            p.write_bytes(0xaa, 24);
            let l64 = Layout::from_size_align(10, 64).unwrap();
            let q = a.alloc(l64);
            assert_eq!(q as usize % 64, 0);
            assert!(q as usize >= p as usize + 24);
            // the latest block grows in place, an older one moves and keeps its bytes
            let q2 = a.realloc(q, l64, 100);
            assert_eq!(q2, q);
            let p2 = a.realloc(p, l8, 48);
            assert_ne!(p2, p);
            assert!(
                std::slice::from_raw_parts(p2, 24)
                    .iter()
                    .all(|b| *b == 0xaa)
            );
            // zeroed even where a rolled-back block was written
            let l = Layout::from_size_align(48, 8).unwrap();
            a.dealloc(p2, l);
            let z = a.alloc_zeroed(l);
            assert_eq!(z, p2);
            assert!(std::slice::from_raw_parts(z, 48).iter().all(|b| *b == 0));
            // large blocks are the system's
            let big = Layout::from_size_align(MAX_BLOCK + 1, 8).unwrap();
            let s = a.alloc(big);
            assert!(!Arena::owns(s));
            let s2 = a.realloc(s, big, 2 * MAX_BLOCK);
            assert!(!Arena::owns(s2));
            a.dealloc(s2, Layout::from_size_align(2 * MAX_BLOCK, 8).unwrap());
        }
    }

    #[test]
    fn a_full_region_falls_back_to_the_system() {
        let a = Arena::new();
        a.next.store(REGION - 8, Ordering::Relaxed);
        let l = Layout::from_size_align(64, 8).unwrap();
        // SAFETY: a valid layout; the block is freed with it.
        unsafe {
            let p = a.alloc(l);
            assert!(!p.is_null() && !Arena::owns(p));
            a.dealloc(p, l);
        }
    }
}
