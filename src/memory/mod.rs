//! Guest memory and its dirty bitmap (a core: no I/O, no clock).
//!
//! Memory is a slice of atomic 64-bit words shared between the vCPU threads, the NIC and
//! the migration engine. Every write goes through [`GuestMemory`], which marks the page
//! dirty after writing, so callers cannot forget it. The bitmap is harvested with an
//! atomic get-and-reset per word; a harvested set that fails to send is merged back.
//!
//! # Memory digest
//!
//! The digest of guest memory is a SHA-256 hash list: with `d(i)` the SHA-256 of the
//! 4096 bytes of page `i`,
//!
//! ```text
//! digest = SHA-256( d(0) ‖ d(1) ‖ … ‖ d(n-1) )     (n = page count, 32 bytes each)
//! ```
//!
//! An all-zero page has the constant digest [`ZERO_PAGE_DIGEST`]. The definition lets a
//! migration target keep one 32-byte digest per page as pages arrive ([`PageDigests`])
//! and, at resume, hash only that list (1/128 of memory) instead of all of memory;
//! [`GuestMemory::digest`] computes the same value from memory directly.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::sys::mem::GuestRam;

/// Guest page size in bytes.
pub const PAGE_SIZE: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;
/// Largest guest this emulator accepts (64 GiB).
pub const MAX_MEMORY_BYTES: u64 = 64 << 30;

/// SHA-256 of one page (4096 bytes).
pub type PageDigest = [u8; 32];

/// SHA-256 of a page of 4096 zero bytes: the digest of every page never written.
pub const ZERO_PAGE_DIGEST: PageDigest = [
    0xad, 0x7f, 0xac, 0xb2, 0x58, 0x6f, 0xc6, 0xe9, 0x66, 0xc0, 0x04, 0xd7, 0xd1, 0xd1, 0x6b, 0x02,
    0x4f, 0x58, 0x05, 0xff, 0x7c, 0xb4, 0x7c, 0x7a, 0x85, 0xda, 0xbd, 0x8b, 0x48, 0x89, 0x2c, 0xa7,
];

/// The digest of one page's bytes.
pub fn page_digest(data: &[u8; PAGE_SIZE]) -> PageDigest {
    Sha256::digest(data).into()
}

/// The memory digest of a list of page digests in page order (see the module docs).
pub fn hash_list(digests: &[PageDigest]) -> [u8; 32] {
    Sha256::digest(digests.as_flattened()).into()
}

/// One digest per page of memory that is filled page by page (a migration target): a
/// page's latest copy replaces its digest, so the list always describes memory as
/// written through [`PageDigests::record`]. 32 bytes per 4 KiB page.
#[derive(Debug, Clone)]
pub struct PageDigests {
    digests: Vec<PageDigest>,
}

impl PageDigests {
    /// Digests of `pages` zero pages (fresh memory).
    pub fn new(pages: u64) -> PageDigests {
        PageDigests {
            digests: vec![ZERO_PAGE_DIGEST; pages as usize],
        }
    }

    /// Page `page` now holds `data` (`None`: zeroes). Out-of-range pages are ignored.
    pub fn record(&mut self, page: u64, data: Option<&[u8; PAGE_SIZE]>) {
        if let Some(d) = self.digests.get_mut(page as usize) {
            *d = data.map_or(ZERO_PAGE_DIGEST, page_digest);
        }
    }

    /// The memory digest of the recorded pages.
    pub fn digest(&self) -> [u8; 32] {
        hash_list(&self.digests)
    }
}

/// A guest-physical byte address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestAddress(pub u64);

/// A guest page number (`address / PAGE_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageIndex(pub u64);

/// Errors of guest memory accesses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "memory size {0} bytes is not a positive multiple of {PAGE_SIZE} up to {MAX_MEMORY_BYTES}"
    )]
    BadSize(u64),
    #[error("access of {len} bytes at {addr:#x} is outside guest memory of {size} bytes")]
    OutOfRange { addr: u64, len: u64, size: u64 },
    #[error("page {0} is outside guest memory")]
    BadPage(u64),
    #[error("cannot map {size} bytes of guest memory: {reason}")]
    Map { size: u64, reason: String },
}

