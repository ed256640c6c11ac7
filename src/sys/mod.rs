//! The crate's only `unsafe` code: system calls without a safe wrapper (TAP ioctls,
//! packet sockets, guest RAM mappings) and zero-cost views of freshly zeroed memory.
//! Each block carries a `// SAFETY:` line.
#![allow(unsafe_code)]

pub mod epoll;
pub mod mem;
pub mod netlink;
pub mod packet;
pub mod poll;
pub mod tap;
pub mod udp;

use std::sync::atomic::AtomicU64;

/// Allocates `n` zeroed atomic words without touching them, so the kernel backs the
/// memory lazily (a 4 GiB guest costs nothing until it is written).
pub fn zeroed_atomic_words(n: usize) -> Box<[AtomicU64]> {
    // The cast below needs u64 and AtomicU64 to share size and alignment; std promises
    // the size everywhere but the alignment only where u64 is 8-aligned (not i686).
    const _: () = assert!(
        std::mem::align_of::<u64>() == std::mem::align_of::<AtomicU64>()
            && std::mem::size_of::<u64>() == std::mem::size_of::<AtomicU64>()
    );
    let words: Box<[u64]> = vec![0u64; n].into_boxed_slice();
    let len = words.len();
    let ptr = Box::into_raw(words) as *mut u64;
    // SAFETY: AtomicU64 has the same bit validity as u64 (std::sync::atomic) and, as the
    // assertion above checks at compile time, the same size and alignment here; the
    // pointer comes from a Box<[u64]> of `len` elements that we own and no longer use.
    unsafe {
        Box::from_raw(std::ptr::slice_from_raw_parts_mut(
            ptr as *mut AtomicU64,
            len,
        ))
    }
}

/// Moves the calling thread to the `SCHED_IDLE` policy: it runs only on CPU time no
/// other thread wants. For background work that must not slow what is timed (the
/// source's memory digest beside the pull). Returns false if the kernel refused.
pub fn make_current_thread_idle() -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread; `param` is a valid sched_param that the
    // call only reads.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 }
}

/// Moves the calling thread back to the normal time-sharing policy (`SCHED_OTHER`).
/// Unprivileged threads may be refused (RLIMIT_NICE); returns false then.
pub fn make_current_thread_normal() -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: as in make_current_thread_idle.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) == 0 }
}

/// Why a Unix socket's path could not be made ready.
#[derive(Debug)]
pub enum SocketPathError {
    /// Something live answers there.
    InUse,
    Io(std::io::Error),
}

/// Makes ready the path a Unix socket is to be bound at: its directory is made if
/// missing (born 0700; one that exists is left as it is, since nothing here changes
/// permissions on what it did not create — setting the mode afterwards would follow
/// `..`), and a stale entry there (one `live` says nobody answers on) is removed. A
/// live one is refused.
pub fn clear_socket_path(
    path: &std::path::Path,
    live: impl Fn(&std::path::Path) -> bool,
) -> Result<(), SocketPathError> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(SocketPathError::Io)?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        if live(path) {
            return Err(SocketPathError::InUse);
        }
        std::fs::remove_file(path).map_err(SocketPathError::Io)?;
    }
    Ok(())
}

/// Sets glibc's allocator up for a long-lived daemon whose large buffers come and go
/// with VMs and migrations: a fixed mmap threshold (glibc otherwise raises it to the
/// size of each large block freed, after which such blocks are carved from the heap
/// and their memory stays there after they are freed), and at most two arenas (one
/// per core here, instead of up to eight per core, each holding freed memory of its
/// own). Call it before the runtime's threads start.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets the allocator's parameters; no pointer is passed.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Moves the calling thread to `SCHED_FIFO` at `priority` (1–99): it runs before every
/// time-shared thread whenever it is ready. Needs CAP_SYS_NICE (or RLIMIT_RTPRIO).
pub fn set_current_thread_fifo(priority: u8) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: libc::c_int::from(priority),
    };
    // SAFETY: pid 0 names the calling thread; `param` is a valid sched_param that the
    // call only reads.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Pins the calling thread to CPU `cpu`.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` was checked against CPU_SETSIZE above, so the bit is inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 names the calling thread; `set` is a valid cpu_set_t of the size
    // passed, which the call only reads.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Gives the allocator's free memory back to the kernel (glibc keeps freed heap in its
/// per-thread arenas otherwise): after a VM leaves, the daemon's resident size then
/// shows what it really holds. Returns whether anything was released.
pub fn trim_heap() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no
        // pointer and is safe to call from any thread at any time.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
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

    #[test]
    fn a_thread_can_be_pinned_and_made_real_time() {
        let got = std::thread::spawn(|| {
            let pinned = super::pin_current_thread(0).is_ok();
            // SAFETY (test): sched_getcpu takes nothing and reads the calling thread.
            let cpu = unsafe { libc::sched_getcpu() };
            let fifo = super::set_current_thread_fifo(1).is_ok();
            // SAFETY (test): sched_getscheduler only reads the calling thread's policy.
            let policy = unsafe { libc::sched_getscheduler(0) };
            (pinned, cpu, fifo, policy)
        })
        .join()
        .unwrap();
        assert_eq!((got.0, got.1), (true, 0));
        if crate::sys::tap::is_root() {
            assert_eq!((got.2, got.3), (true, libc::SCHED_FIFO));
        }
        assert!(super::pin_current_thread(usize::MAX).is_err());
    }

    #[test]
    fn a_thread_can_step_aside() {
        let idle = std::thread::spawn(|| {
            let ok = super::make_current_thread_idle();
            // SAFETY (test): sched_getscheduler only reads the calling thread's policy.
            let idle = (ok, unsafe { libc::sched_getscheduler(0) });
            let ok = super::make_current_thread_normal();
            // SAFETY (test): as above.
            (idle, (ok, unsafe { libc::sched_getscheduler(0) }))
        })
        .join()
        .unwrap();
        let is_root = crate::sys::tap::is_root();
        assert_eq!(idle.0, (true, libc::SCHED_IDLE));
        if is_root {
            assert_eq!(idle.1, (true, libc::SCHED_OTHER));
        }
        // SAFETY (test): as above, for this thread, which kept its policy.
        assert_ne!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_IDLE);
    }
}
