//! What a paced run has published, readable by the parent while the child is stopped: one
//! atomic counter per publisher incarnation in a shared file mapping (`sent-<slot>-<inc>` in
//! the cluster's directory), stored after every publish that returned `Ok`.
//!
//! The parent asks nothing of the child: it stops it (SIGSTOP, then waits for the kernel to
//! report it stopped), reads the file, and knows exactly what the incarnation published, up
//! to the one event whose publish may have returned before the store (`read + 1` bounds
//! it). A bound obtained by asking the child (`run-count`) is not one: a child that was
//! stopped or starved answers a command before it catches up with its pace, and then
//! publishes up to 2000 more events before a signal sent on the answer lands.

use std::path::{Path, PathBuf};

/// The counter cell: a shared file mapping written by one process and read by its parent;
/// an atomic makes it untearable. The library's `crate::sync` shim is private to it.
#[allow(clippy::disallowed_types)]
type Cell = std::sync::atomic::AtomicU64;

/// The child's end: the mapping it stores its count into.
pub struct SentCell {
    map: memmap2::MmapMut,
}

/// The file of `slot`'s incarnation `inc` in `dir`.
pub fn path(dir: &Path, slot: u32, inc: u32) -> PathBuf {
    dir.join(format!("sent-{slot}-{inc}"))
}

impl SentCell {
    /// Create (zeroed) the counter file and map it.
    pub fn create(dir: &Path, slot: u32, inc: u32) -> SentCell {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path(dir, slot, inc))
            .unwrap();
        f.set_len(8).unwrap();
        // SAFETY: a private test file that only this process maps (the parent reads it with
        // `read`, never through a mapping).
        let map = unsafe { memmap2::MmapMut::map_mut(&f).unwrap() };
        SentCell { map }
    }

    /// Store the number of events published so far.
    pub fn store(&self, n: u64) {
        // SAFETY: the mapping is 8 bytes long and page-aligned, and only ever accessed as an
        // atomic, so a SIGKILL never leaves a torn value.
        let cell = unsafe { &*(self.map.as_ptr() as *const Cell) };
        cell.store(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// (parent) What the incarnation stored, or None if it never started a run (no file yet).
/// Read it only once the child is stopped or dead.
pub fn read(dir: &Path, slot: u32, inc: u32) -> Option<u64> {
    let b = std::fs::read(path(dir, slot, inc)).ok()?;
    Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?))
}