/// One bit per guest page. Marking and harvesting are lock-free.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    bits: u64,
}

impl DirtyBitmap {
    /// A clear bitmap of `bits` pages.
    pub fn new(bits: u64) -> DirtyBitmap {
        DirtyBitmap {
            words: crate::sys::zeroed_atomic_words(bits.div_ceil(64) as usize),
            bits,
        }
    }

    /// Number of pages covered.
    pub fn len(&self) -> u64 {
        self.bits
    }

    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Marks page `page` dirty; out-of-range pages are ignored.
    pub fn mark(&self, page: u64) {
        if page < self.bits {
            self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
        }
    }

    pub fn is_dirty(&self, page: u64) -> bool {
        page < self.bits
            && self.words[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// Number of dirty pages right now.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }

    /// Marks every page dirty (the first pre-copy round sends everything).
    pub fn mark_all(&self) {
        for (i, w) in self.words.iter().enumerate() {
            w.store(full_word_mask(self.bits, i), Ordering::Release);
        }
    }

    /// Atomically takes the dirty set and clears it: get-and-reset per word.
    pub fn harvest(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect()
    }

    /// Merges a harvested set back (it failed to send): nothing is lost.
    pub fn merge(&self, words: &[u64]) {
        for (i, (w, m)) in self.words.iter().zip(words).enumerate() {
            let m = m & full_word_mask(self.bits, i);
            if m != 0 {
                w.fetch_or(m, Ordering::Release);
            }
        }
    }

    /// Clears every bit.
    pub fn clear(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Release);
        }
    }
}

fn full_word_mask(bits: u64, word: usize) -> u64 {
    let start = word as u64 * 64;
    if start + 64 <= bits {
        u64::MAX
    } else if start >= bits {
        0
    } else {
        (1u64 << (bits - start)) - 1
    }
}

/// The page numbers whose bits are set in harvested `words`, in ascending order.
pub fn set_pages(words: &[u64]) -> impl Iterator<Item = u64> + '_ {
    words.iter().enumerate().flat_map(|(i, &w)| {
        let mut w = w;
        std::iter::from_fn(move || {
            if w == 0 {
                return None;
            }
            let b = w.trailing_zeros() as u64;
            w &= w - 1;
            Some(i as u64 * 64 + b)
        })
    })
}

/// Number of bits set in harvested `words`.
pub fn count_set(words: &[u64]) -> u64 {
    words.iter().map(|w| w.count_ones() as u64).sum()
}

static HUGE_PAGES: AtomicBool = AtomicBool::new(false);

/// Chooses, for the whole process, whether guest memory created from now on asks the
/// kernel for transparent huge pages (`madvise(MADV_HUGEPAGE)`). Off by default: on a
/// bare-metal host huge pages make fresh memory several times cheaper to fault in, but
/// inside a VM whose hypervisor reclaims free 2 MiB blocks (virtio-balloon free page
/// reporting) every fresh huge page is faulted back in by the hypervisor, several
/// times slower than small pages (measured: docs of the migration benchmark).
pub fn set_huge_pages(on: bool) {
    HUGE_PAGES.store(on, Ordering::Relaxed);
}

/// Whether new guest memory asks for transparent huge pages.
pub fn huge_pages() -> bool {
    HUGE_PAGES.load(Ordering::Relaxed)
}

/// The memory of one emulated VM.
#[derive(Debug)]
pub struct GuestMemory {
    /// Anonymous memory advised for transparent huge pages (see `sys::mem`).
    words: GuestRam,
    size: u64,
    dirty: DirtyBitmap,
}

