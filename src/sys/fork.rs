//! What a `fork()` child inherits, and how it is taken back.
//!
//! A child made by `fork()` without `exec` inherits every descriptor of its parent, and a
//! descriptor keeps its open file description alive: the OFD locks on the lock file (a
//! worker's slot, the broker role, the region), the broker's listening socket and the control
//! connections. Left alone, a child that outlives its parent would hold the parent's worker id
//! (a restarted worker gets `WidInUse`), keep the broker lock and a dead listener that accepts
//! connections nobody serves, and keep connections open so the broker never sees the parent
//! leave.
//!
//! So the descriptors that carry such state are created as [`ParentOnly`]: their numbers sit
//! in a fixed table, and a `pthread_atfork` child handler points each of them at `/dev/null`
//! (`dup3`), which drops the child's reference to the lock file or socket while the number
//! stays valid for the `OwnedFd` that will close it. The handler also counts forks, so a
//! `Worker` used in the child sees [`forks`] changed and refuses to run (it would otherwise
//! write into its parent's rings). Everything the handler does is async-signal-safe: atomic
//! loads and stores, `open`, `dup3`, `close`.
//!
//! Limits: a process that forks through a raw `clone` system call (not through libc's
//! `fork`) skips the handler; past [`CAPACITY`] guarded descriptors in one process the
//! surplus is not guarded (counted in [`unguarded`]).

use crate::sync::Ordering;
use crate::sync::process_local::{AtomicI32, AtomicU64};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Once;

/// How many descriptors one process can guard at once.
pub(crate) const CAPACITY: usize = 4096;

const FREE: i32 = -1;
static TABLE: [AtomicI32; CAPACITY] = [const { AtomicI32::new(FREE) }; CAPACITY];
static FORKS: AtomicU64 = AtomicU64::new(0);
static UNGUARDED: AtomicU64 = AtomicU64::new(0);
static HANDLER: Once = Once::new();

/// How many times this process's ancestors forked it away from the process that created a
/// worker: 0 in the process that started, incremented in each `fork()` child.
pub(crate) fn forks() -> u64 {
    FORKS.load(Ordering::Relaxed)
}

/// Descriptors that could not be guarded because the table was full.
#[allow(dead_code)] // read by tests and by the crate docs' claim
pub(crate) fn unguarded() -> u64 {
    UNGUARDED.load(Ordering::Relaxed)
}

extern "C" fn in_child() {
    FORKS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: a NUL-terminated path; `open` is async-signal-safe.
    let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    for slot in &TABLE {
        let fd = slot.load(Ordering::Relaxed);
        if fd < 0 {
            continue;
        }
        if null >= 0 {
            // SAFETY: `fd` is open in this (single-threaded, just forked) child: the parent
            // held it when it forked, since a number leaves the table before it is closed.
            // `dup3` replaces the child's copy atomically; the parent's is untouched.
            unsafe { libc::dup3(null, fd, libc::O_CLOEXEC) };
        }
        // The child's copy no longer needs guarding (its number now names /dev/null).
        slot.store(FREE, Ordering::Relaxed);
    }
    if null >= 0 {
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(null) };
    }
}

fn install_handler() {
    HANDLER.call_once(|| {
        // SAFETY: registers a child handler that only does async-signal-safe work.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        if rc != 0 {
            tracing::warn!(rc, "pthread_atfork failed: a fork() child would keep this worker's locks");
        }
    });
}

/// A descriptor that a `fork()` child does not keep (see the module docs).
#[derive(Debug)]
pub(crate) struct ParentOnly {
    fd: OwnedFd,
    slot: Option<usize>,
}

impl ParentOnly {
    /// Guard `fd`.
    pub(crate) fn new(fd: OwnedFd) -> ParentOnly {
        install_handler();
        let raw = fd.as_raw_fd();
        let slot =
            TABLE.iter().position(|s| s.compare_exchange(FREE, raw, Ordering::Relaxed, Ordering::Relaxed).is_ok());
        if slot.is_none() {
            UNGUARDED.fetch_add(1, Ordering::Relaxed);
        }
        ParentOnly { fd, slot }
    }

    /// Is this descriptor in the table (a fork child will not keep it)?
    #[cfg(test)]
    pub(crate) fn guarded(&self) -> bool {
        self.slot.is_some()
    }
}

impl Drop for ParentOnly {
    fn drop(&mut self) {
        // Leave the table before the number is closed (and can be reused by anyone).
        if let Some(i) = self.slot {
            let _ = TABLE[i].compare_exchange(self.fd.as_raw_fd(), FREE, Ordering::Relaxed, Ordering::Relaxed);
        }
    }
}

impl AsFd for ParentOnly {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for ParentOnly {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// `io::Result` helper for callers that create a descriptor and guard it at once.
#[allow(dead_code)]
pub(crate) fn guard(fd: io::Result<OwnedFd>) -> io::Result<ParentOnly> {
    fd.map(ParentOnly::new)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_guarded_descriptor_leaves_the_table_when_dropped() {
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let raw = fd.as_raw_fd();
        let g = ParentOnly::new(fd);
        assert!(g.guarded());
        let i = g.slot.unwrap();
        assert_eq!(TABLE[i].load(Ordering::Relaxed), raw);
        drop(g);
        assert_ne!(TABLE[i].load(Ordering::Relaxed), raw, "the number must leave the table before it is closed");
    }
}
