//! Body copies into and out of the broadcast ring's data area: whole words, each a Relaxed
//! [`crate::sync::AtomicU64`] access, through the unrolled runs of `src/ring/copy.rs` that the
//! SPSC ring uses (inlined into the publish and drain paths). A body
//! starts 16 bytes into a 64-aligned record, so every run starts on a word boundary; a body
//! that wraps around the end of the data area is two runs (the split is at `cap`, a multiple
//! of 8).

use super::RawMcast;
use crate::ring::copy::{load_aligned_run, store_aligned_run};

impl RawMcast {
    /// Copy `src` into the data area at position `pos` (8-aligned), wrapping around the end.
    /// The bytes of the last word past `src` are zeros (record padding). The caller owns the
    /// bytes (they are below no reader's valid record: `floor` was raised past them).
    #[inline(always)]
    pub(super) fn copy_in(&self, pos: u64, src: &[u8]) {
        let off = self.off(pos);
        debug_assert!(off % 8 == 0 && src.len() <= self.cap);
        if off + src.len() <= self.cap {
            self.store_run(off, src);
        } else {
            let (a, b) = src.split_at(self.cap - off);
            self.store_run(off, a);
            self.store_run(0, b);
        }
    }

    #[inline(always)]
    fn store_run(&self, off: usize, src: &[u8]) {
        store_aligned_run(|o| self.word(o), off, src);
    }

    /// Copy `dst.len()` bytes at position `pos` (8-aligned) out of the data area, wrapping.
    /// What is copied may be torn by a concurrent producer: the caller validates it after.
    #[inline(always)]
    pub(super) fn copy_out(&self, pos: u64, dst: &mut [u8]) {
        let off = self.off(pos);
        debug_assert!(off % 8 == 0 && dst.len() <= self.cap);
        if off + dst.len() <= self.cap {
            self.load_run(off, dst);
        } else {
            let (a, b) = dst.split_at_mut(self.cap - off);
            self.load_run(off, a);
            self.load_run(0, b);
        }
    }

    #[inline(always)]
    fn load_run(&self, off: usize, dst: &mut [u8]) {
        // SAFETY: `dst` is valid for its length of byte writes.
        unsafe { load_aligned_run(|o| self.word(o), off, dst.as_mut_ptr(), dst.len()) };
    }
}
