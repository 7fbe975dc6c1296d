//! The benches' own shared memory (never the library's region): a memfd mapped by the parent
//! and inherited by a child as a descriptor, then mapped again there. (A `MAP_SHARED |
//! MAP_ANONYMOUS` mapping is the same kind of shmem object, but it would not survive the
//! child's `execve`.)

// Process-private baselines and control words over a plain mapping, not the crate's protocol.
#![allow(clippy::disallowed_types)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;

/// A shared mapping of `len` bytes backed by a memfd. Invariant: `ptr` is the page-aligned
/// start of a live `len`-byte shared mapping, unmapped in `Drop`.
pub struct Shm {
    ptr: *mut u8,
    len: usize,
    fd: OwnedFd,
}

impl Shm {
    /// A fresh, zeroed memfd of `len` bytes, mapped.
    pub fn create(len: usize) -> Shm {
        // SAFETY: memfd_create with a valid C string; the fd is owned right after.
        let raw = unsafe { libc::memfd_create(c"we-bench".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain ftruncate on our descriptor.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }, 0);
        Shm::map(fd, len)
    }

    /// Map the memfd the parent passed (the first inherited descriptor), `len` bytes.
    pub fn inherited(fds: &[RawFd], len: usize) -> Shm {
        // SAFETY: the descriptor was inherited for us alone (its number came in the env).
        Shm::map(unsafe { OwnedFd::from_raw_fd(fds[0]) }, len)
    }

    fn map(fd: OwnedFd, len: usize) -> Shm {
        // SAFETY: a fresh shared mapping of a memfd of `len` bytes; unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        Shm { ptr: ptr.cast(), len, fd }
    }

    /// The memfd, to pass to a child.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The 8-byte word at `off`, accessed only atomically by every process.
    pub fn word(&self, off: usize) -> &AtomicU64 {
        assert!(off % 8 == 0 && off + 8 <= self.len);
        // SAFETY: in bounds, 8-aligned (page-aligned base), shared memory only ever accessed
        // atomically at these offsets by every process.
        unsafe { &*self.ptr.add(off).cast::<AtomicU64>() }
    }

    /// The 64 bytes at `off`.
    pub fn slot(&self, off: usize) -> *mut u8 {
        assert!(off + 64 <= self.len);
        // SAFETY: in bounds (checked above).
        unsafe { self.ptr.add(off) }
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `map`; no reference outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
