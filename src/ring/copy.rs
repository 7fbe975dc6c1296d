//! The body copies into and out of the data area: whole aligned words, each a Relaxed
//! [`crate::sync::AtomicU64`] access (see [`RawRing::copy_in`]), so a hostile process writing the same
//! bytes concurrently is never a data race in the Rust memory model.

use super::RawRing;
use crate::sync::{AtomicU64, Ordering};

impl RawRing {
    /// Copy `src` into the data area at position `pos`, wrapping around the end.
    ///
    /// Every access to the data area is a Relaxed [`crate::sync::AtomicU64`] store (or, for a word this
    /// copy only partly fills, a Relaxed load and store of that word): a hostile consumer
    /// writing or reading the same bytes concurrently is then not a data race in the Rust
    /// memory model, only torn contents. The stamp's Release store orders these stores for
    /// an honest consumer. On x86-64 a Relaxed 8-byte store is a plain `mov`.
    ///
    /// # Safety
    /// `[pos, pos + src.len())` must be free space owned by the producer, inside one record
    /// (so every word it touches is the producer's: records are padded to [`super::REC_ALIGN`]),
    /// and `src.len() <= cap`.
    #[inline(always)]
    pub(super) unsafe fn copy_in(&self, pos: u64, src: &[u8]) {
        let off = self.off(pos);
        if off + src.len() <= self.cap {
            self.store_run(off, src);
        } else {
            self.copy_in_wrapped(off, src);
        }
    }

    /// Store `src` at data offset `off`: the body bytes that share a record header's line.
    /// A Relaxed store per word, as [`RawRing::copy_in`].
    ///
    /// # Safety
    /// `off` is a multiple of 8, `N` a multiple of 8, and `[off, off + N)` lies inside one
    /// record line (so it does not wrap) of free space owned by the producer.
    #[inline(always)]
    pub(super) unsafe fn store_words<const N: usize>(&self, off: usize, src: &[u8; N]) {
        for (k, w) in src.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.word(off + 8 * k).store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
    }

    /// `copy_in` of a body that wraps around the end of the data area: two runs.
    #[inline(never)]
    fn copy_in_wrapped(&self, off: usize, src: &[u8]) {
        let (a, b) = src.split_at(self.cap - off);
        self.store_run(off, a);
        self.store_run(0, b);
    }

    /// `copy_in` of a run that does not wrap: `off + src.len() <= cap`.
    #[inline(always)]
    fn store_run(&self, mut off: usize, mut src: &[u8]) {
        if off & 7 != 0 {
            (off, src) = self.store_head(off, src);
        }
        store_aligned_run(|o| self.word(o), off, src);
    }

    /// The first bytes of a part that starts inside a word an earlier part of the record
    /// began (never the case for a message written in one part): merged into that word.
    /// Returns where the whole words start and what is left of `src`.
    #[cold]
    #[inline(never)]
    fn store_head<'s>(&self, off: usize, src: &'s [u8]) -> (usize, &'s [u8]) {
        let skip = off & 7;
        let n = (8 - skip).min(src.len());
        let w = self.word(off - skip);
        let mut b = w.load(Ordering::Relaxed).to_le_bytes();
        b[skip..skip + n].copy_from_slice(&src[..n]);
        w.store(u64::from_le_bytes(b), Ordering::Relaxed);
        (off + n, &src[n..])
    }

    /// Copy `len` bytes at position `pos` out of the data area to `dst`.
    ///
    /// Every read of the data area is a Relaxed [`crate::sync::AtomicU64`] load of a whole word (as
    /// `copy_in`): a hostile producer rewriting the record meanwhile yields torn bytes, never
    /// a data race. The caller's Acquire load of the stamp orders them after an honest
    /// producer's stores. `dst` is private memory, written with plain (unaligned) stores.
    ///
    /// # Safety
    /// `[pos, pos + len)` must be committed, unconsumed bytes of one record (every word it
    /// touches lies in that record); `dst` valid for `len` byte writes.
    #[inline(always)]
    pub(super) unsafe fn copy_out(&self, pos: u64, dst: *mut u8, len: usize) {
        let off = self.off(pos);
        // SAFETY: dst is valid for len writes (caller).
        unsafe {
            if off + len <= self.cap {
                self.load_run(off, dst, len);
            } else {
                self.copy_out_wrapped(off, dst, len);
            }
        }
    }

    /// `copy_out` of a body that wraps around the end of the data area: two runs.
    ///
    /// # Safety
    /// `dst` valid for `len` byte writes; `off + len > cap`.
    #[inline(never)]
    unsafe fn copy_out_wrapped(&self, off: usize, dst: *mut u8, len: usize) {
        let first = self.cap - off;
        // SAFETY: first < len, so both runs stay within the len bytes at dst.
        unsafe {
            self.load_run(off, dst, first);
            self.load_run(0, dst.add(first), len - first);
        }
    }

    /// `copy_out` of a run that does not wrap: `off + len <= cap`.
    ///
    /// # Safety
    /// `dst` valid for `len` byte writes.
    #[inline(always)]
    unsafe fn load_run(&self, mut off: usize, mut dst: *mut u8, mut len: usize) {
        if off & 7 != 0 && len != 0 {
            // Never on the library's paths (bodies start 16 bytes into a 64-byte record).
            let skip = off & 7;
            let n = (8 - skip).min(len);
            let b = self.word(off - skip).load(Ordering::Relaxed).to_le_bytes();
            // SAFETY: n <= len bytes, within what is left at dst (caller).
            unsafe {
                std::ptr::copy_nonoverlapping(b.as_ptr().add(skip), dst, n);
                dst = dst.add(n);
            }
            off += n;
            len -= n;
        }
        // SAFETY: dst valid for len byte writes (caller).
        unsafe { load_aligned_run(|o| self.word(o), off, dst, len) };
    }
}

