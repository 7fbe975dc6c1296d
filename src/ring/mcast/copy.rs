//! Body copies into and out of the broadcast ring's data area: whole words, each a Relaxed
//! [`crate::sync::AtomicU64`] access (as `src/ring/copy.rs` does for the SPSC ring). A body
//! starts 16 bytes into a 64-aligned record, so every run starts on a word boundary; a body
//! that wraps around the end of the data area is two runs (the split is at `cap`, a multiple
//! of 8).

use super::RawMcast;
use crate::sync::Ordering;

impl RawMcast {
    /// Copy `src` into the data area at position `pos` (8-aligned), wrapping around the end.
    /// The bytes of the last word past `src` are zeros (record padding). The caller owns the
    /// bytes (they are below no reader's valid record: `floor` was raised past them).
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

    fn store_run(&self, off: usize, src: &[u8]) {
        let mut chunks = src.chunks_exact(8);
        let mut o = off;
        for c in &mut chunks {
            let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.word(o).store(v, Ordering::Relaxed);
            o += 8;
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.word(o).store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
    }

    /// Copy `dst.len()` bytes at position `pos` (8-aligned) out of the data area, wrapping.
    /// What is copied may be torn by a concurrent producer: the caller validates it after.
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

    fn load_run(&self, off: usize, dst: &mut [u8]) {
        let mut chunks = dst.chunks_exact_mut(8);
        let mut o = off;
        for c in &mut chunks {
            c.copy_from_slice(&self.word(o).load(Ordering::Relaxed).to_le_bytes());
            o += 8;
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let n = rest.len();
            rest.copy_from_slice(&self.word(o).load(Ordering::Relaxed).to_le_bytes()[..n]);
        }
    }
}
