//! Guest RAM mappings (the unsafe layer under `memory`): anonymous private memory,
//! 2 MiB aligned, optionally advised for transparent huge pages, unmapped on drop.
//!
//! Why: a fresh 4 KiB page costs a fault and a kernel zeroing the first time the guest
//! (or the migration target) writes it; with huge pages one fault backs 2 MiB, which
//! cuts the faults 512-fold (QEMU advises its guest RAM the same way). The kernel still
//! backs the mapping lazily, so untouched memory costs nothing, and `munmap` gives it
//! back at once when a VM goes. Whether to ask for huge pages is the caller's choice:
//! inside a VM whose hypervisor takes free memory back (virtio-balloon free page
//! reporting works on 2 MiB blocks), fresh huge pages can cost far more than small ones.

use std::fmt;
use std::io;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

/// Alignment and granule of transparent huge pages on x86-64 and arm64 (4 KiB base).
pub const HUGE_PAGE: usize = 2 << 20;

/// Zeroed atomic words in their own anonymous mapping.
pub struct GuestRam {
    ptr: NonNull<AtomicU64>,
    words: usize,
    /// Bytes mapped from `ptr` (`words × 8` rounded up to [`HUGE_PAGE`]); 0 when empty.
    map_len: usize,
    huge: bool,
}

// SAFETY: GuestRam owns its mapping exclusively and only hands out `&[AtomicU64]`,
// which is Send and Sync; the raw pointer is never aliased mutably.
unsafe impl Send for GuestRam {}
// SAFETY: as above: shared access goes through atomics only.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Maps `words` zeroed 64-bit words (lazily backed by the kernel); with `huge`, asks
    /// for transparent huge pages. When the kernel refuses the advice (THP disabled) the
    /// memory works the same with small pages.
    pub fn new(words: usize, huge: bool) -> io::Result<GuestRam> {
        let bytes = words
            .checked_mul(8)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        if bytes == 0 {
            return Ok(GuestRam {
                ptr: NonNull::dangling(),
                words: 0,
                map_len: 0,
                huge: false,
            });
        }
        let map_len = bytes
            .checked_next_multiple_of(HUGE_PAGE)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // Over-allocate by one huge page, then trim both ends to a 2 MiB boundary.
        let over = map_len + HUGE_PAGE;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing
        // touches no existing memory; the result is checked against MAP_FAILED.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                over,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE);
        let head = aligned - start;
        let tail = over - head - map_len;
        // SAFETY: both ranges lie inside the mapping just created, outside the aligned
        // part we keep, and nothing refers to them.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + map_len) as *mut libc::c_void, tail);
            }
        }
        // SAFETY: the range is our own mapping; madvise only changes how the kernel
        // backs it. Failure (THP compiled out or disabled) leaves small pages.
        let huge = huge
            && unsafe {
                libc::madvise(aligned as *mut libc::c_void, map_len, libc::MADV_HUGEPAGE) == 0
            };
        Ok(GuestRam {
            // mmap without MAP_FIXED never maps page 0, so the address is not null.
            ptr: NonNull::new(aligned as *mut AtomicU64)
                .ok_or_else(|| io::Error::from(io::ErrorKind::Other))?,
            words,
            map_len,
            huge,
        })
    }

    /// Faults in the `len` bytes at byte `offset` as if written, without changing any
    /// of them (`MADV_POPULATE_WRITE`, Linux 5.14): the kernel allocates and zeroes the
    /// fresh pages now, so a later write finds them present. `offset` must be a multiple
    /// of 4096.
    pub fn populate(&self, offset: usize, len: usize) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.words * 8 && offset.is_multiple_of(4096))
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        if end == offset {
            return Ok(());
        }
        // SAFETY: the range lies inside our own mapping (checked above) and starts on a
        // page boundary (the mapping is 2 MiB aligned); MADV_POPULATE_WRITE only backs
        // pages that are not present yet and writes no byte, so concurrent atomic
        // accesses to the same memory see no change.
        let r = unsafe {
            libc::madvise(
                self.ptr.as_ptr().cast::<u8>().add(offset).cast(),
                len,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The kernel accepted the huge-page advice.
    pub fn huge_pages_advised(&self) -> bool {
        self.huge
    }
}

impl Deref for GuestRam {
    type Target = [AtomicU64];

    fn deref(&self) -> &[AtomicU64] {
        // SAFETY: `ptr` is 2 MiB aligned (or dangling with 0 words) and the mapping
        // holds at least `words × 8` readable and writable bytes for as long as `self`
        // lives. Anonymous memory reads as zero, a valid AtomicU64; all access is atomic.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.words) }
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        if self.map_len > 0 {
            // SAFETY: exactly the range mapped in `new`; `&mut self` proves no slice
            // borrowed from it is alive.
            unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), self.map_len);
            }
        }
    }
}

impl fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestRam")
            .field("bytes", &(self.words * 8))
            .field("huge_pages_advised", &self.huge)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn rss_kib() -> u64 {
        let s = std::fs::read_to_string("/proc/self/statm").unwrap();
        s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4
    }

    #[test]
    fn mapping_is_zeroed_aligned_and_writable() {
        for (words, huge) in [
            (0, true),
            (1, false),
            (1000, true),
            ((3 << 20) / 8, true),
            ((4 << 20) / 8, false),
        ] {
            let m = GuestRam::new(words, huge).unwrap();
            assert_eq!(m.len(), words);
            if words > 0 {
                assert_eq!(m.as_ptr() as usize % HUGE_PAGE, 0);
                assert!(m.iter().all(|w| w.load(Ordering::Relaxed) == 0));
                m[words - 1].store(7, Ordering::Relaxed);
                assert_eq!(m[words - 1].load(Ordering::Relaxed), 7);
            }
        }
    }

    #[test]
    fn memory_is_lazy_and_given_back_on_drop() {
        // Other tests of this process allocate too: compare with a wide margin.
        let words = (256 << 20) / 8;
        let before = rss_kib();
        let m = GuestRam::new(words, true).unwrap();
        assert!(
            rss_kib() < before + (64 << 10),
            "untouched memory is resident"
        );
        for i in (0..words).step_by(512) {
            m[i].store(1, Ordering::Relaxed);
        }
        let touched = rss_kib();
        assert!(touched > before + (128 << 10), "{before} -> {touched} KiB");
        drop(m);
        assert!(rss_kib() + (128 << 10) < touched, "memory not given back");
    }
}
