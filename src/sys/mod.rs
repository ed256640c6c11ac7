//! The crate's only `unsafe` code: system calls without a safe wrapper (TAP ioctls,
//! packet sockets, guest RAM mappings) and zero-cost views of freshly zeroed memory.
//! Each block carries a `// SAFETY:` line.
#![allow(unsafe_code)]

pub mod mem;
pub mod packet;
pub mod tap;

use std::sync::atomic::AtomicU64;

/// Allocates `n` zeroed atomic words without touching them, so the kernel backs the
/// memory lazily (a 4 GiB guest costs nothing until it is written).
pub fn zeroed_atomic_words(n: usize) -> Box<[AtomicU64]> {
    let words: Box<[u64]> = vec![0u64; n].into_boxed_slice();
    let len = words.len();
    let ptr = Box::into_raw(words) as *mut u64;
    // SAFETY: AtomicU64 has the same size, alignment and bit validity as u64 (documented
    // in std::sync::atomic), and the pointer comes from a Box<[u64]> of `len` elements
    // that we own and no longer use.
    unsafe {
        Box::from_raw(std::ptr::slice_from_raw_parts_mut(
            ptr as *mut AtomicU64,
            len,
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    #[test]
    fn zeroed_words_are_zero_and_writable() {
        let w = super::zeroed_atomic_words(1000);
        assert_eq!(w.len(), 1000);
        assert!(w.iter().all(|x| x.load(Ordering::Relaxed) == 0));
        w[999].store(7, Ordering::Relaxed);
        assert_eq!(w[999].load(Ordering::Relaxed), 7);
    }
}