/// Store `src` into the data-area words `word(off)`, `word(off + 8)`, ... (`off` a multiple
/// of 8), a Relaxed store each; the bytes of the last word past `src` are zeros (record
/// padding, or the start of a later part of the record, which merges into that word), the
/// words in [`for_each_word`]'s unrolled steps. Shared by both rings.
#[inline(always)]
pub(super) fn store_aligned_run<'a>(word: impl Fn(usize) -> &'a AtomicU64, off: usize, src: &[u8]) {
    let (p, n) = (src.as_ptr(), src.len());
    // SAFETY: every read is of eight bytes of `src` at i + 8 * k <= n - 8.
    let word_at = |i: usize| u64::from_le_bytes(unsafe { p.add(i).cast::<[u8; 8]>().read_unaligned() });
    let put = |i: usize, v: u64| word(off + i).store(v, Ordering::Relaxed);
    let i = for_each_word(n, |i| put(i, word_at(i)));
    if i < n {
        // SAFETY: the n - i < 8 bytes from `p + i` are the rest of `src`.
        let v = unsafe { tail_word(p.add(i), n - i) };
        put(i, v);
    }
}

/// Copy `len` bytes out of the data-area words `word(off)`, ... (`off` a multiple of 8),
/// a Relaxed load each, to private memory at `dst` (plain unaligned stores); as
/// [`store_aligned_run`], in [`for_each_word`]'s steps.
///
/// # Safety
/// `dst` valid for `len` byte writes.
#[inline(always)]
pub(super) unsafe fn load_aligned_run<'a>(word: impl Fn(usize) -> &'a AtomicU64, off: usize, dst: *mut u8, len: usize) {
    // SAFETY: every write is of eight bytes at dst + i + 8 * k <= dst + len - 8;
    // unaligned stores to private memory.
    let put = |i: usize, v: u64| unsafe { dst.add(i).cast::<[u8; 8]>().write_unaligned(v.to_le_bytes()) };
    let get = |i: usize| word(off + i).load(Ordering::Relaxed);
    let i = for_each_word(len, |i| put(i, get(i)));
    if i < len {
        // The record's last word: its bytes past the body are the record's padding.
        let v = get(i);
        // SAFETY: the len - i < 8 bytes left at dst + i.
        unsafe { store_tail(v, dst.add(i), len - i) };
    }
}

/// Call `f(i)` for every whole word of a run of `n` bytes (`i` = 0, 8, ... while `i + 8 <=
/// n`), four per step, then 2 and 1 without a loop: few instructions per word (the compiler
/// neither merges nor vectorizes atomic accesses as it would a copy). Returns where the
/// partial last word starts (`n` rounded down to 8).
#[inline(always)]
fn for_each_word(n: usize, mut f: impl FnMut(usize)) -> usize {
    let whole = n & !7;
    let mut i = 0;
    while i < whole & !31 {
        f(i);
        f(i + 8);
        f(i + 16);
        f(i + 24);
        i += 32;
    }
    if whole & 16 != 0 {
        f(i);
        f(i + 8);
        i += 16;
    }
    if whole & 8 != 0 {
        f(i);
        i += 8;
    }
    i
}

/// The word whose first `n` (< 8) bytes are those at `p`, zeros after: a few loads, not
/// a call to `memcpy` as `copy_from_slice` of a variable length would be.
///
/// # Safety
/// `p` valid for `n` byte reads.
#[inline(always)]
unsafe fn tail_word(p: *const u8, n: usize) -> u64 {
    debug_assert!(n < 8);
    let (mut v, mut i) = (0u64, 0);
    // SAFETY: each read is of bytes among the n at p (the bits 4, 2 and 1 of n add up to n).
    unsafe {
        if n & 4 != 0 {
            v = u64::from(u32::from_le_bytes(p.cast::<[u8; 4]>().read_unaligned()));
            i = 4;
        }
        if n & 2 != 0 {
            v |= u64::from(u16::from_le_bytes(p.add(i).cast::<[u8; 2]>().read_unaligned())) << (8 * i);
            i += 2;
        }
        if n & 1 != 0 {
            v |= u64::from(p.add(i).read()) << (8 * i);
        }
    }
    v
}

/// Store the first `len` (< 8) little-endian bytes of `v` at `dst` (the inverse of
/// [`tail_word`]).
///
/// # Safety
/// `dst` valid for `len` byte writes.
#[inline(always)]
unsafe fn store_tail(v: u64, dst: *mut u8, len: usize) {
    debug_assert!(len < 8);
    let (mut v, mut dst) = (v, dst);
    // SAFETY: each write is of bytes among the len at dst (bits 4, 2 and 1 of len sum to len).
    unsafe {
        if len & 4 != 0 {
            dst.cast::<[u8; 4]>().write_unaligned((v as u32).to_le_bytes());
            (v, dst) = (v >> 32, dst.add(4));
        }
        if len & 2 != 0 {
            dst.cast::<[u8; 2]>().write_unaligned((v as u16).to_le_bytes());
            (v, dst) = (v >> 16, dst.add(2));
        }
        if len & 1 != 0 {
            dst.write(v as u8);
        }
    }
}