impl GuestMemory {
    /// Zeroed guest memory of `size` bytes (a multiple of the page size), in its own
    /// mapping (huge pages if [`set_huge_pages`] asked for them). The host backs it
    /// lazily: untouched memory costs no resident memory, and dropping the last
    /// reference unmaps it.
    pub fn new(size: u64) -> Result<GuestMemory, MemoryError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE as u64) || size > MAX_MEMORY_BYTES {
            return Err(MemoryError::BadSize(size));
        }
        let pages = size / PAGE_SIZE as u64;
        let words =
            GuestRam::new((size / 8) as usize, huge_pages()).map_err(|e| MemoryError::Map {
                size,
                reason: e.to_string(),
            })?;
        Ok(GuestMemory {
            words,
            size,
            dirty: DirtyBitmap::new(pages),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of pages.
    pub fn page_count(&self) -> u64 {
        self.size / PAGE_SIZE as u64
    }

    pub fn dirty(&self) -> &DirtyBitmap {
        &self.dirty
    }

    fn page_words(&self, page: u64) -> Result<&[AtomicU64], MemoryError> {
        if page >= self.page_count() {
            return Err(MemoryError::BadPage(page));
        }
        let start = page as usize * WORDS_PER_PAGE;
        Ok(&self.words[start..start + WORDS_PER_PAGE])
    }

    fn check(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        match addr.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(MemoryError::OutOfRange {
                addr,
                len,
                size: self.size,
            }),
        }
    }

    /// Faults every page in ahead of use, in 2 MiB steps from page 0, until done or
    /// `stop` is raised; contents are unchanged, so it may run beside writers (the
    /// migration target runs it on a thread of its own ahead of the incoming stream).
    /// Returns the bytes faulted in.
    pub fn prefault(&self, stop: &AtomicBool) -> Result<u64, MemoryError> {
        const STEP: u64 = 2 << 20;
        let mut at = 0u64;
        while at < self.size && !stop.load(Ordering::Relaxed) {
            let len = STEP.min(self.size - at);
            self.words
                .populate(at as usize, len as usize)
                .map_err(|e| MemoryError::Map {
                    size: self.size,
                    reason: e.to_string(),
                })?;
            at += len;
        }
        Ok(at)
    }

    /// Copies page `page` into `buf`.
    pub fn read_page(&self, page: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), MemoryError> {
        let words = self.page_words(page)?;
        for (w, out) in words.iter().zip(buf.chunks_exact_mut(8)) {
            out.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        Ok(())
    }

    /// Overwrites page `page` with `data` and marks it dirty.
    pub fn write_page(&self, page: u64, data: &[u8; PAGE_SIZE]) -> Result<(), MemoryError> {
        let words = self.page_words(page)?;
        for (w, chunk) in words.iter().zip(data.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            w.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        self.dirty.mark(page);
        Ok(())
    }

    /// Fills page `page` with zeroes and marks it dirty.
    pub fn zero_page(&self, page: u64) -> Result<(), MemoryError> {
        for w in self.page_words(page)? {
            w.store(0, Ordering::Relaxed);
        }
        self.dirty.mark(page);
        Ok(())
    }

    /// True when every byte of page `page` is zero.
    pub fn is_zero_page(&self, page: u64) -> Result<bool, MemoryError> {
        Ok(self
            .page_words(page)?
            .iter()
            .all(|w| w.load(Ordering::Relaxed) == 0))
    }

    /// Reads `buf.len()` bytes at `addr`.
    pub fn read(&self, addr: GuestAddress, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.check(addr.0, buf.len() as u64)?;
        for (i, out) in buf.iter_mut().enumerate() {
            let a = addr.0 + i as u64;
            let w = self.words[(a / 8) as usize].load(Ordering::Relaxed);
            *out = (w >> ((a % 8) * 8)) as u8;
        }
        Ok(())
    }

    /// Writes `data` at `addr` and marks the pages it touches dirty.
    pub fn write(&self, addr: GuestAddress, data: &[u8]) -> Result<(), MemoryError> {
        self.check(addr.0, data.len() as u64)?;
        for (i, &byte) in data.iter().enumerate() {
            let a = addr.0 + i as u64;
            let shift = (a % 8) * 8;
            let mask = !(0xffu64 << shift);
            let _ = self.words[(a / 8) as usize].fetch_update(
                Ordering::Relaxed,
                Ordering::Relaxed,
                |w| Some((w & mask) | ((byte as u64) << shift)),
            );
        }
        if !data.is_empty() {
            let first = addr.0 / PAGE_SIZE as u64;
            let last = (addr.0 + data.len() as u64 - 1) / PAGE_SIZE as u64;
            for p in first..=last {
                self.dirty.mark(p);
            }
        }
        Ok(())
    }

    /// Reads the aligned little-endian u64 at `addr` (must be 8-byte aligned).
    pub fn read_u64(&self, addr: GuestAddress) -> Result<u64, MemoryError> {
        self.check(addr.0, 8)?;
        if !addr.0.is_multiple_of(8) {
            let mut b = [0u8; 8];
            self.read(addr, &mut b)?;
            return Ok(u64::from_le_bytes(b));
        }
        Ok(self.words[(addr.0 / 8) as usize].load(Ordering::Relaxed))
    }

    /// Writes the little-endian u64 `value` at `addr` and marks its page dirty.
    pub fn write_u64(&self, addr: GuestAddress, value: u64) -> Result<(), MemoryError> {
        self.check(addr.0, 8)?;
        if !addr.0.is_multiple_of(8) {
            return self.write(addr, &value.to_le_bytes());
        }
        self.words[(addr.0 / 8) as usize].store(value, Ordering::Relaxed);
        self.dirty.mark(addr.0 / PAGE_SIZE as u64);
        Ok(())
    }

    /// Adds one (wrapping) to the byte at `addr`, marks the page dirty, returns the new value.
    pub fn increment_byte(&self, addr: GuestAddress) -> Result<u8, MemoryError> {
        self.check(addr.0, 1)?;
        let shift = (addr.0 % 8) * 8;
        let old = self.words[(addr.0 / 8) as usize]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                let b = ((w >> shift) as u8).wrapping_add(1);
                Some((w & !(0xffu64 << shift)) | ((b as u64) << shift))
            })
            .unwrap_or(0);
        self.dirty.mark(addr.0 / PAGE_SIZE as u64);
        Ok(((old >> shift) as u8).wrapping_add(1))
    }

    /// The memory digest (the SHA-256 hash list of the module docs), from memory
    /// itself. Call it with the vCPUs stopped for a stable value.
    pub fn digest(&self) -> [u8; 32] {
        self.digest_with(&AtomicBool::new(false), || {})
            .unwrap_or_default()
    }

    /// [`GuestMemory::digest`] for a background caller: `between` runs after every
    /// 16 MiB (to change its pace), and a raised `stop`, checked at every page, gives
    /// up at once with `None` (the migration it served has ended).
    pub fn digest_with(&self, stop: &AtomicBool, mut between: impl FnMut()) -> Option<[u8; 32]> {
        let mut h = Sha256::new();
        let mut buf = [0u8; PAGE_SIZE];
        for p in 0..self.page_count() {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            if p % 4096 == 4095 {
                between();
            }
            // page_count bounds p, so read_page cannot fail.
            let _ = self.read_page(p, &mut buf);
            if buf.iter().all(|&b| b == 0) {
                h.update(ZERO_PAGE_DIGEST);
            } else {
                h.update(page_digest(&buf));
            }
        }
        Some(h.finalize().into())
    }

    /// Number of pages holding at least one non-zero byte.
    pub fn nonzero_pages(&self) -> u64 {
        (0..self.page_count())
            .filter(|&p| !self.is_zero_page(p).unwrap_or(true))
            .count() as u64
    }
}

