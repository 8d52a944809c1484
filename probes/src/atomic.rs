//! Atomic access to map values that programs on other CPUs change at the same time.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xsub};

/// Compare-and-swap (BPF_CMPXCHG, a full barrier): `Ok(from)` when `*p` was `from` and is
/// now `to`, else `Err` with what `*p` holds.
pub(crate) fn cas(p: *mut u64, from: u64, to: u64) -> Result<u64, u64> {
    let (prev, ok) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, from, to)
    };
    if ok { Ok(prev) } else { Err(prev) }
}

// cpu v1 (what aya-build asks bpf-linker for) has atomic add without a fetched result; a
// compare-and-swap that changes nothing is the fully ordered read.
pub(crate) fn atomic_add(p: *mut u64, v: u64) {
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, v) };
}

pub(crate) fn atomic_sub(p: *mut u64, v: u64) {
    unsafe { atomic_xsub::<u64, u64, { AtomicOrdering::SeqCst }>(p, v) };
}

pub(crate) fn atomic_read(p: *mut u64) -> u64 {
    match cas(p, 0, 0) {
        Ok(v) | Err(v) => v,
    }
}