/// Lower-case hex of a digest, for logs and JSON.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked() {
        assert!(GuestMemory::new(0).is_err());
        assert!(GuestMemory::new(4095).is_err());
        assert!(GuestMemory::new(MAX_MEMORY_BYTES + 4096).is_err());
        let m = GuestMemory::new(1 << 20).unwrap();
        assert_eq!(m.page_count(), 256);
        assert_eq!(m.dirty().len(), 256);
    }

    #[test]
    fn writes_mark_pages_dirty() {
        let m = GuestMemory::new(16 * PAGE_SIZE as u64).unwrap();
        assert_eq!(m.dirty().count(), 0);
        m.write(GuestAddress(4095), &[1, 2]).unwrap();
        assert!(m.dirty().is_dirty(0) && m.dirty().is_dirty(1));
        m.write_u64(GuestAddress(5 * 4096), 9).unwrap();
        m.increment_byte(GuestAddress(7 * 4096 + 3)).unwrap();
        let mut page = [0xaau8; PAGE_SIZE];
        m.write_page(9, &page).unwrap();
        let words = m.dirty().harvest();
        assert_eq!(set_pages(&words).collect::<Vec<_>>(), vec![0, 1, 5, 7, 9]);
        assert_eq!(m.dirty().count(), 0);
        m.read_page(9, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0xaa));
        let mut b = [0u8; 2];
        m.read(GuestAddress(4095), &mut b).unwrap();
        assert_eq!(b, [1, 2]);
        assert_eq!(m.read_u64(GuestAddress(5 * 4096)).unwrap(), 9);
    }

    #[test]
    fn out_of_range_is_an_error() {
        let m = GuestMemory::new(PAGE_SIZE as u64).unwrap();
        assert!(m.write(GuestAddress(4095), &[1, 2]).is_err());
        assert!(m.read_u64(GuestAddress(u64::MAX - 3)).is_err());
        assert!(m.read_page(1, &mut [0; PAGE_SIZE]).is_err());
        assert_eq!(m.dirty().count(), 0);
    }

    #[test]
    fn harvest_merge_keeps_everything() {
        let b = DirtyBitmap::new(130);
        b.mark(0);
        b.mark(129);
        b.mark(500); // ignored
        let words = b.harvest();
        assert_eq!(count_set(&words), 2);
        b.mark(64);
        b.merge(&words);
        assert_eq!(
            set_pages(&b.harvest()).collect::<Vec<_>>(),
            vec![0, 64, 129]
        );
        b.mark_all();
        assert_eq!(b.count(), 130);
    }

    #[test]
    fn increment_wraps_and_hash_changes() {
        let m = GuestMemory::new(2 * PAGE_SIZE as u64).unwrap();
        let h0 = m.digest();
        for _ in 0..256 {
            m.increment_byte(GuestAddress(10)).unwrap();
        }
        assert_eq!(m.digest(), h0);
        assert_eq!(m.increment_byte(GuestAddress(10)).unwrap(), 1);
        assert_ne!(m.digest(), h0);
        assert!(!m.is_zero_page(0).unwrap());
        assert!(m.is_zero_page(1).unwrap());
        assert_eq!(m.nonzero_pages(), 1);
    }

    #[test]
    fn digest_is_the_hash_list_of_the_pages() {
        assert_eq!(page_digest(&[0; PAGE_SIZE]), ZERO_PAGE_DIGEST);
        let m = GuestMemory::new(4 * PAGE_SIZE as u64).unwrap();
        let mut page = [0u8; PAGE_SIZE];
        page[7] = 1;
        m.write_page(2, &page).unwrap();
        // By definition: SHA-256 over the concatenated page digests, in page order.
        let mut concat = Vec::new();
        for p in 0..4 {
            let mut b = [0u8; PAGE_SIZE];
            m.read_page(p, &mut b).unwrap();
            concat.extend_from_slice(&Sha256::digest(b));
        }
        let expected: [u8; 32] = Sha256::digest(&concat).into();
        assert_eq!(m.digest(), expected);
        assert_eq!(
            hex(&GuestMemory::new(PAGE_SIZE as u64).unwrap().digest()),
            // sha256(sha256(4096 zero bytes))
            hex(&Sha256::digest(ZERO_PAGE_DIGEST))
        );

        // Recording pages as they arrive gives the same value; later copies win.
        let mut d = PageDigests::new(4);
        d.record(2, Some(&[0xff; PAGE_SIZE]));
        d.record(1, Some(&[0xee; PAGE_SIZE]));
        d.record(1, None);
        d.record(2, Some(&page));
        d.record(9, Some(&page)); // out of range: ignored
        assert_eq!(d.digest(), m.digest());
        m.zero_page(2).unwrap();
        assert_ne!(d.digest(), m.digest());
        d.record(2, None);
        assert_eq!(d.digest(), m.digest());
    }
}
